"""Benchmark looppool against its alternatives: one command, a table, a JSON file, a plot.

    .venv/bin/python benchmarks/run.py [--quick] [--peers a,b] [--workloads W1,W2]
                                       [--out DIR] [--reps N] [--rounds N]

Every (peer, workload) pair runs in a fresh interpreter (``peer.py``), one after the
other, never two at once: the machine has two cores and the pools use both. Start-up (W5)
gets a fresh interpreter for every repetition, since a library's first pool in a process
is the one a program pays for. With ``--rounds`` the whole sweep is repeated, workload by
workload, so that a burst of load on a shared machine falls on every peer alike.

Progress goes to stderr; the table to stdout and, with the JSON and the plot, to
``benchmarks/results/`` (``latest.txt``, ``latest.json``, ``latest.png``). Nothing here
asserts a speed: the targets section only reports ratios.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402
import report  # noqa: E402

PEERS_LIST = list(peers.PEERS)

WORKLOADS = ('W1', 'W2', 'W3', 'W4', 'W4L', 'W4XL', 'W5', 'W6', 'W7', 'W8', 'W9', 'MEM')

# Repetitions inside one interpreter, and how many seconds a (peer, workload) may spend
# repeating before it settles for what it has (at least one repetition always runs). The
# slow peers reach the budget first: ProcessPoolExecutor's IO workload takes ~50 s a go.
# A full run makes three rounds: on a shared virtual machine, round-trip latency alone moves
# between 30 and 110 us from one minute to the next, and interleaving spreads that over
# every peer instead of landing on one.
MODES = {
    'full': {'reps': 3, 'rounds': 3, 'budget': 45.0, 'timeout': 900.0, 'startup_reps': 3},
    'quick': {'reps': 3, 'rounds': 1, 'budget': 1.0, 'timeout': 30.0, 'startup_reps': 1},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='smaller counts and fewer repetitions; about a minute in all')
    parser.add_argument('--peers', default=','.join(peers.PEERS),
                        help=f'comma-separated, from: {", ".join(peers.PEERS)}')
    parser.add_argument('--workloads', default=','.join(WORKLOADS),
                        help=f'comma-separated, from: {", ".join(WORKLOADS)}')
    parser.add_argument('--out', default=os.path.join(HERE, 'results'),
                        help='folder for latest.json, latest.txt and latest.png')
    parser.add_argument('--reps', type=int, help='repetitions per interpreter')
    parser.add_argument('--rounds', type=int,
                        help='repeat the whole sweep this many times, interleaved '
                             '(default: 3, or 1 with --quick)')
    parser.add_argument('--python', default=sys.executable,
                        help='interpreter that runs the peers (default: this one)')
    parser.add_argument('--no-plot', action='store_true')
    args = parser.parse_args()
    args.peers = split(args.peers, peers.PEERS, '--peers')
    args.workloads = split(args.workloads, WORKLOADS, '--workloads')
    return args


def split(value, known, option):
    names = [name.strip() for name in value.split(',') if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(f'{option}: unknown {", ".join(unknown) or "(empty)"}; '
                         f'known: {", ".join(known)}')
    return names


class Progress:
    """One line on stderr per finished repetition, with the step count and elapsed time."""

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def line(self, text):
        elapsed = int(time.monotonic() - self.started)
        sys.stderr.write(f'[{self.done:>3}/{self.total} {elapsed // 60}:{elapsed % 60:02}] '
                         f'{text}\n')
        sys.stderr.flush()


# The order peers are measured in, within a workload: the ceiling next to the looppool
# peers whose targets are ratios to it, the slow peers at the far end. Every other round
# runs it backwards, so looppool submit() is measured right before or right after the
# ceiling each time: the machine's speed drifts over minutes, and a ratio of two figures
# taken a minute apart measures the drift as much as the peers.
# The bulk calls, looppool's map() and the executor's map(), are compared with each
# other, so they are neighbours too (map() to a batch worker on the executor's other side).
MEASURE_ORDER = ('ceiling', 'looppool_submit', 'looppool_put_nowait', 'looppool_map',
                 'process_pool_executor_map', 'looppool_batch_map', 'looppool_map_iter',
                 'looppool_remote', 'aiomultiprocess_pool',
                 'aiomultiprocess_fork', 'process_pool_executor')
# W7's targets are ratios to ProcessPoolExecutor (run_in_executor), so there it is measured
# next to looppool submit(), and the two map() calls next to each other.
ORDER_OF = {
    'W7': ('process_pool_executor', 'looppool_submit', 'looppool_map',
           'process_pool_executor_map', 'aiomultiprocess_pool'),
}


def ordered(names, workload):
    order = ORDER_OF.get(workload, MEASURE_ORDER)
    return sorted(names, key=lambda name: (order.index(name) if name in order
                                           else len(order) + PEERS_LIST.index(name)))


def plan(args, mode):
    """The steps, in order: (workload, peer, reps for that interpreter)."""
    steps = []
    for round_number in range(args.rounds or mode['rounds']):
        for workload in args.workloads:
            order = ordered([peer for peer in args.peers if peers.runs(peer, workload)],
                            workload)
            for peer in (order if round_number % 2 == 0 else order[::-1]):
                if workload == 'W5':
                    steps.extend([(workload, peer, 1)] * mode['startup_reps'])
                else:
                    steps.append((workload, peer, args.reps or mode['reps']))
    return steps


def run_step(args, mode, step, progress):
    """Run one peer.py; return (info, reps, error, strays)."""
    workload, peer, reps = step
    command = [args.python, os.path.join(HERE, 'peer.py'), peer, workload,
               '--reps', str(reps), '--budget', str(mode['budget'])]
    if args.quick:
        command.append('--quick')
    info, records, error = None, [], None
    with tempfile.TemporaryFile('w+') as stderr:
        # A session of its own: whatever the peer starts can be found and ended by its id.
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr,
                                 text=True, start_new_session=True)
        # The watchdog thread owns only the kill: reading stays on this thread, and ends
        # at end of file once the session is killed.
        expired = threading.Event()

        def expire():
            expired.set()
            kill_session(child.pid)

        watchdog = threading.Timer(mode['timeout'], expire)
        watchdog.start()
        try:
            for line in child.stdout:
                record = json.loads(line)
                if record['kind'] == 'info':
                    info = record
                elif record['kind'] == 'rep':
                    records.append(record)
                    progress.line(f'{workload} {peers.PEERS[peer]:<24} rep {record["rep"]}: '
                                  f'{report.brief(workload, record)}')
            child.wait()
        except BaseException:   # Ctrl-C reaches only this process group, not the peer's
            kill_session(child.pid)
            raise
        finally:
            watchdog.cancel()
            child.stdout.close()
        if expired.is_set():
            error = f'timed out after {mode["timeout"]:.0f} s'
        strays = sweep_session(child.pid)
        if error is None and child.returncode != 0:
            stderr.seek(0)
            lines = [line.rstrip() for line in stderr if line.strip()]
            error = lines[-1] if lines else f'exit code {child.returncode}'
            sys.stderr.write(''.join(f'    | {line}\n' for line in lines[-8:]))
    if error:
        progress.line(f'{workload} {peers.PEERS[peer]:<24} FAILED: {error}')
    return info, records, error, strays


def session_members(sid):
    members = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except OSError:
                pass
    return members


def kill_session(sid):
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def sweep_session(sid):
    """Processes the peer left behind. Helpers that end on their parent's exit (a
    resource tracker) get two seconds to do so; whatever remains is killed and counted."""
    deadline = time.monotonic() + 2.0
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    strays = session_members(sid)
    if strays:
        kill_session(sid)
    return strays


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil
        memory = f'{psutil.virtual_memory().total / 2 ** 30:.0f} GiB'
    except ImportError:
        memory = None
    return {'cpu': model, 'cpus': os.cpu_count(), 'memory': memory,
            'system': platform.platform(), 'python': platform.python_version(),
            'load_before': os.getloadavg()}


def terminated(signum, frame):
    # SIGTERM becomes an exception, so that run_step ends the running peer's session (it
    # is in a session of its own, which no signal sent to this process group reaches).
    raise SystemExit(128 + signum)


def main():
    signal.signal(signal.SIGTERM, terminated)
    args = parse_args()
    mode = MODES['quick' if args.quick else 'full']
    steps = plan(args, mode)
    progress = Progress(len(steps))
    results = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'command': ' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        'mode': 'quick' if args.quick else 'full',
        'machine': machine(),
        'peers': {name: {'label': peers.PEERS[name]} for name in args.peers},
        'runs': [],
    }
    progress.line(f'{len(steps)} steps, {len(args.peers)} peers, '
                  f'{results["mode"]} mode; load average {os.getloadavg()[0]:.2f}')
    for step in steps:
        info, records, error, strays = run_step(args, mode, step, progress)
        progress.done += 1
        workload, peer, _ = step
        results['runs'].append({'peer': peer, 'workload': workload, 'info': info,
                                'reps': records, 'error': error, 'strays': strays})
        if info is not None:
            results['peers'][peer].update(
                {key: info[key] for key in ('start_method', 'notes', 'versions')})
        if strays:
            progress.line(f'{workload} {peers.PEERS[peer]}: left {len(strays)} process(es) '
                          'behind; they were killed')
    results['machine']['load_after'] = os.getloadavg()
    # The interpreter measured is the peers' (--python), not necessarily this one.
    for run in results['runs']:
        if run['info']:
            results['machine']['python'] = run['info']['versions']['python']
            break
    results['seconds'] = time.monotonic() - progress.started
    results['summary'] = report.summarize(results)
    text = report.render(results)

    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, 'latest.json'), json.dumps(results, indent=1) + '\n')
    write(os.path.join(args.out, 'latest.txt'), text)
    sys.stdout.write(text)
    if not args.no_plot:
        try:
            import plot
        except ImportError as exc:
            progress.line(f'no plot: {exc} (pip install -r benchmarks/requirements.txt)')
        else:
            path = os.path.join(args.out, 'latest.png')
            plot.render(results, path)
            progress.line(f'plot written to {os.path.relpath(path)}')
    failed = [run for run in results['runs'] if run['error']]
    return 1 if failed else 0


def write(path, text):
    # Written beside, then renamed: an interrupted run never leaves half a file.
    temporary = path + '.tmp'
    with open(temporary, 'w') as out:
        out.write(text)
    os.replace(temporary, path)


if __name__ == '__main__':
    sys.exit(main())
