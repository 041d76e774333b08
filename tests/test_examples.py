"""Every program in examples/ runs, prints what it should, exits 0 and leaves no process.

Each example runs in its own session under a small supervisor (this module, run as a
script): on Linux the supervisor makes itself the child subreaper, so any process that
outlives the example's main process is re-parented to the supervisor, which reports it and
kills it. The test also checks that nothing of the session is left once the supervisor
exits, and kills the whole session in a ``finally`` if the example hangs.

The services the examples talk to are real: a Tornado HTTP server on loopback (the
Looppool 0.3 fetch example runs unchanged, with Tornado's HTTP client configured to send
its requests there) and a UDP socket standing in for statsd.

This module doubles as the helper program for those subprocesses::

    python test_examples.py supervise REPORT_FILE -- COMMAND...
    python test_examples.py serve-http
    python test_examples.py run [--start-method METHOD] [--http-port PORT] PROGRAM
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = ROOT / 'examples'

# How long one example may run before the test kills it (each is expected to take seconds).
EXAMPLE_DEADLINE = 60.0

# multiprocessing's own helpers end on their own once their parent is gone.
_MP_HELPERS = ('multiprocessing.forkserver', 'multiprocessing.resource_tracker')


# -- helper programs (run in subprocesses) ---------------------------------------------------

def _set_child_subreaper() -> bool:
    """Adopt the orphans of our descendants (Linux only), so that we can see and reap them."""
    if not sys.platform.startswith('linux'):
        return False
    import ctypes
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)


def _cmdline(process: psutil.Process) -> list[str] | None:
    try:
        cmdline: list[str] = process.cmdline()
        return cmdline
    except psutil.Error:  # gone, or a zombie: its command line is no longer readable
        return None


def _supervise(report_file: str, command: list[str]) -> int:
    """Run ``command``; then report (and kill) every process that outlived it.

    Only multiprocessing's helpers (forkserver, resource tracker) may outlive it, for as
    long as they take to notice that their parent is gone. By then they may be zombies,
    whose command lines cannot be read, so the command lines of the descendants are noted
    while the example runs.
    """
    subreaper = _set_child_subreaper()
    me = psutil.Process()
    example = subprocess.Popen(command)
    seen: dict[int, list[str]] = {}
    returncode = None
    while returncode is None:
        for process in me.children(recursive=True):
            # Read again each time: a helper is forked with the example's command line
            # and then executes its own program.
            cmdline = _cmdline(process)
            if cmdline:   # (a zombie's reads empty: keep what was read while it lived)
                seen[process.pid] = cmdline
        try:
            returncode = example.wait(0.05)
        except subprocess.TimeoutExpired:
            pass

    orphans = me.children(recursive=True)
    deadline = time.monotonic() + 5
    left = []
    for orphan in orphans:
        cmdline = seen.get(orphan.pid) or _cmdline(orphan) or []
        if any(helper in ' '.join(cmdline) for helper in _MP_HELPERS):
            try:
                orphan.wait(max(0.0, deadline - time.monotonic()))
                continue
            except psutil.TimeoutExpired:
                pass
            except psutil.NoSuchProcess:
                continue
        try:
            status = orphan.status()
        except psutil.Error:
            status = 'gone'
        left.append({'pid': orphan.pid, 'status': status, 'cmdline': cmdline})
    for orphan in orphans:
        try:
            orphan.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(orphans, timeout=5)
    Path(report_file).write_text(json.dumps(
        {'returncode': returncode, 'subreaper': subreaper, 'left': left}))
    return 0


def _serve_http() -> None:
    """A Tornado web server on a free loopback port: prints the port, then serves until
    its standard input closes. Every response names, in its ``Server`` header, the host
    the client asked for."""
    import asyncio

    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    class Handler(tornado.web.RequestHandler):
        def get(self, path: str) -> None:
            self.set_header('Server', f'test server for {self.request.host}')
            self.write(f'you asked {self.request.host} for /{path}\n')

    async def main() -> None:
        sockets = tornado.netutil.bind_sockets(0, '127.0.0.1')
        server = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r'/(.*)', Handler)]))
        server.add_sockets(sockets)
        print(sockets[0].getsockname()[1], flush=True)
        stdin_closed = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_stdin() -> None:
            if not os.read(sys.stdin.fileno(), 4096):
                loop.remove_reader(sys.stdin.fileno())
                stdin_closed.set()

        loop.add_reader(sys.stdin.fileno(), on_stdin)
        await stdin_closed.wait()
        server.stop()
        await server.close_all_connections()

    asyncio.run(main())


def _run_program(program: str, start_method: str | None, http_port: int | None) -> None:
    """Run ``program`` unchanged, as ``python program`` would, after two optional settings:

    ``start_method``: multiprocessing's default start method.

    ``http_port``: every AsyncHTTPClient request goes to the local server instead, as plain
    HTTP to 127.0.0.1:http_port with the same path and query and the original host in the
    ``Host`` header. Worker processes inherit the setting only when they are forked.
    """
    import multiprocessing
    import runpy
    import urllib.parse

    from tornado import httpclient, simple_httpclient

    if start_method is not None:
        multiprocessing.set_start_method(start_method)

    if http_port is not None:
        class LocalHTTPClient(simple_httpclient.SimpleAsyncHTTPClient):
            def fetch_impl(self, request: Any, callback: Any) -> None:
                parts = urllib.parse.urlsplit(request.url)
                request.headers['Host'] = parts.netloc
                request.url = urllib.parse.urlunsplit(
                    ('http', f'127.0.0.1:{http_port}', parts.path or '/', parts.query, ''))
                super().fetch_impl(request, callback)

        httpclient.AsyncHTTPClient.configure(LocalHTTPClient)

    sys.argv = [program]
    sys.path[0] = os.path.dirname(os.path.abspath(program))
    runpy.run_path(program, run_name='__main__')


def _main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(description='helper programs of test_examples.py')
    commands = parser.add_subparsers(dest='command', required=True)
    supervise = commands.add_parser('supervise')
    supervise.add_argument('report_file')
    supervise.add_argument('example', nargs=argparse.REMAINDER)
    commands.add_parser('serve-http')
    run = commands.add_parser('run')
    run.add_argument('--start-method')
    run.add_argument('--http-port', type=int)
    run.add_argument('program')
    args = parser.parse_args(argv)
    if args.command == 'supervise':
        example = args.example[1:] if args.example[:1] == ['--'] else args.example
        return _supervise(args.report_file, example)
    if args.command == 'serve-http':
        _serve_http()
    else:
        _run_program(args.program, args.start_method, args.http_port)
    return 0


# -- running an example ----------------------------------------------------------------------

class Outcome:
    """What an example did: its exit code and output."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def __repr__(self) -> str:
        return (f'<exit code {self.returncode}>\n--- stdout ---\n{self.stdout}'
                f'--- stderr ---\n{self.stderr}')


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            pass
    return found


def run_example(command: list[str], tmp_path: Path, env: dict[str, str] | None = None
                ) -> Outcome:
    """Run ``command`` (an example) supervised, in a session of its own, with warnings as
    errors; assert that it ended in time and left no process behind."""
    report_file = tmp_path / 'supervisor.json'
    environment = dict(os.environ)
    environment['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + [p for p in environment.get('PYTHONPATH', '').split(os.pathsep) if p])
    environment['PYTHONUNBUFFERED'] = '1'
    environment.update(env or {})
    supervisor = subprocess.Popen(
        [sys.executable, __file__, 'supervise', str(report_file), '--', *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=environment, start_new_session=True)
    try:
        try:
            stdout, stderr = supervisor.communicate(timeout=EXAMPLE_DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            stdout, stderr = supervisor.communicate()
            pytest.fail(f'{command} did not end within {EXAMPLE_DEADLINE} s; output so far:\n'
                        f'--- stdout ---\n{stdout}--- stderr ---\n{stderr}')
        assert supervisor.returncode == 0, f'the supervisor failed:\n{stderr}'
        report = json.loads(report_file.read_text())
        outcome = Outcome(report['returncode'], stdout, stderr)
        print(f'{command}\n{outcome!r}')  # shown in full when the test fails
        assert not report['left'], (
            f'processes outlived the example and were killed: {report["left"]}\n{outcome!r}')
        left = _session_processes(supervisor.pid)
        assert not left, f'processes of the example are still running: ' \
                         f'{[(p.pid, _cmdline(p)) for p in left]}'
        return outcome
    finally:
        try:
            os.killpg(supervisor.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def python(*args: str) -> list[str]:
    """A command running this interpreter with every warning an error."""
    return [sys.executable, '-W', 'error', *args]


def example_path(name: str) -> str:
    return str(EXAMPLES / name)


def example_command(name: str, start_method: str | None = None) -> list[str]:
    """Run examples/``name`` as it is, or with another default start method."""
    if start_method is None:
        return python(example_path(name))
    return python(__file__, 'run', '--start-method', start_method, example_path(name))


# The examples run with the interpreter's default start method; those whose worker classes
# and messages live in the program's __main__ run under the others as well.
START_METHODS = pytest.mark.parametrize('start_method', [None, 'forkserver', 'spawn'],
                                        ids=['default', 'forkserver', 'spawn'])


# -- fixtures: real services -----------------------------------------------------------------

@pytest.fixture
def http_server() -> Iterator[int]:
    """The port of a Tornado HTTP server on 127.0.0.1, running in its own process."""
    server = subprocess.Popen([sys.executable, __file__, 'serve-http'], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), f'the HTTP server did not start: {line!r}'
        yield int(line)
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            pytest.fail('the HTTP server did not stop when its standard input closed')
        finally:
            server.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def statsd_socket() -> Iterator[socket.socket]:
    """A UDP socket on 127.0.0.1 playing the statsd server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(('127.0.0.1', 0))
    try:
        yield sock
    finally:
        sock.close()


def received_metrics(sock: socket.socket) -> dict[str, list[tuple[float, str]]]:
    """Every statsd datagram waiting on ``sock``, as name -> [(value, type), ...]."""
    sock.setblocking(False)
    metrics: dict[str, list[tuple[float, str]]] = {}
    while True:
        try:
            datagram = sock.recv(65536)
        except BlockingIOError:
            return metrics
        for line in datagram.decode().splitlines():
            name, _, rest = line.partition(':')
            value, _, kind = rest.partition('|')
            metrics.setdefault(name, []).append((float(value), kind.split('|')[0]))


# -- the examples ----------------------------------------------------------------------------

TESTED = {'looppool_fetch.py', 'looppool_instrumented.py', 'webapp.py', 'lookup_table.py',
          'operating.py', 'dask_cluster.py'}
# Run for real, against real servers, by tests/test_servers.py.
TESTED_IN_TEST_SERVERS = {'server_tornado.py', 'server_gunicorn.py', 'gunicorn_conf.py',
                          'server_fastapi.py', 'gunicorn_fastapi_conf.py',
                          'server_uwsgi.py', 'server_flask.py', 'shared_workers.py'}
# Run for real, scraped over HTTP, by tests/test_prometheus.py.
TESTED_IN_TEST_PROMETHEUS = {'prometheus_metrics.py'}


def test_every_example_is_tested() -> None:
    found = {path.name for path in EXAMPLES.glob('*.py')}
    assert found == TESTED | TESTED_IN_TEST_SERVERS | TESTED_IN_TEST_PROMETHEUS, \
        'every program in examples/ needs a test (here, in test_servers.py or ' \
        'test_prometheus.py)'


def test_looppool_fetch(tmp_path: Path, http_server: int) -> None:
    """Looppool 0.3's usage program, unchanged, fetching from the local server."""
    # The workers must be forked to inherit the HTTP client's configuration. On Python
    # 3.12+, IOLoop.instance() with no loop running makes asyncio warn (in Tornado's code,
    # so Python does not show it by default); that is the program as Looppool wrote it.
    outcome = run_example(
        python('-W', 'ignore:There is no current event loop:DeprecationWarning',
               __file__, 'run', '--start-method', 'fork', '--http-port', str(http_server),
               example_path('looppool_fetch.py')), tmp_path)
    assert outcome.returncode == 0, outcome
    assert outcome.stderr == '', outcome
    results = [ast.literal_eval(line) for line in outcome.lines]
    urls = ['https://python.org/', 'http://tornadoweb.org/', 'https://google.com/',
            'https://stackoverflow.com/']
    # One (url, server header) per URL, in whatever order the workers finished.
    assert sorted(results) == sorted(
        (url, f'test server for {url.split("/")[2]}') for url in urls), outcome


def test_looppool_fetch_is_the_readme_program() -> None:
    """The file keeps the Looppool 0.3 README's code (the test above runs it unchanged)."""
    program = (EXAMPLES / 'looppool_fetch.py').read_text()
    for line in ('@looppool.task_done', '@gen.coroutine',
                 'response = yield self._http_client.fetch(url)',
                 "self._put_nowait((url, response.headers.get('server')))",
                 'loop = ioloop.IOLoop.instance()',
                 'pool = looppool.Pool(loop, pool_size = 4, worker_class = FetchWorker)',
                 'pool.process_message = process_message',
                 'list(map(pool.put_nowait, urls))', 'pool.stop()',
                 'ioloop.IOLoop.instance().run_sync(main)'):
        assert line in program


def test_looppool_instrumented(tmp_path: Path, statsd_socket: socket.socket) -> None:
    """The instrumented worker's gauges reach a real UDP socket, for every worker."""
    outcome = run_example(example_command('looppool_instrumented.py'), tmp_path, env={
        'STATSD_HOST': '127.0.0.1',
        'STATSD_PORT': str(statsd_socket.getsockname()[1]),
        'LOOPPOOL_REPORT_INTERVAL': '0.2',
    })
    assert outcome.returncode == 0, outcome
    assert outcome.stderr == '', outcome

    processed = [re.fullmatch(r"'(\w+)' was processed by worker (\d)", line)
                 for line in outcome.lines]
    processed_by = {m.group(1): int(m.group(2)) for m in processed if m}
    # put_nowait is round-robin: worker 0, 1, 0, 1.
    assert processed_by == {'alpha': 0, 'beta': 1, 'gamma': 0, 'delta': 1}, outcome
    titles = [line for line in outcome.lines if ' is titled ' in line]
    assert len(titles) == 2, outcome
    assert all(line.endswith("'python looppool-example instrumentated pool worker'")
               for line in titles), outcome
    assert outcome.lines[-1] == 'pool stopped', outcome

    metrics = received_metrics(statsd_socket)
    for number in (0, 1):
        prefix = f'looppool_example.worker.instrumentated.process.{number}'
        for gauge in ('cpu', 'rss', 'maxrss', 'ioloop.handler', 'ioloop.callback',
                      'ioloop.timeout'):
            name = f'{prefix}.{gauge}'
            assert name in metrics, f'no {name} gauge among {sorted(metrics)}'
            # The workers ran for two report intervals and more.
            assert len(metrics[name]) >= 2, (name, metrics[name])
            assert all(kind == 'g' for _, kind in metrics[name]), (name, metrics[name])
        assert all(value > 0 for value, _ in metrics[f'{prefix}.rss']), metrics


PRIMES_BELOW = {200_000: 17984, 220_000: 19618, 240_000: 21221, 260_000: 22837}


@START_METHODS
def test_webapp(tmp_path: Path, start_method: str | None) -> None:
    """The demo: heavy requests in the pool leave the server's loop free for fast ones."""
    started = time.monotonic()
    outcome = run_example(example_command('webapp.py', start_method), tmp_path)
    took = time.monotonic() - started
    assert outcome.returncode == 0, outcome
    assert outcome.stderr == '', outcome
    assert took < 20, f'the demo took {took:.1f} s\n{outcome!r}'

    header = re.search(r'^server pid (\d+); pool of (\d+) workers, pids ([\d, ]+)$',
                       outcome.stdout, re.M)
    assert header, outcome
    server_pid = int(header.group(1))
    worker_pids = {int(pid) for pid in header.group(3).split(', ')}
    assert len(worker_pids) == int(header.group(2)), outcome
    assert server_pid not in worker_pids, outcome

    rounds = outcome.stdout.split('\nround 2:')
    assert len(rounds) == 2, outcome
    answer = re.compile(r'n=(\d+): (\d+) primes, computed by (.+) \(pid (\d+)\) in ')
    inline = [m for m in map(answer.search, rounds[0].splitlines()) if m]
    pooled = [m for m in map(answer.search, rounds[1].splitlines()) if m]
    for matches in (inline, pooled):
        assert {int(m.group(1)): int(m.group(2)) for m in matches} == PRIMES_BELOW, outcome
    assert {(m.group(3), int(m.group(4))) for m in inline} == {
        ('the server process itself', server_pid)}, outcome
    # Four heavy requests over at most four workers, round-robin: every worker took one.
    assert {int(m.group(4)) for m in pooled} == worker_pids, outcome

    latency = re.search(r'^slowest /fast request: ([\d.]+) ms with the work inline, '
                        r'([\d.]+) ms with the work in the pool$', outcome.stdout, re.M)
    assert latency, outcome
    # The point of the demo: with the heavy work in the pool, the loop kept answering.
    assert float(latency.group(2)) < float(latency.group(1)), outcome
    assert outcome.lines[-1].startswith('pool stopped; total time '), outcome


@START_METHODS
def test_lookup_table(tmp_path: Path, start_method: str | None) -> None:
    """After each broadcast every worker answers from the new table, a replacement too."""
    outcome = run_example(example_command('lookup_table.py', start_method), tmp_path)
    assert outcome.returncode == 0, outcome

    sections = re.split(r'^-- .*$', outcome.stdout, flags=re.M)
    assert len(sections) == 4, outcome
    # Table v1 loaded, v2 loaded, then worker 1 died: each section's answers and loads.
    for index, (section, version) in enumerate(zip(sections[1:], (1, 2, 2))):
        loaded = re.findall(r'^worker (\d) \(pid \d+\) loaded table v(\d) \(4 rates\)$',
                            section, re.M)
        answers = re.findall(r'^100 EUR = [\d.]+ \w+: worker (\d) \(pid (\d+)\), '
                             r'table v(\d)$', section, re.M)
        assert len(answers) == 6, section
        assert {int(number) for number, _, _ in answers} == {0, 1, 2}, section
        assert {int(used) for _, _, used in answers} == {version}, section
        assert (f'6 queries answered by workers [0, 1, 2], all from table v{version}'
                in section), section
        if index < 2:
            assert sorted(loaded) == [(str(n), str(version)) for n in range(3)], section
    assert re.search(r'^the task was lost: worker 1 \(pid \d+\) exited with code 1 ',
                     sections[3], re.M), outcome
    replaced = re.search(r'^worker 1 was pid (\d+), its replacement is pid (\d+);',
                         sections[3], re.M)
    assert replaced and replaced.group(1) != replaced.group(2), outcome
    # The replacement answered from the table the pool replayed to it.
    assert re.search(rf'worker 1 \(pid {replaced.group(2)}\), table v2$', sections[3],
                     re.M), outcome
    assert outcome.lines[-1] == 'pool stopped', outcome
    # The pool logs the death, and nothing else.
    assert [line.split(':')[0] for line in outcome.stderr.splitlines()] == [
        'ERROR looppool'], outcome
    assert 'worker 1 (pid ' in outcome.stderr, outcome


@START_METHODS
def test_operating(tmp_path: Path, start_method: str | None) -> None:
    """One reporting period of statsd packets, worker logs in the parent, titles, stats()."""
    outcome = run_example(example_command('operating.py', start_method), tmp_path)
    assert outcome.returncode == 0, outcome
    assert outcome.stderr == '', outcome
    assert outcome.lines[-1] == 'pool stopped', outcome
    sections = dict(re.findall(r'^-- (.*?)\n(.*?)(?=^-- |^pool stopped$)', outcome.stdout,
                               re.M | re.S))
    period, logs, titles, stats = (
        sections[heading] for heading in (
            'statsd packets of one reporting period (0.5 s)',
            "log records from the workers, printed by the parent's handler",
            'process titles', 'pool.stats()'))

    # The period's packets, by sender: the pool's own metrics and each worker's gauges.
    sent: dict[str, list[tuple[str, float, str]]] = {}
    for sender, body in re.findall(r'^from the (pool|worker \d):\n((?:    .*\n)+)', period,
                                   re.M):
        for name, value, kind in re.findall(r'^    ([\w.]+):([\d.]+)\|(\w+)$', body, re.M):
            sent.setdefault(sender, []).append((name, float(value), kind))
    assert set(sent) == {'pool', 'worker 0', 'worker 1'}, outcome
    pool = {(name, kind): value for name, value, kind in sent['pool'] if kind != 'ms'}
    # The three prices asked for in the period, and nothing else.
    assert pool[('shop.looppool.tasks.submitted', 'c')] == 3, outcome
    assert pool[('shop.looppool.tasks.completed', 'c')] == 3, outcome
    for gauge in ('tasks.in_flight', 'tasks.waiting', 'worker.0.in_flight',
                  'worker.1.in_flight'):
        assert pool[(f'shop.looppool.{gauge}', 'g')] == 0, outcome
    durations = [value for name, value, kind in sent['pool'] if kind == 'ms']
    assert len(durations) == 3 and all(10 <= value < 5000 for value in durations), outcome
    assert all(name == 'shop.looppool.tasks.duration' for name, _, kind in sent['pool']
               if kind == 'ms'), outcome
    for number in (0, 1):
        gauges = {name: value for name, value, kind in sent[f'worker {number}']
                  if kind == 'g'}
        assert {name.split('.', 3)[3] for name in gauges} == {
            'cpu', 'rss', 'maxrss', 'ioloop.handler', 'ioloop.callback', 'ioloop.timeout',
            'ioloop.lag'}, outcome
        assert gauges[f'shop.worker.{number}.rss'] > 0, outcome
        # The loop watches at least its own wake-up pipe and the channel to the parent.
        assert gauges[f'shop.worker.{number}.ioloop.handler'] >= 2, outcome

    # The titles name each worker and the parent's own title.
    parent = re.search(r'^parent \(pid \d+\): (.+)$', titles, re.M)
    assert parent and 'operating.py' in parent.group(1), outcome
    worker_pids = {}
    for number, pid, title in re.findall(r'^worker (\d) \(pid (\d+)\): (.+)$', titles, re.M):
        assert title == f'looppool worker {number} | {parent.group(1)}', outcome
        worker_pids[int(number)] = int(pid)
    assert sorted(worker_pids) == [0, 1], outcome

    # Each record names the worker it was made in; the exception keeps its traceback.
    log_lines = logs.splitlines()
    assert log_lines[0] == (
        f'WARNING shop.pricing (processName=looppool worker 0, worker_number=0, '
        f'worker_pid={worker_pids[0]}): stock of apples is low'), outcome
    assert log_lines[1] == (
        f'ERROR shop.pricing (processName=looppool worker 1, worker_number=1, '
        f"worker_pid={worker_pids[1]}): could not read the quantity 'seven'"), outcome
    assert log_lines[2] == 'Traceback (most recent call last):', outcome
    assert log_lines[-1] == "ValueError: invalid literal for int() with base 10: 'seven'", \
        outcome

    # stats() is plain data: three prices and two logging tasks, all answered.
    # (the pool's state changes are logged at INFO: the stop's come after the JSON)
    numbers = json.loads(stats.split('\nINFO looppool ', 1)[0])
    assert {key: numbers[key] for key in (
        'state', 'pool_size', 'submitted', 'completed', 'failed', 'lost', 'restarts',
        'in_flight', 'waiting')} == {
        'state': 'running', 'pool_size': 2, 'submitted': 5, 'completed': 5, 'failed': 0,
        'lost': 0, 'restarts': 0, 'in_flight': 0, 'waiting': 0}, outcome
    assert {worker['number']: worker['pid'] for worker in numbers['workers']} == \
        worker_pids, outcome
    assert all(worker['alive'] and worker['ready'] for worker in numbers['workers']), outcome


# -- entry point for the helper programs ---------------------------------------------------

if __name__ == '__main__':
    sys.exit(_main(sys.argv[1:]))


def test_dask_cluster(tmp_path: Path) -> None:
    """A DaskPool on a local cluster: sticky stop words, counts, an exception, a killed worker."""
    pytest.importorskip('distributed', reason='the Dask example needs the dask extra: '
                                              'pip install "looppool[dask]"')
    outcome = run_example(example_command('dask_cluster.py'), tmp_path)
    assert outcome.returncode == 0, outcome
    assert outcome.lines[-2:] == ['pool stopped', 'cluster closed'], outcome
    assert 'stop words v1 loaded by workers [0, 1]' in outcome.lines, outcome
    counted = re.search(r"^counted 200 documents in [\d.]+ s; most common: "
                        r"\[\('worker', 100\), ", outcome.stdout, re.M)
    assert counted, outcome
    assert re.search(r"^a bad document raised TypeError here too: a document must be text, "
                     r"got int; the worker's traceback ends with \"TypeError: ",
                     outcome.stdout, re.M), outcome
    killed = re.search(r'^killed the Dask worker of worker 0 \(pid (\d+)\) with 200 documents '
                       r'in flight: (\d+) counted, (\d+) lost$', outcome.stdout, re.M)
    assert killed, outcome
    # Worker 1's hundred are untouched; worker 0's were lost, unless still queued in the
    # parent when the actor went, in which case its replacement counted them.
    assert int(killed.group(2)) + int(killed.group(3)) == 200, outcome
    assert int(killed.group(2)) >= 100 and int(killed.group(3)) >= 1, outcome
    back = re.search(r'^worker 0 is back as pid (\d+) on Dask worker \S+, with stop words v1 '
                     r'\(replayed\); restarts: 1$', outcome.stdout, re.M)
    assert back and back.group(1) != killed.group(1), outcome
    # The pool logs the loss once, naming the worker; Dask's nanny may warn as it restarts.
    errors = [line for line in outcome.stderr.splitlines() if line.startswith('ERROR')]
    assert len(errors) == 1 and re.match(
        r'ERROR looppool: worker 0 \(an actor on Dask worker tcp://[\d.:]+, pid \d+\) was '
        r'lost ',
        errors[0]), outcome
