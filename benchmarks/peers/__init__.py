"""One module per peer, all with the same small interface, so that peer.py measures every
one of them with the same code.

Each module defines ``Peer(work, size)``, where ``work`` names a handler in
:mod:`handlers` (``'echo'``, ``'sleep'``, ``'burn'``) and ``size`` is the number of worker
processes, with:

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
# elsewhere they would measure submit() or run_in_executor again. aiomultiprocess under fork
# differs from its default (spawn) only in how its workers start.
ONLY = {
    'looppool_map': ('W1', 'W3', 'W6'),
    'process_pool_executor_map': ('W1', 'W3', 'W6'),
    'aiomultiprocess_fork': ('W5', 'MEM'),
}


def load(name):
    if name not in PEERS:
        raise SystemExit(f'unknown peer {name!r}; known: {", ".join(PEERS)}')
    return importlib.import_module(f'peers.{name}')
