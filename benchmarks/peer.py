"""Measure one peer on one workload, in this (fresh) interpreter; run.py starts it.

    python benchmarks/peer.py PEER WORKLOAD [--quick] [--reps N] [--budget SECONDS]

It prints one JSON object per line on stdout: first ``{"kind": "info", ...}``, then one
``{"kind": "rep", ...}`` per repetition as soon as it is measured (run.py shows progress
from them), and ``{"kind": "done"}``. Anything else goes to stderr.

Every repetition records its wall time and the CPU time used meanwhile by this process
(the parent, all its threads) and by its children (the workers and any helper process),
so that a peer that is fast because it burns more CPU shows it.
"""

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import psutil

# The looppool measured is the one in this checkout, installed or not.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peers  # noqa: E402  (needs the path above for the looppool peers)
from handlers import burn  # noqa: E402

WORKLOADS = ('W1', 'W2', 'W3', 'W4', 'W5', 'W6', 'W7', 'W8', 'W9', 'MEM')

# Sizes of each workload: the full run is the one the targets are stated for; --quick
# shrinks the counts so that every peer and workload fits in about a minute in all.
SIZES = {
    'full': {'W1': 100_000, 'W2': 2_000, 'W3': 2_000, 'W4': 200, 'W5': 1, 'W6': 100,
             'W7': 200, 'W8': 100, 'W9': 1, 'MEM': 1.0},
    'quick': {'W1': 20_000, 'W2': 200, 'W3': 100, 'W4': 40, 'W5': 1, 'W6': 20, 'W7': 20,
              'W8': 20, 'W9': 1, 'MEM': 0.3},
}
# A repetition that takes longer than this has hung (a lost reply): it fails with a message
# rather than waiting for run.py's watchdog.
REP_TIMEOUT = {'full': 120.0, 'quick': 10.0}
POOL_SIZE = 2
SLEEP = 0.05
PAYLOAD = 1 << 20
# W7: every SKEW_EVERY-th task computes for SKEW_LONG seconds, the others SKEW_SHORT.
SKEW_LONG = 0.1
SKEW_SHORT = 0.001
SKEW_EVERY = 10
# W8: IO tasks of IO_S seconds (asyncio.sleep), one every IO_EVERY_S, sent while one
# worker's loop spins for the length of their whole stream and BLOCK_MARGIN_S more (0.6 s
# for the full run's 100 tasks), so that every one of them is sent while it is blocked.
IO_S = 0.02
IO_EVERY_S = 0.005
BLOCK_MARGIN_S = 0.1


class Meter:
    """CPU seconds (user + system) of this process and of its children, live or reaped."""

    def __init__(self):
        self.me = psutil.Process()

    def read(self):
        parent = sum(self.me.cpu_times()[:2])
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = reaped.ru_utime + reaped.ru_stime
        for child in self.me.children(recursive=True):
            try:
                children += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass   # it ended between the listing and the reading
        return parent, children


def emit(record):
    sys.stdout.write(json.dumps(record) + '\n')
    sys.stdout.flush()


class Runner:
    """Runs the repetitions of one workload and emits them."""

    def __init__(self, peer_name, workload, mode, reps, budget):
        self.peer_name = peer_name
        self.module = peers.load(peer_name)
        self.workload = workload
        self.size = SIZES[mode][workload]
        self.rep_timeout = REP_TIMEOUT[mode]
        self.reps = reps
        self.budget = budget
        self.meter = Meter()
        self.started = time.monotonic()
        self.rep = 0

    def more(self):
        """Whether to run another repetition: until `reps`, or the budget is spent."""
        if self.rep >= self.reps:
            return False
        return self.rep == 0 or time.monotonic() - self.started < self.budget

    async def measure(self, body):
        """Time ``await body()``, which returns the workload's figures.

        A figure named ``check`` is a function that checks the replies; it runs after the
        CPU reading, so checking costs the peer nothing.
        """
        gc.collect()   # the previous repetition's garbage is not this one's cost
        cpu0 = self.meter.read()
        t0 = time.perf_counter()
        try:
            figures = await asyncio.wait_for(body(), self.rep_timeout)
        except asyncio.TimeoutError:
            raise SystemExit(f'{self.peer_name} {self.workload}: repetition {self.rep + 1} '
                             f'did not finish within {self.rep_timeout:.0f} s (a reply was '
                             'lost, or the peer is that slow)') from None
        wall = time.perf_counter() - t0
        cpu1 = self.meter.read()
        verify = figures.pop('check', None)
        if verify is not None:
            verify()
        self.rep += 1
        emit({'kind': 'rep', 'peer': self.peer_name, 'workload': self.workload,
              'rep': self.rep, 'wall_s': wall, 'cpu_parent_s': cpu1[0] - cpu0[0],
              'cpu_children_s': cpu1[1] - cpu0[1], **figures})

    async def started_peer(self, work, size=POOL_SIZE):
        """A started pool whose workers have all answered once (start-up is W5's)."""
        peer = self.module.Peer(work, size)
        await peer.start()
        warm = {'echo': 0, 'sleep': 0.0, 'burn': 0, 'spin': 0.0, 'mixed': ('io', 0.0)}[work]
        await peer.call_many([warm] * (4 * size))
        return peer

    # -- the workloads ---------------------------------------------------------------------

    async def W1(self):
        """Throughput: `size` tiny echo messages at once, every reply awaited."""
        peer = await self.started_peer('echo')
        messages = list(range(self.size))
        await peer.call_many(messages[:2000])   # warm-up: first-use costs are not throughput
        while self.more():
            async def body():
                t0 = time.perf_counter()
                replies = await peer.call_many(messages)
                seconds = time.perf_counter() - t0
                return {'msg_per_s': len(messages) / seconds,
                        'check': lambda: check(sorted(replies) == messages,
                                               'W1 replies differ from the messages')}
            await self.measure(body)
        await peer.stop()

    async def W2(self):
        """Latency: `size` sequential round trips of a tiny message."""
        peer = await self.started_peer('echo')
        for i in range(50):
            await peer.call(i)
        while self.more():
            async def body():
                clock = time.perf_counter_ns
                call = peer.call
                samples, replies = [], []
                for i in range(self.size):
                    t0 = clock()
                    replies.append(await call(i))
                    samples.append(clock() - t0)
                samples.sort()
                return {'p50_us': samples[len(samples) // 2] / 1000,
                        'p99_us': samples[int(len(samples) * 0.99)] / 1000,
                        'mean_us': statistics.fmean(samples) / 1000,
                        'check': lambda: check(replies == list(range(self.size)),
                                               'W2 replies differ from the messages')}
            await self.measure(body)
        await peer.stop()

    async def W3(self):
        """IO concurrency: `size` tasks of `await asyncio.sleep(0.05)` at once."""
        peer = await self.started_peer('sleep')
        await peer.call_many([0.001] * 20)
        messages = [SLEEP] * self.size
        while self.more():
            async def body():
                t0 = time.perf_counter()
                replies = await peer.call_many(messages)
                seconds = time.perf_counter() - t0
                check(len(replies) == len(messages), 'W3 lost replies')
                return {'seconds': seconds, 'ideal_s': SLEEP}
            await self.measure(body)
        await peer.stop()

    async def W4(self):
        """Payload: `size` sequential round trips of 1 MiB of bytes."""
        peer = await self.started_peer('echo')
        payload = os.urandom(PAYLOAD)
        for _ in range(5):
            await peer.call(payload)
        while self.more():
            async def body():
                t0 = time.perf_counter()
                for _ in range(self.size):
                    reply = await peer.call(payload)
                seconds = time.perf_counter() - t0
                return {'mib_per_s': self.size * PAYLOAD / 2 ** 20 / seconds,
                        'check': lambda: check(reply == payload,
                                               'W4 reply differs from the payload')}
            await self.measure(body)
        await peer.stop()

    async def W5(self):
        """Start-up: pool creation to the first reply; then a clean stop."""
        while self.more():
            async def body():
                t0 = time.perf_counter()
                peer = self.module.Peer('echo', POOL_SIZE)
                await peer.start()
                check(await peer.call(1) == 1, 'W5 reply differs')
                t1 = time.perf_counter()
                pids = peer.worker_pids()
                await peer.stop()
                t2 = time.perf_counter()
                alive = [pid for pid in pids if pid_alive(pid)]
                check(not alive, f'W5: workers {alive} still alive after stop')
                return {'start_ms': (t1 - t0) * 1e3, 'stop_ms': (t2 - t1) * 1e3}
            await self.measure(body)

    async def W6(self):
        """CPU scaling: `size` CPU-bound tasks, in this process and on 1 and 2 workers.

        The machine's own limit is measured too: two bare forked processes splitting the
        same work, with no pool at all. On a shared virtual machine two "cores" can give
        well under 2x, and no pool can beat that.
        """
        units = [1] * self.size
        while self.more():
            async def body():
                figures = {}
                for workers in (1, 2):
                    peer = await self.started_peer('burn', workers)
                    t0 = time.perf_counter()
                    replies = await peer.call_many(units)
                    figures[workers] = time.perf_counter() - t0
                    await peer.stop()
                    check(len(replies) == len(units), 'W6 lost replies')
                t0 = time.perf_counter()
                for unit in units:
                    burn(unit)
                alone = time.perf_counter() - t0
                bare = bare_processes_time(len(units))
                return {'alone_s': alone, 'one_worker_s': figures[1],
                        'two_workers_s': figures[2], 'bare_two_processes_s': bare,
                        'speedup_1': alone / figures[1], 'speedup_2': alone / figures[2],
                        'machine_speedup_2': alone / bare}
            await self.measure(body)

    async def W7(self):
        """Skewed CPU: `size` CPU-bound tasks at once, every tenth 100 ms, the rest 1 ms."""
        peer = await self.started_peer('spin')
        tasks = skewed_tasks(self.size)
        await peer.call_many([SKEW_SHORT] * (4 * POOL_SIZE))
        while self.more():
            async def body():
                t0 = time.perf_counter()
                replies = await peer.call_many(tasks)
                seconds = time.perf_counter() - t0
                return {'seconds': seconds, 'ideal_s': ideal_seconds(tasks, POOL_SIZE),
                        'task_total_s': sum(tasks),
                        'check': lambda: check(sorted(replies) == sorted(tasks),
                                               'W7 replies differ from the tasks')}
            await self.measure(body)
        await peer.stop()

    async def W8(self):
        """Blocked loop: IO tasks sent at a steady pace while one worker's loop is blocked.

        One CPU-bound task that spins for `block` seconds is sent, and right after it
        `size` IO tasks (``await asyncio.sleep(0.02)``), one every 5 ms, each on a schedule
        fixed from the start (a late one does not delay the next). The blocking task lasts
        the whole stream and 0.1 s more, so every IO task is sent while a worker's loop is
        blocked. An IO task's latency runs from its call to its reply, as its caller sees
        it; alone, it would be 0.02 s and a round trip.
        """
        peer = await self.started_peer('mixed')
        io = ('io', IO_S)
        block = self.size * IO_EVERY_S + BLOCK_MARGIN_S
        await peer.call_many([io] * (4 * POOL_SIZE))
        while self.more():
            async def body():
                clock = time.perf_counter

                async def timed(message):
                    t0 = clock()
                    reply = await peer.call(message)
                    return clock() - t0, reply

                blocker = asyncio.ensure_future(timed(('cpu', block)))
                calls = []
                start = clock()
                for k in range(self.size):
                    delay = start + k * IO_EVERY_S - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    calls.append(asyncio.ensure_future(timed(io)))
                sent = clock() - start
                done = await asyncio.gather(*calls)
                block_seconds, block_reply = await blocker
                latencies = sorted(seconds for seconds, _ in done)
                n = len(latencies)
                return {'io_p50_ms': latencies[n // 2] * 1e3,
                        'io_p90_ms': latencies[int(n * 0.9)] * 1e3,
                        'io_p99_ms': latencies[int(n * 0.99)] * 1e3,
                        'io_max_ms': latencies[-1] * 1e3,
                        'io_ms': IO_S * 1e3, 'block_s': block,
                        'block_reply_s': block_seconds, 'stream_s': sent,
                        'check': lambda: check(
                            block_reply == block and all(r == IO_S for _, r in done),
                            'W8 replies differ from the tasks')}
            await self.measure(body)
        await peer.stop()

    async def W9(self):
        """Reload: Pool(reload=True) serving a request every 2 ms; from the moment a
        changed worker module is saved to the first reply of its new code, and to the end
        of the rolling restart (every worker on the new code)."""
        import importlib
        import tempfile

        import looppool
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, 'w9_worker.py')
            save_version(path, 0)
            sys.path.insert(0, directory)
            module = importlib.import_module('w9_worker')
            async with looppool.Pool(pool_size=POOL_SIZE, worker_class=module.Versioned,
                                     reload=True) as pool:
                reloader = pool._lifecycle.reloader
                await asyncio.sleep(0.5)   # the watch is set up (not measured)
                version = 0
                while self.more():
                    version += 1

                    async def body():
                        t0 = time.perf_counter()
                        save_version(path, version)
                        while await pool.submit('which') != version:
                            await asyncio.sleep(0.002)
                        first = time.perf_counter() - t0
                        while reloader.reloads < version:
                            await pool.submit('which')
                            await asyncio.sleep(0.002)
                        return {'reload_ms': first * 1e3,
                                'all_ms': (time.perf_counter() - t0) * 1e3,
                                'failed': pool.stats()['failed']}
                    await self.measure(body)
                check(pool.stats()['failed'] == 0, 'W9: a request failed during a reload')

    async def MEM(self):
        """Memory: resident size of an idle worker, against a bare interpreter."""
        peer = await self.started_peer('echo')
        await asyncio.sleep(self.size)   # let start-up garbage go and the worker idle
        while self.more():
            async def body():
                rss, uss = [], []
                for pid in peer.worker_pids():
                    info = psutil.Process(pid).memory_full_info()
                    rss.append(info.rss)
                    uss.append(info.uss)
                bare = bare_interpreter_memory()
                mib = 2 ** 20
                return {'worker_rss_mib': statistics.median(rss) / mib,
                        'worker_uss_mib': statistics.median(uss) / mib,
                        'bare_rss_mib': bare.rss / mib, 'bare_uss_mib': bare.uss / mib}
            await self.measure(body)
        await peer.stop()


def save_version(path, version):
    """W9's worker module, answering ``version``, saved as an editor saves it."""
    with open(path + '.tmp', 'w') as file:
        file.write('import looppool\n\n\nclass Versioned(looppool.Worker):\n'
                   f'    async def handle(self, message):\n        return {version}\n')
    os.replace(path + '.tmp', path)


def skewed_tasks(count):
    """W7's tasks, in seconds: the 10th, 20th, ... compute for 100 ms, the others 1 ms."""
    return [SKEW_LONG if (index + 1) % SKEW_EVERY == 0 else SKEW_SHORT
            for index in range(count)]


def ideal_seconds(tasks, workers):
    """The least time any pool can take over `tasks` on `workers`: the larger of their
    total time shared out evenly and the longest task, which one worker must run
    whole. A bound, not always reachable; W7's list reaches it (each worker takes half
    the long tasks and half the short ones: 1.09 s for the full run)."""
    return max(sum(tasks) / workers, max(tasks))


def bare_processes_time(count):
    """Seconds for two forked processes to burn `count` units between them, no pool."""
    import multiprocessing
    context = multiprocessing.get_context('fork')
    t0 = time.perf_counter()
    processes = [context.Process(target=burn_units, args=(half,))
                 for half in (count // 2, count - count // 2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return time.perf_counter() - t0


def burn_units(count):
    for _ in range(count):
        burn(1)


def bare_interpreter_memory():
    """Memory of ``python -c 'import tornado'``, kept alive just long enough to read it."""
    process = subprocess.Popen(
        [sys.executable, '-c', 'import tornado, sys; print(flush=True); sys.stdin.read()'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        process.stdout.readline()
        return psutil.Process(process.pid).memory_full_info()
    finally:
        process.stdin.close()
        process.stdout.close()
        process.wait(10)


def pid_alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def start_method(declared):
    if declared == 'default':
        import multiprocessing
        return multiprocessing.get_start_method()
    return declared


def versions():
    found = {'python': platform.python_version()}
    for name in ('looppool', 'tornado', 'aiomultiprocess', 'psutil'):
        try:
            module = __import__(name)
            found[name] = getattr(module, '__version__', getattr(module, 'version', None))
        except Exception:
            found[name] = None
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('peer', choices=list(peers.PEERS))
    parser.add_argument('workload', choices=WORKLOADS)
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--budget', type=float, default=60.0,
                        help='stop repeating once this many seconds are spent (at least '
                             'one repetition always runs)')
    args = parser.parse_args()
    runner = Runner(args.peer, args.workload, 'quick' if args.quick else 'full', args.reps,
                    args.budget)
    emit({'kind': 'info', 'peer': args.peer, 'workload': args.workload,
          'size': runner.size, 'pool_size': POOL_SIZE, 'pid': os.getpid(),
          'start_method': start_method(runner.module.START_METHOD),
          'notes': runner.module.NOTES,
          'versions': versions()})
    asyncio.run(getattr(runner, args.workload)())
    emit({'kind': 'done', 'peer': args.peer, 'workload': args.workload})


if __name__ == '__main__':
    main()
