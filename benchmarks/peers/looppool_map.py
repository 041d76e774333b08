"""looppool for bulk work: ``async for reply in pool.map(messages)``; one at a time with
``await pool.submit(message)``."""

import looppool

from peers.looppool_submit import WORKERS

START_METHOD = 'default'   # the interpreter's, which is what a user gets
NOTES = ('Pool defaults (max_tasks=4096); map() with its default chunks; runs the workloads '
         'that send bursts (W1, W3, W6): elsewhere it would be submit() again')


class Peer:

    def __init__(self, work, size):
        self.worker_class = WORKERS[work]
        self.size = size
        self.pool = None

    async def start(self):
        self.pool = looppool.Pool(pool_size=self.size, worker_class=self.worker_class)
        self.pool.start()

    async def call(self, message):
        return await self.pool.submit(message)

    async def call_many(self, messages):
        return [reply async for reply in self.pool.map(messages)]

    async def stop(self):
        await self.pool.stop()

    def worker_pids(self):
        return [worker['pid'] for worker in self.pool.stats()['workers']]
