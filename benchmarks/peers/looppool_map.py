"""looppool for bulk work: ``replies = await pool.map(messages)``, the list of the replies
in order, as ``list(executor.map(...))`` is the executor's; one at a time with ``await
pool.submit(message)``, as the submit() peer does.

Awaited, map() gathers the replies a chunk at a time; ``async for reply in pool.map(...)``
(the peer looppool_map_iter) yields each one through the caller's loop, which for tiny
messages is most of the parent's cost. A program that wants every reply awaits it; one that
streams them iterates.
"""

from peers import looppool_submit

START_METHOD = 'default'   # the interpreter's, which is what a user gets
NOTES = ('Pool defaults (max_tasks=4096); await map() with its default chunks (the list of '
         'the replies); runs the workloads that send bursts (W1, W3, W6, W7): elsewhere it '
         'would be submit() again')


class Peer(looppool_submit.Peer):

    async def call_many(self, messages):
        return await self.pool.map(messages)
