"""looppool for bulk work: ``async for reply in pool.map(messages)``; one at a time with
``await pool.submit(message)``, as the submit() peer does."""

from peers import looppool_submit

START_METHOD = 'default'   # the interpreter's, which is what a user gets
NOTES = ('Pool defaults (max_tasks=4096); map() with its default chunks; runs the workloads '
         'that send bursts (W1, W3, W6, W7): elsewhere it would be submit() again')


class Peer(looppool_submit.Peer):

    async def call_many(self, messages):
        return [reply async for reply in self.pool.map(messages)]
