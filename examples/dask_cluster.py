#!/usr/bin/env python3
"""Scaling out with Dask: the same Worker class, run by a DaskPool on a Dask cluster.

Each worker number becomes a Dask actor pinned to a Dask worker; its ``handle`` coroutines
run on that Dask worker's event loop. This program starts a local cluster of two Dask
worker processes (on a real cluster, connect the client to the scheduler's address
instead), and then:

1. starts a DaskPool of ``WordCounter``, a class defined right here in ``__main__``, which
   the cluster cannot import: the pool sends it by value;
2. hands every worker a stop-word list with a sticky broadcast;
3. counts words in a batch of documents, and shows an exception crossing back with the
   worker's traceback;
4. kills the Dask worker process under worker 0 while documents are in flight: those
   documents fail with ``WorkerLost``, the others are counted, and worker 0 is re-created
   on a live Dask worker with the stop words replayed to it;
5. stops the pool and the cluster, and exits.

Run it as it is; it takes a few seconds.
"""

import asyncio
import collections
import logging
import os
import signal
import time

# Dask logs every connection at INFO level; keep its warnings only. Set before distributed
# is imported, so that the Dask worker processes read it too.
os.environ.setdefault('DASK_LOGGING__DISTRIBUTED', 'warning')

import distributed  # noqa: E402

import looppool  # noqa: E402
from looppool.dask import DaskPool  # noqa: E402


class WordCounter(looppool.Worker):
    """Counts the words of a document, leaving out the stop words it was given."""

    def _initialise(self):
        self.stop_words = frozenset()
        self.version = None

    async def handle(self, message):
        kind, payload = message
        if kind == 'stop-words':
            version, words = payload
            self.version, self.stop_words = version, frozenset(words)
            return self._number
        if kind == 'whoami':
            return self._number, os.getpid(), self.version
        # A document: pretend to fetch it first (IO on the Dask worker's loop), then count.
        await asyncio.sleep(0.05)
        if not isinstance(payload, str):
            raise TypeError(f'a document must be text, got {type(payload).__name__}')
        words = [word for word in payload.lower().split() if word not in self.stop_words]
        return collections.Counter(words)


DOCUMENTS = [
    'the pool sends the class to the cluster',
    'a worker keeps its number when it comes back',
    'the loop of the dask worker runs the handlers',
    'messages travel in batches to the actors',
] * 50


async def main():
    async with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                        asynchronous=True,
                                        dashboard_address='127.0.0.1:0') as cluster, \
            distributed.Client(cluster, asynchronous=True, direct_to_workers=True) as client:
        print(f'cluster: a scheduler at {cluster.scheduler_address} and 2 Dask workers')
        async with DaskPool(client, WordCounter, timeout=30) as pool:
            for worker in pool.stats()['workers']:
                print(f'worker {worker["number"]} is an actor on Dask worker '
                      f'{worker["address"]} (pid {worker["pid"]})')

            loaded = await pool.broadcast(('stop-words', ('v1', ['the', 'a', 'of', 'to'])),
                                          sticky=True)
            print(f'stop words v1 loaded by workers {loaded}')

            started = time.monotonic()
            counts = await asyncio.gather(*[pool.submit(('document', text))
                                            for text in DOCUMENTS])
            total = sum(counts, collections.Counter())
            print(f'counted {len(counts)} documents in {time.monotonic() - started:.2f} s; '
                  f'most common: {total.most_common(3)}')

            try:
                await pool.submit(('document', 42))
            except TypeError as exc:
                last = str(exc.__cause__).strip().splitlines()[-1]
                print(f'a bad document raised TypeError here too: {exc}; the worker\'s '
                      f'traceback ends with "{last}"')

            # Kill the Dask worker process that hosts worker 0, with documents in flight.
            _, pid, _ = await pool.submit(('whoami', None), worker_num=0)
            in_flight = [pool.submit(('document', text), worker_num=index % 2)
                         for index, text in enumerate(DOCUMENTS)]
            await asyncio.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            lost = [o for o in outcomes if isinstance(o, looppool.WorkerLost)]
            counted = [o for o in outcomes if isinstance(o, collections.Counter)]
            print(f'killed the Dask worker of worker 0 (pid {pid}) with {len(in_flight)} '
                  f'documents in flight: {len(counted)} counted, {len(lost)} lost')
            if lost:
                print(f'  WorkerLost: {str(lost[0]).split(" while running")[0]}')

            number, new_pid, version = await pool.submit(('whoami', None), worker_num=0)
            worker = pool.stats()['workers'][0]
            print(f'worker {number} is back as pid {new_pid} on Dask worker '
                  f'{worker["address"]}, with stop words {version} (replayed); '
                  f'restarts: {pool.stats()["restarts"]}')
        print('pool stopped')
    print('cluster closed')


if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    asyncio.run(main())
