"""Pool(reload=True): a real application on disk, edited while a real pool serves it from a
subprocess under a steady stream of requests: a change, a syntax error, an import error,
a fix. Nothing fails; the new code answers after each good change."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

pytest.importorskip('watchfiles', reason='reload needs the reload extra')

import looppool  # noqa: E402

ROOT = os.path.dirname(looppool.__path__[0])

WORKERS = '''\
import looppool

VERSION = {version}


class Versioned(looppool.Worker):
    async def handle(self, message):
        return VERSION
'''

SERVER = '''\
import asyncio
import logging
import sys

import looppool
import versioned


async def main():
    # one line a record (%r): a traceback in a record stays apart from what the workers
    # themselves print to this stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(levelname)s %(message)r')
    failures = 0
    async with looppool.Pool(pool_size=2, worker_class=versioned.Versioned,
                             reload=True) as pool:
        seen = None
        stop = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        while not stop.done():
            try:
                version = await pool.submit('which')
            except Exception as exc:
                failures += 1
                print('failure', repr(exc), flush=True)
                continue
            if version != seen:
                seen = version
                print('version', version, flush=True)
            await asyncio.sleep(0.005)
    print('failures', failures, flush=True)


if __name__ == '__main__':   # the workers import this module too (forkserver)
    asyncio.run(main())
'''


class Lines:
    """The lines a stream gives, read on a thread, waited for with a deadline."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self.lock:
                self.lines.append(line.rstrip('\n'))

    def wait_for(self, text: str, timeout: float = 30.0, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for index in range(start, len(self.lines)):
                    if text in self.lines[index]:
                        return index
            time.sleep(0.01)
        pytest.fail(f'{text!r} did not appear within {timeout} s; got:\n'
                    + '\n'.join(self.lines[-40:]))

    def wait_until(self, condition: Callable[[list[str]], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if condition(self.lines):
                    return
            time.sleep(0.01)
        pytest.fail(f'not within {timeout} s; got:\n' + '\n'.join(self.lines[-40:]))

    def count(self) -> int:
        with self.lock:
            return len(self.lines)


def _versions(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith('version')]


def _write(path: Path, text: str) -> None:
    # As an editor saves: a new file moved over the old one.
    temporary = path.with_suffix('.tmp')
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.mark.timeout(120)
def test_reload_follows_edits_and_survives_bad_ones(tmp_path: Path) -> None:
    app = tmp_path / 'app'
    app.mkdir()
    module = app / 'versioned.py'
    _write(module, WORKERS.format(version=1))
    (app / 'server.py').write_text(SERVER)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + ([env['PYTHONPATH']]
                                                  if env.get('PYTHONPATH') else []))
    server = subprocess.Popen([sys.executable, 'server.py'], cwd=app, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    out, err = Lines(server.stdout), Lines(server.stderr)
    try:
        out.wait_for('version 1')
        err.wait_for('reload: watching')

        _write(module, WORKERS.format(version=2))
        out.wait_for('version 2')
        err.wait_for('reload: the workers run the new code')

        _write(module, WORKERS.format(version='3 +'))   # a syntax error
        where = err.wait_for('versioned.py, line 3')
        assert 'the workers keep running the last good code' in err.lines[where]

        _write(module, 'import no_such_module\n' + WORKERS.format(version=4))
        where = err.wait_for('the new code does not start', 60)
        # logged in the pool's process, with the file and the line of the import
        assert 'versioned.py", line 1' in err.lines[where], err.lines[where]
        assert 'no_such_module' in err.lines[where], err.lines[where]

        mark = err.count()
        _write(module, WORKERS.format(version=5))
        out.wait_for('version 5', 60)
        err.wait_for('reload: the workers run the new code', 60, start=mark)
        # The old worker retiring last may answer its last task just before the restart is
        # done; every answer after that comes from the new code.
        out.wait_until(lambda lines: _versions(lines)[-1] == 'version 5')
        # During a rolling restart old and new workers both answer; no other code ever did.
        versions = _versions(out.lines)
        assert set(versions) == {'version 1', 'version 2', 'version 5'}, out.lines
        assert versions.index('version 5') > max(
            index for index, line in enumerate(versions) if line == 'version 1'), \
            '\n'.join(out.lines + err.lines)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(30)
        finally:
            if server.poll() is None:   # pragma: no cover - a hang: end it, fail below
                server.kill()
                server.wait(5)
        out.thread.join(5)
        err.thread.join(5)
        assert server.stdout is not None and server.stderr is not None
        server.stdout.close()
        server.stderr.close()
    assert out.lines[-1] == 'failures 0', out.lines[-10:]
    assert _versions(out.lines)[-1] == 'version 5', '\n'.join(out.lines + err.lines)
    assert server.returncode == 0, '\n'.join(err.lines[-40:])


def test_reload_refuses_fork() -> None:
    with pytest.raises(ValueError, match='fresh interpreters'):
        looppool.Pool(pool_size=1, reload=True, mp_context='fork')
