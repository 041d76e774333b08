"""How long from a worker's death to its replacement taking work (issue 3's figure).

    python benchmarks/recovery.py [--kills 15] [--start-method fork]

Kills worker 0 with SIGKILL, then measures the time until a task sent to worker 0 (queued
right after the kill) is answered by the replacement: detection on the sentinel, fork or
spawn, _initialise(), and the first round trip. Prints each time and the median and worst.
"""

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import looppool  # noqa: E402


class Pid(looppool.Worker):
    async def handle(self, message):
        return os.getpid()


async def measure(kills: int, method: str) -> list[float]:
    times = []
    async with looppool.Pool(pool_size=2, worker_class=Pid, mp_context=method) as pool:
        for number in range(kills):
            # Past the quick-death window: a worker killed within 1 s of its start, twice
            # running, is restarted with back-off on purpose; that is not what this measures.
            await asyncio.sleep(1.1)
            pid = await pool.submit(None, worker_num=0)
            os.kill(pid, signal.SIGKILL)
            started = time.perf_counter()
            while True:   # the first task answered by a new process under number 0
                try:
                    new_pid = await pool.submit(None, worker_num=0, timeout=30)
                except looppool.WorkerLost:
                    continue   # sent before the death was noticed: lost, as promised
                if new_pid != pid:
                    break
            times.append(time.perf_counter() - started)
            print(f'kill {number + 1:3d}: replacement answered after '
                  f'{times[-1] * 1000:7.1f} ms', file=sys.stderr)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--kills', type=int, default=15)
    parser.add_argument('--start-method', default='fork')
    args = parser.parse_args()
    times = asyncio.run(measure(args.kills, args.start_method))
    print(f'{args.start_method}: {len(times)} kills; death to replacement taking work: '
          f'median {statistics.median(times) * 1000:.1f} ms, worst {max(times) * 1000:.1f} ms')


if __name__ == '__main__':
    main()
