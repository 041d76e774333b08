#!/usr/bin/env python3
"""What an operator sees of a running pool: statsd metrics, worker logs, titles, stats().

The program starts a tiny statsd server of its own (a UDP socket on 127.0.0.1 that keeps
every packet), runs a pool of two workers that report to it, and prints, section by
section:

1. the statsd packets of one reporting period: the pool's own metrics (``statsd=`` and
   ``statsd_interval=0.5``) and the :class:`~looppool.utility.ResourceReporter` gauges each
   worker sends (made in ``_initialise``, started in ``start``, stopped in ``join``);
2. a warning and an exception logged in the workers, as the parent's logging handler
   prints them, with the worker's number and pid that the pool adds to every record;
3. the workers' process titles, read from ``/proc/<pid>/cmdline``, as ``ps`` shows them;
4. ``pool.stats()``.

It needs nothing but looppool and exits by itself in a few seconds::

    python examples/operating.py

See "Operating a pool" in the manual for what each metric means.
"""

import asyncio
import json
import logging
import os
import sys

import psutil
from statsd import StatsClient

import looppool
from looppool.utility import ResourceReporter

# Seconds between two reports, of the pool and of every worker's reporter alike.
INTERVAL = 0.5
# The StatsClient prefix: the pool's metrics arrive as shop.looppool.*, the workers' gauges
# as shop.worker.N.*.
PREFIX = 'shop'
# How the workers find the statsd server. The environment reaches the workers under every
# start method (fork, forkserver, spawn), a module global set at run time only under fork.
PORT_VARIABLE = 'OPERATING_EXAMPLE_STATSD_PORT'

log = logging.getLogger('shop.pricing')


class PricingWorker(looppool.Worker):
    """Prices items; logs about stock and bad input; reports its own resource use."""

    def _initialise(self):
        self._statsd = StatsClient('127.0.0.1', int(os.environ[PORT_VARIABLE]), PREFIX)
        self._reporter = ResourceReporter(self._ioloop, self._statsd,
                                          f'worker.{self._number}', sleep_time=INTERVAL)

    def start(self):
        super().start()
        self._reporter.start()

    def join(self):
        self._reporter.stop()
        self._statsd.close()
        super().join()

    async def handle(self, message):
        kind, value = message
        if kind == 'price':
            await asyncio.sleep(0.01)          # stands in for a lookup
            return round(value * 1.2, 2)
        if kind == 'stock':
            log.warning('stock of %s is low', value)
            return 'warned'
        if kind == 'quantity':
            try:
                return int(value)
            except ValueError:
                # The record crosses to the parent with its traceback as text.
                log.exception('could not read the quantity %r', value)
                return None
        raise ValueError(f'unknown message kind {kind!r}')


class StatsdSink(asyncio.DatagramProtocol):
    """The stand-in statsd server: keeps every packet, in the order they arrived."""

    def __init__(self):
        self.packets = []
        self._arrived = asyncio.Event()

    def datagram_received(self, data, addr):
        self.packets.append(data.decode())
        self._arrived.set()

    async def wait_until(self, condition, timeout=10):
        """Wait until ``condition(packets)`` holds; raise TimeoutError after ``timeout``."""
        async def wait():
            while not condition(self.packets):
                self._arrived.clear()
                await self._arrived.wait()
        await asyncio.wait_for(wait(), timeout)


def source(packet):
    """Who sent ``packet``: 'pool' or 'worker N', from its first metric's name."""
    name = packet.split(':', 1)[0]
    if name.startswith(f'{PREFIX}.looppool.'):
        return 'pool'
    return 'worker ' + name.split('.')[2]


def title_of(pid):
    """A process's title as ``ps`` shows it: its command line, as setproctitle left it."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as file:
            # setproctitle pads the title with NULs (or spaces) to the old line's length.
            return file.read().replace(b'\0', b' ').decode().strip()
    except FileNotFoundError:   # no /proc (macOS): ask psutil instead
        return ' '.join(psutil.Process(pid).cmdline()).strip()


def configure_logging():
    """One handler, on the parent's root logger: worker records arrive there too."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        '%(levelname)s %(name)s (processName=%(processName)s, worker_number=%(worker_number)s'
        ', worker_pid=%(worker_pid)s): %(message)s',
        # Records made in the parent itself have no worker number or pid.
        defaults={'worker_number': '-', 'worker_pid': '-'}))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


async def show_one_reporting_period(pool, sink):
    print(f'-- statsd packets of one reporting period ({INTERVAL} s)')
    # Start right after a report of the pool, so the next one covers exactly the work below.
    await sink.wait_until(lambda packets: any(source(p) == 'pool' for p in packets))
    start = len(sink.packets)
    prices = await asyncio.gather(*(pool.submit(('price', value)) for value in (10, 20, 30)))
    assert prices == [12.0, 24.0, 36.0], prices

    def period_complete(packets):
        sources = {source(packet) for packet in packets[start:]}
        return {'pool', 'worker 0', 'worker 1'} <= sources

    await sink.wait_until(period_complete)
    for packet in sink.packets[start:]:
        print(f'from the {source(packet)}:')
        for line in packet.splitlines():
            print(f'    {line}')


async def show_forwarded_logs(pool):
    print('-- log records from the workers, printed by the parent\'s handler')
    # A record travels on the same channel as the reply and ahead of it, so the parent
    # has handled it by the time the reply arrives.
    await pool.submit(('stock', 'apples'), worker_num=0)
    await pool.submit(('quantity', 'seven'), worker_num=1)


def show_titles(pool):
    print('-- process titles')
    print(f'parent (pid {os.getpid()}): {title_of(os.getpid())}')
    for worker in pool.stats()['workers']:
        print(f'worker {worker["number"]} (pid {worker["pid"]}): {title_of(worker["pid"])}')


async def main():
    configure_logging()
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(
        StatsdSink, local_addr=('127.0.0.1', 0))
    port = transport.get_extra_info('sockname')[1]
    os.environ[PORT_VARIABLE] = str(port)
    statsd = StatsClient('127.0.0.1', port, PREFIX)
    try:
        async with looppool.Pool(pool_size=2, worker_class=PricingWorker, statsd=statsd,
                                 statsd_interval=INTERVAL) as pool:
            await show_one_reporting_period(pool, sink)
            await show_forwarded_logs(pool)
            show_titles(pool)
            print('-- pool.stats()')
            print(json.dumps(pool.stats(), indent=2))
        print('pool stopped')
    finally:
        statsd.close()
        transport.close()


if __name__ == '__main__':
    asyncio.run(main())
