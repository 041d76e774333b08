"""What a user relies on in normal operation: sending, replies, order, bounds, stopping."""

from __future__ import annotations

import asyncio
import importlib.metadata
import multiprocessing.forkserver
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psutil
import pytest
from tornado import gen, ioloop

import conftest
import looppool
from conftest import run, wait_until
from workers import Classic, ClassicAsync, ClassicPlain, Echo

pytestmark = pytest.mark.timeout(60)


def _os_threads() -> int:
    """Threads of this process as the kernel sees them (C-level ones included)."""
    return len(os.listdir('/proc/self/task'))


class Threads(looppool.Worker):
    """Answers with the names of the Python threads in its process and the number of its
    threads as the kernel counts them."""

    async def handle(self, message: Any) -> tuple[list[str], int]:
        return [thread.name for thread in threading.enumerate()], _os_threads()


class Iterations(looppool.Worker):
    """Notes how many messages it was handed in each turn of its loop.

    The first message of a turn opens a group and schedules, with ``call_soon``, the
    callback that closes it: asyncio runs that callback in the next turn, after every
    callback of this one, so each group holds exactly the messages one turn started.
    ``('groups',)`` answers with the group sizes so far (itself not counted).
    """

    def _initialise(self) -> None:
        self.groups: list[int] = []
        self.open: list[Any] | None = None

    def _close(self) -> None:
        assert self.open is not None
        self.groups.append(len(self.open))
        self.open = None

    async def handle(self, message: Any) -> Any:
        if message == ('groups',):
            return self.groups
        if self.open is None:
            self.open = []
            asyncio.get_running_loop().call_soon(self._close)
        self.open.append(message)
        return message


def test_public_names() -> None:
    assert sorted(looppool.__all__) == sorted([
        'LooppoolError', 'Pool', 'PoolClosed', 'Worker', 'WorkerLost', 'WorkerStartError',
        '__version__', 'connect', 'connect_sync', 'serve', 'shared', 'task_done'])
    # Each name is the object of the module that defines it, not a stand-in.
    assert {name: getattr(looppool, name) for name in looppool.__all__} == {
        'LooppoolError': looppool.errors.LooppoolError,
        'Pool': looppool.pool.Pool,
        'PoolClosed': looppool.errors.PoolClosed,
        'Worker': looppool.worker.Worker,
        'WorkerLost': looppool.errors.WorkerLost,
        'WorkerStartError': looppool.errors.WorkerStartError,
        '__version__': looppool._version.__version__,
        'connect': looppool.remote.connect,
        'connect_sync': looppool.remote.connect_sync,
        'serve': looppool.remote.serve,
        'shared': looppool.remote.shared,
        'task_done': looppool.worker.task_done,
    }
    for name in ('PoolClosed', 'WorkerLost', 'WorkerStartError'):
        assert issubclass(getattr(looppool, name), looppool.LooppoolError), name
    assert issubclass(looppool.LooppoolError, Exception)
    # The version is the one the package was installed as.
    assert re.fullmatch(r'\d+\.\d+\.\d+(\.?(a|b|rc|dev|post)\d+)?', looppool.__version__)
    assert importlib.metadata.version('looppool') == looppool.__version__


@pytest.mark.parametrize('method', ['fork', 'forkserver', 'spawn'])
def test_submit_and_broadcast_under_each_start_method(method: str) -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, mp_context=method) as pool:
            assert await pool.submit({'a': [1, 2]}) == {'a': [1, 2]}
            replies = await pool.broadcast(('whoami',))
            assert [number for number, _ in replies] == [0, 1]
            assert len({pid for _, pid in replies}) == 2
            assert os.getpid() not in {pid for _, pid in replies}
            assert await pool.submit(('ioloop',)) in ('AsyncIOLoop', 'AsyncIOMainLoop')
        assert pool.stats()['state'] == 'stopped'

    run(main())


def test_worker_class_in_main_module_under_fork(tmp_path) -> None:
    program = tmp_path / 'main_worker.py'
    program.write_text(textwrap.dedent('''
        import asyncio, looppool

        class Doubler(looppool.Worker):
            async def handle(self, message):
                return message * 2

        async def main():
            async with looppool.Pool(pool_size=2, worker_class=Doubler,
                                     mp_context='fork') as pool:
                print(await asyncio.gather(*[pool.submit(i) for i in range(5)]))

        asyncio.run(main())
    '''))
    root = os.path.dirname(looppool.__path__[0])
    done = subprocess.run([sys.executable, '-W', 'error', str(program)], capture_output=True,
                          text=True, timeout=30, env={**os.environ, 'PYTHONPATH': root})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[0, 2, 4, 6, 8]'


def test_exception_keeps_its_type_and_carries_the_remote_traceback() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            with pytest.raises(KeyError) as caught:
                await pool.submit(('raise', KeyError('missing')))
            assert isinstance(caught.value.__cause__, looppool.errors.RemoteTraceback)
            assert 'do_raise' in str(caught.value.__cause__)
            assert 'KeyError' in str(caught.value.__cause__)
            # the worker goes on
            assert await pool.submit(1) == 1

    run(main())


def test_round_robin_is_exact_and_worker_num_targets() -> None:
    results: list[tuple[object, int]] = []

    def process_message(result, result_done) -> None:
        results.append(result[:2])
        result_done()

    async def main() -> None:
        pool = looppool.Pool(pool_size=3, worker_class=ClassicPlain)
        pool.process_message = process_message
        pool.start()
        for index in range(9):
            pool.put_nowait(index)
        pool.put_nowait('only-1', worker_num=1)
        await wait_until(lambda: len(results) == 10, what='10 results')
        await pool.stop()

    run(main())
    by_message = dict(results)
    assert [by_message[index] for index in range(9)] == [0, 1, 2] * 3
    assert by_message['only-1'] == 1


class Numbered(looppool.Worker):
    """Answers with its worker number and the message."""

    async def handle(self, message: Any) -> tuple[int, Any]:
        return self._number, message


def test_a_burst_of_submits_is_answered_in_full_and_spread_over_the_workers() -> None:
    # submit() hands a burst to the workers in bulk (several parts here), each worker
    # taking what its window holds and the rest waiting in the pool: every message is
    # answered, in its own future, and a long burst keeps every worker busy.
    async def main() -> None:
        async with looppool.Pool(pool_size=3, worker_class=Numbered,
                                 max_tasks=30000) as pool:
            for count in (1, 2, 5, 3000, 7):
                replies = await asyncio.gather(*[pool.submit(n) for n in range(count)])
                assert [message for _, message in replies] == list(range(count)), count
                if count == 3000:
                    assert {number for number, _ in replies} == {0, 1, 2}

    run(main())


def test_each_worker_gets_its_messages_in_the_order_they_were_sent_whatever_the_call() -> None:
    # submit(), submit(worker_num=...) and put_nowait() mixed in one loop iteration: the
    # messages meant for one worker (worker_num, and put_nowait()'s exact turn, Looppool
    # 0.3's promise, which submit() does not move) start there in the order the calls
    # were made; the others go to whichever worker has room, and every one runs once.
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            pool.process_message = lambda result, done: done()
            targeted: list[list[int]] = [[], []]
            notes: list[list[int]] = [[], []]
            turn = 0
            futures = []
            for n in range(60):
                how = n % 3
                if how == 0:
                    futures.append(pool.submit(('record', n)))
                elif how == 1:
                    futures.append(pool.submit(('record', n), worker_num=n % 2))
                    targeted[n % 2].append(n)
                else:
                    pool.put_nowait(('record', n))
                    notes[turn].append(n)
                    turn = 1 - turn
            await asyncio.gather(*futures)
            seen = [await pool.submit(('seen',), worker_num=number) for number in (0, 1)]
            assert sorted(seen[0] + seen[1]) == list(range(60))
            for number in (0, 1):
                own = sorted(targeted[number] + notes[number])
                assert [n for n in seen[number] if n in own] == own, number

    run(main())


def test_a_submit_cancelled_before_it_left_is_never_run() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            futures = [pool.submit(('record', n)) for n in range(10)]
            # Still in this loop iteration: nothing has gone to the worker yet, but the
            # pool counts every one, as in flight (as many as the worker's window takes)
            # or waiting.
            stats = pool.stats()
            assert stats['in_flight'] + stats['waiting'] == 10
            futures[3].cancel()
            futures[7].cancel()
            done = await asyncio.gather(*futures, return_exceptions=True)
            assert [type(d).__name__ for d in done].count('CancelledError') == 2
            assert await pool.submit(('seen',)) == [0, 1, 2, 4, 5, 6, 8, 9]
            stats = pool.stats()
            assert stats['cancelled'] == 2 and stats['in_flight'] == 0
            # The same, cancelled before the pool has even chosen their worker.
            futures = [pool.submit(('record', n)) for n in range(10, 20)]
            futures[2].cancel()
            futures[5].cancel()
            await asyncio.gather(*futures, return_exceptions=True)
            assert (await pool.submit(('seen',)))[8:] == [10, 11, 13, 14, 16, 17, 18, 19]
            assert pool.stats()['cancelled'] == 4

    run(main())


def test_messages_start_in_the_order_they_were_sent() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=8) as pool:
            # 200 messages to a worker whose share is 4: most wait in the pool.
            await asyncio.gather(*[pool.submit(('record', index), worker_num=1)
                                   for index in range(200)])
            assert await pool.submit(('seen',), worker_num=1) == list(range(200))

    run(main())


def test_put_nowait_raises_full_at_the_workers_share() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, max_tasks=4) as pool:
            pool.put_nowait(('sleep', 0.3), worker_num=0)
            pool.put_nowait(('sleep', 0.3), worker_num=0)
            with pytest.raises(queue.Full, match='worker 0'):
                pool.put_nowait(('sleep', 0.3), worker_num=0)
            pool.put_nowait(('sleep', 0.3), worker_num=1)  # the other worker has room
            # round-robin lands on worker 0 next... after worker 1 took one? the rotation
            # pointer did not move for the targeted calls: it still points at worker 0.
            with pytest.raises(queue.Full):
                pool.put_nowait(('sleep', 0.3))
            # room comes back once the tasks are done
            await wait_until(lambda: pool.stats()['workers'][0]['in_flight'] == 0,
                             what='worker 0 to finish')
            pool.put_nowait('again', worker_num=0)

    run(main())


def test_submit_waits_for_room_instead_of_exceeding_the_share() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo, max_tasks=3) as pool:
            replies = await asyncio.gather(
                *[pool.submit(('sleep', 0.02, index)) for index in range(30)])
            assert replies == list(range(30))
            assert await pool.submit(('max_concurrent',)) == 3

    run(main())


def test_put_waits_for_room() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo, max_tasks=1) as pool:
            await pool.put(('sleep', 0.2))
            waiting = pool.put(('record', 'second'))
            await asyncio.sleep(0.05)
            assert not waiting.done()           # the one slot is taken
            await asyncio.wait_for(waiting, 5)  # and it frees up
            assert await pool.submit(('seen',)) == ['second']

    run(main())


def test_max_results_bounds_results_waiting_for_result_done() -> None:
    """At most max_results results wait for result_done(); the rest wait in the worker,
    which takes no new task meanwhile; nothing is dropped."""
    pending: list = []
    received: list = []

    def process_message(result, result_done) -> None:
        received.append(result)
        pending.append(result_done)  # ingested later

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo, max_results=3,
                                 max_tasks=1) as pool:
            pool.process_message = process_message
            assert await pool.submit(('put', *range(5))) == 5   # _put_nowait never raises
            await wait_until(lambda: len(received) == 3, what='three results')
            # the worker holds two results, so its slot stays taken: no new task runs
            later = pool.submit(('record', 'later'))
            await asyncio.sleep(0.2)
            assert len(received) == 3 and not later.done()
            stats = pool.stats()
            assert stats['in_flight'] == 1 and stats['waiting'] == 1
            for done in pending[:]:
                done()
            await wait_until(lambda: len(received) == 5, what='the held results')
            for done in pending[3:]:
                done()
            await asyncio.wait_for(later, 5)
            assert received == [0, 1, 2, 3, 4]

    run(main())


def test_a_slow_process_message_slows_put_nowait_down_without_losing_results() -> None:
    """Looppool style at full speed: results come back faster than they are ingested."""
    received: list = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        all_in = loop.create_future()

        async def process_message(result, result_done) -> None:
            await asyncio.sleep(0)   # a coroutine that lets the loop turn
            received.append(result[0])
            result_done()
            if len(received) == 3000:
                all_in.set_result(None)

        async with looppool.Pool(pool_size=2, worker_class=ClassicPlain, max_tasks=64,
                                 max_results=16) as pool:
            pool.process_message = process_message
            for index in range(3000):
                try:
                    pool.put_nowait(index)
                except queue.Full:
                    await pool.put(index)
            await asyncio.wait_for(all_in, 30)
        assert sorted(received) == list(range(3000))

    run(main())


# Each Looppool 0.3 style worker, and what its _process_message returns: submit()'s reply.
@pytest.mark.parametrize('worker_class, reply', [
    (Classic, None),         # a gen.coroutine that returns nothing
    (ClassicAsync, 'y'),     # an async def that returns the message
    (ClassicPlain, None),    # a plain function that returns nothing
], ids=['gen-coroutine', 'async-def', 'plain'])
def test_looppool_styles_reply_and_put_results(worker_class: type, reply: Any) -> None:
    results: list = []

    @looppool.task_done
    def process_message(result, result_done) -> None:
        results.append(result)

    async def main() -> None:
        pool = looppool.Pool(None, 2, worker_class)
        pool.process_message = process_message
        pool.start()
        await pool.put('x')
        got = await pool.submit('y')
        assert got == reply and type(got) is type(reply)
        await pool.stop()

    run(main())
    assert sorted(r[0] for r in results) == ['x', 'y']


def test_stop_called_without_await_delivers_every_result() -> None:
    """Looppool 0.3 programs call stop() and return; the results still arrive."""
    results: list = []

    @looppool.task_done
    def process_message(result, result_done) -> None:
        results.append(result[0])

    @gen.coroutine
    def main():
        loop = ioloop.IOLoop.current()
        pool = looppool.Pool(loop, pool_size=4, worker_class=Classic)
        pool.process_message = process_message
        pool.start()
        list(map(pool.put_nowait, range(12)))
        pool.stop()

    loop = ioloop.IOLoop(make_current=False)
    try:
        loop.run_sync(main)
    finally:
        loop.close(all_fds=True)
    assert sorted(results) == list(range(12))


def test_async_stop_finishes_accepted_tasks_and_refuses_new_ones() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=2, worker_class=Echo)
        pool.start()
        futures = [pool.submit(('sleep', 0.2, index)) for index in range(6)]
        stopping = pool.stop()
        with pytest.raises(looppool.PoolClosed):
            pool.submit(1)
        with pytest.raises(looppool.PoolClosed):
            pool.put_nowait(1)
        await stopping
        assert [f.result() for f in futures] == list(range(6))
        assert pool.stats()['state'] == 'stopped'
        assert await pool.stop() is None  # idempotent

    run(main())


def test_stop_does_not_block_the_loop_when_awaited() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=Echo)
        pool.start()
        pool.submit(('sleep', 0.3))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        await pool.stop()
        task.cancel()
        assert ticks > 10

    run(main())


def test_timeout_raises_and_cancels_the_task_in_the_worker() -> None:
    results: list = []

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            pool.process_message = lambda result, done: (results.append(result), done())
            with pytest.raises(TimeoutError, match='within 0.2 s'):
                await pool.submit(('cancellable', 30), timeout=0.2)
            await wait_until(lambda: results, what='the worker to report the cancellation')
            assert results == [('cancelled', 0)]
            assert await pool.submit(1) == 1
            stats = pool.stats()
            assert stats['timed_out'] == 1 and stats['failed'] == 0

    run(main())


def test_cancelling_the_caller_cancels_the_task_in_the_worker() -> None:
    results: list = []

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            pool.process_message = lambda result, done: (results.append(result), done())
            waiter = asyncio.ensure_future(pool.submit(('cancellable', 30)))
            await asyncio.sleep(0.1)
            waiter.cancel()
            await wait_until(lambda: results, what='the worker to report the cancellation')
            assert results == [('cancelled', 0)]
            assert pool.stats()['cancelled'] == 1

    run(main())


def test_workers_ignore_sigint_and_sigterm() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            pid = await pool.submit(('pid',))
            slow = pool.submit(('sleep', 0.3, 'survived'))
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
            assert await slow == 'survived'
            assert await pool.submit(('pid',)) == pid

    run(main())


def test_defaults_current_loop_and_cpu_count() -> None:
    async def main() -> None:
        pool = looppool.Pool(worker_class=Echo)
        assert pool.pool_size == len(os.sched_getaffinity(0))
        async with pool:
            assert await pool.submit('x') == 'x'
            stats = pool.stats()
            assert stats['submitted'] == 1 and stats['completed'] == 1
            assert len(stats['workers']) == pool.pool_size
            assert all(w['alive'] and w['ready'] for w in stats['workers'])

    run(main())


def test_initialise_runs_before_the_first_message() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            # Echo.handle uses state made in _initialise; do_seen would fail without it.
            assert await pool.broadcast(('seen',)) == [[], []]

    run(main())


@pytest.mark.parametrize('kwargs, error, match', [
    ({'pool_size': 0}, ValueError, 'pool_size must be at least 1, got 0'),
    ({'pool_size': 'two'}, TypeError, 'pool_size must be an int'),
    ({'max_tasks': 0}, ValueError, 'max_tasks must be at least 1'),
    ({'worker_class': object}, TypeError, 'worker_class must be a subclass'),
    ({'mp_context': 'threads'}, ValueError, 'mp_context must be one of'),
    ({'no_such_option': 1}, TypeError, 'no_such_option'),
    ({'stop_timeout': 0}, ValueError, 'stop_timeout must be a positive'),
])
def test_bad_arguments_name_the_parameter(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        looppool.Pool(**{'pool_size': 1, 'worker_class': Echo, **kwargs})


def test_bad_call_arguments() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            with pytest.raises(ValueError, match=r'worker_num must be in 0..1, got 2'):
                pool.submit(1, worker_num=2)
            with pytest.raises(ValueError, match='worker_num'):
                pool.put_nowait(1, worker_num=-1)
            with pytest.raises(ValueError, match='timeout must be a positive'):
                pool.submit(1, timeout=0)
        with pytest.raises(RuntimeError, match='start the pool first'):
            looppool.Pool(pool_size=1, worker_class=Echo).submit(1)

    run(main())


@pytest.mark.parametrize('method', ['fork', 'spawn'])
def test_no_threads_in_the_parent_or_the_workers(method: str) -> None:
    """The IO loops read the channels themselves: no listener, feeder or helper thread
    runs on either side, under fork or spawn."""
    before = {thread.ident for thread in threading.enumerate()}
    os_before = _os_threads()

    def new_threads() -> list[str]:
        return [thread.name for thread in threading.enumerate()
                if thread.ident not in before]

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Threads, mp_context=method) as pool:
            assert new_threads() == [] and _os_threads() == os_before
            # Traffic both ways, replies included.
            replies = await asyncio.gather(*[pool.submit(index) for index in range(100)])
            assert all(reply == (['MainThread'], 1) for reply in replies), replies[:3]
            assert await pool.broadcast('threads') == [(['MainThread'], 1)] * 2
            assert new_threads() == [] and _os_threads() == os_before
        assert new_threads() == [] and _os_threads() == os_before

    run(main())


def test_submits_made_in_one_loop_iteration_reach_the_worker_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames are coalesced per loop iteration: the parent writes what one iteration
    submitted when the iteration ends, so the worker is handed it in one read and starts
    it in one turn of its own loop, however long the iteration took.

    The worker's budget per turn (5 ms) is lifted here, in the worker it forks: on a loaded
    machine a worker preempted in the middle of a read overruns it and starts the rest in
    later turns, which is the budget's job, not a sign that frames were not coalesced.

    The caller below spends 0.2 s of one iteration submitting 20 messages. Were each
    submit written at once, the idle worker would read and start them one or a few at a
    time as they came (it waits in its selector the whole time); coalesced, it gets the
    first alone (a submit to an idle worker goes at once, for latency) and the others in
    as few pieces as its window allows: a full window's worth in one piece (the rest of
    the burst waits in the pool until the worker has read that).
    """
    monkeypatch.setattr(looppool.runner, '_BUDGET', 60.0)
    monkeypatch.setattr(looppool.inbox, '_BUDGET', 60.0)

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Iterations,
                                 mp_context='fork') as pool:
            assert await pool.submit('warm-up') == 'warm-up'
            futures = []
            for index in range(20):
                futures.append(pool.submit(index))
                # Holds this loop iteration open on purpose (this is no wait for a
                # condition): the worker has ample time to read anything written so far.
                time.sleep(0.01)
            assert await asyncio.gather(*futures) == list(range(20))
            groups = await pool.submit(('groups',))
        assert groups[0] == 1            # the warm-up
        burst = groups[1:]
        assert sum(burst) == 20
        window = looppool.link._FIRST_WINDOW
        assert burst[0] == 1 and burst[1] >= min(19, window - 1), burst
        assert len(burst) <= 2 + -(-19 // window), burst

    run(main())


def test_the_leak_check_sees_forkserver_workers_that_keep_the_forkservers_title() -> None:
    """conftest's leak check leaves out multiprocessing's forkserver itself, and only it:
    a worker forked by it that was never retitled carries the forkserver's command line,
    and must still count as a child."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, mp_context='forkserver',
                                 title=False) as pool:
            pids = [pid for _, pid in await pool.broadcast(('whoami',))]
            server = multiprocessing.forkserver._forkserver._forkserver_pid
            assert server is not None
            server_cmdline = psutil.Process(server).cmdline()
            for pid in pids:
                assert psutil.Process(pid).cmdline() == server_cmdline
            seen = {child.pid for child in conftest._children()}
            assert set(pids) <= seen
            assert server not in seen

    run(main())


class Reporter(looppool.Worker):
    """Answers each message, and also sends it to process_message and logs it."""

    async def handle(self, message: Any) -> Any:
        import logging
        self._put_nowait((self._number, message))
        logging.getLogger('app.reporter').warning('%d handled %d', self._number, message)
        return message


def test_a_burst_larger_than_the_bound_runs_no_application_code_inside_submit() -> None:
    # While the caller submits far more than max_tasks in one go, the pool reads replies
    # and refills the workers from inside submit(); results for process_message and log
    # records that arrive then wait for the loop, in order, and nothing is lost.
    import logging
    records: list[tuple[bool, str]] = []
    results: list[tuple[bool, tuple[int, int]]] = []
    submitting = False

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((submitting, record.getMessage()))

    handler = Collect()
    logger = logging.getLogger('app.reporter')
    logger.addHandler(handler)
    count = 20000
    try:
        async def main() -> list[Any]:
            nonlocal submitting

            def process_message(result: Any, result_done: Any) -> None:
                results.append((submitting, result))
                result_done()

            async with looppool.Pool(pool_size=2, worker_class=Reporter, max_tasks=64,
                                     max_results=64) as pool:
                pool.process_message = process_message
                submitting = True
                futures = [pool.submit(n) for n in range(count)]
                submitting = False
                # The pool read replies during the burst: some futures are done already.
                early = sum(future.done() for future in futures)
                replies = [await future for future in futures]
                await wait_until(lambda: len(results) == count and len(records) == count,
                                 what='every result and record')
            assert early > 64, early
            return replies

        replies = run(main())
    finally:
        logger.removeHandler(handler)
    assert replies == list(range(count))
    assert not [r for r in results if r[0]] and not [r for r in records if r[0]]
    handled = []
    for number in (0, 1):
        mine = [message for _, (worker, message) in results if worker == number]
        assert mine == sorted(mine) and mine, mine   # each worker's, in the order sent
        logged = [text for _, text in records if text.startswith(f'{number} ')]
        assert logged == [f'{number} handled {n}' for n in mine]
        handled += mine
    assert sorted(handled) == list(range(count))   # each message once, none lost


class PutsInTwoGoes(looppool.Worker):
    """For ('go',): sends results 1, 2, 3 at once, then 4 and 5 a little later."""

    async def handle(self, message: Any) -> Any:
        if message == ('go',):
            for n in (1, 2, 3):
                self._put_nowait(n)
            await asyncio.sleep(0.1)
            for n in (4, 5):
                self._put_nowait(n)
        return message


def test_a_burst_submitted_from_process_message_keeps_results_in_order() -> None:
    # process_message, called for the first of three results that came in one read, takes
    # its time (the next two results arrive meanwhile) and then submits a burst long enough
    # for the pool to read replies inside submit(). That read must not take in the later
    # results ahead of the two still waiting in the first read.
    seen: list[Any] = []

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=PutsInTwoGoes) as pool:
            burst: list[Any] = []

            def process_message(result: Any, result_done: Any) -> None:
                seen.append(result)
                result_done()
                if result == 1:
                    time.sleep(0.3)   # holds the loop on purpose: results 4, 5 arrive
                    burst.extend(pool.submit(n) for n in range(600))

            pool.process_message = process_message
            assert await pool.submit(('go',)) == ('go',)
            await wait_until(lambda: len(seen) == 5, what='five results')
            assert await asyncio.gather(*burst) == list(range(600))

    run(main())
    assert seen == [1, 2, 3, 4, 5]


def test_handlers_of_one_batch_do_not_see_each_others_context_variables() -> None:
    # Messages submitted together reach a worker as one batch, whose handlers start one
    # after another in the same loop callback: each must start in a context of its own, as
    # a Task would, and one that suspends keeps what it set.
    from workers import Tagger

    async def main() -> list[Any]:
        async with looppool.Pool(pool_size=1, worker_class=Tagger) as pool:
            await pool.submit(('get', None))
            messages = [('get', None), ('set', 'a'), ('get', None), ('wait', 'b'),
                        ('get', None), ('set', 'c'), ('set', 'd'), ('get', None)]
            return list(await asyncio.gather(*(pool.submit(m) for m in messages)))

    assert run(main()) == ['unset', 'unset', 'unset', ('unset', 'b'), 'unset', 'unset',
                           'unset', 'unset']
