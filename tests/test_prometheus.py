"""PrometheusCollector: the pool's numbers as Prometheus reads them, scraped over HTTP from
a real Tornado server (or prometheus_client's own, on its thread) and read back with
prometheus_client's parser."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import psutil
import pytest
import statsd
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.web

import looppool
from conftest import run, skip_unless_ci, wait_until
from looppool import remote
from looppool.metrics import PrometheusCollector
from workers import Echo

try:
    import prometheus_client
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:   # pragma: no cover - the test extra installs it
    prometheus_client = None

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(looppool.__path__[0])

POOL_COUNTERS = ('submitted', 'completed', 'failed', 'lost', 'timed_out', 'cancelled')


@pytest.fixture(autouse=True)
def needs_prometheus_client() -> None:
    if prometheus_client is None:
        skip_unless_ci('prometheus_client is not installed (pip install "looppool[prometheus]")')


class Scrape:
    """One page of metrics, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    def value(self, name: str, **labels: str) -> float:
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise KeyError(f'no sample {name}{labels or ""} in the scrape:\n{self.text}')

    def per_worker(self, name: str) -> dict[int, float]:
        return {int(sample.labels['worker']): float(sample.value)
                for family in self.families.values() for sample in family.samples
                if sample.name == name}

    def counts(self) -> dict[str, float]:
        return {key: self.value(f'looppool_tasks_{key}_total') for key in POOL_COUNTERS}

    def buckets(self) -> list[tuple[float, float]]:
        return sorted((float(sample.labels['le']), float(sample.value))
                      for sample in self.families['looppool_task_duration_seconds'].samples
                      if sample.name == 'looppool_task_duration_seconds_bucket')


class MetricsHandler(tornado.web.RequestHandler):

    def initialize(self, server: MetricsServer) -> None:
        self.server = server

    async def get(self) -> None:
        for collector in self.server.collectors:
            await collector.refresh()
        self.set_header('Content-Type', prometheus_client.CONTENT_TYPE_LATEST)
        self.write(prometheus_client.generate_latest(self.server.registry))


class MetricsServer:
    """A Tornado HTTP server on 127.0.0.1, serving ``/metrics`` from the collectors."""

    def __init__(self, *collectors: PrometheusCollector) -> None:
        self.collectors = collectors
        self.registry = prometheus_client.CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)
        sockets = tornado.netutil.bind_sockets(0, '127.0.0.1')
        self.url = f'http://127.0.0.1:{sockets[0].getsockname()[1]}/metrics'
        self.http = tornado.httpserver.HTTPServer(tornado.web.Application(
            [(r'/metrics', MetricsHandler, {'server': self})], log_function=lambda _: None))
        self.http.add_sockets(sockets)
        self.client = tornado.httpclient.AsyncHTTPClient(force_instance=True)

    async def scrape(self) -> Scrape:
        response = await self.client.fetch(self.url, request_timeout=20)
        assert response.headers['Content-Type'] == prometheus_client.CONTENT_TYPE_LATEST
        return Scrape(response.body.decode())

    async def close(self) -> None:
        self.client.close()
        self.http.stop()
        await self.http.close_all_connections()


def fetch(url: str) -> Scrape:
    """Scrape ``url`` the blocking way (for prometheus_client's own server)."""
    with urllib.request.urlopen(url, timeout=20) as response:
        return Scrape(response.read().decode())


def assert_process_readings(scrape: Scrape, pids: dict[int, int]) -> None:
    """Each worker's RSS and CPU time are those of its process, by the pid stats() gives."""
    rss = scrape.per_worker('looppool_worker_rss_bytes')
    cpu = scrape.per_worker('looppool_worker_cpu_seconds_total')
    assert set(rss) == set(cpu) == set(pids), scrape.text
    for number, pid in pids.items():
        process = psutil.Process(pid)
        # An idle worker's memory hardly moves between the scrape and now.
        assert rss[number] > 0
        assert rss[number] == pytest.approx(process.memory_info().rss, rel=0.2)
        times = process.cpu_times()
        assert 0 <= cpu[number] <= times.user + times.system


def worker_pids(stats: dict[str, Any]) -> dict[int, int]:
    return {worker['number']: worker['pid'] for worker in stats['workers']}


def test_a_scrape_shows_what_the_pool_did() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            server = MetricsServer(PrometheusCollector(pool))
            try:
                scrape = await server.scrape()
                assert scrape.value('looppool_up') == 1
                assert scrape.counts() == dict.fromkeys(POOL_COUNTERS, 0)
                assert scrape.value('looppool_task_duration_seconds_count') == 0

                await asyncio.gather(*[pool.submit(('sleep', 0.01, i)) for i in range(10)])
                with pytest.raises(KeyError):
                    await pool.submit(('raise', KeyError('x')))
                scrape = await server.scrape()
                assert scrape.counts() == {'submitted': 11, 'completed': 10, 'failed': 1,
                                           'lost': 0, 'timed_out': 0, 'cancelled': 0}
                for gauge in ('looppool_tasks_in_flight', 'looppool_tasks_waiting',
                              'looppool_worker_restarts_total'):
                    assert scrape.value(gauge) == 0, gauge
                kinds = {name: family.type for name, family in scrape.families.items()}
                assert kinds['looppool_tasks_submitted'] == 'counter'
                assert kinds['looppool_worker_restarts'] == 'counter'
                assert kinds['looppool_worker_cpu_seconds'] == 'counter'
                assert kinds['looppool_tasks_in_flight'] == 'gauge'
                assert kinds['looppool_worker_rss_bytes'] == 'gauge'
                assert kinds['looppool_task_duration_seconds'] == 'histogram'

                # One duration per reply, each a sleep of 10 ms and a round trip.
                count = scrape.value('looppool_task_duration_seconds_count')
                assert count == scrape.value('looppool_tasks_completed_total') == 10
                buckets = scrape.buckets()
                assert buckets[-1] == (float('inf'), count)
                assert [n for _, n in buckets] == sorted(n for _, n in buckets)
                assert dict(buckets)[0.005] == 0 and dict(buckets)[5.0] == 10
                assert 0.1 <= scrape.value('looppool_task_duration_seconds_sum') < 50

                # One series per worker; the readings of its own process.
                assert scrape.per_worker('looppool_worker_in_flight') == {0: 0, 1: 0}
                assert scrape.per_worker('looppool_worker_loop_lag_seconds') == {0: 0, 1: 0}
                assert_process_readings(scrape, worker_pids(pool.stats()))

                # A caller's timeout and cancel count apart from failures, and not as
                # durations.
                with pytest.raises(TimeoutError):
                    await pool.submit(('sleep', 30), timeout=0.05)
                doomed = pool.submit(('sleep', 30))
                await wait_until(lambda: pool.stats()['in_flight'] == 2,
                                 what='both tasks in flight')
                doomed.cancel()
                await wait_until(lambda: pool.stats()['in_flight'] == 0,
                                 what='both tasks ended in the worker')
                scrape = await server.scrape()
                assert scrape.counts() == {'submitted': 13, 'completed': 10, 'failed': 1,
                                           'lost': 0, 'timed_out': 1, 'cancelled': 1}
                assert scrape.value('looppool_task_duration_seconds_count') == 10
            finally:
                await server.close()

    run(main())


def test_worker_series_follow_a_replaced_worker() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            server = MetricsServer(PrometheusCollector(pool))
            try:
                old = worker_pids(pool.stats())
                doomed = pool.submit(('sleep', 30), worker_num=0)
                await wait_until(lambda: pool.stats()['workers'][0]['in_flight'] == 1,
                                 what='the task on worker 0')
                os.kill(old[0], signal.SIGKILL)
                with pytest.raises(looppool.WorkerLost):
                    await doomed
                await wait_until(lambda: pool.stats()['workers'][0]['state'] == 'running',
                                 what='worker 0 replaced')
                new = worker_pids(pool.stats())
                assert new[0] != old[0] and new[1] == old[1]
                scrape = await server.scrape()
                assert scrape.value('looppool_worker_restarts_total') == 1
                assert scrape.value('looppool_tasks_lost_total') == 1
                assert_process_readings(scrape, new)
            finally:
                await server.close()

    run(main())


def test_a_blocked_worker_shows_its_loop_lag() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            server = MetricsServer(PrometheusCollector(pool))
            try:
                # The worker spins without yielding, with a message it has not started.
                spinning = [pool.submit(('spin', 3.0), worker_num=0),
                            pool.submit('next', worker_num=0)]
                await wait_until(lambda: pool.stats()['workers'][0]['lag'] >= 0.2,
                                 what='worker 0 found blocked for 0.2 s')
                scrape = await server.scrape()
                lag = scrape.per_worker('looppool_worker_loop_lag_seconds')
                assert 0.2 <= lag[0] < 10 and lag[1] == 0, scrape.text
                assert scrape.per_worker('looppool_worker_in_flight') == {0: 2, 1: 0}
                assert scrape.value('looppool_tasks_in_flight') == 2
                assert await asyncio.gather(*spinning) == ['spun', 'next']
            finally:
                await server.close()

    run(main())


def test_a_collector_counts_durations_from_when_it_was_made() -> None:
    """A pool that ran without statsd took no start times: what was in flight when the
    collector came is left out of the histogram, not counted with a nonsense duration."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            await pool.submit('before')
            early = pool.submit(('sleep', 0.3))
            await wait_until(lambda: pool.stats()['in_flight'] == 1, what='a task in flight')
            server = MetricsServer(PrometheusCollector(pool))
            try:
                await asyncio.gather(*[pool.submit(i) for i in range(5)])
                await early
                scrape = await server.scrape()
                assert scrape.value('looppool_tasks_completed_total') == 7
                assert scrape.value('looppool_task_duration_seconds_count') == 5
                assert scrape.value('looppool_task_duration_seconds_sum') < 5
            finally:
                await server.close()

    run(main())


def test_statsd_goes_on_getting_its_samples() -> None:
    """With ``statsd=`` the pool times its tasks already: collectors made before start()
    and after it both fill their histogram, and statsd gets its duration samples too."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(('127.0.0.1', 0))
    client = statsd.StatsClient('127.0.0.1', sink.getsockname()[1])

    async def main() -> None:
        pool = looppool.Pool(pool_size=2, worker_class=Echo, statsd=client,
                             statsd_interval=60)
        before = PrometheusCollector(pool)
        async with pool:
            # (One registry cannot hold two collectors: their metrics have the same names.)
            servers = [MetricsServer(before), MetricsServer(PrometheusCollector(pool))]
            try:
                await servers[0].scrape()   # start() replaced what `before` had put in place
                await asyncio.gather(*[pool.submit(('sleep', 0.01)) for _ in range(4)])
                for server in servers:
                    scrape = await server.scrape()
                    assert scrape.value('looppool_task_duration_seconds_count') == 4
            finally:
                for server in servers:
                    await server.close()

    try:
        run(main())
        packets = b''
        sink.setblocking(False)
        while True:   # the pool's last report was sent when it stopped
            try:
                packets += sink.recv(65536) + b'\n'
            except BlockingIOError:
                break
    finally:
        client.close()
        sink.close()
    assert len(re.findall(rb'^looppool\.tasks\.duration:[\d.]+\|ms$', packets, re.M)) == 4
    assert re.search(rb'^looppool\.tasks\.completed:4\|c$', packets, re.M)


def test_a_scrape_from_another_thread_reads_on_the_pools_loop() -> None:
    """prometheus_client's own HTTP server runs on a thread; a loop that stays blocked
    longer than ``timeout`` reads as ``looppool_up 0``, and the next scrape as 1."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            registry = prometheus_client.CollectorRegistry()
            registry.register(PrometheusCollector(pool, timeout=0.2))
            httpd, thread = prometheus_client.start_http_server(0, '127.0.0.1', registry)
            url = f'http://127.0.0.1:{httpd.server_port}/metrics'
            loop = asyncio.get_running_loop()
            try:
                await asyncio.gather(*[pool.submit(i) for i in range(5)])
                scrape = await loop.run_in_executor(None, fetch, url)
                assert scrape.value('looppool_up') == 1
                assert scrape.value('looppool_tasks_submitted_total') == 5
                assert scrape.value('looppool_task_duration_seconds_count') == 5
                assert_process_readings(scrape, worker_pids(pool.stats()))

                blocked: list[Scrape] = []
                scraper = threading.Thread(target=lambda: blocked.append(fetch(url)))
                scraper.start()
                time.sleep(1.5)   # the fault: this loop does not run while the scrape waits
                await loop.run_in_executor(None, scraper.join, 20)
                assert blocked[0].value('looppool_up') == 0
                assert set(blocked[0].families) == {'looppool_up'}, blocked[0].text

                scrape = await loop.run_in_executor(None, fetch, url)
                assert scrape.value('looppool_up') == 1
            finally:
                await loop.run_in_executor(None, httpd.shutdown)
                httpd.server_close()
                thread.join(10)

    run(main())


@pytest.fixture
def host(sock_path: str):
    handle = remote.serve(Echo, sock_path, pool_size=2)
    try:
        yield handle
    finally:
        handle.stop()


def test_through_a_pool_host(host) -> None:
    """An asynchronous client feeds the collector: on its loop through refresh(), from
    another thread by itself. The workers are the host's."""
    async def main() -> None:
        async with remote.connect(host.address) as client:
            collector = PrometheusCollector(client)
            server = MetricsServer(collector)
            try:
                await asyncio.gather(*[client.submit(i) for i in range(6)])
                with pytest.raises(KeyError):
                    await client.submit(('raise', KeyError('x')))
                scrape = await server.scrape()
                assert scrape.value('looppool_up') == 1
                assert scrape.counts() == {'submitted': 7, 'completed': 6, 'failed': 1,
                                           'lost': 0, 'timed_out': 0, 'cancelled': 0}
                assert scrape.value('looppool_host_clients') == 1
                assert 'looppool_task_duration_seconds' not in scrape.families
                stats = await client.stats()
                assert stats['host_pid'] != os.getpid()
                assert_process_readings(scrape, worker_pids(stats))

                # From another thread, no refresh() needed: it reads on the client's loop.
                registry = server.registry
                text = await asyncio.get_running_loop().run_in_executor(
                    None, prometheus_client.generate_latest, registry)
                assert Scrape(text.decode()).value('looppool_tasks_submitted_total') == 7
            finally:
                await server.close()

    run(main())


def test_through_a_pool_host_with_a_blocking_client(host, caplog) -> None:
    """A blocking client is read where the scrape runs; a host that is gone reads as
    ``looppool_up 0``, logged once."""
    client = remote.connect_sync(host.address)
    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector(client))
    httpd, thread = prometheus_client.start_http_server(0, '127.0.0.1', registry)
    url = f'http://127.0.0.1:{httpd.server_port}/metrics'
    try:
        assert [client.submit(i) for i in range(3)] == [0, 1, 2]
        scrape = fetch(url)
        assert scrape.value('looppool_tasks_submitted_total') == 3
        assert scrape.value('looppool_tasks_completed_total') == 3
        assert_process_readings(scrape, worker_pids(client.stats()))

        host.stop()
        with caplog.at_level(logging.WARNING, logger='looppool'):
            for _ in range(2):
                scrape = fetch(url)
                assert scrape.value('looppool_up') == 0
                assert set(scrape.families) == {'looppool_up'}
        failures = [r for r in caplog.records if 'looppool_up is 0' in r.getMessage()]
        assert len(failures) == 1, caplog.text
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
        client.close()


def test_an_async_client_on_its_loop_needs_refresh(sock_path: str) -> None:
    async def main() -> None:
        client = remote.connect(sock_path)   # nothing is asked of it: no host is needed
        registry = prometheus_client.CollectorRegistry()
        registry.register(PrometheusCollector(client))
        with pytest.raises(RuntimeError, match=re.escape('await collector.refresh()')):
            prometheus_client.generate_latest(registry)
        await client.close()

    run(main())


def test_a_callable_feeds_it_and_its_failures_read_as_down() -> None:
    stats = {'state': 'running', 'pool_size': 1, 'submitted': 3, 'completed': 2,
             'failed': 1, 'lost': 0, 'cancelled': 0, 'timed_out': 0, 'restarts': 0,
             'in_flight': 0, 'waiting': 0,
             'workers': [{'number': 0, 'pid': os.getpid(), 'alive': True, 'in_flight': 0,
                          'lag': 0.5}]}
    answers: list[Any] = [stats, OSError('no route to the stats')]

    def read() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector(read))
    scrape = Scrape(prometheus_client.generate_latest(registry).decode())
    assert scrape.value('looppool_tasks_failed_total') == 1
    assert 'looppool_worker_recycles_total' not in scrape.text   # not in these stats
    assert scrape.per_worker('looppool_worker_loop_lag_seconds') == {0: 0.5}
    assert scrape.per_worker('looppool_worker_rss_bytes')[0] > 0
    scrape = Scrape(prometheus_client.generate_latest(registry).decode())
    assert scrape.value('looppool_up') == 0


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match='pool must be a looppool.Pool'):
        PrometheusCollector(42)
    with pytest.raises(ValueError, match='timeout must be a positive number'):
        PrometheusCollector(dict, timeout=0)
    for buckets in ([], [0.1, float('inf')], [-1], ['soon']):
        with pytest.raises(ValueError, match='buckets must be'):
            PrometheusCollector(dict, buckets=buckets)


def test_without_prometheus_client_the_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, 'prometheus_client', None)
    with pytest.raises(ImportError, match=re.escape('pip install "looppool[prometheus]"')):
        PrometheusCollector(dict)


@pytest.mark.timeout(90)
def test_the_example_serves_metrics() -> None:
    outcome = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'examples', 'prometheus_metrics.py')],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert outcome.returncode == 0, outcome
    assert outcome.stderr == '', outcome
    lines = outcome.stdout.splitlines()
    assert lines[-1] == 'pool stopped', outcome
    assert 'GET /primes?n=1 -> 400 {"error": "n must be at least 2, got 1"}' in lines
    shown = {line.strip() for line in lines if line.startswith('    ')}
    for expected in ('looppool_up 1.0', 'looppool_tasks_submitted_total 5.0',
                     'looppool_tasks_completed_total 4.0', 'looppool_tasks_failed_total 1.0',
                     'looppool_task_duration_seconds_count 4.0'):
        assert expected in shown, outcome
    rss = [line for line in shown if line.startswith('looppool_worker_rss_bytes{worker=')]
    assert len(rss) == 2, outcome
