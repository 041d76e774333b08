"""What Looppool 0.3 and 0.4 code reads and assigns on Pool, Worker and ResourceReporter.

The list comes from Looppool 0.3's README (its documented API and examples) and 0.4's own
test suite, which is the code that used the package most:

- ``Pool``: made as ``Pool(loop, pool_size=, worker_class=, max_tasks=, max_results=)``;
  ``pool_size`` read; ``process_message`` assigned on the pool, or overridden in a subclass
  (0.4 declares it a static coroutine); ``start()``, ``put_nowait(message, worker_num=)``,
  ``stop()``.
- ``Worker``: ``_number`` and ``_ioloop`` read from ``_initialise()`` on; ``_initialise``,
  ``_process_message`` (plain or coroutine), ``start``/``join`` extended with ``super()``;
  ``_put_nowait``, ``_task_done``, ``@task_done``; the subclass's own class attributes
  (``state = 0``) and methods (``get``, ``set``) next to the base class's.
- ``ResourceReporter``: made as ``ResourceReporter(ioloop, statsd, prefix=)``;
  ``sleep_time`` assigned after it is made (0.4's test sets 0.1) or in a subclass;
  ``start()``, ``stop()``; a subclass reads ``_ioloop``, ``_statsd`` and ``_prefix``.
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any

import pytest
from tornado import gen, ioloop

import looppool
from conftest import wait_until
from looppool.utility import ResourceReporter

pytestmark = pytest.mark.timeout(60)


class _Pipeline:
    def __init__(self, sent: list[dict[str, float]]) -> None:
        self._sent = sent
        self._gauges: dict[str, float] = {}

    def gauge(self, stat: str, value: float) -> None:
        self._gauges[stat] = value

    def send(self) -> None:
        self._sent.append(self._gauges)


class FakeStatsd:
    """Keeps what each pipeline sent, in order (0.4's test used a MagicMock here)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, float]] = []

    def pipeline(self) -> _Pipeline:
        return _Pipeline(self.sent)


def test_sleep_time_is_assigned_after_the_reporter_is_made() -> None:
    # Looppool 0.4's own test of the reporter, step by step.
    statsd = FakeStatsd()

    async def main() -> None:
        testee = ResourceReporter(ioloop.IOLoop.current(), statsd, prefix='pool.worker.1')
        assert testee.sleep_time == 10
        testee.sleep_time = 0.05
        assert testee.sleep_time == 0.05
        testee.start()
        try:
            await wait_until(lambda: len(statsd.sent) >= 2, what='two reports')
        finally:
            testee.stop()

    asyncio.run(main())
    for gauges in statsd.sent:
        assert 'pool.worker.1.rss' in gauges and 'pool.worker.1.ioloop.timeout' in gauges


@pytest.mark.parametrize('value, error, message', [
    (0, ValueError, 'sleep_time must be a finite number of seconds greater than 0, got 0'),
    (-1.0, ValueError, 'sleep_time must be a finite'),
    (math.nan, ValueError, 'sleep_time must be a finite'),
    ('0.1', TypeError, "sleep_time must be a number of seconds, got '0.1'"),
    (None, TypeError, 'sleep_time must be a number of seconds, got None'),
    (True, TypeError, 'sleep_time must be a number of seconds'),
])
def test_an_assigned_sleep_time_is_checked(value: Any, error: type[Exception],
                                           message: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        reporter = ResourceReporter(loop, FakeStatsd(), sleep_time=2)
        with pytest.raises(error, match=message):
            reporter.sleep_time = value
        assert reporter.sleep_time == 2.0   # unchanged
    finally:
        loop.close()


class Frequent(ResourceReporter):
    sleep_time = 0.02


class Broken(ResourceReporter):
    sleep_time = 0


def test_a_subclass_sets_sleep_time_and_reads_the_0_4_attributes() -> None:
    statsd = FakeStatsd()

    async def main() -> None:
        loop = ioloop.IOLoop.current()
        reporter = Frequent(loop, statsd, 'sub')
        assert reporter.sleep_time == 0.02
        # What a 0.4 subclass of the reporter reads.
        assert reporter._ioloop is loop
        assert reporter._statsd is statsd
        assert reporter._prefix == 'sub'
        reporter.sleep_time = 0.03   # an instance may still set its own
        assert reporter.sleep_time == 0.03
        assert Frequent(loop, statsd, 'other', sleep_time=5).sleep_time == 5
        with pytest.raises(ValueError, match='sleep_time must be a finite number'):
            Broken(loop, statsd)
        reporter.start()
        try:
            await wait_until(lambda: len(statsd.sent) >= 2, what='two reports')
        finally:
            reporter.stop()

    asyncio.run(main())


# -- Pool and Worker, as 0.4's test suite uses them -------------------------------------------

class StatefulWorker(looppool.Worker):
    """0.4's StatefulWorker, with the README's _initialise/start/join on top."""

    state = 0

    def _initialise(self) -> None:
        self.seen_in_initialise = (self._number, self._ioloop)

    def start(self) -> None:
        super().start()
        self.started = True

    def join(self) -> None:
        super().join()

    def get(self) -> int:
        return self.state

    def set(self, state: int) -> None:
        self.state = state

    @looppool.task_done
    @gen.coroutine
    def _process_message(self, task: Any) -> Any:
        cmd, *args = task
        number, loop = self.seen_in_initialise
        as_set = (number == self._number and loop is self._ioloop is ioloop.IOLoop.current()
                  and self.started)
        self._put_nowait((cmd, getattr(self, cmd)(*args), self._number, as_set))


class CountingWorker(looppool.Worker):
    def _process_message(self, task: Any) -> None:
        try:
            self._put_nowait(self._number)
        finally:
            self._task_done()


class StaticPool(looppool.Pool):
    """A pool whose process_message is overridden as 0.4 declared it: a static coroutine."""

    results: list[Any] = []

    @staticmethod
    @gen.coroutine
    def process_message(result: Any, result_done: Any) -> Any:
        try:
            yield gen.sleep(0)
            StaticPool.results.append(result)
        finally:
            result_done()


def test_looppool_04_pool_and_worker_attributes() -> None:
    results: list[Any] = []

    @looppool.task_done
    def process_message(result: Any, result_done: Any) -> None:
        results.append(result)

    async def main() -> None:
        loop = ioloop.IOLoop.current()
        pool = looppool.Pool(loop, pool_size=2, worker_class=StatefulWorker, max_tasks=8,
                             max_results=8)
        pool.process_message = process_message
        assert pool.pool_size == 2
        pool.start()
        try:
            # 0.4's test_direct_task: worker i gets state pool_size - i - 1.
            for i in range(pool.pool_size):
                pool.put_nowait(('set', i), worker_num=pool.pool_size - i - 1)
            for _ in range(pool.pool_size):
                pool.put_nowait(('get',))
            await wait_until(lambda: len(results) == 4, what='four results')
        finally:
            await pool.stop()

        StaticPool.results = []
        pool = StaticPool(loop, 2, CountingWorker)
        pool.start()
        try:
            for _ in range(4):
                pool.put_nowait('count')
            await wait_until(lambda: len(StaticPool.results) == 4, what='four results')
        finally:
            await pool.stop()

    asyncio.run(main())
    gets = [result for result in results if result[0] == 'get']
    assert sorted(gets, key=lambda r: r[2]) == [('get', 1, 0, True), ('get', 0, 1, True)]
    assert all(result[3] for result in results)
    assert collections.Counter(StaticPool.results) == {0: 2, 1: 2}
