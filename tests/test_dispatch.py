"""How the parent deals work: it keeps the backlog and gives each message to the first
worker with room, so a worker that is stopped, or whose loop is held by a CPU-bound handler,
gets no new work while another has room; what such a worker holds unstarted is taken back,
and survives its death. Targeted messages, broadcasts and put_nowait() keep their worker."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import looppool
from looppool import remote
from balance_workers import Balance, RoundRobin
from conftest import run, wait_until

NEW_KEYS = ('state', 'queued', 'lag', 'in_flight', 'pid')
STATES = {'starting', 'running', 'blocked', 'stopping', 'restarting', 'stopped'}


def _worker(stats: dict[str, Any], number: int) -> dict[str, Any]:
    """``stats['workers'][number]``, checked to carry the per-worker dispatch fields."""
    worker = stats['workers'][number]
    missing = [key for key in NEW_KEYS if key not in worker]
    assert not missing, f"stats()['workers'][{number}] has no {missing}: {worker}"
    assert worker['state'] in STATES, worker
    return worker


def _state(pool: looppool.Pool, number: int) -> str:
    return str(_worker(pool.stats(), number)['state'])


async def _blocked(stats: Callable[[], Awaitable[dict[str, Any]]], number: int,
                   timeout: float = 10.0) -> dict[str, Any]:
    """Wait until worker ``number`` is marked 'blocked'; return its stats entry then."""
    deadline = time.monotonic() + timeout
    while True:
        worker = _worker(await stats(), number)
        if worker['state'] == 'blocked':
            return worker
        if time.monotonic() > deadline:
            pytest.fail(f'worker {number} not marked blocked within {timeout} s: {worker}')
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _pool_or_host(where: str, sock_path: str) -> AsyncIterator[tuple[Any, Any]]:
    """A pool of two Balance workers, in this process or behind a pool host; yields it
    and an async function returning its stats()."""
    if where == 'pool':
        async with looppool.Pool(pool_size=2, worker_class=Balance) as pool:
            async def stats() -> dict[str, Any]:
                return pool.stats()
            yield pool, stats
        return
    handle = remote.serve(Balance, sock_path, pool_size=2)
    try:
        async with remote.connect(handle.address) as client:
            yield client, client.stats
    finally:
        handle.stop()


async def _answer(future: Awaitable[Any], what: str, timeout: float = 10.0) -> Any:
    try:
        return await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        pytest.fail(f'{what} was not answered within {timeout} s')


@pytest.mark.timeout(90)
@pytest.mark.parametrize('where', ['pool', 'host'])
def test_a_stopped_worker_gets_no_new_work(where: str, sock_path: str) -> None:
    """A worker that stops reading (SIGSTOP: a debugger, a swapped-out process) is marked
    blocked, with a lag, once it leaves a message unacknowledged, and every other message,
    sent one by one or in a burst, goes to the worker that answers; what was sent to the
    stopped worker in particular waits for it. Through a pool host too."""
    async def main() -> None:
        async with _pool_or_host(where, sock_path) as (pool, stats):
            pids = await _answer(pool.broadcast(('pid',)), 'the first broadcast')
            os.kill(pids[0], signal.SIGSTOP)
            try:
                targeted = pool.submit(('pid',), worker_num=0)
                worker = await _blocked(stats, 0)
                assert worker['lag'] > 0, worker
                for index in range(40):
                    reply = await _answer(pool.submit(('pid',)), f'message {index} of 40')
                    assert reply == pids[1], f'message {index} answered by {reply}'
                burst = await _answer(asyncio.gather(*(pool.submit(('pid',))
                                                       for _ in range(40))), 'the burst')
                assert burst == [pids[1]] * 40
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[0], signal.SIGCONT)
            assert await _answer(targeted, 'the targeted message') == pids[0]

    run(main())


@pytest.mark.timeout(60)
def test_a_worker_whose_loop_is_held_gets_no_new_work() -> None:
    """A handler that holds its worker's loop (CPU-bound, no await) gets that worker marked
    blocked; IO messages arriving meanwhile, one every 10 ms, all go to the other worker
    instead of waiting behind the CPU-bound one."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Balance) as pool:
            pids = await _answer(pool.broadcast(('pid',)), 'the first broadcast')
            spinning = pool.submit(('spin', 1.5), worker_num=0)
            await wait_until(lambda: _state(pool, 0) == 'blocked', what='worker 0 blocked')
            sent = []
            for _ in range(10):
                sent.append((pool.submit(('sleep', 0.02)), not spinning.done()))
                await asyncio.sleep(0.01)   # pacing: one message every 10 ms
            replies = await _answer(asyncio.gather(*(f for f, _ in sent)), 'the messages')
            during = [reply for reply, (_, held) in zip(replies, sent) if held]
            assert during and during == [pids[1]] * len(during), replies
            assert (await _answer(spinning, 'the spin'))[0] == pids[0]

    run(main())


@pytest.mark.timeout(60)
def test_a_burst_does_not_wait_behind_a_held_loop() -> None:
    """Messages submitted in the same loop iteration as a CPU-bound one are not stuck
    behind it: the busy worker is sent no more than a fresh worker's window (it has not
    acknowledged anything yet), the rest wait in the parent and are answered by the other
    worker while the first still computes; those it was sent are taken back unstarted
    once it reads again, and answered too."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Balance) as pool:
            pids = await _answer(pool.broadcast(('pid',)), 'the first broadcast')
            order: list[str] = []
            spinning = pool.submit(('spin', 1.0), worker_num=0)
            burst = [pool.submit(('sleep', 0.01)) for _ in range(20)]
            spinning.add_done_callback(lambda _: order.append('spin'))
            for future in burst:
                future.add_done_callback(lambda _: order.append('io'))
            replies = await _answer(asyncio.gather(*burst), 'the burst')
            # At most the window less the spin went to worker 0 before it was known busy.
            behind = looppool.link._FIRST_WINDOW - 1
            assert replies.count(pids[1]) >= 20 - behind, replies
            # done callbacks run in the order the futures were resolved
            assert order[:20 - behind] == ['io'] * (20 - behind), f'too few first: {order}'
            assert (await _answer(spinning, 'the spin'))[0] == pids[0]

    run(main())


@pytest.mark.timeout(90)
@pytest.mark.parametrize('how', ['submit', 'map'])
def test_a_skewed_burst_is_shared_evenly(how: str) -> None:
    """A burst where every tenth task is 50 times longer than the rest keeps both workers
    busy: each does 37.5 % to 62.5 % of the CPU time, not whatever the dealing order gave
    it. Twice in a row in one pool, so a warm dispatcher holds to it too."""
    messages = [('spin', 0.1) if index % 10 == 0 else ('spin', 0.002)
                for index in range(100)]

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Balance) as pool:
            pids = await _answer(pool.broadcast(('pid',)), 'the first broadcast')
            for attempt in (1, 2):
                if how == 'submit':
                    every = asyncio.gather(*(pool.submit(m) for m in messages))
                else:
                    async def collect() -> list[Any]:
                        return [reply async for reply in pool.map(messages)]
                    every = collect()
                replies = await _answer(every, f'run {attempt}', timeout=30)
                cpu: collections.Counter[int] = collections.Counter()
                for pid, used in replies:
                    cpu[pid] += used
                assert set(cpu) == set(pids), (cpu, pids)
                total = sum(cpu.values())
                shares = {pid: round(used / total, 3) for pid, used in cpu.items()}
                assert all(0.375 <= share <= 0.625 for share in shares.values()), (
                    f'run {attempt}: CPU shares {shares} of {total:.3f} s')

    run(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize('targeted', [False, True], ids=['untargeted', 'targeted'])
def test_a_dying_worker_hands_on_what_it_had_not_started(targeted: bool) -> None:
    """A worker that dies fails only the tasks it may have started (WorkerLost); the ones
    it held unstarted are answered by the other worker or its replacement, or, sent to it
    in particular, by its replacement. The reply it finished before dying arrives."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Balance) as pool:
            pids = await _answer(pool.broadcast(('pid',)), 'the first broadcast')
            computed = pool.submit(('spin', 0.5), worker_num=0)
            dying = pool.submit(('exit', 3), worker_num=0)
            behind = [pool.submit(('pid',), worker_num=0 if targeted else None)
                      for _ in range(20)]
            done = await _answer(asyncio.gather(computed, dying, *behind,
                                                return_exceptions=True), 'the tasks', 30)
            answers = done[2:]
            lost = [repr(answer) for answer in answers if isinstance(answer, BaseException)]
            assert not lost, f'{len(lost)} of 20 unstarted tasks failed: {lost[:2]}'
            assert isinstance(done[0], tuple) and done[0][0] == pids[0], (
                f'the task that finished before the exit: {done[0]!r}')
            assert isinstance(done[1], looppool.WorkerLost), done[1]
            assert 'exited with code 3' in str(done[1])
            replacement = await _answer(pool.submit(('pid',), worker_num=0), 'worker 0')
            assert replacement not in pids
            expected = {replacement} if targeted else {replacement, pids[1]}
            assert set(answers) <= expected, (answers, pids, replacement)

    run(main())


@pytest.mark.timeout(60)
def test_targeted_messages_and_broadcasts_wait_for_a_blocked_worker() -> None:
    """While a worker is blocked, a message sent to it in particular still goes to it, and
    a broadcast still reaches every worker once, replies in worker order; both are
    answered once its loop is free."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Balance) as pool:
            pids = await _answer(pool.broadcast(('pid',)), 'the first broadcast')
            spinning = pool.submit(('spin', 1.0), worker_num=0)
            await wait_until(lambda: _state(pool, 0) == 'blocked', what='worker 0 blocked')
            targeted = pool.submit(('pid',), worker_num=0)
            everyone = pool.broadcast(('pid',))
            assert await _answer(everyone, 'the broadcast') == pids
            assert await _answer(targeted, 'the targeted message') == pids[0]
            assert (await _answer(spinning, 'the spin'))[0] == pids[0]

    run(main())


@pytest.mark.timeout(60)
def test_stats_show_each_workers_state_queue_and_lag() -> None:
    """stats() says, per worker, whether it keeps up ('running', nothing queued, no lag)
    or is blocked, with the messages it holds unstarted and how long it has been silent."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Balance) as pool:
            pids = await _answer(pool.broadcast(('pid',)), 'the first broadcast')

            def idle() -> bool:
                workers = [_worker(pool.stats(), n) for n in range(2)]
                return all(w['state'] == 'running' and w['queued'] == 0 and w['lag'] == 0.0
                           and w['in_flight'] == 0 for w in workers)

            await wait_until(idle, what='both workers idle')
            assert [_worker(pool.stats(), n)['pid'] for n in range(2)] == pids
            spinning = pool.submit(('spin', 1.0), worker_num=0)
            second = pool.submit(('pid',), worker_num=0)
            await wait_until(lambda: _state(pool, 0) == 'blocked', what='worker 0 blocked')
            worker = _worker(pool.stats(), 0)
            assert worker['queued'] >= 1 and worker['lag'] > 0, worker
            assert worker['in_flight'] >= 1 and worker['pid'] == pids[0], worker
            other = _worker(pool.stats(), 1)
            assert other['state'] == 'running' and other['queued'] == 0, other
            assert (await _answer(spinning, 'the spin'))[0] == pids[0]
            assert await _answer(second, 'the second message') == pids[0]
            await wait_until(idle, what='both workers idle again')

    run(main())


@pytest.mark.timeout(60)
def test_put_nowait_stays_exact_round_robin_while_a_worker_is_blocked() -> None:
    """Looppool 0.3's put_nowait() deals in strict turn even to a blocked worker: four
    calls reach workers 0, 1, 0, 1, and the blocked one's are handled once it is free."""
    results: list[Any] = []

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=RoundRobin) as pool:
            pool.process_message = lambda result, done: (results.append(result), done())
            pool.put_nowait(('spin', 1.0), worker_num=0)
            await wait_until(lambda: _state(pool, 0) == 'blocked', what='worker 0 blocked')
            for index in range(4):
                pool.put_nowait(('turn', index))
            await wait_until(lambda: len(results) == 5, what='five results')

    run(main())
    reached = {message[1]: number for message, number, _ in results if message[0] == 'turn'}
    assert [reached[index] for index in range(4)] == [0, 1, 0, 1], results
    on_worker_0 = [message for message, number, _ in results if number == 0]
    assert on_worker_0 == [('spin', 1.0), ('turn', 0), ('turn', 2)], results
