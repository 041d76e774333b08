"""The client's end of one Dask actor's frames: the channel of a
:class:`~looppool.dask.DaskPool` worker.

A :class:`_Pipe` has the interface of :class:`looppool.channel.Channel` that the pool's
parts use (send, flush, ...), so the dispatcher, the receiver and the supervisor treat an
actor as they treat a worker process. What is sent in one loop iteration leaves as one
``run()`` call on the actor (at most ``max_batch`` messages a call; at most a share of
``max_in_flight`` calls at once, so that a frozen Dask worker cannot hold up the others);
the frames that come back, with the answer to a call or to the ``collect()`` long poll
kept open on the actor, go to the receiver in the order the actor numbered them (see
looppool.dask.actor).

Who owns what: the pipe owns the actor's address, key and Dask future, the frames not yet
sent and the calls in flight; the transport (looppool.dask.actors) decides what a failed
call means. Lives on the client's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..protocol import dumps, loads
from .frames import Frame, Frames

if TYPE_CHECKING:
    from ..link import _Link
    from .actors import Actors


class _Pipe(Frames):
    """The client's end of one actor incarnation; see the module's docstring."""

    def __init__(self, transport: Actors, link: _Link,
                 on_frames: Callable[[list[Frame]], None],
                 before_flush: Callable[[], None]) -> None:
        # (closed, from Frames: the actor closed, or the pool gave it up)
        super().__init__(transport.pool._loop, before_flush)
        self.transport = transport
        self.link = link
        self.on_frames = on_frames
        self.address: str | None = None   # the Dask worker it is placed on
        self.hostname: str | None = None
        self.key: str | None = None
        self.future: Any = None           # the distributed.Future that keeps the actor
        self.rpc: Any = None              # set once the actor is ready: frames go out
        self.calls = 0                    # run() calls in flight
        self.batch = 0                    # the number of the next run() call
        self.next_seq = 0                 # the number of the next answer to hand on
        self.early: dict[int, list[Frame]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.abandoned = False            # given up while it was being started
        self.starting = False             # its start is under way
        self.actor_closed = False         # an answer said the actor closed
        self.exitcode: int | None = None  # 0: it closed when told to stop

    def fileno(self) -> int:
        return -1

    def flush(self) -> None:
        """Send what waits as run() calls, as far as the call limits allow; the rest goes
        when a call comes back. Before the actor is ready, everything waits."""
        self.flush_due = True
        try:
            if self.closed or self.rpc is None:
                return
            self.before_flush()
            transport = self.transport
            frames = self.frames
            while frames and self.calls < transport.call_share \
                    and transport.calls < transport.max_in_flight:
                count = 0
                cut = 0
                for kind, arg, _ in frames:
                    count += arg if kind == protocol.TASKS else 1
                    cut += 1
                    if count >= transport.max_batch:
                        break
                self._call(frames[:cut])
                del frames[:cut]
        finally:
            self.flush_due = False

    def read_ready(self) -> None:  # pragma: no cover - nothing to read: see drain
        pass

    def close(self) -> None:
        """Stop talking to the actor: its calls in flight are cancelled."""
        self.closed = True
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()

    # -- calls ------------------------------------------------------------------------------

    def connect(self, rpc: Any) -> None:
        """The actor is ready: keep a collect() open on it and send what waits."""
        self.rpc = rpc
        self._background(self._poll())
        self.flush()

    def _call(self, frames: list[Frame]) -> None:
        batch = self.batch
        self.batch = batch + 1
        self.calls += 1
        self.transport.calls += 1
        self.transport.counted_calls += 1
        self._background(self._run(batch, dumps(frames)))

    async def _run(self, batch: int, blob: bytes) -> None:
        try:
            answer = await self.execute('run', batch, blob)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.transport.lost(self.link, exc)
            return
        finally:
            self.calls -= 1
            self.transport.calls -= 1
            if not self.closed:
                self.transport.call_ended()
        self._answer(answer)

    async def _poll(self) -> None:
        """Keep one collect() open on the actor until it closes or is given up."""
        while not self.closed:
            try:
                answer = await self.execute('collect')
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self.transport.lost(self.link, exc)
                return
            self._answer(answer)

    async def execute(self, function: str, *args: Any, rpc: Any = None) -> Any:
        """Call ``function`` on the actor (through ``rpc``, before it is connected)."""
        response = await (rpc or self.rpc).actor_execute(actor=self.key, function=function,
                                                         args=list(args), kwargs={})
        if response.get('status') != 'OK':
            raise response.get('exception') or RuntimeError(f'actor call failed: {response}')
        return response['result']

    def _answer(self, answer: bytes) -> None:
        """Hand on the frames of one answer, in the order the actor numbered them."""
        if self.closed:
            return
        seq, frames, closed = loads(answer)
        if seq is not None:
            if seq != self.next_seq:
                self.early[seq] = frames
                return
            self._hand_on(frames)
            seq += 1
            while seq in self.early and not self.closed:
                self._hand_on(self.early.pop(seq))
                seq += 1
            self.next_seq = seq
        if closed:
            self.actor_closed = True
        if self.actor_closed and not self.early and not self.closed:
            self.transport.ended(self.link, 0)

    def _hand_on(self, frames: list[Frame]) -> None:
        self.handling = True
        try:
            self.on_frames(frames)
        finally:
            self.handling = False

    def _background(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
