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
import inspect
import logging
import types
from typing import TYPE_CHECKING, Any

from . import eager, protocol
from .protocol import dumps, dumps_shared, loads

if TYPE_CHECKING:
    from .runner import _Runner

log = logging.getLogger('looppool.worker')


def refuse(runner: _Runner, tid: int) -> None:
    """Answer a chunk the parent cancelled before it started: none of it runs."""
    answer(runner, tid, None, {-1: runner.encode_error(asyncio.CancelledError(), None)})


def start(runner: _Runner, tid: int, payload: Any) -> None:
    """Run a chunk of ``Pool.map``: every message's handler at once, stepped eagerly in
    order; the chunk is answered with one MAPPED frame once all have ended."""
    try:
        messages = loads(payload)
    except BaseException as exc:
        answer(runner, tid, None, {-1: runner.encode_error(
            exc, 'could not unpickle a chunk of map()')})
        return
    from .answers import _origin
    from .runner import _await   # (runner imports this module)
    replies: list[Any] = [None] * len(messages)
    errors: dict[int, bytes] = {}
    waiting: dict[int, asyncio.Future[Any]] = {}
    call = runner.call
    _origin.set(tid)
    with eager.Steps(runner.loop) as steps:
        for index, message in enumerate(messages):
            try:
                result = call(message)
            except (SystemExit, KeyboardInterrupt):
                raise  # the handler asked the process to end: see worker_main
            except BaseException as exc:
                errors[index] = runner.encode_error(exc, None)
                continue
            if type(result) is not types.CoroutineType:
                if not inspect.isawaitable(result):
                    replies[index] = result
                    continue
                if isinstance(result, asyncio.Future):   # a place in a batch (looppool.batch)
                    waiting[index] = result
                    continue
                result = _await(result)
            state, value = steps.step(result)
            if state == eager.DONE:
                replies[index] = value
            elif state == eager.RAISED:
                errors[index] = runner.encode_error(value, None)
            else:
                waiting[index] = value
    if not waiting:
        answer(runner, tid, replies, errors)
        return
    # Started eagerly, so that it is waiting on its handlers before a CANCEL can reach
    # it: a Task cancelled before its first step would never cancel them (a CANCEL in
    # the same read as the chunk left its handlers running).
    task = eager.start(runner.loop, _finish(runner, tid, replies, errors, waiting))
    runner.running[tid] = task
    task.add_done_callback(functools.partial(_finished, runner, tid))


async def _finish(runner: _Runner, tid: int, replies: list[Any], errors: dict[int, bytes],
                     waiting: dict[int, asyncio.Future[Any]]) -> None:
    """Wait for a chunk's suspended handlers; cancelled (the caller gave up), cancel
    them all, and answer with what each one did."""
    try:
        await asyncio.wait(waiting.values())
    except asyncio.CancelledError:
        for task in waiting.values():
            task.cancel()
        if runner.batcher is not None:
            runner.batcher.dropped()   # a batch none of whose messages is waited for
        await asyncio.wait(waiting.values())
    for index, task in waiting.items():
        if task.cancelled():
            errors[index] = runner.encode_error(asyncio.CancelledError(), None)
        elif task.exception() is not None:
            error = task.exception()
            assert error is not None
            errors[index] = runner.encode_error(error, None)
        else:
            replies[index] = task.result()
    answer(runner, tid, replies, errors)


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
