"""The pool's lifecycle: states, pause and resume, the rolling restart, a start after a
stop. Real worker processes; every wait has a deadline."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
from typing import Any

import pytest
import statsd

import looppool
from conftest import run, wait_until
from test_metrics import UdpSink
from workers import Echo

pytestmark = pytest.mark.timeout(90)


class Hooked(Echo):
    """Echo that records its pause and resume hooks (one a coroutine, one plain)."""

    def _initialise(self) -> None:
        super()._initialise()
        self.hooks: list[str] = []

    async def _pause(self) -> None:
        await asyncio.sleep(0.05)   # the hook may take a while: paused only once it returned
        self.hooks.append('pause')

    def _resume(self) -> None:
        self.hooks.append('resume')

    async def do_hooks(self) -> list[str]:
        return self.hooks


def _states(pool: looppool.Pool) -> list[str]:
    return [worker['state'] for worker in pool.stats()['workers']]


async def _answer(awaitable: Any, what: str, timeout: float = 30.0) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        pytest.fail(f'{what} did not come within {timeout} s')


def test_states_through_every_transition(caplog: pytest.LogCaptureFixture) -> None:
    """new, starting, running, pausing, paused, starting (resuming), running, stopping,
    stopped, and a second life: each transition logged once, in order."""
    caplog.set_level(logging.INFO, logger='looppool')

    async def main() -> list[str]:
        pool = looppool.Pool(pool_size=2, worker_class=Hooked)
        seen = [pool.state]
        ready = pool.start()
        seen.append(pool.state)
        await _answer(ready, 'the start')
        seen.append(pool.state)
        slow = pool.submit(('sleep', 0.3, 'slow'))
        pausing = pool.pause()
        seen.append(pool.state)
        assert _states(pool) == ['pausing', 'pausing']
        await _answer(pausing, 'the pause')
        assert slow.result() == 'slow'   # what had started finished before the pause did
        seen.append(pool.state)
        assert _states(pool) == ['paused', 'paused']
        resuming = pool.resume()
        seen.append(pool.state)
        await _answer(resuming, 'the resume')
        seen.append(pool.state)
        stopping = pool.stop()
        seen.append(pool.state)
        await _answer(stopping, 'the stop')
        seen.append(pool.state)
        async with pool:   # a stopped pool starts again, with new workers
            seen.append(pool.state)
            assert await _answer(pool.submit('again'), 'a reply') == 'again'
        return seen

    seen = run(main())
    assert seen == ['new', 'starting', 'running', 'pausing', 'paused', 'starting', 'running',
                    'stopping', 'stopped', 'running']
    logged = [record.getMessage().split(': ')[1] for record in caplog.records
              if record.getMessage().startswith('pool of Hooked: ')
              and '->' in record.getMessage()]
    assert logged == ['new -> starting', 'starting -> running', 'running -> pausing',
                      'pausing -> paused', 'paused -> starting', 'starting -> running',
                      'running -> stopping', 'stopping -> stopped', 'stopped -> starting',
                      'starting -> running', 'running -> stopping', 'stopping -> stopped']


def test_messages_sent_while_paused_run_after_resume_in_order() -> None:
    """While paused nothing reaches a worker; submit() and put() wait in the pool and run
    after resume(), in the order they were sent, after each worker's _resume();
    put_nowait() raises queue.Full once the worker's share is used (here: by notes
    waiting for it)."""
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Hooked, max_tasks=20) as pool:
            await _answer(pool.pause(), 'the pause')
            replies = [pool.submit(('record', index)) for index in range(30)]
            puts = [pool.put(('record', index)) for index in range(30, 40)]
            await asyncio.sleep(0.2)   # time enough for a worker to answer, were it sent
            assert not any(reply.done() for reply in replies)
            assert pool.stats()['waiting'] == 40
            await _answer(pool.resume(), 'the resume')
            await _answer(asyncio.gather(*replies, *puts), 'the replies')
            await wait_until(lambda: pool.stats()['in_flight'] == 0, 10, 'the notes to run')
            assert await pool.submit(('seen',)) == list(range(40))
            assert await pool.submit(('hooks',)) == ['pause', 'resume']

            await _answer(pool.pause(), 'the second pause')
            for index in range(20):
                pool.put_nowait(('record', index))
            with pytest.raises(queue.Full):
                pool.put_nowait(('record', 'one too many'))
            await _answer(pool.resume(), 'the second resume')
            await wait_until(lambda: pool.stats()['in_flight'] == 0
                             and pool.stats()['waiting'] == 0, 10, 'the notes to run')
            assert (await pool.submit(('seen',)))[40:] == list(range(20))
    run(main())


def test_pause_waits_for_started_work_and_hooks_run_in_every_worker() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Hooked) as pool:
            long = [pool.submit(('sleep', 0.4, index), worker_num=index) for index in (0, 1)]
            await wait_until(lambda: pool.stats()['workers'][1]['queued'] == 0, 10,
                             'both sleeps to start')
            await _answer(pool.pause(), 'the pause')
            assert [future.result() for future in long] == [0, 1]
            await _answer(pool.pause(), 'a second pause (idempotent)')
            await _answer(pool.resume(), 'the resume')
            await _answer(pool.resume(), 'a second resume (idempotent)')
            assert await pool.broadcast(('hooks',)) == [['pause', 'resume']] * 2
    run(main())


def test_a_worker_that_dies_while_paused_is_replaced_paused() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Hooked) as pool:
            pids = await pool.broadcast(('pid',))
            await _answer(pool.pause(), 'the pause')
            os.kill(pids[0], signal.SIGKILL)
            await wait_until(lambda: pool.stats()['workers'][0]['pid'] not in (None, pids[0])
                             and _states(pool)[0] == 'paused', 20,
                             'the replacement to be ready and paused')
            assert pool.state == 'paused'
            late = pool.submit(('pid',), worker_num=0)
            await asyncio.sleep(0.1)
            assert not late.done()
            await _answer(pool.resume(), 'the resume')
            assert await _answer(late, 'the message') not in pids
            assert await pool.submit(('hooks',), worker_num=0) == ['pause', 'resume']
    run(main())


def test_a_pause_during_a_recycle_pauses_the_replacement() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Hooked,
                                 max_tasks_per_worker=3) as pool:
            old = await pool.submit(('pid',))
            await pool.submit(1)
            await pool.submit(2)   # the third: its replacement starts now
            assert pool.stats()['recycles'] == 1
            await _answer(pool.pause(), 'the pause')
            await wait_until(lambda: pool.stats()['workers'][0]['pid'] != old
                             and _states(pool) == ['paused'], 20,
                             'the replacement to take over, paused')
            assert pool.state == 'paused'
            await _answer(pool.resume(), 'the resume')
            assert await pool.submit(('pid',)) != old
            assert await pool.submit(('hooks',)) == ['pause', 'resume']
    run(main())


def test_a_rolling_restart_under_load_loses_nothing() -> None:
    """A steady load while every worker is replaced: no task fails, every reply is right,
    the pids are new, and sticky broadcasts are replayed to the new workers."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Hooked) as pool:
            await pool.broadcast(('record', 'table v1'), sticky='table')
            before = await pool.broadcast(('pid',))
            done = asyncio.Event()
            answered: list[Any] = []

            async def load() -> None:
                index = 0
                while not done.is_set():
                    batch = [pool.submit(('sleep', 0.002, index + step)) for step in range(20)]
                    answered.extend(await asyncio.gather(*batch))
                    index += 20

            loader = asyncio.ensure_future(load())
            await wait_until(lambda: len(answered) >= 100, 20, 'the load to run')
            await _answer(pool.restart(), 'the rolling restart', 60)
            after = await pool.broadcast(('pid',))
            done.set()
            await _answer(loader, 'the load')
            assert answered == list(range(len(answered)))   # none failed or went missing
            assert not set(after) & set(before)
            assert pool.stats()['failed'] == 0 and pool.stats()['lost'] == 0
            assert await pool.broadcast(('seen',)) == [['table v1']] * 2
    run(main())


def test_stop_from_paused_runs_what_waits() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=2, worker_class=Hooked)
        await _answer(pool.start(), 'the start')
        await _answer(pool.pause(), 'the pause')
        waiting = [pool.submit(index) for index in range(10)]
        await _answer(pool.stop(), 'the stop')
        assert [future.result() for future in waiting] == list(range(10))
        assert pool.state == 'stopped'
    run(main())


def test_transitions_are_counted_in_statsd() -> None:
    sink = UdpSink()
    client = statsd.StatsClient('127.0.0.1', sink.port)
    try:

        async def main() -> None:
            async with looppool.Pool(pool_size=1, worker_class=Hooked, statsd=client) as pool:
                await _answer(pool.pause(), 'the pause')
                await _answer(pool.resume(), 'the resume')

        run(main())
        wanted = {'looppool.state.paused', 'looppool.state.pausing', 'looppool.state.running',
                  'looppool.state.stopped'}

        def counted() -> set[str]:
            return {name for name, _, kind in sink.metrics() if kind == 'c'} & wanted

        deadline = asyncio.run(_until(lambda: counted() == wanted))
        assert deadline, f'state counters seen: {counted()}'
    finally:
        client.close()
        sink.close()


async def _until(condition: Any, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return bool(condition())
