"""The :class:`Pool`: worker processes with their own loops, fed from this loop.

The path of a message, one module each::

    caller on the parent's loop
      | submit() / put() / put_nowait() / broadcast() / map()
      v
    pool.py        Pool: the arguments, the public calls, stats()      (this module)
    dispatch.py    the backlog and each worker's window: a message goes to the worker
      |            with room and the fewest queued, or waits here, in order
    channel.py     one socketpair per worker; frames coalesced per loop iteration
      v
    worker process: child.py (its loop), runner.py (the worker side of the channel),
      |            worker.py (Worker.handle / _process_message, the user's code)
      ^
    receive.py     replies resolve futures; results go to process_message
    inflight.py    timeouts, cancellation, blocked workers, work taken back
    supervise.py   the processes: start, exit, restart, recycle, stop; the pool's state

Who owns what is said in each module. All of it lives in the parent, on the pool's loop,
and nothing here is thread-safe: from another thread, reach the pool with
``IOLoop.add_callback``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import queue
from collections.abc import AsyncIterable, Iterable
from typing import Any, Callable, Deque

import tornado.ioloop

from . import batch, mapping, protocol, shm, tracing
from .channel import check_size
from .dispatch import Dispatcher
from .errors import PoolClosed
from .inflight import InFlight
from .lifecycle import Lifecycle
from .link import _Slot
from .metrics import PoolMetrics
from .protocol import dumps, dumps_shared
from .receive import Receiver
from .reload import reload_context
from .processes import Processes, _parent_fds
from .supervise import NEW, RUNNING, STOPPED, STOPPING, Supervisor
from .tasks import Entry, _RawFuture, _TaskFuture
from .tracing import ENABLED as TRACING
from .tracing import current_context
from .worker import Worker, worker_arguments

__all__ = ['Pool']

log = logging.getLogger('looppool')

# For the pool host (looppool.remote) and older imports: these live in their modules.
__internal__ = (_parent_fds, _RawFuture)

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
    'reload': False,
    'batch_size': None,
    'batch_timeout': None,
}


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
    :param reload: ``True`` (for development) restarts the workers on the new code when a
        source file of the application changes, rolling, without a failed request; see
        :mod:`looppool.reload` (needs ``pip install "looppool[reload]"``).
    :param title: ``True`` titles each worker process ``looppool worker N | <parent title>``
        (``ps``, ``htop``); ``False`` leaves titles alone.
    :param batch_size: for a ``worker_class`` that overrides
        :meth:`~looppool.Worker.handle_batch`: the most messages in one batch (default
        64, or a worker's share of ``max_tasks`` if that is smaller; a larger one is a
        :class:`ValueError`, as no batch could fill). A class without ``handle_batch``
        given either option raises :class:`TypeError`.
    :param batch_timeout: seconds a batch waits for more messages after its first one
        arrived (default 0.005): it is handed over when full or when this has passed,
        whichever comes first. See the manual's "Batches" page.

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

    # How workers are started and reached (looppool.processes; a DaskPool's are actors),
    # and how worker_args and worker_kwargs are pickled for them.
    _transport_class: type[Processes] = Processes
    _pickle_arguments: Callable[[Any], bytes] = staticmethod(dumps)

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
        self._mp_context = (reload_context(self._options['mp_context'])
                            if self._options['reload']
                            else _resolve_context(self._options['mp_context']))
        self._worker_arguments = worker_arguments(worker_class, self._options['worker_args'],
                                                  self._options['worker_kwargs'],
                                                  self._pickle_arguments)

        self.pool_size: int = pool_size
        self._ioloop_arg = ioloop
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._worker_class = worker_class
        self._max_tasks = max_tasks
        self._max_results = max_results
        self._share = max(1, max_tasks // pool_size)
        self._result_share = max(1, max_results // pool_size)
        self._statsd = statsd
        # (batch_size or None for the default, batch_timeout), None if it does not batch.
        self._batching = batch.check_options(worker_class, self._options['batch_size'],
                                             self._options['batch_timeout'], max_tasks,
                                             pool_size)
        self._batch_sizes = collections.Counter[int]()   # batch size -> batches handed

        self._recycle_after: int | None = self._options['max_tasks_per_worker']
        # A pool host forwards each reply's bytes unpickled, so its workers answer one by one.
        self._batch_replies = True
        # A pool host routes results to its clients as bytes: (origin, payload, result_done).
        self._raw_results: Callable[[int, Any, Callable[[], None]], None] | None = None
        # Buffers at least this large go through shared memory, both ways (0: never): local
        # processes only; a pool host sets it to 0 (its replies and results leave for its
        # clients pickled in its socket: see looppool.remote.host).
        self._shared_memory = shm.THRESHOLD if shm.AVAILABLE \
            and getattr(self._transport_class, 'shared_memory', False) else 0
        self._metrics: PoolMetrics | None = None
        # Shared by the parts below, each of which says what it changes in them.
        self._slots = [_Slot(number) for number in range(pool_size)]
        self._pending: Deque[Entry] = collections.deque()   # the backlog, in order
        self._counts = collections.Counter[str]()
        # The parts, along the path of a message (see the module's docstring).
        self._make_parts(self._transport_class)

    def _batch_config(self) -> tuple[int, float]:
        """A worker's ``(batch_size, batch_timeout)``: ``(0, 0.0)`` if it does not batch."""
        return batch.config(self._batching, self._share)

    def _make_parts(self, transport: type[Processes]) -> None:
        parts = (Supervisor(self), Dispatcher(self), InFlight(self), Receiver(self),
                 transport(self), Lifecycle(self))
        for part in parts:
            part.bind(*parts)
        (self._supervisor, self._dispatcher, self._inflight, self._receiver,
         self._transport, self._lifecycle) = parts

    def start(self) -> asyncio.Future[None]:
        """Start the worker processes. Messages may be sent right away; they wait in the
        pool until the worker has run ``_initialise()``. Returns a future that resolves
        once every worker has (``async with`` awaits it), or raises the first
        :class:`~looppool.WorkerStartError`."""
        self._start_again()
        ioloop = self._ioloop_arg
        if ioloop is None:
            ioloop = tornado.ioloop.IOLoop.current()
        self._begin(ioloop.asyncio_loop  # type: ignore[attr-defined]
                    if isinstance(ioloop, tornado.ioloop.IOLoop) else ioloop)
        self._spawn_all()
        assert self._supervisor._ready is not None
        return self._supervisor._ready

    def _start_again(self) -> None:
        """Raise unless the pool is new or stopped; a stopped one starts over."""
        state = self._supervisor._state
        if state is STOPPED:
            self._supervisor.reset()
            self._dispatcher._rr = self._dispatcher._note_turn = 0
        elif state is not NEW:
            raise RuntimeError(f'the pool was already started (it is {self.state})')

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Running from now on, on ``loop``: messages are taken."""
        self._loop = loop
        self._supervisor._ready = self._loop.create_future()
        self._supervisor._state = RUNNING
        self._transport.running()
        self._lifecycle.note()

    def _spawn_all(self) -> None:
        """Start every worker (the pool knows its size)."""
        if self._statsd is not None:
            self._metrics = PoolMetrics(self._statsd, self._options['statsd_prefix'],
                                        self._options['statsd_interval'], self._loop,
                                        self.stats)
            self._metrics.start()
        self._dispatcher._plain = self._metrics is None and self._recycle_after is None
        for slot in self._slots:
            self._supervisor._spawn(slot)
        if self._options['reload']:
            self._lifecycle.watch()
        if self._options['max_memory_per_worker'] is not None:
            self._supervisor._memory_timer = self._loop.call_later(
                self._options['memory_check_interval'], self._supervisor._check_memory)

    async def __aenter__(self) -> Pool:
        if self._supervisor._state in (NEW, STOPPED):
            self.start()
        assert self._supervisor._ready is not None
        try:
            await asyncio.shield(self._supervisor._ready)
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
        return self._supervisor.stop(timeout)

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> asyncio.Future[Any]:
        """Send ``message`` to a worker; the returned future resolves to its reply.

        The reply is the return value of the worker's ``handle(message)``; an exception
        raised there is raised here as the same type, with the worker's traceback as
        ``__cause__``. The message goes to the worker with room and the fewest messages
        queued (``worker_num`` picks one); when none has room, it waits in the pool, in
        order, until one has: backpressure without raising. ``timeout`` (seconds, counted
        from this call) raises :class:`TimeoutError` and cancels the task in the worker,
        as does cancelling the future.

        The messages submitted in one loop iteration travel to a worker pickled together,
        as one frame: a message that cannot be pickled fails its own future with the
        pickling error (nothing of it is sent; the others go through). Raises
        :class:`PoolClosed` once :meth:`stop` was called.
        """
        return self._dispatcher.submit(message, worker_num, timeout)

    def _submit_payload(self, payload: Any, worker_num: int | None, timeout: float | None,
                        cls: type[_TaskFuture], sink: Any, tid: int = 0) -> _TaskFuture:
        """Send a pickled message a pool host forwards (arguments checked by the caller).
        A host chooses ``tid`` itself, so that results can be routed by it."""
        if not tid:
            tid = self._dispatcher._next_tid
            self._dispatcher._next_tid = tid + 1
        future = self._dispatcher._new_future(cls, tid, payload, sink, timeout)
        if worker_num is not None:
            future._lp_target = worker_num
        self._counts['submitted'] += 1
        if self._dispatcher._outbox:
            self._dispatcher._flush_outbox()
        self._dispatcher._dispatch((protocol.TASK, tid, payload, future), worker_num)
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
        if self._supervisor._state is not RUNNING:
            raise self._not_running()
        if sticky:
            payload = dumps(message)
            check_size(len(payload))   # else every replacement would fail to get it
            self._supervisor._remember_sticky(sticky, payload)
        futures = [self.submit(message, worker_num=number, timeout=timeout)
                   for number in range(self.pool_size)]
        return asyncio.gather(*futures)

    def put_nowait(self, message: Any, worker_num: int | None = None) -> None:
        """Send ``message`` without waiting for a reply (Looppool 0.3 style).

        Workers are chosen round-robin, exactly: ``pool_size`` consecutive calls reach each
        worker once (``put_nowait`` keeps a turn of its own, which ``submit`` does not
        move); ``worker_num`` picks one. Raises :class:`queue.Full` when that worker
        already holds its share of ``max_tasks`` (sent and not yet done, or waiting here
        for it). A message for a worker that is busy with what it holds waits in the pool
        for it, in order, and counts against its share meanwhile.
        """
        if self._supervisor._state is not RUNNING:
            raise self._not_running()
        if self._dispatcher._outbox:
            self._dispatcher._flush_outbox()   # the submit()s before it go first
        if not self._slots:
            raise queue.Full('the pool is still finding out its size')
        if worker_num is None:
            slot = self._slots[self._dispatcher._note_turn]
        else:
            self._check_worker_num(worker_num)
            slot = self._slots[worker_num]
        link = slot.link
        if link is None or link.used + len(slot.targeted) >= self._share:
            if slot.start_error is not None:
                raise slot.start_error
            raise queue.Full(f'worker {slot.number} holds its share of max_tasks '
                             f'({self._share} tasks sent and not yet done)')
        payload = dumps_shared(tracing.outgoing(message) if TRACING and current_context()
                               else message, self._shared_memory)
        check_size(len(payload))   # here, though it may wait: the caller gets the error
        if worker_num is None:
            self._dispatcher._note_turn = (self._dispatcher._note_turn + 1) % self.pool_size
        self._counts['submitted'] += 1
        item = (protocol.NOTE, 0, payload, None)
        if slot.targeted or link.blocked or link.paused or link.unread >= link.window:
            slot.targeted.append(item)   # its turn comes when the worker has room
        else:
            self._dispatcher._send(link, item)

    def put(self, message: Any, worker_num: int | None = None) -> asyncio.Future[None]:
        """Like :meth:`put_nowait`, but waits for room instead of raising ``queue.Full``.

        The returned future resolves once the message is handed to a worker.
        """
        if self._supervisor._state is not RUNNING:
            raise self._not_running()
        if worker_num is not None:
            self._check_worker_num(worker_num)
        payload = dumps_shared(tracing.outgoing(message) if TRACING and current_context()
                               else message, self._shared_memory)
        future: asyncio.Future[None] = self._loop.create_future()
        self._counts['submitted'] += 1
        if self._dispatcher._outbox:
            self._dispatcher._flush_outbox()
        self._dispatcher._dispatch((protocol.NOTE, 0, payload, future), worker_num)
        return future

    def map(self, messages: Iterable[Any] | AsyncIterable[Any], *,
                  chunksize: int | None = None) -> mapping.MapResult:
        """Send every message of ``messages`` to the workers; yield the replies in order.

        ``async for reply in pool.map(urls): ...`` is ``submit()`` for each message, made
        for bulk work (and ``replies = await pool.map(urls)`` the list of the replies, in
        order, gathered a chunk at a time: the faster way when you want them all, see
        :class:`~looppool.mapping.MapResult`): the messages travel in chunks of
        ``chunksize`` (one pickle, one frame and one future per chunk, not per message),
        each chunk to the worker with room for all of it and the fewest messages queued,
        and a worker starts every handler of a chunk at once. The iterable (or async iterable) is read as room frees up, so memory stays
        bounded by ``max_tasks`` however long it is; each message counts against
        ``max_tasks`` like a submitted one.

        An exception raised by a handler (or ``WorkerLost``, when a worker dies with the
        chunk) is raised here at that message's place, after the replies before it; the
        chunks still out are cancelled, as they are when the loop over ``map()`` is left
        early. Without ``chunksize``, chunks follow the work: small at first, then as many
        messages as the workers get through in about 5 ms at the pace seen so far (so
        tiny messages travel thousands to a chunk, and long ones one by one, each to
        the worker that has room), at most a worker's share of ``max_tasks``, and for
        messages of known length (a list, a range) no more than spreads them over four
        chunks a worker. Needs a Worker with ``handle()`` (or ``handle_batch()``: a
        chunk goes to it in pieces of ``batch_size``, at once).
        """
        return mapping.MapResult(functools.partial(mapping.run, self, messages, chunksize),
                                 functools.partial(mapping.collect, self, messages, chunksize))

    def process_message(self, result: Any, result_done: Callable[[], None]) -> Any:
        """Receive one result a worker sent with ``_put_nowait`` (or a note's return value).

        Assign a function to it (or override it); it runs on the parent's loop and may be a
        coroutine. It must call ``result_done()`` once the result is ingested (or be
        decorated with :func:`~looppool.task_done`): each worker may have only its share of
        ``max_results`` results unacknowledged. This default drops results, with a warning.
        """
        result_done()
        if not self._receiver._warned_results:
            self._receiver._warned_results = True
            log.warning('a worker sent a result but pool.process_message is not set; '
                        'results are dropped')

    def stats(self) -> dict[str, Any]:
        """Plain numbers about the pool: counters since start, and one entry per worker."""
        self._dispatcher._flush_outbox()   # what was submitted is in flight or waiting
        workers: list[dict[str, Any]] = []
        now = self._loop.time() if self._loop is not None else 0.0
        for slot in self._slots:
            link = slot.link
            workers.append({
                'number': slot.number,
                'pid': link.pid if link else None,
                'state': self._worker_state(slot),
                'alive': link is not None and not link.exited,
                'ready': link is not None and link.ready,
                'in_flight': link.used if link else 0,
                'queued': link.unread if link else 0,
                'lag': (round(max(0.0, now - link.heard_at), 4)
                        if link is not None and link.blocked else 0.0),
                'waiting': len(slot.targeted),
                'done': slot.done,
                'restarts': slot.restarts,
            })
            if self._batching is not None:
                workers[-1]['batches'] = slot.batches
        stats: dict[str, Any] = {
            'state': self._lifecycle.state(),
            'pool_size': self.pool_size,
            'submitted': self._counts['submitted'] + self._dispatcher._submits,
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
        if self._batching is not None:
            stats['batches'] = {'count': self._counts['batches'],
                                'messages': self._counts['batched'],
                                'sizes': dict(sorted(self._batch_sizes.items()))}
        return stats

    @property
    def state(self) -> str:
        """The pool's state: ``'new'``, ``'starting'`` (workers starting, or resuming after
        a pause), ``'running'``, ``'pausing'``, ``'paused'``, ``'stopping'`` or
        ``'stopped'``; see :doc:`lifecycle`. Each worker's own is in
        ``stats()['workers']``."""
        return self._lifecycle.state()

    def pause(self) -> asyncio.Future[None]:
        """Pause the pool: no worker gets a message from now on; await the result to wait
        until what they had started has finished and each has run its
        :meth:`~looppool.Worker._pause` hook. The processes and their state stay.

        Meanwhile :meth:`submit`, :meth:`put` and :meth:`map` go on accepting: the messages
        wait in the pool, in order, bounded as usual (``max_tasks``); :meth:`put_nowait`
        raises :class:`queue.Full` once a worker's share is used up. Messages a worker was
        sent and had not started come back to wait with them. Pausing a paused pool does
        nothing; :meth:`stop` works from any state (a paused pool resumes first, so that
        what waits runs).
        """
        return self._lifecycle.pause()

    def resume(self) -> asyncio.Future[None]:
        """Resume a paused (or pausing) pool: each worker runs its
        :meth:`~looppool.Worker._resume` hook, then takes the messages that waited, in
        order. Await the result to wait until every worker has resumed. Resuming a running
        pool does nothing."""
        return self._lifecycle.resume()

    def restart(self) -> asyncio.Future[None]:
        """Restart the workers on fresh processes, one at a time, without a dip: each
        replacement starts while the old process serves, takes over once ready (sticky
        broadcasts replayed first), and the old one finishes what it has and exits before
        the next. No task fails or is lost. Await the result; it raises
        :class:`~looppool.WorkerStartError` if a replacement cannot start (that worker and
        those after it go on serving). A paused pool stays paused (the new workers too).
        """
        return self._lifecycle.restart()

    def _worker_state(self, slot: _Slot) -> str:
        link = slot.link
        if link is None:
            state = self._supervisor._state
            if state is NEW:
                return 'starting'
            if state in (STOPPING, STOPPED):
                return 'stopped'
            return 'backing_off' if slot.restart_timer is not None else 'restarting'
        if link.exited:
            return 'stopped'
        if not link.ready:
            return 'starting'
        if link.stop_sent:
            return 'stopping'
        if link.pause_state is not None:
            return link.pause_state   # pausing, paused or resuming
        if slot.successor is not None:
            return 'recycling'   # its replacement is starting; it serves meanwhile
        return 'blocked' if link.blocked else 'running'

    def _not_running(self) -> Exception:
        if self._supervisor._state is NEW:
            return RuntimeError('start the pool first (pool.start(), or async with)')
        return PoolClosed(f'the pool is {self._supervisor._state}; it takes no new messages')

    def _check_worker_num(self, worker_num: int) -> None:
        if not isinstance(worker_num, int) or isinstance(worker_num, bool) \
                or not 0 <= worker_num < self.pool_size:
            raise ValueError(f'worker_num must be in 0..{self.pool_size - 1}, '
                             f'got {worker_num!r}')


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
