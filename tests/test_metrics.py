"""What operators look at: statsd packets, worker logs in the parent, process titles."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import statsd

import looppool
from conftest import run, wait_until
from workers import Chatty, ClassicBroken, Echo, SelfTitled

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(looppool.__path__[0])


class UdpSink:
    """A real UDP socket on loopback that collects statsd packets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(('127.0.0.1', 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.packets: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.packets.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.packets

    def metrics(self) -> list[tuple[str, float, str]]:
        found = []
        for packet in self.drain():
            for line in packet.splitlines():
                name, rest = line.split(':', 1)
                value, kind = rest.split('|')[:2]
                found.append((name, float(value), kind))
        return found

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink():
    sink = UdpSink()
    yield sink
    sink.close()


def test_pool_metrics_reach_statsd(sink) -> None:
    client = statsd.StatsClient('127.0.0.1', sink.port, prefix='app')

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo, statsd=client,
                                 statsd_interval=0.2) as pool:
            await asyncio.gather(*[pool.submit(('sleep', 0.01, i)) for i in range(10)])
            with pytest.raises(KeyError):
                await pool.submit(('raise', KeyError('x')))
            doomed = pool.submit(('sleep', 30), worker_num=0)
            await asyncio.sleep(0.1)
            os.kill(pool.stats()['workers'][0]['pid'], signal.SIGKILL)
            with pytest.raises(looppool.WorkerLost):
                await doomed
            await wait_until(lambda: any(n == 'app.looppool.tasks.in_flight'
                                         for n, _, _ in sink.metrics()),
                             what='a periodic report')

    try:
        run(main())
    finally:
        client.close()
    metrics = sink.metrics()
    totals: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for name, value, kind in metrics:
        kinds[name] = kind
        if kind == 'c':
            totals[name] = totals.get(name, 0) + value
    assert totals['app.looppool.tasks.submitted'] == 12
    assert totals['app.looppool.tasks.completed'] == 10
    assert totals['app.looppool.tasks.failed'] == 1
    assert totals['app.looppool.tasks.lost'] == 1
    assert totals['app.looppool.workers.restarts'] == 1
    durations = [v for n, v, k in metrics if n == 'app.looppool.tasks.duration']
    assert kinds['app.looppool.tasks.duration'] == 'ms'
    assert len(durations) == 10 and all(5 <= d < 5000 for d in durations)
    assert kinds['app.looppool.worker.0.in_flight'] == 'g'
    assert kinds['app.looppool.worker.1.in_flight'] == 'g'
    # the last report, at stop, shows nothing in flight
    last_in_flight = [v for n, v, k in metrics if n == 'app.looppool.tasks.in_flight'][-1]
    assert last_in_flight == 0


def test_waiting_for_room_is_timed(sink) -> None:
    client = statsd.StatsClient('127.0.0.1', sink.port)

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo, max_tasks=1,
                                 statsd=client) as pool:
            await asyncio.gather(*[pool.submit(('sleep', 0.05)) for _ in range(3)])

    try:
        run(main())
    finally:
        client.close()
    waits = sorted(v for n, v, k in sink.metrics() if n == 'looppool.tasks.wait')
    assert len(waits) == 2 and waits[0] >= 30 and waits[1] >= 80


@pytest.mark.parametrize('method', ['fork', 'spawn'])
def test_worker_log_records_reach_the_parents_handlers(method: str) -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger('app')
    logger.addHandler(handler)
    try:
        async def main() -> None:
            async with looppool.Pool(pool_size=2, worker_class=Chatty,
                                     mp_context=method) as pool:
                pids = [await pool.submit(('pid',) and 'hello', worker_num=n) for n in (0, 1)]
                assert pids == ['hello', 'hello']
                assert await pool.submit('fail') == 'logged'
                await wait_until(lambda: len(records) >= 3, what='three records')

        run(main())
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert sorted(r.getMessage() for r in warnings) == [
        'handled hello in worker 0', 'handled hello in worker 1']
    assert {r.worker_number for r in warnings} == {0, 1}
    assert all(r.worker_pid != os.getpid() and r.process == r.worker_pid for r in warnings)
    assert all(r.name == 'app.worker' for r in records)
    error = [r for r in records if r.levelno == logging.ERROR]
    assert len(error) == 1
    assert error[0].getMessage() == 'could not handle fail'
    assert 'Traceback' in error[0].exc_text and 'the parser choked' in error[0].exc_text
    formatted = logging.Formatter('%(processName)s %(message)s').format(error[0])
    assert formatted.startswith('looppool worker ') and 'ValueError' in formatted


def test_an_unawaited_looppool_task_error_is_logged_once_with_its_traceback(caplog) -> None:
    async def main() -> None:
        pool = looppool.Pool(pool_size=1, worker_class=ClassicBroken)
        pool.start()
        pool.put_nowait('page 7')
        await wait_until(lambda: [r for r in caplog.records if 'broken on page 7' in
                                  (r.exc_text or '')], what='the error record')
        await asyncio.sleep(0.2)
        await pool.stop()

    with caplog.at_level(logging.ERROR):
        run(main())
    found = [r for r in caplog.records if 'broken on page 7' in (r.exc_text or '')]
    assert len(found) == 1
    assert found[0].name == 'looppool.worker' and 'Traceback' in found[0].exc_text


def _cmdline(pid: int) -> str:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
        return f.read().replace(b'\0', b' ').decode().strip()


def test_workers_are_titled_and_initialise_can_override() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            for number, pid in await pool.broadcast(('whoami',)):
                assert _cmdline(pid).startswith(f'looppool worker {number} | ')
        async with looppool.Pool(pool_size=1, worker_class=SelfTitled) as pool:
            pid = await pool.submit(('pid',))
            assert _cmdline(pid) == 'my-app lookup worker 0'
        async with looppool.Pool(pool_size=1, worker_class=Echo, title=False) as pool:
            pid = await pool.submit(('pid',))
            assert 'looppool worker' not in _cmdline(pid)

    run(main())


def _statsd_daemon() -> str | None:
    path = os.path.join(ROOT, '.npm', 'node_modules', 'statsd', 'stats.js')
    return path if os.path.exists(path) else None


@pytest.mark.skipif(shutil.which('node') is None,
                    reason='Node.js is not installed, so the reference statsd daemon '
                           '(npm statsd 0.9) cannot run')
@pytest.mark.skipif(_statsd_daemon() is None,
                    reason='the reference statsd daemon is not installed: run '
                           '`npm install --no-save --prefix .npm statsd@0.9.0` (scripts/test.sh '
                           'does)')
def test_the_reference_statsd_daemon_parses_and_aggregates_our_metrics(tmp_path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        mgmt_port = probe.getsockname()[1]
    config = tmp_path / 'config.js'
    config.write_text(json.dumps({
        'address': '127.0.0.1', 'port': port, 'mgmt_address': '127.0.0.1',
        'mgmt_port': mgmt_port, 'flushInterval': 300, 'backends': ['./backends/console'],
        'console': {'prettyprint': False}, 'deleteIdleStats': True,
    }))
    daemon = subprocess.Popen(['node', _statsd_daemon(), str(config)],
                              cwd=os.path.dirname(_statsd_daemon()), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert daemon.stdout is not None
        deadline = time.monotonic() + 15
        for line in daemon.stdout:
            if 'server is up' in line or time.monotonic() > deadline:
                break
        client = statsd.StatsClient('127.0.0.1', port)

        async def main() -> None:
            async with looppool.Pool(pool_size=2, worker_class=Echo, statsd=client,
                                     statsd_interval=0.1) as pool:
                await asyncio.gather(*[pool.submit(i) for i in range(50)])

        try:
            run(main())
        finally:
            client.close()
        seen = ''
        deadline = time.monotonic() + 15
        wanted = ("'looppool.tasks.completed': 50", "'looppool.tasks.duration': [",
                  "'looppool.worker.0.in_flight': 0")
        while time.monotonic() < deadline:
            line = daemon.stdout.readline()
            seen += line
            if all(w in seen.replace('"', "'") for w in wanted):
                break
        flat = seen.replace('"', "'")
        assert "'statsd.bad_lines_seen': 0" in flat
        assert "'looppool.tasks.submitted': 50" in flat, seen[-2000:]
        assert "'looppool.tasks.completed': 50" in flat
        assert re.search(r"'looppool\.tasks\.duration': \[", flat)
        assert "'looppool.worker.0.in_flight': 0" in flat
    finally:
        daemon.kill()
        daemon.wait(5)
        if daemon.stdout:
            daemon.stdout.close()
