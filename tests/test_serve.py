"""serve() under real load: its keeper starts a dead host again, and stop() never signals a
process that is not its own.

The keeper and the hosts are forked from this process (``mp_context='fork'``), so that a
handler added here to the ``looppool.remote`` logger writes the keeper's log to a file
the tests read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import looppool
from looppool import remote
from conftest import run, wait_for, wait_until
from looppool.remote.access import _answers
from serve_workers import FLAG, FailsWhileFlagged, NeverReady, NeverStarts
from workers import Echo

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(looppool.__path__[0])
TESTS = os.path.dirname(__file__)



@pytest.fixture
def keeper_log(tmp_path) -> Iterator[Callable[[], list[str]]]:
    """The ``looppool.remote`` records written by this process and those forked from it
    (the keeper), one string each: ``'<time> <level> <message>'``."""
    path = tmp_path / 'remote.log'
    handler = logging.FileHandler(path)
    handler.terminator = '\x1e\n'   # messages span lines (tracebacks): end records plainly
    handler.setFormatter(logging.Formatter('%(created).6f %(levelname)s %(message)s'))
    logger = logging.getLogger('looppool.remote')
    logger.addHandler(handler)
    try:
        yield lambda: [record for record in path.read_text().split('\x1e\n') if record]
    finally:
        logger.removeHandler(handler)
        handler.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False



def _call(client: remote.SyncClient, message: Any, outcome: dict[str, Any]) -> None:
    try:
        outcome['reply'] = client.submit(message)
    except BaseException as exc:
        outcome['error'] = exc


# -- the keeper starts a dead host again -------------------------------------------------------

def test_a_host_killed_under_load_is_started_again(sock_path, keeper_log) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=2, mp_context='fork')
    sync_client = remote.connect_sync(sock_path)
    outcome: dict[str, Any] = {}
    caller = threading.Thread(target=_call, args=(sync_client, ('sleep', 30), outcome))
    first_pid = handle.pid
    first_workers = sync_client.broadcast(('pid',))
    assert handle.restarts == 0

    async def main() -> None:
        async with remote.connect(sock_path) as client:
            assert await client.submit(1) == 1
            in_flight = client.submit(('sleep', 30))
            caller.start()
            await wait_until(lambda: sync_client.stats()['in_flight'] == 2, 10,
                             'both calls to reach the workers')
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(remote.ConnectionLost):
                await asyncio.wait_for(in_flight, 10)
            # The dead host's socket file refuses connections until a new host replaces it.
            await wait_until(lambda: handle.restarts == 1 and _answers(sock_path), 20,
                             'the keeper to start a host that answers at the address')
            # The next call of each client that was connected is answered by the new host.
            assert await client.submit(2) == 2
            assert (await client.stats())['host_pid'] == handle.pid != first_pid

    try:
        run(main())
        caller.join(10)
        assert isinstance(outcome.get('error'), remote.ConnectionLost), outcome
        assert sync_client.submit(3) == 3
        assert sync_client.stats()['host_pid'] == handle.pid
        assert not set(sync_client.broadcast(('pid',))) & set(first_workers)
        wait_for(lambda: not any(map(_alive, [first_pid, *first_workers])), 10,
                 "the killed host's workers to exit")
        wait_for(lambda: any('started again' in record for record in keeper_log()), 10,
                 'the keeper to log the restart')
        records = keeper_log()
        died = [r for r in records if f'the pool host (pid {first_pid}) died with signal 9 '
                '(SIGKILL)' in r]
        assert len(died) == 1 and ' ERROR ' in died[0] and 'starting it again' in died[0], \
            records
        assert any(f'started again (pid {handle.pid}, restart 1) and serves {sock_path}' in r
                   for r in records), records
        assert handle.restarts == 1
    finally:
        sync_client.close()
        handle.stop()
    assert not _alive(handle.pid) and not os.path.exists(sock_path)


def _scheduled(records: list[str]) -> list[tuple[float, str, float, int]]:
    """(time, message, delay, failures in a row) of each logged failure with a back-off."""
    found = []
    for record in records:
        match = re.search(r'starting it again in (\d+\.\d) s \((\d+) failures? in a row\)$',
                          record)
        if match:
            found.append((float(record.split(' ', 1)[0]), record, float(match.group(1)),
                          int(match.group(2))))
    return found


def test_the_back_off_grows_while_the_host_keeps_failing_to_start(
        sock_path, tmp_path, keeper_log, monkeypatch) -> None:
    flag = tmp_path / 'fail'
    monkeypatch.setenv(FLAG, str(flag))
    handle = remote.serve(FailsWhileFlagged, sock_path, pool_size=1, mp_context='fork')
    client = remote.connect_sync(sock_path)
    try:
        assert client.submit(1) == 1
        flag.touch()   # from now on every new host fails at start
        os.kill(handle.pid, signal.SIGKILL)
        failures = wait_for(lambda: len(_scheduled(keeper_log())) >= 4 and
                            _scheduled(keeper_log()), 30, 'four failures in a row')[:4]
        # The killed host (it had just started: a quick death), then three failed starts.
        assert [(delay, row) for _, _, delay, row in failures] == \
            [(0.1, 1), (0.2, 2), (0.4, 3), (0.8, 4)], failures
        assert 'died with signal 9 (SIGKILL)' in failures[0][1]
        for _, message, _, _ in failures[1:]:
            assert 'could not start' in message and 'refuses to start' in message, message
        # Each start waited out the back-off the previous failure announced.
        for (before, _, delay, _), (after, _, _, _) in zip(failures, failures[1:]):
            assert after - before >= delay
        flag.unlink()
        wait_for(lambda: any('started again' in r for r in keeper_log()), 30,
                 'a host to start once it can')
        assert client.submit(2) == 2
        failed_starts = sum('could not start' in r for r in keeper_log())
        assert handle.restarts == failed_starts + 1
        assert client.stats()['host_pid'] == handle.pid
    finally:
        client.close()
        handle.stop()


def test_restart_false_leaves_a_dead_host_dead(sock_path, keeper_log) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=1, restart=False, mp_context='fork')
    try:
        first_pid = handle.pid
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: any('not started again' in r for r in keeper_log()), 10,
                 'the keeper to log the death')
        assert not _answers(sock_path) and handle.restarts == 0
        assert handle.pid == first_pid
    finally:
        handle.stop(timeout=5)


def test_a_keeper_sent_sigterm_stops_its_host_and_exits(sock_path, keeper_log) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=1, mp_context='fork')
    try:
        host_pid = handle.pid
        os.kill(handle.keeper_pid, signal.SIGTERM)   # our child, not reaped: still its pid
        wait_for(lambda: not _alive(host_pid) and not _alive(handle.keeper_pid), 15,
                 'the host and then the keeper to exit')
        assert handle.restarts == 0 and not os.path.exists(sock_path)
    finally:
        handle.stop()
    assert any('had exited before stop() was called' in r for r in keeper_log())


def test_stop_kills_a_host_that_does_not_finish_in_time(sock_path, keeper_log) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=1, mp_context='fork')
    client = remote.connect_sync(sock_path)
    try:
        worker = client.submit(('pid',))
        outcome: dict[str, Any] = {}
        caller = threading.Thread(target=_call, args=(client, ('spin', 60), outcome))
        caller.start()
        wait_for(lambda: client.stats()['in_flight'] == 1, 10, 'the task to start')
        host_pid = handle.pid
        handle.stop(timeout=0.5)
        caller.join(10)
        assert isinstance(outcome.get('error'), remote.ConnectionLost), outcome
        wait_for(lambda: not _alive(host_pid) and not _alive(worker), 10,
                 'the killed host and its worker to exit')
        assert any(f'the pool host (pid {host_pid}) did not stop within 0.5 s; killing it'
                   in r for r in keeper_log())
    finally:
        client.close()
        handle.stop()


def test_start_errors_surface_in_serve(sock_path) -> None:
    with pytest.raises(RuntimeError, match='(?s)could not start.*this worker never starts'):
        remote.serve(NeverStarts, sock_path, pool_size=1)
    with pytest.raises(TimeoutError, match='did not start within 1'):
        remote.serve(NeverReady, sock_path, pool_size=1, start_timeout=1)
    # conftest checks that neither left a keeper, a host or a pool worker behind.


# -- stop() never signals a pid that is not its child any more --------------------------------

# A web server's master in miniature: it reaps every child that exits, as gunicorn's
# SIGCHLD handler and Tornado's fork_processes do, behind the handle's back.
MASTER = textwrap.dedent('''
    import json, os, signal, subprocess, sys, time
    import psutil
    from looppool import remote
    from workers import Echo

    address, use_pidfd, when, reuse = sys.argv[1], sys.argv[2] == 'pidfd', *sys.argv[3:]
    if not use_pidfd:
        del os.pidfd_open           # as on Linux before 5.3
    handle = remote.serve(Echo, address, pool_size=1)
    pool = [handle.pid] + [w.pid for w in psutil.Process(handle.pid).children()]
    children = [child.pid for child in psutil.Process().children()]

    reaped = []
    def reap(*_):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            reaped.append(pid)
    signal.signal(signal.SIGCHLD, reap)

    def wait(condition, what):
        deadline = time.monotonic() + 20
        while not condition():
            if time.monotonic() > deadline:
                sys.exit(f'timed out waiting for {what}')
            time.sleep(0.01)

    sleeper, mark = None, 0
    if when == 'dead-before-stop':
        for pid in children:
            os.kill(pid, signal.SIGKILL)   # not reaped yet: these pids are still ours
        wait(lambda: set(children) <= set(reaped), 'the master to reap its children')
        # Give the first reaped pid to a new process, where the kernel lets us choose it.
        for attempt in range(100 if reuse == 'reuse' else 0):
            try:
                with open('/proc/sys/kernel/ns_last_pid', 'w') as last_pid:
                    last_pid.write(str(children[0] - 1))
            except OSError:
                break
            candidate = subprocess.Popen(['sleep', '60'])
            mark = len(reaped)
            if candidate.pid == children[0]:
                sleeper = candidate
                break
            candidate.kill()
            wait(lambda: candidate.pid in reaped[mark:], 'a candidate to be reaped')

    signalled = []
    real_kill = os.kill
    def recording_kill(pid, signum):
        signalled.append(pid)
        real_kill(pid, signum)
    os.kill = recording_kill
    error = None
    try:
        handle.stop(timeout=10)
    except BaseException as exc:
        error = repr(exc)
    os.kill = real_kill
    try:
        sleeper_alive = sleeper is not None and sleeper.pid not in reaped[mark:] and \\
            psutil.Process(sleeper.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        sleeper_alive = False
    print(json.dumps({'error': error, 'children': children, 'pool': pool,
                      'signalled': signalled, 'reused': sleeper is not None,
                      'sleeper_alive': sleeper_alive}), flush=True)
    if sleeper_alive:
        sleeper.kill()
        wait(lambda: sleeper.pid in reaped[mark:], 'the sleeper to be reaped')
''')


def _run_master(tmp_path, sock_path: str, pidfd: str, when: str, reuse: str = 'no-reuse'
                ) -> tuple[dict[str, Any], str]:
    program = tmp_path / 'master.py'
    program.write_text(MASTER)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, TESTS])}
    try:
        done = subprocess.run([sys.executable, str(program), sock_path, pidfd, when, reuse],
                              env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f'the master did not finish within 60 s: {expired.stderr!r}')
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    print(result, done.stderr)
    # The host and its workers (orphaned when the keeper died) are not our descendants:
    # conftest cannot see them, so check here that they ended.
    wait_for(lambda: not any(map(_alive, result['pool'])), 15,
             'the host and its pool workers to exit')
    return result, done.stderr


@pytest.mark.parametrize('pidfd', ['pidfd', 'no-pidfd'])
def test_stop_after_the_master_reaped_the_keeper(tmp_path, sock_path, pidfd) -> None:
    """The keeper died and the master's own reaper collected it before stop(): stop()
    raises nothing (no ProcessLookupError) and sends no signal to the reaped pid."""
    result, stderr = _run_master(tmp_path, sock_path, pidfd, 'dead-before-stop')
    assert result['error'] is None, stderr
    assert not set(result['signalled']) & set(result['children']), result
    assert 'had exited before stop() was called' in stderr


def _can_choose_pids() -> bool:
    try:
        with open('/proc/sys/kernel/ns_last_pid', 'r+'):
            return os.geteuid() == 0
    except OSError:
        return False


@pytest.mark.skipif(not _can_choose_pids(), reason='choosing the next pid needs root '
                    '(/proc/sys/kernel/ns_last_pid)')
@pytest.mark.parametrize('pidfd', ['pidfd', 'no-pidfd'])
def test_stop_spares_the_process_that_got_the_reaped_keepers_pid(tmp_path, sock_path,
                                                                 pidfd) -> None:
    """As above, and then the reaped keeper's pid is given to an unrelated process (a
    child of the master, at that): stop() leaves it alone."""
    result, stderr = _run_master(tmp_path, sock_path, pidfd, 'dead-before-stop', 'reuse')
    if not result['reused']:
        pytest.skip('other processes took the pid 100 times in a row')
    assert result['error'] is None, stderr
    assert not set(result['signalled']) & set(result['children']), result
    assert result['sleeper_alive'], result


def test_stop_while_the_master_reaps_the_exiting_keeper(tmp_path, sock_path) -> None:
    """gunicorn's on_exit: stop() runs while the master's SIGCHLD handler reaps the keeper
    as it exits. stop() is quiet, signals nothing by pid, and the host has stopped."""
    result, stderr = _run_master(tmp_path, sock_path, 'pidfd', 'reaped-during-stop')
    assert result['error'] is None, stderr
    assert result['signalled'] == [], result
    assert stderr == ''
