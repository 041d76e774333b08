#!/usr/bin/env python3
"""Stateful workers: a lookup table kept warm in every worker, refreshed by broadcast.

Each worker holds a table of exchange rates in memory and converts amounts with it. The
parent builds the table (in an application, from a database the workers then need no
connection to) and hands it to every worker with ``await pool.broadcast(...)``, which
resolves once every worker has replied, that is once every worker holds the new table. A
query submitted after that is answered from the new table, whichever worker takes it.

The broadcasts are sticky: the pool replays them, in order, to a worker that replaces a
dead one, so the replacement answers from the current table as well.

Run it as it is: it loads a table, queries it, refreshes it, queries again, lets one
worker die, queries once more, prints what each worker answered and exits.
"""

import asyncio
import logging
import os
import typing

import looppool

POOL_SIZE = 3
CURRENCIES = ('USD', 'GBP', 'JPY', 'CHF')


class Load(typing.NamedTuple):
    """Replace the worker's table with ``rates`` (currency -> units per euro)."""
    version: int
    rates: dict


class Convert(typing.NamedTuple):
    """Convert ``amount`` euros to ``currency`` with the worker's table."""
    amount: float
    currency: str


class Crash(typing.NamedTuple):
    """Make the worker die, as the out-of-memory killer or a segfault would."""


class RatesWorker(looppool.Worker):
    """One per worker process: the table lives here, in this process's memory."""

    def _initialise(self):
        self._version = None
        self._rates = {}

    def handle(self, message):
        if isinstance(message, Load):
            self._version, self._rates = message.version, message.rates
            return self._number, os.getpid(), self._version, len(self._rates)
        if isinstance(message, Convert):
            value = round(message.amount * self._rates[message.currency], 2)
            return self._number, os.getpid(), self._version, value
        if isinstance(message, Crash):
            os._exit(1)
        raise TypeError(f'unexpected message: {message!r}')


def build_table(version):
    """Stand-in for an expensive query: the rates as of ``version``."""
    base = {'USD': 1.08, 'GBP': 0.85, 'JPY': 162.0, 'CHF': 0.97}
    return {currency: round(rate * (1 + 0.01 * (version - 1)), 4)
            for currency, rate in base.items()}


async def refresh(pool, version):
    replies = await pool.broadcast(Load(version, build_table(version)), sticky=True)
    for number, pid, loaded, size in replies:
        print(f'worker {number} (pid {pid}) loaded table v{loaded} ({size} rates)')


async def query(pool, version):
    """Convert 100 EUR to each currency, twice per worker, and check the answers."""
    table = build_table(version)
    messages = [Convert(100, CURRENCIES[i % len(CURRENCIES)]) for i in range(2 * POOL_SIZE)]
    replies = await asyncio.gather(*[pool.submit(message) for message in messages])
    for message, (number, pid, used, value) in zip(messages, replies):
        print(f'100 EUR = {value} {message.currency}: worker {number} (pid {pid}), '
              f'table v{used}')
        if used != version or value != round(100 * table[message.currency], 2):
            raise RuntimeError(f'worker {number} answered from table v{used}, not v{version}')
    workers = sorted({number for number, _, _, _ in replies})
    print(f'{len(replies)} queries answered by workers {workers}, all from table v{version}')
    return workers


async def main():
    async with looppool.Pool(pool_size=POOL_SIZE, worker_class=RatesWorker) as pool:
        print('-- load table v1')
        await refresh(pool, 1)
        await query(pool, 1)

        print('-- refresh: table v2')
        await refresh(pool, 2)
        await query(pool, 2)

        print('-- worker 1 dies')
        old_pid = pool.stats()['workers'][1]['pid']
        try:
            await pool.submit(Crash(), worker_num=1)
        except looppool.WorkerLost as exc:
            print(f'the task was lost: {exc}')
        new_pid = pool.stats()['workers'][1]['pid']
        print(f'worker 1 was pid {old_pid}, its replacement is pid {new_pid}; '
              'the pool replays the table broadcasts to it first')
        await query(pool, 2)
    print('pool stopped')


if __name__ == '__main__':
    logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')
    asyncio.run(main())
