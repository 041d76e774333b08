"""looppool shared between processes: a host started with ``looppool.serve()`` on a Unix
socket, and ``await client.submit(message)`` from this process (issue 6's remote figures).

Every message crosses twice: client -> host over the socket, host -> worker over the
worker's channel (and the reply back the same way), so this measures what a web process
pays for a pool it shares with its siblings.
"""

import os
import tempfile

import looppool

from peers.looppool_submit import WORKERS

START_METHOD = 'default'
NOTES = 'looppool.serve() host on a Unix socket; looppool.connect() client, submit()'


class Peer:

    def __init__(self, work, size):
        self.worker_class = WORKERS[work]
        self.size = size
        self.directory = tempfile.mkdtemp(prefix='looppool-bench-')
        self.host = None
        self.client = None
        self.pids = []

    async def start(self):
        address = os.path.join(self.directory, 'pool.sock')
        self.host = looppool.serve(self.worker_class, address, pool_size=self.size)
        self.client = looppool.connect(self.host.address)
        await self.client.connect()
        self.pids = [w['pid'] for w in (await self.client.stats())['workers']]

    async def call(self, message):
        return await self.client.submit(message)

    async def call_many(self, messages):
        submit = self.client.submit
        futures = [submit(message) for message in messages]
        return [await future for future in futures]

    async def stop(self):
        await self.client.close()
        self.host.stop()
        os.rmdir(self.directory)

    def worker_pids(self):
        return list(self.pids)
