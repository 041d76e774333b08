"""The pool's own metrics, sent to statsd once per reporting interval.

The pool counts in plain integers as it works (they are what :meth:`Pool.stats` returns);
this module turns them into statsd metrics every ``statsd_interval`` seconds, one pipeline
per report, so the per-message cost is a counter increment and, for durations, a reservoir
sample -- never a packet per message.

Metric names (under ``statsd_prefix``, default ``looppool``, itself under the client's own
prefix):

============================== ======= ===================================================
name                           type    meaning
============================== ======= ===================================================
``tasks.submitted``            counter messages accepted (submit, put, put_nowait,
                                       broadcast counts one per worker)
``tasks.completed``            counter replies received
``tasks.failed``               counter tasks whose handler raised
``tasks.lost``                 counter tasks failed with ``WorkerLost``
``tasks.cancelled``            counter tasks cancelled by their caller
``tasks.timed_out``            counter tasks that hit their ``timeout=``
``tasks.duration``             timer   ms from ``submit()`` to the reply (sampled: at
                                       most ``SAMPLES`` per report)
``tasks.wait``                 timer   ms a message waited in the pool for room
``tasks.in_flight``            gauge   tasks sent and not done, all workers
``tasks.waiting``              gauge   messages waiting in the pool for room
``worker.N.in_flight``         gauge   tasks sent to worker N and not done
``workers.restarts``           counter workers replaced after dying
``workers.recycles``           counter workers replaced on purpose (max_tasks_per_worker,
                                       max_memory_per_worker)
============================== ======= ===================================================

Lives in the parent process, on the pool's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

__all__ = ['PoolMetrics', 'COUNTERS', 'SAMPLES']

log = logging.getLogger('looppool')

COUNTERS = {
    'submitted': 'tasks.submitted',
    'completed': 'tasks.completed',
    'failed': 'tasks.failed',
    'lost': 'tasks.lost',
    'cancelled': 'tasks.cancelled',
    'timed_out': 'tasks.timed_out',
    'restarts': 'workers.restarts',
    'recycles': 'workers.recycles',
}
SAMPLES = 200


class _Reservoir:
    """A uniform sample of at most ``size`` values out of however many were offered."""

    __slots__ = ('size', 'seen', 'values')

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self.values: list[float] = []

    def offer(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            index = random.randrange(self.seen)
            if index < self.size:
                self.values[index] = value

    def take(self) -> list[float]:
        values, self.values, self.seen = self.values, [], 0
        return values


class PoolMetrics:
    """Reports a pool's numbers to a ``statsd.StatsClient`` every ``interval`` seconds."""

    def __init__(self, client: Any, prefix: str, interval: float,
                 loop: asyncio.AbstractEventLoop, stats: Callable[[], dict[str, Any]]) -> None:
        self.client = client
        self.prefix = prefix.rstrip('.') + '.' if prefix else ''
        self.interval = interval
        self.loop = loop
        self.stats = stats
        self.durations = _Reservoir(SAMPLES)
        self.waits = _Reservoir(SAMPLES)
        self.reported: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.timer = self.loop.call_later(self.interval, self.tick)

    def stop(self) -> None:
        """Cancel the timer and send what was counted since the last report."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.report()

    def tick(self) -> None:
        self.timer = self.loop.call_later(self.interval, self.tick)
        self.report()

    def report(self) -> None:
        try:
            stats = self.stats()
            pipe = self.client.pipeline()
            prefix = self.prefix
            for key, name in COUNTERS.items():
                delta = stats[key] - self.reported[key]
                if delta:
                    pipe.incr(prefix + name, delta)
                    self.reported[key] = stats[key]
            pipe.gauge(prefix + 'tasks.in_flight', stats['in_flight'])
            pipe.gauge(prefix + 'tasks.waiting', stats['waiting'])
            for worker in stats['workers']:
                pipe.gauge(f'{prefix}worker.{worker["number"]}.in_flight', worker['in_flight'])
            for seconds in self.durations.take():
                pipe.timing(prefix + 'tasks.duration', seconds * 1000.0)
            for seconds in self.waits.take():
                pipe.timing(prefix + 'tasks.wait', seconds * 1000.0)
            pipe.send()
        except Exception:  # a metrics failure must never disturb the pool
            log.exception('sending the pool\'s metrics to statsd failed')
