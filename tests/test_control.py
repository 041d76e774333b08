"""Controlling a served pool: the clients' pause(), resume(), restart() and stats(), and
``python -m looppool`` run as a real subprocess against a real host."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

import looppool
from conftest import run
from looppool import remote
from workers import Echo

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(looppool.__path__[0])


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [ROOT] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    return subprocess.run([sys.executable, '-m', 'looppool', *args], env=env,
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_the_command_reads_and_changes_a_served_pool(sock_path: str) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=2, mp_context='fork')
    try:
        with remote.connect_sync(sock_path) as client:
            assert client.submit('hello') == 'hello'
            before = client.broadcast(('pid',))

            status = _command('status', sock_path)
            assert status.returncode == 0, status.stderr
            lines = status.stdout.splitlines()
            # Two clients: this test's and the command's own.
            assert lines[0].startswith('pool: running, 2 workers, 2 clients, host pid ')
            top = next(index for index, line in enumerate(lines)
                       if line.split()[:2] == ['worker', 'pid'])
            assert lines[top].split()[:3] == ['worker', 'pid', 'state']
            rows = [line.split() for line in lines[top + 1:]]
            assert [row[:3] for row in rows] == [['0', str(before[0]), 'running'],
                                                 ['1', str(before[1]), 'running']]
            assert all(row[6] == 'MiB' for row in rows)   # RSS, read in the host

            as_json = _command('status', sock_path, '--json')
            assert as_json.returncode == 0, as_json.stderr
            stats = json.loads(as_json.stdout)
            assert [w['pid'] for w in stats['workers']] == before
            assert stats['completed'] >= 3

            paused = _command('pause', sock_path)
            assert paused.returncode == 0, paused.stderr
            assert paused.stdout.strip() == 'pause: done; the pool is paused'
            assert client.stats()['state'] == 'paused'
            assert [w['state'] for w in client.stats()['workers']] == ['paused'] * 2

            resumed = _command('resume', sock_path)
            assert resumed.returncode == 0, resumed.stderr
            assert client.stats()['state'] == 'running'

            restarted = _command('restart', sock_path)
            assert restarted.returncode == 0, restarted.stderr
            after = client.broadcast(('pid',))
            assert not set(after) & set(before)
            assert client.submit('still here') == 'still here'
    finally:
        handle.stop()


def test_the_command_says_what_failed(sock_path: str, tmp_path: Any) -> None:
    nobody = _command('status', str(tmp_path / 'no-such.sock'))
    assert nobody.returncode == 1
    assert 'python -m looppool status:' in nobody.stderr
    usage = _command('frobnicate', sock_path)
    assert usage.returncode == 2
    assert 'invalid choice' in usage.stderr
    bad_address = _command('status', 'localhost:port')
    assert bad_address.returncode == 2


def test_the_async_client_pauses_resumes_and_restarts(sock_path: str) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=2, mp_context='fork')
    try:
        async def main() -> None:
            async with remote.connect(sock_path) as client:
                before = await client.broadcast(('pid',))
                assert await asyncio.wait_for(client.pause(), 30) == 'paused'
                waiting = client.submit('after the pause')
                await asyncio.sleep(0.2)
                assert not waiting.done()
                assert (await client.stats())['state'] == 'paused'
                assert await asyncio.wait_for(client.resume(), 30) == 'running'
                assert await asyncio.wait_for(waiting, 30) == 'after the pause'
                assert await asyncio.wait_for(client.restart(), 60) == 'running'
                assert not set(await client.broadcast(('pid',))) & set(before)
        run(main())
    finally:
        handle.stop()
