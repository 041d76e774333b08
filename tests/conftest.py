"""Fixtures shared by the suite: every test must leave no child process behind."""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import hypothesis  # noqa: F401 - see below
import psutil
import pytest

# hypothesis's pytest plugin imports hypothesis lazily in the terminal summary, where
# pytest's assertion rewriter parses it; CPython 3.11.7 can raise "AST constructor recursion
# depth mismatch" there (a bug fixed in 3.11.8). Importing it up front avoids that parse.

sys.path.insert(0, os.path.dirname(__file__))

# The helper processes multiprocessing keeps for the whole test session by design: the
# forkserver and the resource tracker this process started. They are told apart from
# everything else precisely, by the pid multiprocessing recorded when it started them, or
# (for helpers of a child process) by their exact command line *and* a parent that is not
# itself such a helper. Matching a word in the command line is not enough: a forkserver's
# children are forks of it and carry its command line until they retitle themselves, so a
# leaked worker that never did would look like the forkserver.
_HELPER_COMMANDS = ('from multiprocessing.forkserver import main; main(',
                    'from multiprocessing.resource_tracker import main;main(')


def _helper_pids() -> set[int]:
    """The pids of the forkserver and resource tracker this process started, if running."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    pids = {getattr(multiprocessing.forkserver._forkserver, '_forkserver_pid', None),
            getattr(multiprocessing.resource_tracker._resource_tracker, '_pid', None)}
    return {pid for pid in pids if pid is not None}


def _is_helper_command(cmdline: list[str]) -> bool:
    return (len(cmdline) >= 2 and cmdline[-2] == '-c'
            and cmdline[-1].startswith(_HELPER_COMMANDS))


def _is_helper(process: psutil.Process, cmdline: list[str], helpers: set[int]) -> bool:
    if process.pid in helpers:
        return True
    if not _is_helper_command(cmdline):
        return False
    try:
        parent = process.parent()
        return parent is not None and not _is_helper_command(parent.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def _children() -> list[psutil.Process]:
    """This process's descendants, but for multiprocessing's own helper processes."""
    helpers = _helper_pids()
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if _is_helper(child, cmdline, helpers):
            continue
        found.append(child)
    return found


# scripts/test.sh installs every test dependency, and under CI=true it fails when it cannot;
# so there a missing one fails the tests that need it instead of skipping them unseen.
IN_CI = os.environ.get('CI') == 'true'


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip the test for the missing dependency ``reason`` names; fail it under CI=true."""
    if IN_CI:
        pytest.fail(f'{reason}; under CI=true every test dependency must be installed',
                    pytrace=False)
    pytest.skip(reason)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = 'condition'
             ) -> Any:
    """Wait (blocking) until ``condition()`` is true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f'timed out after {timeout} s waiting for {what}')
        time.sleep(0.01)


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0,
                     what: str = 'condition') -> Any:
    """Wait on the loop until ``condition()`` is true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f'timed out after {timeout} s waiting for {what}')
        await asyncio.sleep(0.01)


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on a fresh loop (each test owns its loop)."""
    return asyncio.run(main)


@pytest.fixture(autouse=True)
def no_children_left(request: pytest.FixtureRequest):
    """Fail a test that leaves a child process; kill what it left either way."""
    before = {child.pid for child in _children()}
    yield
    deadline = time.monotonic() + 5
    left = [c for c in _children() if c.pid not in before]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [c for c in _children() if c.pid not in before and c.is_running()
                and c.status() != psutil.STATUS_ZOMBIE]
    for child in left:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    if left and not request.node.get_closest_marker('leaves_children'):
        pytest.fail(f'the test left {len(left)} child process(es): '
                    f'{[(c.pid, c.name()) for c in left if c.is_running()]}')


@pytest.fixture
def sock_path(tmp_path) -> str:
    """A Unix socket path for a pool host, in a directory only this user can enter."""
    directory = tmp_path / 'run'
    directory.mkdir(mode=0o700)
    return str(directory / 'echo.sock')


class _Mark:
    """Unpickling this makes the directory ``path``: the trace of a pickle that was read."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return os.mkdir, (self.path,)


@pytest.fixture
def mark(tmp_path) -> tuple[str, bytes]:
    """A path, and a pickle that makes a directory there when it is unpickled: a test at a
    trust boundary checks that the path does not appear."""
    path = str(tmp_path / 'unpickled')
    return path, pickle.dumps(_Mark(path))
