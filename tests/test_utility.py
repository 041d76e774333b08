"""ResourceReporter and the readings behind it, checked on the wire.

Every report goes through a real ``statsd.StatsClient`` to a real UDP socket bound on
127.0.0.1, and the tests read the packets off that socket on the loop being measured.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from statsd import StatsClient, TCPStatsClient
from tornado.ioloop import IOLoop

from conftest import wait_until
from looppool.utility import CpuMeter, ResourceReporter, loop_readings, memory_readings

pytestmark = pytest.mark.timeout(30)

GAUGES = ['cpu', 'rss', 'maxrss', 'ioloop.handler', 'ioloop.callback', 'ioloop.timeout',
          'ioloop.lag']

# Generous for a loaded machine: every wait below ends as soon as its packet arrives.
DEADLINE = 10.0


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    """The statsd server: a non-blocking UDP socket on a free port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(('127.0.0.1', 0))
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def statsd(receiver: socket.socket) -> Iterator[Any]:
    client = StatsClient('127.0.0.1', receiver.getsockname()[1])
    yield client
    client.close()


def parse(packet: bytes) -> dict[str, float]:
    """Map each gauge in one packet to its value; fail on anything but one gauge a line."""
    gauges: dict[str, float] = {}
    for line in packet.decode('ascii').split('\n'):
        name, _, rest = line.partition(':')
        value, _, kind = rest.partition('|')
        assert kind == 'g', f'not a gauge: {line!r}'
        assert name not in gauges, f'{name} twice in one packet: {packet!r}'
        gauges[name] = float(value)
    return gauges


async def receive(sock: socket.socket) -> bytes:
    """The next packet, read on the running loop; fail the test after DEADLINE."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), DEADLINE)
    except asyncio.TimeoutError:
        pytest.fail(f'no packet arrived within {DEADLINE} s')


def receive_now(sock: socket.socket) -> bytes:
    """The next packet, for tests with no loop running; fail the test after DEADLINE."""
    readable, _, _ = select.select([sock], [], [], DEADLINE)
    if not readable:
        pytest.fail(f'no packet arrived within {DEADLINE} s')
    return sock.recv(65535)


def drain(sock: socket.socket) -> list[bytes]:
    """Take every packet already delivered to ``sock``."""
    packets = []
    while True:
        try:
            packets.append(sock.recv(65535))
        except BlockingIOError:
            return packets


def noop() -> None:
    pass


def test_each_report_is_one_packet_of_all_the_gauges(receiver: socket.socket) -> None:
    statsd = StatsClient('127.0.0.1', receiver.getsockname()[1], 'app')

    async def main() -> list[bytes]:
        reporter = ResourceReporter(asyncio.get_running_loop(), statsd, 'process',
                                    sleep_time=0.02)
        # A timer the reports must count.
        timer = asyncio.get_running_loop().call_later(3600, noop)
        reporter.start()
        try:
            return [await receive(receiver) for _ in range(3)]
        finally:
            reporter.stop()
            timer.cancel()

    try:
        packets = asyncio.run(main())
    finally:
        statsd.close()
    for packet in packets:
        gauges = parse(packet)
        assert sorted(gauges) == sorted(f'app.process.{name}' for name in GAUGES)
        assert 0 <= gauges['app.process.cpu'] <= 200
        assert gauges['app.process.rss'] > 0
        assert gauges['app.process.maxrss'] >= gauges['app.process.rss']
        # The rss gauge is in kB: compare with what psutil says of this process now.
        rss_now = psutil.Process().memory_info().rss / 1024
        assert rss_now / 4 < gauges['app.process.rss'] < rss_now * 4
        # asyncio's self-pipe, and the receiving socket the test is waiting on.
        assert gauges['app.process.ioloop.handler'] >= 2
        assert gauges['app.process.ioloop.callback'] >= 0
        # The hour-long timer, and wait_for's deadline.
        assert gauges['app.process.ioloop.timeout'] >= 2
        assert 0 <= gauges['app.process.ioloop.lag'] < DEADLINE * 1000
        assert all(math.isfinite(value) for value in gauges.values())


def test_looppool_call_with_a_tornado_ioloop(receiver: socket.socket) -> None:
    # As Looppool 0.3's instrumented worker does: started before the loop runs, all three
    # arguments positional, a long prefix on both sides.
    statsd = StatsClient('127.0.0.1', receiver.getsockname()[1], 'APP_PREFIX')
    ioloop = IOLoop()
    try:
        reporter = ResourceReporter(ioloop, statsd,
                                    'worker.instrumentated.process.{}'.format(12),
                                    sleep_time=0.02)
        assert reporter.prefix == 'worker.instrumentated.process.12'
        assert reporter.sleep_time == 0.02
        reporter.start()

        async def main() -> bytes:
            try:
                return await receive(receiver)
            finally:
                reporter.stop()

        packet = ioloop.run_sync(main)
    finally:
        ioloop.close()
        statsd.close()
    assert len(packet) < 512
    prefix = 'APP_PREFIX.worker.instrumentated.process.12.'
    assert sorted(parse(packet)) == sorted(prefix + name for name in GAUGES)


def test_loop_readings_count_descriptors_callbacks_and_timers() -> None:
    loop = asyncio.new_event_loop()
    left, right = socket.socketpair()
    try:
        before = loop_readings(loop)
        assert sorted(before) == ['callback', 'handler', 'timeout']
        assert before['handler'] >= 1  # asyncio's self-pipe

        timers = [loop.call_later(60, noop) for _ in range(3)]
        loop.call_soon(noop)
        loop.call_soon(noop)
        loop.add_reader(left, noop)
        assert loop_readings(loop) == {'handler': before['handler'] + 1,
                                       'callback': before['callback'] + 2,
                                       'timeout': before['timeout'] + 3}
        # A cancelled timer will never run; asyncio keeps it for a while, the count does not.
        timers[0].cancel()
        assert loop_readings(loop)['timeout'] == before['timeout'] + 2
        loop.remove_reader(left)
        assert loop_readings(loop)['handler'] == before['handler']
    finally:
        left.close()
        right.close()
        loop.close()


def test_loop_readings_see_what_tornado_schedules() -> None:
    ioloop = IOLoop()
    left, right = socket.socketpair()
    try:
        before = loop_readings(ioloop)
        assert before == loop_readings(ioloop.asyncio_loop)
        ioloop.add_callback(noop)
        timeout = ioloop.call_later(60, noop)
        ioloop.add_handler(left, lambda fd, events: None, IOLoop.READ)
        assert loop_readings(ioloop) == {'handler': before['handler'] + 1,
                                         'callback': before['callback'] + 1,
                                         'timeout': before['timeout'] + 1}
        ioloop.remove_timeout(timeout)
        ioloop.remove_handler(left)
    finally:
        left.close()
        right.close()
        ioloop.close()


def test_lag_rises_while_a_callback_blocks_the_loop(receiver: socket.socket,
                                                    statsd: Any) -> None:
    block = 0.3
    drained: list[bytes] = []

    def hog() -> None:
        # Whatever arrives after this was reported once the hog had the loop.
        drained.extend(drain(receiver))
        time.sleep(block)

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        reporter = ResourceReporter(loop, statsd, sleep_time=0.05)
        reporter.start()
        try:
            calm = parse(await receive(receiver))['process.ioloop.lag']
            loop.call_soon(hog)
            blocked = parse(await receive(receiver))['process.ioloop.lag']
        finally:
            reporter.stop()
        return calm, blocked

    calm, blocked = asyncio.run(main())
    # The report pending when the hog started was due within sleep_time (50 ms) of it, and
    # ran after it: at least 250 ms late.
    assert blocked >= 1000 * (block - 0.05) - 1
    assert calm < blocked


def test_stop_ends_the_reports_and_start_resumes_them(receiver: socket.socket,
                                                      statsd: Any) -> None:
    def prefixes(packet: bytes) -> set[str]:
        return {name.split('.')[0] for name in parse(packet)}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopping = ResourceReporter(loop, statsd, 'stopping', sleep_time=0.02)
        running = ResourceReporter(loop, statsd, 'running', sleep_time=0.02)
        stopping.start()
        running.start()
        try:
            with pytest.raises(RuntimeError, match="'stopping' is already started"):
                stopping.start()
            seen: set[str] = set()
            while seen != {'stopping', 'running'}:
                seen |= prefixes(await receive(receiver))

            stopping.stop()
            assert not stopping.is_running()
            stopping.stop()  # again: nothing happens
            # Both reporters and this marker share one client socket, so the packets
            # arrive in the order they were sent: after the marker, only what was sent
            # after stop().
            statsd.incr('marker')
            while not (await receive(receiver)).startswith(b'marker:'):
                pass
            # Five reports of the other reporter span five of the stopped one's periods.
            for _ in range(5):
                assert prefixes(await receive(receiver)) == {'running'}

            stopping.start()
            assert stopping.is_running()
            seen = set()
            while 'stopping' not in seen:
                seen |= prefixes(await receive(receiver))
        finally:
            stopping.stop()
            running.stop()

    asyncio.run(main())


def test_a_failed_report_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    # A statsd server over TCP that is down: the port is taken but nothing listens, so
    # every report's send fails in the client.
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(('127.0.0.1', 0))
    statsd = TCPStatsClient('127.0.0.1', taken.getsockname()[1], timeout=1.0)

    def failures() -> list[logging.LogRecord]:
        return [record for record in caplog.records
                if record.name == 'looppool.utility' and record.exc_info]

    async def main() -> None:
        reporter = ResourceReporter(asyncio.get_running_loop(), statsd, 'down',
                                    sleep_time=0.01)
        reporter.start()
        try:
            await wait_until(lambda: len(failures()) >= 2, DEADLINE, 'two failed reports')
            assert reporter.is_running()
        finally:
            reporter.stop()

    try:
        asyncio.run(main())
    finally:
        statsd.close()
        taken.close()
    assert "ResourceReporter 'down' failed to report" in failures()[0].getMessage()
    assert isinstance(failures()[0].exc_info[1], OSError)  # type: ignore[index]


def test_report_sends_now_and_returns_what_it_sent(receiver: socket.socket,
                                                   statsd: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        reporter = ResourceReporter(loop, statsd, 'now')
        assert not reporter.is_running()
        sent = reporter.report()
        gauges = parse(receive_now(receiver))
    finally:
        loop.close()
    # Only periodic reports know how late they ran.
    assert sorted(sent) == sorted(name for name in GAUGES if name != 'ioloop.lag')
    assert gauges == {f'now.{name}': value for name, value in sent.items()}


def test_a_loop_without_asyncio_internals_reports_the_rest(receiver: socket.socket,
                                                           statsd: Any) -> None:
    # The abstract loop keeps no _selector, _ready or _scheduled, as uvloop does not.
    other_loop = asyncio.AbstractEventLoop()  # type: ignore[abstract]
    assert loop_readings(other_loop) == {}
    ResourceReporter(other_loop, statsd, 'other').report()
    assert sorted(parse(receive_now(receiver))) == ['other.cpu', 'other.maxrss', 'other.rss']


def test_memory_readings_are_in_kilobytes() -> None:
    readings = memory_readings()
    assert sorted(readings) == ['maxrss', 'rss']
    rss_now = psutil.Process().memory_info().rss / 1024
    assert rss_now / 4 < readings['rss'] < rss_now * 4
    assert readings['maxrss'] >= readings['rss']


def test_cpu_meter_measures_busy_time() -> None:
    busy = 0.2
    started = time.monotonic()
    meter = CpuMeter()
    cpu_started = time.process_time()
    while time.process_time() - cpu_started < busy:
        pass
    percent = meter.read()
    elapsed = time.monotonic() - started
    # The meter's interval lies inside the test's, and holds at least `busy` s of CPU.
    assert percent >= 100 * busy / elapsed - 1e-6
    assert percent <= 100 * (os.cpu_count() or 1) + 1e-6
    # read() starts the next interval: one spent idle, this time.
    time.sleep(0.1)
    assert meter.read() < 50


@pytest.mark.parametrize('arguments, error, message', [
    ({'ioloop': None}, TypeError, 'ioloop must be a tornado.ioloop.IOLoop'),
    ({'ioloop': 'loop'}, TypeError, 'ioloop must be'),
    ({'statsd': None}, TypeError, 'statsd must be a statsd.StatsClient'),
    ({'statsd': object()}, TypeError, 'statsd must be'),
    ({'prefix': None}, TypeError, 'prefix must be a str'),
    ({'prefix': ''}, ValueError, 'prefix must be a non-empty'),
    ({'prefix': 'worker.'}, ValueError, 'neither starts nor ends with a dot'),
    ({'prefix': '.worker'}, ValueError, 'neither starts nor ends with a dot'),
    ({'prefix': 'a:b'}, ValueError, 'statsd format reserves'),
    ({'prefix': 'a|b'}, ValueError, 'statsd format reserves'),
    ({'prefix': 'a b'}, ValueError, 'statsd format reserves'),
    ({'prefix': 'a\nb'}, ValueError, 'statsd format reserves'),
    ({'sleep_time': 0}, ValueError, 'sleep_time must be a finite number of seconds greater'),
    ({'sleep_time': -1.0}, ValueError, 'sleep_time must be'),
    ({'sleep_time': math.inf}, ValueError, 'sleep_time must be'),
    ({'sleep_time': math.nan}, ValueError, 'sleep_time must be'),
    ({'sleep_time': '10'}, TypeError, 'sleep_time must be a number of seconds'),
    ({'sleep_time': True}, TypeError, 'sleep_time must be a number of seconds'),
])
def test_bad_arguments_are_refused_by_name(statsd: Any, arguments: dict[str, Any],
                                           error: type[Exception], message: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        given = {'ioloop': loop, 'statsd': statsd, 'prefix': 'process', 'sleep_time': 1.0,
                 **arguments}
        with pytest.raises(error, match=message):
            ResourceReporter(given['ioloop'], given['statsd'], given['prefix'],
                             sleep_time=given['sleep_time'])
    finally:
        loop.close()


def test_loop_readings_refuse_what_is_not_a_loop() -> None:
    with pytest.raises(TypeError, match='ioloop must be'):
        loop_readings(None)  # type: ignore[arg-type]


def test_start_on_a_closed_loop_raises(statsd: Any) -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    reporter = ResourceReporter(loop, statsd)
    with pytest.raises(RuntimeError, match='closed'):
        reporter.start()
    assert not reporter.is_running()


def test_the_looppool_03_instrumented_worker_runs_unchanged() -> None:
    """The README's class, text unchanged (tests/looppool03_instrumented.py): statsd on
    localhost:8125, the default ten-second interval, its own process title."""
    import looppool
    from looppool03_instrumented import InstrumentatedWorker

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(('127.0.0.1', 8125))
    except OSError as exc:
        sock.close()
        pytest.skip(f'the class reports to localhost:8125, which is taken here ({exc})')
    sock.setblocking(False)
    results: list[Any] = []

    async def main() -> tuple[list[str], dict[str, float]]:
        @looppool.task_done
        def process_message(result: Any, result_done: Any) -> None:
            results.append(result)

        pool = looppool.Pool(asyncio.get_running_loop(), 2, InstrumentatedWorker)
        pool.process_message = process_message
        pool.start()
        try:
            for message in ('alpha', 'beta'):
                pool.put_nowait(message)
            await wait_until(lambda: len(results) == 2, what='both results')
            titles = [' '.join(psutil.Process(w['pid']).cmdline()).strip()
                      for w in pool.stats()['workers']]
            gauges: dict[str, float] = {}
            loop = asyncio.get_running_loop()
            # The first report comes sleep_time (10 s) after start, from each worker.
            deadline = time.monotonic() + 20
            wanted = {f'APP_PREFIX.worker.instrumentated.process.{n}.{g}'
                      for n in (0, 1) for g in GAUGES}
            while not wanted <= set(gauges) and time.monotonic() < deadline:
                packet = await asyncio.wait_for(loop.sock_recv(sock, 65536), 20)
                gauges.update(parse(packet))
        finally:
            await pool.stop()
        return titles, gauges

    try:
        titles, gauges = asyncio.run(main())
    finally:
        sock.close()
    assert sorted(results) == [('alpha', 0), ('beta', 1)]
    assert titles == ['python APP_NAME POOL_NAME pool worker'] * 2
    for number in (0, 1):
        prefix = f'APP_PREFIX.worker.instrumentated.process.{number}.'
        assert gauges[prefix + 'rss'] > 0 and gauges[prefix + 'maxrss'] > 0, gauges
        assert sorted(k for k in gauges if k.startswith(prefix)) == sorted(
            prefix + g for g in GAUGES)
