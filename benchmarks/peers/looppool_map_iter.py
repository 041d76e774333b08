"""looppool's map() iterated: ``[reply async for reply in pool.map(messages)]``, each reply
yielded through the caller's loop as its chunk comes back. The same chunks and workers as
the looppool_map peer (which awaits the list); the difference is the caller's cost per
reply, so it runs W1 only, where that cost shows."""

from peers import looppool_submit

START_METHOD = 'default'   # the interpreter's, which is what a user gets
NOTES = ('Pool defaults (max_tasks=4096); async for over map() with its default chunks; '
         'runs W1 only')


class Peer(looppool_submit.Peer):

    async def call_many(self, messages):
        return [reply async for reply in self.pool.map(messages)]
