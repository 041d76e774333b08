"""Pool.map(): replies in order, bounded reading of the input, errors in their place,
cancellation of what is still out, and the pool's bounds kept."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import looppool
from conftest import run, wait_until
from looppool.errors import RemoteTraceback
from workers import Classic, Echo, exists

pytestmark = pytest.mark.timeout(60)


async def collect(pool: looppool.Pool, messages: Any, **options: Any) -> list[Any]:
    return [reply async for reply in pool.map(messages, **options)]


async def _numbers(count: int, pause_every: int) -> AsyncIterator[int]:
    """0 to count - 1, pausing the loop for a millisecond every ``pause_every``."""
    for i in range(count):
        if i % pause_every == 0:
            await asyncio.sleep(0.001)
        yield i


async def _every_started_handler_cancelled(pool: looppool.Pool,
                                           reports: list[tuple[str, int]]) -> list[Any]:
    """Wait until every 'watched' handler that reported its start reported its
    cancellation; return the start reports. A broadcast is a barrier: each worker's reports
    of before it have arrived."""
    await pool.broadcast('barrier')
    started = [r for r in reports if r[0] == 'started']
    await wait_until(lambda: len([r for r in reports if r[0] == 'cancelled'])
                     == len(started), what='every started handler cancelled')
    return started


def test_replies_come_in_order_from_every_worker() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            # Later messages finish first inside each chunk; the order holds anyway.
            messages = [('sleep', 0.002 * (i % 7), i) for i in range(300)]
            assert await collect(pool, messages, chunksize=8) == list(range(300))
            owners = await collect(pool, [('whoami',)] * 40, chunksize=5)
            assert {number for number, _ in owners} == {0, 1}
            # A plain list of tiny messages, default chunks, and an empty input.
            assert await collect(pool, range(10_000)) == list(range(10_000))
            assert await collect(pool, []) == []
            assert pool.stats()['in_flight'] == 0

    run(main())


def test_awaiting_map_gives_every_reply_in_one_list_in_order() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            # A list and a tuple (sliced), a generator and an async iterable (read), with
            # chunks that finish out of order inside and between workers.
            messages = [('sleep', 0.002 * (i % 7), i) for i in range(300)]
            assert await pool.map(messages, chunksize=8) == list(range(300))
            assert await pool.map(tuple(range(10_000))) == list(range(10_000))
            assert await pool.map(i for i in range(5000)) == list(range(5000))
            assert await pool.map(_numbers(300, 50), chunksize=7) == list(range(300))
            assert await pool.map([]) == []
            # Longer than max_tasks (4,096): read as room frees up, like the async for.
            assert await pool.map(range(3 * 4096)) == list(range(3 * 4096))
            assert pool.stats()['in_flight'] == 0

    run(main())


def test_awaiting_map_raises_the_first_error_and_cancels_the_rest() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            reports: list[tuple[str, int]] = []
            pool.process_message = lambda result, done: (reports.append(result), done())
            messages = [1, 2, ('raise', KeyError('bad message')), 4] + [
                ('watched', 30)] * 20
            with pytest.raises(KeyError, match='bad message') as raised:
                await pool.map(messages, chunksize=2)
            assert isinstance(raised.value.__cause__, RemoteTraceback)
            # Nothing is left running 30 s in the workers.
            await wait_until(lambda: pool.stats()['in_flight'] == 0, what='in_flight 0')
            started = await _every_started_handler_cancelled(pool, reports)
            assert 1 <= len(started) <= 20
            assert pool.stats()['lost'] == 0
            assert await pool.map([5, 6]) == [5, 6]

    run(main())


def test_cancelling_an_awaited_map_cancels_what_is_out() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            reports: list[tuple[str, int]] = []
            pool.process_message = lambda result, done: (reports.append(result), done())
            waiting = asyncio.ensure_future(pool.map([('watched', 30)] * 6, chunksize=1))
            await wait_until(lambda: len(reports) >= 2, what='two handlers started')
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await wait_until(lambda: pool.stats()['in_flight'] == 0, what='in_flight 0')
            started = await _every_started_handler_cancelled(pool, reports)
            assert len(started) >= 2

    run(main())


def test_a_map_is_used_once() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            replies = pool.map([1, 2, 3])
            assert [reply async for reply in replies] == [1, 2, 3]
            with pytest.raises(RuntimeError, match='already iterated'):
                await replies
            awaited = pool.map([4])
            assert await awaited == [4]
            with pytest.raises(RuntimeError, match='already awaited'):
                async for _ in awaited:
                    pass
            # aclose() before any use is harmless; the map never ran.
            unused = pool.map([7])
            await unused.aclose()
            assert pool.stats()['submitted'] == 4

    run(main())


def test_workers_get_more_while_the_caller_takes_a_long_chunk_of_replies(tmp_path: Any
                                                                         ) -> None:
    # The caller takes replies without awaiting (the loop does not run), as a plain loop
    # over map() does: between pieces of a long chunk, map() reads what the workers sent
    # and sends those with room the next chunks, so they do not wait for the caller.
    size = 2048   # a chunk longer than the pieces between two looks
    assert size > looppool.mapping._CATCH_UP
    go, seventh = str(tmp_path / 'go'), str(tmp_path / '7')
    answered = [str(tmp_path / str(number)) for number in range(10)]
    messages: list[Any] = list(range(10 * size))
    # Four chunks go out at once, two to each worker. The third to the sixth hold their
    # places until 'go': before it, the first two free room for the fifth and sixth only.
    for number in (2, 3, 4, 5):
        messages[number * size] = ('gate', go, answered[number], number * size)
    # So the seventh can go out only once the third or the fourth is taken in.
    messages[6 * size] = ('touch', seventh, 6 * size)

    async def main() -> None:
        # A share of 4,096 messages a worker: room for two chunks each.
        async with looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=8192) as pool:
            replies = []
            async for reply in pool.map(messages, chunksize=size):
                if len(replies) == 10:
                    with open(go, 'w'):
                        pass
                    # The third and fourth chunks are answered (in this process's socket).
                    assert exists(answered[2], 30) and exists(answered[3], 30)
                elif len(replies) == size - 100:
                    # Still in the first chunk's replies, and no await since it came.
                    assert exists(seventh, 30), 'the seventh chunk was not sent'
                replies.append(reply)
            assert replies == list(range(10 * size))

    run(main())


def test_an_async_iterable_is_read_as_room_frees_up() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            assert await collect(pool, _numbers(50, 10), chunksize=4) == list(range(50))

    run(main())


def test_the_input_is_read_lazily_and_in_flight_stays_within_max_tasks() -> None:
    read = 0

    def messages() -> Iterator[Any]:
        nonlocal read
        for i in range(200):
            read += 1
            yield ('sleep', 0.05, i)

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=16) as pool:
            replies = pool.map(messages(), chunksize=4)
            first = await replies.__anext__()
            assert first == 0
            # At most max_tasks in flight and as many answered, waiting their turn: the
            # rest of the input has not been read.
            assert read <= 2 * 16
            peak = 0
            rest = []
            async for reply in replies:
                peak = max(peak, pool.stats()['in_flight'])
                rest.append(reply)
            assert [first] + rest == list(range(200))
            assert 0 < peak <= 16
            concurrent = await pool.broadcast(('max_concurrent',))
            assert max(concurrent) <= 8   # each worker's share of max_tasks

    run(main())


def test_a_slow_first_message_does_not_let_replies_pile_up() -> None:
    read = 0

    def messages() -> Iterator[Any]:
        nonlocal read
        for i in range(1000):
            read += 1
            yield ('sleep', 0.5, i) if i == 0 else i

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=16) as pool:
            replies: list[Any] = []

            async def consume() -> None:
                async for reply in pool.map(messages(), chunksize=4):
                    replies.append(reply)

            consumer = asyncio.ensure_future(consume())
            await asyncio.sleep(0.3)
            # The others were answered long ago, but only a window of them was sent.
            assert replies == [] and read <= 2 * 16
            await consumer
            assert replies == list(range(1000))

    run(main())


def test_a_handler_error_is_raised_in_its_place_and_the_rest_is_cancelled() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            messages = [1, 2, ('raise', KeyError('bad message')), 4] + [
                ('watched', 30)] * 20
            got = []
            reports: list[tuple[str, int]] = []
            pool.process_message = lambda result, done: (reports.append(result), done())
            with pytest.raises(KeyError, match='bad message') as raised:
                async for reply in pool.map(messages, chunksize=2):
                    got.append(reply)
            assert got == [1, 2]
            assert isinstance(raised.value.__cause__, RemoteTraceback)
            assert 'do_raise' in str(raised.value.__cause__)
            # The chunks still out were cancelled in the workers, not left to run 30 s:
            # every handler that started was cancelled (how many were sent by then
            # depends on the workers' windows).
            await wait_until(lambda: pool.stats()['in_flight'] == 0, what='in_flight 0')
            started = await _every_started_handler_cancelled(pool, reports)
            assert 1 <= len(started) <= 20
            assert await pool.submit('still here') == 'still here'

    run(main())


def test_leaving_the_loop_early_cancels_what_is_still_out() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            reports: list[tuple[str, int]] = []
            pool.process_message = lambda result, done: (reports.append(result), done())
            replies = pool.map([0] + [('watched', 30)] * 9, chunksize=1)
            async for reply in replies:
                assert reply == 0
                break
            await replies.aclose()
            await wait_until(lambda: pool.stats()['in_flight'] == 0, what='in_flight 0')
            # Every handler that started was cancelled, not left to run 30 s. (A message
            # still unstarted when its cancel came, in the same read, never runs at all.)
            started = await _every_started_handler_cancelled(pool, reports)
            assert 1 <= len(started) <= 9
            # Every message map() took from the iterable (a worker's window may have left
            # some there) was answered or cancelled; none lost.
            stats = pool.stats()
            assert stats['lost'] == 0, stats
            assert stats['cancelled'] == stats['submitted'] - stats['completed'] >= len(started)

    run(main())


def test_a_worker_killed_during_map_raises_worker_lost_and_is_replaced() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            pids = [worker['pid'] for worker in pool.stats()['workers']]
            messages = [('sleep', 0.01, i) for i in range(20)] + [('kill_self',)] + [
                ('sleep', 0.01, i) for i in range(20)]
            with pytest.raises(looppool.WorkerLost, match=r'died with signal 9 \(SIGKILL\)'):
                await collect(pool, messages, chunksize=3)
            await wait_until(lambda: all(w['ready'] for w in pool.stats()['workers']),
                             what='the replacement')
            assert [w['pid'] for w in pool.stats()['workers']] != pids
            assert await collect(pool, range(100), chunksize=7) == list(range(100))

    run(main())


def test_a_message_that_cannot_be_pickled_fails_in_its_place() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            got = []
            with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
                async for reply in pool.map([1, 2, 3, lambda: None, 5], chunksize=10):
                    got.append(reply)
            assert got == [1, 2, 3]
            await wait_until(lambda: pool.stats()['in_flight'] == 0, what='in_flight 0')

    run(main())


class BadReply(Echo):
    async def do_bad_reply(self) -> Any:
        return lambda: None


def test_a_reply_that_cannot_be_pickled_fails_in_its_place() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=BadReply) as pool:
            got = []
            with pytest.raises(pickle.PicklingError, match='could not pickle the reply'):
                async for reply in pool.map([1, ('bad_reply',), 3], chunksize=10):
                    got.append(reply)
            assert got == [1]
            assert await collect(pool, [4, 5]) == [4, 5]

    run(main())


def test_stop_during_map_delivers_what_was_sent_then_raises_pool_closed() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=4)
        pool.start()
        got = []
        with pytest.raises(looppool.PoolClosed):
            async for reply in pool.map([('sleep', 0.05, i) for i in range(40)],
                                        chunksize=2):
                got.append(reply)
                if len(got) == 1:
                    stopping = pool.stop()
        await stopping
        # What was sent when stop() came was answered, in order: at most max_tasks=4 in
        # flight, and as many done and waiting for their turn (map()'s window), the chunk
        # being yielded among them.
        assert got == list(range(len(got))) and 1 <= len(got) <= 8
        with pytest.raises(looppool.PoolClosed):
            await collect(pool, [1])

    run(main())


def test_bad_arguments_are_refused_with_clear_errors() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            with pytest.raises(ValueError, match='chunksize must be at least 1'):
                await collect(pool, [1], chunksize=0)
            with pytest.raises(TypeError, match='chunksize must be an int'):
                await collect(pool, [1], chunksize=2.5)
            with pytest.raises(TypeError, match='iterable or an async iterable'):
                await collect(pool, 42)
        async with looppool.Pool(pool_size=1, worker_class=Classic) as pool:
            with pytest.raises(TypeError, match='give it a handle'):
                await collect(pool, [1])

    run(main())


def test_map_and_submit_share_the_workers_fairly() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=8) as pool:
            submitted = [pool.submit(('sleep', 0.01, f's{i}')) for i in range(30)]
            mapped = await collect(pool, [('sleep', 0.01, i) for i in range(30)],
                                   chunksize=2)
            assert mapped == list(range(30))
            assert await asyncio.gather(*submitted) == [f's{i}' for i in range(30)]
            stats = pool.stats()
            assert stats['in_flight'] == 0 and stats['completed'] >= 60

    run(main())


class Rowed(Echo):
    """Handlers for a chunk's row of first steps: one keeps its current task, one
    suspends, one cancels the task kept, one suspends and then raises."""

    async def do_keep(self) -> str:
        self.kept = asyncio.current_task()
        return 'kept'

    async def do_cancel_kept(self) -> bool:
        assert self.kept is not None
        return self.kept.cancel()

    async def do_late_raise(self, exc: BaseException) -> None:
        await asyncio.sleep(0.01)
        raise exc


def test_each_handler_of_a_chunk_starts_in_a_context_of_its_own() -> None:
    # A chunk's handlers start one after another in one loop callback: each must see a
    # context of its own, as a Task would, and one that suspends keeps what it set.
    from workers import Tagger

    async def main() -> list[Any]:
        async with looppool.Pool(pool_size=1, worker_class=Tagger) as pool:
            messages = [('get', None), ('set', 'a'), ('get', None), ('wait', 'b'),
                        ('get', None), ('set', 'c'), ('set', 'd'), ('get', None)]
            return await collect(pool, messages, chunksize=len(messages))

    assert run(main()) == ['unset', 'unset', 'unset', ('unset', 'b'), 'unset', 'unset',
                           'unset', 'unset']


def test_a_current_task_kept_by_one_handler_is_not_the_next_ones() -> None:
    # 'keep' holds on to its current task and ends; 'sleep' suspends. Cancelling what
    # 'keep' kept must not cancel 'sleep', which started after it in the same chunk.
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Rowed) as pool:
            messages = [('keep',), ('sleep', 0.2, 'slept'), ('cancel_kept',), 4]
            replies = await collect(pool, messages, chunksize=4)
            # (cancel() returns True for a stand-in, False for an eager Task that ended.)
            assert replies[:2] == ['kept', 'slept'] and replies[3] == 4, replies

    run(main())


def test_errors_of_a_chunk_come_from_first_steps_and_from_suspended_handlers() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Rowed) as pool:
            got = []
            with pytest.raises(KeyError, match='late'):
                async for reply in pool.map([1, ('late_raise', KeyError('late')),
                                             ('raise', ValueError('early')), 4],
                                            chunksize=4):
                    got.append(reply)
            assert got == [1]
            got = []
            with pytest.raises(ValueError, match='early'):
                async for reply in pool.map([1, ('sleep', 0.01, 2),
                                             ('raise', ValueError('early')),
                                             ('late_raise', KeyError('late'))],
                                            chunksize=4):
                    got.append(reply)
            assert got == [1, 2]
            assert await collect(pool, range(10), chunksize=10) == list(range(10))

    run(main())
