"""Where shared memory starts to beat the socket: round trips of one bytes payload.

    python benchmarks/threshold.py [--rounds N]

For each size, sequential ``submit()`` round trips of a bytes payload to one worker that
echoes it, with big buffers through the socket (``looppool.shm.THRESHOLD = 0``) and through
shared memory (``THRESHOLD = 1``: every buffer). It prints, per size and path, the median
over the rounds of the round trip time and of the CPU time it costs the parent and the
worker together (on a busy machine the wall time waits for a CPU; the CPU time does not).
The paths are measured in turns, round after round, so that a change in the machine's load
falls on both.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time

import psutil

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import looppool  # noqa: E402
from looppool import shm  # noqa: E402

SIZES = [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20]
# Round trips per measurement: about 192 MiB each way, at least 200, after 20 unmeasured.
BYTES_PER_ROUND = 192 << 20


class Echo(looppool.Worker):
    async def handle(self, message):
        return message


def cpu(process):
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


async def measure(threshold, size, count):
    shm.THRESHOLD = threshold   # read when the pool is made
    me = psutil.Process()
    async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
        payload = os.urandom(size)
        for _ in range(20):
            await pool.submit(payload)
        cpu0, t0 = cpu(me), time.perf_counter()
        for _ in range(count):
            reply = await pool.submit(payload)
        wall, used = time.perf_counter() - t0, cpu(me) - cpu0
        assert reply == payload
    return wall / count * 1e6, used / count * 1e6


async def main(rounds, sizes):
    results = {}
    for _ in range(rounds):
        for size in sizes:
            count = max(200, BYTES_PER_ROUND // size)
            for name, threshold in (('socket', 0), ('shm', 1)):
                figures = await measure(threshold, size, count)
                results.setdefault((size, name), []).append(figures)
    print(f'{"size":>8} {"path":>7} {"round trip us":>14} {"CPU us":>8} {"MiB/s":>7}')
    for size in sizes:
        for name in ('socket', 'shm'):
            runs = results[(size, name)]
            wall = statistics.median(run[0] for run in runs)
            used = statistics.median(run[1] for run in runs)
            print(f'{size >> 10:>6}Ki {name:>7} {wall:>14,.0f} {used:>8,.0f} '
                  f'{size / 2 ** 20 / (wall / 1e6):>7,.0f}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--sizes', default=','.join(str(size >> 10) for size in SIZES),
                        help='in KiB, comma-separated')
    args = parser.parse_args()
    asyncio.run(main(args.rounds, [int(size) << 10 for size in args.sizes.split(',')]))
