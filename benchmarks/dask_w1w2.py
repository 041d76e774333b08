"""W1 and W2 for a DaskPool on a local Dask cluster, next to the local pool, in one run.

    .venv/bin/python benchmarks/dask_w1w2.py [--reps N] [--w1 COUNT] [--w2 COUNT]
                                             [--warm-up COUNT] [--json]

- **W1 throughput**: 100,000 tiny echo messages submitted at once, every reply awaited;
  messages per second.
- **W2 latency**: 2,000 sequential round trips of a tiny message; p50 and p99 in µs.

Both pools have two workers and the same ``Worker`` class: a local :class:`looppool.Pool`
(two worker processes), and a :class:`looppool.dask.DaskPool` on a
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, whose scheduler runs
on this process's loop (it is idle while actors are called: the client talks to the Dask
workers directly). Each pool gets a warm-up, then the repetitions alternate between the two
pools so that a burst of outside load falls on both; figures are medians. Nothing here
asserts a speed: the last line gives the ratio the Dask issue asks about (DaskPool's W1 at
least a tenth of the local pool's).
"""

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import looppool  # noqa: E402


class Echo(looppool.Worker):
    """Defined in __main__: the DaskPool sends it to the cluster by value."""

    async def handle(self, message):
        return message


async def w1(pool, count):
    messages = list(range(count))
    started = time.perf_counter()
    replies = await asyncio.gather(*[pool.submit(message) for message in messages])
    seconds = time.perf_counter() - started
    if replies != messages:
        raise SystemExit('W1: the replies differ from the messages')
    return count / seconds


async def w2(pool, count):
    clock = time.perf_counter_ns
    samples = []
    for index in range(count):
        started = clock()
        reply = await pool.submit(index)
        samples.append(clock() - started)
        if reply != index:
            raise SystemExit('W2: a reply differs from its message')
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


async def measure(args):
    from distributed import Client, LocalCluster

    from looppool.dask import DaskPool

    results = {'local': {'w1': [], 'p50': [], 'p99': []},
               'dask': {'w1': [], 'p50': [], 'p99': []}}
    async with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                            asynchronous=True, dashboard_address='127.0.0.1:0') as cluster, \
            Client(cluster, asynchronous=True, direct_to_workers=True) as client, \
            looppool.Pool(pool_size=2, worker_class=Echo) as local, \
            DaskPool(client, Echo, pool_size=2) as dask:
        pools = {'local': local, 'dask': dask}
        for pool in pools.values():   # warm-up: first-use costs are not what is measured
            await w1(pool, args.warm_up)
            await w2(pool, max(1, args.warm_up // 40))
        for rep in range(args.reps):
            for name, pool in pools.items():
                gc.collect()
                rate = await w1(pool, args.w1)
                gc.collect()
                p50, p99 = await w2(pool, args.w2)
                figures = results[name]
                figures['w1'].append(rate)
                figures['p50'].append(p50)
                figures['p99'].append(p99)
                print(f'rep {rep + 1} {name:>5}: W1 {rate:9,.0f} msg/s   '
                      f'W2 p50 {p50:7.0f} µs  p99 {p99:7.0f} µs', file=sys.stderr)
        calls = dask.stats()['calls']
    return results, calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--reps', type=int, default=3, help='repetitions (default 3)')
    parser.add_argument('--w1', type=int, default=100_000, help='W1 message count')
    parser.add_argument('--w2', type=int, default=2_000, help='W2 round trips')
    parser.add_argument('--warm-up', type=int, default=2_000,
                        help='W1 messages sent to each pool before measuring (default 2,000; '
                             'the tests use a small count for a quick run)')
    parser.add_argument('--json', action='store_true', help='print the figures as JSON')
    args = parser.parse_args()
    results, calls = asyncio.run(measure(args))
    medians = {name: {key: statistics.median(values) for key, values in figures.items()}
               for name, figures in results.items()}
    if args.json:
        print(json.dumps({'medians': medians, 'reps': results, 'dask_calls': calls}))
        return
    print(f'median of {args.reps}; W1 = {args.w1:,} messages at once, '
          f'W2 = {args.w2:,} sequential round trips')
    print(f'{"pool":<28} {"W1 msg/s":>10} {"W2 p50 µs":>10} {"W2 p99 µs":>10}')
    labels = {'local': 'looppool.Pool (2 processes)',
              'dask': 'DaskPool (LocalCluster, 2)'}
    for name, label in labels.items():
        figures = medians[name]
        print(f'{label:<28} {figures["w1"]:>10,.0f} {figures["p50"]:>10.0f} '
              f'{figures["p99"]:>10.0f}')
    ratio = medians['dask']['w1'] / medians['local']['w1']
    print(f'DaskPool W1 / local W1 = {ratio:.2f} (the issue asks for at least 0.10); '
          f'{calls:,} actor calls in all')


if __name__ == '__main__':
    main()
