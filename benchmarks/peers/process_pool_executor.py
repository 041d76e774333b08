"""concurrent.futures.ProcessPoolExecutor, driven from the loop with ``run_in_executor``.

Its workers have no loop, so they run the plain shapes of the handlers; the sleep handler
runs its coroutine with ``asyncio.run`` and holds the worker while it waits.
"""

import asyncio
import concurrent.futures

import handlers

START_METHOD = 'default'
NOTES = 'max_workers=2; run_in_executor per message'


class Peer:

    def __init__(self, work, size):
        self.function = handlers.PLAIN[work]
        self.size = size
        self.executor = None
        self.loop = None

    async def start(self):
        self.loop = asyncio.get_running_loop()
        self.executor = concurrent.futures.ProcessPoolExecutor(max_workers=self.size)

    async def call(self, message):
        return await self.loop.run_in_executor(self.executor, self.function, message)

    async def call_many(self, messages):
        run, executor, function = self.loop.run_in_executor, self.executor, self.function
        futures = [run(executor, function, message) for message in messages]
        return [await future for future in futures]

    async def stop(self):
        # shutdown() blocks; nothing else runs on this loop meanwhile, so blocking it is
        # the quickest stop, and a thread would only add its own start-up to the time.
        self.executor.shutdown(wait=True)

    def worker_pids(self):
        # The executor keeps its processes in a private dict; there is no public way.
        return list(self.executor._processes)
