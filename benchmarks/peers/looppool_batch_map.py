"""looppool's map() to a batch worker: ``await pool.map(messages)`` (as the looppool_map
peer) where the worker defines ``handle_batch(messages)`` (looppool.batch) and returns the
list of replies; elsewhere it would be submit() again, so it runs W1 only.

A chunk of map() goes to ``handle_batch`` in batches of ``batch_size``, each handed over as
soon as the chunk is read. ``batch_size`` is 2,048, a worker's whole share of ``max_tasks``
(the Pool default 4,096 over 2 workers) and so the most it may be: map()'s default chunks
grow to that share on tiny messages, and a batch as large as the chunk hands each chunk
over as one call with one future, where the default of 64 would make 32 of each. In a
check on 2026-12-03 (W1's 100,000 echoes, default chunks, 7 runs each, the machine shared
with other runs), batches of 64, 256, 512 and 2,048 moved medians of 1.6 to 2.3, 2.4 to
2.7, 1.8 to 2.7 and 2.9 to 3.0 million messages a second: the noise is as large as the
differences below 2,048, and 2,048 was the best and the steadiest. ``batch_timeout`` stays
at its default: a chunk's batches never wait for it.

W3, W6 and W7 are left out: a batch of W3's sleeps would have to gather them itself (what
handle() does one by one), and a batch of CPU-bound tasks runs them one after another in
one worker, which on W6 and W7 can only deal the work out less evenly than map() with
handle() does.
"""

import looppool

from peers import looppool_map

START_METHOD = 'default'   # the interpreter's, which is what a user gets
BATCH_SIZE = 2048
NOTES = (f'Pool defaults (max_tasks=4096) with batch_size={BATCH_SIZE:,} (a worker\'s share); '
         'handle_batch() returns the list of replies; await map() with its default chunks; '
         'runs W1 only')


class Echo(looppool.Worker):
    async def handle_batch(self, messages):
        return messages


WORKERS = {'echo': Echo}


class Peer(looppool_map.Peer):

    def __init__(self, work, size):
        super().__init__(work, size)
        self.worker_class = WORKERS[work]

    async def start(self):
        self.pool = looppool.Pool(pool_size=self.size, worker_class=self.worker_class,
                                  batch_size=BATCH_SIZE)
        self.pool.start()
