"""The supervisor: the worker processes, from start to stop, and the pool's state.

Who owns what: the :class:`Supervisor` owns the worker numbers (slots) and their
processes (links), the pool's state (new, running, stopping, stopped), the stop deadline
and its timers. Nothing polls: each process's sentinel is registered with the loop as a
reader and becomes readable the moment the process exits.

- **start**: a process per worker number, with its own socketpair (looppool.channel); it
  is ready once it has run ``_initialise()`` (READY), and replays the sticky broadcasts
  before anything else;
- **exit**: a worker that dies is replaced under the same number; what it may have started
  fails with :class:`~looppool.WorkerLost`, what it held unstarted runs elsewhere (see
  looppool.inflight); one that cannot start, or dies soon after starting, is restarted
  with back-off;
- **recycling** (``max_tasks_per_worker``, ``max_memory_per_worker``): the replacement
  starts first and takes over once ready; the old process finishes what it has and exits;
- **stop**: accepted work finishes, then each worker is told to stop; past the deadline
  they are told to give up, then killed. It cannot hang.

Lives in the parent, on the pool's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import protocol
from .errors import PoolClosed, WorkerLost, WorkerStartError
from .link import _Link, _Slot
from .part import Part
from .tasks import _cancel_timer, _StopFuture, _TaskFuture, _tid_of, _weight

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger('looppool')

NEW, RUNNING, STOPPING, STOPPED = 'new', 'running', 'stopping', 'stopped'

# A worker that dies within this many seconds of starting, twice running, backs off.
_QUICK_DEATH = 1.0


class Supervisor(Part):
    """Starts, watches, replaces and stops the worker processes of one pool.

    Lives in the parent, on the pool's loop; not thread-safe.
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._state = NEW
        self._ready: asyncio.Future[None] | None = None
        self._stop_future: _StopFuture | None = None
        self._stop_deadline = 0.0
        self._kill_at: float | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._memory_timer: asyncio.TimerHandle | None = None
        self._sticky: dict[Any, bytes] = {}   # replayed to replacements, in this order
        self._sticky_ids = itertools.count()

    def reset(self) -> None:
        """A stopped pool starts again: new worker slots, no stop under way (the sticky
        broadcasts stay, and are replayed to the new workers)."""
        self._stop_future = None
        self._kill_at = None
        self._timers.clear()
        self._memory_timer = None
        self._slots[:] = [_Slot(number) for number in range(self.pool_size)]
        self._state = NEW

    def _remember_sticky(self, sticky: bool | str, payload: bytes) -> None:
        if sticky is True:
            key: Any = next(self._sticky_ids)
        elif isinstance(sticky, str):
            key = sticky
            self._sticky.pop(key, None)   # the refreshed message replays last, in order
        else:
            raise TypeError(f'sticky must be a bool or a str name, got {sticky!r}')
        self._sticky[key] = payload

    def stop(self, timeout: float | None) -> asyncio.Future[None]:
        """:meth:`Pool.stop`."""
        if self._stop_future is not None:
            return self._stop_future
        if timeout is None:
            timeout = self._options['stop_timeout']
        elif not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        if self._state == NEW:
            self._state = STOPPED
            loop = _current_loop_or_none()
            future = _StopFuture(loop=loop) if loop is not None else _StopFuture()
            future._lp_awaited = False
            future.set_result(None)
            self._stop_future = future
            return future
        self.lifecycle.resume_for_stop()   # paused: what waits is accepted, so it runs
        self.dispatcher._flush_outbox()   # accepted: they are sent before the stop
        self.dispatcher._plain = False
        loop = self.pool._loop
        future = self._stop_future = _StopFuture(loop=loop)
        future._lp_awaited = False
        self._state = STOPPING
        self.lifecycle.note()
        self.dispatcher._wake_room()
        self._stop_deadline = loop.time() + timeout
        self._timers.append(loop.call_later(timeout, self._escalate))
        for slot in self._slots:
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
            if slot.successor is not None:   # a recycle under way: the old worker stays
                successor, slot.successor = slot.successor, None
                self._retire(successor)
            self._stop_when_drained(slot)
        self._check_stopped()

        running = _current_loop_or_none()
        if running is loop:
            loop.call_soon(self._block_unless_awaited)
        elif running is None and not loop.is_running():
            if loop.is_closed():
                self._run_blocking_until_stopped()
            else:
                loop.run_until_complete(future)
        else:
            raise RuntimeError('stop() must be called from the thread that runs the pool\'s '
                               'loop; from another thread use IOLoop.add_callback(pool.stop)')
        return future

    def _spawn(self, slot: _Slot, successor: bool = False) -> None:
        link = _Link(slot.number)
        link.paused = self.lifecycle.phase in ('pausing', 'paused')   # work waits for it
        self.transport.start(link)
        assert link.channel is not None
        # A replacement first replays the sticky broadcasts, then takes its share of work.
        for payload in self._sticky.values():
            link.used += 1
            link.unread += 1
            link.channel.send(protocol.REPLAY, 0, payload)
        if successor:
            slot.successor = link   # the current worker serves until this one is ready
            return
        slot.link = link
        self.dispatcher._refill(slot)

    def _recycle(self, link: _Link, reason: str, force: bool = False) -> None:
        """Replace a healthy worker without a dip in capacity: the replacement starts
        while the old process goes on taking work; once the replacement is ready it takes
        over, and the old process finishes what it was sent and exits. (``force``: now,
        even within the back-off after a replacement that could not start.)"""
        slot = self._slots[link.number]
        if link.retiring or slot.link is not link or slot.successor is not None \
                or self._state is not RUNNING \
                or (self.pool._loop.time() < slot.next_recycle and not force):
            return
        log.info('%s is being recycled (planned, not a crash): %s; its '
                 'replacement starts now and takes over once ready', self.transport.name(link),
                 reason)
        slot.recycles += 1
        self._counts['recycles'] += 1
        self._spawn(slot, successor=True)

    def _take_over(self, slot: _Slot, link: _Link) -> None:
        """A recycle's replacement takes the slot (it is ready, or the worker it was to
        replace died); the old process, if alive, retires."""
        old = slot.link
        slot.successor = None
        slot.successor_failures = 0
        slot.link = link
        if old is not None and not old.exited:
            self._retire(old)
        self.dispatcher._refill(slot)
        self.lifecycle.changed()

    def _retire(self, link: _Link) -> None:
        """``link`` takes no new work: it finishes what it was sent, then exits."""
        slot = self._slots[link.number]
        link.retiring = True
        slot.retiring.append(link)
        self._send_stop(link)
        # Its last tasks get the stop deadline: then they are cancelled, then killed.
        self._timers.append(self.pool._loop.call_later(
            self._options['stop_timeout'], self._retire_overdue, weakref.ref(link)))

    def _retire_overdue(self, link_ref: weakref.ref[_Link]) -> None:
        link = link_ref()
        if link is None or link.exited or link.channel is None or link.channel.closed:
            return
        link.kill_reason = 'it was being recycled and its tasks outlived stop_timeout'
        link.terminated = True
        link.channel.send(protocol.TERMINATE, 0)
        self._timers.append(self.pool._loop.call_later(self._options['kill_grace'],
                                                       self._kill, weakref.ref(link)))

    def _check_memory(self) -> None:
        self._memory_timer = None
        if self._state is not RUNNING:
            return
        limit = self._options['max_memory_per_worker']
        for slot in self._slots:
            link = slot.link
            if link is None or not link.ready:
                continue
            rss = self.transport.rss(link)
            if rss is None:
                continue
            if not link.baseline_rss:
                link.baseline_rss = rss
                if rss > limit:
                    log.warning('max_memory_per_worker (%.1f MiB) is below the RSS of a fresh '
                                'worker %d (%.1f MiB; under fork it counts pages shared with '
                                'the parent); memory recycling is off for it', limit / 2 ** 20,
                                slot.number, rss / 2 ** 20)
                continue
            if rss > limit and link.baseline_rss <= limit:
                self._recycle(link, f'its resident memory ({rss / 2 ** 20:.1f} MiB) exceeded '
                                    f'max_memory_per_worker ({limit / 2 ** 20:.1f} MiB)')
        self._memory_timer = self.pool._loop.call_later(self._options['memory_check_interval'],
                                                   self._check_memory)

    def _links(self) -> list[_Link]:
        """Every live worker process: the current one of each slot, a recycle's replacement
        that is starting, and those retiring."""
        links = []
        for slot in self._slots:
            if slot.link is not None:
                links.append(slot.link)
            if slot.successor is not None:
                links.append(slot.successor)
            links.extend(slot.retiring)
        return links

    def _on_ready(self, link: _Link) -> None:
        link.ready = True
        slot = self._slots[link.number]
        slot.failures = 0
        slot.start_error = None
        if slot.successor is link:
            self._take_over(slot, link)
        self.lifecycle.on_ready(link)
        if self._ready is not None and not self._ready.done() and all(
                s.link is not None and s.link.ready for s in self._slots):
            self._ready.set_result(None)
            self.lifecycle.note()

    def _on_exit(self, link: _Link) -> None:
        """The transport reports that ``link``'s worker has ended."""
        if link.exited:
            return
        link.exited = True
        exitcode = self.transport.reap(link)
        slot = self._slots[link.number]
        if slot.link is link:
            slot.link = None
            if slot.successor is not None and self._state is RUNNING:
                # Died while its recycle's replacement starts: that one takes over now.
                self._take_over(slot, slot.successor)
        elif link in slot.retiring:
            slot.retiring.remove(link)
        # What it reported held and never took did not start, nor did what never left
        # this process: it runs elsewhere.
        unstarted = [*link.held, *map(_tid_of, link.batch)]
        given_back = bool(unstarted)
        if given_back:
            link.held, link.batch = collections.deque(), []
            self.inflight._take_back(link, unstarted)
        lost = list(link.inflight.values())
        link.inflight.clear()
        link.used = 0

        if slot.successor is link:
            # A recycle's replacement that could not start: the worker it was to replace
            # goes on serving, and the recycle is tried again after a back-off.
            slot.successor = None
            slot.successor_failures += 1
            delay = _back_off(slot.successor_failures)
            slot.next_recycle = self.pool._loop.time() + delay
            how = self.transport.how_it_ended(link, exitcode)
            text = f'\n{link.start_error[1]}' if link.start_error else ''
            log.error('worker %d: the replacement started to recycle it (pid %d) %s; the '
                      'worker goes on serving, and is not recycled again for %.1f s%s',
                      slot.number, link.pid, how, delay, text)
            self.lifecycle.changed(RuntimeError(f'the replacement {how}{text}'))
        elif not link.ready:
            self._start_failed(slot, link, exitcode, lost)
        elif not (link.stop_sent and exitcode == 0):
            self._lost(slot, link, exitcode, lost)
        if self._state is STOPPING:
            if slot.link is None:
                for item in slot.targeted:
                    self.dispatcher._fail_item(item, PoolClosed(
                        f'the pool stopped before worker {slot.number} could take this task'))
                slot.targeted.clear()
            self._check_stopped()
        if given_back and self._state is not STOPPED:
            self.dispatcher._refill_all()
        if self.dispatcher._room_waiters:
            # A replacement has room; or map() must see the pool stop.
            self.dispatcher._wake_room()
        self.lifecycle.changed()
        self.lifecycle.check()

    def _lost(self, slot: _Slot, link: _Link, exitcode: int | None,
              lost: list[_TaskFuture]) -> None:
        """A ready worker died unasked: what it may have started fails with WorkerLost,
        and it is replaced (with back-off if it keeps dying soon after starting)."""
        how = self.transport.how_it_ended(link, exitcode)
        reason = link.kill_reason or self.transport.likely_cause(link, exitcode)
        error = WorkerLost(
            f'{self.transport.name(link)} {how} while '
            f'running this task; {reason}'
            + ('; it was replaced' if self._state is RUNNING else ''),
            link.number, link.pid, exitcode)
        if lost or self._state is RUNNING:
            log.error('%s %s with %d task(s) in flight; %s', self.transport.name(link), how,
                      sum(map(_weight, lost)), reason)
        self._fail(lost, error, 'lost')
        if self._state is not RUNNING:
            return
        if slot.link is not None or link.retiring:
            # A recycle was under way: its replacement serves already, or takes over now. It
            # was still a crash, and counts as one.
            slot.restarts += 1
            self._counts['restarts'] += 1
            return
        # A worker that dies soon after it started (a sticky broadcast that crashes it,
        # say) is restarted with back-off, like one that cannot start at all.
        if self.pool._loop.time() - link.started_at < _QUICK_DEATH:
            slot.quick_deaths += 1
        else:
            slot.quick_deaths = 0
        if slot.quick_deaths >= 2:
            delay = _back_off(slot.quick_deaths - 1)
            log.warning('worker %d died %d times in a row soon after starting; restarting '
                        'it in %.1f s', slot.number, slot.quick_deaths, delay)
            slot.restart_timer = self.pool._loop.call_later(delay, self._restart, slot)
        else:
            slot.restarts += 1
            self._counts['restarts'] += 1
            self._spawn(slot)

    def _start_failed(self, slot: _Slot, link: _Link, exitcode: int | None,
                      lost: list[_TaskFuture]) -> None:
        step, traceback_text = link.start_error or ('', '')
        how = self.transport.how_it_ended(link, exitcode)
        if step:
            what = f'could not start: {step}' + (f'\n{traceback_text}' if traceback_text
                                                 else '')
        elif exitcode is not None and exitcode < 0:
            # Killed from outside while it started (in _initialise, or before): not a
            # problem with the program's main module.
            what = f'{how} before it was ready; {self.transport.likely_cause(link, exitcode)}'
        else:
            what = (f'{how} before it was ready, before _initialise ran '
                    '(likely causes: under spawn or forkserver the main module must be '
                    'importable and its start-up code guarded by if __name__ == '
                    '"__main__"; see the worker\'s stderr)')
        error = WorkerStartError(f'{self.transport.name(link)} {what}', slot.number,
                                 link.pid, exitcode, traceback_text)
        log.error('%s', error)
        self._fail(lost, error, 'lost')
        slot.failures += 1
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: __aenter__ may not be waiting for it
        if self._state is not RUNNING:
            return
        if slot.failures >= 2:
            # It keeps failing: callers get the start-up error instead of waiting for it.
            slot.start_error = error
            for item in slot.targeted:
                self.dispatcher._fail_item(item, error)
            slot.targeted.clear()
            if all(s.start_error is not None for s in self._slots):
                for item in self._pending:
                    self.dispatcher._fail_item(item, error)
                self._pending.clear()
        delay = _back_off(slot.failures)
        slot.restart_timer = self.pool._loop.call_later(delay, self._restart, slot)

    def _restart(self, slot: _Slot) -> None:
        slot.restart_timer = None
        if self._state is RUNNING and slot.link is None:
            slot.restarts += 1
            self._counts['restarts'] += 1
            self._spawn(slot)

    def _fail(self, futures: Iterable[_TaskFuture], error: BaseException, counter: str) -> None:
        for future in futures:
            if not future.done():
                _cancel_timer(future)
                future.set_exception(error)
                self._counts[counter] += _weight(future)

    def _stop_when_drained(self, slot: _Slot) -> None:
        link = slot.link
        if link is None or link.stop_sent or slot.targeted or self._pending:
            return
        self._send_stop(link)

    def _send_stop(self, link: _Link) -> None:
        """Tell ``link`` to finish what it was sent and exit (the batch goes first)."""
        link.stop_sent = True
        assert link.channel is not None
        if link.batch:
            self.dispatcher._send_batch(link)   # the tasks before the stop
        link.channel.send(protocol.STOP, 0)

    def _check_stopped(self) -> None:
        if self._state is not STOPPING:
            return
        if self._links() or self.receiver._result_tasks:
            return
        self._finish_stop()

    def _finish_stop(self) -> None:
        self._state = STOPPED
        self.dispatcher._wake_room()
        if self._memory_timer is not None:
            self._memory_timer.cancel()
        if self.pool._metrics is not None:
            self.pool._metrics.stop()
        for item in self._pending:
            self.dispatcher._fail_item(
                item, PoolClosed('the pool stopped before this task was sent'))
        self._pending.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self.inflight._lag_timer is not None:
            self.inflight._lag_timer.cancel()
            self.inflight._lag_timer = None
        self.transport.finish()
        self.lifecycle.finish()
        self.lifecycle.note()
        future = self._stop_future
        if future is not None and not future.done():
            future.set_result(None)

    def _escalate(self) -> None:
        """The stop deadline passed: tell the workers to give up, then kill them."""
        if self._state is not STOPPING or self._kill_at is not None:
            return
        never_sent = 'the pool stopped (its stop timeout passed) before this task was sent'
        for item in self._pending:
            self.dispatcher._fail_item(item, PoolClosed(never_sent))
        self._pending.clear()
        for slot in self._slots:
            for item in slot.targeted:
                self.dispatcher._fail_item(item, PoolClosed(never_sent))
            slot.targeted.clear()
        for link in self._links():
            if link.channel is not None and not link.channel.closed:
                link.kill_reason = 'the pool\'s stop timeout passed'
                link.terminated = True
                link.channel.send(protocol.TERMINATE, 0)
        grace = self._options['kill_grace']
        self._kill_at = self.pool._loop.time() + grace
        self._timers.append(self.pool._loop.call_later(grace, self._kill_all))

    def _kill_all(self) -> None:
        for link in self._links():
            self.transport.kill(link)

    def _kill(self, link_ref: weakref.ref[_Link]) -> None:
        link = link_ref()
        if link is not None and not link.exited:
            self.transport.kill(link)

    def _block_unless_awaited(self) -> None:
        future = self._stop_future
        if future is None or future.done() or future._lp_awaited \
                or not self.transport.blocking:
            return
        self._run_blocking_until_stopped()

    def _run_blocking_until_stopped(self) -> None:
        """Drive the workers directly while the loop cannot run."""
        self.transport.drive_until_stopped()


def _current_loop_or_none() -> asyncio.AbstractEventLoop | None:
    return asyncio._get_running_loop()


def _back_off(attempt: int) -> float:
    """Seconds before the next start after ``attempt`` failed ones: 0.1, 0.2, 0.4 ... 10."""
    return min(0.1 * 2.0 ** (attempt - 1), 10.0)
