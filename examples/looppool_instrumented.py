#!/usr/bin/env python3
"""Looppool 0.3's "Instrumentated worker", without its Sentry lines, and a main to run it.

Each worker names its process with ``setproctitle`` and runs a
:class:`looppool.utility.ResourceReporter`, which sends its CPU, memory and IO loop gauges
(``worker.instrumentated.process.N.cpu``, ``.rss``, ...) to a statsd server.

Run it as it is (``pip install statsd setproctitle``): it sends a few messages through a
pool of two such workers, prints the results and the workers' process titles, lets the
reporters report for a couple of intervals, stops the pool and exits. Point it at your
statsd server with ``STATSD_HOST`` and ``STATSD_PORT`` (default ``localhost:8125``); the
gauges are sent every ``LOOPPOOL_REPORT_INTERVAL`` seconds (default 10).
"""

import asyncio
import os

import psutil

import looppool
from looppool.utility import ResourceReporter
from statsd import StatsClient
from setproctitle import setproctitle

STATSD_HOST = os.environ.get('STATSD_HOST', 'localhost')
STATSD_PORT = int(os.environ.get('STATSD_PORT', '8125'))
REPORT_INTERVAL = float(os.environ.get('LOOPPOOL_REPORT_INTERVAL', '10'))


class InstrumentatedWorker(looppool.Worker):

    _resource_reporter = None
    '''CPU, RSS and IO loop stats reporter'''


    def _initialise(self):
        setproctitle('python looppool-example instrumentated pool worker')

        statsd = StatsClient(STATSD_HOST, STATSD_PORT, 'looppool_example')
        self._resource_reporter = ResourceReporter(self._ioloop, statsd,
            'worker.instrumentated.process.{}'.format(self._number),
            sleep_time=REPORT_INTERVAL)

    @looppool.task_done
    def _process_message(self, message):
        self._put_nowait((message, self._number))

    def start(self):
        super().start()

        self._resource_reporter.start()

    def join(self):
        self._resource_reporter.stop()

        super().join()


async def main():
    messages = ['alpha', 'beta', 'gamma', 'delta']
    received = []
    all_received = asyncio.Event()

    @looppool.task_done
    def process_message(result, result_done):
        message, number = result
        print(f'{message!r} was processed by worker {number}')
        received.append(result)
        if len(received) == len(messages):
            all_received.set()

    pool = looppool.Pool(pool_size=2, worker_class=InstrumentatedWorker)
    pool.process_message = process_message
    pool.start()
    try:
        for message in messages:
            pool.put_nowait(message)
        await asyncio.wait_for(all_received.wait(), 30)

        # Every worker has initialised by now: show the titles setproctitle gave them.
        for worker in pool.stats()['workers']:
            # setproctitle pads the title with spaces to the length of the old command line.
            title = ' '.join(psutil.Process(worker['pid']).cmdline()).strip()
            print(f'worker {worker["number"]} (pid {worker["pid"]}) is titled {title!r}')

        run_for = 2 * REPORT_INTERVAL + 0.5
        print(f'the workers report to statsd at {STATSD_HOST}:{STATSD_PORT} every '
              f'{REPORT_INTERVAL:g} s; letting them run for {run_for:g} s')
        await asyncio.sleep(run_for)
    finally:
        await pool.stop()
    print('pool stopped')


if __name__ == '__main__':
    asyncio.run(main())
