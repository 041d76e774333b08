"""aiomultiprocess.Pool with its workers forked, not spawned: start-up and memory only.

aiomultiprocess starts its processes with ``spawn`` unless told otherwise, on Linux too
(``DEFAULT_START_METHOD = "spawn"`` in its ``core.py``), so the ``aiomultiprocess_pool`` peer
measures that, as a user gets it. ``aiomultiprocess.set_start_method('fork')`` is one call
away, and works with the pool created inside a running loop, as here; this peer measures
what it changes: the start-up (W5) and an idle worker's memory (MEM). Steady-state figures
do not depend on how a worker was started, so the other workloads are left to the main peer.
"""

import aiomultiprocess

from peers import aiomultiprocess_pool

START_METHOD = 'fork'
NOTES = ('as aiomultiprocess.Pool, after aiomultiprocess.set_start_method("fork"); '
         'runs W5 and MEM only')


class Peer(aiomultiprocess_pool.Peer):

    async def start(self):
        aiomultiprocess.set_start_method(START_METHOD)
        await super().start()
