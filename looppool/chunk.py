"""The worker's side of ``Pool.map``: a chunk's handlers started together.

A MAP frame carries a chunk of messages. Every handler of it is started at once, stepped
eagerly in order; the chunk is answered with one MAPPED frame once all have ended, with
the replies and the errors by position (see looppool.protocol). Cancelling the chunk (the
caller left its loop over map()) cancels every handler still running.

Lives in the worker process, on its loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from . import eager, protocol
from .protocol import dumps, dumps_shared, loads

if TYPE_CHECKING:
    from .batch import Batcher
    from .runner import _Runner

log = logging.getLogger('looppool.worker')


def refuse(runner: _Runner, tid: int) -> None:
    """Answer a chunk the parent cancelled before it started: none of it runs."""
    answer(runner, tid, None, {-1: runner.encode_error(asyncio.CancelledError(), None)})


def start(runner: _Runner, tid: int, payload: Any) -> None:
    """Run a chunk of ``Pool.map``: every message's handler at once, stepped eagerly in
    order (a batch worker's chunk goes to ``handle_batch``, see :func:`_batch`); the chunk
    is answered with one MAPPED frame once all have ended."""
    try:
        messages = loads(payload)
    except BaseException as exc:
        answer(runner, tid, None, {-1: runner.encode_error(
            exc, 'could not unpickle a chunk of map()')})
        return
    from .answers import _origin
    _origin.set(tid)
    if runner.batcher is not None:
        chunk = _batch(runner, runner.batcher, messages)
    else:
        replies, failed, waiting = eager.each(runner.loop, runner.call, messages)
        chunk = _Chunk(runner, replies, waiting)
        for index, error in failed.items():
            chunk.fail(index, 1, error)
    if not chunk.waiting:
        answer(runner, tid, chunk.replies, chunk.errors)
        return
    # Started eagerly, so that it is waiting on its handlers before a CANCEL can reach
    # it: a Task cancelled before its first step would never cancel them (a CANCEL in
    # the same read as the chunk left its handlers running).
    task = eager.start(runner.loop, _finish(runner, tid, chunk))
    runner.running[tid] = task
    task.add_done_callback(functools.partial(_finished, runner, tid))


class _Chunk:
    """A chunk's outcome as it forms: the replies and errors by position, and what is
    still to end: a handler's Task (or a message's future in a batch) by its position,
    or a batch worker's piece of the chunk by its first position (``pieces`` has its
    length; its result is the piece's list of replies)."""

    __slots__ = ('runner', 'replies', 'errors', 'waiting', 'pieces')

    def __init__(self, runner: _Runner, replies: list[Any],
                 waiting: dict[int, asyncio.Future[Any]]) -> None:
        self.runner = runner
        self.replies = replies
        self.errors: dict[int, bytes] = {}
        self.waiting = waiting
        self.pieces: dict[int, int] = {}

    def settle(self, index: int, future: asyncio.Future[Any]) -> None:
        """Take what the ended ``future`` at ``index`` did."""
        count = self.pieces.get(index, 1)
        if future.cancelled():
            self.fail(index, count, asyncio.CancelledError())
        elif future.exception() is not None:
            error = future.exception()
            assert error is not None
            self.fail(index, count, error)
        elif index in self.pieces:
            self.spread(index, future.result())
        else:
            self.replies[index] = future.result()

    def spread(self, first: int, values: list[Any]) -> None:
        """A piece's replies in their places; a reply that is an exception fails its
        message alone (see Worker.handle_batch)."""
        self.replies[first:first + len(values)] = values
        # The types of the replies, gathered in C: a scan in Python would cost more than
        # the rest of a tiny message's way through the worker.
        if any(issubclass(kind, Exception) for kind in set(map(type, values))):
            for offset, value in enumerate(values):
                if isinstance(value, Exception):
                    self.fail(first + offset, 1, value)

    def fail(self, first: int, count: int, error: BaseException) -> None:
        """``count`` messages from ``first`` on fail with ``error`` (encoded once)."""
        encoded = self.runner.encode_error(error, None)
        for index in range(first, first + count):
            self.replies[index] = None
            self.errors[index] = encoded


def _batch(runner: _Runner, batcher: Batcher, messages: list[Any]) -> _Chunk:
    """A batch worker's chunk, a batch's worth of messages read together: its first
    messages fill the batch forming (if one is), which is handed over now with them; the
    rest goes to ``handle_batch`` in pieces of at most ``batch_size``, each at once as a
    batch of its own. No message of a chunk waits for ``batch_timeout``."""
    chunk = _Chunk(runner, [None] * len(messages), {})
    start = 0
    if batcher.messages:
        start = min(len(messages), batcher.size - len(batcher.messages))
        futures = [batcher.add(message) for message in messages[:start]]
        batcher.hand_over()
        for index, future in enumerate(futures):
            if future.done():
                chunk.settle(index, future)
            else:
                chunk.waiting[index] = future
    size = batcher.size
    for first in range(start, len(messages), size):
        piece = messages[first:first + size] if first or size < len(messages) else messages
        state, value = batcher.start_piece(piece)
        if state == eager.DONE:
            chunk.spread(first, value)
        elif state == eager.RAISED:
            chunk.fail(first, len(piece), value)
        else:
            chunk.waiting[first] = value
            chunk.pieces[first] = len(piece)
    return chunk


async def _finish(runner: _Runner, tid: int, chunk: _Chunk) -> None:
    """Wait for what a chunk started and did not end at once; cancelled (the caller
    gave up), cancel it all, and answer with what each one did."""
    waiting = chunk.waiting
    try:
        await asyncio.wait(waiting.values())
    except asyncio.CancelledError:
        for task in waiting.values():
            task.cancel()
        if runner.batcher is not None:
            runner.batcher.dropped()   # a batch none of whose messages is waited for
        await asyncio.wait(waiting.values())
    for index, future in waiting.items():
        chunk.settle(index, future)
    answer(runner, tid, chunk.replies, chunk.errors)


def _finished(runner: _Runner, tid: int, task: asyncio.Future[Any]) -> None:
    runner.running.pop(tid, None)
    if not task.cancelled() and task.exception() is not None:  # pragma: no cover
        log.error('worker %d: a chunk of map() failed', runner.number,
                  exc_info=task.exception())
    if runner.stopping:
        runner.maybe_stop()


def answer(runner: _Runner, tid: int, replies: list[Any] | None,
                errors: dict[int, bytes]) -> None:
    """Answer a chunk: its replies and errors, and the slots it frees (none while
    results are held here: see hold_or_send)."""
    count = len(replies) if replies is not None else 0
    frees = count
    if runner.held:
        frees = 0
        runner.deferred += count
    try:
        data = dumps_shared((replies, errors), runner.shared_memory)
    except Exception:
        assert replies is not None
        for index, value in enumerate(replies):
            try:
                dumps(value)
            except Exception as exc:
                replies[index] = None
                errors[index] = runner.unpicklable(value, exc)
        data = dumps_shared((replies, errors), runner.shared_memory)
    try:
        runner.channel.send_parts(protocol.MAPPED, tid, protocol.pack([frees], data))
    except ValueError as exc:   # over the 4 GiB frame limit: every reply fails with it
        runner.channel.send_parts(protocol.MAPPED, tid, protocol.pack(
            [frees], dumps((None, {-1: runner.encode_error(exc, None)}))))
