"""Faults injected on purpose, each with the exact outcome the caller gets, in bounded time."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import random
import signal
import sys
import time
import types

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import looppool
from conftest import run, wait_until
from workers import Echo, FailingStart

pytestmark = pytest.mark.timeout(90)


class Unpicklable:
    def __reduce__(self):
        raise TypeError('this object refuses to be pickled')


def _refuse_to_unpickle() -> None:
    raise ValueError('this payload cannot be rebuilt')


class UnpicklableInWorker:
    """Pickles fine, fails when the worker rebuilds it."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f'{a}-{b}')


class Greedy(Echo):
    """Replies with things that cannot cross back, and exceptions that cannot either."""

    async def do_bad_reply(self) -> object:
        return lambda: None

    async def do_bad_exception(self) -> None:
        raise NeedsTwoArgs(1, 2)

    async def do_system_exit(self, code: int) -> None:
        sys.exit(code)

    def do_sync_keyboard_interrupt(self) -> None:
        raise KeyboardInterrupt

    async def do_allocate(self, megabytes: int) -> int:
        self.ballast = bytearray(megabytes * 2 ** 20)
        return len(self.ballast)


def test_a_dead_worker_fails_only_its_tasks_and_is_replaced() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            pids = [pid for _, pid in await pool.broadcast(('whoami',))]
            doomed = [pool.submit(('sleep', 30), worker_num=0) for _ in range(3)]
            survivors = [pool.submit(('sleep', 0.3, index), worker_num=1)
                         for index in range(3)]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            os.kill(pids[0], signal.SIGKILL)
            for future in doomed:
                with pytest.raises(looppool.WorkerLost) as caught:
                    await future
                message = str(caught.value)
                assert f'worker 0 (pid {pids[0]}) died with signal 9 (SIGKILL)' in message
                assert 'out-of-memory' in message and 'replaced' in message
                assert caught.value.number == 0 and caught.value.exitcode == -9
            assert time.monotonic() - started < 2
            assert [await f for f in survivors] == [0, 1, 2]
            number, new_pid = await pool.submit(('whoami',), worker_num=0)
            assert number == 0 and new_pid != pids[0]
            assert await pool.submit(('seen',), worker_num=0) == []  # _initialise ran
            stats = pool.stats()
            assert stats['lost'] == 3 and stats['restarts'] == 1
            assert stats['workers'][0]['restarts'] == 1

    run(main())


@pytest.mark.parametrize('how, expected', [
    (('exit', 7), 'exited with code 7'),
    (('kill_self', signal.SIGSEGV), 'died with signal 11 (SIGSEGV)'),
    (('system_exit', 4), 'exited with code 4'),
    (('system_exit', None), 'exited with code 0'),
    (('sync_keyboard_interrupt',), 'exited with code 1'),
])
def test_a_handler_that_ends_its_process_is_handled(how, expected) -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Greedy) as pool:
            with pytest.raises(looppool.WorkerLost, match=expected.replace('(', r'\(')
                               .replace(')', r'\)')):
                await pool.submit(how)
            assert await pool.submit('still here') == 'still here'

    run(main())


def test_sticky_broadcast_is_replayed_to_a_replacement() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            await pool.broadcast(('record', 'table v1'), sticky=True)
            await pool.broadcast(('record', 'not sticky'))
            await pool.broadcast(('record', 'table v2'), sticky=True)
            pid = await pool.submit(('pid',), worker_num=1)
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: pool.stats()['restarts'] == 1, what='a replacement')
            # the replacement replayed the sticky broadcasts, in order, before this task
            assert await pool.submit(('seen',), worker_num=1) == ['table v1', 'table v2']
            assert await pool.submit(('seen',), worker_num=0) == [
                'table v1', 'not sticky', 'table v2']

    run(main())


def test_named_sticky_broadcasts_replace_each_other_and_replays_answer_nobody(caplog
                                                                             ) -> None:
    results: list = []

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            pool.process_message = lambda result, done: (results.append(result), done())
            await pool.broadcast(('record', 'rates v1'), sticky='rates')
            await pool.broadcast(('record', 'config'), sticky=True)
            # Echo answers a plain message with itself: replayed, that answer goes nowhere
            assert await pool.broadcast('echo me', sticky=True) == ['echo me']
            await pool.broadcast(('record', 'rates v2'), sticky='rates')
            with pytest.raises(TypeError, match='sticky must be'):
                pool.broadcast('x', sticky=3)
            pid = await pool.submit(('pid',))
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: pool.stats()['restarts'] == 1, what='a replacement')
            # one replay per name, the refreshed one last
            assert await pool.submit(('seen',)) == ['config', 'rates v2']
            assert results == []

    with caplog.at_level(logging.WARNING, logger='looppool'):
        run(main())
    assert results == []
    assert not [r for r in caplog.records if 'process_message is not set' in r.getMessage()]


def test_a_worker_that_cannot_start_reports_its_traceback_and_backs_off() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=FailingStart)
        with pytest.raises(looppool.WorkerStartError, match='cannot open the database') \
                as caught:
            async with pool:
                pass  # pragma: no cover
        assert 'Traceback' in caught.value.traceback
        assert '_initialise' in caught.value.traceback

        pool = looppool.Pool(pool_size=1, worker_class=FailingStart)
        pool.start()
        first = pool.submit('x')
        with pytest.raises(looppool.WorkerStartError, match='cannot open the database'):
            await first
        await asyncio.sleep(1.5)
        # back-off: 0.1, 0.2, 0.4, 0.8 s... at most a handful of attempts, not hundreds
        assert 1 <= pool.stats()['restarts'] <= 5
        # it keeps failing, so callers get the start-up error at once
        with pytest.raises(looppool.WorkerStartError, match='cannot open the database'):
            await asyncio.wait_for(pool.submit('y'), 1)
        await pool.stop()

    run(main())


def test_a_cpu_bound_task_that_ignores_cancellation_gets_its_worker_replaced() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, cancel_grace=0.3) as pool:
            pid = await pool.submit(('pid',), worker_num=0)
            neighbour = pool.submit(('sleep', 30), worker_num=0)
            other_worker = pool.submit(('sleep', 0.5, 'fine'), worker_num=1)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await pool.submit(('spin', 30), worker_num=0, timeout=0.2)
            with pytest.raises(looppool.WorkerLost, match='cancel_grace=0.3'):
                await neighbour
            assert time.monotonic() - started < 3
            assert await other_worker == 'fine'
            assert await pool.submit(('pid',), worker_num=0) != pid

    run(main())


def test_an_unpicklable_message_fails_in_the_caller_before_anything_is_sent() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            # submit() pickles with its loop iteration's batch: the future fails, the
            # batch-mates go through, and the worker never sees the bad message
            before, bad, after = pool.submit(1), pool.submit(Unpicklable()), pool.submit(2)
            with pytest.raises(TypeError, match='refuses to be pickled'):
                await bad
            assert (await before, await after) == (1, 2)
            with pytest.raises(TypeError, match='refuses to be pickled'):
                await pool.broadcast(Unpicklable())
            with pytest.raises(TypeError, match='refuses to be pickled'):
                pool.put_nowait(Unpicklable())   # no future: it raises right here
            stats = pool.stats()
            assert stats['in_flight'] == 0 and stats['failed'] == 2
            assert await pool.submit(3) == 3

    run(main())


def test_a_batch_the_worker_cannot_rebuild_is_resent_so_only_the_bad_message_fails(
        ) -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            futures = [pool.submit(1), pool.submit(UnpicklableInWorker()), pool.submit(3)]
            done = await asyncio.gather(*futures, return_exceptions=True)
            assert done[0] == 1 and done[2] == 3
            assert isinstance(done[1], ValueError) and 'cannot be rebuilt' in str(done[1])

    run(main())


def test_a_message_the_worker_cannot_rebuild_fails_that_task() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            with pytest.raises(ValueError, match='cannot be rebuilt') as caught:
                await pool.submit(UnpicklableInWorker())
            assert 'could not unpickle the message' in str(caught.value.__cause__)
            # a class the worker cannot import (defined after it started)
            late = types.ModuleType('late_module')
            exec('class Late:\n    pass', late.__dict__)
            late.Late.__module__ = 'late_module'
            sys.modules['late_module'] = late
            try:
                with pytest.raises(ModuleNotFoundError, match='late_module'):
                    await pool.submit(late.Late())
            finally:
                del sys.modules['late_module']
            assert await pool.submit(2) == 2

    run(main())


def test_replies_and_exceptions_that_cannot_cross_fail_only_their_task() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Greedy) as pool:
            with pytest.raises(pickle.PicklingError, match='could not pickle the reply'):
                await pool.submit(('bad_reply',))
            with pytest.raises(pickle.PicklingError, match='NeedsTwoArgs'):
                await pool.submit(('bad_exception',))
            assert await pool.submit(3) == 3
            assert pool.stats()['restarts'] == 0

    run(main())


def test_a_100_mb_message_works_and_other_tasks_go_on() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            big = os.urandom(1024) * (100 * 1024)
            small = [pool.submit(index, worker_num=1) for index in range(100)]
            reply = await pool.submit(big, worker_num=0)
            assert reply == big
            assert await asyncio.gather(*small) == list(range(100))
            assert await pool.submit('after', worker_num=0) == 'after'

    run(main())


def test_recycling_after_max_tasks_starts_the_replacement_first(caplog) -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo,
                                 max_tasks_per_worker=5) as pool:
            pids = [await pool.submit(('pid',)) for _ in range(12)]
            assert len(set(pids)) == 3
            assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [5, 5, 2]
            # in-flight work on a recycled worker completes normally
            replies = await asyncio.gather(*[pool.submit(('sleep', 0.05, index))
                                             for index in range(20)])
            assert replies == list(range(20))
            stats = pool.stats()
            assert stats['lost'] == 0 and stats['restarts'] == 0

    with caplog.at_level(logging.INFO, logger='looppool'):
        run(main())
    recycled = [r for r in caplog.records if 'recycled' in r.getMessage()]
    assert recycled and all(r.levelno == logging.INFO for r in recycled)
    assert 'planned, not a crash' in recycled[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_recycling_on_memory() -> None:
    # A forked worker starts with the parent's resident pages (more once other tests have
    # imported big packages into this process), so the limit sits above them.
    limit = psutil.Process().memory_info().rss + 100 * 2 ** 20

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Greedy,
                                 max_memory_per_worker=limit,
                                 memory_check_interval=0.05) as pool:
            pid = await pool.submit(('pid',))
            await pool.submit(('allocate', 200))
            await wait_until(lambda: pool.stats()['workers'][0]['pid'] != pid,
                             what='a recycle')
            assert await pool.submit(('pid',)) != pid
            assert pool.stats()['lost'] == 0

    run(main())


def test_chaos_every_future_resolves_while_workers_are_killed() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=64) as pool:
            futures = [pool.submit(('sleep', random.random() * 0.01, index))
                       for index in range(4000)]
            kills = 0
            rng = random.Random(7)
            while not all(f.done() for f in futures) and kills < 10:
                await asyncio.sleep(0.05 + rng.random() * 0.05)
                pids = [w['pid'] for w in pool.stats()['workers'] if w['alive']]
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
            done, pending = await asyncio.wait(futures, timeout=30)
            assert not pending, f'{len(pending)} futures hung'
            replies = [f for f in done if f.exception() is None]
            lost = [f for f in done if isinstance(f.exception(), looppool.WorkerLost)]
            assert len(replies) + len(lost) == len(futures)
            for index, future in enumerate(futures):
                if future.exception() is None:
                    assert future.result() == index
            assert kills >= 3 and lost
            # back to full strength
            replies2 = await pool.broadcast(('pid',))
            assert len(set(replies2)) == 2
            assert all(psutil.pid_exists(pid) for pid in replies2)
            print(f'chaos: tasks={len(futures)} kills={kills} replies={len(replies)} '
                  f'WorkerLost={len(lost)} hung={len(pending)}')

    run(main())


exceptions = st.sampled_from([ValueError, KeyError, RuntimeError, ZeroDivisionError,
                              LookupError, OSError, ArithmeticError]).flatmap(
    lambda cls: st.text(max_size=30).map(cls))
messages = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=20)


@pytest.fixture(scope='module')
def shared_pool_loop():
    loop = asyncio.new_event_loop()
    pool = looppool.Pool(loop, pool_size=2, worker_class=Echo)
    loop.run_until_complete(pool.__aenter__())
    yield loop, pool
    loop.run_until_complete(pool.stop())
    loop.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=messages, error=exceptions)
def test_arbitrary_messages_and_exceptions_round_trip(shared_pool_loop, message, error
                                                      ) -> None:
    loop, pool = shared_pool_loop
    # wrap in a list so that a tuple message is not taken for a command
    assert loop.run_until_complete(pool.submit([message])) == [message]
    with pytest.raises(type(error)) as caught:
        loop.run_until_complete(pool.submit(('raise', error)))
    assert caught.value.args == error.args


class CrashOnReplay(Echo):
    async def do_poison(self) -> None:
        os._exit(5)


def test_a_sticky_message_that_crashes_workers_restarts_them_with_back_off() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=CrashOnReplay) as pool:
            with pytest.raises(looppool.WorkerLost):
                await pool.broadcast(('poison',), sticky=True)
            await asyncio.sleep(2)
            # every replacement replays the poison and dies: without back-off that was
            # well over a hundred restarts in two seconds
            assert pool.stats()['restarts'] <= 8

    run(main())


def test_a_memory_limit_below_a_fresh_workers_size_warns_instead_of_looping(caplog) -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo, max_memory_per_worker=1024,
                                 memory_check_interval=0.05) as pool:
            await asyncio.sleep(0.5)
            assert pool.stats()['recycles'] == 0
            assert await pool.submit('fine') == 'fine'

    with caplog.at_level(logging.WARNING, logger='looppool'):
        run(main())
    warnings = [r for r in caplog.records if 'memory recycling is off' in r.getMessage()]
    assert len(warnings) == 1


def test_a_recycled_worker_whose_task_hangs_is_ended_at_the_stop_deadline() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo, max_tasks_per_worker=1,
                                 stop_timeout=0.5, kill_grace=0.3) as pool:
            hung = pool.submit(('spin', 60))   # the worker is recycled right after this
            started = time.monotonic()
            with pytest.raises(looppool.WorkerLost, match='recycled'):
                await asyncio.wait_for(hung, 10)
            await asyncio.sleep(1.2)   # past the quick-death window of the replacement
            patient = pool.submit(('sleep', 60))   # cancellable: told to give up, not killed
            with pytest.raises(looppool.PoolClosed, match='recycled'):
                await asyncio.wait_for(patient, 10)
            assert time.monotonic() - started < 5
            assert await pool.submit('next') == 'next'

    run(main())
