"""The ceiling: the hand-written design in ../ceiling.py, with the handlers as they are."""

import ceiling
import handlers

START_METHOD = 'fork'
NOTES = 'socketpair per worker, one pickle per batch, handlers stepped eagerly'


class Peer:

    def __init__(self, work, size):
        self.pool = ceiling.Pool(handlers.ASYNC[work], size)

    async def start(self):
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
        return self.pool.pids()
