"""What workers hold and have not finished: timeouts, cancellation, blocked workers, and
work taken back.

A task sent to a worker is in that worker's in-flight table (its link's ``inflight``) until
its reply comes. On its way:

- a **timeout** fails its future with :class:`TimeoutError` and cancels it in the worker;
  so does **cancelling** the future (a task not sent yet is left out when its turn comes);
  a handler that does not give up within ``cancel_grace`` gets its worker killed;
- a worker that holds work and has said nothing since the last look (every 15 ms while any
  worker holds work) is **blocked**: a handler holds its loop. It gets no new work until it
  is heard from again, and when another worker has room and nothing waits in the pool, the
  tasks it holds and has not started are **recalled**: it sends back those it had not
  started, and they go to the others;
- when a worker dies, the tasks it reported held and never took go back to the pool (or,
  with ``worker_num``, to its replacement): they never ran. Only those it may have
  started fail with :class:`~looppool.WorkerLost`.

Lives in the parent, on the pool's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import protocol
from .link import _MIN_WINDOW, _Link
from .part import Part
from .protocol import dumps
from .supervise import RUNNING, STOPPING
from .tasks import Entry, _cancel_timer, _entry, _TaskFuture, _weight

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger('looppool')


class InFlight(Part):
    """Watches the work the workers hold. Lives in the parent, on the pool's loop; not
    thread-safe."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._lag_timer: asyncio.TimerHandle | None = None

    def _watch_lag(self) -> None:
        """Look for blocked workers in a moment (a worker was sent work)."""
        if self.supervisor._state is RUNNING or self.supervisor._state is STOPPING:
            self._lag_timer = self.pool._loop.call_later(self.transport.lag_check,
                                                         self._check_lag)

    def _check_lag(self) -> None:
        """Mark blocked the workers that hold work and have said nothing since the last
        look (a handler holds their loop): they get no new work until they are heard from,
        and, when another worker has room and nothing waits in the pool, what they hold
        and have not started is recalled for it. Runs while any worker holds work."""
        self._lag_timer = None
        busy = free = False
        stuck = []
        for slot in self._slots:
            link = slot.link
            if link is None or link.exited:
                continue
            if link.unread:
                busy = True
                if link.was_queued and link.reads == link.reads_seen and link.ready:
                    if not link.blocked:
                        link.blocked = True
                        link.window = max(_MIN_WINDOW, link.window // 2)
                    stuck.append(link)
                link.was_queued = True
            else:
                link.was_queued = False
            link.reads_seen = link.reads
            if not free and self.dispatcher._room(link) > 0:
                free = True
        if stuck and free and not self._pending and not self.dispatcher._outbox:
            for link in stuck:
                if link.recalling or link.channel is None or link.channel.closed:
                    continue
                # What it may hold that another worker could run (not worker_num's).
                wanted = [tid for tid, future in link.inflight.items()
                          if future._lp_target is None and not future.done()]
                if wanted:
                    link.recalling = True
                    link.channel.send(protocol.RECALL, len(wanted), dumps(wanted))
        if busy:
            self._watch_lag()

    def _recalled(self, link: _Link, tids: list[int]) -> None:
        """``link`` gave back these held tasks, unstarted: they go to the others."""
        link.recalling = False
        if not tids:
            return
        gone = set(tids)
        link.held = collections.deque(tid for tid in link.held if tid not in gone)
        link.unread -= len(tids)
        self._take_back(link, tids)
        # To the others: this one gets more when it next shows it can start it.
        self.dispatcher._refill_all(but=link)

    def _take_back(self, link: _Link, tids: Iterable[int]) -> None:
        """Tasks ``link`` never started go back to the front of the pool's queue (or of
        their worker's, with ``worker_num``), in the order they were sent."""
        again: list[Entry] = []
        again_targeted: list[Entry] = []
        for tid in tids:
            future = link.inflight.pop(tid, None)
            if future is None:
                continue
            link.used -= _weight(future)
            if future.done():
                continue
            (again if future._lp_target is None else again_targeted).append(_entry(future))
        self._pending.extendleft(reversed(again))
        self._slots[link.number].targeted.extendleft(reversed(again_targeted))

    def _expire(self, future: _TaskFuture, timeout: float) -> None:
        future._lp_timer = None
        if future.done():
            return
        link = self._link_of(future)
        where = (f'on worker {link.number}' if link is not None
                 else 'waiting for room in the pool')
        future.set_exception(TimeoutError(
            f'task {future._lp_tid} did not finish within {timeout} s ({where}); '
            'it was cancelled'))
        self._counts['timed_out'] += 1
        self._abandon(future)

    def _abandon(self, future: _TaskFuture) -> None:
        """The caller gave up on ``future``: stop the work in the worker, if it started."""
        _cancel_timer(future)
        if future.cancelled():
            self._counts['cancelled'] += _weight(future)
        link = self._link_of(future)
        if link is None:   # in the outbox or waiting for room: left out when its turn comes
            self.dispatcher._outbox_gave_up = True
            return
        if link.channel is None or link.channel.closed:
            return
        if future in link.batch:
            link.batch_gave_up = True   # not sent yet: the batch leaves it out
            return
        tid = future._lp_tid
        link.channel.send(protocol.CANCEL, tid)
        grace = self._options['cancel_grace']
        self.supervisor._timers.append(
            self.pool._loop.call_later(grace, self._check_cancelled, weakref.ref(link), tid,
                                       grace))

    def _link_of(self, future: _TaskFuture) -> _Link | None:
        """The worker process that holds ``future``'s task (sent, or in its batch), if any."""
        tid = future._lp_tid
        for link in self.supervisor._links():
            if link.inflight.get(tid) is future:
                return link
        return None

    def _check_cancelled(self, link_ref: weakref.ref[_Link], tid: int, grace: float) -> None:
        link = link_ref()
        if link is None or link.exited or tid not in link.inflight or tid in link.held:
            return   # (held: it never started, and is answered, not run, when its turn comes)
        link.kill_reason = (f'task {tid} was cancelled but had not ended within '
                            f'cancel_grace={grace} s: its handler, or one it waited behind, '
                            'did not give up control (CPU-bound code that does not await), '
                            'so the worker was killed')
        log.warning('worker %d (pid %d): %s', link.number, link.pid, link.kill_reason)
        self.transport.kill(link)
