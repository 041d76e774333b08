"""aiomultiprocess.Pool: coroutines in worker processes, each running an asyncio loop.

Bursts use ``pool.map`` (its bulk call), single round trips ``pool.apply``.
``childconcurrency`` is raised from 16 to 2048 tasks per worker, the share that looppool's
default bounds give each of two workers, so that the IO workload is not limited by a
setting. Its workers start with ``spawn``, aiomultiprocess's default on every platform
(``DEFAULT_START_METHOD`` in its ``core.py``; Linux's ``fork`` is not used unless asked for),
so this is the pool a user gets. ``fork`` works too, from inside a running loop as here: the
``aiomultiprocess_fork`` peer measures its start-up and memory.
"""

import aiomultiprocess

import handlers

# Read from the library rather than written here: whatever it starts workers with unasked.
START_METHOD = aiomultiprocess.core.get_context().get_start_method()
CHILD_CONCURRENCY = 2048
NOTES = f'childconcurrency={CHILD_CONCURRENCY}; map() for bursts, apply() for one'


class Peer:

    def __init__(self, work, size):
        self.function = handlers.ASYNC[work]
        self.size = size
        self.pool = None

    async def start(self):
        self.pool = aiomultiprocess.Pool(processes=self.size,
                                         childconcurrency=CHILD_CONCURRENCY)

    async def call(self, message):
        return await self.pool.apply(self.function, (message,))

    async def call_many(self, messages):
        return await self.pool.map(self.function, messages)

    async def stop(self):
        self.pool.close()
        await self.pool.join()

    def worker_pids(self):
        return [process.pid for process in self.pool.processes]
