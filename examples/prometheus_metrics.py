#!/usr/bin/env python3
"""A Tornado service that Prometheus scrapes: ``/metrics`` shows its looppool pool.

``/primes?n=N`` counts the primes below ``N`` in a pool worker (``n`` below 2 makes the
worker raise, which the handler turns into a 400). ``/metrics`` serves what a
:class:`looppool.metrics.PrometheusCollector` reads from the pool when it is asked: the
task counters, the task-duration histogram, and each worker's memory, CPU time, loop lag
and tasks in flight::

    Prometheus ── GET /metrics ──> MetricsHandler ── registry ── PrometheusCollector
                                                                   │ pool.stats(), psutil
    a client ──── GET /primes ───> PrimesHandler ─── pool.submit(n) ──> workers 0, 1

``python examples/prometheus_metrics.py --serve [PORT]`` runs the service (port 8000 by
default) until SIGINT or SIGTERM; point a Prometheus scrape job at
``http://HOST:PORT/metrics``. ``python examples/prometheus_metrics.py`` runs the demo: the
service on a free loopback port, a few requests (one of them failing), one scrape of its own
``/metrics`` read with ``prometheus_client``'s parser, a few of the lines it got; then it
stops the pool. It needs ``pip install "looppool[prometheus]"``.
"""

import asyncio
import os
import signal
import sys

import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

import looppool
from looppool.metrics import PrometheusCollector
from webapp import count_primes   # the same CPU-heavy work as the web app example

POOL_SIZE = 2


class PrimeWorker(looppool.Worker):
    """Runs in each worker process: counts primes, the slow way (all CPU)."""

    def handle(self, limit):
        if limit < 2:
            raise ValueError(f'n must be at least 2, got {limit}')
        return {'n': limit, 'primes': count_primes(limit), 'worker': self._number}


class PrimesHandler(tornado.web.RequestHandler):
    """``GET /primes?n=N``: a worker counts; this loop serves other requests meanwhile."""

    def initialize(self, pool):
        self.pool = pool

    async def get(self):
        try:
            limit = int(self.get_argument('n'))
            reply = await self.pool.submit(limit, timeout=10)
        except ValueError as error:   # not a number, or the worker refused it
            self.set_status(400)
            self.write({'error': str(error)})
            return
        self.write(reply)


class MetricsHandler(tornado.web.RequestHandler):
    """``GET /metrics``: the registry in the format the scraper asked for."""

    def initialize(self, registry, collector):
        self.registry = registry
        self.collector = collector

    async def get(self):
        # Needed only when the collector reads a pool host through looppool.remote.connect()
        # (an await cannot happen inside collect()); for a pool it returns at once.
        await self.collector.refresh()
        encode, content_type = choose_encoder(self.request.headers.get('Accept', ''))
        self.set_header('Content-Type', content_type)
        self.write(encode(self.registry))


def make_app(pool, **settings):
    # A registry of its own keeps the page to the pool's metrics; register the collector
    # with prometheus_client.REGISTRY instead to serve it beside the process_* metrics.
    registry = CollectorRegistry()
    collector = PrometheusCollector(pool)
    registry.register(collector)
    return tornado.web.Application([
        (r'/primes', PrimesHandler, {'pool': pool}),
        (r'/metrics', MetricsHandler, {'registry': registry, 'collector': collector}),
    ], **settings)


async def serve(port):
    # The workers start before the server's socket is bound, so that none inherits it.
    async with looppool.Pool(pool_size=POOL_SIZE, worker_class=PrimeWorker) as pool:
        server = tornado.httpserver.HTTPServer(make_app(pool))
        server.listen(port)
        print(f'serving http://127.0.0.1:{port}/metrics and /primes?n=N (pid {os.getpid()})',
              flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        server.stop()
        await server.close_all_connections()
    print('pool stopped')


# Which lines of the scrape the demo prints (all of them are served).
SHOWN = ('looppool_up ', 'looppool_tasks_submitted_total', 'looppool_tasks_completed_total',
         'looppool_tasks_failed_total', 'looppool_tasks_in_flight',
         'looppool_task_duration_seconds_count', 'looppool_worker_rss_bytes',
         'looppool_worker_cpu_seconds_total', 'looppool_worker_loop_lag_seconds')


async def demo():
    async with looppool.Pool(pool_size=POOL_SIZE, worker_class=PrimeWorker) as pool:
        pids = ', '.join(f'{w["number"]}: pid {w["pid"]}' for w in pool.stats()['workers'])
        print(f'pool of {pool.pool_size} workers ({pids})')
        sockets = tornado.netutil.bind_sockets(0, '127.0.0.1')
        # No access log: the demo prints what it sends and gets.
        server = tornado.httpserver.HTTPServer(make_app(pool, log_function=lambda _: None))
        server.add_sockets(sockets)
        base_url = f'http://127.0.0.1:{sockets[0].getsockname()[1]}'
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        try:
            for limit in (10_000, 20_000, 30_000, 40_000, 1):
                response = await client.fetch(f'{base_url}/primes?n={limit}',
                                              raise_error=False, request_timeout=30)
                print(f'GET /primes?n={limit} -> {response.code} {response.body.decode()}')
            response = await client.fetch(f'{base_url}/metrics', request_timeout=30)
        finally:
            client.close()
            server.stop()
            await server.close_all_connections()

    text = response.body.decode()
    families = list(text_string_to_metric_families(text))
    samples = sum(len(family.samples) for family in families)
    print(f'-- GET /metrics ({response.headers["Content-Type"]})')
    print(f"{len(families)} families, {samples} samples (prometheus_client's parser); "
          'among them:')
    for line in text.splitlines():
        if line.startswith(SHOWN):
            print('    ' + line)
    print('pool stopped')
    return 0


if __name__ == '__main__':
    if sys.argv[1:2] == ['--serve']:
        asyncio.run(serve(int(sys.argv[2]) if len(sys.argv) > 2 else 8000))
    else:
        sys.exit(asyncio.run(demo()))
