"""The :class:`DaskPool`: the same :class:`~looppool.Worker` classes on a Dask cluster.

An optional extra (``pip install "looppool[dask]"``). Each worker number is a Dask *actor*
pinned to a Dask worker; it runs the worker's handlers on that Dask worker's event loop,
which is an IO loop like a looppool worker process's own.

A DaskPool is a :class:`looppool.Pool` with another transport: the same dispatcher,
in-flight table, receiver and supervisor (looppool.dispatch, .inflight, .receive,
.supervise) serve it, so it balances work, takes back what an actor had not started,
replaces lost actors and stops as a local pool does. What differs is how a worker is
reached, one module each::

    caller on the client's loop
      | submit() / put() / put_nowait() / broadcast() / map()
      v
    the pool's parts    the backlog, each worker's window, the in-flight table
      v
    dask/pipe.py        the client's end of one actor: what one loop iteration sends
      |                 leaves as one run() call (Dask comm, straight to the Dask worker)
      v
    dask/actor.py       the actor: the same runner as a worker process, on the Dask
      |                 worker's loop; its frames wait until the client's next call
      ^                 (the answer to a run(), or the collect() long poll kept open)
    dask/actors.py      the transport: placing, creating and losing actors, the
                        scheduler's remove-worker events

Calls are never retried: a message that reached a lost actor fails with
:class:`~looppool.WorkerLost` (one it had not started runs elsewhere); messages not yet
sent go to the re-created actor.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

try:
    import cloudpickle  # type: ignore[import-untyped]
    import distributed
except ImportError as _import_error:  # pragma: no cover - exercised without the extra
    raise ImportError('looppool.dask needs Dask\'s "distributed" package: '
                      'pip install "looppool[dask]"') from _import_error

from .. import protocol
from ..link import _Slot
from ..pool import Pool
from ..supervise import RUNNING
from ..worker import Worker
from .actors import Actors, _pipe

__all__ = ['DaskPool']

log = logging.getLogger('looppool.dask')


class DaskPool(Pool):
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
    :param batch_size: for a ``worker_class`` that overrides
        :meth:`~looppool.Worker.handle_batch`: the most messages in one batch (default 64,
        at most a worker's share of ``max_tasks``). Not to be confused with
        ``max_batch``: batches form in each actor from whatever reached it, over calls.
    :param batch_timeout: seconds a batch waits for more messages after its first one
        (default 0.005). As for :class:`looppool.Pool`; see the manual's "Batches" page.
    :param start_timeout: seconds to place, create and initialise one actor before that
        attempt counts as a failed start (default 60).
    :param stop_timeout: seconds :meth:`stop` waits for accepted messages before it
        cancels what still runs (default 30).
    :param close_timeout: seconds the actors then have to end what they run and close;
        past it they are given up (default 5).

    The pool lives on the client's loop and is not thread-safe: from another thread, reach
    it with ``IOLoop.add_callback``. Use it with ``async with``::

        async with distributed.Client(address, asynchronous=True) as client:
            async with DaskPool(client, Resizer) as pool:
                thumbnail = await pool.submit(image_bytes)

    Everything else is as for :class:`looppool.Pool`: a message goes to the worker with
    room and the fewest queued, ``map()`` sends chunks, and ``stats()`` has, besides, the
    Dask worker of each actor (``address``, ``hostname``) and the actor calls made
    (``calls``, ``calls_in_flight``). Logs of the workers stay on their Dask workers.
    """

    _transport_class = Actors  # type: ignore[assignment]
    _pickle_arguments = staticmethod(cloudpickle.dumps)
    _transport: Actors  # type: ignore[assignment]

    def __init__(self, client: Any, worker_class: type[Worker], *,
                 worker_args: tuple[Any, ...] = (), worker_kwargs: dict[str, Any] | None = None,
                 pool_size: int | None = None, max_in_flight: int = 64,
                 timeout: float | None = None, max_tasks: int = 4096,
                 max_results: int = 4096, max_batch: int = 1000,
                 start_timeout: float = 60.0, stop_timeout: float = 30.0,
                 close_timeout: float = 5.0, batch_size: int | None = None,
                 batch_timeout: float | None = None) -> None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f'client must be a distributed.Client, got {client!r}')
        if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
            raise TypeError('worker_class must be a subclass of looppool.Worker, '
                            f'got {worker_class!r}')
        for name, value in (('max_in_flight', max_in_flight), ('max_batch', max_batch)):
            _check_int(name, value)
        if pool_size is not None:
            _check_int('pool_size', pool_size)
        for name, seconds in (('timeout', timeout), ('start_timeout', start_timeout)):
            if seconds is not None and (not isinstance(seconds, (int, float))
                                        or isinstance(seconds, bool) or seconds <= 0):
                raise ValueError(f'{name} must be a positive number of seconds, '
                                 f'got {seconds!r}')
        try:
            self._class_blob = cloudpickle.dumps(worker_class)
        except Exception as exc:
            raise TypeError(f'worker_class {worker_class.__qualname__} cannot be pickled to '
                            f'send it to the cluster: {exc!r}') from exc
        self._client = client
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._timeout = timeout
        self._start_timeout = start_timeout
        self._name = f'looppool-{worker_class.__name__}-{uuid.uuid4().hex[:8]}'
        super().__init__(None, pool_size or 1, worker_class, max_tasks, max_results,
                         worker_args=worker_args, worker_kwargs=worker_kwargs,
                         stop_timeout=stop_timeout, kill_grace=close_timeout, title=False,
                         forward_logs=False, batch_size=batch_size,
                         batch_timeout=batch_timeout)
        self._sized = pool_size is not None
        if not self._sized:
            self.pool_size = None  # type: ignore[assignment]
            self._slots.clear()
        self._transport.resized()

    def start(self) -> asyncio.Future[None]:
        """Start creating the actors, on the running loop; returns a future that resolves
        once every actor has run ``_initialise()`` (or raises the first start error).

        Messages may be sent right away: they wait until their actor is ready.
        """
        self._start_again()
        loop = asyncio.get_running_loop()
        client = self._client
        if not getattr(client, 'asynchronous', False):
            raise RuntimeError('DaskPool needs a Client made with asynchronous=True on the '
                               'loop that uses the pool (a synchronous Client runs its own '
                               'loop in another thread)')
        if client.status not in ('running', 'connecting', 'newly-created'):
            raise RuntimeError(f'the Dask client is {client.status}; start it first '
                               '(async with Client(..., asynchronous=True))')
        if getattr(client.loop, 'asyncio_loop', client.loop) is not loop:
            raise RuntimeError('the Dask client runs on another loop than the one starting '
                               'the pool; create both on the same loop')
        self._begin(loop)
        if self._sized:
            self._spawn_all()
        else:
            self._sizing = loop.create_task(self._size_and_start())
        ready = self._supervisor._ready
        assert ready is not None
        return ready

    async def _size_and_start(self) -> None:
        """``pool_size=None``: one actor per Dask worker running now (waiting for one)."""
        transport = self._transport
        try:
            workers = await transport._live_workers()
            while not workers and self._supervisor._state is RUNNING:
                await transport._wait_for_a_worker()
                workers = await transport._live_workers()
        except Exception as exc:
            ready = self._supervisor._ready
            if ready is not None and not ready.done():
                ready.set_exception(exc)
                ready.exception()
            return
        if self._supervisor._state is not RUNNING:
            return
        size = len(workers)
        self.pool_size = size
        self._share = max(1, self._max_tasks // size)
        self._result_share = max(1, self._max_results // size)
        self._slots.extend(_Slot(number) for number in range(size))
        for part in (self._supervisor, self._dispatcher, self._inflight, self._receiver,
                     self._transport):
            part.resized()
        self._sized = True
        self._spawn_all()

    def stop(self, timeout: float | None = None) -> asyncio.Future[None]:
        """Stop the pool; await what it returns.

        New messages are refused with :class:`~looppool.PoolClosed` from now on. Accepted
        messages finish and their results reach ``process_message``; then each actor runs
        ``_finalise()`` and ``join()`` and is released (Dask deletes it). After ``timeout``
        seconds (default: ``stop_timeout``) what has not been sent fails with
        ``PoolClosed``, the actors cancel what still runs (those tasks fail with
        ``PoolClosed``), and actors that have not closed ``close_timeout`` seconds later
        are given up (what they still ran fails with :class:`~looppool.WorkerLost`). The
        client stays open. Calling it again waits for the same stop.
        """
        stopping = self._supervisor.stop(timeout)
        return asyncio.ensure_future(self._settle(stopping))

    async def _settle(self, stopping: asyncio.Future[None]) -> None:
        await stopping
        sizing = getattr(self, '_sizing', None)
        if sizing is not None and not sizing.done():
            sizing.cancel()
        await self._transport.settle(self._options['kill_grace'])

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> asyncio.Future[Any]:
        """As :meth:`looppool.Pool.submit`; ``timeout`` defaults to the pool's. A message
        that reached an actor whose Dask worker is lost fails with
        :class:`~looppool.WorkerLost`."""
        if worker_num is not None and not self._sized:
            raise RuntimeError('the pool does not know its size yet; await pool.start() '
                               '(or use async with) before choosing a worker_num')
        return super().submit(message, worker_num=worker_num,
                              timeout=self._timeout if timeout is None else timeout)

    def broadcast(self, message: Any, *, timeout: float | None = None,
                  sticky: bool | str = False) -> asyncio.Future[list[Any]]:
        """As :meth:`looppool.Pool.broadcast`: to every actor, replayed to re-created ones
        with ``sticky``."""
        if not self._sized and self._supervisor._state is RUNNING:
            raise RuntimeError('the pool does not know its size yet; await pool.start() '
                               '(or use async with) before broadcasting')
        return super().broadcast(message, timeout=timeout, sticky=sticky)

    def put(self, message: Any, worker_num: int | None = None) -> asyncio.Future[None]:
        """As :meth:`looppool.Pool.put`; the wait for room is bounded by the pool's
        ``timeout``."""
        future = super().put(message, worker_num)
        if self._timeout is not None and not future.done():
            timer = self._loop.call_later(self._timeout, _expire_put, future, self._timeout)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    def stats(self) -> dict[str, Any]:
        """As :meth:`looppool.Pool.stats`, with each actor's Dask worker and the calls."""
        stats = super().stats()
        for entry, slot in zip(stats['workers'], self._slots):
            pipe = _pipe(slot.link) if slot.link is not None else None
            entry['address'] = pipe.address if pipe else None
            entry['hostname'] = pipe.hostname if pipe else None
            entry['calls'] = pipe.calls if pipe else 0
        stats['calls'] = self._transport.counted_calls
        stats['calls_in_flight'] = self._transport.calls
        return stats

    def _config(self, number: int) -> protocol.WorkerConfig:
        """What the actor of worker ``number`` is made with."""
        assert self.pool_size is not None
        batch_size, batch_timeout = self._batch_config()
        return protocol.WorkerConfig(
            number=number, pool_size=self.pool_size, result_credit=self._result_share,
            start_method='dask', title=None, close_fds=(), log_level=logging.NOTSET,
            forward_logs=False, cancel_grace=self._options['cancel_grace'],
            batch_replies=True, worker_arguments=self._worker_arguments,
            batch_size=batch_size, batch_timeout=batch_timeout)


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f'{name} must be an int, got {value!r}')
    if value < 1:
        raise ValueError(f'{name} must be at least 1, got {value}')


def _expire_put(future: asyncio.Future[None], timeout: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(
            f'put() found no room for the message within {timeout} s'))

