#!/usr/bin/env python3
"""A Tornado web application with a CPU-heavy endpoint that does not block its loop.

``/fast`` answers at once. ``/primes?n=N`` counts the primes below ``N`` by trial division,
which keeps a CPU busy for a few hundred milliseconds. Computed in the request handler (as
``/primes/inline`` does), that work blocks the loop: every other request, fast or not, waits
behind it. ``/primes`` hands it to a looppool pool with ``await pool.submit(n)`` instead, so
the loop stays free and the heavy requests run side by side, one per CPU.

Run it as it is: it starts the server on a free loopback port, sends itself two rounds of
requests with Tornado's HTTP client (heavy requests, and a stream of fast ones while they
run), first with the work inline and then with the work in the pool, prints what happened,
stops the pool and exits.
"""

import asyncio
import json
import os
import statistics
import time

import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.web

import looppool

# One worker per CPU, but no more than the four heavy requests of a round can use.
POOL_SIZE = min(4, os.cpu_count() or 1)


def count_primes(limit):
    """Count the primes below ``limit`` the slow way: pure Python, all CPU."""
    count = 0
    for candidate in range(2, limit):
        divisor = 2
        while divisor * divisor <= candidate:
            if candidate % divisor == 0:
                break
            divisor += 1
        else:
            count += 1
    return count


class PrimeWorker(looppool.Worker):
    """Runs in each worker process; counts primes for the web application."""

    # A plain method: the work is CPU-bound and has nothing to await, so each call runs to
    # the end on the worker's loop before the worker takes the next message.
    def handle(self, limit):
        started = time.perf_counter()
        primes = count_primes(limit)
        return {
            'n': limit,
            'primes': primes,
            'worker': self._number,
            'pid': os.getpid(),
            'seconds': time.perf_counter() - started,
        }


class FastHandler(tornado.web.RequestHandler):

    def get(self):
        self.write({'pid': os.getpid()})


class InlinePrimesHandler(tornado.web.RequestHandler):
    """The naive way: the loop computes, and nothing else happens meanwhile."""

    def get(self):
        started = time.perf_counter()
        limit = int(self.get_argument('n'))
        primes = count_primes(limit)
        self.write({
            'n': limit,
            'primes': primes,
            'worker': None,
            'pid': os.getpid(),
            'seconds': time.perf_counter() - started,
        })


class PrimesHandler(tornado.web.RequestHandler):
    """The looppool way: the loop awaits a worker's reply and serves others meanwhile."""

    def initialize(self, pool):
        self.pool = pool

    async def get(self):
        limit = int(self.get_argument('n'))
        self.write(await self.pool.submit(limit))


def make_app(pool):
    return tornado.web.Application([
        (r'/fast', FastHandler),
        (r'/primes/inline', InlinePrimesHandler),
        (r'/primes', PrimesHandler, {'pool': pool}),
    ])


async def fetch_json(client, url):
    response = await client.fetch(url, request_timeout=60)
    return json.loads(response.body)


async def one_round(client, base_url, path, limits):
    """Send one heavy request per limit at once, and probe /fast until they are all done."""
    started = time.perf_counter()
    heavy = asyncio.gather(*[fetch_json(client, f'{base_url}{path}?n={limit}')
                             for limit in limits])
    latencies = []
    while not heavy.done():
        sent = time.perf_counter()
        await client.fetch(base_url + '/fast', request_timeout=60)
        latencies.append(time.perf_counter() - sent)
        await asyncio.sleep(0.02)
    replies = await heavy
    elapsed = time.perf_counter() - started

    for reply in replies:
        where = ('the server process itself' if reply['worker'] is None
                 else f'worker {reply["worker"]}')
        print(f'    n={reply["n"]}: {reply["primes"]} primes, computed by {where} '
              f'(pid {reply["pid"]}) in {reply["seconds"]:.2f} s')
    print(f'    {len(limits)} heavy requests took {elapsed:.2f} s in all')
    print(f'    /fast while they ran: {len(latencies)} request(s), '
          f'median {statistics.median(latencies) * 1000:.1f} ms, '
          f'max {max(latencies) * 1000:.1f} ms')
    return replies, latencies


async def main():
    started = time.perf_counter()
    # Start the workers before binding the server's socket, so that no worker inherits it.
    async with looppool.Pool(pool_size=POOL_SIZE, worker_class=PrimeWorker) as pool:
        print(f'server pid {os.getpid()}; pool of {pool.pool_size} workers, pids '
              + ', '.join(str(w['pid']) for w in pool.stats()['workers']))

        sockets = tornado.netutil.bind_sockets(0, '127.0.0.1')
        server = tornado.httpserver.HTTPServer(make_app(pool))
        server.add_sockets(sockets)
        base_url = f'http://127.0.0.1:{sockets[0].getsockname()[1]}'
        print(f'listening on {base_url}')
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=50)
        limits = [200_000, 220_000, 240_000, 260_000]
        try:
            print('round 1: /primes/inline computes in the request handler, on the loop')
            _, inline_latencies = await one_round(client, base_url, '/primes/inline', limits)
            print('round 2: /primes awaits pool.submit(n); the workers compute')
            replies, pool_latencies = await one_round(client, base_url, '/primes', limits)
        finally:
            client.close()
            server.stop()
            await server.close_all_connections()

    served = {}
    for reply in replies:
        served.setdefault((reply['worker'], reply['pid']), []).append(reply['n'])
    for (worker, pid), ns in sorted(served.items()):
        print(f'worker {worker} (pid {pid}) served n=' + ', '.join(map(str, ns)))
    print(f'slowest /fast request: {max(inline_latencies) * 1000:.1f} ms with the work '
          f'inline, {max(pool_latencies) * 1000:.1f} ms with the work in the pool')
    print(f'pool stopped; total time {time.perf_counter() - started:.2f} s')


if __name__ == '__main__':
    asyncio.run(main())
