"""Faults injected on purpose, each with the exact outcome the caller gets, in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import types
from collections.abc import Awaitable, Iterator

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import looppool
from looppool.errors import RemoteTraceback
from conftest import _children, run, wait_until
from workers import Echo, FailingStart, SlowStart

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


@contextlib.contextmanager
def _frozen_clock(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Stop ``loop``'s clock: no timer (``call_later``, ``asyncio.sleep``, a timeout) comes
    due meanwhile, so only a file descriptor or ``call_soon`` can make anything happen."""
    now = loop.time()
    loop.time = lambda: now   # type: ignore[method-assign]
    try:
        yield
    finally:
        del loop.time   # type: ignore[method-assign]


async def _within(awaitable: Awaitable[object], seconds: float) -> bool:
    """Whether ``awaitable`` finished within ``seconds``, measured by a thread: the loop's
    own timers may be stopped (see :func:`_frozen_clock`)."""
    loop = asyncio.get_running_loop()
    future = asyncio.ensure_future(awaitable)
    expired = loop.create_future()

    def expire() -> None:
        if not expired.done():
            expired.set_result(None)

    watchdog = threading.Timer(seconds, loop.call_soon_threadsafe, [expire])
    watchdog.start()
    try:
        await asyncio.wait([future, expired], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watchdog.cancel()
        watchdog.join()
    if not future.done():
        future.cancel()
        return False
    return True


def test_a_dead_worker_fails_only_its_tasks_and_is_replaced() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            pids = [pid for _, pid in await pool.broadcast(('whoami',))]
            doomed = [pool.submit(('sleep', 30), worker_num=0) for _ in range(3)]
            survivors = [pool.submit(('sleep', 0.3, index), worker_num=1)
                         for index in range(3)]
            await asyncio.sleep(0.1)
            # Noticed on the process sentinel, not by a poller: with the loop's clock
            # stopped no timer can run, yet the kill must still end the doomed tasks.
            with _frozen_clock(asyncio.get_running_loop()):
                os.kill(pids[0], signal.SIGKILL)
                noticed = await _within(asyncio.gather(*doomed, return_exceptions=True), 10)
            assert noticed, ('the pool did not notice the kill while no timer could run: it '
                             'must watch the process sentinel rather than poll')
            for future in doomed:
                with pytest.raises(looppool.WorkerLost) as caught:
                    await future
                message = str(caught.value)
                assert f'worker 0 (pid {pids[0]}) died with signal 9 (SIGKILL)' in message
                assert 'out-of-memory' in message and 'replaced' in message
                assert caught.value.number == 0 and caught.value.exitcode == -9
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


def test_a_worker_killed_while_it_starts_is_reported_as_killed(tmp_path, monkeypatch
                                                                ) -> None:
    # Killed from outside inside _initialise: the error names the signal and its likely
    # causes, not an unimportable main module (which is what a silent early exit means).
    marker = tmp_path / 'starting'
    monkeypatch.setenv('LOOPPOOL_TEST_STARTING', str(marker))

    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=SlowStart, stop_timeout=2)
        pool.start()
        try:
            waiting = pool.submit('x')
            await wait_until(lambda: marker.exists() and marker.read_text().strip(),
                             what='the worker to be in _initialise')
            os.kill(int(marker.read_text().split()[0]), signal.SIGKILL)
            with pytest.raises(looppool.WorkerStartError) as caught:
                await asyncio.wait_for(waiting, 10)
        finally:
            await pool.stop()
        message = str(caught.value)
        assert 'signal 9' in message and 'before it was ready' in message, message
        assert 'out-of-memory' in message and 'main module' not in message, message

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


def test_recycling_after_max_tasks_is_planned_and_loses_nothing(caplog) -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo,
                                 max_tasks_per_worker=5) as pool:
            pids = []
            for _ in range(12):
                pids.append(await pool.submit(('pid',)))
                if len(pids) % 5 == 0:
                    # recycled after its 5th task; the replacement takes over once ready
                    await wait_until(lambda: pool.stats()['workers'][0]['pid'] != pids[-1]
                                     and pool.stats()['workers'][0]['ready'],
                                     what='the replacement to take over')
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


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class GatedStart(Echo):
    """Echo, held in ``_initialise`` until the test lets it go: it notes its pid in the
    file ``$LOOPPOOL_TEST_STARTED`` names, then takes one byte from the named pipe
    ``$LOOPPOOL_TEST_GATE`` (blocking until there is one)."""

    def _initialise(self) -> None:
        super()._initialise()
        with open(os.environ['LOOPPOOL_TEST_STARTED'], 'a') as started:
            started.write(f'{os.getpid()}\n')
        gate = os.open(os.environ['LOOPPOOL_TEST_GATE'], os.O_RDONLY)
        try:
            os.read(gate, 1)
        finally:
            os.close(gate)


@pytest.fixture
def gated_start(tmp_path, monkeypatch):
    """For GatedStart workers: yields ``(started, gate_fd)``, ``started()`` the pids of the
    workers that reached the gate, in order; a byte written to ``gate_fd`` lets one go. At
    the end a few more bytes, so that no worker is left at the gate, and the gate closed."""
    started_file, gate = tmp_path / 'started', tmp_path / 'gate'
    os.mkfifo(gate)
    monkeypatch.setenv('LOOPPOOL_TEST_STARTED', str(started_file))
    monkeypatch.setenv('LOOPPOOL_TEST_GATE', str(gate))

    def started() -> list[int]:
        return [int(line) for line in started_file.read_text().split()] \
            if started_file.exists() else []

    # Opened for writing and reading, so that neither this open nor a worker's blocks.
    gate_fd = os.open(gate, os.O_RDWR)
    try:
        yield started, gate_fd
    finally:
        os.write(gate_fd, b'xxxx')
        os.close(gate_fd)


def test_recycling_starts_the_replacement_first_so_capacity_does_not_dip(gated_start
                                                                         ) -> None:
    """A recycle must not stall the stream of work: the old worker goes on taking tasks
    until its replacement is ready. Here the replacement is held in ``_initialise`` until
    the test lets it go; meanwhile every task is answered, by the old worker."""
    started, gate_fd = gated_start

    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=GatedStart, max_tasks_per_worker=5)
        os.write(gate_fd, b'x')   # the first worker may start

        def pid() -> Awaitable[int]:   # a reply that does not come fails the test
            return pool.submit(('pid',), timeout=10)

        async with pool:
            try:
                first = await pid()
                for _ in range(4):   # its 5th task: it is recycled
                    assert await pid() == first
                await wait_until(lambda: len(started()) == 2,
                                 what='the replacement to start')
                replacement = started()[1]
                assert replacement != first
                # The replacement waits at the gate: the old worker takes every task, one
                # after another and many at once.
                for _ in range(10):
                    assert await pid() == first
                assert set(await asyncio.gather(*[pid() for _ in range(50)])) == {first}
                worker = pool.stats()['workers'][0]
                assert worker['pid'] == first and worker['ready']
                os.write(gate_fd, b'x')   # the replacement may get ready
                await wait_until(lambda: pool.stats()['workers'][0]['pid'] == replacement,
                                 what='the replacement to take over')
                assert await pid() == replacement
                await wait_until(lambda: not _running(first),
                                 what='the recycled worker to exit')
                stats = pool.stats()
                assert (stats['recycles'], stats['restarts'], stats['lost']) == (1, 0, 0)
                assert started() == [first, replacement]
            finally:
                os.write(gate_fd, b'xxxx')   # never leave a worker at the gate

    run(main())


def test_a_worker_that_dies_while_its_recycle_starts_counts_as_a_restart(gated_start
                                                                         ) -> None:
    """A crash during a recycle is a crash: the replacement already starting takes the
    worker's place (no third process), and the death counts in ``restarts`` (what operators
    alert on) as well as the recycle in ``recycles``."""
    started, gate_fd = gated_start

    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=GatedStart, max_tasks_per_worker=3)
        os.write(gate_fd, b'x')   # the first worker may start
        async with pool:
            try:
                first = await pool.submit(('pid',), timeout=10)
                for _ in range(2):   # its 3rd task: it is recycled
                    await pool.submit(('pid',), timeout=10)
                await wait_until(lambda: len(started()) == 2,
                                 what='the replacement to start')
                os.kill(first, signal.SIGKILL)
                await wait_until(lambda: pool.stats()['restarts'] == 1,
                                 what='the death counted as a restart')
                os.write(gate_fd, b'x')   # the replacement may get ready
                assert await pool.submit(('pid',), timeout=10) == started()[1]
                stats = pool.stats()
                assert (stats['recycles'], stats['restarts']) == (1, 1)
                assert stats['workers'][0]['restarts'] == 1
                assert len(started()) == 2   # no other process was started for it
            finally:
                os.write(gate_fd, b'xxxx')

    run(main())


def test_recycling_on_memory(caplog) -> None:
    # A forked worker starts with the parent's resident pages (more once other tests have
    # imported big packages into this process), so the limit sits above them.
    limit = psutil.Process().memory_info().rss + 100 * 2 ** 20
    pids = []

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Greedy,
                                 max_memory_per_worker=limit,
                                 memory_check_interval=0.05) as pool:
            pid = await pool.submit(('pid',))
            pids.append(pid)
            # The pool measures a fresh worker's memory once first (its baseline: above the
            # limit, recycling would be off for it); the allocation comes after that.
            link = pool._slots[0].link
            await wait_until(lambda: link.baseline_rss > 0, what='the first measurement')
            await pool.submit(('allocate', 200))
            await wait_until(lambda: pool.stats()['workers'][0]['pid'] != pid,
                             what='a recycle')
            assert await pool.submit(('pid',)) != pid
            stats = pool.stats()
            assert stats['lost'] == 0 and stats['restarts'] == 0 and stats['recycles'] == 1
            # the old process ended on its own (the STOP it was sent), not by a crash
            await wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status()
                             == psutil.STATUS_ZOMBIE, what='the recycled worker to exit')

    with caplog.at_level(logging.DEBUG):
        run(main())
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    recycled = [(level, text) for level, text in messages if 'recycled' in text]
    assert len(recycled) == 1, messages
    level, text = recycled[0]
    assert level == logging.INFO
    assert f'worker 0 (pid {pids[0]}) is being recycled (planned, not a crash)' in text
    assert 'max_memory_per_worker' in text and 'resident memory' in text
    crash_words = re.compile(r'\b(died|dies|crash|crashed|killed|lost|exited|signal)\b',
                             re.IGNORECASE)
    assert not [text for _, text in messages
                if crash_words.search(text.replace('not a crash', ''))], messages
    assert not [text for level, text in messages if level >= logging.WARNING], messages


CHAOS_KILLS = 20
CHAOS_POOL_SIZE = 4


def test_chaos_every_future_resolves_while_workers_are_killed(tmp_path, capsys) -> None:
    """Thousands of tasks while workers are SIGKILLed at random, until a fixed number of
    kills: every future ends in its reply or WorkerLost, none hangs, every kill is
    replaced, the pool is back to full strength and no child is left after stop()."""
    rng = random.Random(3)
    figures: dict[str, int] = {}
    before = {child.pid for child in _children()}

    async def main() -> None:
        futures: list[asyncio.Future] = []
        killed: set[int] = set()
        kills = 0
        pool = looppool.Pool(pool_size=CHAOS_POOL_SIZE, worker_class=Echo, max_tasks=64)
        async with pool:
            async def feed() -> None:
                # a steady stream, two chunks in flight, until the last kill is done
                chunk: list[asyncio.Future] = []
                while kills < CHAOS_KILLS:
                    previous, chunk = chunk, [
                        pool.submit(('sleep', rng.random() * 0.005, len(futures) + offset))
                        for offset in range(100)]
                    futures.extend(chunk)
                    if previous:
                        await asyncio.wait(previous)
                    else:
                        await asyncio.sleep(0)

            feeder = asyncio.ensure_future(feed())
            # Two quick deaths in a row on one slot (a worker killed within a second of its
            # start) make the pool back off on purpose, which is tested on its own; here a
            # slot's worker may die young only if the one before it lived, so every kill is
            # replaced at once and the run stays short.
            first_seen: dict[int, float] = {}
            died_young = [False] * CHAOS_POOL_SIZE
            while kills < CHAOS_KILLS:
                await asyncio.sleep(0.02 + rng.random() * 0.08)
                assert not feeder.done(), feeder
                now = time.monotonic()
                candidates = []
                for worker in pool.stats()['workers']:
                    if not (worker['alive'] and worker['ready']):
                        continue
                    age = now - first_seen.setdefault(worker['pid'], now)
                    young = age < 1.2
                    if not (young and died_young[worker['number']]):
                        candidates.append((worker, young))
                if not candidates:
                    continue
                worker, young = rng.choice(candidates)
                os.kill(worker['pid'], signal.SIGKILL)   # alive and ready, just read
                killed.add(worker['pid'])
                died_young[worker['number']] = young
                kills += 1
            await asyncio.wait_for(feeder, 30)
            done, pending = await asyncio.wait(futures, timeout=30)
            replies = [f for f in done if f.exception() is None]
            lost = [f for f in done if isinstance(f.exception(), looppool.WorkerLost)]
            for index, future in enumerate(futures):
                if future.done() and future.exception() is None:
                    assert future.result() == index
            await wait_until(lambda: pool.stats()['restarts'] == kills, timeout=10,
                             what='a replacement for every kill')
            await wait_until(lambda: all(w['alive'] and w['ready']
                                         for w in pool.stats()['workers']),
                             timeout=10, what='the pool back to full strength')
            pids = await asyncio.wait_for(pool.broadcast(('pid',)), 10)
            strength = len(set(pids) - killed)
            restarts = pool.stats()['restarts']
            lost_count = pool.stats()['lost']
        left = [c for c in _children() if c.pid not in before and c.is_running()
                and c.status() != psutil.STATUS_ZOMBIE]
        figures.update(tasks=len(futures), kills=kills, replies=len(replies),
                       WorkerLost=len(lost), hung=len(pending), children_left=len(left),
                       restarts=restarts, strength=strength, lost_stat=lost_count)

    run(main())
    line = (f"chaos: tasks={figures['tasks']} kills={figures['kills']} "
            f"replies={figures['replies']} WorkerLost={figures['WorkerLost']} "
            f"hung={figures['hung']} children_left={figures['children_left']} "
            f"restarts={figures['restarts']} "
            f"strength={figures['strength']}/{CHAOS_POOL_SIZE}")
    (tmp_path / 'chaos.txt').write_text(line + '\n')
    with capsys.disabled():
        print(f'\n{line}  ({tmp_path / "chaos.txt"})')
    assert figures['tasks'] >= 2000, line
    assert figures['kills'] == CHAOS_KILLS, line
    assert figures['hung'] == 0, line
    assert figures['replies'] + figures['WorkerLost'] == figures['tasks'], line
    assert figures['replies'] > 0 and figures['WorkerLost'] > 0, line
    assert figures['WorkerLost'] == figures['lost_stat'], line
    assert figures['restarts'] == CHAOS_KILLS, line
    assert figures['strength'] == CHAOS_POOL_SIZE, line
    assert figures['children_left'] == 0, line


class ParseError(Exception):
    """Several arguments, all kept in ``args``."""

    def __init__(self, line: int, column: int, reason: str) -> None:
        super().__init__(line, column, reason)


class QuotaExceeded(ValueError):
    """One argument in ``args``, the rest in attributes (which pickle in ``__dict__``)."""

    def __init__(self, message: str, *, used: object = None, limit: object = None) -> None:
        super().__init__(message)
        self.used = used
        self.limit = limit


class Anything(LookupError):
    """Any number of arguments of any picklable type."""


def _same(value: object) -> object:
    """A form of ``value`` that compares equal exactly when the round trip kept it: types
    matter (True is not 1), -0.0 is not 0.0, and NaN equals NaN (floats by repr)."""
    kind = type(value).__qualname__
    if isinstance(value, float):
        return kind, repr(value)
    if isinstance(value, (list, tuple)):
        return kind, tuple(_same(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return kind, frozenset(_same(item) for item in value)
    if isinstance(value, dict):
        return kind, tuple((_same(k), _same(v)) for k, v in value.items())
    if isinstance(value, BaseException):
        return kind, _same(value.args), _same(dict(sorted(vars(value).items())))
    if isinstance(value, bytearray):
        return kind, bytes(value)
    return kind, value


big_ints = (st.integers() | st.integers(min_value=-2 ** 300, max_value=2 ** 300)
            | st.sampled_from([2 ** 63, -2 ** 63 - 1, 2 ** 64 + 1, 10 ** 100]))
floats = st.floats() | st.sampled_from([math.nan, -0.0, math.inf, -math.inf])   # NaN too
hashables = st.recursive(
    st.none() | st.booleans() | big_ints | floats | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.tuples(children, children) | st.frozensets(children, max_size=3),
    max_leaves=6)
messages = st.recursive(
    hashables | st.text() | st.binary(max_size=200) | st.binary(max_size=8).map(bytearray),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(hashables, children, max_size=4) | st.sets(hashables, max_size=4)
    | st.frozensets(hashables, max_size=4),
    max_leaves=16)
exceptions = st.one_of(
    st.sampled_from([ValueError, KeyError, RuntimeError, ZeroDivisionError, ArithmeticError]
                    ).flatmap(lambda cls: st.lists(messages, max_size=3).map(
                        lambda args: cls(*args))),
    st.builds(ParseError, big_ints, big_ints, st.text(max_size=20)),
    st.builds(QuotaExceeded, st.text(max_size=20), used=messages, limit=floats),
    # OSError picks its subclass by errno (2 -> FileNotFoundError); filename is not in args
    st.builds(OSError, st.integers(0, 40), st.text(max_size=20), st.text(max_size=20)),
    st.lists(messages, max_size=4).map(lambda args: Anything(*args)),
)


def test_the_round_trip_comparison_sees_what_pickling_could_lose() -> None:
    # the helper the property test relies on: NaN is kept, types and signs are not blurred
    assert _same([math.nan, {math.nan}]) == _same(pickle.loads(pickle.dumps(
        [math.nan, {math.nan}])))
    assert _same(True) != _same(1) and _same(0.0) != _same(-0.0)
    assert _same((1, 2)) != _same([1, 2]) and _same({1}) != _same(frozenset({1}))
    assert _same(QuotaExceeded('x', used=1)) != _same(QuotaExceeded('x', used=2))


@pytest.fixture(scope='module')
def shared_pool_loop():
    loop = asyncio.new_event_loop()
    pool = looppool.Pool(loop, pool_size=2, worker_class=Echo)
    loop.run_until_complete(pool.__aenter__())
    yield loop, pool
    loop.run_until_complete(pool.stop())
    loop.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(message=messages, error=exceptions)
def test_arbitrary_messages_and_exceptions_round_trip(shared_pool_loop, message, error
                                                      ) -> None:
    loop, pool = shared_pool_loop
    # wrap in a list so that a tuple message is not taken for a command
    reply = loop.run_until_complete(asyncio.wait_for(pool.submit([message]), 10))
    assert _same(reply) == _same([message])
    with pytest.raises(type(error)) as caught:
        loop.run_until_complete(asyncio.wait_for(pool.submit(('raise', error)), 10))
    assert type(caught.value) is type(error)
    assert _same(caught.value) == _same(error)
    assert isinstance(caught.value.__cause__, RemoteTraceback)


class CrashOnReplay(Echo):
    async def do_poison(self) -> None:
        os._exit(5)


def test_a_sticky_message_that_crashes_workers_restarts_them_with_back_off(caplog) -> None:
    """Every replacement replays the poison and dies at once; the pool goes on replacing
    it, waiting twice as long each time (without back-off that was well over a hundred
    restarts in two seconds)."""
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=CrashOnReplay) as pool:
            with pytest.raises(looppool.WorkerLost):
                await pool.broadcast(('poison',), sticky=True)
            await wait_until(lambda: pool.stats()['restarts'] >= 5, timeout=30,
                             what='five restarts')
            # Each restart comes only after the back-off the previous death set; the
            # loop sees the restarts one at a time, the fifth at least 0.8 s before a sixth.
            assert pool.stats()['restarts'] == 5

    with caplog.at_level(logging.WARNING, logger='looppool'):
        run(main())
    deaths = [r for r in caplog.records if 'soon after starting' in r.getMessage()]
    found = [re.search(r'died (\d+) times in a row soon after starting; restarting it in '
                       r'([\d.]+) s', r.getMessage()) for r in deaths]
    assert len(deaths) >= 4 and all(found), [r.getMessage() for r in deaths]
    times, delays = zip(*[(int(f.group(1)), float(f.group(2))) for f in found if f])
    # The first death is replaced at once; the N-th in a row after 0.1 * 2^(N-2) s: 0.1 s,
    # 0.2 s, 0.4 s, 0.8 s ... (a worker that lived a second or more starts the count again)
    assert list(delays) == [min(0.1 * 2 ** (n - 2), 10.0) for n in times], deaths
    # No death came before the back-off set by the one before it had passed (the records'
    # clock; a slower machine only makes the gaps longer).
    for before, after, delay in zip(deaths, deaths[1:], delays):
        assert after.created - before.created >= delay - 0.01, (before.created,
                                                                after.created, delay)


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
