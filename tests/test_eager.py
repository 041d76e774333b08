"""Eager starts keep what a coroutine relies on: a current task, its own context,
timeouts, task groups and cancellation, whether or not it ever suspends."""

from __future__ import annotations

import asyncio
import contextvars
import sys

import pytest

from looppool import eager

pytestmark = pytest.mark.timeout(30)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar('request_id', default='-')


def test_a_coroutine_that_never_suspends_costs_no_task() -> None:
    async def quick(x: int) -> int:
        assert asyncio.current_task() is not None
        return x * 2

    async def main() -> None:
        assert eager.step(asyncio.get_running_loop(), quick(21)) == (eager.DONE, 42)

    asyncio.run(main())


def test_exceptions_are_returned_not_raised() -> None:
    async def broken() -> None:
        raise KeyError('k')

    async def main() -> None:
        state, exc = eager.step(asyncio.get_running_loop(), broken())
        assert state == eager.RAISED and isinstance(exc, KeyError)

    asyncio.run(main())


def test_a_suspending_coroutine_continues_in_a_task_with_its_context() -> None:
    seen: list[str] = []

    async def handler(name: str) -> str:
        request_id.set(name)           # set in the first step
        await asyncio.sleep(0.01)
        seen.append(request_id.get())  # still its own after suspending
        await asyncio.sleep(0)         # a bare yield
        return name

    async def main() -> None:
        loop = asyncio.get_running_loop()
        results = [eager.step(loop, handler(name)) for name in ('a', 'b', 'c')]
        assert all(state == eager.PENDING for state, _ in results)
        assert [await task for _, task in results] == ['a', 'b', 'c']
        assert request_id.get() == '-'  # nothing leaked into the caller's context

    asyncio.run(main())
    assert seen == ['a', 'b', 'c']


@pytest.mark.skipif(sys.version_info < (3, 11), reason='asyncio.timeout and TaskGroup are 3.11+')
def test_timeout_and_task_group_work_from_the_first_line() -> None:
    async def with_timeout() -> str:
        try:
            async with asyncio.timeout(0.05):   # type: ignore[attr-defined]
                await asyncio.sleep(10)
        except TimeoutError:
            return 'timed out'
        return 'not reached'

    async def with_group() -> list[int]:
        async with asyncio.TaskGroup() as group:   # type: ignore[attr-defined]
            tasks = [group.create_task(asyncio.sleep(0.01, result=i)) for i in range(3)]
        return [t.result() for t in tasks]

    async def quick_timeout() -> str:
        async with asyncio.timeout(5):   # type: ignore[attr-defined]
            return 'fast'

    async def main() -> None:
        loop = asyncio.get_running_loop()
        state, task = eager.step(loop, with_timeout())
        assert state == eager.PENDING and await task == 'timed out'
        state, task = eager.step(loop, with_group())
        assert state == eager.PENDING and await task == [0, 1, 2]
        assert eager.step(loop, quick_timeout()) == (eager.DONE, 'fast')

    asyncio.run(main())


def test_cancelling_the_task_reaches_the_coroutine() -> None:
    events: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            events.append('cancelled')
            raise

    async def main() -> None:
        state, task = eager.step(asyncio.get_running_loop(), slow())
        assert state == eager.PENDING
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert events == ['cancelled']


def test_system_exit_propagates_as_from_a_task() -> None:
    async def leave() -> None:
        raise SystemExit(3)

    async def main() -> None:
        with pytest.raises(SystemExit):
            eager.step(asyncio.get_running_loop(), leave())

    asyncio.run(main())


def test_steps_in_a_row_keep_each_coroutine_apart() -> None:
    """Steps shares its stand-in between coroutines only while nobody holds on to it: a
    coroutine that keeps its current task keeps one of its own, and contexts never mix."""
    kept: list[object] = []
    seen: list[tuple[str, str]] = []

    async def plain(name: str) -> str:
        seen.append((name, request_id.get()))
        request_id.set(name)   # must not reach the next coroutine
        return name

    async def keeper(name: str) -> str:
        kept.append(asyncio.current_task())
        return name

    async def waiter(name: str) -> str:
        me = asyncio.current_task()
        await asyncio.sleep(0.01)
        if eager.NATIVE:   # 3.12+: an eager Task from the first step on
            assert asyncio.current_task() is me
        else:   # 3.10, 3.11: the stand-in during the first step, now the real Task
            assert asyncio.current_task() is not me
        return name

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with eager.Steps(loop) as steps:
            outcomes = [steps.step(coro) for coro in (
                plain('a'), keeper('b'), keeper('c'), plain('d'), waiter('e'), plain('f'))]
        assert asyncio.current_task() is not None   # main's own task is current again
        assert [state for state, _ in outcomes] == [eager.DONE] * 4 + [
            eager.PENDING, eager.DONE]
        assert await outcomes[4][1] == 'e'
        assert [value for _, value in outcomes[:4]] == ['a', 'b', 'c', 'd']
        assert request_id.get() == '-'

    asyncio.run(main())
    assert seen == [('a', '-'), ('d', '-'), ('f', '-')]
    # Each keeper got a stand-in no other coroutine used.
    assert len(kept) == 2 and kept[0] is not kept[1]


def test_steps_cancel_requested_during_the_first_step_reaches_the_task() -> None:
    events: list[str] = []

    async def cancelled_early() -> None:
        asyncio.current_task().cancel()   # type: ignore[union-attr]
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            events.append('cancelled')
            raise

    async def main() -> None:
        with eager.Steps(asyncio.get_running_loop()) as steps:
            state, task = steps.step(cancelled_early())
            assert steps.step(asyncio.sleep(0, result='next'))[0] == eager.PENDING
        assert state == eager.PENDING
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert events == ['cancelled']


def test_each_runs_a_row_of_handlers_and_keeps_every_promise() -> None:
    # A row as a chunk of map() brings it: handlers that return at once, raise at once,
    # set a context variable, return a plain value or another awaitable, and suspend
    # (one of them cancelled through its Task, which must reach the handler).
    reached: list[str] = []

    async def handler(message: tuple[str, object]) -> object:
        kind, value = message
        found = request_id.get()
        if kind == 'raise':
            raise KeyError(value)
        if kind == 'set':
            request_id.set(str(value))
        if kind == 'wait':
            try:
                await asyncio.sleep(float(value))  # type: ignore[arg-type]
            except asyncio.CancelledError:
                reached.append('cancelled')
                raise
            return request_id.get()
        return found

    def call(message: tuple[str, object]) -> object:
        kind, value = message
        if kind == 'plain':
            return value
        if kind == 'future':
            future = asyncio.get_running_loop().create_future()
            future.set_result(value)
            return future
        if kind == 'sync raise':
            raise ValueError(value)
        return handler(message)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        messages: list[tuple[str, object]] = [
            ('get', None), ('set', 'a'), ('get', None), ('plain', 7), ('raise', 'k'),
            ('wait', 0.01), ('sync raise', 'v'), ('future', 8), ('wait', 30), ('get', None)]
        replies, failed, pending = eager.each(loop, call, messages)
        assert replies == ['-', '-', '-', 7, None, None, None, 8, None, '-']
        assert {index: type(exc) for index, exc in failed.items()} == {4: KeyError,
                                                                      6: ValueError}
        assert sorted(pending) == [5, 8]
        assert await pending[5] == '-'
        pending[8].cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending[8]
        assert reached == ['cancelled']
        assert request_id.get() == '-'   # nothing leaked into the caller's context

    asyncio.run(main())
