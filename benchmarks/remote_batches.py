"""The batches a handle_batch worker gets from four clients of one pool host at once.

    python benchmarks/remote_batches.py [--messages N] [--rounds N]

aqueduct's scenario: four web processes send requests to one model process, which answers
them in batches. Here a ``looppool.serve()`` host runs two workers whose ``handle_batch``
answers a batch at a cost of 1 ms plus 20 us a message (a model call: a fixed cost per
call, a small one per input), ``batch_size=64``, ``batch_timeout=0.005``. Four client
processes, started together, each send ``--messages`` requests, keeping ``C`` of them out
at once (C = 1: a web worker serving one request at a time; 16: one serving many). It
prints, per concurrency, the median over the rounds of the throughput, of the mean batch
size and of the share of messages whose batch held another client's messages too, and
the batch sizes seen most in the last round (from the host's ``stats()['batches']``).
"""

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import looppool  # noqa: E402

CLIENTS = 4
CONCURRENCY = (1, 16)


class Model(looppool.Worker):
    """A model call: 1 ms per batch plus 20 us per message; answers with who asked."""

    async def handle_batch(self, messages):
        deadline = time.perf_counter() + 0.001 + 20e-6 * len(messages)
        while time.perf_counter() < deadline:
            pass
        clients = {client for client, _ in messages}
        return [(client, index, len(clients)) for client, index in messages]


async def _client(address, number, count, concurrency, mixed):
    async with looppool.connect(address) as client:
        queue = iter(range(count))

        async def one_at_a_time():
            for index in queue:
                _, _, seen = await client.submit((number, index))
                mixed.append(seen > 1)

        await asyncio.gather(*[one_at_a_time() for _ in range(concurrency)])


def _client_process(address, number, count, concurrency, start, out):
    mixed = []
    start.wait()
    asyncio.run(_client(address, number, count, concurrency, mixed))
    out.put((sum(mixed), len(mixed)))


def measure(address, count, concurrency):
    ctx = multiprocessing.get_context('fork')
    start, out = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_client_process,
                             args=(address, number, count, concurrency, start, out))
                 for number in range(CLIENTS)]
    for process in processes:
        process.start()
    sync = looppool.connect_sync(address)
    try:
        before = sync.stats()['batches']
        began = time.perf_counter()
        start.set()
        answers = [out.get(timeout=600) for _ in processes]
        wall = time.perf_counter() - began
        after = sync.stats()['batches']
    finally:
        sync.close()
    for process in processes:
        process.join(30)
    batches = after['count'] - before['count']
    messages = after['messages'] - before['messages']
    sizes = {size: count - before['sizes'].get(size, 0)
             for size, count in after['sizes'].items()
             if count - before['sizes'].get(size, 0)}
    mixed = sum(m for m, _ in answers) / sum(n for _, n in answers)
    return {'msg_per_s': messages / wall, 'mean_size': messages / batches,
            'mixed': mixed, 'sizes': sizes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--messages', type=int, default=2000, help='per client')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix='looppool-batches-')
    address = os.path.join(directory, 'pool.sock')
    host = looppool.serve(Model, address, pool_size=2, batch_size=64, batch_timeout=0.005)
    results = {concurrency: [] for concurrency in CONCURRENCY}
    try:
        for round_ in range(args.rounds):
            for concurrency in CONCURRENCY:
                result = measure(address, args.messages, concurrency)
                results[concurrency].append(result)
                print(f'round {round_ + 1}, {CLIENTS} clients x {concurrency} out: '
                      f'{result["msg_per_s"]:,.0f} msg/s, mean batch '
                      f'{result["mean_size"]:.1f}', file=sys.stderr, flush=True)
    finally:
        host.stop()
        os.rmdir(directory)
    print(f'{CLIENTS} clients of one pool host, 2 handle_batch workers (batch_size=64, '
          f'batch_timeout=5 ms; 1 ms + 20 us a message per batch), {args.messages:,} '
          f'requests per client; medians of {args.rounds} rounds')
    print()
    print('out per client   msg/s  mean batch  shared with another client  '
          'most seen sizes: batches (last round)')
    for concurrency, rounds in results.items():
        rate = statistics.median(r['msg_per_s'] for r in rounds)
        size = statistics.median(r['mean_size'] for r in rounds)
        mixed = statistics.median(r['mixed'] for r in rounds)
        sizes = ', '.join(f'{s}: {n}' for s, n in sorted(rounds[-1]['sizes'].items(),
                                                          key=lambda item: -item[1])[:6])
        print(f'{concurrency:>14}  {rate:6,.0f}  {size:10.1f}  {mixed:26.0%}  {sizes}')


if __name__ == '__main__':
    main()
