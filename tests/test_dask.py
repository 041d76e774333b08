"""DaskPool: the same test program against a local looppool.Pool and against DaskPools.

The ``backend`` fixture gives the program one of three pool makers:

- ``local``: a :class:`looppool.Pool` with two worker processes;
- ``dask-local``: a :class:`~looppool.dask.DaskPool` on a ``LocalCluster(processes=True)``
  with two Dask workers (nanny-managed processes) and the scheduler in this process;
- ``dask-cli``: a DaskPool on a scheduler and two workers started as separate processes
  with the ``dask`` command line on loopback, each killed by its PID at the end.

The clusters are shared by the tests of this module (a cluster takes about a second to
start); the test that kills a worker gets fresh ones (``fresh_backend``), because a killed
Dask worker stays dead (``dask-cli``) or comes back as a new process (``dask-local``'s
nanny), which would change the cluster under the tests that follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip(
    'distributed', reason='the Dask tests need the dask extra: pip install "looppool[dask]"')

import looppool  # noqa: E402
from conftest import run, wait_for, wait_until  # noqa: E402
from looppool.dask import DaskPool  # noqa: E402
from looppool.errors import RemoteTraceback  # noqa: E402
from workers import Batched, Classic, Configured, Echo, FailingStart, Spanning  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# -- pool makers ---------------------------------------------------------------------------------

class LocalBackend:
    """Makes local pools: the reference the Dask pools must behave like."""

    name = 'local'

    @contextlib.asynccontextmanager
    async def pool(self, worker_class: type, pool_size: int = 2,
                   **options: Any) -> AsyncIterator[Any]:
        async with looppool.Pool(pool_size=pool_size, worker_class=worker_class,
                                 **options) as pool:
            yield pool


class DaskBackend:
    """Makes DaskPools on the cluster at ``address``, each with its own asynchronous client."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        async with distributed.Client(self.address, asynchronous=True,
                                      direct_to_workers=True) as client:
            yield client

    @contextlib.asynccontextmanager
    async def pool(self, worker_class: type, pool_size: int | None = 2,
                   **options: Any) -> AsyncIterator[DaskPool]:
        async with self.client() as client:
            async with DaskPool(client, worker_class, pool_size=pool_size, **options) as pool:
                yield pool
            assert pool.stats()['state'] == 'stopped'


async def probe_until_replaced(pool: Any, number: int, old_pid: int,
                               timeout: float = 30.0) -> list[asyncio.Future[Any]]:
    """Submit ``('whoami',)`` to worker ``number`` at once and then every few ms until one
    is answered by a process other than ``old_pid``; return every probe's future.

    Each submit() must return a future: a synchronous raise fails the test where it
    happens. The first 0.2 s are probed every 2 ms, to land in any short window of the loss.
    """
    probes = [pool.submit(('whoami',), worker_num=number)]
    started = time.monotonic()

    def replaced() -> bool:
        return any(probe.done() and probe.exception() is None
                   and probe.result()[1] != old_pid for probe in probes)

    while not replaced():
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            pytest.fail(f'worker {number} was not back within {timeout} s of its loss')
        await asyncio.sleep(0.002 if elapsed < 0.2 else 0.02)
        probes.append(pool.submit(('whoami',), worker_num=number))
    return probes


# -- clusters ------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_cluster_running() -> Iterator[str]:
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address='127.0.0.1:0')
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close(timeout=20)


def _dask_command() -> list[str]:
    found = shutil.which('dask', path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, '-m', 'dask']


@contextlib.contextmanager
def cli_cluster_running(directory: Path) -> Iterator[tuple[str, list[int]]]:
    """A ``dask scheduler`` and two ``dask worker`` processes (no nanny) on loopback."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT), str(TESTS)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    dask = _dask_command()
    scheduler_file = directory / 'scheduler.json'
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], log_name: str) -> None:
        with open(directory / log_name, 'wb') as log_file:
            processes.append(subprocess.Popen(dask + args, cwd=ROOT, env=env,
                                              stdin=subprocess.DEVNULL,
                                              stdout=log_file, stderr=subprocess.STDOUT))

    try:
        spawn(['scheduler', '--host', '127.0.0.1', '--port', '0',
               '--dashboard-address', '127.0.0.1:0', '--scheduler-file', str(scheduler_file),
               '--idle-timeout', '600'],
              'scheduler.log')
        wait_for(lambda: scheduler_file.exists() and scheduler_file.stat().st_size > 0
                 or processes[0].poll() is not None, 30, 'the dask scheduler to start')
        assert processes[0].poll() is None, (directory / 'scheduler.log').read_text()
        address = json.loads(scheduler_file.read_text())['address']
        for index in range(2):
            spawn(['worker', address, '--nthreads', '1', '--no-nanny', '--host', '127.0.0.1',
                   '--no-dashboard', '--name', f'cli-{index}', '--death-timeout', '60',
                   '--local-directory', str(directory / f'worker-{index}')],
                  f'worker-{index}.log')

        async def two_workers() -> None:
            async with distributed.Client(address, asynchronous=True) as client:
                await client.wait_for_workers(2, timeout=30)

        run(two_workers())
        yield address, [process.pid for process in processes]
    finally:
        # Each by its PID: the workers first (they tell the scheduler they leave), then the
        # scheduler; SIGKILL for any that does not end within 10 s.
        workers, scheduler = processes[1:], processes[:1]
        for group in (workers, scheduler):
            for process in group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
            for process in group:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(5)


@pytest.fixture(scope='module')
def local_cluster() -> Iterator[str]:
    with local_cluster_running() as address:
        yield address


@pytest.fixture(scope='module')
def cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[int]]]:
    with cli_cluster_running(tmp_path_factory.mktemp('dask-cli')) as cluster:
        yield cluster


BACKENDS = ['local', 'dask-local', 'dask-cli']


@pytest.fixture(scope='module', params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Any:
    if request.param == 'local':
        return LocalBackend()
    if request.param == 'dask-local':
        return DaskBackend('dask-local', request.getfixturevalue('local_cluster'))
    return DaskBackend('dask-cli', request.getfixturevalue('cli_cluster')[0])


@pytest.fixture(params=BACKENDS)
def fresh_backend(request: pytest.FixtureRequest,
                  tmp_path: Path) -> Iterator[Any]:
    """A backend with a cluster of its own, for a test that kills one of its workers."""
    if request.param == 'local':
        yield LocalBackend()
    elif request.param == 'dask-local':
        with local_cluster_running() as address:
            yield DaskBackend('dask-local', address)
    else:
        with cli_cluster_running(tmp_path) as (address, _):
            yield DaskBackend('dask-cli', address)


# -- the same program against every backend ------------------------------------------------------

def test_replies_come_back_in_order(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            assert await pool.submit('ping') == 'ping'
            replies = await asyncio.gather(*[pool.submit(index) for index in range(2000)])
            assert replies == list(range(2000))
            stats = pool.stats()
            assert stats['state'] == 'running'
            assert stats['pool_size'] == 2
            assert stats['completed'] >= 2001
            assert [worker['number'] for worker in stats['workers']] == [0, 1]
    run(main())


def test_worker_num_reaches_that_worker_with_its_number(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            for number in (0, 1, 1, 0):
                got, _ = await pool.submit(('whoami',), worker_num=number)
                assert got == number
            with pytest.raises(ValueError, match='worker_num must be in 0..1'):
                pool.submit('x', worker_num=2)
    run(main())


def test_broadcast_answers_in_worker_order(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            answers = await pool.broadcast(('whoami',))
            assert [number for number, _ in answers] == [0, 1]
            # Each worker's _ioloop is the Tornado IOLoop its handlers run on.
            assert all(name.startswith('AsyncIO') for name in
                       await pool.broadcast(('ioloop',)))
    run(main())


def test_handlers_of_one_worker_run_concurrently(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            started = time.monotonic()
            values = await asyncio.gather(*[pool.submit(('sleep', 0.4, index), worker_num=0)
                                            for index in range(8)])
            elapsed = time.monotonic() - started
            assert values == list(range(8))
            assert elapsed < 1.5, f'8 sleeps of 0.4 s took {elapsed:.2f} s: not concurrent'
            assert await pool.submit(('max_concurrent',), worker_num=0) == 8
    run(main())


def test_exceptions_keep_their_type_and_the_remote_traceback(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            with pytest.raises(KeyError) as caught:
                await pool.submit(('raise', KeyError('no such user')))
            cause = caught.value.__cause__
            assert isinstance(cause, RemoteTraceback)
            assert 'do_raise' in str(cause) and 'no such user' in str(cause)
            assert await pool.submit('still serving') == 'still serving'
    run(main())


def test_a_message_that_cannot_be_pickled_fails_its_own_future(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            before, bad, after = pool.submit(1), pool.submit(lambda: None), pool.submit(2)
            with pytest.raises(Exception, match='pickle|lambda'):
                await bad
            assert (await before, await after) == (1, 2)   # the others went through
            with pytest.raises(Exception, match='pickle|lambda'):
                pool.put_nowait(lambda: None)   # nothing waits on put_nowait: it raises
    run(main())


def test_timeout_raises_and_cancels_the_task_in_the_worker(backend: Any) -> None:
    async def main() -> None:
        results: list[Any] = []

        def collect(result: Any, result_done: Callable[[], None]) -> None:
            results.append(result)
            result_done()

        async with backend.pool(Echo) as pool:
            pool.process_message = collect
            started = time.monotonic()
            with pytest.raises(TimeoutError, match='did not finish within 0.3 s'):
                await pool.submit(('cancellable', 30), worker_num=1, timeout=0.3)
            assert time.monotonic() - started < 2
            await wait_until(lambda: ('cancelled', 1) in results, 5,
                             'the handler to see its cancellation')
            assert pool.stats()['timed_out'] == 1
    run(main())


def test_put_nowait_raises_full_and_put_waits_for_room(backend: Any) -> None:
    async def main() -> None:
        results: list[Any] = []

        def collect(result: Any, result_done: Callable[[], None]) -> None:
            results.append(result)
            result_done()

        async with backend.pool(Echo, max_tasks=2) as pool:   # a share of one each
            pool.process_message = collect
            pool.put_nowait(('sleep', 0.5, 'slow'), 0)
            with pytest.raises(queue.Full):
                pool.put_nowait(('put', 'never'), 0)
            started = time.monotonic()
            await pool.put(('put', 'queued'), worker_num=0)
            assert time.monotonic() - started > 0.3   # it had to wait for the sleep
            await wait_until(lambda: 'queued' in results and 'slow' in results, 5,
                             'both results')
            assert 'never' not in results
    run(main())


def test_results_past_max_results_wait_in_the_worker(backend: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        results: list[Any] = []

        def collect(result: Any, result_done: Callable[[], None]) -> None:
            results.append(result)
            loop.call_later(0.005, result_done)   # a slow consumer

        async with backend.pool(Echo, max_results=2) as pool:   # a share of one each
            pool.process_message = collect
            assert await pool.submit(('put', *range(30)), worker_num=0) == 30
            await wait_until(lambda: len(results) == 30, 10, 'every result')
            assert results == list(range(30))   # none dropped, in the order sent
    run(main())


def test_looppool_style_workers_send_results(backend: Any) -> None:
    async def main() -> None:
        results: list[Any] = []

        @looppool.task_done
        def collect(result: Any, result_done: Callable[[], None]) -> None:
            results.append(result)

        async with backend.pool(Classic) as pool:
            pool.process_message = collect
            for index in range(10):
                await pool.put(index)
            await wait_until(lambda: len(results) == 10, 10, 'ten results')
            assert sorted(message for message, _, _ in results) == list(range(10))
            assert {number for _, number, _ in results} == {0, 1}
    run(main())


def test_a_failing_initialise_raises_worker_start_error(backend: Any) -> None:
    async def main() -> None:
        with pytest.raises(looppool.WorkerStartError, match='cannot open the database'):
            async with backend.pool(FailingStart):
                pass   # pragma: no cover
    run(main())


def test_workers_are_made_with_worker_args_and_worker_kwargs(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Configured, worker_args=({'rows': [1]},),
                                worker_kwargs={'scale': 3}) as pool:
            replies = await pool.broadcast('ask')
            assert [(r['number'], r['scale'], r['table']) for r in replies] == [
                (0, 3, {'rows': [1]}), (1, 3, {'rows': [1]})]
        with pytest.raises(looppool.WorkerStartError,
                           match=r'Configured\(\*worker_args, \*\*worker_kwargs\) raised'):
            async with backend.pool(Configured, worker_args=({},),
                                    worker_kwargs={'scale': -1}):
                pass   # pragma: no cover
    run(main())


def test_a_stopped_pool_refuses_messages(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            slow = pool.submit(('sleep', 0.3, 'finished'))
            await pool.stop()
            assert slow.result() == 'finished'   # accepted work finishes
            assert pool.stats()['state'] == 'stopped'
            with pytest.raises(looppool.PoolClosed):
                pool.submit('late')
            with pytest.raises(looppool.PoolClosed):
                pool.put_nowait('late')
    run(main())


def test_stop_past_its_deadline_ends_running_tasks_with_pool_closed(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            stuck = pool.submit(('sleep', 30), worker_num=0)
            assert await pool.submit('ready', worker_num=0) == 'ready'   # it is running
            started = time.monotonic()
            await pool.stop(timeout=0.5)
            assert time.monotonic() - started < 8
            with pytest.raises(looppool.PoolClosed):
                await stuck
    run(main())


def test_batches_form_in_each_worker(backend: Any) -> None:
    async def main() -> None:
        async with backend.pool(Batched, batch_size=4, batch_timeout=30.0) as pool:
            # Full batches only (the timeout is never waited for), one per worker.
            replies = await asyncio.gather(*[pool.submit(index, worker_num=index % 2)
                                            for index in range(8)])
            assert [reply[0] for reply in replies] == list(range(8))
            assert {reply[2] for reply in replies} == {4}
            assert pool.stats()['batches'] == {'count': 2, 'messages': 8, 'sizes': {4: 2}}
            assert [w['batches'] for w in pool.stats()['workers']] == [1, 1]
            outcomes = await asyncio.gather(
                *[pool.submit(('raise', KeyError('batch')), worker_num=0)],
                *[pool.submit(index, worker_num=0) for index in range(3)],
                return_exceptions=True)
            assert all(type(outcome) is KeyError for outcome in outcomes)
            mapped = [reply async for reply in pool.map(range(40), chunksize=3)]
            assert [reply[0] for reply in mapped] == list(range(40))
            awaited = await pool.map(range(40), chunksize=3)   # the list, as on a Pool
            assert [reply[0] for reply in awaited] == list(range(40))
    run(main())


def test_a_worker_killed_mid_load(fresh_backend: Any) -> None:
    """Only the killed worker's tasks fail, with WorkerLost, through their futures; it comes
    back under the same number with the sticky broadcasts replayed."""
    async def main() -> None:
        async with fresh_backend.pool(Echo) as pool:
            await pool.broadcast(('record', 'config v1'), sticky=True)
            await pool.broadcast(('record', 'table v1'), sticky='table')
            await pool.broadcast(('record', 'table v2'), sticky='table')   # replaces v1
            tasks = [pool.submit(('sleep', 0.5, index), worker_num=index % 2)
                     for index in range(200)]
            await asyncio.sleep(0.2)
            old_pid = await pool.submit(('pid',), worker_num=0)
            os.kill(old_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # Sending to the lost number returns a future at every moment of the loss and
            # the re-creation, never raises here (a Dask actor proxy raises synchronously
            # for a while after its worker died): the first probe goes out with no await
            # after the kill, then one every few ms until the new actor answers one.
            probes = await probe_until_replaced(pool, 0, old_pid)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert time.monotonic() - killed_at < 5
            for index, outcome in enumerate(outcomes):
                if index % 2:
                    assert outcome == index
                else:
                    assert isinstance(outcome, looppool.WorkerLost), outcome
                    assert outcome.number == 0
            answers = await asyncio.wait_for(
                asyncio.gather(*probes, return_exceptions=True), 30)
            for answer in answers:
                if isinstance(answer, BaseException):
                    assert isinstance(answer, looppool.WorkerLost), repr(answer)
                    assert answer.number == 0
                else:
                    assert answer[0] == 0 and answer[1] != old_pid
            assert await pool.submit(('seen',), worker_num=0) == ['config v1', 'table v2']
            assert pool.stats()['restarts'] == 1
            if isinstance(pool, DaskPool):
                workers = pool.stats()['workers']
                assert workers[0]['alive'] and workers[0]['restarts'] == 1
                if fresh_backend.name == 'dask-cli':
                    # The killed Dask worker has no nanny: the actor moved to the other one,
                    # which already hosts worker 1.
                    assert workers[0]['address'] == workers[1]['address']
    run(main())


def test_a_held_loop_gets_no_new_work_and_map_runs(backend: Any) -> None:
    """The balancing of a local pool holds for actors too: while a CPU-bound handler
    holds worker 0's loop, it is found blocked and the messages sent meanwhile are all
    answered by worker 1; map() yields in order through every backend."""
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            pids = await pool.broadcast(('pid',))
            if pids[0] == pids[1]:   # pragma: no cover - placement spreads two actors
                pytest.skip('both actors share a Dask worker')
            spinning = pool.submit(('spin', 1.5), worker_num=0)
            await wait_until(lambda: pool.stats()['workers'][0]['state'] == 'blocked', 10,
                             'worker 0 to be found blocked')
            sent = []
            for _ in range(10):
                sent.append((pool.submit(('pid',)), not spinning.done()))
                await asyncio.sleep(0.01)   # pacing: one message every 10 ms
            replies = await asyncio.wait_for(asyncio.gather(*(f for f, _ in sent)), 30)
            during = [reply for reply, (_, held) in zip(replies, sent) if held]
            assert during and set(during) == {pids[1]}, replies
            assert await asyncio.wait_for(spinning, 30) == 'spun'
            replies = [reply async for reply in pool.map(range(3000))]
            assert replies == list(range(3000))
    run(main())


def test_pause_resume_and_a_rolling_restart(backend: Any) -> None:
    """The lifecycle is the same for actors: paused, messages wait; resumed, they run;
    a rolling restart replaces every worker (for actors: new actors) and loses nothing."""
    async def main() -> None:
        async with backend.pool(Echo) as pool:
            await asyncio.wait_for(pool.broadcast(('record', 'table')), 30)
            await asyncio.wait_for(pool.pause(), 30)
            assert pool.state == 'paused'
            assert [w['state'] for w in pool.stats()['workers']] == ['paused', 'paused']
            waiting = [pool.submit(index) for index in range(20)]
            await asyncio.sleep(0.2)   # time enough to answer, were they sent
            assert not any(future.done() for future in waiting)
            await asyncio.wait_for(pool.resume(), 30)
            assert await asyncio.wait_for(asyncio.gather(*waiting), 30) == list(range(20))
            load = [pool.submit(('sleep', 0.01, index)) for index in range(200)]
            await asyncio.wait_for(pool.restart(), 60)
            assert await asyncio.wait_for(asyncio.gather(*load), 30) == list(range(200))
            assert pool.stats()['recycles'] == 2 and pool.stats()['failed'] == 0
            # new workers: the table recorded before the restart is not there
            assert await pool.broadcast(('seen',)) == [[], []]
    run(main())


def test_the_callers_trace_context_reaches_the_handlers(backend: Any) -> None:
    """OpenTelemetry: a span made in handle() is a child of the caller's span."""
    pytest.importorskip('opentelemetry.sdk', reason='needs opentelemetry-sdk')
    from opentelemetry.sdk.trace import TracerProvider
    tracer = TracerProvider().get_tracer('looppool-test-caller')

    async def main() -> None:
        async with backend.pool(Spanning) as pool:
            with tracer.start_as_current_span('caller') as span:
                context = span.get_span_context()
                assert await pool.submit('a') == 'a'
                assert await pool.broadcast('b') == ['b', 'b']
            recorded = await pool.broadcast('spans')
            spans = {name: (trace, parent) for found in recorded
                     for name, trace, parent in found}
            for name in ('handle a', 'handle b'):
                assert spans[name] == (context.trace_id, context.span_id), spans
    run(main())


# -- Dask only -----------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=['dask-local', 'dask-cli'])
def dask_backend(request: pytest.FixtureRequest) -> DaskBackend:
    if request.param == 'dask-local':
        return DaskBackend('dask-local', request.getfixturevalue('local_cluster'))
    return DaskBackend('dask-cli', request.getfixturevalue('cli_cluster')[0])


def test_pool_size_none_means_one_actor_per_dask_worker(dask_backend: DaskBackend) -> None:
    async def main() -> None:
        async with dask_backend.pool(Echo, pool_size=None) as pool:
            assert pool.pool_size == 2
            addresses = [worker['address'] for worker in pool.stats()['workers']]
            assert len(set(addresses)) == 2
        async with dask_backend.pool(Echo, pool_size=3) as pool:
            addresses = [worker['address'] for worker in pool.stats()['workers']]
            assert sorted(addresses.count(address) for address in set(addresses)) == [1, 2]
            assert [n for n, _ in await pool.broadcast(('whoami',))] == [0, 1, 2]
    run(main())


def test_a_class_defined_in_a_function_is_sent_by_value(dask_backend: DaskBackend) -> None:
    class Doubler(looppool.Worker):
        def _initialise(self) -> None:
            self.factor = 2

        async def handle(self, message: Any) -> Any:
            await asyncio.sleep(0)
            return message * self.factor, self._number

    async def main() -> None:
        async with dask_backend.pool(Doubler) as pool:
            assert await pool.submit(21, worker_num=1) == (42, 1)
    run(main())


def test_a_class_the_cluster_cannot_import_gives_a_clear_error(
        dask_backend: DaskBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A module only this process can import: the Dask workers were started without it.
    (tmp_path / 'only_here.py').write_text(
        'import looppool\n\n'
        'class OnlyHere(looppool.Worker):\n'
        '    async def handle(self, message):\n'
        '        return message\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(looppool.WorkerStartError) as caught:
            async with dask_backend.pool(only_here.OnlyHere):
                pass   # pragma: no cover
        message = str(caught.value)
        assert 'could not be loaded' in message and 'only_here' in message
        assert 'register_pickle_by_value' in message
        assert time.monotonic() - started < 10
        # The Dask workers are unharmed: the class travelled as bytes, loaded by the actor.
        async with dask_backend.pool(Echo) as pool:
            assert await pool.broadcast('ok') == ['ok', 'ok']
    try:
        run(main())
    finally:
        sys.modules.pop('only_here', None)


def test_a_frozen_dask_worker_is_bounded_by_timeout(cli_cluster: tuple[str, list[int]]) -> None:
    backend = DaskBackend('dask-cli', cli_cluster[0])

    async def main() -> None:
        async with backend.pool(Echo, timeout=0.5) as pool:
            frozen = await pool.submit(('pid',), worker_num=0)
            other = await pool.submit(('pid',), worker_num=1)
            if frozen == other:   # pragma: no cover - placement spreads two actors
                pytest.skip('both actors share a Dask worker')
            os.kill(frozen, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await pool.submit('hello?', worker_num=0)
                assert time.monotonic() - started < 2
                # The other Dask worker is not held up, nor is anything sent round-robin
                # that lands there.
                assert await pool.submit('fine', worker_num=1) == 'fine'
            finally:
                os.kill(frozen, signal.SIGCONT)
            assert await pool.submit('back', worker_num=0) == 'back'
    run(main())


def test_a_handler_raising_system_exit_does_not_end_the_dask_worker(
        dask_backend: DaskBackend) -> None:
    class Quitter(Echo):
        async def do_quit(self) -> None:
            raise SystemExit(3)

    async def main() -> None:
        async with dask_backend.pool(Quitter) as pool:
            pid = await pool.submit(('pid',), worker_num=0)
            with pytest.raises(RuntimeError, match=r'raised SystemExit\(3\).*not ended'):
                await pool.submit(('quit',), worker_num=0)
            assert await pool.submit(('pid',), worker_num=0) == pid
            assert pool.stats()['restarts'] == 0
    run(main())


def test_system_exit_in_handle_batch_does_not_end_the_dask_worker(
        dask_backend: DaskBackend) -> None:
    class QuitsInBatches(Batched):
        async def handle_batch(self, messages: list[Any]) -> Any:
            if 'quit' in messages:
                raise SystemExit(4)
            return await super().handle_batch(messages)

    async def main() -> None:
        async with dask_backend.pool(QuitsInBatches, batch_size=1) as pool:
            _, _, _, pid = await pool.submit(('pid',), worker_num=0)
            with pytest.raises(RuntimeError, match=r'raised SystemExit\(4\).*not ended'):
                await pool.submit('quit', worker_num=0)
            assert (await pool.submit(('pid',), worker_num=0))[3] == pid
            assert pool.stats()['restarts'] == 0
    run(main())


def test_the_applications_event_handler_still_gets_events(dask_backend: DaskBackend) -> None:
    async def main() -> None:
        seen: list[Any] = []
        async with dask_backend.client() as client:
            for _ in range(2):
                async with DaskPool(client, Echo, pool_size=1):
                    pass
            # The client is left as the pools found it: no handler (the client keeps
            # handlers in a private dict; an unsubscribed topic must not stay in it).
            assert 'all' not in client._event_handlers
            client.subscribe_topic('all', lambda event: seen.append(event[1]))
            async with DaskPool(client, Echo, pool_size=1) as pool:
                await client.log_event('all', {'action': 'app-note', 'n': 1})
                await wait_until(lambda: {'action': 'app-note', 'n': 1} in seen, 10,
                                 'the application\'s handler to get its event')
                assert await pool.submit(1) == 1
            await client.log_event('all', {'action': 'app-note', 'n': 2})
            await wait_until(lambda: {'action': 'app-note', 'n': 2} in seen, 10,
                             'the handler to be back in place after the pool stopped')
    run(main())


def test_bad_arguments_are_named(local_cluster: str) -> None:
    with pytest.raises(TypeError, match='client must be a distributed.Client'):
        DaskPool(object(), Echo)

    async def main() -> None:
        async with DaskBackend('dask-local', local_cluster).client() as client:
            with pytest.raises(TypeError, match='worker_class must be a subclass'):
                DaskPool(client, object)  # type: ignore[arg-type]
            for name, value in [('pool_size', 0), ('max_in_flight', 0), ('max_batch', 0)]:
                with pytest.raises(ValueError, match=f'{name} must be at least 1'):
                    DaskPool(client, Echo, **{name: value})
            with pytest.raises(ValueError, match='timeout must be a positive'):
                DaskPool(client, Echo, timeout=0)
            with pytest.raises(TypeError, match='batch_size is for a Worker'):
                DaskPool(client, Echo, batch_size=8)
            with pytest.raises(ValueError, match='batch_timeout must be a finite'):
                DaskPool(client, Batched, batch_timeout=-1)
            with pytest.raises(TypeError, match=r'Configured\(table, \*, scale=1\) cannot be '
                                                r'called with worker_args \(0 positional\)'):
                DaskPool(client, Configured)
            with pytest.raises(TypeError, match='worker_kwargs cannot be pickled'):
                DaskPool(client, Configured, worker_args=({},),
                         worker_kwargs={'scale': (_ for _ in ())})
            pool = DaskPool(client, Echo)
            with pytest.raises(RuntimeError, match='start the pool first'):
                pool.submit(1)
            await pool.stop()
    run(main())


def test_w1_through_dask_is_batched(local_cluster: str) -> None:
    """W1 in miniature: tiny echo messages submitted at once travel in a few actor calls,
    not one call each. (How fast is the benchmark's business: tests never assert speed.)"""
    count = 20_000

    async def main() -> None:
        async with DaskBackend('dask-local', local_cluster).pool(Echo) as pool:
            replies = await asyncio.gather(*[pool.submit(index) for index in range(count)])
            assert replies == list(range(count))
            calls = pool.stats()['calls']
            assert 0 < calls < count / 10, f'{calls} actor calls for {count} messages'

    run(main())


@pytest.mark.timeout(180)
def test_the_dask_benchmark_runs_and_prints_its_figures() -> None:
    """benchmarks/dask_w1w2.py, with small counts: it runs to the end and prints W1 and
    W2 for both pools and the ratio line. The figures themselves are not judged."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    done = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'dask_w1w2.py'),
         '--reps', '1', '--w1', '2000', '--w2', '50', '--warm-up', '200'],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith('median of 1; W1 = 2,000 messages at once, '
                               'W2 = 50 sequential round trips'), done.stdout
    number = r'([\d,]+)'
    for label in (r'looppool\.Pool \(2 processes\)', r'DaskPool \(LocalCluster, 2\)'):
        rows = [re.fullmatch(rf'{label}\s+{number}\s+{number}\s+{number}', line)
                for line in lines]
        row = next((match for match in rows if match), None)
        assert row is not None, f'no figures for {label} in:\n{done.stdout}'
        w1, p50, p99 = (int(group.replace(',', '')) for group in row.groups())
        assert w1 > 0 and 0 < p50 <= p99
    assert re.fullmatch(r'DaskPool W1 / local W1 = [\d.]+ \(.*\); [\d,]+ actor calls in all',
                        lines[-1]), done.stdout
    # one line per pool and repetition on stderr, as the full run prints them
    assert len(re.findall(r'^rep 1 +(local|dask): W1', done.stderr, re.M)) == 2, done.stderr
