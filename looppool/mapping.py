"""``Pool.map``: every message of an iterable to the workers, the replies in order.

The messages travel in chunks (one pickle, one frame, one future per chunk); a chunk goes
to the worker with room for it, like a ``submit()``, and its answer (MAPPED) resolves the
chunk's future with the replies and errors of its messages. Without a ``chunksize`` the
chunks follow the work: :data:`_FIRST_CHUNK` messages at first, then about
:data:`_CHUNK_SECONDS` of a worker's time at the pace seen so far.

Runs on the pool's loop, in the caller's task; not thread-safe.
"""

from __future__ import annotations

import collections
import functools
import itertools
import operator
from collections.abc import (AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable,
                             Callable, Coroutine, Generator, Iterable)
from typing import TYPE_CHECKING, Any

from . import protocol, tracing
from .errors import PoolClosed
from .link import _Link
from .protocol import dumps, dumps_shared
from .supervise import RUNNING
from .tasks import _ChunkFuture, _wake
from .worker import Worker

if TYPE_CHECKING:
    from .pool import Pool

_FIRST_CHUNK = 4
_CHUNK_SECONDS = 0.005
# Replies yielded between two looks at what the workers sent (see run).
_CATCH_UP = 1024


class MapResult:
    """What :meth:`Pool.map <looppool.Pool.map>` returns: an async iterator of the replies,
    in order, or, awaited, the list of them.

    ``async for reply in pool.map(ms)`` yields each reply as its chunk comes back;
    ``await pool.map(ms)`` returns every reply in one list, gathered a chunk at a time
    (no step of the caller's loop per reply, which for tiny messages is most of the cost)
    and raises the first handler's exception instead, the chunks still out cancelled.
    Either way, once: a second use raises :class:`RuntimeError`. ``aclose()`` ends an
    iteration left early at once, as for an async generator."""

    __slots__ = ('_iterate', '_collect', '_used', '_iterator')

    def __init__(self, iterate: Callable[[], AsyncGenerator[Any, None]],
                 collect: Callable[[], Coroutine[Any, Any, list[Any]]] | None = None) -> None:
        self._iterate = iterate
        self._collect = collect
        self._used = ''
        self._iterator: AsyncGenerator[Any, None] | None = None

    def _use(self, how: str) -> None:
        if self._used:
            raise RuntimeError(f'this map() was already {self._used}: call map() again')
        self._used = how

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._iterator is None:
            self._use('iterated')
            self._iterator = self._iterate()
        return self._iterator

    def __anext__(self) -> Awaitable[Any]:
        return self.__aiter__().__anext__()

    async def aclose(self) -> None:
        """End the iteration: the chunks still out are cancelled."""
        if self._iterator is not None:
            await self._iterator.aclose()

    def __await__(self) -> Generator[Any, None, list[Any]]:
        self._use('awaited')
        if self._collect is not None:
            return self._collect().__await__()
        return _gather(self._iterate()).__await__()


async def _gather(replies: AsyncIterator[Any]) -> list[Any]:
    return [reply async for reply in replies]


async def run(pool: Pool, messages: Iterable[Any] | AsyncIterable[Any],
              chunksize: int | None) -> AsyncGenerator[Any, None]:
    """The replies of ``messages``, in order, one by one: see :meth:`Pool.map`."""
    pieces = _pieces(pool, messages, chunksize, _CATCH_UP)
    try:
        async for piece in pieces:
            for reply in piece:
                yield reply
    finally:   # left early: the chunks still out are cancelled now, not when collected
        await pieces.aclose()


async def collect(pool: Pool, messages: Iterable[Any] | AsyncIterable[Any],
                  chunksize: int | None) -> list[Any]:
    """The replies of ``messages``, in order, in one list (``await pool.map(...)``). An
    error or a cancellation arises inside the pieces, whose own ending cancels the rest."""
    replies: list[Any] = []
    async for piece in _pieces(pool, messages, chunksize, None):
        replies.extend(piece)
    return replies


async def _pieces(pool: Pool, messages: Iterable[Any] | AsyncIterable[Any],
                  chunksize: int | None, piece: int | None
                  ) -> AsyncGenerator[list[Any], None]:
    """The replies of ``messages`` in order, in lists: a chunk's, or pieces of at most
    ``piece`` of it, between which the loop's work waiting meanwhile is taken in."""
    _check_can_map(pool)
    adapt = chunksize is None
    chunksize = _largest_chunk(pool, messages, chunksize)
    source = _Chunks(messages)
    # The chunks sent and not yet yielded, in order. The workers' shares bound those in
    # flight to max_tasks; this bounds those done and waiting for their turn to as many,
    # so a slow message at the head does not let replies pile up behind it.
    window: collections.deque[tuple[_ChunkFuture, int]] = collections.deque()
    held = 0
    limit = 2 * max(pool._max_tasks, chunksize)
    size = min(chunksize, _FIRST_CHUNK) if adapt else chunksize
    began = 0.0     # loop time of the first chunk sent
    completed = 0   # messages answered

    async def send(now: bool = False) -> None:
        # Send while a worker has room for a whole chunk (the queued submits first); with
        # ``now``, write each chunk at once, not at the end of the loop iteration.
        nonlocal held, began
        while not source.done and pool._supervisor._state is RUNNING \
                and held + size <= limit:
            if pool._dispatcher._outbox:
                pool._dispatcher._flush_outbox()
            link = None if pool._pending else pool._dispatcher._next_link(size)
            if link is None:
                break
            chunk = await source.take(size)
            if chunk:
                if not began:
                    began = pool._loop.time()
                window.append((_send_chunk(pool, link, chunk), len(chunk)))
                held += len(chunk)
                if now:
                    link.channel.flush()  # type: ignore[union-attr]

    try:
        while True:
            await send()
            # Yield what is ready at the head, in order.
            yielded = False
            while window and window[0][0].done():
                yielded = True
                head, count = window.popleft()
                held -= count
                completed += count
                replies, errors = head.result()
                if errors:
                    first = min(errors)
                    if first > 0:
                        yield replies[:first]
                    raise errors[first]
                if piece is None or count <= piece or source.done:
                    yield replies
                    continue
                # The loop runs nothing while the caller takes replies without awaiting:
                # between pieces of a long chunk, take in what the workers sent and send
                # the next chunks to those done, so that they do not wait for the end.
                for first in range(0, count, piece):
                    yield replies[first:first + piece]
                    pool._dispatcher._catch_up()
                    await send(now=True)
            if adapt and yielded:
                size = _paced(pool, began, completed, chunksize)
            if not window:
                if source.done:
                    return
                if pool._supervisor._state is not RUNNING:
                    raise PoolClosed('the pool stopped before map() sent every message')
                if yielded:
                    continue   # everything sent was yielded: send the next chunks
            await _head_or_room(pool, window[0][0] if window else None)
    finally:
        for future, _ in window:
            future.cancel()


def _check_can_map(pool: Pool) -> None:
    if pool._supervisor._state is not RUNNING:
        raise pool._not_running()
    if pool._worker_class._process_message is not Worker._process_message:
        raise TypeError(f'map() needs replies: {pool._worker_class.__qualname__} '
                        'overrides _process_message (Looppool style); give it a '
                        'handle() method')


async def _head_or_room(pool: Pool, head: _ChunkFuture | None) -> None:
    """Wait until ``head`` (the oldest chunk out, if any) is answered or a worker has room
    for another chunk."""
    waiter = pool._loop.create_future()
    pool._dispatcher._room_waiters.append(waiter)
    wake = functools.partial(_wake, waiter)
    if head is not None:
        head.add_done_callback(wake)
    try:
        await waiter
    finally:
        if head is not None:
            head.remove_done_callback(wake)


def _paced(pool: Pool, began: float, completed: int, largest: int) -> int:
    """A chunk of about _CHUNK_SECONDS of a worker's time, at the pace seen since
    ``began``: ``completed`` messages answered by the pool's workers."""
    each = (pool._loop.time() - began) * pool.pool_size / completed
    return max(1, min(largest, int(_CHUNK_SECONDS / each) if each > 0 else largest))


def _largest_chunk(pool: Pool, messages: Iterable[Any] | AsyncIterable[Any],
                   chunksize: int | None) -> int:
    """The given ``chunksize`` (checked), or the largest chunk map() makes by itself."""
    from .pool import _check_int   # (pool imports this module)
    if chunksize is not None:
        _check_int('chunksize', chunksize, 1)
        return min(chunksize, pool._share)
    largest = max(1, pool._share)
    known = operator.length_hint(messages, 0)
    if known:   # spread a short one over every worker, a few chunks each
        largest = min(largest, -(-known // (4 * pool.pool_size)))
    return largest


def _send_chunk(pool: Pool, link: _Link, chunk: list[Any]) -> _ChunkFuture:
    """Send ``chunk`` to ``link`` as one MAP frame; its future resolves to ``(replies,
    errors)``. A message that cannot be pickled fails in its place: those before it go."""
    dispatcher = pool._dispatcher
    tid = dispatcher._next_tid
    dispatcher._next_tid = tid + 1
    future = dispatcher._new_future(_ChunkFuture, tid, None, None, None)
    future._lp_count = len(chunk)
    future._lp_after = None
    if tracing.ENABLED:
        chunk = tracing.outgoing_all(chunk)
    try:
        payload = dumps_shared(chunk, pool._shared_memory)
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
        payload = dumps_shared(chunk[:index], pool._shared_memory)
    future._lp_message = payload   # kept: a chunk given back unstarted goes again
    pool._counts['submitted'] += future._lp_count
    dispatcher._send(link, (protocol.MAP, tid, payload, future))
    return future


class _Chunks:
    """Reads an iterable or an async iterable in lists of ``size``."""

    __slots__ = ('iterator', 'is_async', 'done', 'sequence', 'at')

    def __init__(self, messages: Iterable[Any] | AsyncIterable[Any]) -> None:
        # A list or a tuple is sliced (a copy of references, a third of islice's cost);
        # it is read as it goes, like any iterable: one changed meanwhile sends its state
        # at the time each chunk is taken.
        self.sequence: list[Any] | tuple[Any, ...] | None = (
            messages if type(messages) is list or type(messages) is tuple else None)
        self.at = 0
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
        if self.sequence is not None:
            at = self.at
            part = self.sequence[at:at + size]
            chunk = part if type(part) is list else list(part)
            self.at = at + len(chunk)
            if len(chunk) < size:
                self.done = True
        elif self.is_async:
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
