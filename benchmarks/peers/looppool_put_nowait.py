"""looppool, Looppool 0.3 style: ``put_nowait`` in, ``_put_nowait`` back to
``process_message``, both sides decorated with ``@task_done``.

A burst larger than the pool's bounds meets ``queue.Full``; the caller then waits for room
with ``await pool.put()``, which is how a Looppool-style program keeps its default bounds.
Results carry no task id, so a call waits for as many results as it sent messages.
"""

import asyncio
import queue

import looppool

import handlers

START_METHOD = 'default'
NOTES = 'Pool defaults; put_nowait, await put() on queue.Full; results via process_message'


class Echo(looppool.Worker):
    @looppool.task_done
    def _process_message(self, message):
        self._put_nowait(message)


class Sleep(looppool.Worker):
    @looppool.task_done
    async def _process_message(self, seconds):
        await asyncio.sleep(seconds)
        self._put_nowait(None)


class Burn(looppool.Worker):
    @looppool.task_done
    def _process_message(self, units):
        self._put_nowait(handlers.burn(units))


WORKERS = {'echo': Echo, 'sleep': Sleep, 'burn': Burn}


class Peer:

    def __init__(self, work, size):
        self.worker_class = WORKERS[work]
        self.size = size
        self.pool = None
        self.results = []
        self.expected = 0
        self.done = None

    async def start(self):
        self.pool = looppool.Pool(pool_size=self.size, worker_class=self.worker_class)
        self.pool.process_message = self.process_message
        self.pool.start()

    @looppool.task_done
    def process_message(self, result, result_done):
        results = self.results
        results.append(result)
        if len(results) == self.expected:
            self.done.set_result(None)

    async def call(self, message):
        return (await self.call_many([message]))[0]

    async def call_many(self, messages):
        self.results = []
        self.expected = len(messages)
        self.done = asyncio.get_running_loop().create_future()
        pool = self.pool
        put_nowait = pool.put_nowait
        for message in messages:
            try:
                put_nowait(message)
            except queue.Full:
                await pool.put(message)
        await self.done
        return self.results

    async def stop(self):
        await self.pool.stop()

    def worker_pids(self):
        return [worker['pid'] for worker in self.pool.stats()['workers']]
