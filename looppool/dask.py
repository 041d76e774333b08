"""The :class:`DaskPool`: the same :class:`~looppool.Worker` classes on a Dask cluster.

An optional extra (``pip install "looppool[dask]"``). Each worker number is a Dask *actor*
pinned to a Dask worker; its async methods run on that Dask worker's event loop, which is
an IO loop like a looppool worker's own.

The path of a message::

    caller on the client's loop
      | submit() / put() / put_nowait() / broadcast()
      v
    DaskPool    picks a worker number (round-robin, or worker_num), keeps each number's
      |         share of max_tasks, queues what does not fit, and records every submit()
      |         in the in-flight table of the actor that got it (task id -> future)
      v
    _Link       the client's side of one actor: an outbox of messages, emptied once per
      |         loop iteration into run() calls of up to max_batch messages each; at most
      |         max_in_flight calls at once across the pool
      v
    Dask comm   client.rpc(address).actor_execute(...): one message each way, straight to
      |         the Dask worker (through the scheduler if the client has
      |         direct_to_workers=False)
      v
    _Host       the actor, on the Dask worker's loop: builds the Worker subclass, runs
                _initialise(), starts the messages of each batch, in order, as coroutines
      ^
      | the frames that answer them (REPLY, ERROR, FREED, RESULT of looppool.protocol)
      | leave with the run() call that carried them when they finish within one loop
      | iteration; the rest leave with collect(), a long poll every actor keeps open,
      | whose connection also breaks the moment the Dask worker dies.

Who owns what (on the client's loop unless said otherwise; nothing here is thread-safe):

- ``DaskPool``: the slots, the shared pending queue, the sticky broadcasts, the counters,
  the state (new, running, stopping, stopped) and its subscription to the scheduler's
  events (``remove-worker`` fails and replaces the actors of a Dask worker that left).
- ``_Slot``: one per worker number, stable across re-creations: the messages waiting for
  that number, restart and start-failure counts.
- ``_Link``: one per actor *incarnation*: its Dask worker, key and future, the outbox of
  messages not yet sent, the in-flight table, the calls in flight. A re-created actor
  gets a new link, so nothing meant for a lost actor reaches the new one.
- ``_Host`` (on the Dask worker, on its loop): the user's Worker instance, the running
  tasks, and the frames waiting to be collected.

Calls are never retried: a message that reached a lost actor fails with
:class:`~looppool.WorkerLost`; messages still in the outbox go to the re-created actor.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import os
import pickle
import queue
import socket
import traceback
import types
import uuid
import weakref
from typing import Any, Callable, Deque, Optional

import tornado.ioloop

try:
    import cloudpickle  # type: ignore[import-untyped]
    import distributed
except ImportError as _import_error:  # pragma: no cover - exercised without the extra
    raise ImportError('looppool.dask needs Dask\'s "distributed" package: '
                      'pip install "looppool[dask]"') from _import_error

from . import protocol
from .errors import PoolClosed, RemoteTraceback, WorkerLost, WorkerStartError
from .protocol import dumps, loads
from .eager import start as start_coroutine
from .worker import Worker, worker_arguments

__all__ = ['DaskPool']

log = logging.getLogger('looppool.dask')

NEW, RUNNING, STOPPING, STOPPED = 'new', 'running', 'stopping', 'stopped'

Item = tuple[int, int, Any, Optional['asyncio.Future[Any]']]   # (kind, task id, payload, future)
Frame = tuple[int, int, Any]                             # (kind, arg, payload)

_REPLAYED = -1   # the "origin" of a replayed sticky broadcast: its return value is dropped

# A Dask worker whose actor could not be reached is avoided for this long when an actor is
# placed, unless no other worker is left: the scheduler may still list it as running.
_SUSPECT_FOR = 10.0


# -- the actor, on the Dask worker -------------------------------------------------------------

class _Host:
    """The Dask actor behind one worker number. Lives on a Dask worker, on its event loop.

    The constructor runs in a Dask worker thread (actors are created by a task), so it only
    stores its arguments; :meth:`setup` builds the user's Worker on the loop. Every other
    method is ``async`` and therefore runs on the Dask worker's loop thread, as does the
    Worker itself; nothing here is thread-safe.

    It duck-types the two methods of ``looppool.runner._Runner`` that a Worker calls,
    ``put_result`` (for ``_put_nowait``) and ``task_done``.
    """

    def __init__(self, class_blob: bytes, arguments_blob: bytes, number: int,
                 result_credit: int) -> None:
        self.class_blob = class_blob
        self.arguments_blob = arguments_blob   # pickled (worker_args, worker_kwargs)
        self.number = number
        self.credit = result_credit
        self.pid = os.getpid()
        self.worker: Worker | None = None
        self.call: Callable[[Any], Any] | None = None
        self.looppool_style = False
        # Suspended tasks: a submit()'s task id, or -id(task) for a note.
        self.running: dict[int, asyncio.Future[Any]] = {}
        self.open_slots = 0      # Looppool-style tasks whose _task_done() is still due
        self.freed = 0           # slots freed since the last answer, sent as one FREED
        self.held: collections.deque[bytes] = collections.deque()   # results past credit
        self.deferred = 0        # slots whose freeing waits for the held results
        self.outbox: list[Frame] = []
        self.seq = 0             # answers carrying frames are numbered, so the client can
        #                          handle them in order whatever comm brought them
        self.next_batch = 0      # run() calls are numbered too: their messages start in order
        self.turns: dict[int, asyncio.Future[None]] = {}
        self.active_runs = 0
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    # -- called by the pool ------------------------------------------------------------

    async def setup(self, sticky: list[bytes]) -> tuple[str, Any, Any]:
        """Load the Worker class, run ``_initialise()``, replay the sticky broadcasts.

        Returns ``('ready', pid, hostname)`` or ``('failed', reason, traceback text)``.
        """
        try:
            cls = pickle.loads(self.class_blob)
            args, kwargs = pickle.loads(self.arguments_blob)
        except BaseException as exc:
            return ('failed', f'its worker class or worker_args could not be loaded on '
                              f'this Dask worker: {exc!r}', traceback.format_exc())
        step = f'{cls.__qualname__}(*worker_args, **worker_kwargs)'
        try:
            worker = cls(*args, **kwargs)
            step = 'its _initialise()'
            worker._number = self.number
            worker._ioloop = tornado.ioloop.IOLoop.current()
            # A Worker reaches its runner only through put_result() and task_done().
            worker._runner = self
            self.worker = worker
            self.looppool_style = cls._process_message is not Worker._process_message
            self.call = worker._process_message if self.looppool_style else worker.handle
            result = worker._initialise()
            if inspect.isawaitable(result):
                await result
            step = 'its start()'
            worker.start()
        except BaseException:
            return ('failed', f'{step} raised', traceback.format_exc())
        for payload in sticky:
            self.start_task(_REPLAYED, payload, False)
        return ('ready', self.pid, socket.gethostname())

    async def run(self, batch: int, blob: bytes) -> bytes:
        """Start the messages of one batch (after those of every earlier batch) and answer
        with the frames ready one loop iteration later."""
        if batch != self.next_batch:
            turn = self.turns[batch] = asyncio.get_running_loop().create_future()
            await turn
        self.active_runs += 1
        try:
            for kind, arg, payload in loads(blob):
                if kind == protocol.TASK:
                    self.start_task(arg, payload, True)
                elif kind == protocol.NOTE:
                    self.start_task(arg, payload, False)
                elif kind == protocol.CANCEL:
                    task = self.running.get(arg)
                    if task is not None:
                        task.cancel()
                elif kind == protocol.CREDIT:
                    self.credited(arg)
            self.next_batch = batch + 1
            following = self.turns.pop(batch + 1, None)
            if following is not None and not following.done():
                following.set_result(None)
            # One loop iteration: every message that does not wait on IO finishes here and
            # leaves with this answer rather than with a collect().
            await asyncio.sleep(0)
        finally:
            self.active_runs -= 1
        return self.take()

    async def collect(self) -> bytes:
        """Wait until there is something to answer (or the host closed), then answer."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)   # a stale poll: let it go with nothing
        loop = asyncio.get_running_loop()
        while not (self.outbox or self.freed or self.closed):
            waiter = self.waiter = loop.create_future()
            await waiter
            if self.waiter is not waiter:
                return dumps((None, [], self.closed))
        self.waiter = None
        return self.take()

    async def close(self, terminate: bool) -> bytes:
        """Run ``_finalise()`` and ``join()`` once nothing runs; ``terminate`` cancels the
        tasks still running first. The last answer carries their frames."""
        if terminate:
            for task in list(self.running.values()):
                task.cancel()
            self.open_slots = 0
            self.credited(len(self.held))   # past the deadline: send what is held anyway
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=5.0)
        worker = self.worker
        if worker is not None:
            try:
                result = worker._finalise()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception('worker %d: _finalise() raised', self.number)
            try:
                worker.join()
            except Exception:
                log.exception('worker %d: join() raised', self.number)
        self.closed = True
        for turn in self.turns.values():
            turn.cancel()
        self.turns.clear()
        self.wake(force=True)   # the open collect() answers that the host closed
        return self.take()

    # -- the Worker's runner -------------------------------------------------------------

    def put_result(self, result: Any) -> None:
        self.hold_or_send(dumps(result))  # a result that cannot be pickled raises here

    def task_done(self) -> None:
        if self.open_slots <= 0:
            raise RuntimeError('_task_done() called more often than messages were received')
        self.open_slots -= 1
        if self.held:
            self.deferred += 1
        else:
            self.slot_freed()

    def hold_or_send(self, payload: bytes) -> None:
        """Send a result if the client has room for it, else hold it here.

        As in a local worker: past this worker's share of ``max_results``, results wait
        here, and while any wait no task slot is freed, so the client sends no more work.
        """
        if self.credit > 0 and not self.held:
            self.credit -= 1
            self.emit((protocol.RESULT, 0, payload))
        else:
            self.held.append(payload)

    def credited(self, count: int) -> None:
        """The client acknowledged ``count`` results: send what was held, then free the
        slots that waited for it."""
        self.credit += count
        held = self.held
        while held and self.credit > 0:
            self.credit -= 1
            self.emit((protocol.RESULT, 0, held.popleft()))
        if not held and self.deferred:
            self.freed += self.deferred
            self.deferred = 0
            self.wake()

    # -- running messages ----------------------------------------------------------------

    def start_task(self, tid: int, payload: bytes, reply: bool) -> None:
        try:
            message = loads(payload)
        except BaseException as exc:
            self.finish(tid, reply, exc, True, 'could not unpickle the message')
            if self.looppool_style:
                self.slot_freed()
            return
        if self.looppool_style:
            self.open_slots += 1
        assert self.call is not None
        try:
            result = self.call(message)
        except BaseException as exc:
            self.finish(tid, reply, exc, True)
            return
        if type(result) is not types.CoroutineType and not inspect.isawaitable(result):
            self.finish(tid, reply, result)
            return
        task = start_coroutine(asyncio.get_running_loop(), self.follow(tid, reply, result))
        if not task.done():
            key = tid if reply else -id(task)
            self.running[key] = task
            task.add_done_callback(lambda _: self.running.pop(key, None))

    async def follow(self, tid: int, reply: bool, awaitable: Any) -> None:
        # The answer is made inside the task's last step, not in a done callback, so that a
        # handler that finishes within run()'s loop iteration answers with run().
        try:
            value = await awaitable
        except BaseException as exc:
            self.finish(tid, reply, exc, True)   # SystemExit included: see finish()
        else:
            self.finish(tid, reply, value)

    def finish(self, tid: int, reply: bool, value: Any, failed: bool = False,
               note: str | None = None) -> None:
        """Answer a task: a reply for submit(), or a freed slot (and result) for a note."""
        # A modern task's end frees its slot (Looppool style: _task_done does), unless
        # results are held, which defers it (see hold_or_send).
        frees = not self.looppool_style
        if frees and self.held:
            frees = False
            self.deferred += 1
        if failed and isinstance(value, (SystemExit, KeyboardInterrupt)):
            # Raised in the caller's task, these would end the caller's loop; and a Dask
            # worker, which other actors and Dask's own work share, is not the pool's to end.
            stand_in = RuntimeError(
                f'the handler raised {type(value).__name__}({getattr(value, "code", "")!r}) '
                f'in worker {self.number} (pid {self.pid}); the Dask worker was not ended')
            stand_in.__traceback__ = value.__traceback__
            value = stand_in
        if reply:
            if failed:
                kind = protocol.ERROR if frees else protocol.ERROR_KEEP
                self.emit((kind, tid, self.encode_error(value, note)))
                return
            kind = protocol.REPLY if frees else protocol.REPLY_KEEP
            try:
                payload = dumps(value)
            except BaseException as exc:
                kind = protocol.ERROR if frees else protocol.ERROR_KEEP
                payload = self.encode_error(pickle.PicklingError(
                    f'worker {self.number} (pid {self.pid}) could not pickle the reply '
                    f'({type(value).__qualname__}): {exc!r}'), None)
            self.emit((kind, tid, payload))
            return
        if failed and not isinstance(value, asyncio.CancelledError):
            log.error('worker %d: %s %s: %s', self.number, note or 'message handler raised',
                      type(value).__qualname__, value,
                      exc_info=(type(value), value, value.__traceback__))
        elif not failed and value is not None and not self.looppool_style \
                and tid != _REPLAYED:
            try:
                payload = dumps(value)
            except Exception:
                log.exception('worker %d: could not pickle a result of type %s; dropped',
                              self.number, type(value).__qualname__)
            else:
                self.hold_or_send(payload)
        if frees:
            self.slot_freed()

    def encode_error(self, exc: BaseException, note: str | None) -> bytes:
        text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        where = f'worker {self.number} (pid {self.pid}, Dask worker on {socket.gethostname()})'
        if note:
            text = f'{note} in {where}:\n{text}'
        try:
            payload = dumps((exc, text))
            loads(payload)   # an exception that pickles but cannot be rebuilt fails here
            return payload
        except BaseException as pickling_error:
            stand_in = pickle.PicklingError(
                f'{where} raised {type(exc).__qualname__}: {exc}, which cannot be sent to '
                f'the client ({pickling_error!r})')
            return dumps((stand_in, text))

    # -- answers -------------------------------------------------------------------------

    def slot_freed(self) -> None:
        self.freed += 1
        if self.freed == 1:
            self.wake()

    def emit(self, frame: Frame) -> None:
        self.outbox.append(frame)
        if len(self.outbox) == 1:
            self.wake()

    def wake(self, force: bool = False) -> None:
        # A run() in progress takes the frames itself when it answers.
        if (force or self.active_runs == 0) and self.waiter is not None \
                and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self) -> bytes:
        frames = self.outbox
        if self.freed:
            frames.append((protocol.FREED, self.freed, None))
            self.freed = 0
        if not frames:
            return dumps((None, frames, self.closed))
        self.outbox = []
        seq = self.seq
        self.seq = seq + 1
        return dumps((seq, frames, self.closed))


# -- the client's side -------------------------------------------------------------------------

class _TaskFuture(asyncio.Future):  # type: ignore[type-arg]
    """The future of one ``submit()``: cancelling it cancels the task in the actor."""

    __slots__ = ('_lp_pool', '_lp_tid', '_lp_link', '_lp_timer')

    _lp_pool: DaskPool | None
    _lp_tid: int
    _lp_link: _Link | None
    _lp_timer: asyncio.TimerHandle | None

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        pool = self._lp_pool
        if pool is not None:
            pool._abandon(self)
        return True


class _Link:
    """The client's side of one actor incarnation."""

    __slots__ = ('number', 'serial', 'address', 'key', 'future', 'rpc', 'pid', 'hostname',
                 'ready', 'lost', 'outbox', 'cancels', 'acks', 'inflight', 'used', 'calls',
                 'batch', 'next_seq', 'early', 'tasks', 'poller', 'closed', '__weakref__')

    def __init__(self, number: int, serial: int) -> None:
        self.number = number
        self.serial = serial
        self.address: str | None = None
        self.key: str | None = None
        self.future: Any = None              # the distributed.Future that keeps the actor
        self.rpc: Any = None
        self.pid: int | None = None
        self.hostname: str | None = None
        self.ready = False
        self.lost = False
        self.closed = False
        self.outbox: Deque[Item] = collections.deque()   # assigned, not yet sent
        self.cancels: list[int] = []                     # task ids to cancel in the actor
        self.acks = 0                                    # results acknowledged, to credit
        self.inflight: dict[int, _TaskFuture] = {}       # sent submit()s
        self.used = 0                  # messages assigned and not yet done (its share)
        self.calls = 0                 # run() calls in flight
        self.batch = 0                 # the number of the next run() call
        self.next_seq = 0              # the next answer to handle
        self.early: dict[int, list[Frame]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.poller: asyncio.Task[Any] | None = None

    def describe(self) -> str:
        where = f'an actor on Dask worker {self.address}' if self.address else 'an actor'
        if self.pid is not None:
            where += f', pid {self.pid}'
        return f'worker {self.number} ({where})'


class _Slot:
    """One worker number: its current actor and the messages waiting for it."""

    __slots__ = ('number', 'link', 'targeted', 'restarts', 'failures', 'start_error',
                 'restart_timer')

    def __init__(self, number: int) -> None:
        self.number = number
        self.link: _Link | None = None
        self.targeted: Deque[Item] = collections.deque()
        self.restarts = 0
        self.failures = 0
        self.start_error: WorkerStartError | None = None
        self.restart_timer: asyncio.TimerHandle | None = None


class _Abandoned(Exception):
    """The pool gave up on an actor while it was being started."""


class _StartFailure(Exception):
    """An actor could not be started: why, and the traceback from the Dask worker if any."""

    def __init__(self, message: str, traceback_text: str = '') -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


class DaskPool:
    """Worker objects as Dask actors, with the interface of :class:`looppool.Pool`.

    :param client: a ``distributed.Client`` made with ``asynchronous=True``, running on
        the loop that uses the pool. The pool does not close it.
    :param worker_class: a :class:`~looppool.Worker` subclass. It must be loadable on the
        cluster: defined in a module the Dask workers can import, or sent by value
        (classes defined in ``__main__`` or inside a function are, automatically; for a
        module, ``cloudpickle.register_pickle_by_value(module)``). Each actor makes its
        worker as ``worker_class(*worker_args, **worker_kwargs)``.
    :param worker_args: a tuple of positional arguments for ``worker_class``, and
    :param worker_kwargs: a dict of keyword arguments for it; both checked against its
        signature and pickled (with cloudpickle) here, once, for every actor and every
        re-created one. A :class:`TypeError` naming the parameter says if they do not fit
        the class or cannot be pickled.
    :param pool_size: the number of actors (worker numbers); ``None`` means one per Dask
        worker running when the pool starts.
    :param max_in_flight: actor calls in flight at once across the pool; each worker number
        may use its share (``max_in_flight // pool_size``, at least 1), so a frozen Dask
        worker cannot hold up the others.
    :param timeout: the default ``timeout`` of every :meth:`submit` and :meth:`broadcast`,
        and of the wait for room in :meth:`put` (seconds; ``None``: no default).
    :param max_tasks: messages sent and not yet done, across the pool; each worker number
        takes at most its share (``max_tasks // pool_size``, at least 1) at once.
    :param max_results: ``_put_nowait`` results not yet acknowledged, across the pool.
    :param max_batch: the most messages one actor call carries.
    :param start_timeout: seconds to place, create and initialise one actor before that
        attempt counts as a failed start (default 60).
    :param stop_timeout: seconds :meth:`stop` waits for accepted messages before it
        cancels what still runs (default 30).
    :param close_timeout: seconds each actor then has to run ``_finalise()`` and answer
        (default 5).

    The pool lives on the client's loop and is not thread-safe: from another thread, reach
    it with ``IOLoop.add_callback``. Use it with ``async with``::

        async with distributed.Client(address, asynchronous=True) as client:
            async with DaskPool(client, Resizer) as pool:
                thumbnail = await pool.submit(image_bytes)
    """

    def __init__(self, client: Any, worker_class: type[Worker], *,
                 worker_args: tuple[Any, ...] = (), worker_kwargs: dict[str, Any] | None = None,
                 pool_size: int | None = None, max_in_flight: int = 64,
                 timeout: float | None = None, max_tasks: int = 4096,
                 max_results: int = 4096, max_batch: int = 1000,
                 start_timeout: float = 60.0, stop_timeout: float = 30.0,
                 close_timeout: float = 5.0) -> None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f'client must be a distributed.Client, got {client!r}')
        if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
            raise TypeError('worker_class must be a subclass of looppool.Worker, '
                            f'got {worker_class!r}')
        if pool_size is not None:
            _check_int('pool_size', pool_size, 1)
        _check_int('max_in_flight', max_in_flight, 1)
        _check_int('max_tasks', max_tasks, 1)
        _check_int('max_results', max_results, 1)
        _check_int('max_batch', max_batch, 1)
        if timeout is not None:
            _check_seconds('timeout', timeout)
        for name, value in (('start_timeout', start_timeout), ('stop_timeout', stop_timeout),
                            ('close_timeout', close_timeout)):
            _check_seconds(name, value)
        try:
            self._class_blob = cloudpickle.dumps(worker_class)
        except Exception as exc:
            raise TypeError(f'worker_class {worker_class.__qualname__} cannot be pickled to '
                            f'send it to the cluster: {exc!r}') from exc
        self._arguments_blob = worker_arguments(worker_class, worker_args, worker_kwargs,
                                                cloudpickle.dumps)

        self._client = client
        self._worker_class = worker_class
        self.pool_size: int | None = pool_size
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        self._max_tasks = max_tasks
        self._max_results = max_results
        self._max_batch = max_batch
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._close_timeout = close_timeout
        self._share = 1
        self._call_share = 1
        self._result_share = 1

        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._state = NEW
        self._slots: list[_Slot] = []
        self._pending: Deque[Item] = collections.deque()
        self._rr = 0
        self._next_tid = 1
        self._serials = itertools.count()
        self._name = f'looppool-{worker_class.__name__}-{uuid.uuid4().hex[:8]}'
        self._sticky: dict[Any, bytes] = {}   # replayed to re-created actors, in this order
        self._sticky_ids = itertools.count()
        self._calls = 0
        self._dirty: dict[_Link, None] = {}    # links with something to send, in order
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Actor starts in progress. An abandoned start is left to end by itself rather
        # than cancelled: a Dask connection cancelled while it is being made leaks its
        # socket (Tornado's TCPClient does not close it).
        self._starters: set[asyncio.Task[Any]] = set()
        self._result_tasks: set[asyncio.Future[Any]] = set()
        self._ready: asyncio.Future[None] | None = None
        self._stop_future: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._placing = asyncio.Lock()   # binds to the running loop on first use
        self._worker_joined: asyncio.Future[None] | None = None
        self._suspects: dict[str, float] = {}
        self._counts = collections.Counter[str]()
        self._warned_results = False
        self._events_attached = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Future[None]:
        """Start creating the actors, on the running loop; returns a future that resolves
        once every actor has run ``_initialise()`` (or raises the first start error).

        Messages may be sent right away: they wait until their actor is ready.
        """
        if self._state != NEW:
            raise RuntimeError(f'the pool was already started (it is {self._state})')
        loop = asyncio.get_running_loop()
        client = self._client
        if not getattr(client, 'asynchronous', False):
            raise RuntimeError('DaskPool needs a Client made with asynchronous=True on the '
                               'loop that uses the pool (a synchronous Client runs its own '
                               'loop in another thread)')
        if client.status not in ('running', 'connecting', 'newly-created'):
            raise RuntimeError(f'the Dask client is {client.status}; start it first '
                               '(async with Client(..., asynchronous=True))')
        client_loop = getattr(client.loop, 'asyncio_loop', client.loop)
        if client_loop is not loop:
            raise RuntimeError('the Dask client runs on another loop than the one starting '
                               'the pool; create both on the same loop')
        self._loop = loop
        self._ready = loop.create_future()
        self._state = RUNNING
        _EventRouter.attach(client, self)
        self._events_attached = True
        if self.pool_size is None:
            self._background(self._size_and_start())
        else:
            self._make_slots(self.pool_size)
        return self._ready

    async def __aenter__(self) -> DaskPool:
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

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the pool (a coroutine: await it).

        New messages are refused with :class:`~looppool.PoolClosed` from now on. Accepted
        messages finish and their results reach ``process_message``; then each actor runs
        ``_finalise()`` and ``join()`` and is released (Dask deletes it). After ``timeout``
        seconds (default: ``stop_timeout``) what has not been sent fails with
        ``PoolClosed``, the actors cancel what still runs (those tasks fail with
        ``PoolClosed``), and anything without an answer ``close_timeout`` seconds later
        fails with ``PoolClosed`` too. The client stays open.
        Calling it again waits for the same stop.
        """
        if timeout is None:
            timeout = self._stop_timeout
        else:
            _check_seconds('timeout', timeout)
        if self._state is NEW:
            self._state = STOPPED
            return
        if self._stop_future is None:
            self._state = STOPPING
            self._stop_future = self._loop.create_future()
            for slot in self._slots:
                if slot.restart_timer is not None:
                    slot.restart_timer.cancel()
                    slot.restart_timer = None
            self._background(self._stop_sequence(timeout))
        await asyncio.shield(self._stop_future)

    # -- sending ---------------------------------------------------------------------------

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> asyncio.Future[Any]:
        """Send ``message`` to a worker's actor; the future resolves to its reply.

        As :meth:`looppool.Pool.submit`: the reply is the return value of ``handle``; an
        exception raised there is raised here as the same type with the remote traceback
        as ``__cause__``; a message waits in the pool when its worker holds its share of
        ``max_tasks``; ``timeout`` (default: the pool's) raises :class:`TimeoutError` and
        cancels the task in the actor, as does cancelling the future; a message that cannot
        be pickled fails its own future with the pickling error, and nothing of it is sent.
        A message that reached an actor whose Dask worker is lost fails with
        :class:`~looppool.WorkerLost`. Raises :class:`~looppool.PoolClosed` once
        :meth:`stop` was called.
        """
        if self._state is not RUNNING:
            raise self._not_running()
        if worker_num is not None:
            self._check_worker_num(worker_num)
        if timeout is None:
            timeout = self._timeout
        elif not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        self._counts['submitted'] += 1
        try:
            payload = dumps(message)
        except Exception as exc:
            # As in the local pool: the pickling error fails this message's own future.
            self._counts['failed'] += 1
            failed: asyncio.Future[Any] = self._loop.create_future()
            failed.set_exception(exc)
            return failed
        tid = self._next_tid
        self._next_tid = tid + 1
        future = _TaskFuture(loop=self._loop)
        future._lp_pool = self
        future._lp_tid = tid
        future._lp_link = None
        future._lp_timer = None
        if timeout is not None:
            future._lp_timer = self._loop.call_later(timeout, self._expire, future, timeout)
        self._dispatch((protocol.TASK, tid, payload, future), worker_num)
        return future

    def broadcast(self, message: Any, *, timeout: float | None = None,
                  sticky: bool | str = False) -> asyncio.Future[list[Any]]:
        """Send ``message`` to every worker number; resolves to the replies in worker order.

        As :meth:`looppool.Pool.broadcast`: with ``sticky=True`` the message is also
        replayed, in order, to every re-created actor before it takes other work;
        ``sticky='name'`` replaces the earlier sticky message of that name. A replayed
        message's return value is dropped.
        """
        if self._state is not RUNNING:
            raise self._not_running()
        if self.pool_size is None:
            raise RuntimeError('the pool does not know its size yet; await pool.start() '
                               '(or use async with) before broadcasting')
        if sticky:
            if sticky is True:
                key: Any = next(self._sticky_ids)
            elif isinstance(sticky, str):
                key = sticky
                self._sticky.pop(key, None)   # the refreshed message replays last, in order
            else:
                raise TypeError(f'sticky must be a bool or a str name, got {sticky!r}')
            self._sticky[key] = dumps(message)
        futures = [self.submit(message, worker_num=number, timeout=timeout)
                   for number in range(self.pool_size)]
        return asyncio.gather(*futures)

    def put_nowait(self, message: Any, worker_num: int | None = None) -> None:
        """Send ``message`` without waiting for a reply (Looppool 0.3 style).

        Round-robin as :meth:`looppool.Pool.put_nowait`; raises :class:`queue.Full` when
        the worker holds its share of ``max_tasks``. A return value other than ``None``
        reaches :meth:`process_message`.
        """
        if self._state is not RUNNING:
            raise self._not_running()
        if worker_num is not None:
            self._check_worker_num(worker_num)
        if not self._slots:
            raise queue.Full('the pool is still finding out its size')
        slot = self._slots[self._rr if worker_num is None else worker_num]
        link = slot.link
        if link is None or link.used >= self._share or slot.targeted:
            if slot.start_error is not None:
                raise slot.start_error
            raise queue.Full(f'worker {slot.number} holds its share of max_tasks '
                             f'({self._share} messages sent and not yet done)')
        payload = dumps(message)
        if worker_num is None:
            self._rr = (self._rr + 1) % len(self._slots)
        self._counts['submitted'] += 1
        self._assign(link, (protocol.NOTE, 0, payload, None))

    def put(self, message: Any, worker_num: int | None = None) -> asyncio.Future[None]:
        """Like :meth:`put_nowait`, but waits for room instead of raising ``queue.Full``
        (bounded by the pool's ``timeout``). Resolves once the message is handed to an
        actor's outbox."""
        if self._state is not RUNNING:
            raise self._not_running()
        if worker_num is not None:
            self._check_worker_num(worker_num)
        payload = dumps(message)
        future: asyncio.Future[None] = self._loop.create_future()
        if self._timeout is not None:
            timer = self._loop.call_later(self._timeout, _expire_put, future, self._timeout)
            future.add_done_callback(lambda _: timer.cancel())
        self._counts['submitted'] += 1
        self._dispatch((protocol.NOTE, 0, payload, future), worker_num)
        return future

    def process_message(self, result: Any, result_done: Callable[[], None]) -> Any:
        """Receive one result an actor sent with ``_put_nowait`` (or a note's return value).

        Assign a function to it, as for :attr:`looppool.Pool.process_message`; it must call
        ``result_done()``. This default drops results, with a warning.
        """
        result_done()
        if not self._warned_results:
            self._warned_results = True
            log.warning('a worker sent a result but pool.process_message is not set; '
                        'results are dropped')

    def stats(self) -> dict[str, Any]:
        """Plain numbers about the pool: counters since start, and one entry per worker."""
        workers: list[dict[str, Any]] = []
        for slot in self._slots:
            link = slot.link
            workers.append({
                'number': slot.number,
                'address': link.address if link else None,
                'hostname': link.hostname if link else None,
                'pid': link.pid if link else None,
                'alive': bool(link and not link.lost),
                'ready': bool(link and link.ready),
                'in_flight': link.used if link else 0,
                'calls': link.calls if link else 0,
                'waiting': len(slot.targeted),
                'restarts': slot.restarts,
            })
        return {
            'state': self._state,
            'pool_size': self.pool_size,
            'submitted': self._counts['submitted'],
            'completed': self._counts['completed'],
            'failed': self._counts['failed'],
            'lost': self._counts['lost'],
            'cancelled': self._counts['cancelled'],
            'timed_out': self._counts['timed_out'],
            'restarts': self._counts['restarts'],
            'calls': self._counts['calls'],
            'calls_in_flight': self._calls,
            'in_flight': sum(w['in_flight'] for w in workers),
            'waiting': len(self._pending) + sum(w['waiting'] for w in workers),
            'workers': workers,
        }

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self, item: Item, worker_num: int | None) -> None:
        share = self._share
        slots = self._slots
        if worker_num is None:
            if not self._pending and slots:
                size = len(slots)
                index = self._rr
                for _ in range(size):
                    slot = slots[index]
                    index = index + 1 if index + 1 < size else 0
                    link = slot.link
                    if link is not None and link.used < share and not slot.targeted:
                        self._rr = index
                        self._assign(link, item)
                        return
                if all(slot.start_error is not None for slot in slots):
                    self._fail_item(item, slots[0].start_error)
                    return
            self._pending.append(item)
            return
        slot = slots[worker_num]
        if slot.start_error is not None:
            self._fail_item(item, slot.start_error)
            return
        link = slot.link
        if link is not None and link.used < share and not slot.targeted:
            self._assign(link, item)
        else:
            slot.targeted.append(item)

    def _assign(self, link: _Link, item: Item) -> None:
        """Put a message in a link's outbox; it is sent with the next flush."""
        link.used += 1
        kind, tid, payload, future = item
        if kind == protocol.NOTE and future is not None:
            if not future.done():
                future.set_result(None)
            item = (kind, tid, payload, None)
        link.outbox.append(item)
        self._mark_dirty(link)

    def _refill(self, slot: _Slot) -> None:
        share = self._share
        targeted = slot.targeted
        pending = self._pending
        while (link := slot.link) is not None and link.used < share and (targeted or pending):
            item = targeted.popleft() if targeted else pending.popleft()
            future = item[3]
            if future is not None and future.done():
                continue  # cancelled or timed out while it waited
            self._assign(link, item)

    def _mark_dirty(self, link: _Link) -> None:
        if link.ready:
            self._dirty[link] = None
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what the outboxes hold, in batches, as far as the call limits allow."""
        self._flush_handle = None
        max_batch = self._max_batch
        for link in list(self._dirty):
            if link.lost or not link.ready or link.closed:
                del self._dirty[link]
                continue
            outbox = link.outbox
            while (outbox or link.cancels or link.acks) and link.calls < self._call_share \
                    and self._calls < self._max_in_flight:
                frames: list[Frame] = []
                if link.acks:
                    frames.append((protocol.CREDIT, link.acks, None))
                    link.acks = 0
                for tid in link.cancels:
                    frames.append((protocol.CANCEL, tid, None))
                link.cancels.clear()
                inflight = link.inflight
                while outbox and len(frames) < max_batch:
                    kind, tid, payload, future = outbox.popleft()
                    if future is not None:
                        if future.done():
                            link.used -= 1   # timed out or cancelled before it was sent
                            continue
                        inflight[tid] = future  # type: ignore[assignment]
                        future._lp_link = link  # type: ignore[attr-defined]
                    frames.append((kind, tid, payload))
                if not frames:
                    continue
                self._start_call(link, frames)
            if not (outbox or link.cancels or link.acks):
                del self._dirty[link]
            elif self._calls >= self._max_in_flight:
                break
        # Messages dropped above may have made room.
        for slot in self._slots:
            if slot.targeted or self._pending:
                self._refill(slot)

    def _start_call(self, link: _Link, frames: list[Frame]) -> None:
        batch = link.batch
        link.batch = batch + 1
        link.calls += 1
        self._calls += 1
        self._counts['calls'] += 1
        task = self._loop.create_task(self._call(link, batch, dumps(frames)))
        link.tasks.add(task)
        task.add_done_callback(link.tasks.discard)

    async def _call(self, link: _Link, batch: int, blob: bytes) -> None:
        try:
            answer = await self._execute(link, 'run', batch, blob)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._lose(link, _describe_failure(exc))
            return
        finally:
            link.calls -= 1
            self._calls -= 1
            if self._dirty and self._flush_handle is None and not self._loop.is_closed():
                self._flush_handle = self._loop.call_soon(self._flush)
        self._on_answer(link, answer)

    async def _poll(self, link: _Link) -> None:
        """Keep one collect() open on the actor until it closes or is lost."""
        while not link.lost:
            try:
                answer = await self._execute(link, 'collect')
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self._lose(link, _describe_failure(exc))
                return
            if self._on_answer(link, answer):
                return

    async def _execute(self, link: _Link, function: str, *args: Any) -> Any:
        response = await link.rpc.actor_execute(actor=link.key, function=function,
                                                args=list(args), kwargs={})
        if response.get('status') != 'OK':
            raise response.get('exception') or RuntimeError(f'actor call failed: {response}')
        return response['result']

    # -- answers from actors ---------------------------------------------------------------

    def _on_answer(self, link: _Link, answer: bytes) -> bool:
        """Handle one answer, in the order the actor numbered them; True once it closed."""
        seq, frames, closed = loads(answer)
        closed = bool(closed)
        if link.lost:
            return True
        if seq is not None:
            if seq != link.next_seq:
                link.early[seq] = frames
                return closed
            self._on_frames(link, frames)
            link.next_seq = seq = seq + 1
            while seq in link.early and not link.lost:
                self._on_frames(link, link.early.pop(seq))
                link.next_seq = seq = seq + 1
        if closed:
            link.closed = True
        return closed

    def _on_frames(self, link: _Link, frames: list[Frame]) -> None:
        inflight = link.inflight
        freed = 0
        completed = 0
        for kind, arg, payload in frames:
            if kind == protocol.REPLY or kind == protocol.REPLY_KEEP:
                if kind == protocol.REPLY:
                    freed += 1
                completed += 1
                future = inflight.pop(arg, None)
                if future is None or future.done():
                    continue
                _cancel_timer(future)
                try:
                    value = loads(payload)
                except BaseException as exc:
                    future.set_exception(self._unpickle_error(link, 'reply', exc))
                    continue
                future.set_result(value)
            elif kind == protocol.ERROR or kind == protocol.ERROR_KEEP:
                if kind == protocol.ERROR:
                    freed += 1
                future = inflight.pop(arg, None)
                if future is None or future.done():
                    continue   # cancelled or timed out: not counted as failed
                _cancel_timer(future)
                try:
                    remote, text = loads(payload)
                    remote.__cause__ = RemoteTraceback(text)
                except BaseException as error:
                    remote = self._unpickle_error(link, 'exception', error)
                if isinstance(remote, asyncio.CancelledError):
                    if self._state is STOPPING:   # cancelled by the stop's deadline
                        future.set_exception(PoolClosed(
                            f'the pool stopped (its stop timeout passed) while '
                            f'{link.describe()} was running this task; it was cancelled'))
                    else:
                        future.cancel()
                else:
                    self._counts['failed'] += 1
                    future.set_exception(remote)
            elif kind == protocol.FREED:
                freed += arg
            elif kind == protocol.RESULT:
                self._deliver(link, payload)
        if completed:
            self._counts['completed'] += completed
        if freed:
            link.used -= freed
            slot = self._slots[link.number]
            if slot.link is link:
                self._refill(slot)
            self._check_drained()

    def _deliver(self, link: _Link, payload: Any) -> None:
        done = self._result_done_for(link)
        try:
            result = loads(payload)
        except BaseException as exc:
            log.error('a result from %s could not be unpickled and was dropped: %r',
                      link.describe(), exc)
            done()
            return
        try:
            outcome = self.process_message(result, done)
        except Exception:
            log.exception('process_message raised for a result from worker %d', link.number)
            return
        if outcome is not None and inspect.isawaitable(outcome):
            if type(outcome) is not types.CoroutineType:
                outcome = _await(outcome)
            task = start_coroutine(self._loop, outcome)
            if task.done():
                self._result_task_done(task)
            else:
                self._result_tasks.add(task)
                task.add_done_callback(self._result_task_done)

    def _result_done_for(self, link: _Link) -> Callable[[], None]:
        """The ``result_done`` handed to ``process_message`` with a result from ``link``."""
        ref = weakref.ref(link)

        def result_done() -> None:
            alive = ref()
            if alive is not None:
                self._result_done(alive)

        return result_done

    def _result_done(self, link: _Link) -> None:
        if link.lost or link.closed:
            return
        link.acks += 1
        if link.acks == 1:
            self._mark_dirty(link)

    def _result_task_done(self, task: asyncio.Future[Any]) -> None:
        self._result_tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error('process_message raised', exc_info=(type(exc), exc, exc.__traceback__))
        self._check_drained()

    def _unpickle_error(self, link: _Link, what: str, exc: BaseException) -> BaseException:
        return pickle.UnpicklingError(
            f'the {what} from {link.describe()} could not be unpickled in the client: '
            f'{exc!r} (is its class importable here?)')

    # -- cancellation and timeouts ---------------------------------------------------------

    def _expire(self, future: _TaskFuture, timeout: float) -> None:
        future._lp_timer = None
        if future.done():
            return
        link = future._lp_link
        where = (f'on {link.describe()}' if link is not None
                 else 'waiting to be sent to an actor')
        future.set_exception(TimeoutError(
            f'task {future._lp_tid} did not finish within {timeout} s ({where}); '
            'it was cancelled'))
        self._counts['timed_out'] += 1
        self._abandon(future)

    def _abandon(self, future: _TaskFuture) -> None:
        """The caller gave up on ``future``: cancel the task in its actor, if it was sent."""
        _cancel_timer(future)
        if future.cancelled():
            self._counts['cancelled'] += 1
        link = future._lp_link
        tid = future._lp_tid
        if link is None or tid not in link.inflight or link.lost or link.closed:
            return
        link.cancels.append(tid)
        self._mark_dirty(link)

    # -- actors: placing, starting, losing -------------------------------------------------

    async def _size_and_start(self) -> None:
        try:
            workers = await self._live_workers()
            while not workers:
                await self._wait_for_a_worker()
                workers = await self._live_workers()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail_ready(exc)
            return
        if self._state is not RUNNING:
            return
        self.pool_size = len(workers)
        self._make_slots(len(workers))

    def _make_slots(self, size: int) -> None:
        self._share = max(1, self._max_tasks // size)
        self._call_share = max(1, self._max_in_flight // size)
        self._result_share = max(1, self._max_results // size)
        self._slots = [_Slot(number) for number in range(size)]
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        link = _Link(slot.number, next(self._serials))
        slot.link = link
        # The actor replays the sticky broadcasts as notes: each frees a slot when done.
        link.used = len(self._sticky)
        task = self._loop.create_task(self._start_link(slot, link, list(self._sticky.values())))
        self._starters.add(task)
        task.add_done_callback(self._starters.discard)
        self._refill(slot)

    async def _start_link(self, slot: _Slot, link: _Link, sticky: list[bytes]) -> None:
        """Place, create and initialise one actor; count a failure as a failed start."""
        failure: _StartFailure | None = None
        try:
            await asyncio.wait_for(self._create(link, sticky), self._start_timeout)
        except asyncio.CancelledError:
            self._release(link)   # the actor may exist already
            raise
        except _Abandoned:
            pass
        except _StartFailure as exc:
            failure = exc
        except asyncio.TimeoutError:
            failure = _StartFailure(
                f'it was not ready within start_timeout={self._start_timeout} s (is its '
                'Dask worker frozen, or is no Dask worker running?)')
        except BaseException as exc:
            failure = _StartFailure(
                f'the actor could not be created: {_describe_failure(exc)}',
                ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if link.lost:   # given up on meanwhile: the pool stopped, or its worker left
            self._release(link)
            return
        if failure is not None:
            self._start_failed(slot, link, failure)
            self._release(link)
            return
        link.ready = True
        slot.failures = 0
        slot.start_error = None
        log.debug('%s is ready', link.describe())
        link.poller = self._loop.create_task(self._poll(link))
        link.tasks.add(link.poller)
        link.poller.add_done_callback(link.tasks.discard)
        if link.outbox or link.acks:
            self._mark_dirty(link)
        if self._ready is not None and not self._ready.done() and all(
                s.link is not None and s.link.ready for s in self._slots):
            self._ready.set_result(None)

    async def _create(self, link: _Link, sticky: list[bytes]) -> None:
        client = self._client
        async with self._placing:
            address = await self._place(link)
        # Each step below is awaited to its end even when the pool gives up on this actor
        # meanwhile (see _starters); the checks between steps stop early instead.
        _check_abandoned(link)
        # The actor's class must be importable where it runs; a Dask worker that cannot
        # unpickle a task it was sent breaks, so ask first, with a function it surely has.
        try:
            await client.run(pickle.loads, _host_reference(), workers=[address])
        except (ImportError, AttributeError) as exc:
            raise _StartFailure(
                f'looppool.dask cannot be imported on Dask worker {address} ({exc!r}); '
                'install looppool with the [dask] extra, the same version as the '
                'client\'s, in every Dask worker\'s environment') from None
        _check_abandoned(link)
        link.key = f'{self._name}-{link.number}-{link.serial}'
        future = client.submit(_Host, self._class_blob, self._arguments_blob, link.number,
                               self._result_share,
                               key=link.key, workers=[address], allow_other_workers=False,
                               actor=True, pure=False)
        link.future = future
        try:
            await future
        except RuntimeError as exc:
            if 'deserialization' in str(exc):
                raise _StartFailure(
                    'the Dask scheduler could not load the actor class '
                    'looppool.dask._Host; install looppool (the same version as the '
                    f'client\'s) in the scheduler\'s environment too ({exc})') from None
            raise
        _check_abandoned(link)
        link.rpc = _rpc(client, address)
        outcome = await self._execute(link, 'setup', sticky)
        if outcome[0] != 'ready':
            _, reason, text = outcome
            hint = ''
            if 'loaded' in reason:
                hint = ('; the module that defines it must be importable on every Dask '
                        'worker: install it there, upload it with client.upload_file(), '
                        'or have it sent by value with '
                        'cloudpickle.register_pickle_by_value(module) (classes defined in '
                        '__main__ are sent by value already)')
            raise _StartFailure(f'{reason}{hint}', text)
        link.pid, link.hostname = outcome[1], outcome[2]

    async def _place(self, link: _Link) -> str:
        """Choose the live Dask worker with the fewest of this pool's actors."""
        while True:
            _check_abandoned(link)
            workers = await self._live_workers()
            now = self._loop.time()
            trusted = [a for a in workers if self._suspects.get(a, 0.0) <= now]
            candidates = trusted or workers
            if candidates:
                break
            await self._wait_for_a_worker()
        load = collections.Counter(
            slot.link.address for slot in self._slots
            if slot.link is not None and slot.link is not link and not slot.link.lost
            and slot.link.address is not None)
        order = {address: index for index, address in enumerate(candidates)}
        address = min(candidates, key=lambda a: (load[a], order[a]))
        link.address = address
        return address

    async def _live_workers(self) -> list[str]:
        scheduler: Any = self._client.scheduler
        info = await scheduler.identity(n_workers=-1)
        return [address for address, worker in info.get('workers', {}).items()
                if worker.get('status', 'running') == 'running']

    async def _wait_for_a_worker(self) -> None:
        if self._worker_joined is None or self._worker_joined.done():
            self._worker_joined = self._loop.create_future()
        await asyncio.shield(self._worker_joined)

    def _start_failed(self, slot: _Slot, link: _Link, failure: _StartFailure) -> None:
        self._abandon_link(link)
        text = failure.traceback_text
        error = WorkerStartError(
            f'{link.describe()} could not start: {failure}' + (f'\n{text}' if text else ''),
            slot.number, link.pid, None, text)
        log.error('%s', error)
        slot.failures += 1
        self._fail_ready(error)
        if slot.link is link:
            slot.link = None
        if self._state is not RUNNING:
            self._fail_waiting(slot, PoolClosed(
                f'the pool stopped before worker {slot.number} could take this task'))
            self._check_drained()
            return
        if slot.failures >= 2:
            slot.start_error = error
            self._fail_waiting(slot, error)
            if all(s.start_error is not None for s in self._slots):
                for item in self._pending:
                    self._fail_item(item, error)
                self._pending.clear()
        delay = min(0.1 * 2 ** (slot.failures - 1), 10.0)
        slot.restart_timer = self._loop.call_later(delay, self._restart, slot)

    def _restart(self, slot: _Slot) -> None:
        slot.restart_timer = None
        if self._state is RUNNING and slot.link is None:
            slot.restarts += 1
            self._counts['restarts'] += 1
            self._spawn(slot)

    def _lose(self, link: _Link, reason: str) -> None:
        """The actor's Dask worker died or cannot be reached: fail what it was running and
        re-create the actor on a live Dask worker under the same number."""
        if link.lost:
            return
        if not link.ready:
            # Still starting: _start_link sees the failure and counts it as a start failure.
            return
        slot = self._slots[link.number]
        lost = list(link.inflight.values())
        link.inflight.clear()
        self._abandon_link(link)
        if link.address is not None:
            self._suspects[link.address] = self._loop.time() + _SUSPECT_FOR
        running = self._state is RUNNING
        error = WorkerLost(
            f'{link.describe()} was lost while running this task: {reason}'
            + ('; it is being re-created on a live Dask worker' if running else ''),
            link.number, link.pid, None)
        if lost or running:
            log.error('%s was lost with %d task(s) in flight: %s', link.describe(), len(lost),
                      reason)
        for future in lost:
            if not future.done():
                _cancel_timer(future)
                future.set_exception(error)
                self._counts['lost'] += 1
        if slot.link is link:
            slot.link = None
            if running:
                slot.restarts += 1
                self._counts['restarts'] += 1
                self._spawn(slot)
            else:
                self._fail_waiting(slot, PoolClosed(
                    f'the pool stopped before worker {slot.number} could take this task'))
        self._check_drained()

    def _abandon_link(self, link: _Link) -> None:
        """Forget a link: its unsent messages go back to its slot, its calls are cancelled
        and its actor is released."""
        link.lost = True
        self._dirty.pop(link, None)
        slot = self._slots[link.number]
        unsent = [item for item in link.outbox if item[3] is None or not item[3].done()]
        link.outbox.clear()
        slot.targeted.extendleft(reversed(unsent))
        link.used = 0
        link.early.clear()
        current = asyncio.current_task()
        for task in list(link.tasks):
            if task is not current:
                task.cancel()
        if link.ready:
            self._release(link)
        # else its start is still running; it releases the actor when it ends (awaiting a
        # released Dask future could wait for ever)

    def _release(self, link: _Link) -> None:
        future, link.future = link.future, None
        if future is not None:
            try:
                future.release()
            except Exception:  # pragma: no cover - the client is already closed
                pass

    def _on_cluster_event(self, message: Any) -> None:
        """An event of the scheduler's ``all`` topic (see :class:`_EventRouter`)."""
        if not isinstance(message, dict):
            return
        action = message.get('action')
        address = message.get('worker')
        if action == 'remove-worker' and address:
            self._suspects[address] = self._loop.time() + _SUSPECT_FOR
            for slot in self._slots:
                link = slot.link
                if link is not None and link.address == address and link.ready:
                    self._lose(link, f'the scheduler removed Dask worker {address} (it '
                                     'died, was retired, or stopped answering heartbeats)')
            for slot in self._slots:
                link = slot.link
                if link is not None and link.address == address and not link.ready \
                        and not link.lost:
                    self._start_failed(slot, link, _StartFailure(
                        f'its Dask worker {address} left while the actor was being created'))
        elif action == 'add-worker' and address:
            self._suspects.pop(address, None)
            if self._worker_joined is not None and not self._worker_joined.done():
                self._worker_joined.set_result(None)

    # -- stopping --------------------------------------------------------------------------

    def _check_drained(self) -> None:
        drained = self._drained
        if drained is None or drained.done() or self._state is not STOPPING:
            return
        if self._pending or self._result_tasks:
            return
        for slot in self._slots:
            if slot.targeted:
                return
            link = slot.link
            if link is not None and not link.lost and (link.used or link.outbox):
                return
        drained.set_result(None)

    async def _stop_sequence(self, timeout: float) -> None:
        loop = self._loop
        try:
            if self._ready is not None and not self._ready.done():
                # Still starting: what is not ready has nothing to finish.
                self._ready.set_exception(PoolClosed('the pool was stopped while starting'))
                self._ready.exception()
            # Messages for a number whose actor is not coming back have nowhere to go.
            closed = PoolClosed('the pool stopped before an actor could take this task')
            for slot in self._slots:
                if slot.link is None:
                    self._fail_waiting(slot, closed)
            if all(slot.link is None for slot in self._slots):
                for item in self._pending:
                    self._fail_item(item, closed)
                self._pending.clear()
            self._drained = loop.create_future()
            self._check_drained()
            await asyncio.wait({self._drained}, timeout=timeout)
            terminate = not self._drained.done()
            if terminate:
                closed = PoolClosed('the pool stopped (its stop timeout passed) before this '
                                    'task was sent')
                for item in self._pending:
                    self._fail_item(item, closed)
                self._pending.clear()
                for slot in self._slots:
                    self._fail_waiting(slot, closed)
            closing = []
            for slot in self._slots:
                link = slot.link
                if link is None or link.lost:
                    continue
                if not link.ready:
                    self._abandon_link(link)
                    continue
                closing.append(loop.create_task(self._close_link(link, terminate)))
            if self._worker_joined is not None and not self._worker_joined.done():
                self._worker_joined.set_result(None)   # starts waiting for a worker give up
            if closing or self._starters:
                await asyncio.wait(closing + list(self._starters),
                                   timeout=self._close_timeout)
        finally:
            for slot in self._slots:
                link = slot.link
                if link is None:
                    continue
                error = PoolClosed(f'the pool stopped and {link.describe()} did not answer '
                                   f'this task within close_timeout={self._close_timeout} s')
                for future in link.inflight.values():
                    if not future.done():
                        _cancel_timer(future)
                        future.set_exception(error)
                link.inflight.clear()
                if not link.lost:
                    self._abandon_link(link)
            leftovers = [task for task in self._tasks if task is not asyncio.current_task()]
            leftovers.extend(self._starters)
            for slot in self._slots:
                if slot.link is not None:
                    leftovers.extend(slot.link.tasks)
            for task in leftovers:
                task.cancel()
            if leftovers:
                await asyncio.wait(leftovers, timeout=5.0)
            if self._events_attached:
                self._events_attached = False
                _EventRouter.detach(self._client, self)
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            self._state = STOPPED
            stopped = self._stop_future
            if stopped is not None and not stopped.done():
                stopped.set_result(None)

    async def _close_link(self, link: _Link, terminate: bool) -> None:
        try:
            answer = await self._execute(link, 'close', terminate)
            self._on_answer(link, answer)
            if link.poller is not None and not link.poller.done():
                await asyncio.wait({link.poller}, timeout=self._close_timeout)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.warning('%s could not be closed cleanly: %s', link.describe(),
                        _describe_failure(exc))

    # -- helpers ---------------------------------------------------------------------------

    def _background(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_ready(self, error: BaseException) -> None:
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(error)
            ready.exception()  # retrieved: __aenter__ may not be waiting for it

    def _fail_waiting(self, slot: _Slot, error: BaseException) -> None:
        for item in slot.targeted:
            self._fail_item(item, error)
        slot.targeted.clear()

    def _fail_item(self, item: Item, error: BaseException | None) -> None:
        future = item[3]
        if future is not None and not future.done():
            _cancel_timer(future)
            future.set_exception(error or PoolClosed('the pool is stopped'))

    def _not_running(self) -> Exception:
        if self._state is NEW:
            return RuntimeError('start the pool first (async with, or await pool.start())')
        return PoolClosed(f'the pool is {self._state}; it takes no new messages')

    def _check_worker_num(self, worker_num: int) -> None:
        if self.pool_size is None:
            raise RuntimeError('the pool does not know its size yet; await pool.start() '
                               '(or use async with) before choosing a worker_num')
        if not isinstance(worker_num, int) or isinstance(worker_num, bool) \
                or not 0 <= worker_num < self.pool_size:
            raise ValueError(f'worker_num must be in 0..{self.pool_size - 1}, '
                             f'got {worker_num!r}')


class _EventRouter:
    """One subscription to the scheduler's ``all`` event topic per client, shared by the
    pools on that client. A handler the application had subscribed to that topic keeps
    getting every event, and is put back when the last pool stops.

    Lives on the client's loop, like the pools; not thread-safe.
    """

    _routers: weakref.WeakKeyDictionary[Any, _EventRouter] = weakref.WeakKeyDictionary()

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pools: list[weakref.ref[DaskPool]] = []
        # The client keeps one handler per topic and offers no getter for it.
        self.previous = getattr(client, '_event_handlers', {}).get('all')

    @classmethod
    def attach(cls, client: Any, pool: DaskPool) -> None:
        router = cls._routers.get(client)
        if router is None:
            router = cls._routers[client] = cls(client)
            client.subscribe_topic('all', router.handle)
        router.pools.append(weakref.ref(pool))

    @classmethod
    def detach(cls, client: Any, pool: DaskPool) -> None:
        router = cls._routers.get(client)
        if router is None:
            return
        router.pools = [ref for ref in router.pools if ref() not in (None, pool)]
        if router.pools:
            return
        del cls._routers[client]
        try:
            if router.previous is not None:
                client.subscribe_topic('all', router.previous)
            elif client.status == 'running':
                client.unsubscribe_topic('all')
        except Exception:  # pragma: no cover - the client is closing
            log.debug('could not unsubscribe from the scheduler\'s events', exc_info=True)
        handlers = getattr(client, '_event_handlers', {})
        if router.previous is None and handlers.get('all') == router.handle:
            # unsubscribe_topic() leaves the handler behind; a later pool must not take
            # it for the application's.
            del handlers['all']

    def handle(self, event: Any) -> Any:
        try:
            _, message = event
        except (TypeError, ValueError):
            message = None
        for ref in list(self.pools):
            pool = ref()
            if pool is not None and pool._state in (RUNNING, STOPPING):
                try:
                    pool._on_cluster_event(message)
                except Exception:
                    log.exception('DaskPool could not handle a scheduler event')
        if self.previous is not None:
            return self.previous(event)
        return None


# -- helpers -----------------------------------------------------------------------------------

_HOST_REFERENCE: bytes | None = None


def _check_abandoned(link: _Link) -> None:
    if link.lost:
        raise _Abandoned()


def _host_reference() -> bytes:
    """``_Host`` pickled by reference: unpickling it imports looppool.dask, nothing else."""
    global _HOST_REFERENCE
    if _HOST_REFERENCE is None:
        _HOST_REFERENCE = pickle.dumps(_Host)
    return _HOST_REFERENCE


def _rpc(client: Any, address: str) -> Any:
    # Straight to the Dask worker unless the client was told it cannot reach workers.
    if client.direct_to_workers is False:
        from distributed.actor import ProxyRPC
        return ProxyRPC(client.scheduler, address)  # type: ignore[no-untyped-call]
    return client.rpc(address)


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return (f'its Dask worker could not be reached ({type(exc).__name__}: {exc}); '
                'likely causes: the Dask worker process died (killed, out of memory, '
                'crashed) or the network between client and worker failed')
    if isinstance(exc, KeyError):
        return (f'the actor is gone from its Dask worker ({exc!r}): the Dask worker was '
                'restarted or the actor was released')
    return f'{type(exc).__name__}: {exc}'


def _expire_put(future: asyncio.Future[None], timeout: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(
            f'put() found no room for the message within {timeout} s'))


def _cancel_timer(future: Any) -> None:
    timer = getattr(future, '_lp_timer', None)
    if timer is not None:
        timer.cancel()
        future._lp_timer = None


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f'{name} must be an int, got {value!r}')
    if value < minimum:
        raise ValueError(f'{name} must be at least {minimum}, got {value}')


def _check_seconds(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'{name} must be a positive number of seconds, got {value!r}')
