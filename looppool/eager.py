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
import collections.abc
import contextvars
import inspect
import sys
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

__all__ = ['DONE', 'RAISED', 'PENDING', 'NOT_DONE', 'Steps', 'step', 'start', 'each']

DONE, RAISED, PENDING = 0, 1, 2
# What Steps.run returns for a coroutine that did not finish in its first step.
NOT_DONE: Any = object()
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
    task = context.run(loop.create_task, _Resume(coro, yielded))
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


class Steps:
    """Eager first steps of many coroutines in a row, as one loop callback runs them.

    ``with Steps(loop) as steps:`` then ``steps.step(coro)`` for each, in order; each call
    returns what :func:`step` returns and keeps its promises (a context copy per
    coroutine, a current task during the step). What :func:`step` builds per call is
    shared here: the stand-in current task is entered once and used again for the next
    coroutine unless the last one kept a reference to it (or suspended, when its Task
    takes it over), which ``sys.getrefcount`` tells for certain.

    On Python 3.12 and newer it does what :func:`step` does.
    """

    __slots__ = ('loop', 'stand_in', 'outer', 'alone', 'outcome')

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stand_in: _StandIn | None = None
        self.outer: Any = None
        self.alone = 0   # the stand-in's reference count when nothing else holds it
        self.outcome: tuple[int, Any] = (DONE, None)   # see run()

    def __enter__(self) -> Steps:
        if not NATIVE:
            loop = self.loop
            self.outer = asyncio.current_task(loop)
            if self.outer is not None:
                _leave_task(loop, self.outer)
            self._enter_new()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not NATIVE:
            _leave_task(self.loop, self.stand_in)
            self.stand_in = None
            if self.outer is not None:
                _enter_task(self.loop, self.outer)
                self.outer = None

    def _enter_new(self) -> None:
        stand_in = self.stand_in = _StandIn()
        _enter_task(self.loop, stand_in)
        del stand_in
        # This attribute, the loop's current-task entry, and getrefcount's argument.
        self.alone = sys.getrefcount(self.stand_in)

    def step(self, coro: Coroutine[Any, Any, Any]) -> tuple[int, Any]:
        """Run ``coro``'s first step; see :func:`step`."""
        value = self.run(coro)
        return (DONE, value) if value is not NOT_DONE else self.outcome

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """:meth:`step` for a loop where most coroutines finish at once: returns the
        result, or :data:`NOT_DONE` with what :meth:`step` would return in ``outcome``."""
        if NATIVE:
            state, value = step(self.loop, coro)
            if state == DONE:
                return value
            self.outcome = (state, value)
            return NOT_DONE
        return contextvars.copy_context().run(self.send_first, coro)

    def send_first(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """:meth:`run` in the current context rather than a copy of it, for a caller that
        runs many first steps in one copy (Python 3.10 and 3.11 only). The caller keeps
        the promise of a context per coroutine: it gives the next coroutine a fresh copy
        once one has changed a variable in this one (see ``runner._Runner.start_some``)."""
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            if sys.getrefcount(self.stand_in) != self.alone:
                self._replace()
            return stop.value
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if sys.getrefcount(self.stand_in) != self.alone:
                self._replace()
            self.outcome = (RAISED, exc)
            return NOT_DONE
        stand_in = self.stand_in
        assert stand_in is not None
        # Created in the current context: the Task copies it, first-step changes included.
        task = self.loop.create_task(_Resume(coro, yielded))
        stand_in.attach(task)
        self._replace()
        self.outcome = (PENDING, task)
        return NOT_DONE

    def _replace(self) -> None:
        """Someone holds the stand-in: it stays theirs; the next coroutine gets a new one."""
        _leave_task(self.loop, self.stand_in)
        self._enter_new()


def each(loop: asyncio.AbstractEventLoop, call: Callable[[Any], Any], messages: list[Any]
         ) -> tuple[list[Any], dict[int, BaseException], dict[int, asyncio.Future[Any]]]:
    """``call(message)`` for every message in order, what it returns (a coroutine, any
    awaitable, or a plain value) run eagerly as :func:`step` runs it. Returns the
    replies by position (``None`` where there was none), the errors raised by position,
    and the Tasks of those that suspended by position. ``SystemExit`` and
    ``KeyboardInterrupt`` propagate.

    Keeps :func:`step`'s promises for each: a context of its own (a copy of the current
    one), a current task during its first step. On Python 3.10 and 3.11 the handlers run
    one after another inside one coroutine (see :class:`_Row`), which saves most of a
    first step's cost: no ``StopIteration`` per handler, one context copy for a row of
    handlers that change no variable in it.
    """
    replies: list[Any] = [None] * len(messages)
    failed: dict[int, BaseException] = {}
    pending: dict[int, asyncio.Future[Any]] = {}
    with Steps(loop) as steps:
        if not NATIVE:
            _Row(steps, call, messages, replies, failed, pending).run()
            return replies, failed, pending
        for index, message in enumerate(messages):
            try:
                result = call(message)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                failed[index] = exc
                continue
            if type(result) is not types.CoroutineType:
                if not inspect.isawaitable(result):
                    replies[index] = result
                    continue
                result = _awaited(result)
            state, value = steps.step(result)
            if state == DONE:
                replies[index] = value
            elif state == RAISED:
                failed[index] = value
            else:
                pending[index] = value
    return replies, failed, pending


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class _Row:
    """:func:`each` on Python 3.10 and 3.11: the handlers run in a row by one driver
    coroutine, which awaits each in turn. A handler that returns at once hands its value
    to the driver without a ``StopIteration``; one that suspends suspends the driver,
    which then becomes that handler's Task (it returns, or raises, what the handler does,
    and a cancel reaches the handler through it), and a new driver goes on with the next
    message. The row runs in one copy of the caller's context until a handler changes a
    variable in it; the next one starts a new copy then, so each still sees a context
    of its own."""

    __slots__ = ('steps', 'call', 'messages', 'replies', 'failed', 'pending', 'position',
                 'base', 'context')

    def __init__(self, steps: Steps, call: Callable[[Any], Any], messages: list[Any],
                 replies: list[Any], failed: dict[int, BaseException],
                 pending: dict[int, asyncio.Future[Any]]) -> None:
        self.steps = steps
        self.call = call
        self.messages = messages
        self.replies = replies
        self.failed = failed
        self.pending = pending
        self.position = 0   # the next message to start
        self.base = contextvars.copy_context()
        self.context = self.base

    def run(self) -> None:
        steps = self.steps
        count = len(self.messages)
        while self.position < count:
            context = self.context = self.base.copy()
            detached = [False]
            driver = self.drive(detached)
            try:
                yielded = context.run(driver.send, None)
            except StopIteration:
                continue   # at the end, or a handler changed the context
            # The handler being awaited suspended: the driver carries on as its Task.
            detached[0] = True
            task = context.run(steps.loop.create_task, _Resume(driver, yielded))
            assert steps.stand_in is not None
            steps.stand_in.attach(task)
            steps._replace()
            self.pending[self.position - 1] = task

    async def drive(self, detached: list[bool]) -> Any:
        """Run the handlers from ``position`` on until the end, a handler that changed
        the context, or one that suspended: once ``detached``, it ends with that one."""
        call, messages, replies = self.call, self.messages, self.replies
        steps, context, base = self.steps, self.context, self.base
        coroutine, awaitable = types.CoroutineType, inspect.isawaitable
        getrefcount = sys.getrefcount
        stand_in = steps.stand_in
        alone = getrefcount(stand_in)   # (this local counts too)
        for index in range(self.position, len(messages)):
            self.position = index + 1
            try:
                result = call(messages[index])
                if type(result) is coroutine or awaitable(result):
                    result = await result
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                if detached[0]:
                    raise
                self.failed[index] = exc
            else:
                if detached[0]:
                    return result
                replies[index] = result
            if getrefcount(stand_in) != alone:
                steps._replace()   # someone keeps the stand-in: the next gets a new one
                stand_in = steps.stand_in
                alone = getrefcount(stand_in)
            if context != base:
                return None
        return None


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


class _Resume(collections.abc.Coroutine):  # type: ignore[type-arg]
    """The coroutine a Task runs to carry on one whose first step already ran.

    The Task's first ``send(None)`` gets what that step yielded (the future it waits on,
    or ``None`` for a bare yield); after that every ``send`` and ``throw`` goes straight to
    the coroutine. So a cancellation that reaches the Task before it first runs (one
    requested during the eager step) is thrown into the coroutine where it waits, exactly
    as a Task would have done.
    """

    __slots__ = ('coro', 'yielded', 'started')

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded
        self.started = False

    def send(self, value: Any) -> Any:
        if not self.started:
            self.started = True
            pending, self.yielded = self.yielded, None
            return pending
        return self.coro.send(value)

    def throw(self, *args: Any) -> Any:
        self.started = True
        self.yielded = None
        return self.coro.throw(*args)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        raise TypeError('a resumed coroutine is run by its Task only')
