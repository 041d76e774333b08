"""What operators look at: statsd packets, worker logs in the parent, process titles."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
import statsd

import looppool
from conftest import run, skip_unless_ci, wait_until
from looppool.utility import ResourceReporter
from workers import Chatty, ClassicBroken, Echo, SelfTitled

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(looppool.__path__[0])


class Flood(looppool.Worker):
    """Logs a burst of large records on request; every reply is the worker's clock when it
    started on the message. ``('stamp', path)`` also sends a datagram to the Unix socket at
    ``path`` once it is handled."""

    async def handle(self, message: Any) -> float:
        started = time.monotonic()   # CLOCK_MONOTONIC: one clock for every process
        if message[0] == 'log':
            _, count, size = message
            logger = logging.getLogger('app.flood')
            padding = 'x' * size   # an attribute, not the message: keeps pytest's log small
            for index in range(count):
                logger.warning('record %d', index, extra={'padding': padding})
        elif message[1:]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as done:
                done.sendto(b'done', message[1])
        return started


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


def test_recycled_workers_are_counted(sink) -> None:
    client = statsd.StatsClient('127.0.0.1', sink.port, prefix='app')

    async def main() -> dict[str, Any]:
        async with looppool.Pool(pool_size=1, worker_class=Echo, statsd=client,
                                 statsd_interval=0.2, max_tasks_per_worker=2) as pool:
            # A process is recycled once it was sent two tasks; until its replacement is
            # ready it may take a few more. Go on until a third process answers.
            pids = [await pool.submit(('pid',))]
            deadline = time.monotonic() + 20
            while len(set(pids)) < 3:
                if time.monotonic() > deadline:
                    pytest.fail(f'no third worker process within 20 s: {sorted(set(pids))}')
                pids.append(await pool.submit(('pid',)))
            assert pool.stats()['recycles'] >= 2
            await wait_until(lambda: any(n == 'app.looppool.workers.recycles'
                                         for n, _, _ in sink.metrics()),
                             what='a periodic report with the recycles')
        return pool.stats()

    try:
        final = run(main())
    finally:
        client.close()
    assert final['recycles'] >= 2 and final['restarts'] == 0, final
    recycles = [(value, kind) for name, value, kind in sink.metrics()
                if name == 'app.looppool.workers.recycles']
    assert recycles and all(kind == 'c' for _, kind in recycles), recycles
    # Every recycle reached statsd, the last ones in the report made at stop.
    assert sum(value for value, _ in recycles) == final['recycles'], recycles
    assert 'app.looppool.workers.restarts' not in {name for name, _, _ in sink.metrics()}


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
                replies = [await pool.submit('hello', worker_num=n) for n in (0, 1)]
                assert replies == ['hello', 'hello']
                pids.update((w['number'], w['pid']) for w in pool.stats()['workers'])
                assert await pool.submit('fail') == 'logged'
                await wait_until(lambda: len(records) >= 3, what='three records')

        pids: dict[int, int] = {}   # worker number: pid
        run(main())
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert sorted(r.getMessage() for r in warnings) == [
        'handled hello in worker 0', 'handled hello in worker 1']
    # Each record names the worker that logged it, by number and pid.
    assert sorted((r.worker_number, r.worker_pid) for r in warnings) == sorted(pids.items())
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert all(r.process == r.worker_pid for r in records)
    assert all(r.name == 'app.worker' for r in records)
    error = [r for r in records if r.levelno == logging.ERROR]
    assert len(error) == 1
    assert error[0].getMessage() == 'could not handle fail'
    assert 'Traceback' in error[0].exc_text and 'the parser choked' in error[0].exc_text
    formatted = logging.Formatter('%(processName)s %(message)s').format(error[0])
    assert formatted.startswith('looppool worker ') and 'ValueError' in formatted


def test_records_of_a_logger_that_does_not_propagate_still_reach_its_handler() -> None:
    # A logger with a handler of its own and propagate=False, set up in the parent before
    # the pool starts: a forked worker inherits the setting, and its records must still
    # come back to that handler (and only to it).
    records: list[logging.LogRecord] = []
    above: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def __init__(self, into: list[logging.LogRecord]) -> None:
            super().__init__()
            self.into = into

        def emit(self, record: logging.LogRecord) -> None:
            self.into.append(record)

    own, parent = Collect(records), Collect(above)
    logger, app = logging.getLogger('app.worker'), logging.getLogger('app')
    logger.addHandler(own)
    app.addHandler(parent)
    logger.propagate = False
    try:
        async def main() -> None:
            async with looppool.Pool(pool_size=1, worker_class=Chatty,
                                     mp_context='fork') as pool:
                assert await pool.submit('hello') == 'hello'
                await wait_until(lambda: records, what='the record')

        run(main())
    finally:
        logger.propagate = True
        logger.removeHandler(own)
        app.removeHandler(parent)
    assert [r.getMessage() for r in records] == ['handled hello in worker 0']
    assert records[0].worker_pid != os.getpid()
    assert not above   # propagate=False still holds in the parent


# This many records of this size: 12 MB, more than the channel's socket buffers hold (the
# kernel doubles the 4 MiB asked for), so a worker that waited for the parent, at the
# socket or otherwise, would be held for as long as the parent's handler is.
FLOOD_RECORDS = 30
FLOOD_RECORD_SIZE = 400_000
# (As many as a fresh worker's window holds with the flood message: the rest of a burst
# would wait in the parent, whose loop the handler holds.)
QUICK_MESSAGES = looppool.link._FIRST_WINDOW - 1
# How long the parent's handler waits, at most, for the worker to answer every quick
# message while the handler holds the parent's loop.
STUCK_HANDLER_SECONDS = 30


def test_a_slow_parent_handler_never_blocks_the_workers_loop(tmp_path) -> None:
    """The parent's handler is stuck on the first of the records a worker floods it with (a
    handler stuck on a slow disk or network), and with it the parent's loop, where it runs.
    Meanwhile the worker logs the rest and answers every other message at its own speed:
    the handler gets out only once the last of those messages was handled, which the worker
    tells it on a socket of their own."""
    handled: list[tuple[float, str, int]] = []
    released: list[bool] = []   # whether the worker told the stuck handler, in time
    gate = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    gate.bind(str(tmp_path / 'gate'))

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not released:
                readable, _, _ = select.select([gate], [], [], STUCK_HANDLER_SECONDS)
                released.append(bool(readable))
            handled.append((time.monotonic(), record.getMessage(), len(record.padding)))

    handler = Stuck()
    logger = logging.getLogger('app.flood')
    logger.addHandler(handler)
    try:
        async def main() -> tuple[float, list[float]]:
            async with looppool.Pool(pool_size=1, worker_class=Flood) as pool:
                flood = pool.submit(('log', FLOOD_RECORDS, FLOOD_RECORD_SIZE))
                quick = [pool.submit(('stamp',)) for _ in range(QUICK_MESSAGES - 1)]
                quick.append(pool.submit(('stamp', str(tmp_path / 'gate'))))
                flood_started, *stamps = await asyncio.gather(flood, *quick)
                await wait_until(lambda: len(handled) == FLOOD_RECORDS, timeout=30,
                                 what='every record to reach the handler')
            return flood_started, stamps

        flood_started, stamps = run(main())
    finally:
        logger.removeHandler(handler)
        gate.close()
    # The worker logged, then handled every quick message, in order, while the parent was
    # still in its handler of the first record...
    assert released == [True], (
        f'the worker did not handle {QUICK_MESSAGES} messages within '
        f'{STUCK_HANDLER_SECONDS} s while the parent was in a log handler')
    assert flood_started <= stamps[0] and stamps == sorted(stamps)
    assert max(stamps) < handled[0][0]
    # ... and no record was lost or reordered on the way.
    assert [(message, size) for _, message, size in handled] == [
        (f'record {index}', FLOOD_RECORD_SIZE) for index in range(FLOOD_RECORDS)]


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


class DaemonOutput:
    """What the statsd daemon prints, read with a deadline of its own (``select``), and
    parsed flush by flush.

    The console backend prints each flush as ``Flushing stats at ...`` followed by a
    JavaScript object literal (``util.inspect``): ``counters``, ``gauges`` and ``timers``
    are flat maps of ``'name': value``; ``timer_data`` holds an object per timer with its
    ``count``. Only flushes printed to the end (``pctThreshold``) are parsed.
    """

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.text = ''
        self.ended = False

    def read_available(self) -> None:
        """Take what the daemon printed so far, without waiting."""
        while not self.ended and select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 65536)
            self.ended = not chunk
            self.text += chunk.decode('utf-8', 'replace')

    def read_until(self, condition: Any, timeout: float, what: str) -> None:
        """Block until ``condition()`` holds; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.ended:
                self.fail(what)
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if readable:
                chunk = os.read(self.fd, 65536)
                self.ended = not chunk
                self.text += chunk.decode('utf-8', 'replace')

    async def wait_for(self, condition: Any, timeout: float, what: str) -> None:
        """As :meth:`read_until`, on a running loop, which keeps running meanwhile."""
        def check() -> bool:
            self.read_available()
            if self.ended:
                self.fail(what)
            return bool(condition())
        await wait_until(check, timeout, what)

    def fail(self, what: str) -> None:
        pytest.fail(f'{"the statsd daemon exited" if self.ended else "timed out"} waiting '
                    f'for {what}; it printed:\n{self.text[-3000:]}')

    def flushes(self) -> list[str]:
        return [flush for flush in self.text.split('Flushing stats at')[1:]
                if 'pctThreshold' in flush]

    @staticmethod
    def section(flush: str, name: str) -> str:
        found = re.search(rf'^  {name}: \{{(.*?)\}},?$', flush, re.M | re.S)
        assert found, f'no {name} in the flush:\n{flush}'
        return found.group(1)

    @classmethod
    def numbers(cls, flush: str, name: str) -> dict[str, float]:
        return {key: float(value) for key, value in re.findall(
            r"'?([\w.-]+)'?: (-?[\d.]+(?:e[+-]?\d+)?)", cls.section(flush, name))}

    def counter_totals(self) -> dict[str, float]:
        """Every counter summed over all the flushes."""
        totals: dict[str, float] = {}
        for flush in self.flushes():
            for key, value in self.numbers(flush, 'counters').items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def last_gauges(self) -> dict[str, float]:
        """Each gauge's value in the last flush that held it."""
        gauges: dict[str, float] = {}
        for flush in self.flushes():
            gauges.update(self.numbers(flush, 'gauges'))
        return gauges

    def timer_counts(self) -> dict[str, int]:
        """How many values each timer got, summed over all the flushes."""
        counts: dict[str, int] = {}
        for flush in self.flushes():
            for key in re.findall(r"'?([\w.-]+)'?: \[", self.section(flush, 'timers')):
                data = re.search(rf"^    '?{re.escape(key)}'?: \{{(.*?)^    \}}", flush,
                                 re.M | re.S)
                assert data, f'no timer_data for {key} in the flush:\n{flush}'
                count = re.search(r'^      count: (\d+)', data.group(1), re.M)
                assert count, data.group(1)
                counts[key] = counts.get(key, 0) + int(count.group(1))
        return counts


class CountingClient:
    """A statsd client seen through ``pipeline()``, counting the reports made with it."""

    def __init__(self, client: statsd.StatsClient) -> None:
        self.client = client
        self.reports = 0

    def pipeline(self) -> Any:
        self.reports += 1
        return self.client.pipeline()


REPORTER_GAUGES = ('cpu', 'rss', 'maxrss', 'ioloop.handler', 'ioloop.callback',
                   'ioloop.timeout', 'ioloop.lag')


def test_the_reference_statsd_daemon_parses_and_aggregates_our_metrics(tmp_path) -> None:
    if shutil.which('node') is None:
        skip_unless_ci('Node.js is not installed, so the reference statsd daemon (npm statsd '
                       '0.9) cannot run')
    daemon_path = _statsd_daemon()
    if daemon_path is None:
        skip_unless_ci('the reference statsd daemon is not installed: run `npm install '
                       '--no-save --prefix .npm statsd@0.9.0` (scripts/test.sh does)')
    # statsd 0.9 takes port 0 for its default (8125), so no free port can be asked of it;
    # and a port found free here could be taken before the daemon binds it. So the daemon
    # gets a socket bound here (Node's dgram binds to {fd: ...}: an open socket), and its
    # management interface listens on a Unix socket (net's listen(path)), not on a port.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind(('127.0.0.1', 0))
        port = udp.getsockname()[1]
        config = tmp_path / 'config.js'
        config.write_text(json.dumps({
            'port': {'fd': udp.fileno()}, 'mgmt_port': str(tmp_path / 'mgmt.sock'),
            'flushInterval': 300, 'backends': ['./backends/console'],
            'console': {'prettyprint': False}, 'deleteIdleStats': True,
        }))
        daemon = subprocess.Popen(['node', daemon_path, str(config)],
                                  cwd=os.path.dirname(daemon_path), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, pass_fds=[udp.fileno()])
    finally:
        udp.close()   # the daemon has its own copy
    try:
        assert daemon.stdout is not None
        output = DaemonOutput(daemon.stdout)
        output.read_until(lambda: 'server is up' in output.text, 15, 'the daemon to start')
        client = statsd.StatsClient('127.0.0.1', port)
        reporter_client = CountingClient(statsd.StatsClient('127.0.0.1', port, prefix='app'))

        async def main() -> None:
            reporter = ResourceReporter(asyncio.get_running_loop(), reporter_client,
                                        'parent', sleep_time=0.05)
            reporter.start()
            try:
                async with looppool.Pool(pool_size=2, worker_class=Echo, statsd=client,
                                         statsd_interval=0.1) as pool:
                    # Half, then the other half once the daemon flushed the first: the
                    # counts are aggregated over more than one flush.
                    await asyncio.gather(*[pool.submit(i) for i in range(25)])
                    await output.wait_for(
                        lambda: output.counter_totals().get('looppool.tasks.completed'),
                        15, 'a flush with the first tasks')
                    await asyncio.gather(*[pool.submit(i) for i in range(25, 50)])
                # Two periodic reports at least: only those measure ioloop.lag.
                await wait_until(lambda: reporter_client.reports >= 2,
                                 what='two reports of the ResourceReporter')
            finally:
                reporter.stop()

        try:
            run(main())
        finally:
            client.close()
            reporter_client.client.close()

        def everything_arrived() -> bool:
            totals = output.counter_totals()
            gauges = output.last_gauges()
            return (totals.get('looppool.tasks.completed', 0) >= 50
                    and output.timer_counts().get('looppool.tasks.duration', 0) >= 50
                    and 'looppool.worker.1.in_flight' in gauges
                    and all(f'app.parent.{name}' in gauges for name in REPORTER_GAUGES))

        output.read_until(everything_arrived, 15, 'the daemon to flush our metrics')
        # One more flush after that, so a late extra packet would be counted too.
        seen = len(output.flushes())
        output.read_until(lambda: len(output.flushes()) > seen, 5, 'one more flush')

        totals = output.counter_totals()
        assert totals['statsd.bad_lines_seen'] == 0, output.text[-3000:]
        assert len([flush for flush in output.flushes()
                    if "'looppool.tasks.completed'" in flush]) >= 2
        assert totals['looppool.tasks.submitted'] == 50
        assert totals['looppool.tasks.completed'] == 50
        assert output.timer_counts()['looppool.tasks.duration'] == 50
        gauges = output.last_gauges()
        assert gauges['looppool.worker.0.in_flight'] == 0
        assert gauges['looppool.worker.1.in_flight'] == 0
        assert gauges['looppool.tasks.in_flight'] == 0
        parent = {name: gauges[f'app.parent.{name}'] for name in REPORTER_GAUGES}
        assert parent['rss'] > 1000 and parent['maxrss'] > 1000, parent   # kB
        assert parent['ioloop.handler'] >= 1 and parent['ioloop.lag'] >= 0, parent
        assert 0 <= parent['cpu'] <= 100 * (os.cpu_count() or 1), parent
    finally:
        daemon.kill()
        daemon.wait(5)
        if daemon.stdout:
            daemon.stdout.close()
