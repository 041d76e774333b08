"""Process and IO loop readings, and :class:`ResourceReporter`, which sends them to statsd.

Every ``sleep_time`` seconds a started reporter takes these readings in the process and on
the loop it was given, and sends them as statsd gauges in one UDP packet::

    {prefix}.cpu             CPU time used since the last report, in percent of one core
    {prefix}.rss             resident set size now, kB            (psutil)
    {prefix}.maxrss          peak resident set size, kB           (resource.getrusage)
    {prefix}.ioloop.handler  file descriptors registered on the loop's selector
    {prefix}.ioloop.callback callbacks ready to run on the loop
    {prefix}.ioloop.timeout  timers scheduled on the loop and not cancelled
    {prefix}.ioloop.lag      ms by which this report ran later than it was scheduled

The first six keep the names Looppool 0.3 used. ``ioloop.lag`` is the one to alert on: it
grows when a callback or coroutine holds the loop without yielding, which is exactly when
the loop can serve nothing else.

asyncio publishes no way to count a loop's descriptors, ready callbacks or timers, so these
three readings come from private attributes of asyncio's own selector event loop, which
Tornado 6 runs on. Each is read in one function below and only there; on a loop without them
(uvloop, for one) that function returns ``None`` and the gauge is left out of the report.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import resource
import sys
import time
from typing import Protocol

import psutil
from tornado.ioloop import IOLoop
from tornado.platform.asyncio import BaseAsyncIOLoop

__all__ = ['CpuMeter', 'ResourceReporter', 'loop_readings', 'memory_readings']

log = logging.getLogger(__name__)

# Characters that would break the statsd line format ``name:value|type``, one per line.
_FORBIDDEN_IN_NAMES = frozenset(':|@\n\r\t ')


class _StatsPipeline(Protocol):
    def gauge(self, stat: str, value: float) -> object: ...

    def send(self) -> object: ...


class _StatsClient(Protocol):
    """What the reporter needs of a ``statsd.StatsClient``: its ``pipeline()``."""

    def pipeline(self) -> _StatsPipeline: ...


def _asyncio_loop(ioloop: IOLoop | asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    """The asyncio loop behind ``ioloop``; raise ``TypeError`` if it is neither kind."""
    if isinstance(ioloop, BaseAsyncIOLoop):
        return ioloop.asyncio_loop
    if isinstance(ioloop, asyncio.AbstractEventLoop):
        return ioloop
    raise TypeError(f'ioloop must be a tornado.ioloop.IOLoop running on asyncio or an '
                    f'asyncio event loop, got {ioloop!r}')


# The private attributes. Each function is the only place its attribute is read, and each
# returns None when the attribute is missing or not what asyncio's own loop keeps there.

def _registered_fd_count(loop: asyncio.AbstractEventLoop) -> int | None:
    """Descriptors registered on the loop's selector (``_selector``; the map is public)."""
    selector = getattr(loop, '_selector', None)
    get_map = getattr(selector, 'get_map', None)
    if not callable(get_map):
        return None
    try:
        # A closed selector's map is None.
        return len(get_map())
    except TypeError:
        return None


def _ready_callback_count(loop: asyncio.AbstractEventLoop) -> int | None:
    """Callbacks ready to run (``_ready``: the deque ``call_soon`` appends to)."""
    ready = getattr(loop, '_ready', None)
    if not isinstance(ready, collections.deque):
        return None
    # Only len(): call_soon_threadsafe() may append from another thread, and iterating a
    # deque that grows meanwhile raises.
    return len(ready)


def _timer_count(loop: asyncio.AbstractEventLoop) -> int | None:
    """Timers scheduled and not cancelled (``_scheduled``: the heap ``call_at`` pushes to)."""
    scheduled = getattr(loop, '_scheduled', None)
    if not isinstance(scheduled, list):
        return None
    # asyncio drops cancelled timers from the heap lazily; they will never run, so they are
    # not counted.
    return len([handle for handle in scheduled
                if isinstance(handle, asyncio.TimerHandle) and not handle.cancelled()])


def loop_readings(ioloop: IOLoop | asyncio.AbstractEventLoop) -> dict[str, int]:
    """Count what is waiting on ``ioloop``'s asyncio loop now.

    :param ioloop: a Tornado :class:`~tornado.ioloop.IOLoop` (its ``asyncio_loop`` is read)
        or an asyncio event loop. Call this in the thread that runs it.
    :returns: ``{'handler': ..., 'callback': ..., 'timeout': ...}``: the file descriptors
        registered on the loop's selector (asyncio's own self-pipe included, so at least one),
        the callbacks ready to run, and the timers scheduled and not cancelled. A key is
        missing when the loop does not keep that count where asyncio's selector event loop
        does (uvloop, for one).
    :raises TypeError: if ``ioloop`` is neither kind of loop.

    >>> loop = asyncio.new_event_loop()
    >>> handle = loop.call_later(60, print)
    >>> loop_readings(loop)
    {'handler': 1, 'callback': 0, 'timeout': 1}
    >>> handle.cancel(); loop.close()
    """
    loop = _asyncio_loop(ioloop)
    counts = {
        'handler': _registered_fd_count(loop),
        'callback': _ready_callback_count(loop),
        'timeout': _timer_count(loop),
    }
    return {name: count for name, count in counts.items() if count is not None}


def memory_readings() -> dict[str, int]:
    """The calling process's memory use now.

    :returns: ``{'rss': ..., 'maxrss': ...}`` in kB: the resident set size (from psutil) and
        its peak over the life of the process (``ru_maxrss`` of :func:`resource.getrusage`,
        as Looppool 0.3 reported it), never less than ``rss``.
    """
    rss = psutil.Process().memory_info().rss // 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == 'darwin':
        # macOS counts ru_maxrss in bytes, Linux and the BSDs in kB.
        maxrss //= 1024
    # Linux updates the peak lazily, so it can trail the current size by a few pages.
    return {'rss': rss, 'maxrss': max(maxrss, rss)}


def _check_sleep_time(value: object) -> float:
    """``value`` as a reporting interval; raise if it is not a positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'sleep_time must be a number of seconds, got {value!r}')
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f'sleep_time must be a finite number of seconds greater than 0, '
                         f'got {value!r}')
    return float(value)


class CpuMeter:
    """The calling process's CPU use between one :meth:`read` and the next.

    It counts user and system time of all the process's threads
    (:func:`time.process_time`, exact to the nanosecond where psutil's readings are exact to
    a clock tick) against wall time (:func:`time.monotonic`). It lives in the process it was
    made in: a copy inherited by a forked child measures the child, from the moment it was
    last read or reset in the parent. Not thread-safe.

    >>> meter = CpuMeter()
    >>> 0.0 <= meter.read()
    True
    """

    def __init__(self) -> None:
        self._cpu = 0.0
        self._wall = 0.0
        self.reset()

    def reset(self) -> None:
        """Start the next interval now."""
        self._cpu = time.process_time()
        self._wall = time.monotonic()

    def read(self) -> float:
        """Return the CPU used since the last :meth:`read` or :meth:`reset` (or since the
        meter was made), in percent of one core, and start the next interval.

        100 means one core busy all the time; a process whose threads keep several cores busy
        reads above 100. An interval too short for the clocks to tell reads 0.
        """
        cpu, wall = time.process_time(), time.monotonic()
        used, elapsed = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        if elapsed <= 0:
            return 0.0
        return max(0.0, 100.0 * used / elapsed)


class ResourceReporter:
    """Send this process's CPU and memory use and its IO loop's backlog to statsd,
    periodically.

    ``ResourceReporter(ioloop, statsd, prefix)`` is called as in Looppool 0.3, and sends
    the gauges listed in :mod:`looppool.utility` every ``sleep_time`` seconds once
    :meth:`start` is called, until :meth:`stop`. A worker typically makes one in
    ``_initialise()``, starts it in ``start()`` and stops it in ``join()``::

        statsd = StatsClient('localhost', 8125, 'app')
        self._resource_reporter = ResourceReporter(
            self._ioloop, statsd, 'worker.{}'.format(self._number))

    Each report is one statsd pipeline, sent as one UDP packet as long as it fits the
    client's ``maxudpsize`` (512 bytes by default, room for about 50 characters of client
    and reporter prefix together); longer, the pipeline splits it over several packets.

    The reporter lives in the process that made it, on ``ioloop``: its reports are timers
    on that loop, and it measures that loop and this process. It is not thread-safe: call
    its methods in the thread that runs the loop (or, before the loop runs, in the thread
    that will run it). From another thread, go through ``IOLoop.add_callback``. It does not
    own ``statsd`` and does not close it.

    :param ioloop: a Tornado :class:`~tornado.ioloop.IOLoop` or an asyncio event loop.
    :param statsd: a ``statsd.StatsClient`` (anything with its ``pipeline()`` will do); the
        gauges' names get its own prefix too.
    :param prefix: the start of every gauge name: ``{prefix}.cpu`` and so on.
    :param sleep_time: seconds from the end of one report to the start of the next;
        ``None`` (the default) keeps the class's :attr:`sleep_time`, 10.
    :raises TypeError: if ``ioloop`` is not a loop, ``statsd`` has no ``pipeline()``,
        ``prefix`` is not a string or ``sleep_time`` not a number.
    :raises ValueError: if ``prefix`` is empty, starts or ends with a dot or holds a
        character the statsd format reserves (``:|@``, white space), or ``sleep_time`` is
        not a finite number greater than 0.

    As in Looppool 0.3 and 0.4, the interval can also be set after the reporter is made,
    ``reporter.sleep_time = 0.1``, or in a subclass, ``sleep_time = 1``.
    """

    # The default interval, read through the sleep_time property. Looppool 0.3 and 0.4 had
    # a plain class attribute sleep_time, which their users (and 0.4's own tests) set on an
    # instance after making it, or overrode in a subclass: the property takes the first,
    # and a subclass's plain attribute simply replaces it. Every read goes through
    # self.sleep_time, so either way the reporter uses what was set.
    _sleep_time = 10.0

    def __init__(self, ioloop: IOLoop | asyncio.AbstractEventLoop, statsd: _StatsClient,
                 prefix: str = 'process', *, sleep_time: float | None = None) -> None:
        self._loop = _asyncio_loop(ioloop)
        self._ioloop = ioloop   # the loop as given, under Looppool 0.4's name for it
        if not callable(getattr(statsd, 'pipeline', None)):
            raise TypeError(f'statsd must be a statsd.StatsClient (or have its pipeline() '
                            f'method), got {statsd!r}')
        if not isinstance(prefix, str):
            raise TypeError(f'prefix must be a str, got {prefix!r}')
        if not prefix or prefix.startswith('.') or prefix.endswith('.'):
            raise ValueError(f'prefix must be a non-empty dotted name that neither starts '
                             f'nor ends with a dot, got {prefix!r}')
        if _FORBIDDEN_IN_NAMES.intersection(prefix):
            raise ValueError(f'prefix must not contain white space or any of ":|@", which '
                             f'the statsd format reserves, got {prefix!r}')
        # A subclass's own sleep_time is checked here too, where the reporter is made.
        self.sleep_time = _check_sleep_time(self.sleep_time if sleep_time is None
                                            else sleep_time)
        self._statsd = statsd
        self._prefix = prefix
        self._cpu = CpuMeter()
        # The pending report's timer and the loop time it is due at; None when stopped.
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def prefix(self) -> str:
        """The start of every gauge name."""
        return self._prefix

    @property
    def sleep_time(self) -> float:
        """Seconds from the end of one report to the start of the next (10 by default).

        Assigning it checks the value (:class:`TypeError` or :class:`ValueError`, as the
        constructor's argument) and takes effect from the next report scheduled: at once
        before :meth:`start`, after the pending report on a running reporter.
        """
        return self._sleep_time

    @sleep_time.setter
    def sleep_time(self, value: float) -> None:
        self._sleep_time = _check_sleep_time(value)

    def is_running(self) -> bool:
        """Return ``True`` between :meth:`start` and :meth:`stop`."""
        return self._timer is not None

    def start(self) -> None:
        """Report every :attr:`sleep_time` seconds, the first time :attr:`sleep_time`
        seconds from now.

        The first report's ``cpu`` covers the time from this call. A reporter that was
        stopped may be started again.

        :raises RuntimeError: if it is already started, or the loop is closed.
        :raises TypeError, ValueError: if :attr:`sleep_time` was set, on the class, to
            something other than a positive number of seconds.
        """
        if self._timer is not None:
            raise RuntimeError(f'the ResourceReporter for {self._prefix!r} is already '
                               f'started')
        _check_sleep_time(self.sleep_time)   # set on the class since, perhaps
        self._cpu.reset()
        self._schedule()

    def stop(self) -> None:
        """Send no more reports. Calling it again, or before :meth:`start`, does nothing."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def report(self) -> dict[str, float]:
        """Take the readings and send them now, as one pipeline.

        Periodic reports call this too, and add ``ioloop.lag``, which only they can measure.
        The next ``cpu`` reading covers the time from this call.

        :returns: what was sent, by name without the prefixes, e.g. ``{'cpu': 2.5,
            'rss': 31420, ...}``; plain data, for logs or stats.
        """
        return self._send(lag=None)

    def _schedule(self) -> None:
        self._due = self._loop.time() + self.sleep_time
        self._timer = self._loop.call_at(self._due, self._run)

    def _run(self) -> None:
        # asyncio may run a timer up to one clock resolution early: that is no lag.
        lag = max(0.0, self._loop.time() - self._due) * 1000.0
        try:
            self._send(lag)
        except Exception:
            # One failed reading must not end the reports, nor reach the loop's handler.
            log.exception('ResourceReporter %r failed to report; the next report is due '
                          'in %g s', self._prefix, self.sleep_time)
        finally:
            self._schedule()

    def _send(self, lag: float | None) -> dict[str, float]:
        readings: dict[str, float] = {'cpu': round(self._cpu.read(), 2)}
        readings.update(memory_readings())
        for name, count in loop_readings(self._loop).items():
            readings[f'ioloop.{name}'] = count
        if lag is not None:
            readings['ioloop.lag'] = round(lag, 3)
        pipeline = self._statsd.pipeline()
        for name, value in readings.items():
            pipeline.gauge(f'{self._prefix}.{name}', value)
        pipeline.send()
        return readings
