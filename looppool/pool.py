"""The :class:`Pool`: dispatch, bounds, the in-flight table and supervision.

The path of a message::

    caller on the parent's loop
      | submit() / put() / put_nowait() / broadcast()
      v
    Pool        picks a worker (round-robin, or worker_num), keeps each worker's share of
      |         max_tasks, queues what does not fit (pending), and records every submit()
      |         in the worker's in-flight table (task id -> future)
      v
    Channel     one socketpair per worker; frames coalesced per loop iteration
      v
    worker process: its own loop runs Worker.handle / Worker._process_message
      |
      ^ REPLY / ERROR resolve the future; FREED frees slots, which pulls the next
      | pending messages; RESULT goes to process_message(result, result_done), whose
      | result_done() returns credit to the worker.

Who owns what (all in the parent, on its loop thread; nothing here is thread-safe):

- ``Pool``: the worker slots, the shared pending queue, the sticky broadcasts, counters,
  and the state (new, running, stopping, stopped).
- ``_Slot``: one per worker number, stable across replacements: the messages waiting for
  that worker (``worker_num``), restart and start-failure counts.
- ``_Link``: one per worker *process*: the process, its channel, its in-flight table and
  the number of slots it uses. A replacement gets a new link, so nothing meant for a dead
  process reaches the new one.

Supervision needs no polling: each process's sentinel is registered with the loop as a
reader and becomes readable the moment the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import functools
import inspect
import itertools
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.util  # noqa: F401 - imported first so its exit hook runs after ours
import operator
import os
import pickle
import queue
import selectors
import signal
import sys
import types
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, Callable, Deque, TypeVar, Union

import tornado.ioloop

from . import eager, protocol
from .channel import Channel, check_size, socketpair
from .errors import PoolClosed, RemoteTraceback, WorkerLost, WorkerStartError
from .metrics import PoolMetrics
from .protocol import dumps, loads
from .child import worker_main
from .worker import Worker, worker_arguments

__all__ = ['Pool']

log = logging.getLogger('looppool')

NEW, RUNNING, STOPPING, STOPPED = 'new', 'running', 'stopping', 'stopped'

# A batch is cut at this many tasks, so one frame stays a bounded amount of work.
_MAX_BATCH = 256
# Freed slots that are refilled before the end of a read that holds many frames.
_EARLY_REFILL = 256
# A burst of submit() calls is handed to the workers every this many calls per worker (at
# most four workers' worth): often enough that they start while the caller goes on, and, past
# their shares, that replies are read inside the burst (see Pool._catch_up).
_OUTBOX_PER_WORKER = _MAX_BATCH
# A worker that dies within this many seconds of starting, twice running, backs off.
_QUICK_DEATH = 1.0
# How often the pool looks for workers that hold work and have said nothing since the last
# look: those are blocked (a handler holds their loop) and get no new work while another
# worker has room; what they hold and have not started is recalled for the others.
_LAG_CHECK = 0.015
# The messages a worker may hold unstarted (sent and not acknowledged, or held in its
# inbox): the window starts here, doubles while the worker keeps up and the backlog waits,
# halves when the worker is found blocked, never past its share of max_tasks.
_FIRST_WINDOW = 4
_MIN_WINDOW = 2
# map() without a chunksize: its first chunks hold this many messages, the later ones
# about this many seconds of a worker's time, at the pace seen so far.
_FIRST_CHUNK = 4
_CHUNK_SECONDS = 0.005

_OPTIONS = {
    'stop_timeout': 30.0,
    'cancel_grace': 5.0,
    'kill_grace': 1.0,
    'title': True,
    'mp_context': None,
    'max_tasks_per_worker': None,
    'max_memory_per_worker': None,
    'memory_check_interval': 1.0,
    'forward_logs': True,
    'statsd_prefix': 'looppool',
    'statsd_interval': 10.0,
    'worker_args': (),
    'worker_kwargs': None,
}

# Parent-side channel descriptors of every live worker of every pool in this process. A
# forked worker closes them all: a copy held by a sibling would hide its parent's death.
_parent_fds: set[int] = set()
# Pools with running workers, held until stopped so that interpreter exit can end them.
_live_pools: set[Pool] = set()
# A process forked from this one (a web server's worker) does not own our pools: at its exit
# it must not end them. (_parent_fds stays: its copies are still worth closing in workers.)
os.register_at_fork(after_in_child=_live_pools.clear)

# (kind, task id or origin, payload, future or None); for a remote client's note the last
# is a stand-in whose set_result() acknowledges it (see remote._Ack).
Item = tuple[int, int, Any, Any]


class _TaskFuture(asyncio.Future[Any]):
    """The future of one ``submit()``: cancelling it cancels the task in the worker."""

    # What every task sets lives in slots; what few set (a timeout, a host's sink, the time
    # for statsd) defaults on the class and goes in the instance's dict when set: three
    # stores fewer on the path every message takes. Which worker holds it is not kept here
    # either: the rare caller that needs it looks it up (Pool._link_of), so a burst is
    # handed to the workers in bulk, without a store per message. The pool is an attribute
    # of a subclass each pool makes (Pool._task_future), not of each future: a store fewer
    # again, and a slot fewer for the cyclic GC to visit in every future of a burst.
    __slots__ = ('_lp_tid', '_lp_message')
    _lp_message: Any    # the message itself, kept to batch it and, rarely, to resend it
    _lp_tid: int
    _lp_pool: Pool | None = None
    _lp_timer: asyncio.TimerHandle | None = None
    _lp_started: float = 0.0
    _lp_sink: Callable[[bool, Any], None] | None = None
    _lp_target: int | None = None   # worker_num, for a task given back unstarted

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        pool = self._lp_pool
        if pool is not None:
            pool._abandon(self)
        return True


class _RawFuture(_TaskFuture):
    """A task sent for a pool host's client: the reply's bytes go to ``_lp_sink(is_error,
    payload)`` unpickled, and an error the pool raises itself (WorkerLost, TimeoutError,
    PoolClosed) is pickled there too. Nobody awaits it."""

    __slots__ = ()

    def set_exception(self, exception: Any) -> None:
        super().set_exception(exception)
        self.exception()  # reported through the sink, so never "unretrieved"
        assert self._lp_sink is not None
        self._lp_sink(True, dumps((exception, '')))


_AnyTaskFuture = TypeVar('_AnyTaskFuture', bound=_TaskFuture)
_message_of = operator.attrgetter('_lp_message')
_tid_of = operator.attrgetter('_lp_tid')

# What waits in a queue for room in a worker: a submit()'s own future (its message is
# pickled with the batch of its loop iteration), or an Item (a pickled note or task).
Entry = Union[_TaskFuture, Item]


class _ChunkFuture(_TaskFuture):
    """One chunk of ``map()`` in a worker: resolves to ``(replies, errors)``."""

    __slots__ = ('_lp_count', '_lp_after')
    _lp_count: int      # messages in the chunk
    _lp_after: dict[int, BaseException] | None   # a message after them failed to pickle


class _StopFuture(asyncio.Future[None]):
    """What ``stop()`` returns. It notes whether anyone awaits it or waits on it."""

    __slots__ = ('_lp_awaited',)
    _lp_awaited: bool

    def __await__(self):  # type: ignore[no-untyped-def]
        self._lp_awaited = True
        return super().__await__()

    __iter__ = __await__

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        self._lp_awaited = True
        super().add_done_callback(fn, context=context)


class _Link:
    """The parent's side of one worker process."""

    __slots__ = ('number', 'process', 'pid', 'sentinel', 'channel', 'inflight', 'used',
                 'acks', 'ready', 'start_error', 'stop_sent', 'exited', 'kill_reason',
                 'started_at', 'sent', 'retiring', 'batch', 'baseline_rss', 'terminated',
                 'batch_gave_up', 'unread', 'held', 'window', 'reads', 'reads_seen',
                 'was_queued', 'blocked', 'recalling', 'heard_at', 'overran', '__weakref__')

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: multiprocessing.process.BaseProcess | None = None
        self.pid = 0
        self.sentinel = -1
        self.channel: Channel | None = None
        self.inflight: dict[int, _TaskFuture] = {}
        self.used = 0
        self.acks = 0
        self.ready = False
        self.start_error: tuple[str, str] | None = None   # (what raised, traceback text)
        self.stop_sent = False
        self.exited = False
        self.kill_reason: str | None = None
        self.started_at = 0.0
        self.batch: list[_TaskFuture] = []   # tasks to pickle together at the next flush
        self.batch_gave_up = False   # one of them was cancelled or timed out: leave it out
        self.baseline_rss = 0     # its RSS when first measured (fork shares parent pages)
        self.terminated = False   # told to cancel everything (stop or recycle deadline)
        self.sent = 0           # tasks sent, for max_tasks_per_worker
        self.retiring = False   # being recycled: takes no new work, exits when drained
        # What it holds unstarted: messages sent and not yet started (an ACK counts those
        # that start), at most `window`; among them, the ids of the tasks it reported held
        # in its inbox (HELD), oldest first (a TAKEN count starts the oldest): those, if it
        # dies, never ran.
        self.unread = 0
        self.held: Deque[int] = collections.deque()
        self.window = _FIRST_WINDOW
        self.overran = False    # it held work since the window last grew
        self.reads = 0          # reads of its frames; the lag check compares them
        self.reads_seen = 0
        self.was_queued = False
        self.blocked = False    # held work and said nothing for a lag check or more
        self.recalling = False  # a RECALL is on its way, not yet answered
        self.heard_at = 0.0     # loop time of its last frames

    def result_done(self) -> None:
        """Acknowledge one result; the credit goes back to the worker with the next flush."""
        self.acks += 1
        if self.acks == 1 and self.channel is not None:
            self.channel.schedule_flush()

    def before_flush(self) -> None:
        if self.acks:
            acks, self.acks = self.acks, 0
            assert self.channel is not None
            self.channel.send(protocol.CREDIT, acks)


class _Slot:
    """One worker number: its current process and the messages waiting for it."""

    __slots__ = ('number', 'link', 'targeted', 'restarts', 'failures', 'start_error',
                 'restart_timer', 'retiring', 'recycles', 'quick_deaths', 'successor',
                 'successor_failures', 'next_recycle')

    def __init__(self, number: int) -> None:
        self.number = number
        self.link: _Link | None = None
        self.targeted: Deque[Entry] = collections.deque()
        self.restarts = 0
        self.failures = 0
        self.start_error: WorkerStartError | None = None
        self.restart_timer: asyncio.TimerHandle | None = None
        self.retiring: list[_Link] = []   # recycled processes finishing their last tasks
        self.recycles = 0
        self.quick_deaths = 0
        # A recycle starts the replacement first: it takes over once ready (see _take_over).
        self.successor: _Link | None = None
        self.successor_failures = 0   # replacements in a row that could not start
        self.next_recycle = 0.0       # loop time before which no recycle is tried again


class Pool:
    """A pool of worker processes, each running its own IO loop, fed from this loop.

    :param ioloop: the parent's :class:`tornado.ioloop.IOLoop` (or an asyncio loop);
        ``None`` means the loop current when :meth:`start` is called.
    :param pool_size: the number of worker processes; ``None`` means the number of CPUs
        this process may use.
    :param worker_class: a :class:`~looppool.Worker` subclass, instantiated once in every
        worker process, as ``worker_class(*worker_args, **worker_kwargs)``.
    :param worker_args: a tuple of positional arguments for ``worker_class`` (default
        none), and
    :param worker_kwargs: a dict of keyword arguments for it (default none). Both are
        checked against the class's signature and pickled here, once: every worker, and
        every replacement of one, is made with its own copy of them as they are now,
        under every start method. A :class:`TypeError` naming the parameter says if they
        do not fit the class or cannot be pickled.
    :param max_tasks: tasks sent and not yet done, across the pool; each worker takes at
        most its share (``max_tasks // pool_size``, at least 1) at once.
    :param max_results: results sent with ``_put_nowait`` and not yet acknowledged with
        ``result_done()``; each worker may have its share outstanding.
    :param statsd: a ``statsd.StatsClient`` to send the pool's metrics to (optional): task
        counters, durations, in-flight gauges, restarts (see :mod:`looppool.metrics`),
        every ``statsd_interval`` seconds (default 10) under ``statsd_prefix`` (default
        ``'looppool'``).
    :param mp_context: ``'fork'``, ``'forkserver'``, ``'spawn'`` or a
        :mod:`multiprocessing` context; ``None`` means the interpreter's default.
    :param stop_timeout: seconds :meth:`stop` waits for accepted tasks before it
        escalates (default 30).
    :param cancel_grace: seconds a cancelled or timed-out task may take to end in the
        worker before the worker is killed and replaced (default 5).
    :param max_tasks_per_worker: recycle a worker after it was sent this many tasks: a
        replacement starts first while the old process goes on serving; once it is ready
        it takes over, and the old process finishes what it has and exits.
    :param max_memory_per_worker: recycle a worker whose resident memory (RSS, bytes)
        exceeds this, checked every ``memory_check_interval`` seconds (default 1).
    :param forward_logs: ``True`` (default) sends every log record made in a worker to
        this process's handlers, with ``worker_number`` and ``worker_pid`` on the record.
    :param title: ``True`` titles each worker process ``looppool worker N | <parent title>``
        (``ps``, ``htop``); ``False`` leaves titles alone.

    The pool lives in the parent process, on one loop, and is not thread-safe: from another
    thread, reach it with ``IOLoop.add_callback``.

    Modern use::

        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            reply = await pool.submit('ping')
            replies = await pool.broadcast('reload')

    Looppool 0.3 use::

        pool = looppool.Pool(loop, 4, FetchWorker)
        pool.process_message = process_message
        pool.start()
        pool.put_nowait(url)
        pool.stop()
    """

    def __init__(self, ioloop: Any = None, pool_size: int | None = None,
                 worker_class: type[Worker] = Worker, max_tasks: int = 4096,
                 max_results: int = 4096, *, statsd: Any = None, **options: Any) -> None:
        if pool_size is None:
            pool_size = _usable_cpus()
        _check_int('pool_size', pool_size, 1)
        _check_int('max_tasks', max_tasks, 1)
        _check_int('max_results', max_results, 1)
        if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
            raise TypeError('worker_class must be a subclass of looppool.Worker, '
                            f'got {worker_class!r}')
        if ioloop is not None and not isinstance(
                ioloop, (tornado.ioloop.IOLoop, asyncio.AbstractEventLoop)):
            raise TypeError(f'ioloop must be a tornado IOLoop, an asyncio loop or None, '
                            f'got {ioloop!r}')
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f'Pool() got unexpected option(s): {", ".join(sorted(unknown))}')
        self._options = {**_OPTIONS, **options}
        for name in ('max_tasks_per_worker', 'max_memory_per_worker'):
            if self._options[name] is not None:
                _check_int(name, self._options[name], 1)
        for name in ('stop_timeout', 'cancel_grace', 'kill_grace', 'memory_check_interval',
                     'statsd_interval'):
            value = self._options[name]
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f'{name} must be a positive number of seconds, got {value!r}')
        self._mp_context = _resolve_context(self._options['mp_context'])
        self._worker_arguments = worker_arguments(worker_class, self._options['worker_args'],
                                                  self._options['worker_kwargs'])

        self.pool_size: int = pool_size
        self._ioloop_arg = ioloop
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._worker_class = worker_class
        self._max_tasks = max_tasks
        self._max_results = max_results
        self._share = max(1, max_tasks // pool_size)
        self._result_share = max(1, max_results // pool_size)
        self._statsd = statsd

        self._state = NEW
        # This pool's submit() futures: a class whose _lp_pool is this pool (see _TaskFuture).
        self._task_future: type[_TaskFuture] = type(
            '_TaskFuture', (_TaskFuture,), {'__slots__': (), '_lp_pool': self,
                                            '__module__': __name__})
        self._slots = [_Slot(number) for number in range(pool_size)]
        self._pending: Deque[Entry] = collections.deque()
        self._rr = 0
        self._note_turn = 0   # put_nowait()'s own turn: exact round-robin, as in Looppool 0.3
        self._next_tid = 1
        self._sticky: dict[Any, bytes] = {}   # replayed to replacements, in this order
        self._sticky_ids = itertools.count()
        self._result_tasks: set[asyncio.Future[Any]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._stop_future: _StopFuture | None = None
        self._stop_deadline = 0.0
        self._kill_at: float | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._warned_results = False
        self._counts = collections.Counter[str]()
        self._submits = 0   # submit() calls; stats() adds them to _counts['submitted']
        # submit()s of this loop iteration not yet handed to a worker, in order; handed out
        # at the end of the iteration, or once there are _outbox_limit (see submit()).
        self._outbox: list[_TaskFuture] = []
        self._outbox_limit = _OUTBOX_PER_WORKER * min(pool_size, 4)
        self._outbox_due = False   # a callback to flush it is scheduled
        self._outbox_gave_up = False   # a future in it was cancelled or timed out
        # submit() may take its shortest path: running, no statsd, no max_tasks_per_worker.
        self._plain = False
        self._recycle_after: int | None = self._options['max_tasks_per_worker']
        # A pool host forwards each reply's bytes unpickled, so its workers answer one by one.
        self._batch_replies = True
        self._metrics: PoolMetrics | None = None
        # A pool host routes results to its clients as bytes: (origin, payload, result_done).
        self._raw_results: Callable[[int, Any, Callable[[], None]], None] | None = None
        self._memory_timer: asyncio.TimerHandle | None = None
        self._room_waiters: list[asyncio.Future[None]] = []   # map()s waiting for room
        self._catching_up = False   # reading replies inside submit(): see _catch_up
        self._held: list[tuple[_Link, int, int, bytes]] | None = None   # see _hold
        self._lag_timer: asyncio.TimerHandle | None = None   # see _check_lag

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker processes. Messages may be sent right away; they wait in the
        channel until the worker has run ``_initialise()``."""
        if self._state != NEW:
            raise RuntimeError(f'the pool was already started (it is {self._state})')
        ioloop = self._ioloop_arg
        if ioloop is None:
            ioloop = tornado.ioloop.IOLoop.current()
        self._loop = (ioloop.asyncio_loop  # type: ignore[attr-defined]
                      if isinstance(ioloop, tornado.ioloop.IOLoop) else ioloop)
        self._ready = self._loop.create_future()
        self._state = RUNNING
        _live_pools.add(self)
        if self._statsd is not None:
            self._metrics = PoolMetrics(self._statsd, self._options['statsd_prefix'],
                                        self._options['statsd_interval'], self._loop,
                                        self.stats)
            self._metrics.start()
        self._plain = self._metrics is None and self._recycle_after is None
        for slot in self._slots:
            self._spawn(slot)
        if self._options['max_memory_per_worker'] is not None:
            self._memory_timer = self._loop.call_later(
                self._options['memory_check_interval'], self._check_memory)

    async def __aenter__(self) -> Pool:
        if self._state == NEW:
            self.start()
        assert self._ready is not None
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def stop(self, timeout: float | None = None) -> asyncio.Future[None]:
        """Stop the pool: accepted tasks finish, their results reach ``process_message``,
        then every worker runs ``_finalise()`` and exits.

        New messages are refused with :class:`PoolClosed` from now on. After ``timeout``
        seconds (default: the pool's ``stop_timeout``) the workers are told to cancel what
        they run, and a second later killed; futures still open then end in
        :class:`WorkerLost` (sent) or :class:`PoolClosed` (never sent). It cannot hang.

        Returns an awaitable: ``await pool.stop()`` waits without blocking the loop. Called
        without ``await`` from a coroutine on the running loop (as Looppool 0.3 code does),
        it finishes the stop in the next loop iteration by blocking the loop until the
        workers have exited, so that a program which returns right after ``stop()`` still
        gets every result. Called when no loop is running, it runs the loop until done.
        """
        if self._stop_future is not None:
            return self._stop_future
        if timeout is None:
            timeout = self._options['stop_timeout']
        elif not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        if self._state == NEW:
            self._state = STOPPED
            loop = _current_loop_or_none()
            future = _StopFuture(loop=loop) if loop is not None else _StopFuture()
            future._lp_awaited = False
            future.set_result(None)
            self._stop_future = future
            return future
        self._flush_outbox()   # accepted: they are sent before the stop
        self._plain = False
        loop = self._loop
        future = self._stop_future = _StopFuture(loop=loop)
        future._lp_awaited = False
        self._state = STOPPING
        self._wake_room()
        self._stop_deadline = loop.time() + timeout
        self._timers.append(loop.call_later(timeout, self._escalate))
        for slot in self._slots:
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
            if slot.successor is not None:   # a recycle under way: the old worker stays
                successor, slot.successor = slot.successor, None
                self._retire(successor)
            self._stop_when_drained(slot)
        self._check_stopped()

        running = _current_loop_or_none()
        if running is loop:
            loop.call_soon(self._block_unless_awaited)
        elif running is None and not loop.is_running():
            if loop.is_closed():
                self._run_blocking_until_stopped()
            else:
                loop.run_until_complete(future)
        else:
            raise RuntimeError('stop() must be called from the thread that runs the pool\'s '
                               'loop; from another thread use IOLoop.add_callback(pool.stop)')
        return future

    # -- sending ---------------------------------------------------------------------------

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> asyncio.Future[Any]:
        """Send ``message`` to a worker; the returned future resolves to its reply.

        The reply is the return value of the worker's ``handle(message)``; an exception
        raised there is raised here as the same type, with the worker's traceback as
        ``__cause__``. When the chosen worker already holds its share of ``max_tasks``, the
        message waits in the pool (in order) until there is room: backpressure without
        raising. ``timeout`` (seconds, counted from this call) raises :class:`TimeoutError`
        and cancels the task in the worker, as does cancelling the future.

        The messages submitted in one loop iteration travel to a worker pickled together,
        as one frame: a message that cannot be pickled fails its own future with the
        pickling error (nothing of it is sent; the others go through). Raises
        :class:`PoolClosed` once :meth:`stop` was called.
        """
        tid = self._next_tid
        self._next_tid = tid + 1
        if worker_num is None and timeout is None and self._plain:   # _plain: running
            # The path of every message of a burst, kept to the least: the future goes in
            # the outbox, which _flush_outbox() hands to the workers in bulk. The future
            # itself waits there and in the queues: no per-message tuple (the fewer objects
            # a burst leaves, the less the cyclic GC has to walk).
            future = self._task_future(loop=self._loop)
            future._lp_tid = tid
            future._lp_message = message
            outbox = self._outbox
            if outbox:
                outbox.append(future)
                if len(outbox) >= self._outbox_limit:
                    # A long burst: the replies that came meanwhile are read, which makes
                    # room, then this part goes now, so the workers start on it while the
                    # caller goes on.
                    self._catch_up()
                    self._flush_outbox(now=True)
                return future
            rr = self._rr
            slot = self._slots[rr]
            link = slot.link
            if link is not None and not link.used and not link.unread \
                    and not slot.targeted and not self._pending:
                # The next worker in turn is idle: this one goes at once (latency).
                self._rr = rr + 1 if rr + 1 < self.pool_size else 0
                self._submits += 1
                self._send_task(link, future)
                return future
            outbox.append(future)
            if not self._outbox_due:
                self._outbox_due = True
                self._loop.call_soon(self._flush_outbox_due)
            return future
        if self._outbox:
            self._flush_outbox()   # what was submitted before goes first
        if self._state is not RUNNING:
            raise self._not_running()
        if worker_num is not None:
            self._check_worker_num(worker_num)
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        future = self._new_future(self._task_future, tid, message, None, timeout)
        if worker_num is not None:
            future._lp_target = worker_num
        self._submits += 1
        self._dispatch(future, worker_num)
        return future

    def _flush_outbox_due(self) -> None:
        self._outbox_due = False
        self._flush_outbox(now=True)

    def _flush_outbox(self, now: bool = False) -> None:
        """Hand the ``submit()`` calls in the outbox to the workers, in order; with ``now``,
        write each worker's batch at once rather than at the end of the loop iteration.

        The outbox is dealt out in bulk, exactly as one-by-one round-robin would: in turn
        from the pointer, over the workers with room (none with messages of its own
        waiting), as many whole rounds as each has room for; the ``i``-th of them gets
        ``outbox[i::width]``, recorded with one dict update, pickled as one batch. Then
        again over those that still have room. What finds no room waits in the pool.
        """
        outbox = self._outbox
        if not outbox:
            return
        self._outbox = []
        self._submits += len(outbox)
        if self._outbox_gave_up:   # a caller gave up on one before it left: leave it out
            self._outbox_gave_up = False
            outbox = [future for future in outbox if not future.done()]
        count = len(outbox)
        if not count:
            return
        pending = self._pending
        if pending:
            pending.extend(outbox)
            return
        slots = self._slots
        size = len(slots)
        touched = []
        start = 0
        while start < count:
            rr = self._rr
            turn = []
            rounds = count - start
            for step in range(size):
                index = rr + step if rr + step < size else rr + step - size
                slot = slots[index]
                link = slot.link
                if link is not None and not slot.targeted:
                    room = self._room(link)
                    if room > 0:
                        turn.append((link.unread, index, link))
                        if room < rounds:
                            rounds = room
            if not turn:
                break
            if len(turn) > 1:
                turn.sort(key=_queued_first)   # the least queued first (stable: in turn)
            width = len(turn)
            dealt = min(count - start, rounds * width)
            for offset, (_, _, link) in enumerate(turn[:dealt]):
                part = outbox[start + offset:start + dealt:width]
                link.used += len(part)
                link.unread += len(part)
                link.inflight.update(zip(map(_tid_of, part), part))
                if link.batch:
                    link.batch.extend(part)
                else:
                    link.batch = part
                if link not in touched:
                    touched.append(link)
            last = turn[(dealt - 1) % width][1]
            self._rr = last + 1 if last + 1 < size else 0
            start += dealt
        for link in touched:
            if now:
                self._send_batch(link, now=True)
            else:
                link.channel.schedule_flush()  # type: ignore[union-attr]
        for index in range(start, count):   # no room: they wait (or fail, if no worker
            if pending:                       # can start)
                pending.extend(outbox[index:])
                break
            self._dispatch(outbox[index], None)

    def _catch_up(self) -> None:
        """Take in what the workers have sent, during a burst of ``submit()`` calls.

        The loop runs nothing until the caller of a long burst awaits, so without this the
        workers would finish their shares of ``max_tasks`` early in the burst and then sit
        idle until it ends. Reading their replies here frees slots, and the refill that
        follows sends them more of the waiting messages at once. Nothing of the caller's
        runs in between: futures resolve (their callbacks wait for the loop, as always),
        and what would call application code (``process_message``, log records) is held
        for the next loop iteration, in order (see :meth:`_hold`).

        A channel whose frames are being handled right now (the burst comes from a
        ``process_message`` called for one of them) is not read: what it holds would be
        taken in before the rest of that read, out of order.
        """
        self._catching_up = True
        try:
            for slot in self._slots:
                link = slot.link
                if link is not None and link.channel is not None \
                        and not link.channel.handling:
                    link.channel.drain()
        finally:
            self._catching_up = False

    def _submit_payload(self, payload: Any, worker_num: int | None, timeout: float | None,
                        cls: type[_TaskFuture], sink: Any, tid: int = 0) -> _TaskFuture:
        """Send a pickled message a pool host forwards (arguments checked by the caller).
        A host chooses ``tid`` itself, so that results can be routed by it."""
        if not tid:
            tid = self._next_tid
            self._next_tid = tid + 1
        future = self._new_future(cls, tid, payload, sink, timeout)
        if worker_num is not None:
            future._lp_target = worker_num
        self._counts['submitted'] += 1
        if self._outbox:
            self._flush_outbox()
        self._dispatch((protocol.TASK, tid, payload, future), worker_num)
        return future

    def _new_future(self, cls: type[_AnyTaskFuture], tid: int, payload: Any, sink: Any,
                    timeout: float | None) -> _AnyTaskFuture:
        future = cls(loop=self._loop)
        if future._lp_pool is not self:
            future._lp_pool = self   # a class of its own kind (map's chunks, a host's tasks)
        future._lp_tid = tid
        if sink is not None:
            future._lp_sink = sink
        future._lp_message = payload
        if self._metrics is not None:
            future._lp_started = self._loop.time()
        if timeout is not None:
            future._lp_timer = self._loop.call_later(timeout, self._expire, future, timeout)
        return future

    def broadcast(self, message: Any, *, timeout: float | None = None,
                  sticky: bool | str = False) -> asyncio.Future[list[Any]]:
        """Send ``message`` to every worker; resolves to their replies in worker order.

        With ``sticky=True`` the message is also replayed, in order, to every replacement
        worker before it takes other work, so state a worker builds from broadcasts (a
        lookup table) survives a crash. ``sticky='name'`` does the same, and replaces the
        earlier sticky message of that name, so a table refreshed every minute is replayed
        once, not once per refresh. A replayed message's return value is dropped.
        """
        if self._state is not RUNNING:
            raise self._not_running()
        if sticky:
            payload = dumps(message)
            check_size(len(payload))   # else every replacement would fail to get it
            self._remember_sticky(sticky, payload)
        futures = [self.submit(message, worker_num=number, timeout=timeout)
                   for number in range(self.pool_size)]
        return asyncio.gather(*futures)

    def _remember_sticky(self, sticky: bool | str, payload: bytes) -> None:
        if sticky is True:
            key: Any = next(self._sticky_ids)
        elif isinstance(sticky, str):
            key = sticky
            self._sticky.pop(key, None)   # the refreshed message replays last, in order
        else:
            raise TypeError(f'sticky must be a bool or a str name, got {sticky!r}')
        self._sticky[key] = payload

    def put_nowait(self, message: Any, worker_num: int | None = None) -> None:
        """Send ``message`` without waiting for a reply (Looppool 0.3 style).

        Workers are chosen round-robin, exactly: ``pool_size`` consecutive calls reach each
        worker once (``put_nowait`` keeps a turn of its own, which ``submit`` does not
        move); ``worker_num`` picks one. Raises :class:`queue.Full` when that worker
        already holds its share of ``max_tasks`` (sent and not yet done, or waiting here
        for it). A message for a worker that is busy with what it holds waits in the pool
        for it, in order, and counts against its share meanwhile.
        """
        if self._state is not RUNNING:
            raise self._not_running()
        if self._outbox:
            self._flush_outbox()   # the submit()s before it go first
        if worker_num is None:
            slot = self._slots[self._note_turn]
        else:
            self._check_worker_num(worker_num)
            slot = self._slots[worker_num]
        link = slot.link
        if link is None or link.used + len(slot.targeted) >= self._share:
            if slot.start_error is not None:
                raise slot.start_error
            raise queue.Full(f'worker {slot.number} holds its share of max_tasks '
                             f'({self._share} tasks sent and not yet done)')
        payload = dumps(message)
        check_size(len(payload))   # here, though it may wait: the caller gets the error
        if worker_num is None:
            self._note_turn = (self._note_turn + 1) % self.pool_size
        self._counts['submitted'] += 1
        item = (protocol.NOTE, 0, payload, None)
        if slot.targeted or link.blocked or link.unread >= link.window:
            slot.targeted.append(item)   # its turn comes when the worker has room
        else:
            self._send(link, item)

    def put(self, message: Any, worker_num: int | None = None) -> asyncio.Future[None]:
        """Like :meth:`put_nowait`, but waits for room instead of raising ``queue.Full``.

        The returned future resolves once the message is handed to a worker.
        """
        if self._state is not RUNNING:
            raise self._not_running()
        if worker_num is not None:
            self._check_worker_num(worker_num)
        payload = dumps(message)
        future: asyncio.Future[None] = self._loop.create_future()
        self._counts['submitted'] += 1
        if self._outbox:
            self._flush_outbox()
        self._dispatch((protocol.NOTE, 0, payload, future), worker_num)
        return future

    async def map(self, messages: Iterable[Any] | AsyncIterable[Any], *,
                  chunksize: int | None = None) -> AsyncIterator[Any]:
        """Send every message of ``messages`` to the workers; yield the replies in order.

        ``async for reply in pool.map(urls): ...`` is ``submit()`` for each message, made
        for bulk work: the messages travel in chunks of ``chunksize`` (one pickle, one
        frame and one future per chunk, not per message), each chunk to the next worker in
        turn with room for all of it, and a worker starts every handler of a chunk at
        once. The iterable (or async iterable) is read as room frees up, so memory stays
        bounded by ``max_tasks`` however long it is; each message counts against
        ``max_tasks`` like a submitted one.

        An exception raised by a handler (or ``WorkerLost``, when a worker dies with the
        chunk) is raised here at that message's place, after the replies before it; the
        chunks still out are cancelled, as they are when the loop over ``map()`` is left
        early. Without ``chunksize``, chunks follow the work: small at first, then as many
        messages as the workers get through in about 5 ms at the pace seen so far (so
        tiny messages travel a thousand to a chunk, and long ones one by one, each to
        the worker that has room), at most a quarter of a worker's share of
        ``max_tasks`` or 1024, and for messages of known length (a list, a range) no more
        than spreads them over four chunks a worker. Needs a Worker with ``handle()``.
        """
        if self._state is not RUNNING:
            raise self._not_running()
        if self._worker_class._process_message is not Worker._process_message:
            raise TypeError(f'map() needs replies: {self._worker_class.__qualname__} '
                            'overrides _process_message (Looppool style); give it a '
                            'handle() method')
        adapt = chunksize is None
        if chunksize is None:
            chunksize = max(1, min(1024, self._share // 4))
            known = operator.length_hint(messages, 0)
            if known:   # spread a short one over every worker, a few chunks each
                chunksize = min(chunksize, -(-known // (4 * self.pool_size)))
        else:
            _check_int('chunksize', chunksize, 1)
            chunksize = min(chunksize, self._share)
        source = _Chunks(messages)
        # The chunks sent and not yet yielded, in order. The workers' shares bound those in
        # flight to max_tasks; this bounds those done and waiting for their turn to as many,
        # so a slow message at the head does not let replies pile up behind it.
        window: collections.deque[tuple[_ChunkFuture, int]] = collections.deque()
        held = 0
        limit = 2 * max(self._max_tasks, chunksize)
        size = min(chunksize, _FIRST_CHUNK) if adapt else chunksize
        began = 0.0     # loop time of the first chunk sent
        completed = 0   # messages answered
        try:
            while True:
                # Send while a worker has room for a whole chunk (the queued submits first).
                while not source.done and self._state is RUNNING and held + size <= limit:
                    # The submits waiting in the pool go first.
                    if self._outbox:
                        self._flush_outbox()
                    link = None if self._pending else self._next_link(size)
                    if link is None:
                        break
                    chunk = await source.take(size)
                    if chunk:
                        if not began:
                            began = self._loop.time()
                        window.append((self._send_chunk(link, chunk), len(chunk)))
                        held += len(chunk)
                # Yield what is ready at the head, in order.
                yielded = False
                while window and window[0][0].done():
                    yielded = True
                    head, count = window.popleft()
                    held -= count
                    completed += count
                    replies, errors = head.result()
                    if not errors:
                        for reply in replies:
                            yield reply
                        continue
                    first = min(errors)
                    for reply in replies[:max(first, 0)]:
                        yield reply
                    raise errors[first]
                if adapt and yielded:
                    # Each worker's time per message so far: the next chunks hold about
                    # _CHUNK_SECONDS of work.
                    each = (self._loop.time() - began) * self.pool_size / completed
                    size = max(1, min(chunksize, int(_CHUNK_SECONDS / each)
                                      if each > 0 else chunksize))
                if not window:
                    if source.done:
                        return
                    if self._state is not RUNNING:
                        raise PoolClosed('the pool stopped before map() sent every message')
                    if yielded:
                        continue   # everything sent was yielded: send the next chunks
                # Wait for the head chunk, or for room to send another.
                waiter = self._loop.create_future()
                self._room_waiters.append(waiter)
                wake = functools.partial(_wake, waiter)
                oldest = window[0][0] if window else None
                if oldest is not None:
                    oldest.add_done_callback(wake)
                try:
                    await waiter
                finally:
                    if oldest is not None:
                        oldest.remove_done_callback(wake)
        finally:
            for future, _ in window:
                future.cancel()

    def _wake_room(self) -> None:
        """Room came free, a worker is back or the pool is stopping: map()s look again."""
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            _wake(waiter)


    def _send_chunk(self, link: _Link, chunk: list[Any]) -> _ChunkFuture:
        tid = self._next_tid
        self._next_tid = tid + 1
        future = self._new_future(_ChunkFuture, tid, None, None, None)
        future._lp_count = len(chunk)
        future._lp_after = None
        try:
            payload = dumps(chunk)
        except Exception as chunk_error:
            # Find the message at fault: those before it go, it fails in its place.
            index, fault = 0, chunk_error   # if each pickles alone, the chunk fails at once
            for position, message in enumerate(chunk):
                try:
                    dumps(message)
                except Exception as exc:
                    index, fault = position, exc
                    break
            if index == 0:
                future.set_result(([], {0: fault}))
                return future
            future._lp_count = index
            future._lp_after = {index: fault}
            payload = dumps(chunk[:index])
        self._send_chunk_payload(link, future, payload)
        return future

    def _send_chunk_payload(self, link: _Link, future: _ChunkFuture, payload: bytes) -> None:
        count = future._lp_count
        self._counts['submitted'] += count
        if link.batch:
            self._send_batch(link)   # what was submitted earlier goes first
        assert link.channel is not None
        try:
            link.channel.send(protocol.MAP, future._lp_tid, payload)
        except ValueError as exc:   # over the 4 GiB frame limit
            future.set_result(([], {0: exc}))
            return
        future._lp_message = payload   # kept: a chunk given back unstarted goes again
        link.used += count
        link.unread += 1
        link.inflight[future._lp_tid] = future
        if self._lag_timer is None:
            self._watch_lag()
        if self._recycle_after is not None:
            self._count_sent(link, count)

    def _on_mapped(self, link: _Link, tid: int, payload: Any) -> int:
        """A chunk's answer: resolve its future; returns the slots it frees."""
        future = link.inflight.pop(tid, None)
        frees_list, data = protocol.unpack_ids(payload)
        frees = frees_list[0]
        count = future._lp_count if isinstance(future, _ChunkFuture) else frees
        try:
            replies, blobs = loads(data)
        except BaseException as exc:
            replies, blobs = None, {-1: exc}
        if replies is None:
            frees = count   # the worker could not tell how many it was sent
        if not isinstance(future, _ChunkFuture) or future.done():
            return frees
        self._counts['completed'] += count
        errors: dict[int, BaseException] = {}
        for index, blob in blobs.items():
            error = blob if isinstance(blob, BaseException) else self._decode_error(link, blob)
            if isinstance(error, asyncio.CancelledError) and link.terminated:
                error = PoolClosed(f'worker {link.number} was told to give up '
                                   f'({link.kill_reason}), so this task was cancelled there')
            errors[max(index, 0)] = error
        self._counts['failed'] += len(errors)
        if future._lp_after is not None:   # a message after these could not be pickled
            errors.update(future._lp_after)
        future.set_result((replies if replies is not None else [], errors))
        return frees

    def process_message(self, result: Any, result_done: Callable[[], None]) -> Any:
        """Receive one result a worker sent with ``_put_nowait`` (or a note's return value).

        Assign a function to it (or override it); it runs on the parent's loop and may be a
        coroutine. It must call ``result_done()`` once the result is ingested (or be
        decorated with :func:`~looppool.task_done`): each worker may have only its share of
        ``max_results`` results unacknowledged. This default drops results, with a warning.
        """
        result_done()
        if not self._warned_results:
            self._warned_results = True
            log.warning('a worker sent a result but pool.process_message is not set; '
                        'results are dropped')

    def stats(self) -> dict[str, Any]:
        """Plain numbers about the pool: counters since start, and one entry per worker."""
        self._flush_outbox()   # what was submitted is in flight or waiting, as it says
        workers: list[dict[str, Any]] = []
        now = self._loop.time() if self._loop is not None else 0.0
        for slot in self._slots:
            link = slot.link
            workers.append({
                'number': slot.number,
                'pid': link.pid if link else None,
                'state': self._worker_state(link),
                'alive': link is not None and not link.exited,
                'ready': link is not None and link.ready,
                'in_flight': link.used if link else 0,
                'queued': link.unread if link else 0,
                'lag': (round(max(0.0, now - link.heard_at), 4)
                        if link is not None and link.blocked else 0.0),
                'waiting': len(slot.targeted),
                'restarts': slot.restarts,
            })
        return {
            'state': self._state,
            'pool_size': self.pool_size,
            'submitted': self._counts['submitted'] + self._submits,
            'completed': self._counts['completed'],
            'failed': self._counts['failed'],
            'lost': self._counts['lost'],
            'cancelled': self._counts['cancelled'],
            'timed_out': self._counts['timed_out'],
            'restarts': self._counts['restarts'],
            'recycles': self._counts['recycles'],
            'in_flight': sum(w['in_flight'] for w in workers),
            'waiting': len(self._pending) + sum(w['waiting'] for w in workers),
            'workers': workers,
        }

    def _worker_state(self, link: _Link | None) -> str:
        if link is None:
            return 'stopped' if self._state in (STOPPING, STOPPED) else 'restarting'
        if link.exited:
            return 'stopped'
        if not link.ready:
            return 'starting'
        if link.stop_sent:
            return 'stopping'
        return 'blocked' if link.blocked else 'running'

    # -- dispatch --------------------------------------------------------------------------

    def _next_link(self, count: int = 1) -> _Link | None:
        """The worker with room for ``count`` more tasks (a map() chunk counts one in its
        window), nothing waiting for it in particular, and the fewest messages queued:
        in turn among equals; the turn moves past it. None if there is none."""
        limit = self._share - count
        slots = self._slots
        size = len(slots)
        index = self._rr
        best: _Link | None = None
        best_queued = 0
        after = index
        for _ in range(size):
            slot = slots[index]
            index = index + 1 if index + 1 < size else 0
            link = slot.link
            if link is not None and link.used <= limit and not slot.targeted \
                    and not link.blocked:
                queued = link.unread
                if queued < link.window and (best is None or queued < best_queued):
                    best, best_queued, after = link, queued, index
                    if not queued:
                        break
        if best is not None:
            self._rr = after
        return best

    def _room(self, link: _Link) -> int:
        """How many more messages from the backlog ``link`` may take now."""
        if link.blocked or link.retiring:
            return 0
        return min(self._share - link.used, link.window - link.unread)

    def _dispatch(self, item: Entry, worker_num: int | None) -> None:
        share = self._share
        if worker_num is None:
            if not self._pending:
                link = self._next_link()
                if link is not None:
                    self._send(link, item)
                    return
                slots = self._slots
                if all(slot.start_error is not None for slot in slots):
                    self._fail_item(item, slots[0].start_error)
                    return
            self._pending.append(item)
        else:
            slot = self._slots[worker_num]
            if slot.start_error is not None:
                self._fail_item(item, slot.start_error)
                return
            link = slot.link
            if link is not None and link.used < share and not slot.targeted \
                    and link.unread < link.window:
                self._send(link, item)
            else:
                slot.targeted.append(item)

    def _send(self, link: _Link, item: Entry) -> None:
        if not isinstance(item, tuple):
            self._send_task(link, item)
            return
        kind, tid, payload, future = item
        weight = future._lp_count if kind == protocol.MAP else 1
        link.used += weight
        if link.batch:
            self._send_batch(link)   # what was submitted earlier goes first
        try:
            # To an idle worker at once (latency), as submit() does; else at the flush.
            link.channel.send(kind, tid, payload,  # type: ignore[union-attr]
                              link.used == weight)
        except ValueError as exc:   # over the 4 GiB frame limit: nothing was sent
            link.used -= weight
            if future is None:
                raise               # put_nowait(): raise to its caller
            if not future.done():
                future.set_exception(exc)
            return
        link.unread += 1
        if self._lag_timer is None:
            self._watch_lag()
        if kind == protocol.TASK or kind == protocol.MAP:
            link.inflight[tid] = future
        elif future is not None:
            future.set_result(None)
        if self._recycle_after is not None:
            self._count_sent(link)

    def _send_task(self, link: _Link, future: _TaskFuture) -> None:
        """A submit() to ``link``: pickled with the rest of this loop iteration's tasks, at
        the flush."""
        link.used += 1
        link.unread += 1
        link.inflight[future._lp_tid] = future
        batch = link.batch
        batch.append(future)
        if link.used == 1:
            # The worker was idle: nothing to coalesce with, so go now (latency).
            self._send_batch(link, now=True)
        elif len(batch) == 1:
            link.channel.schedule_flush()  # type: ignore[union-attr]
        elif len(batch) >= _MAX_BATCH:
            # A long burst: write this part now, so the worker starts on it while the caller
            # goes on submitting.
            self._send_batch(link, now=True)
        if self._recycle_after is not None:
            self._count_sent(link)

    def _count_sent(self, link: _Link, count: int = 1) -> None:
        assert self._recycle_after is not None
        link.sent += count
        if link.sent >= self._recycle_after:
            self._recycle(link, f'it was sent max_tasks_per_worker={self._recycle_after} tasks')

    def _refill(self, slot: _Slot) -> None:
        link = slot.link
        if link is None:
            return
        share = self._share
        targeted = slot.targeted
        pending = self._pending
        metrics = self._metrics
        if link.blocked:
            pass   # its turn comes when it is heard from again
        elif not targeted and metrics is None and self._recycle_after is None:
            # The common case, kept tight: submit()s move from the queue into the batch.
            inflight = link.inflight
            batch = link.batch
            used = link.used
            room = min(share - used, link.window - link.unread)
            taken = 0
            while taken < room and pending:
                item = pending[0]
                if isinstance(item, tuple):
                    break   # a broadcast's or a host's task: the general path below
                pending.popleft()
                if item.done():
                    continue   # cancelled or timed out while it waited
                taken += 1
                inflight[item._lp_tid] = item
                batch.append(item)
                if len(batch) >= _MAX_BATCH:
                    link.used = used + taken
                    link.unread += taken
                    room -= taken
                    self._send_batch(link)
                    used, taken, batch = link.used, 0, link.batch
            link.used = used + taken
            link.unread += taken
            if batch:
                # Now rather than at the end of the iteration: the worker may be idle.
                self._send_batch(link, now=True)
            if slot.link is not link:
                return
        # slot.link is read again each time: a send may recycle the process.
        while (link := slot.link) is not None and link.used < share and (targeted or pending) \
                and link.unread < link.window and not link.blocked:
            item = targeted.popleft() if targeted else pending.popleft()
            if isinstance(item, tuple):
                future = item[3]
                if future is not None and future.done():
                    continue  # cancelled or timed out while it waited
                if metrics is not None and isinstance(future, _TaskFuture):
                    metrics.waits.offer(self._loop.time() - future._lp_started)
                self._send(link, item)
            elif not item.done():   # else cancelled or timed out while it waited
                if metrics is not None:
                    metrics.waits.offer(self._loop.time() - item._lp_started)
                self._send_task(link, item)
        if self._state is STOPPING:
            self._stop_when_drained(slot)

    def _fail_item(self, item: Entry, error: BaseException | None) -> None:
        future = item if not isinstance(item, tuple) else item[3]
        if future is not None and not future.done():
            _cancel_timer(future)
            future.set_exception(error or PoolClosed('the pool is stopped'))

    # -- blocked workers and work given back ------------------------------------------------

    def _watch_lag(self) -> None:
        """Look for blocked workers in a moment (a worker was sent work)."""
        if self._state is RUNNING or self._state is STOPPING:
            self._lag_timer = self._loop.call_later(_LAG_CHECK, self._check_lag)

    def _check_lag(self) -> None:
        """Mark blocked the workers that hold work and have said nothing since the last
        look (a handler holds their loop): they get no new work until they are heard from,
        and, when another worker has room and nothing waits in the pool, what they hold
        and have not started is recalled for it. Runs while any worker holds work."""
        self._lag_timer = None
        busy = free = False
        stuck = []
        for slot in self._slots:
            link = slot.link
            if link is None or link.exited:
                continue
            if link.unread:
                busy = True
                if link.was_queued and link.reads == link.reads_seen and link.ready:
                    if not link.blocked:
                        link.blocked = True
                        link.window = max(_MIN_WINDOW, link.window // 2)
                    stuck.append(link)
                link.was_queued = True
            else:
                link.was_queued = False
            link.reads_seen = link.reads
            if not free and self._room(link) > 0:
                free = True
        if stuck and free and not self._pending and not self._outbox:
            for link in stuck:
                if link.recalling or link.channel is None or link.channel.closed:
                    continue
                # What it may hold that another worker could run (not worker_num's).
                wanted = [tid for tid, future in link.inflight.items()
                          if future._lp_target is None and not future.done()]
                if wanted:
                    link.recalling = True
                    link.channel.send(protocol.RECALL, len(wanted), dumps(wanted))
        if busy:
            self._watch_lag()

    def _recalled(self, link: _Link, tids: list[int]) -> None:
        """``link`` gave back these held tasks, unstarted: they go to the others."""
        link.recalling = False
        if not tids:
            return
        gone = set(tids)
        link.held = collections.deque(tid for tid in link.held if tid not in gone)
        link.unread -= len(tids)
        self._take_back(link, tids)
        # To the others: this one gets more when it next shows it can start it.
        self._refill_all(but=link)

    def _take_back(self, link: _Link, tids: Iterable[int]) -> None:
        """Tasks ``link`` never started go back to the front of the pool's queue (or of
        their worker's, with ``worker_num``), in the order they were sent."""
        again: list[Entry] = []
        again_targeted: list[Entry] = []
        for tid in tids:
            future = link.inflight.pop(tid, None)
            if future is None:
                continue
            link.used -= _weight(future)
            if future.done():
                continue
            (again if future._lp_target is None else again_targeted).append(_entry(future))
        self._pending.extendleft(reversed(again))
        self._slots[link.number].targeted.extendleft(reversed(again_targeted))

    def _refill_all(self, but: _Link | None = None) -> None:
        for slot in self._slots:
            if slot.link is not None and slot.link is not but \
                    and (self._pending or slot.targeted):
                self._refill(slot)
        if self._room_waiters:
            self._wake_room()

    # -- frames from workers ---------------------------------------------------------------

    def _on_frames(self, link: _Link, frames: list[tuple[int, int, Any]]) -> None:
        inflight = link.inflight
        freed = 0
        completed = 0
        acked = False
        metrics = self._metrics
        link.reads += 1   # heard from: its loop runs
        link.heard_at = self._loop.time()
        link.blocked = False
        for kind, arg, payload in frames:
            if kind == protocol.ACK:
                link.unread -= arg
                acked = True
            elif kind == protocol.REPLY or kind == protocol.REPLY_KEEP:
                if kind == protocol.REPLY:
                    freed += 1
                completed += 1
                future = inflight.pop(arg, None)
                if future is None or future.done():
                    continue
                if future._lp_timer is not None:
                    future._lp_timer.cancel()
                if future._lp_sink is not None:
                    _TaskFuture.set_result(future, None)
                    future._lp_sink(False, payload)
                    continue
                try:
                    value = loads(payload)
                except BaseException as exc:
                    future.set_exception(self._unpickle_error(link, 'reply', exc))
                    continue
                future.set_result(value)
                if metrics is not None:
                    metrics.durations.offer(self._loop.time() - future._lp_started)
            elif kind == protocol.ERROR or kind == protocol.ERROR_KEEP:
                if kind == protocol.ERROR:
                    freed += 1
                future = inflight.pop(arg, None)
                if future is None or future.done():
                    continue   # the caller gave up (cancel, timeout): not a failure
                self._counts['failed'] += 1
                _cancel_timer(future)
                if future._lp_sink is not None:
                    _TaskFuture.set_result(future, None)
                    future._lp_sink(True, payload)
                    continue
                error = self._decode_error(link, payload)
                if isinstance(error, asyncio.CancelledError):
                    if link.terminated:   # cancelled by a deadline (stop, or a recycle)
                        future.set_exception(PoolClosed(
                            f'worker {link.number} was told to give up '
                            f'({link.kill_reason}), so this task was cancelled there'))
                    else:                           # the handler cancelled itself
                        future.cancel()
                else:
                    future.set_exception(error)
            elif kind == protocol.REPLIES:
                count = self._on_replies(link, payload)
                freed += count
                completed += count
                if freed >= _EARLY_REFILL and len(frames) > 1:
                    # A long read: send the worker more work now, not after the rest.
                    link.used -= freed
                    freed = 0
                    slot = self._slots[link.number]
                    if slot.link is link:
                        self._refill(slot)
            elif kind == protocol.MAPPED:
                freed += self._on_mapped(link, arg, payload)
            elif kind == protocol.FREED:
                freed += arg
            elif kind == protocol.HELD:
                link.held.extend(loads(payload))
                link.overran = True
            elif kind == protocol.TAKEN:
                held = link.held
                for _ in range(min(arg, len(held))):
                    held.popleft()
                acked = True
            elif kind == protocol.RECALLED:
                self._recalled(link, loads(payload))
                acked = True
            elif kind == protocol.RESEND:
                self._resend(link, payload)
            elif kind == protocol.RESULT or kind == protocol.LOG:
                if self._catching_up or self._held is not None:
                    self._hold(link, kind, arg, payload)
                elif kind == protocol.RESULT:
                    self._deliver(link, arg, payload)
                else:
                    self._on_log(link, payload)
            elif kind == protocol.READY:
                self._on_ready(link)
            elif kind == protocol.START_FAILED:
                try:
                    link.start_error = loads(payload)
                except BaseException:  # pragma: no cover - two plain strs
                    link.start_error = ('its start', '(the traceback could not be read)')
        if completed:
            self._counts['completed'] += completed
        if freed or acked:
            link.used -= freed
            slot = self._slots[link.number]
            if slot.link is link and (self._pending or slot.targeted
                                      or self._state is STOPPING):
                if acked and not link.unread:
                    if not link.overran and link.window < self._share:
                        # It started all it had, in the budget of its turns, while work
                        # waited here: a longer queue keeps it busy through the round trip.
                        link.window = min(self._share, link.window * 2)
                    link.overran = False
                self._refill(slot)
            if self._room_waiters:
                self._wake_room()

    def _on_replies(self, link: _Link, payload: Any) -> int:
        tids, values_pickle = protocol.unpack_ids(payload)
        inflight = link.inflight
        try:
            values = loads(values_pickle)
        except BaseException as exc:
            # Rare: a reply whose class this process cannot import. Its batch-mates' values
            # are in the same pickle, so they fail with it; the error says so.
            error = self._unpickle_error(link, f'batch of {len(tids)} replies', exc)
            for tid in tids:
                future = inflight.pop(tid, None)
                if future is not None and not future.done():
                    _cancel_timer(future)
                    future.set_exception(error)
            return len(tids)
        metrics = self._metrics
        if metrics is None:
            # The path of every reply of a burst: no call to done() (set_result() on a
            # future the caller gave up on raises, which is rarer and costs no more).
            found: Iterable[Any] = map(inflight.pop, tids, itertools.repeat(None))
            for waiter, value in zip(found, values):
                try:
                    if waiter._lp_timer is None:
                        waiter.set_result(value)
                        continue
                except AttributeError:   # None: no longer in flight here
                    continue
                except asyncio.InvalidStateError:   # cancelled or timed out meanwhile
                    continue
                if not waiter.done():
                    waiter._lp_timer.cancel()
                    waiter.set_result(value)
            return len(tids)
        now = self._loop.time()
        for tid, value in zip(tids, values):
            future = inflight.pop(tid, None)
            if future is None or future.done():
                continue
            if future._lp_timer is not None:
                future._lp_timer.cancel()
            future.set_result(value)
            metrics.durations.offer(now - future._lp_started)
        return len(tids)

    def _hold(self, link: _Link, kind: int, arg: int, payload: Any) -> None:
        """Keep a result or log record for the next loop iteration: it arrived while the
        pool was reading inside a ``submit()`` call (see :meth:`_catch_up`), or after one
        that is still held, which must go first."""
        if self._held is None:
            self._held = []
            self._loop.call_soon(self._release_held)
        self._held.append((link, kind, arg, bytes(payload)))   # the view is only lent

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for link, kind, arg, payload in held or ():
            if kind == protocol.RESULT:
                self._deliver(link, arg, payload)
            else:
                self._on_log(link, payload)

    def _deliver(self, link: _Link, origin: int, payload: Any) -> None:
        if self._raw_results is not None:
            self._raw_results(origin, payload, link.result_done)
            return
        try:
            result = loads(payload)
        except BaseException as exc:
            log.error('a result from worker %d (pid %d) could not be unpickled and was '
                      'dropped: %r', link.number, link.pid, exc)
            link.result_done()
            return
        try:
            outcome = self.process_message(result, link.result_done)
        except Exception:
            log.exception('process_message raised for a result from worker %d', link.number)
            return
        if outcome is not None and inspect.isawaitable(outcome):
            if type(outcome) is not types.CoroutineType:
                outcome = _await(outcome)
            task = eager.start(self._loop, outcome)
            if task.done():
                self._result_task_done(task)
            else:
                self._result_tasks.add(task)
                task.add_done_callback(self._result_task_done)

    def _result_task_done(self, task: asyncio.Future[Any]) -> None:
        self._result_tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error('process_message raised', exc_info=exc)
        if self._state is STOPPING:
            self._check_stopped()

    def _on_log(self, link: _Link, payload: Any) -> None:
        try:
            record = logging.makeLogRecord(loads(payload))
        except BaseException:  # pragma: no cover - records are plain dicts
            return
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)

    def _decode_error(self, link: _Link, payload: Any) -> BaseException:
        """The exception a worker sent, with its traceback text as ``__cause__``."""
        try:
            exc, text = loads(payload)
        except BaseException as error:
            return self._unpickle_error(link, 'exception', error)
        exc.__cause__ = RemoteTraceback(text)
        return exc  # type: ignore[no-any-return]

    def _unpickle_error(self, link: _Link, what: str, exc: BaseException) -> BaseException:
        return pickle.UnpicklingError(
            f'the {what} from worker {link.number} (pid {link.pid}) could not be unpickled '
            f'in the parent: {exc!r} (is its class importable here?)')

    # -- cancellation and timeouts ---------------------------------------------------------

    def _expire(self, future: _TaskFuture, timeout: float) -> None:
        future._lp_timer = None
        if future.done():
            return
        link = self._link_of(future)
        where = (f'on worker {link.number}' if link is not None
                 else 'waiting for room in the pool')
        future.set_exception(TimeoutError(
            f'task {future._lp_tid} did not finish within {timeout} s ({where}); '
            'it was cancelled'))
        self._counts['timed_out'] += 1
        self._abandon(future)

    def _abandon(self, future: _TaskFuture) -> None:
        """The caller gave up on ``future``: stop the work in the worker, if it started."""
        _cancel_timer(future)
        if future.cancelled():
            self._counts['cancelled'] += _weight(future)
        link = self._link_of(future)
        if link is None:   # in the outbox or waiting for room: left out when its turn comes
            self._outbox_gave_up = True
            return
        if link.channel is None or link.channel.closed:
            return
        if future in link.batch:
            link.batch_gave_up = True   # not sent yet: the batch leaves it out
            return
        tid = future._lp_tid
        link.channel.send(protocol.CANCEL, tid)
        grace = self._options['cancel_grace']
        self._timers.append(
            self._loop.call_later(grace, self._check_cancelled, weakref.ref(link), tid, grace))

    def _link_of(self, future: _TaskFuture) -> _Link | None:
        """The worker process that holds ``future``'s task (sent, or in its batch), if any."""
        tid = future._lp_tid
        for link in self._links():
            if link.inflight.get(tid) is future:
                return link
        return None

    def _check_cancelled(self, link_ref: weakref.ref[_Link], tid: int, grace: float) -> None:
        link = link_ref()
        if link is None or link.exited or tid not in link.inflight:
            return
        link.kill_reason = (f'task {tid} was cancelled but its handler did not give up '
                            f'control within cancel_grace={grace} s (CPU-bound code that '
                            'does not await), so the worker was killed')
        log.warning('worker %d (pid %d): %s', link.number, link.pid, link.kill_reason)
        _kill(link)

    # -- supervision -----------------------------------------------------------------------

    def _spawn(self, slot: _Slot, successor: bool = False) -> None:
        ctx = self._mp_context
        parent_sock, child_sock = socketpair()
        start_method = ctx.get_start_method()
        close_fds = tuple(_parent_fds | {parent_sock.fileno()}) if start_method == 'fork' \
            else ()
        config = protocol.WorkerConfig(
            number=slot.number,
            pool_size=self.pool_size,
            result_credit=self._result_share,
            start_method=start_method,
            title=self._title(slot.number),
            close_fds=close_fds,
            log_level=logging.getLogger().getEffectiveLevel(),
            forward_logs=bool(self._options['forward_logs']),
            batch_replies=self._batch_replies,
            cancel_grace=self._options['cancel_grace'],
            worker_arguments=self._worker_arguments,
        )
        link = _Link(slot.number)
        process = ctx.Process(target=worker_main,  # type: ignore[attr-defined]
                              args=(self._worker_class, child_sock, config, os.getpid()),
                              name=f'looppool-worker-{slot.number}')
        try:
            process.start()
        finally:
            child_sock.close()
        _disown(process)
        link.process = process
        link.pid = process.pid or 0
        link.sentinel = process.sentinel
        link.started_at = self._loop.time()
        link.channel = Channel(parent_sock, self._loop,
                               functools.partial(self._on_frames, link),
                               functools.partial(self._on_channel_closed, link),
                               before_flush=functools.partial(self._before_flush, link))
        _parent_fds.add(link.channel.fileno())
        self._loop.add_reader(link.sentinel, self._on_exit, link)
        # A replacement first replays the sticky broadcasts, then takes its share of work.
        for payload in self._sticky.values():
            link.used += 1
            link.unread += 1
            link.channel.send(protocol.REPLAY, 0, payload)
        if successor:
            slot.successor = link   # the current worker serves until this one is ready
            return
        slot.link = link
        self._refill(slot)

    def _recycle(self, link: _Link, reason: str) -> None:
        """Replace a healthy worker without a dip in capacity: the replacement starts
        while the old process goes on taking work; once the replacement is ready it takes
        over, and the old process finishes what it was sent and exits."""
        slot = self._slots[link.number]
        if link.retiring or slot.link is not link or slot.successor is not None \
                or self._state is not RUNNING or self._loop.time() < slot.next_recycle:
            return
        log.info('worker %d (pid %d) is being recycled (planned, not a crash): %s; its '
                 'replacement starts now and takes over once ready', link.number, link.pid,
                 reason)
        slot.recycles += 1
        self._counts['recycles'] += 1
        self._spawn(slot, successor=True)

    def _take_over(self, slot: _Slot, link: _Link) -> None:
        """A recycle's replacement takes the slot (it is ready, or the worker it was to
        replace died); the old process, if alive, retires."""
        old = slot.link
        slot.successor = None
        slot.successor_failures = 0
        slot.link = link
        if old is not None and not old.exited:
            self._retire(old)
        self._refill(slot)

    def _retire(self, link: _Link) -> None:
        """``link`` takes no new work: it finishes what it was sent, then exits."""
        slot = self._slots[link.number]
        link.retiring = True
        slot.retiring.append(link)
        self._send_stop(link)
        # Its last tasks get the stop deadline: then they are cancelled, then killed.
        self._timers.append(self._loop.call_later(
            self._options['stop_timeout'], self._retire_overdue, weakref.ref(link)))

    def _retire_overdue(self, link_ref: weakref.ref[_Link]) -> None:
        link = link_ref()
        if link is None or link.exited or link.channel is None or link.channel.closed:
            return
        link.kill_reason = 'it was being recycled and its tasks outlived stop_timeout'
        link.terminated = True
        link.channel.send(protocol.TERMINATE, 0)
        self._timers.append(self._loop.call_later(self._options['kill_grace'], _kill, link))

    def _check_memory(self) -> None:
        self._memory_timer = None
        if self._state is not RUNNING:
            return
        import psutil
        limit = self._options['max_memory_per_worker']
        for slot in self._slots:
            link = slot.link
            if link is None or not link.ready:
                continue
            try:
                rss = psutil.Process(link.pid).memory_info().rss
            except psutil.Error:
                continue
            if not link.baseline_rss:
                link.baseline_rss = rss
                if rss > limit:
                    log.warning('max_memory_per_worker (%.1f MiB) is below the RSS of a fresh '
                                'worker %d (%.1f MiB; under fork it counts pages shared with '
                                'the parent); memory recycling is off for it', limit / 2 ** 20,
                                slot.number, rss / 2 ** 20)
                continue
            if rss > limit and link.baseline_rss <= limit:
                self._recycle(link, f'its resident memory ({rss / 2 ** 20:.1f} MiB) exceeded '
                                    f'max_memory_per_worker ({limit / 2 ** 20:.1f} MiB)')
        self._memory_timer = self._loop.call_later(self._options['memory_check_interval'],
                                                   self._check_memory)

    def _links(self) -> list[_Link]:
        """Every live worker process: the current one of each slot, a recycle's replacement
        that is starting, and those retiring."""
        links = []
        for slot in self._slots:
            if slot.link is not None:
                links.append(slot.link)
            if slot.successor is not None:
                links.append(slot.successor)
            links.extend(slot.retiring)
        return links

    def _before_flush(self, link: _Link) -> None:
        link.before_flush()
        if link.batch:
            self._send_batch(link)

    def _send_batch(self, link: _Link, now: bool = False) -> None:
        """Pickle the tasks queued for ``link`` in one go and send them as one frame; with
        ``now``, write it at once rather than at the end of the loop iteration.

        A message that cannot be pickled fails its own future (nothing of it is sent); a
        task cancelled before it left is dropped here, freeing its slot.
        """
        batch = link.batch
        link.batch = []
        before = len(batch)
        if link.batch_gave_up:
            link.batch_gave_up = False
            for future in batch:
                if future.done():
                    self._unsend(link, future)
            batch = [future for future in batch if not future.done()]
        try:
            data = _pickle_batch(batch)
        except Exception:
            for future in batch:
                try:
                    dumps(future._lp_message)
                except Exception as exc:
                    future.set_exception(exc)
                    self._counts['failed'] += 1
                    self._unsend(link, future)
            batch = [future for future in batch if not future.done()]
            data = _pickle_batch(batch)
        assert link.channel is not None
        if len(batch) == 1:
            # One task (a round trip at a time): a TASK frame, without the ids' pickle.
            future = batch[0]
            try:
                link.channel.send(protocol.TASK, future._lp_tid, data, now)
                now = False   # written
            except ValueError as exc:   # over the 4 GiB frame limit
                self._unsend(link, future)
                future.set_exception(exc)
                self._counts['failed'] += 1
                batch = []
        elif batch:
            try:
                link.channel.send_parts(protocol.TASKS, len(batch), protocol.pack(
                    list(map(_tid_of, batch)), data), now)
                now = False   # written
            except ValueError:   # over the 4 GiB frame limit together: send one by one,
                # so that only a message over the limit on its own fails
                link.unread -= len(batch)   # counted again as each goes
                self._resend(link, dumps([future._lp_tid for future in batch]))
                batch = [future for future in batch if not future.done()]
        if now:
            link.channel.flush()
        if self._lag_timer is None:
            self._watch_lag()
        if len(batch) < before:   # slots came free: let waiting messages have them
            slot = self._slots[link.number]
            if slot.link is link:
                self._refill(slot)

    def _unsend(self, link: _Link, future: _TaskFuture, counted: bool = True) -> None:
        """``future`` was dealt to ``link`` but is not sent after all (with ``counted``,
        it was counted as on its way)."""
        link.inflight.pop(future._lp_tid, None)
        link.used -= 1
        if counted:
            link.unread -= 1

    def _resend(self, link: _Link, payload: Any) -> None:
        """The worker could not unpickle a batch: send its tasks one by one, so that only
        the message at fault fails (with the worker's unpickling error)."""
        try:
            tids = loads(payload)
        except BaseException:  # pragma: no cover - a list of ints
            return
        assert link.channel is not None
        for tid in tids:
            future = link.inflight.get(tid)
            if future is None:
                continue
            if future.done():   # cancelled while its batch came back: never ran
                self._unsend(link, future, counted=False)
                continue
            try:
                link.channel.send(protocol.TASK, tid, dumps(future._lp_message))
            except Exception as exc:   # over the frame limit on its own
                self._unsend(link, future, counted=False)
                future.set_exception(exc)
                self._counts['failed'] += 1
                continue
            link.unread += 1

    def _title(self, number: int) -> str | None:
        title = self._options['title']
        if not title:
            return None
        if isinstance(title, str):
            return f'{title} {number}'
        try:
            import setproctitle
            parent = setproctitle.getproctitle()
        except Exception:  # pragma: no cover
            parent = ' '.join(sys.argv)
        return f'looppool worker {number} | {parent}'

    def _on_ready(self, link: _Link) -> None:
        link.ready = True
        slot = self._slots[link.number]
        slot.failures = 0
        slot.start_error = None
        if slot.successor is link:
            self._take_over(slot, link)
        if self._ready is not None and not self._ready.done() and all(
                s.link is not None and s.link.ready for s in self._slots):
            self._ready.set_result(None)

    def _on_channel_closed(self, link: _Link) -> None:
        # End of file: the process is exiting; its sentinel reports the exit itself.
        pass

    def _on_exit(self, link: _Link) -> None:
        loop = self._loop
        if not loop.is_closed():
            loop.remove_reader(link.sentinel)
        if link.exited:
            return
        link.exited = True
        assert link.process is not None and link.channel is not None
        link.process.join(5)
        exitcode = link.process.exitcode
        if exitcode is not None:
            # Its sentinel and the other end of that pipe are closed now, not when the
            # process object is collected: until then they would stay open here, and be
            # inherited by every worker forked meanwhile.
            link.process.close()
        if not link.channel.closed:
            link.channel.drain()   # replies the worker sent before it exited
            link.channel.close()
        _parent_fds.discard(link.channel.fileno())
        slot = self._slots[link.number]
        if slot.link is link:
            slot.link = None
            if slot.successor is not None and self._state is RUNNING:
                # Died while its recycle's replacement starts: that one takes over now.
                self._take_over(slot, slot.successor)
        elif link in slot.retiring:
            slot.retiring.remove(link)
        # What it reported held and never took did not start: it runs elsewhere.
        given_back = bool(link.held)
        if given_back:
            held, link.held = link.held, collections.deque()
            self._take_back(link, held)
        lost = list(link.inflight.values())
        link.inflight.clear()
        link.used = 0

        if slot.successor is link:
            # A recycle's replacement that could not start: the worker it was to replace
            # goes on serving, and the recycle is tried again after a back-off.
            slot.successor = None
            slot.successor_failures += 1
            delay = _back_off(slot.successor_failures)
            slot.next_recycle = self._loop.time() + delay
            log.error('worker %d: the replacement started to recycle it (pid %d) %s; the '
                      'worker goes on serving, and the recycle is tried again in %.1f s%s',
                      slot.number, link.pid, _how_it_ended(exitcode), delay,
                      f'\n{link.start_error[1]}' if link.start_error else '')
        elif not link.ready:
            self._start_failed(slot, link, exitcode, lost)
        elif not (link.stop_sent and exitcode == 0):
            reason = link.kill_reason or _likely_cause(exitcode)
            error = WorkerLost(
                f'worker {link.number} (pid {link.pid}) {_how_it_ended(exitcode)} while '
                f'running this task; {reason}'
                + ('; it was replaced' if self._state is RUNNING else ''),
                link.number, link.pid, exitcode)
            if lost or self._state is RUNNING:
                log.error('worker %d (pid %d) %s with %d task(s) in flight; %s', link.number,
                          link.pid, _how_it_ended(exitcode),
                          sum(map(_weight, lost)),
                          reason)
            self._fail(lost, error, 'lost')
            if self._state is RUNNING and slot.link is None and not link.retiring:
                # A worker that dies soon after it started (a sticky broadcast that crashes
                # it, say) is restarted with back-off, like one that cannot start at all.
                if self._loop.time() - link.started_at < _QUICK_DEATH:
                    slot.quick_deaths += 1
                else:
                    slot.quick_deaths = 0
                if slot.quick_deaths >= 2:
                    delay = _back_off(slot.quick_deaths - 1)
                    log.warning('worker %d died %d times in a row soon after starting; '
                                'restarting it in %.1f s', slot.number, slot.quick_deaths,
                                delay)
                    slot.restart_timer = self._loop.call_later(delay, self._restart, slot)
                else:
                    slot.restarts += 1
                    self._counts['restarts'] += 1
                    self._spawn(slot)
        if self._state is STOPPING:
            if slot.link is None:
                for item in slot.targeted:
                    self._fail_item(item, PoolClosed(
                        f'the pool stopped before worker {slot.number} could take this task'))
                slot.targeted.clear()
            self._check_stopped()
        if given_back and self._state is not STOPPED:
            self._refill_all()
        if self._room_waiters:
            self._wake_room()   # a replacement has room; or map() must see the pool stop

    def _start_failed(self, slot: _Slot, link: _Link, exitcode: int | None,
                      lost: list[_TaskFuture]) -> None:
        step, traceback_text = link.start_error or ('', '')
        if traceback_text:
            what = f'could not start: {step} raised\n{traceback_text}'
        elif exitcode is not None and exitcode < 0:
            # Killed from outside while it started (in _initialise, or before): not a
            # problem with the program's main module.
            what = f'{_how_it_ended(exitcode)} before it was ready; {_likely_cause(exitcode)}'
        else:
            what = (f'{_how_it_ended(exitcode)} before it was ready, before _initialise ran '
                    '(likely causes: under spawn or forkserver the main module must be '
                    'importable and its start-up code guarded by if __name__ == '
                    '"__main__"; see the worker\'s stderr)')
        error = WorkerStartError(f'worker {slot.number} (pid {link.pid}) {what}', slot.number,
                                 link.pid, exitcode, traceback_text)
        log.error('%s', error)
        self._fail(lost, error, 'lost')
        slot.failures += 1
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: __aenter__ may not be waiting for it
        if self._state is not RUNNING:
            return
        if slot.failures >= 2:
            # It keeps failing: callers get the start-up error instead of waiting for it.
            slot.start_error = error
            for item in slot.targeted:
                self._fail_item(item, error)
            slot.targeted.clear()
            if all(s.start_error is not None for s in self._slots):
                for item in self._pending:
                    self._fail_item(item, error)
                self._pending.clear()
        delay = _back_off(slot.failures)
        slot.restart_timer = self._loop.call_later(delay, self._restart, slot)

    def _restart(self, slot: _Slot) -> None:
        slot.restart_timer = None
        if self._state is RUNNING and slot.link is None:
            slot.restarts += 1
            self._counts['restarts'] += 1
            self._spawn(slot)

    def _fail(self, futures: Iterable[_TaskFuture], error: BaseException, counter: str) -> None:
        for future in futures:
            if not future.done():
                _cancel_timer(future)
                future.set_exception(error)
                self._counts[counter] += _weight(future)

    # -- stopping --------------------------------------------------------------------------

    def _stop_when_drained(self, slot: _Slot) -> None:
        link = slot.link
        if link is None or link.stop_sent or slot.targeted or self._pending:
            return
        self._send_stop(link)

    def _send_stop(self, link: _Link) -> None:
        """Tell ``link`` to finish what it was sent and exit (the batch goes first)."""
        link.stop_sent = True
        assert link.channel is not None
        if link.batch:
            self._send_batch(link)   # the tasks before the stop
        link.channel.send(protocol.STOP, 0)

    def _check_stopped(self) -> None:
        if self._state is not STOPPING:
            return
        if self._links() or self._result_tasks:
            return
        self._finish_stop()

    def _finish_stop(self) -> None:
        self._state = STOPPED
        self._wake_room()
        if self._memory_timer is not None:
            self._memory_timer.cancel()
        if self._metrics is not None:
            self._metrics.stop()
        for item in self._pending:
            self._fail_item(item, PoolClosed('the pool stopped before this task was sent'))
        self._pending.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._lag_timer is not None:
            self._lag_timer.cancel()
            self._lag_timer = None
        _live_pools.discard(self)
        future = self._stop_future
        if future is not None and not future.done():
            future.set_result(None)

    def _escalate(self) -> None:
        """The stop deadline passed: tell the workers to give up, then kill them."""
        if self._state is not STOPPING or self._kill_at is not None:
            return
        for item in self._pending:
            self._fail_item(item, PoolClosed('the pool stopped (its stop timeout passed) '
                                             'before this task was sent'))
        self._pending.clear()
        for slot in self._slots:
            for item in slot.targeted:
                self._fail_item(item, PoolClosed('the pool stopped (its stop timeout passed) '
                                                 'before this task was sent'))
            slot.targeted.clear()
        for link in self._links():
            if link.channel is not None and not link.channel.closed:
                link.kill_reason = 'the pool\'s stop timeout passed'
                link.terminated = True
                link.channel.send(protocol.TERMINATE, 0)
        grace = self._options['kill_grace']
        self._kill_at = self._loop.time() + grace
        self._timers.append(self._loop.call_later(grace, self._kill_all))

    def _kill_all(self) -> None:
        for link in self._links():
            _kill(link)

    def _block_unless_awaited(self) -> None:
        future = self._stop_future
        if future is None or future.done() or future._lp_awaited:
            return
        self._run_blocking_until_stopped()

    def _run_blocking_until_stopped(self) -> None:
        """Drive the channels and sentinels directly while the loop cannot run."""
        future = self._stop_future
        assert future is not None
        loop = self._loop
        with selectors.DefaultSelector() as selector:
            while not future.done():
                now = loop.time()
                if now >= self._stop_deadline and self._kill_at is None:
                    self._escalate()
                if self._kill_at is not None and now >= self._kill_at:
                    self._kill_all()
                wait = (self._kill_at if self._kill_at is not None else self._stop_deadline)
                links = self._links()
                for link in links:
                    assert link.channel is not None
                    if link.channel.wants_write or link.acks or link.batch:
                        link.channel.flush()
                keys = []
                for link in links:
                    assert link.channel is not None
                    if not link.channel.closed:
                        events = selectors.EVENT_READ
                        if link.channel.wants_write:
                            events |= selectors.EVENT_WRITE
                        keys.append(selector.register(link.channel.fileno(), events,
                                                      ('channel', link)))
                    keys.append(selector.register(link.sentinel, selectors.EVENT_READ,
                                                  ('exit', link)))
                if not keys:
                    self._check_stopped()
                    break
                ready = selector.select(max(0.0, min(wait - now, 0.5)))
                for key in keys:
                    selector.unregister(key.fileobj)
                for key, events in ready:
                    what, link = key.data
                    if what == 'exit':
                        self._on_exit(link)
                    elif not link.exited and link.channel is not None:
                        if events & selectors.EVENT_READ:
                            link.channel.read_ready()
                        if events & selectors.EVENT_WRITE:
                            link.channel.flush()
                self._check_stopped()

    def _abandon_at_exit(self) -> None:
        """The interpreter is exiting with this pool running: end the workers quickly."""
        self._plain = False
        links = self._links()
        for link in links:
            if link.channel is not None and not link.channel.closed:
                _parent_fds.discard(link.channel.fileno())
                link.channel.close()   # end of file: the worker exits
        for link in links:
            assert link.process is not None
            link.process.join(self._options['kill_grace'])
            if link.process.is_alive():
                link.process.kill()
                link.process.join(5)
        self._state = STOPPED
        _live_pools.discard(self)

    # -- helpers ---------------------------------------------------------------------------

    def _not_running(self) -> Exception:
        if self._state is NEW:
            return RuntimeError('start the pool first (pool.start(), or async with)')
        return PoolClosed(f'the pool is {self._state}; it takes no new messages')

    def _check_worker_num(self, worker_num: int) -> None:
        if not isinstance(worker_num, int) or isinstance(worker_num, bool) \
                or not 0 <= worker_num < self.pool_size:
            raise ValueError(f'worker_num must be in 0..{self.pool_size - 1}, '
                             f'got {worker_num!r}')


def _disown(process: multiprocessing.process.BaseProcess) -> None:
    """Take a process we supervise ourselves out of multiprocessing's list of children.

    A process forked from this one later (a web server's workers) inherits that list, and
    at exit multiprocessing would try to join our workers from there, which fails with an
    AssertionError ("can only join a child process"). We reap our processes through their
    sentinels, and end them at exit, so multiprocessing need not know them.
    """
    children = getattr(multiprocessing.process, '_children', None)
    if isinstance(children, set):
        children.discard(process)


def _cancel_timer(future: Any) -> None:
    timer = getattr(future, '_lp_timer', None)
    if timer is not None:
        timer.cancel()
        future._lp_timer = None


def _kill(link: _Link) -> None:
    if link.process is not None and not link.exited:
        try:
            link.process.kill()
        except (OSError, ValueError):  # pragma: no cover - already reaped
            pass


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return 'vanished'
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f'signal {-exitcode}'
        return f'died with signal {-exitcode} ({name})'
    return f'exited with code {exitcode}'


def _likely_cause(exitcode: int | None) -> str:
    if exitcode == -signal.SIGKILL:
        return ('likely causes: the kernel\'s out-of-memory killer (check dmesg), '
                'or a kill -9')
    if exitcode == -signal.SIGSEGV:
        return 'likely cause: a crash in native code (segmentation fault)'
    if exitcode == -signal.SIGABRT:
        return 'likely cause: an abort in native code or a failed assertion in C'
    if exitcode is not None and exitcode >= 0:
        return 'likely cause: os._exit() or sys.exit() in a handler, or the worker\'s ' \
               'parent-death signal'
    return 'likely cause: a signal sent to the worker'


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f'{name} must be an int, got {value!r}')
    if value < minimum:
        raise ValueError(f'{name} must be at least {minimum}, got {value}')


def _resolve_context(value: Any) -> multiprocessing.context.BaseContext:
    if value is None:
        return multiprocessing.get_context()
    if isinstance(value, str):
        try:
            return multiprocessing.get_context(value)
        except ValueError:
            raise ValueError(f'mp_context must be one of '
                             f'{multiprocessing.get_all_start_methods()}, got {value!r}') \
                from None
    if isinstance(value, multiprocessing.context.BaseContext):
        return value
    raise TypeError(f'mp_context must be a start method name or a multiprocessing context, '
                    f'got {value!r}')


def _current_loop_or_none() -> asyncio.AbstractEventLoop | None:
    return asyncio._get_running_loop()


@atexit.register
def _end_pools_at_exit() -> None:
    # Registered after multiprocessing's own exit hook (multiprocessing.util is imported
    # above), so it runs first: that hook joins child processes, which would wait forever
    # for workers that were never stopped.
    for pool in list(_live_pools):
        if pool._state in (RUNNING, STOPPING):
            pool._abandon_at_exit()


def _back_off(attempt: int) -> float:
    """Seconds before the next start after ``attempt`` failed ones: 0.1, 0.2, 0.4 ... 10."""
    return min(0.1 * 2.0 ** (attempt - 1), 10.0)


def _pickle_batch(batch: list[_TaskFuture]) -> bytes:
    """The payload of a batch's frame: the messages' list, or one message on its own."""
    if len(batch) == 1:
        return dumps(batch[0]._lp_message)
    return dumps(list(map(_message_of, batch)))


def _entry(future: _TaskFuture) -> Entry:
    """How a task given back unstarted waits to be sent again."""
    if isinstance(future, _ChunkFuture):
        return (protocol.MAP, future._lp_tid, future._lp_message, future)
    if future._lp_sink is not None:   # a pool host's task: its message is a pickle
        return (protocol.TASK, future._lp_tid, future._lp_message, future)
    return future


def _queued_first(entry: tuple[int, int, _Link]) -> int:
    return entry[0]


def _weight(future: _TaskFuture) -> int:
    """How many messages a future stands for: a chunk of map() many, others one."""
    return future._lp_count if isinstance(future, _ChunkFuture) else 1


def _wake(waiter: asyncio.Future[None], _: Any = None) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Chunks:
    """Reads an iterable or an async iterable in lists of ``size``."""

    __slots__ = ('iterator', 'is_async', 'done')

    def __init__(self, messages: Iterable[Any] | AsyncIterable[Any]) -> None:
        self.is_async = hasattr(messages, '__aiter__')
        if self.is_async:
            self.iterator: Any = messages.__aiter__()  # type: ignore[union-attr]
        elif hasattr(messages, '__iter__'):
            self.iterator = iter(messages)  # type: ignore[arg-type]
        else:
            raise TypeError(f'map() takes an iterable or an async iterable of messages, '
                            f'not {type(messages).__qualname__}')
        self.done = False

    async def take(self, size: int) -> list[Any]:
        chunk: list[Any] = []
        if self.is_async:
            try:
                while len(chunk) < size:
                    chunk.append(await self.iterator.__anext__())
            except StopAsyncIteration:
                self.done = True
        else:
            chunk = list(itertools.islice(self.iterator, size))
            if len(chunk) < size:
                self.done = True
        return chunk
