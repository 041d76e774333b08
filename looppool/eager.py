"""Start a coroutine eagerly: run it up to its first suspension right away.

Most handlers in a busy pool finish without ever suspending (a lookup, a computation). An
ordinary asyncio Task costs them an object, a trip through the loop's ready queue and a
done callback; an eager start runs them to completion inside the call and costs none of
that. A coroutine that does suspend continues in a real Task.

Python 3.12 and newer have eager tasks (``asyncio.Task(..., eager_start=True)``), used as
they are. On 3.10 and 3.11 this module does the same by hand, keeping what a coroutine may
rely on during its first step:

- it runs in a copy of the current context, which the Task that continues it then uses, so
  context variables behave as in a Task;
- ``asyncio.current_task()`` returns a stand-in, so ``asyncio.timeout()`` and
  ``asyncio.TaskGroup`` work from the first line; the stand-in forwards ``cancel()``,
  ``uncancel()`` and ``cancelling()`` to the Task once it exists (and remembers a cancel
  requested before that).

The one visible difference: ``asyncio.current_task()`` is the stand-in during the first
step and the Task afterwards.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ['DONE', 'RAISED', 'PENDING', 'step', 'start']

DONE, RAISED, PENDING = 0, 1, 2
NATIVE = sys.version_info >= (3, 12)

# Any object can be a loop's current task; these record it (private, stable since 3.7).
_enter_task: Any = asyncio.tasks._enter_task
_leave_task: Any = asyncio.tasks._leave_task


def step(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
         ) -> tuple[int, Any]:
    """Run ``coro`` eagerly. Returns ``(DONE, result)``, ``(RAISED, exception)`` or
    ``(PENDING, task)``. ``SystemExit`` and ``KeyboardInterrupt`` propagate, as from a
    Task."""
    if NATIVE:
        task = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
        if not task.done():
            return PENDING, task
        if task.cancelled():
            return RAISED, asyncio.CancelledError()
        exc = task.exception()
        return (RAISED, exc) if exc is not None else (DONE, task.result())
    context = contextvars.copy_context()
    stand_in = _StandIn()
    # Called from inside a task, the stand-in takes its place for the step (as 3.12 does).
    outer = asyncio.current_task(loop)
    if outer is not None:
        _leave_task(loop, outer)
    _enter_task(loop, stand_in)
    try:
        yielded = context.run(coro.send, None)
    except StopIteration as stop:
        return DONE, stop.value
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        return RAISED, exc
    finally:
        _leave_task(loop, stand_in)
        if outer is not None:
            _enter_task(loop, outer)
    # Created inside the context: the Task copies it, first-step changes included.
    task = context.run(loop.create_task, _continue(_Resume(coro, yielded)))
    stand_in.attach(task)
    return PENDING, task


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
          ) -> asyncio.Future[Any]:
    """Like :func:`step`, but always returns a future (done when the coroutine was)."""
    state, value = step(loop, coro)
    if state == PENDING:
        future: asyncio.Future[Any] = value
        return future
    future = loop.create_future()
    if state == DONE:
        future.set_result(value)
    elif isinstance(value, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(value)
    return future


class _StandIn:
    """The current task during an eager first step, until the real Task exists."""

    __slots__ = ('task', 'cancels', 'message')

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.cancels = 0
        self.message: Any = None

    def attach(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        for _ in range(self.cancels):
            task.cancel(self.message)

    def cancel(self, msg: Any = None) -> bool:
        if self.task is not None:
            return self.task.cancel(msg)
        self.cancels += 1
        self.message = msg
        return True

    # uncancel() and cancelling() exist from Python 3.11 (asyncio.timeout, TaskGroup).
    def uncancel(self) -> int:
        if self.task is not None:
            count: int = self.task.uncancel()  # type: ignore[attr-defined]
            return count
        self.cancels = max(0, self.cancels - 1)
        return self.cancels

    def cancelling(self) -> int:
        if self.task is not None:
            count: int = self.task.cancelling()  # type: ignore[attr-defined]
            return count
        return self.cancels

    def done(self) -> bool:
        return self.task.done() if self.task is not None else False

    def __getattr__(self, name: str) -> Any:
        if name in _StandIn.__slots__ or self.task is None:
            raise AttributeError(f'{name!r} is not available during an eager first step')
        return getattr(self.task, name)


class _Resume:
    """Drives a coroutine that already ran its first step, from where it suspended."""

    __slots__ = ('coro', 'yielded')

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        pending = self.yielded   # what the first step waits on: hand it to the Task
        self.yielded = None
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:   # the Task throws cancellation in: pass it on
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _continue(resume: _Resume) -> Any:
    return await resume
