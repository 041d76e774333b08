"""looppool, modern style: ``await pool.submit(message)`` answered by ``Worker.handle``."""

import asyncio

import looppool

import handlers

START_METHOD = 'default'   # the interpreter's, which is what a user gets
NOTES = 'Pool defaults (max_tasks=4096); handle() returns the reply'


class Echo(looppool.Worker):
    async def handle(self, message):
        return message


class Sleep(looppool.Worker):
    async def handle(self, seconds):
        await asyncio.sleep(seconds)


class Burn(looppool.Worker):
    async def handle(self, units):
        return handlers.burn(units)


class Spin(looppool.Worker):
    async def handle(self, seconds):
        return handlers.spin(seconds)


class Mixed(looppool.Worker):
    async def handle(self, message):
        return await handlers.mixed_async(message)


WORKERS = {'echo': Echo, 'sleep': Sleep, 'burn': Burn, 'spin': Spin, 'mixed': Mixed}


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
        submit = self.pool.submit
        futures = [submit(message) for message in messages]
        return [await future for future in futures]

    async def stop(self):
        await self.pool.stop()

    def worker_pids(self):
        return [worker['pid'] for worker in self.pool.stats()['workers']]
