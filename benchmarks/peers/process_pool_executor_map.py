"""concurrent.futures.ProcessPoolExecutor through its own bulk call, ``Executor.map``.

``executor.map(fn, messages, chunksize=...)`` pickles the messages in chunks (one task per
chunk, not per message) and returns the replies in order. The call blocks until the last
reply, so it runs in a thread (``asyncio.to_thread``) and the loop stays free meanwhile, as
a loop program would call it; called on the loop itself it measured the same within the
noise.

The chunk size is 5,000, the best of those tried on the project's machine with W1 (100,000
echoes, 2 workers), in interleaved rounds, on 2026-12-03: medians of 0.8 million messages a
second with chunks of 100, 2.65 million with 1,000 (15 repetitions each), and 2.85, 2.90
and 2.80 million with 2,500, 5,000 and 10,000 (45 each): level within the noise from 2,500
to 10,000, and 5,000 is the middle of that. A burst too short to give every worker four
chunks of that size is cut finer, by the rule looppool's ``map()`` applies to its own
default chunks: without it the 100 tasks of W6 would go to one worker as one chunk.

W7's uneven work (``'spin'``: 200 tasks of 1 ms and 100 ms) goes with ``chunksize=1``, the
executor's default, as a user would leave it for a few hundred tasks that each take a
millisecond or more. A chunk is a fixed bundle that one worker runs to its end, so on uneven
work it can only make the shares less even, and a task's own overhead in the executor is
small next to a millisecond; with one task a chunk, a worker takes the next task when it is
free, which is what W7 measures. In a check on 2026-12-03 (three runs each), W7 took
1.11 s with chunks of 1 and 1.22 s with chunks of 25, the size the rule above gives.
"""

import asyncio

import handlers
from peers import process_pool_executor

START_METHOD = 'default'
CHUNKSIZE = 5_000
UNEVEN_CHUNKSIZE = 1   # W7: the executor's default, kept for uneven work
NOTES = (f'max_workers=2; Executor.map in a thread, chunksize={CHUNKSIZE:,} (at most a '
         'quarter of a worker\'s share of the burst), or 1 on uneven work (W7); runs the '
         'workloads that send bursts (W1, W3, W6, W7)')


def chunksize(count, workers):
    """CHUNKSIZE, or less for a short burst: at least four chunks for every worker."""
    return max(1, min(CHUNKSIZE, -(-count // (4 * workers))))


class Peer(process_pool_executor.Peer):

    async def call_many(self, messages):
        executor, function = self.executor, self.function
        size = (UNEVEN_CHUNKSIZE if self.function is handlers.spin
                else chunksize(len(messages), self.size))

        def mapped():
            return list(executor.map(function, messages, chunksize=size))

        return await asyncio.to_thread(mapped)
