"""The transport of a :class:`~looppool.dask.DaskPool`: Dask actors on a cluster.

It has the interface of :class:`looppool.processes.Processes` (see that module), so the
same supervisor starts, watches, replaces and stops actors as it does worker processes:

- **start**: the actor is placed on the live Dask worker with the fewest of this pool's
  actors (a Dask worker whose actor could not be reached is avoided for a while), created
  there, and set up (the user's Worker made, ``_initialise()`` run); then it is *ready*
  and its pipe (looppool.dask.pipe) sends what waits. A start that fails or outlasts
  ``start_timeout`` is a failed start: restarted with back-off, its error raised to the
  callers after two in a row, as for a process;
- **exit**: the actor closed when told to stop (exit code 0), or it was *lost*: a call to
  it failed, or the scheduler removed its Dask worker (its ``remove-worker`` event). A
  lost actor is an exit without code: what it may have started fails with
  :class:`~looppool.WorkerLost`, what it held unstarted runs elsewhere, and it is
  re-created under the same number;
- **kill**: the actor is given up (released: Dask deletes it).

Who owns what: the transport owns the placement (and the Dask workers to avoid), the
starts in progress, the count of actor calls and its subscription to the scheduler's
events; each actor's own state is its pipe's. Lives on the client's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import pickle
import traceback
import weakref
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..link import _Link
from ..part import Part
from .actor import _Host, host_reference
from .pipe import _Pipe

if TYPE_CHECKING:
    from . import DaskPool

log = logging.getLogger('looppool.dask')

# A Dask worker whose actor could not be reached is avoided for this long when an actor is
# placed, unless no other worker is left: the scheduler may still list it as running.
_SUSPECT_FOR = 10.0


class _Abandoned(Exception):
    """The pool gave up on an actor while it was being started."""


class _StartFailure(Exception):
    """An actor could not be started: why, and the traceback from the Dask worker if any."""

    def __init__(self, message: str, traceback_text: str = '') -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


class Actors(Part):
    """Dask actors as workers; see the module's docstring."""

    blocking = False   # stop() is awaited: nothing can be driven without the loop
    lag_check = 0.1    # a call's round trip is longer than a socket's

    pool: DaskPool

    def __init__(self, pool: DaskPool) -> None:
        super().__init__(pool)
        self.max_in_flight: int = pool._max_in_flight
        self.max_batch: int = pool._max_batch
        self.call_share = 1
        self.calls = 0            # actor calls in flight across the pool
        self.counted_calls = 0    # every call made, for stats()
        self._serials = 0
        self._starters: set[asyncio.Task[Any]] = set()
        self._suspects: dict[str, float] = {}
        self._placing: asyncio.Lock | None = None
        self._worker_joined: asyncio.Future[None] | None = None
        self._attached = False

    def resized(self) -> None:
        super().resized()
        self.call_share = max(1, self.max_in_flight // (self.pool_size or 1))

    # -- the transport interface ------------------------------------------------------------

    def start(self, link: _Link) -> None:
        loop = self.pool._loop
        link.started_at = loop.time()
        link.channel = _Pipe(self, link,  # type: ignore[assignment]
                             functools.partial(self.receiver._on_frames, link),
                             functools.partial(self.dispatcher._before_flush, link))
        task = loop.create_task(self._start(link))
        self._starters.add(task)
        task.add_done_callback(self._starters.discard)

    def reap(self, link: _Link) -> int | None:
        pipe = _pipe(link)
        pipe.close()
        if not pipe.starting:
            _release(pipe)
        # else its start is still under way and releases the actor when it ends (awaiting
        # a released Dask future could wait for ever)
        return pipe.exitcode

    def kill(self, link: _Link) -> None:
        self.ended(link, None)

    def rss(self, link: _Link) -> int | None:
        return None   # a Dask worker's memory is not one actor's

    def name(self, link: _Link) -> str:
        where = _pipe(link).address
        actor = f'an actor on Dask worker {where}' if where else 'an actor'
        return f'worker {link.number} ({actor}' + (f', pid {link.pid})' if link.pid else ')')

    def how_it_ended(self, link: _Link, exitcode: int | None) -> str:
        return 'closed' if exitcode == 0 else 'was lost'

    def likely_cause(self, link: _Link, exitcode: int | None) -> str:
        return ('likely causes: its Dask worker died (killed, out of memory, crashed) or '
                'the network between client and worker failed')

    def running(self) -> None:
        _EventRouter.attach(self.pool._client, self.pool)
        self._attached = True

    def finish(self) -> None:
        if self._attached:
            self._attached = False
            _EventRouter.detach(self.pool._client, self.pool)
        if self._worker_joined is not None and not self._worker_joined.done():
            self._worker_joined.set_result(None)   # placements waiting for a worker end

    def drive_until_stopped(self) -> None:  # pragma: no cover - blocking is False
        raise RuntimeError('a DaskPool is stopped with await pool.stop()')

    def abandon_at_exit(self) -> None:  # pragma: no cover - never in _live_pools
        pass

    async def settle(self, timeout: float) -> None:
        """After the stop: let starts and calls still under way end, then cancel them."""
        tasks = set(self._starters)
        for slot in self._slots:
            for link in (slot.link, slot.successor):
                if link is not None and link.channel is not None:
                    tasks |= _pipe(link).tasks
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
            for task in tasks:
                task.cancel()

    # -- events -----------------------------------------------------------------------------

    def ended(self, link: _Link, exitcode: int | None) -> None:
        """The actor closed (``exitcode`` 0) or is given up: the supervisor hears of it."""
        if link.exited:
            return
        pipe = _pipe(link)
        pipe.exitcode = exitcode
        if pipe.rpc is None:
            pipe.abandoned = True
        self.supervisor._on_exit(link)

    def lost(self, link: _Link, exc: BaseException) -> None:
        """A call to the actor failed: its Dask worker died or cannot be reached."""
        if link.exited:
            return
        pipe = _pipe(link)
        if pipe.address is not None:
            self._suspects[pipe.address] = self.pool._loop.time() + _SUSPECT_FOR
        link.kill_reason = _describe_failure(exc)
        self.ended(link, None)

    def call_ended(self) -> None:
        """A call came back: pipes waiting for a free call may send now."""
        if self.calls >= self.max_in_flight - 1:
            for slot in self._slots:
                link = slot.link
                if link is not None and link.channel is not None \
                        and link.channel.wants_write:
                    link.channel.schedule_flush()

    def on_cluster_event(self, message: Any) -> None:
        """An event of the scheduler's ``all`` topic (see :class:`_EventRouter`)."""
        if not isinstance(message, dict):
            return
        action = message.get('action')
        address = message.get('worker')
        if action == 'remove-worker' and address:
            self._suspects[address] = self.pool._loop.time() + _SUSPECT_FOR
            for link in self.supervisor._links():
                if _pipe(link).address != address:
                    continue
                if link.ready:
                    link.kill_reason = (f'the scheduler removed Dask worker {address} (it '
                                        'died, was retired, or stopped answering heartbeats)')
                else:
                    link.start_error = (f'its Dask worker {address} left while the actor '
                                        'was being created', '')
                self.ended(link, None)
        elif action == 'add-worker' and address:
            self._suspects.pop(address, None)
            if self._worker_joined is not None and not self._worker_joined.done():
                self._worker_joined.set_result(None)

    # -- starting an actor ------------------------------------------------------------------

    async def _start(self, link: _Link) -> None:
        pipe = _pipe(link)
        timeout = self.pool._start_timeout
        failure: _StartFailure | None = None
        pipe.starting = True
        try:
            await asyncio.wait_for(self._create(link, pipe), timeout)
        except _Abandoned:
            pass
        except _StartFailure as exc:
            failure = exc
        except asyncio.TimeoutError:
            failure = _StartFailure(
                f'it was not ready within start_timeout={timeout} s (is its Dask worker '
                'frozen, or is no Dask worker running?)')
        except asyncio.CancelledError:
            _release(pipe)
            raise
        except BaseException as exc:
            failure = _StartFailure(
                f'the actor could not be created: {_describe_failure(exc)}',
                ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        finally:
            pipe.starting = False
        if pipe.abandoned or link.exited:   # given up meanwhile: stopped, or its worker left
            _release(pipe)
            return
        if failure is not None:
            link.start_error = (str(failure), failure.traceback_text)
            self.ended(link, None)
            _release(pipe)
            return
        log.debug('worker %d is ready on Dask worker %s', link.number, pipe.address)
        pipe.connect(self._rpc(pipe.address))
        self.receiver._on_frames(link, [(protocol.READY, link.pid, b'')])

    async def _create(self, link: _Link, pipe: _Pipe) -> None:
        client = self.pool._client
        if self._placing is None:
            self._placing = asyncio.Lock()
        async with self._placing:
            address = await self._place(link, pipe)
        # Each step below is awaited to its end even when the pool gives up on this actor
        # meanwhile (a Dask connection cancelled while it is being made leaks its socket);
        # the checks between steps stop early instead.
        _check_abandoned(pipe)
        # The actor's class must be importable where it runs; a Dask worker that cannot
        # unpickle a task it was sent breaks, so ask first, with a function it surely has.
        try:
            await client.run(pickle.loads, host_reference(), workers=[address])
        except (ImportError, AttributeError) as exc:
            raise _StartFailure(
                f'looppool.dask cannot be imported on Dask worker {address} ({exc!r}); '
                'install looppool with the [dask] extra, the same version as the '
                'client\'s, in every Dask worker\'s environment') from None
        _check_abandoned(pipe)
        self._serials += 1
        pipe.key = f'{self.pool._name}-{link.number}-{self._serials}'
        future = client.submit(_Host, self.pool._class_blob, self.pool._config(link.number),
                               key=pipe.key, workers=[address], allow_other_workers=False,
                               actor=True, pure=False)
        pipe.future = future
        try:
            await future
        except RuntimeError as exc:
            if 'deserialization' in str(exc):
                raise _StartFailure(
                    'the Dask scheduler could not load the actor class '
                    'looppool.dask.actor._Host; install looppool (the same version as the '
                    f'client\'s) in the scheduler\'s environment too ({exc})') from None
            raise
        _check_abandoned(pipe)
        outcome = await pipe.execute('setup', rpc=self._rpc(address))
        if outcome[0] != 'ready':
            _, what, text = outcome
            raise _StartFailure(what, text)
        link.pid, pipe.hostname = outcome[1], outcome[2]

    async def _place(self, link: _Link, pipe: _Pipe) -> str:
        """Choose the live Dask worker with the fewest of this pool's actors."""
        while True:
            _check_abandoned(pipe)
            workers = await self._live_workers()
            now = self.pool._loop.time()
            trusted = [a for a in workers if self._suspects.get(a, 0.0) <= now]
            candidates = trusted or workers
            if candidates:
                break
            await self._wait_for_a_worker()
        load = collections.Counter(
            _pipe(other).address for other in self.supervisor._links()
            if other is not link and not other.exited and _pipe(other).address is not None)
        order = {address: index for index, address in enumerate(candidates)}
        address = min(candidates, key=lambda a: (load[a], order[a]))
        pipe.address = address
        return address

    async def _live_workers(self) -> list[str]:
        scheduler: Any = self.pool._client.scheduler
        info = await scheduler.identity(n_workers=-1)
        return [address for address, worker in info.get('workers', {}).items()
                if worker.get('status', 'running') == 'running']

    async def _wait_for_a_worker(self) -> None:
        if self._worker_joined is None or self._worker_joined.done():
            self._worker_joined = self.pool._loop.create_future()
        await asyncio.shield(self._worker_joined)

    def _rpc(self, address: Any) -> Any:
        client = self.pool._client
        # Straight to the Dask worker unless the client was told it cannot reach workers.
        if client.direct_to_workers is False:
            from distributed.actor import ProxyRPC
            return ProxyRPC(client.scheduler, address)  # type: ignore[no-untyped-call]
        return client.rpc(address)


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
            if pool is not None and pool._supervisor._state in ('running', 'stopping'):
                try:
                    pool._transport.on_cluster_event(message)
                except Exception:
                    log.exception('DaskPool could not handle a scheduler event')
        if self.previous is not None:
            return self.previous(event)
        return None


def _pipe(link: _Link) -> _Pipe:
    return link.channel  # type: ignore[return-value]


def _check_abandoned(pipe: _Pipe) -> None:
    if pipe.abandoned:
        raise _Abandoned()


def _release(pipe: _Pipe) -> None:
    future, pipe.future = pipe.future, None
    if future is not None:
        try:
            future.release()
        except Exception:  # pragma: no cover - the client is already closed
            pass


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return (f'its Dask worker could not be reached ({type(exc).__name__}: {exc}); '
                'likely causes: the Dask worker process died (killed, out of memory, '
                'crashed) or the network between client and worker failed')
    if isinstance(exc, KeyError):
        return (f'the actor is gone from its Dask worker ({exc!r}): the Dask worker was '
                'restarted or the actor was released')
    return f'{type(exc).__name__}: {exc}'
