"""Round trips of one big bytes payload, with and without what shared memory saves on them.

    python benchmarks/sendback.py [--sizes 1,64,256] [--count N] [--rounds N]

An echo handler's reply is the bytes it received, which goes back as the parent's own
segment (see the manual's "Big payloads" page): no write, no read. A reply that is a new
object is written and read like any other. This measures both on the same echo handler,
the second with sending back turned off in the worker (for measuring only: the channel is
told nothing was read into a bytes), and that again with no large segment kept for use
again, which is how every payload over 64 MiB went before. One worker, ``fork``; the
median round trip per size and path, in MiB/s of payload each way. Paths take turns.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import looppool  # noqa: E402
from looppool import channel, shm  # noqa: E402

PATHS = ('sent back', 'written', 'written, none kept')


class Echo(looppool.Worker):
    async def handle(self, message):
        return message


def patched(path):
    """The channel's methods as ``path`` needs them (restored by the caller)."""
    release, released = channel.Channel._release, shm.Segments.released
    if path != 'sent back':
        channel.Channel._release = lambda self, segment, read: release(self, segment, None)
    if path == 'written, none kept':
        def drop_large(self, segment_id):
            released(self, segment_id)
            if self.large is not None:
                self.large.close()
                self.large = None
        shm.Segments.released = drop_large
    return release, released


async def measure(path, size, count):
    release, released = patched(path)   # before the fork: the worker has them too
    try:
        async with looppool.Pool(pool_size=1, worker_class=Echo, mp_context='fork') as pool:
            payload = os.urandom(size)
            await pool.submit(payload)
            times = []
            for _ in range(count):
                t0 = time.perf_counter()
                reply = await pool.submit(payload)
                times.append(time.perf_counter() - t0)
                assert len(reply) == size
                del reply
    finally:
        channel.Channel._release, shm.Segments.released = release, released
    return size / 2 ** 20 / statistics.median(times)


async def main(sizes, count, rounds):
    results = {(size, path): [] for size in sizes for path in PATHS}
    for _ in range(rounds):
        for size in sizes:
            for path in PATHS:
                results[size, path].append(await measure(path, size, count or max(
                    5, (512 << 20) // size)))
    print(f'{"MiB":>6}  ' + '  '.join(f'{path:>18}' for path in PATHS))
    for size in sizes:
        print(f'{size >> 20:>6}  ' + '  '.join(
            f'{statistics.median(results[size, path]):>18.0f}' for path in PATHS))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1,64,256', help='MiB, comma-separated')
    parser.add_argument('--count', type=int, default=0, help='round trips per measure')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main([int(size) << 20 for size in args.sizes.split(',')], args.count,
                     args.rounds))
