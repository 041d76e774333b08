"""The pool's own metrics: sent to statsd once per reporting interval, or read by
Prometheus at scrape time.

The pool counts in plain integers as it works (they are what :meth:`Pool.stats` returns);
this module turns them into statsd metrics every ``statsd_interval`` seconds, one pipeline
per report, so the per-message cost is a counter increment and, for durations, a reservoir
sample -- never a packet per message. :class:`PrometheusCollector` reads the same numbers
when Prometheus scrapes, and keeps no timer of its own.

Metric names (under ``statsd_prefix``, default ``looppool``, itself under the client's own
prefix):

============================== ======= ===================================================
name                           type    meaning
============================== ======= ===================================================
``tasks.submitted``            counter messages accepted (submit, put, put_nowait,
                                       broadcast counts one per worker)
``tasks.completed``            counter replies received
``tasks.failed``               counter tasks whose handler raised
``tasks.lost``                 counter tasks failed with ``WorkerLost``
``tasks.cancelled``            counter tasks cancelled by their caller
``tasks.timed_out``            counter tasks that hit their ``timeout=``
``tasks.duration``             timer   ms from ``submit()`` to the reply (sampled: at
                                       most ``SAMPLES`` per report)
``tasks.wait``                 timer   ms a message waited in the pool for room
``tasks.in_flight``            gauge   tasks sent and not done, all workers
``tasks.waiting``              gauge   messages waiting in the pool for room
``worker.N.in_flight``         gauge   tasks sent to worker N and not done
``workers.restarts``           counter workers replaced after dying
``workers.recycles``           counter workers replaced on purpose (max_tasks_per_worker,
                                       max_memory_per_worker)
``batches.handed``             counter batches handed to ``handle_batch`` (a batch worker's
                                       pool only, as the three below)
``batches.messages``           counter messages in those batches
``batches.mean_size``          gauge   messages per batch, over the batches of the interval
``batches.max_size``           gauge   the largest batch of the interval
============================== ======= ===================================================

:class:`PoolMetrics` lives in the parent process, on the pool's loop, and is not
thread-safe. :class:`PrometheusCollector` may be scraped from any thread: it reads the
pool on the pool's loop (the manual's Prometheus page lists its metrics).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import random
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ['PoolMetrics', 'PrometheusCollector', 'COUNTERS', 'SAMPLES', 'DURATION_BUCKETS',
           'BATCH_BUCKETS']

log = logging.getLogger('looppool')

COUNTERS = {
    'submitted': 'tasks.submitted',
    'completed': 'tasks.completed',
    'failed': 'tasks.failed',
    'lost': 'tasks.lost',
    'cancelled': 'tasks.cancelled',
    'timed_out': 'tasks.timed_out',
    'restarts': 'workers.restarts',
    'recycles': 'workers.recycles',
}
"""The ``stats()`` counters the pool reports, and the statsd name of each (after the
prefix): sent as counters, the increase since the last report."""

SAMPLES = 200
"""The most task durations (and waits) kept for one report; past it, a random sample."""


class _Reservoir:
    """A uniform sample of at most ``size`` values out of however many were offered."""

    __slots__ = ('size', 'seen', 'values')

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self.values: list[float] = []

    def offer(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            index = random.randrange(self.seen)
            if index < self.size:
                self.values[index] = value

    def take(self) -> list[float]:
        values, self.values, self.seen = self.values, [], 0
        return values


class PoolMetrics:
    """Reports a pool's numbers to a ``statsd.StatsClient`` every ``interval`` seconds."""

    def __init__(self, client: Any, prefix: str, interval: float,
                 loop: asyncio.AbstractEventLoop, stats: Callable[[], dict[str, Any]]) -> None:
        self.client = client
        self.prefix = prefix.rstrip('.') + '.' if prefix else ''
        self.interval = interval
        self.loop = loop
        self.stats = stats
        self.durations = _Reservoir(SAMPLES)
        self.waits = _Reservoir(SAMPLES)
        self.reported: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.batch_sizes: dict[int, int] = {}   # stats()['batches']['sizes'] last reported
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Report every ``interval`` seconds from now on."""
        self.timer = self.loop.call_later(self.interval, self.tick)

    def stop(self) -> None:
        """Cancel the timer and send what was counted since the last report."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.report()

    def tick(self) -> None:
        """One interval passed: schedule the next, and report."""
        self.timer = self.loop.call_later(self.interval, self.tick)
        self.report()

    def report(self) -> None:
        """Send one report: the counters' increase since the last, the gauges, and the
        durations sampled meanwhile."""
        try:
            stats = self.stats()
            pipe = self.client.pipeline()
            prefix = self.prefix
            for key, name in COUNTERS.items():
                delta = stats[key] - self.reported[key]
                if delta:
                    pipe.incr(prefix + name, delta)
                    self.reported[key] = stats[key]
            pipe.gauge(prefix + 'tasks.in_flight', stats['in_flight'])
            pipe.gauge(prefix + 'tasks.waiting', stats['waiting'])
            for worker in stats['workers']:
                pipe.gauge(f'{prefix}worker.{worker["number"]}.in_flight', worker['in_flight'])
            if 'batches' in stats:
                self.report_batches(pipe, stats['batches']['sizes'])
            for seconds in self.durations.take():
                pipe.timing(prefix + 'tasks.duration', seconds * 1000.0)
            for seconds in self.waits.take():
                pipe.timing(prefix + 'tasks.wait', seconds * 1000.0)
            pipe.send()
        except Exception:  # a metrics failure must never disturb the pool
            log.exception('sending the pool\'s metrics to statsd failed')

    def report_batches(self, pipe: Any, sizes: dict[int, int]) -> None:
        """The batches handed over since the last report: how many, and their sizes."""
        new = {size: count - self.batch_sizes.get(size, 0) for size, count in sizes.items()}
        new = {size: count for size, count in new.items() if count > 0}
        self.batch_sizes = dict(sizes)
        if not new:
            return
        batches = sum(new.values())
        messages = sum(size * count for size, count in new.items())
        pipe.incr(self.prefix + 'batches.handed', batches)
        pipe.incr(self.prefix + 'batches.messages', messages)
        pipe.gauge(self.prefix + 'batches.mean_size', round(messages / batches, 3))
        pipe.gauge(self.prefix + 'batches.max_size', max(new))


# -- Prometheus ------------------------------------------------------------------------------

#: The task-duration histogram's bucket bounds (seconds), unless ``buckets=`` says otherwise:
#: from half a millisecond, a task that only crosses the pipe, to a minute.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0)

_EXTRA = 'pip install "looppool[prometheus]"'

# What a scrape shows, in this order: (name, type, labels, help). A counter's name has no
# ``_total``: prometheus_client adds it to the sample.
_FAMILIES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ('looppool_up', 'gauge', (),
     "1 if the pool's numbers were read for this scrape, 0 if they could not be"),
    ('looppool_tasks_submitted', 'counter', (),
     'Messages the pool accepted (submit, put, put_nowait; broadcast: one per worker)'),
    ('looppool_tasks_completed', 'counter', (), 'Replies received'),
    ('looppool_tasks_failed', 'counter', (), 'Tasks that ended in an exception'),
    ('looppool_tasks_lost', 'counter', (), 'Tasks failed with WorkerLost'),
    ('looppool_tasks_timed_out', 'counter', (), 'Tasks whose timeout passed'),
    ('looppool_tasks_cancelled', 'counter', (), 'Tasks cancelled by their caller'),
    ('looppool_tasks_in_flight', 'gauge', (), 'Tasks sent to the workers and not yet done'),
    ('looppool_tasks_waiting', 'gauge', (), 'Messages waiting in the pool for room'),
    ('looppool_worker_restarts', 'counter', (), 'Workers that died unasked or failed to start'),
    ('looppool_worker_recycles', 'counter', (),
     'Workers replaced on purpose (max_tasks_per_worker, max_memory_per_worker)'),
    ('looppool_host_clients', 'gauge', (), "Client connections to the pool host"),
    ('looppool_worker_in_flight', 'gauge', ('worker',),
     'Tasks sent to this worker and not yet done'),
    ('looppool_worker_loop_lag_seconds', 'gauge', ('worker',),
     'Seconds since a blocked worker was last heard from; 0 while it answers'),
    ('looppool_worker_rss_bytes', 'gauge', ('worker',),
     "Resident memory of the worker's process"),
    ('looppool_worker_cpu_seconds', 'counter', ('worker',),
     "CPU time (user and system) of the worker's process"),
    ('looppool_task_duration_seconds', 'histogram', (),
     'Seconds from submit() to its reply, for the replies received'),
    ('looppool_batch_size', 'histogram', (),
     'Messages per batch handed to handle_batch (a batch worker only)'),
)

#: The batch-size histogram's bucket bounds (messages).
BATCH_BUCKETS: tuple[int, ...] = tuple(2 ** power for power in range(13))

# stats() key -> the counter that shows it.
_COUNTED = (
    ('submitted', 'looppool_tasks_submitted'),
    ('completed', 'looppool_tasks_completed'),
    ('failed', 'looppool_tasks_failed'),
    ('lost', 'looppool_tasks_lost'),
    ('timed_out', 'looppool_tasks_timed_out'),
    ('cancelled', 'looppool_tasks_cancelled'),
    ('restarts', 'looppool_worker_restarts'),
    ('recycles', 'looppool_worker_recycles'),
)

_POOL, _ASYNC_CLIENT, _SYNC_CLIENT, _CALLABLE = 'pool', 'async client', 'sync client', 'callable'


def _prometheus_core() -> Any:
    """prometheus_client's metric families, imported when a collector is made: the package
    is an optional extra."""
    try:
        from prometheus_client import metrics_core
    except ImportError as exc:
        raise ImportError(f'looppool.metrics.PrometheusCollector needs prometheus_client, '
                          f'which is not installed: {_EXTRA}',
                          name='prometheus_client') from exc
    return metrics_core


class _Histogram:
    """Task durations counted into buckets as the replies arrive.

    Fed by the pool's receiver through ``pool._metrics.durations.offer(seconds)`` and read
    by the collector, both on the pool's loop; not thread-safe.
    """

    __slots__ = ('bounds', 'counts', 'sum', 'since', 'clock', 'chained')

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one: above every bound
        self.sum = 0.0
        # The loop time the collector began to watch a pool that ran untimed: the tasks
        # submitted before it carry no start time, and are not counted.
        self.since: float | None = None
        self.clock: Callable[[], float] = lambda: 0.0
        self.chained: Any = None   # what the pool fed before (statsd's sample): fed too

    def offer(self, seconds: float) -> None:
        chained = self.chained
        if chained is not None:
            chained.offer(seconds)
        since = self.since
        if since is not None and seconds > self.clock() - since:
            return
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> tuple[list[int], float]:
        return list(self.counts), self.sum


class _Ignored:
    """Takes wait times when nothing else does: the collector shows no wait histogram."""

    __slots__ = ()

    def offer(self, seconds: float) -> None:
        pass


class _Timings:
    """What a collector puts in ``pool._metrics``, the one place the pool's receiver and
    dispatcher offer task durations (``durations.offer``) and waits (``waits.offer``), and
    call ``stop()`` when the pool stops. Whatever was there before (a statsd
    :class:`PoolMetrics`, another collector's) goes on being fed and stopped."""

    __slots__ = ('durations', 'waits', 'inner')

    def __init__(self, durations: _Histogram, inner: Any) -> None:
        self.durations = durations
        self.waits = inner.waits if inner is not None else _Ignored()
        self.inner = inner

    def stop(self) -> None:
        if self.inner is not None:
            self.inner.stop()


def _time_tasks(pool: Any, histogram: _Histogram) -> None:
    """Make ``pool`` feed ``histogram``, unless it does already (on the pool's loop).

    Called again at every scrape: ``Pool.start()`` puts a statsd :class:`PoolMetrics` in
    ``pool._metrics`` in place of what a collector made before it put there."""
    current = pool._metrics
    link = current
    while isinstance(link, _Timings):
        if link.durations is histogram:
            return
        link = link.inner
    if current is None and pool._loop is not None:
        # The pool ran untimed: the tasks in flight now have no start time.
        histogram.clock = pool._loop.time
        histogram.since = pool._loop.time()
    histogram.chained = current.durations if current is not None else None
    # pool.py annotates _metrics as PoolMetrics; it reads durations, waits and stop() only.
    pool._metrics = _Timings(histogram, current)
    # The shortest path of submit() takes no start time (it is taken only while
    # pool._metrics is set, which Pool.start() reads once).
    pool._dispatcher._plain = False


def _add_batches(family: Any, batches: dict[str, Any]) -> None:
    """The batch-size histogram, from ``stats()['batches']``."""
    sizes: dict[int, int] = batches['sizes']
    buckets: list[tuple[str, float]] = []
    for bound in BATCH_BUCKETS:
        buckets.append((repr(float(bound)),
                        sum(count for size, count in sizes.items() if size <= bound)))
    buckets.append(('+Inf', sum(sizes.values())))
    family.add_metric([], buckets, batches['messages'])


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _on_loop(loop: asyncio.AbstractEventLoop | None, function: Callable[[], Any],
             timeout: float) -> Any:
    """``function()`` on ``loop``: right here on the loop's own thread (or when no thread
    runs it), else handed to the loop's thread, waiting at most ``timeout`` seconds."""
    if loop is None or _running_loop() is loop or not loop.is_running():
        return function()
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"the pool's loop did not run the read within {timeout} s: it is "
                           'blocked, or busy with something long') from None


def _source_kind(source: Any) -> str:
    from .pool import Pool
    from .remote.client import Client
    from .remote.sync import SyncClient
    if isinstance(source, Pool):
        return _POOL
    if isinstance(source, Client):
        return _ASYNC_CLIENT
    if isinstance(source, SyncClient):
        return _SYNC_CLIENT
    if callable(source):
        return _CALLABLE
    raise TypeError('pool must be a looppool.Pool, a pool host client '
                    '(looppool.remote.connect() or connect_sync()) or a callable that '
                    f'returns a dict shaped like Pool.stats(), got {source!r}')


def _same_machine(source: Any) -> bool:
    """Whether the worker pids ``source`` reports are processes of this machine."""
    from .remote.access import _is_loopback
    address = getattr(source, 'address', None)
    if isinstance(address, tuple):
        return _is_loopback(address[0])
    return True   # a Pool, a Unix socket, a callable: assumed local


class PrometheusCollector:
    """A custom collector for ``prometheus_client``: the pool's numbers, read when Prometheus
    scrapes (it keeps no timer of its own).

    :param pool: what to read: a :class:`~looppool.Pool`; a pool host's client, from
        :func:`looppool.remote.connect` or :func:`~looppool.remote.connect_sync` (the
        host's ``stats()`` feed it); or a callable returning a dict shaped like
        :meth:`Pool.stats() <looppool.Pool.stats>`.
    :param processes: whether to read each worker's resident memory and CPU time from its
        process (with psutil, by the pid ``stats()`` gives). ``None`` (default): yes when
        the workers run on this machine -- a pool, a host on a Unix socket or a loopback
        address, a callable -- and no for a host reached at another address.
    :param buckets: the bounds, in seconds, of the task-duration histogram's buckets
        (default :data:`DURATION_BUCKETS`).
    :param timeout: seconds a scrape from another thread waits for the pool's loop, and
        that an asynchronous client waits for its host, before the scrape reports
        ``looppool_up 0`` (default 5).

    Register it once and serve the registry, for instance from a Tornado handler::

        registry = prometheus_client.CollectorRegistry()
        collector = PrometheusCollector(pool)
        registry.register(collector)

        class Metrics(tornado.web.RequestHandler):
            async def get(self):
                await collector.refresh()   # needed for an asynchronous client only
                self.set_header('Content-Type', prometheus_client.CONTENT_TYPE_LATEST)
                self.write(prometheus_client.generate_latest(registry))

    ``collect()`` may be called on the pool's loop (a handler like the one above) or from
    any other thread (``prometheus_client.start_http_server``): from another thread it
    hands the read to the pool's loop and waits for it. A blocking client, or a callable,
    is read where ``collect()`` runs. An asynchronous client cannot be awaited inside
    ``collect()``, so on its own loop a scrape shows what the last ``await
    collector.refresh()`` read (a scrape there before any refresh raises
    :class:`RuntimeError`); from another thread, the collector reads the client on its
    loop, as for a pool. ``refresh()`` does nothing for the other sources.

    The task-duration histogram needs the pool to time its tasks, which it does only with
    ``statsd=`` set: a collector of a :class:`~looppool.Pool` makes it time them from now
    on (the tasks in flight before are not counted), at the cost statsd has, and a statsd
    client given to the pool gets its samples as before. With ``statsd=``, make the
    collector once the pool has started: ``start()`` puts the statsd reporter in place of
    what a collector made before it had set up, and the collector sets itself up again at
    its first scrape, missing the durations until then. Through a pool host there is no
    histogram: the host does not time its clients' tasks.

    Reading fails when a host cannot be reached, or when the pool's loop stays blocked for
    ``timeout``: the scrape then shows ``looppool_up 0`` and nothing else of this collector,
    and the failure is logged once (``looppool`` logger) until a read works again.

    Raises :class:`ImportError` naming the extra to install when ``prometheus_client`` is
    missing.
    """

    def __init__(self, pool: Any, *, processes: bool | None = None,
                 buckets: Any = DURATION_BUCKETS, timeout: float = 5.0) -> None:
        self._core = _prometheus_core()
        self._kind = _source_kind(pool)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or not timeout > 0:
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        try:
            bounds = tuple(sorted({float(bound) for bound in buckets}))
        except (TypeError, ValueError):
            raise ValueError(f'buckets must be numbers of seconds, got {buckets!r}') from None
        if not bounds or not all(0 < bound < float('inf') for bound in bounds):
            raise ValueError(f'buckets must be positive, finite numbers of seconds, '
                             f'got {buckets!r}')
        self._source = pool
        # A blocking source: a SyncClient's stats(), or the callable itself.
        self._read_blocking: Callable[[], dict[str, Any]] = (
            pool.stats if self._kind == _SYNC_CLIENT else pool)
        self._timeout = float(timeout)
        self._processes = _same_machine(pool) if processes is None else bool(processes)
        self._histogram = _Histogram(bounds) if self._kind == _POOL else None
        # refresh()'s read of an asynchronous client: (stats, None) or (None, the error).
        self._kept: tuple[dict[str, Any] | None, Exception | None] | None = None
        # Scrapes may come from several threads at once (a threading HTTP server).
        self._lock = threading.Lock()
        self._process_cache: dict[int, psutil.Process] = {}
        self._failing = False
        if self._histogram is not None:
            histogram = self._histogram
            _on_loop(pool._loop, lambda: _time_tasks(pool, histogram), self._timeout)

    def describe(self) -> list[Metric]:
        """The metric families this collector shows, without samples (a registry reads
        their names when the collector is registered)."""
        return list(self._families().values())

    def collect(self) -> list[Metric]:
        """Read the pool now; the metric families with their samples."""
        stats, histogram = self._read()
        families = self._families()
        families['looppool_up'].add_metric([], 0 if stats is None else 1)
        if stats is not None:
            for key, name in _COUNTED:
                if key in stats:
                    families[name].add_metric([], stats[key])
            families['looppool_tasks_in_flight'].add_metric([], stats['in_flight'])
            families['looppool_tasks_waiting'].add_metric([], stats['waiting'])
            if 'clients' in stats:
                families['looppool_host_clients'].add_metric([], stats['clients'])
            self._add_workers(families, stats['workers'])
            if 'batches' in stats:
                _add_batches(families['looppool_batch_size'], stats['batches'])
        if histogram is not None and self._histogram is not None:
            counts, total = histogram
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for bound, count in zip(self._histogram.bounds, counts):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(('+Inf', cumulative + counts[-1]))
            families['looppool_task_duration_seconds'].add_metric([], buckets, total)
        return [family for family in families.values() if family.samples]

    async def refresh(self) -> None:
        """Read an asynchronous client's host now, for the scrapes on this loop that come
        next (see above). Does nothing for the other sources: they are read at scrape time.
        A read that fails, or takes over ``timeout`` seconds, shows as ``looppool_up 0``."""
        if self._kind != _ASYNC_CLIENT:
            return
        try:
            stats = await asyncio.wait_for(self._source.stats(), self._timeout)
        except Exception as exc:   # the host is down, or slow: the scrape says so
            self._kept = (None, exc)
        else:
            self._kept = (stats, None)

    # -- reading ---------------------------------------------------------------------------

    def _families(self) -> dict[str, Any]:
        core = self._core
        makers = {'counter': core.CounterMetricFamily, 'gauge': core.GaugeMetricFamily,
                  'histogram': core.HistogramMetricFamily}
        return {name: makers[kind](name, text, labels=labels)
                for name, kind, labels, text in _FAMILIES
                if name != 'looppool_task_duration_seconds' or self._histogram is not None}

    def _read(self) -> tuple[dict[str, Any] | None, tuple[list[int], float] | None]:
        """The stats (and the histogram's counts), or ``(None, None)`` if they cannot be
        read now; an asynchronous client on its own loop gives what refresh() kept."""
        source = self._source
        if self._kind == _ASYNC_CLIENT and self._on_client_loop():
            if self._kept is None:
                raise RuntimeError(
                    "a scrape on an asynchronous client's loop shows what "
                    '`await collector.refresh()` read, and it was never called: await it '
                    'before generate_latest() (or scrape from another thread)')
            stats, error = self._kept
            self._note(error)
            return stats, None
        try:
            if self._kind == _POOL:
                read: tuple[dict[str, Any], tuple[list[int], float] | None] = _on_loop(
                    source._loop, self._read_pool, self._timeout)
            elif self._kind == _ASYNC_CLIENT:
                read = self._read_client_elsewhere(), None
            else:
                read = self._read_blocking(), None
        except Exception as exc:   # a metrics failure must not fail the scrape, nor the pool
            self._note(exc)
            return None, None
        self._note(None)
        return read

    def _read_pool(self) -> tuple[dict[str, Any], tuple[list[int], float] | None]:
        assert self._histogram is not None
        _time_tasks(self._source, self._histogram)
        return self._source.stats(), self._histogram.snapshot()

    def _on_client_loop(self) -> bool:
        running = _running_loop()
        return running is not None and self._source._loop in (None, running)

    def _read_client_elsewhere(self) -> dict[str, Any]:
        """An asynchronous client's stats, read on its loop from this other thread."""
        loop = self._source._loop
        if loop is None or not loop.is_running():
            raise RuntimeError('the client is not in use on a running loop')
        reading = self._source.stats()
        try:
            future = asyncio.run_coroutine_threadsafe(reading, loop)
        except BaseException:
            reading.close()
            raise
        try:
            stats: dict[str, Any] = future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f'the pool host did not answer within {self._timeout} s') \
                from None
        return stats

    def _note(self, error: Exception | None) -> None:
        """Log the first failed read, and the first read that works again."""
        if error is None:
            if self._failing:
                self._failing = False
                log.info("the pool's numbers can be read again (looppool_up 1)")
        elif not self._failing:
            self._failing = True
            log.warning("reading the pool's numbers for Prometheus failed, and "
                        'looppool_up is 0 until it works again: %s: %s',
                        type(error).__name__, error)

    def _add_workers(self, families: dict[str, Any], workers: list[dict[str, Any]]) -> None:
        readings = self._read_processes(workers) if self._processes else {}
        for worker in workers:
            label = [str(worker['number'])]
            families['looppool_worker_in_flight'].add_metric(label, worker['in_flight'])
            families['looppool_worker_loop_lag_seconds'].add_metric(
                label, worker.get('lag', 0.0))
            reading = readings.get(worker['number'])
            if reading is not None:
                families['looppool_worker_rss_bytes'].add_metric(label, reading[0])
                families['looppool_worker_cpu_seconds'].add_metric(label, reading[1])

    def _read_processes(self, workers: list[dict[str, Any]]) -> dict[int, tuple[int, float]]:
        """Each live worker's RSS and CPU seconds, by worker number. The psutil handles are
        kept from one scrape to the next, for the pids still in use."""
        readings: dict[int, tuple[int, float]] = {}
        with self._lock:
            cache, self._process_cache = self._process_cache, {}
            for worker in workers:
                pid = worker.get('pid')
                if pid is None or not worker.get('alive', True):
                    continue
                process = cache.get(pid)
                try:
                    if process is None or not process.is_running():   # not a reused pid
                        process = psutil.Process(pid)
                    with process.oneshot():
                        rss = process.memory_info().rss
                        times = process.cpu_times()
                except psutil.Error:   # it exited since stats() was read
                    continue
                self._process_cache[pid] = process
                readings[worker['number']] = (rss, times.user + times.system)
        return readings
