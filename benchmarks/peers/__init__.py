"""One module per peer, all with the same small interface, so that peer.py measures every
one of them with the same code.

Each module defines ``Peer(work, size)``, where ``work`` names a handler in
:mod:`handlers` (``'echo'``, ``'sleep'``, ``'burn'``, ``'spin'``, ``'mixed'``) and ``size``
is the number of worker processes, with:

- ``async start()``: create the pool (it need not be ready: the first call waits);
- ``async call(message)``: one round trip; returns the reply;
- ``async call_many(messages)``: send them all at once, return every reply (any order);
- ``async stop()``: a clean stop: accepted work finishes, every worker has exited;
- ``worker_pids()``: the pids of the worker processes (not helpers such as managers);
- ``START_METHOD`` and ``NOTES``: how it was set up, for the results.
"""

import importlib

# The order is the order of the table and the plot.
PEERS = {
    'looppool_submit': 'looppool submit()',
    'looppool_map': 'looppool map()',
    'looppool_map_iter': 'looppool map(), async for',
    'looppool_batch_map': 'looppool map(), handle_batch',
    'looppool_put_nowait': 'looppool put_nowait()',
    'looppool_remote': 'looppool remote submit()',
    'process_pool_executor': 'ProcessPoolExecutor',
    'process_pool_executor_map': 'ProcessPoolExecutor map()',
    'aiomultiprocess_pool': 'aiomultiprocess.Pool',
    'aiomultiprocess_fork': 'aiomultiprocess.Pool, fork',
    'ceiling': 'ceiling (hand-written)',
}

# Peers that run only some workloads. The bulk peers (looppool's map(), the executor's
# map()) differ from their one-at-a-time peers only where a burst is sent (call_many);
# elsewhere they would measure submit() or run_in_executor again. map() iterated with async
# for (rather than awaited) and map() to a batch worker (handle_batch) run W1 only: see their
# modules. aiomultiprocess under fork differs from its default (spawn) only in how its
# workers start.
ONLY = {
    'looppool_map': ('W1', 'W3', 'W6', 'W7'),
    'looppool_map_iter': ('W1',),
    'looppool_batch_map': ('W1',),
    'process_pool_executor_map': ('W1', 'W3', 'W6', 'W7'),
    'aiomultiprocess_fork': ('W5', 'MEM'),
}

# Workloads that only some peers run. W7 (uneven CPU-bound work) compares how a pool deals
# tasks to workers: the two looppool calls, ProcessPoolExecutor both ways (its workers take
# the next task when they are free: the yardstick) and aiomultiprocess. W8 (IO-bound tasks
# while one worker's loop is blocked) needs workers that run an IO loop: ProcessPoolExecutor
# has none, so every IO task would hold one of its workers (W3 shows what that costs).
# The ceiling, the Looppool 0.3 path and the forked aiomultiprocess would only repeat how
# their main peer deals work, and are left out.
PEERS_OF = {
    'W7': ('looppool_submit', 'looppool_map', 'process_pool_executor',
           'process_pool_executor_map', 'aiomultiprocess_pool'),
    'W8': ('looppool_submit', 'looppool_remote', 'aiomultiprocess_pool'),
    # W9: reloading on a code change, which only looppool does (Pool(reload=True)).
    'W9': ('looppool_submit',),
    # Payloads of 64 and 256 MiB: looppool (shared memory) against the socket of the
    # hand-written ceiling, the fair reference for what one socketpair moves; the others
    # already trail both at 1 MiB (W4).
    'W4L': ('looppool_submit', 'ceiling'),
    'W4XL': ('looppool_submit', 'ceiling'),
}


def runs(peer, workload):
    """Whether `peer` takes part in `workload`."""
    return (workload in ONLY.get(peer, (workload,))
            and peer in PEERS_OF.get(workload, (peer,)))


def load(name):
    if name not in PEERS:
        raise SystemExit(f'unknown peer {name!r}; known: {", ".join(PEERS)}')
    return importlib.import_module(f'peers.{name}')
