"""How long from a worker's death to its replacement taking work (issue 3's figure).

    python benchmarks/recovery.py [--kills 15] [--quick-kills 6] [--start-method fork]

Kills worker 0 with SIGKILL, then measures the time until a task sent to worker 0 (queued
right after the kill) is answered by the replacement: detection on the sentinel, fork or
spawn, _initialise(), and the first round trip. Two cases, reported apart:

ordinary deaths
    the killed worker had run for a while (over a second) first: the replacement starts
    at once. This is the figure a crash in production costs.
repeated quick deaths
    each replacement is killed as soon as it answered, so every death after the first
    comes within a second of the worker's start. From the second such death in a row the
    pool backs off on purpose (0.1 s, 0.2 s, 0.4 s, ... between restarts) so that a worker
    that keeps crashing cannot fork-bomb the machine: these times include that delay.

Prints each time (to stderr) and, for each case, the median and the worst (to stdout).
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

# A worker killed within this long of its start counts as a quick death (looppool's
# _QUICK_DEATH); waiting past it makes the next death an ordinary one.
QUICK_DEATH = 1.0


class Pid(looppool.Worker):
    async def handle(self, message):
        return os.getpid()


async def kill_and_time(pool: looppool.Pool, pid: int) -> tuple[float, int]:
    """SIGKILL ``pid`` (worker 0); the seconds until a new process under number 0 answers,
    and its pid."""
    os.kill(pid, signal.SIGKILL)
    started = time.perf_counter()
    while True:   # the first task answered by a new process under number 0
        try:
            new_pid = await pool.submit(None, worker_num=0, timeout=60)
        except looppool.WorkerLost:
            continue   # sent before the death was noticed: lost, as promised
        if new_pid != pid:
            return time.perf_counter() - started, new_pid


async def ordinary(kills: int, method: str) -> list[float]:
    times = []
    async with looppool.Pool(pool_size=2, worker_class=Pid, mp_context=method) as pool:
        for number in range(kills):
            await asyncio.sleep(QUICK_DEATH + 0.1)   # the worker has run a while
            pid = await pool.submit(None, worker_num=0)
            elapsed, _ = await kill_and_time(pool, pid)
            times.append(elapsed)
            print(f'ordinary kill {number + 1:3d}: replacement answered after '
                  f'{elapsed * 1000:7.1f} ms', file=sys.stderr)
    return times


async def quick(kills: int, method: str) -> list[float]:
    times = []
    async with looppool.Pool(pool_size=2, worker_class=Pid, mp_context=method) as pool:
        await asyncio.sleep(QUICK_DEATH + 0.1)   # the series starts from a settled worker
        pid = await pool.submit(None, worker_num=0)
        for number in range(kills):
            elapsed, pid = await kill_and_time(pool, pid)   # then kill the replacement
            times.append(elapsed)
            print(f'quick kill {number + 1:3d}: replacement answered after '
                  f'{elapsed * 1000:7.1f} ms', file=sys.stderr)
    return times


def summary(label: str, method: str, times: list[float]) -> str:
    if not times:
        return f'{method}, {label}: no kills'
    return (f'{method}, {label}: {len(times)} kills; death to replacement taking work: '
            f'median {statistics.median(times) * 1000:.1f} ms, '
            f'worst {max(times) * 1000:.1f} ms')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--kills', type=int, default=15,
                        help='ordinary deaths to time (each after over a second of work)')
    parser.add_argument('--quick-kills', type=int, default=6,
                        help='repeated quick deaths to time (the back-off doubles each time)')
    parser.add_argument('--start-method', default='fork')
    args = parser.parse_args()
    method = args.start_method
    ordinary_times = asyncio.run(ordinary(args.kills, method))
    quick_times = asyncio.run(quick(args.quick_kills, method))
    print(summary('ordinary deaths (the worker ran over a second)', method, ordinary_times))
    print(summary('repeated quick deaths (includes the restart back-off, on purpose)',
                  method, quick_times)
          + (' | each: ' + ', '.join(f'{t * 1000:.0f}' for t in quick_times) + ' ms'
             if quick_times else ''))


if __name__ == '__main__':
    main()
