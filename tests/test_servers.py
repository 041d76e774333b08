"""Web servers sharing one pool: the server examples, run for real.

The Tornado (``fork_processes``), gunicorn (``on_starting`` / ``on_exit``, sync workers,
``connect_sync``) and FastAPI (gunicorn with uvicorn workers, an ``async`` endpoint
awaiting ``connect()``, a ``handle_batch`` pool worker) examples start real servers on
loopback and send them real HTTP requests; each test here reads what an example printed
and checks one thing a user relies on: every request answered, every web worker served
by the same pool workers of one host (and, for FastAPI, batches that carry the requests
of several web workers), and nothing left running afterwards, the pool host included.
The uWSGI and Flask examples run for real too (both servers are in the test extra; under CI=true a
missing one fails), and with the server hidden must say what to install and exit 0.

Each example runs once per module, in a session of its own; it starts the server in
another session. Neither session may have a process left when the example has exited,
and the pool host and pool workers it reported must be gone: those are not children of
the test process, so the autouse fixture of conftest.py cannot see them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from conftest import skip_unless_ci

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / 'examples'

# Each example takes a few seconds; the deadline leaves room for a slow machine.
EXAMPLE_DEADLINE = 45
pytestmark = pytest.mark.timeout(EXAMPLE_DEADLINE + 30)

REPLY = re.compile(r'^HTTP (\d+) from web worker (\d+): .* hashed by pool worker (\d+) '
                   r'\(pid (\d+)\) -> [0-9a-f]{16}$', re.M)
ANSWERED_BY = re.compile(r'^web worker (\d+) was answered by pool worker pids ([\d, ]+)$',
                         re.M)
SAME_POOL = re.compile(r'^all (\d+) web workers were answered by the same (\d+) pool '
                       r'workers \(pids ([\d, ]+)\) of pool host (\d+)$', re.M)
HOST_STARTED = re.compile(r'\] pool host pid (\d+) runs (\d+) pool workers?, serving (\S+)$',
                          re.M)
READY = re.compile(r'\] web worker pid (\d+) ready', re.M)
STOPPING = re.compile(r'^stopping .* \(SIGTERM to pid (\d+)\)$', re.M)
ALL_GONE = re.compile(r'^the pool host \(pid (\d+)\) and its pool workers \(pids ([\d, ]+)\) '
                      r'have exited$', re.M)
BATCH = re.compile(r'^batch (\d+) of pool worker 0 carried (\d+) requests of web workers '
                   r'([\d, ]+)$', re.M)
HOST_BATCHES = re.compile(r'^the pool host handed (\d+) messages to handle_batch in (\d+) '
                          r'batches: ', re.M)
MISSING = re.compile(r'^this example needs \w+: pip install \w+')


def pids(text: str) -> set[int]:
    return {int(pid) for pid in text.split(', ')}


@dataclass
class Run:
    """What an example printed, and the processes it told about."""
    returncode: int
    stdout: str
    stderr: str
    sessions: set[int]
    left: list[tuple[int, str]] = field(default_factory=list)  # found running afterwards

    def __repr__(self) -> str:  # shown in full when an assertion fails
        return (f'<exit code {self.returncode}>\n--- stdout ---\n{self.stdout}'
                f'--- stderr ---\n{self.stderr}')

    def reported_pids(self) -> set[int]:
        found: set[int] = set()
        for match in REPLY.finditer(self.stdout):
            found.add(int(match.group(4)))
        for match in HOST_STARTED.finditer(self.stdout):
            found.add(int(match.group(1)))
        for match in READY.finditer(self.stdout):
            found.add(int(match.group(1)))
        for match in SAME_POOL.finditer(self.stdout):
            found.add(int(match.group(4)))
        return found


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def in_sessions(sessions: set[int]) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions and \
                    process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            pass
    return found


def kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)


def run_example(name: str, tmp_path: Path, env: dict[str, str] | None = None,
                python: str = sys.executable) -> Run:
    """Run examples/``name`` with warnings as errors, in a session of its own; afterwards
    kill whatever it left (its session, the server's session, the processes it named)."""
    environment = dict(os.environ, PYTHONUNBUFFERED='1')
    environment['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + [p for p in environment.get('PYTHONPATH', '').split(os.pathsep) if p])
    environment.update(env or {})
    process = subprocess.Popen(
        [python, '-W', 'error', str(EXAMPLES / name)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=environment,
        start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=EXAMPLE_DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f'{name} did not end within {EXAMPLE_DEADLINE} s\n--- stdout ---\n'
                    f'{stdout}--- stderr ---\n{stderr}')
    sessions = {process.pid} | {int(m.group(1)) for m in STOPPING.finditer(stdout)}
    run = Run(process.returncode, stdout, stderr, sessions)
    print(f'{name}\n{run!r}')
    # Give a host that is shutting down a moment, then kill what is left, so that one
    # failure does not leave processes for the rest of the suite. The tests below say
    # whether anything was left.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
            in_sessions(sessions) or any(map(running, run.reported_pids()))):
        time.sleep(0.05)
    left = in_sessions(sessions)
    for pid in run.reported_pids():
        if running(pid):
            left.append(psutil.Process(pid))
    run.left = [(p.pid, p.name()) for p in left if p.is_running()]
    kill(left)
    return run


@pytest.fixture(scope='module')
def tornado_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run_example('server_tornado.py', tmp_path_factory.mktemp('tornado'))


@pytest.fixture(scope='module')
def gunicorn_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        pytest.fail('gunicorn is not installed; it is in the test extra: '
                    "pip install -e '.[test]'")
    return run_example('server_gunicorn.py', tmp_path_factory.mktemp('gunicorn'))


@pytest.fixture(scope='module')
def fastapi_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    for module, package in (('fastapi', 'fastapi'), ('uvicorn', 'uvicorn'),
                            ('uvicorn_worker', 'uvicorn-worker')):
        if importlib.util.find_spec(module) is None:
            skip_unless_ci(f'server_fastapi.py needs {package}, which is not installed; it '
                           "is in the test extra: pip install -e '.[test]'")
    return run_example('server_fastapi.py', tmp_path_factory.mktemp('fastapi'))


SERVERS = pytest.mark.parametrize('example', ['tornado_run', 'gunicorn_run', 'fastapi_run'],
                                  ids=['tornado', 'gunicorn', 'fastapi'])


def get(request: pytest.FixtureRequest, example: str) -> Run:
    run: Run = request.getfixturevalue(example)
    return run


@SERVERS
def test_every_request_is_answered(request: pytest.FixtureRequest, example: str) -> None:
    run = get(request, example)
    assert run.returncode == 0, run
    replies = REPLY.findall(run.stdout)
    # At least one burst of 2 requests per web worker per pool worker.
    started = HOST_STARTED.search(run.stdout)
    assert started, run
    assert len(replies) >= 2 * 2 * int(started.group(2)), run
    assert {status for status, *_ in replies} == {'200'}, run
    assert 'FAILED' not in run.stdout, run


@SERVERS
def test_every_web_worker_is_served_by_the_same_pool(request: pytest.FixtureRequest,
                                                     example: str) -> None:
    run = get(request, example)
    started = HOST_STARTED.search(run.stdout)
    assert started, run
    host_pid, pool_size = int(started.group(1)), int(started.group(2))
    web_pids = {int(pid) for pid in READY.findall(run.stdout)}
    assert len(web_pids) == 2, run

    # Which pool worker answered which web worker, from the replies themselves.
    served: dict[int, set[int]] = {}
    numbers: dict[int, int] = {}
    for _, web_pid, number, pool_pid in REPLY.findall(run.stdout):
        served.setdefault(int(web_pid), set()).add(int(pool_pid))
        assert numbers.setdefault(int(pool_pid), int(number)) == int(number), run
    assert set(served) == web_pids, run
    pool_pids = set(numbers)
    assert len(pool_pids) == pool_size, run
    assert sorted(numbers.values()) == list(range(pool_size)), run
    for web_pid in web_pids:
        assert served[web_pid] == pool_pids, (web_pid, run)
    assert not pool_pids & web_pids and host_pid not in pool_pids | web_pids, run

    # The example's own summary says the same, and names the host the server started.
    summary = {int(web): pids(pool) for web, pool in ANSWERED_BY.findall(run.stdout)}
    assert summary == {web_pid: pool_pids for web_pid in web_pids}, run
    same = SAME_POOL.search(run.stdout)
    assert same and pids(same.group(3)) == pool_pids, run
    assert int(same.group(4)) == host_pid, run


@SERVERS
def test_the_server_stops_and_takes_the_pool_host_with_it(request: pytest.FixtureRequest,
                                                          example: str) -> None:
    run = get(request, example)
    assert 'the server exited with code 0' in run.stdout, run
    # The master stopped the host in its exit hook, after its web workers had exited.
    assert '] the web workers have exited; pool host stopped' in run.stdout, run
    gone = ALL_GONE.search(run.stdout)
    started = HOST_STARTED.search(run.stdout)
    assert gone and started, run
    assert int(gone.group(1)) == int(started.group(1)), run
    assert len(pids(gone.group(2))) == int(started.group(2)), run
    # Checked here too, not only by the example: nothing of it runs any more.
    assert run.left == [], run
    # The socket and its private directory were removed.
    assert not os.path.exists(started.group(3)), run
    assert not os.path.exists(os.path.dirname(started.group(3))), run


def test_fastapi_requests_of_both_web_workers_share_a_batch(fastapi_run: Run) -> None:
    """Batches form in the pool worker from whatever reached it: some batch carried the
    requests of both uvicorn web workers; the host's stats() counted every request in
    as many batches as the replies name, none over batch_size (16)."""
    run = fastapi_run
    assert run.returncode == 0, run
    web_pids = {int(pid) for pid in READY.findall(run.stdout)}
    batches = [(int(size), pids(web)) for _, size, web in BATCH.findall(run.stdout)]
    assert batches and all(1 <= size <= 16 for size, _ in batches), run
    assert all(web <= web_pids for _, web in batches), run
    assert any(web == web_pids for _, web in batches), run
    counted = HOST_BATCHES.search(run.stdout)
    assert counted, run
    assert int(counted.group(1)) == len(REPLY.findall(run.stdout)), run
    assert int(counted.group(2)) == len(batches), run
    assert sum(size for size, _ in batches) == int(counted.group(1)), run


def test_tornado_web_workers_stop_cleanly(tornado_run: Run) -> None:
    """SIGTERM to Tornado's master closes the stop pipe; each web worker finishes and
    exits 0, so fork_processes does not restart it."""
    run = tornado_run
    ready = READY.findall(run.stdout)
    stopped = re.findall(r'\] web worker pid (\d+) stopped$', run.stdout, re.M)
    assert sorted(ready) == sorted(stopped), run
    assert 'restarting' not in run.stdout, run


@SERVERS
def test_no_errors_are_printed(request: pytest.FixtureRequest, example: str) -> None:
    run = get(request, example)
    assert run.stderr == '', run
    for word in ('Traceback', 'Error', 'Exception ignored', 'Warning'):
        assert word not in run.stdout, run


# -- the examples for servers that are not looppool dependencies -----------------------------

def _uwsgi_program() -> str | None:
    """Where server_uwsgi.py looks for uwsgi: beside this interpreter, or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), 'uwsgi')
    return beside if os.access(beside, os.X_OK) else shutil.which('uwsgi')


OPTIONAL = {
    # example: (what it needs, whether that is installed here)
    'server_uwsgi.py': ('uWSGI', lambda: _uwsgi_program() is not None),
    'server_flask.py': ('Flask', lambda: importlib.util.find_spec('flask') is not None),
}


@pytest.mark.parametrize('name', sorted(OPTIONAL))
def test_optional_server_examples(name: str, tmp_path: Path) -> None:
    """The uWSGI and Flask recipes pass their demo like the others. Both servers are in the
    test extra; where one is missing the test is skipped, and fails under CI=true."""
    needs, installed = OPTIONAL[name]
    if not installed():
        skip_unless_ci(f'{name} needs {needs}, which is not installed; it is in the test '
                       "extra: pip install -e '.[test]'")
    run = run_example(name, tmp_path)
    assert run.returncode == 0, run
    assert run.left == [], run
    assert not MISSING.search(run.stdout), run
    replies = REPLY.findall(run.stdout)
    assert len(replies) >= 4 and {status for status, *_ in replies} == {'200'}, run
    assert 'FAILED' not in run.stdout, run
    assert SAME_POOL.search(run.stdout), run
    started, gone = HOST_STARTED.search(run.stdout), ALL_GONE.search(run.stdout)
    assert gone, run
    if started:   # uWSGI's master starts the host and says so; Flask's shared() does not
        assert int(gone.group(1)) == int(started.group(1)), run
    if name == 'server_flask.py':
        # Two processes called shared() at the same moment; one started the host.
        assert '1 of the 2 Flask processes started the pool host' in run.stdout, run


# example: what it says it needs when that is missing
NEEDS = {**{name: needs for name, (needs, _) in OPTIONAL.items()},
         'server_fastapi.py': 'FastAPI'}


@pytest.mark.parametrize('name', sorted(NEEDS))
def test_optional_server_examples_say_what_to_install(name: str, tmp_path: Path) -> None:
    """Where uWSGI, Flask or FastAPI is missing, the example says what to install and
    exits 0.

    Run here with the server hidden: Flask and FastAPI by modules of those names that
    cannot be imported, uWSGI by an interpreter with no uwsgi beside it (a symbolic link
    to this one in an empty directory, with this one's packages on PYTHONPATH) and none
    on PATH."""
    hidden = tmp_path / 'hidden'
    hidden.mkdir()
    for module in ('flask', 'fastapi'):
        (hidden / f'{module}.py').write_text("raise ImportError('hidden by the test')\n")
    python = hidden / 'python'
    python.symlink_to(sys.executable)
    path = [d for d in os.environ.get('PATH', '').split(os.pathsep)
            if d and not os.access(os.path.join(d, 'uwsgi'), os.X_OK)]
    env = {'PYTHONPATH': os.pathsep.join([str(ROOT), str(hidden), *site.getsitepackages()]),
           'PATH': os.pathsep.join(path)}
    run = run_example(name, tmp_path, env=env, python=str(python))
    assert run.returncode == 0 and run.stderr == '', run
    assert run.left == [], run
    needs = NEEDS[name]
    assert MISSING.match(run.stdout) and f'needs {needs}: ' in run.stdout, run
    assert len(run.stdout.splitlines()) == 1, run


def test_helper_modules_say_what_they_are(tmp_path: Path) -> None:
    """shared_workers.py and gunicorn_conf.py are run by the example tests too."""
    for name in ('shared_workers.py', 'gunicorn_conf.py', 'gunicorn_fastapi_conf.py'):
        run = run_example(name, tmp_path)
        assert run.returncode == 0 and run.stderr == '', run
        assert 'server_' in run.stdout, run
