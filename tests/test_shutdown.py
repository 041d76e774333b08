"""Stopping: drains, escalates, never hangs; no orphans however the parent ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psutil
import pytest

import looppool
from conftest import run, wait_for
from workers import Echo

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(looppool.__path__[0])


def _program(tmp_path, body: str) -> str:
    path = tmp_path / 'program.py'
    path.write_text(textwrap.dedent(body))
    return str(path)


def _env() -> dict[str, str]:
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, os.path.dirname(__file__)])}


def test_stop_escalates_past_its_deadline_when_a_worker_hangs() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=2, worker_class=Echo, kill_grace=0.5)
        await pool.__aenter__()
        hung = pool.submit(('spin', 60), worker_num=0)
        cooperative = pool.submit(('sleep', 60), worker_num=1)
        quick = pool.submit(('sleep', 0.1, 'done'), worker_num=1)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await pool.stop(timeout=0.5)
        elapsed = time.monotonic() - started
        # It escalated (0.5 s, then kill_grace) rather than wait for the 60 s handlers;
        # the bound leaves room for a loaded machine.
        assert elapsed < 20, elapsed
        assert await quick == 'done'
        with pytest.raises(looppool.WorkerLost, match='stop timeout passed'):
            await hung
        # the cooperative one was cancelled by the terminate message: not a CancelledError
        # in the caller, but a clear PoolClosed
        with pytest.raises(looppool.PoolClosed, match='stop timeout passed'):
            await cooperative
        assert pool.stats()['state'] == 'stopped'

    run(main())


def test_unsent_messages_end_in_pool_closed_when_stop_gives_up() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=Echo, max_tasks=1, kill_grace=0.3)
        await pool.__aenter__()
        blocking = pool.submit(('spin', 60))
        waiting = pool.submit('never sent')
        await pool.stop(timeout=0.3)
        with pytest.raises(looppool.PoolClosed):
            await waiting
        with pytest.raises(looppool.WorkerLost):
            await blocking

    run(main())


def test_blocking_stop_in_looppool_style_never_hangs(tmp_path) -> None:
    program = _program(tmp_path, '''
        import time, looppool
        from tornado import gen, ioloop
        from workers import Echo

        @gen.coroutine
        def main():
            pool = looppool.Pool(ioloop.IOLoop.current(), 1, Echo, kill_grace=0.3)
            pool.start()
            pool.put_nowait(('spin', 60))
            pool.stop(timeout=0.5)   # not awaited: blocks in the next iteration, bounded

        started = time.monotonic()
        ioloop.IOLoop.current().run_sync(main)
        print('stopped in', round(time.monotonic() - started, 1))
    ''')
    done = subprocess.run([sys.executable, program], env=_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    # It escalated rather than wait for the 60 s handler (the bound leaves room for a
    # loaded machine, and takes in the interpreter's start).
    assert float(done.stdout.split()[-1]) < 20


def _worker_pids_of(pid: int) -> list[int]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if 'looppool worker' in ' '.join(c.cmdline())]


@pytest.mark.parametrize('method', ['fork', 'spawn', 'forkserver'])
def test_workers_exit_when_the_parent_is_killed(tmp_path, method: str) -> None:
    program = _program(tmp_path, f'''
        import asyncio, looppool
        from workers import Echo

        async def main():
            async with looppool.Pool(pool_size=2, worker_class=Echo,
                                     mp_context={method!r}) as pool:
                print(*await pool.broadcast(('pid',)), flush=True)
                await asyncio.sleep(60)

        if __name__ == '__main__':
            asyncio.run(main())
    ''')
    pids: list[int] = []
    with _parent(program, pids) as parent:
        assert parent.stdout is not None
        pids += [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
        parent.kill()
        parent.wait(5)
        # Idle workers see the end of file at once (and on Linux get the parent-death
        # signal); nothing else would ever end them.
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=10,
                 what='the workers to exit after their parent was killed')


# How long the workers of the test below spin; it waits for them for 20 s less.
SPIN_SECONDS = 40


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='the parent-death signal (PR_SET_PDEATHSIG) is Linux only')
@pytest.mark.parametrize('method', ['fork', 'spawn', 'forkserver'])
def test_workers_in_cpu_bound_handlers_exit_when_the_parent_is_killed(tmp_path, method: str
                                                                      ) -> None:
    """A handler that never yields keeps its loop from reading the end of file: only the
    parent-death signal (Linux's PR_SET_PDEATHSIG) can end these workers, and it must do
    so while they spin, not when the spin ends (each would note that in a file)."""
    program = _program(tmp_path, f'''
        import asyncio, os, time, looppool
        from workers import Echo

        class Spinner(Echo):
            async def do_spin_loudly(self, seconds):
                os.write(1, f'spinning {{os.getpid()}}\\n'.encode())
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    pass
                with open({str(tmp_path / 'spun')!r}, 'a') as spun:
                    spun.write(f'{{os.getpid()}}\\n')

        async def main():
            async with looppool.Pool(pool_size=2, worker_class=Spinner,
                                     mp_context={method!r}) as pool:
                print(*await pool.broadcast(('pid',)), flush=True)
                for number in range(2):
                    pool.submit(('spin_loudly', {SPIN_SECONDS}), worker_num=number)
                await asyncio.sleep(60)

        if __name__ == '__main__':
            asyncio.run(main())
    ''')
    pids: list[int] = []
    with _parent(program, pids) as parent:
        assert parent.stdout is not None
        pids += [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2
        # both workers are inside their spin loops before the parent dies
        spinning = {int(parent.stdout.readline().split()[1]) for _ in pids}
        assert spinning == set(pids)
        parent.kill()
        # Well before the spin would end: so the signal ended them, not the spin.
        wait_for(lambda: not any(_alive(pid) for pid in pids),
                 timeout=SPIN_SECONDS - 20,
                 what='spinning workers to exit after their parent was killed')
        assert not (tmp_path / 'spun').exists(), (tmp_path / 'spun').read_text()


@contextlib.contextmanager
def _parent(program: str, pids: list[int]) -> Iterator[subprocess.Popen[str]]:
    """Run ``program`` as a pool's parent process, its output piped; afterwards kill it, and
    any of ``pids`` (its workers, filled in by the caller) that a failure left behind."""
    parent = subprocess.Popen([sys.executable, program], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        yield parent
    finally:
        parent.kill()
        parent.wait(5)
        if parent.stdout:
            parent.stdout.close()
        _kill_orphans(pids)


def _kill_orphans(pids: list[int]) -> None:
    """Workers whose parent died belong to init, not to this process, so the suite's
    no-children check cannot see them: end any that a failed test left."""
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if 'looppool worker' in ' '.join(process.cmdline()):
                process.kill()
        except psutil.Error:
            pass


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ctrl_c_to_the_process_group_does_not_kill_tasks_in_flight(tmp_path) -> None:
    program = _program(tmp_path, '''
        import asyncio, signal, looppool
        from workers import Echo

        async def main():
            interrupted = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
            async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
                task = pool.submit(('sleep', 1.0, 'finished'))
                print('ready', flush=True)
                await interrupted.wait()
                print('interrupted', flush=True)
                print(await task, flush=True)   # the application decides: finish, then stop

        asyncio.run(main())
    ''')
    parent = subprocess.Popen([sys.executable, program], env=_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == 'ready'
        os.killpg(parent.pid, signal.SIGINT)   # what a terminal's Ctrl-C does
        out, _ = parent.communicate(timeout=20)
        assert out.split() == ['interrupted', 'finished']
        assert parent.returncode == 0
    finally:
        parent.kill()
        parent.wait(5)


def test_a_program_that_never_stops_its_pool_still_exits(tmp_path) -> None:
    program = _program(tmp_path, '''
        import asyncio, looppool
        from workers import Echo

        async def main():
            pool = looppool.Pool(pool_size=2, worker_class=Echo)
            pool.start()
            print(await pool.submit('hello'), flush=True)
            # no stop(): the interpreter exits with the workers running

        if __name__ == '__main__':
            asyncio.run(main())
    ''')
    done = subprocess.run([sys.executable, program], env=_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'hello'


def test_stop_before_start_and_twice() -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=Echo)
        await pool.stop()
        with pytest.raises(looppool.PoolClosed):
            pool.submit(1)
        pool = looppool.Pool(pool_size=1, worker_class=Echo)
        async with pool:
            pass
        await pool.stop()
        await pool.stop()   # a second stop is the same, finished, stop
        # A stopped pool starts again, with new workers; a running one refuses.
        ready = pool.start()
        with pytest.raises(RuntimeError, match='already started'):
            pool.start()
        await ready
        assert await pool.submit('again') == 'again'
        await pool.stop()

    run(main())


def test_finalise_runs_on_a_clean_stop(tmp_path) -> None:
    marker = tmp_path / 'finalised'
    program = _program(tmp_path, f'''
        import asyncio, looppool

        class Closing(looppool.Worker):
            async def handle(self, message):
                return message
            async def _finalise(self):
                await asyncio.sleep(0.01)
                with open({str(marker)!r} + str(self._number), 'w') as f:
                    f.write('closed')

        async def main():
            async with looppool.Pool(pool_size=2, worker_class=Closing) as pool:
                await pool.submit(1)

        if __name__ == '__main__':
            asyncio.run(main())
    ''')
    done = subprocess.run([sys.executable, program], env=_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'finalised0').read_text() == 'closed'
    assert (tmp_path / 'finalised1').read_text() == 'closed'


def test_finalise_waits_for_every_message_taken_from_the_inbox(tmp_path) -> None:
    """Plain (not async) handlers behind one that overran its turn wait in the inbox; a
    stop that comes meanwhile runs _finalise() only after the last of them has run."""
    journal = tmp_path / 'journal'
    program = _program(tmp_path, f'''
        import asyncio, time, looppool

        class Journal(looppool.Worker):
            def handle(self, message):
                # 2 ms each: a few fit a turn's 5 ms budget, the rest wait in the inbox
                deadline = time.monotonic() + 0.002
                while time.monotonic() < deadline:
                    pass
                with open({str(journal)!r}, 'a') as f:
                    f.write(f'{{message}}\\n')
                return message
            def _finalise(self):
                with open({str(journal)!r}, 'a') as f:
                    f.write('finalised\\n')

        async def main():
            pool = looppool.Pool(pool_size=1, worker_class=Journal)
            await pool.start()
            futures = [pool.submit(n) for n in range(100)]
            await asyncio.sleep(0)   # sent
            await pool.stop()
            assert [f.result() for f in futures] == list(range(100))

        if __name__ == '__main__':
            asyncio.run(main())
    ''')
    done = subprocess.run([sys.executable, program], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = journal.read_text().split()
    assert lines[-1] == 'finalised', lines[-5:]
    assert sorted(map(int, lines[:-1])) == list(range(100))


def test_a_process_forked_after_the_pool_leaves_it_alone_at_exit(tmp_path) -> None:
    """A web server forks its workers after the pool (or host) started: their exit must
    neither print errors about our processes nor end them."""
    program = _program(tmp_path, '''
        import asyncio, os, sys, looppool
        from workers import Echo

        loop = asyncio.new_event_loop()
        pool = looppool.Pool(loop, pool_size=1, worker_class=Echo)
        loop.run_until_complete(pool.__aenter__())
        before = loop.run_until_complete(pool.submit(('pid',)))
        child = os.fork()           # as a pre-forking server does, at top level
        if child == 0:
            sys.exit(0)             # the forked web worker exits normally: atexit runs
        os.waitpid(child, 0)
        after = loop.run_until_complete(pool.submit(('pid',)))
        print('same worker' if before == after else 'worker replaced', flush=True)
        loop.run_until_complete(pool.stop())
        loop.close()
    ''')
    done = subprocess.run([sys.executable, program], env=_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'same worker'
    assert 'Error' not in done.stderr and 'Traceback' not in done.stderr, done.stderr


def test_handlers_clean_up_when_the_parent_dies(tmp_path) -> None:
    marker = tmp_path / 'cleaned'
    program = _program(tmp_path, f'''
        import asyncio, looppool

        class Careful(looppool.Worker):
            async def handle(self, message):
                try:
                    await asyncio.sleep(60)
                finally:
                    with open({str(marker)!r}, 'w') as f:
                        f.write('cleaned up')

        async def main():
            async with looppool.Pool(pool_size=1, worker_class=Careful) as pool:
                pool.submit('work')
                await asyncio.sleep(0.3)
                print('ready', flush=True)
                await asyncio.sleep(60)

        if __name__ == '__main__':
            asyncio.run(main())
    ''')
    with _parent(program, []) as parent:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == 'ready'
        parent.kill()
        parent.wait(5)
        wait_for(marker.exists, timeout=5, what="the handler's finally block to run")
        assert marker.read_text() == 'cleaned up'
