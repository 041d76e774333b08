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
import atexit
import collections
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.process
import multiprocessing.util  # noqa: F401 - imported first so its exit hook runs after ours
import os
import selectors
import signal
import sys
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import protocol
from .channel import Channel, socketpair
from .child import worker_main
from .errors import PoolClosed, WorkerLost, WorkerStartError
from .link import _Link, _Slot, _kill
from .part import Part
from .tasks import _cancel_timer, _StopFuture, _TaskFuture, _tid_of, _weight

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger('looppool')

NEW, RUNNING, STOPPING, STOPPED = 'new', 'running', 'stopping', 'stopped'

# A worker that dies within this many seconds of starting, twice running, backs off.
_QUICK_DEATH = 1.0

# Parent-side channel descriptors of every live worker of every pool in this process. A
# forked worker closes them all: a copy held by a sibling would hide its parent's death.
_parent_fds: set[int] = set()
# Pools with running workers, held until stopped so that interpreter exit can end them.
_live_pools: set[Pool] = set()
# A process forked from this one (a web server's worker) does not own our pools: at its exit
# it must not end them. (_parent_fds stays: its copies are still worth closing in workers.)
os.register_at_fork(after_in_child=_live_pools.clear)


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
        self.dispatcher._flush_outbox()   # accepted: they are sent before the stop
        self.dispatcher._plain = False
        loop = self.pool._loop
        future = self._stop_future = _StopFuture(loop=loop)
        future._lp_awaited = False
        self._state = STOPPING
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
        ctx = self.pool._mp_context
        parent_sock, child_sock = socketpair()
        start_method = ctx.get_start_method()
        close_fds = tuple(_parent_fds | {parent_sock.fileno()}) if start_method == 'fork' \
            else ()
        config = protocol.WorkerConfig(
            number=slot.number,
            pool_size=self.pool_size,
            result_credit=self.pool._result_share,
            start_method=start_method,
            title=self._title(slot.number),
            close_fds=close_fds,
            log_level=logging.getLogger().getEffectiveLevel(),
            forward_logs=bool(self._options['forward_logs']),
            batch_replies=self.pool._batch_replies,
            cancel_grace=self._options['cancel_grace'],
            worker_arguments=self.pool._worker_arguments,
        )
        link = _Link(slot.number)
        process = ctx.Process(target=worker_main,  # type: ignore[attr-defined]
                              args=(self.pool._worker_class, child_sock, config, os.getpid()),
                              name=f'looppool-worker-{slot.number}')
        try:
            process.start()
        finally:
            child_sock.close()
        _disown(process)
        link.process = process
        link.pid = process.pid or 0
        link.sentinel = process.sentinel
        link.started_at = self.pool._loop.time()
        link.channel = Channel(parent_sock, self.pool._loop,
                               functools.partial(self.receiver._on_frames, link),
                               functools.partial(self._on_channel_closed, link),
                               before_flush=functools.partial(self.dispatcher._before_flush,
                                                              link))
        _parent_fds.add(link.channel.fileno())
        self.pool._loop.add_reader(link.sentinel, self._on_exit, link)
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

    def _recycle(self, link: _Link, reason: str) -> None:
        """Replace a healthy worker without a dip in capacity: the replacement starts
        while the old process goes on taking work; once the replacement is ready it takes
        over, and the old process finishes what it was sent and exits."""
        slot = self._slots[link.number]
        if link.retiring or slot.link is not link or slot.successor is not None \
                or self._state is not RUNNING or self.pool._loop.time() < slot.next_recycle:
            return
        log.info('worker %d (pid %d) is being recycled (planned, not a crash): %s; its '
                 'replacement starts now and takes over once ready', link.number, link.pid,
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
        self._timers.append(self.pool._loop.call_later(self._options['kill_grace'], _kill,
                                                       link))

    def _check_memory(self) -> None:
        self._memory_timer = None
        if self._state is not RUNNING:
            return
        import psutil
        limit = self._options['max_memory_per_worker']
        for slot in self._slots:
            link = slot.link
            if link is None or not link.ready:
                continue
            try:
                rss = psutil.Process(link.pid).memory_info().rss
            except psutil.Error:
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

    def _title(self, number: int) -> str | None:
        title = self._options['title']
        if not title:
            return None
        if isinstance(title, str):
            return f'{title} {number}'
        try:
            import setproctitle
            parent = setproctitle.getproctitle()
        except Exception:  # pragma: no cover
            parent = ' '.join(sys.argv)
        return f'looppool worker {number} | {parent}'

    def _on_ready(self, link: _Link) -> None:
        link.ready = True
        slot = self._slots[link.number]
        slot.failures = 0
        slot.start_error = None
        if slot.successor is link:
            self._take_over(slot, link)
        if self._ready is not None and not self._ready.done() and all(
                s.link is not None and s.link.ready for s in self._slots):
            self._ready.set_result(None)

    def _on_channel_closed(self, link: _Link) -> None:
        # End of file: the process is exiting; its sentinel reports the exit itself.
        pass

    def _on_exit(self, link: _Link) -> None:
        loop = self.pool._loop
        if not loop.is_closed():
            loop.remove_reader(link.sentinel)
        if link.exited:
            return
        link.exited = True
        assert link.process is not None and link.channel is not None
        link.process.join(5)
        exitcode = link.process.exitcode
        if exitcode is not None:
            # Its sentinel and the other end of that pipe are closed now, not when the
            # process object is collected: until then they would stay open here, and be
            # inherited by every worker forked meanwhile.
            link.process.close()
        if not link.channel.closed:
            link.channel.drain()   # replies the worker sent before it exited
            link.channel.close()
        _parent_fds.discard(link.channel.fileno())
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
            log.error('worker %d: the replacement started to recycle it (pid %d) %s; the '
                      'worker goes on serving, and the recycle is tried again in %.1f s%s',
                      slot.number, link.pid, _how_it_ended(exitcode), delay,
                      f'\n{link.start_error[1]}' if link.start_error else '')
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

    def _lost(self, slot: _Slot, link: _Link, exitcode: int | None,
              lost: list[_TaskFuture]) -> None:
        """A ready worker died unasked: what it may have started fails with WorkerLost,
        and it is replaced (with back-off if it keeps dying soon after starting)."""
        reason = link.kill_reason or _likely_cause(exitcode)
        error = WorkerLost(
            f'worker {link.number} (pid {link.pid}) {_how_it_ended(exitcode)} while '
            f'running this task; {reason}'
            + ('; it was replaced' if self._state is RUNNING else ''),
            link.number, link.pid, exitcode)
        if lost or self._state is RUNNING:
            log.error('worker %d (pid %d) %s with %d task(s) in flight; %s', link.number,
                      link.pid, _how_it_ended(exitcode), sum(map(_weight, lost)), reason)
        self._fail(lost, error, 'lost')
        if self._state is not RUNNING or slot.link is not None or link.retiring:
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
        if traceback_text:
            what = f'could not start: {step} raised\n{traceback_text}'
        elif exitcode is not None and exitcode < 0:
            # Killed from outside while it started (in _initialise, or before): not a
            # problem with the program's main module.
            what = f'{_how_it_ended(exitcode)} before it was ready; {_likely_cause(exitcode)}'
        else:
            what = (f'{_how_it_ended(exitcode)} before it was ready, before _initialise ran '
                    '(likely causes: under spawn or forkserver the main module must be '
                    'importable and its start-up code guarded by if __name__ == '
                    '"__main__"; see the worker\'s stderr)')
        error = WorkerStartError(f'worker {slot.number} (pid {link.pid}) {what}', slot.number,
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
        _live_pools.discard(self.pool)
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
            _kill(link)

    def _block_unless_awaited(self) -> None:
        future = self._stop_future
        if future is None or future.done() or future._lp_awaited:
            return
        self._run_blocking_until_stopped()

    def _run_blocking_until_stopped(self) -> None:
        """Drive the channels and sentinels directly while the loop cannot run."""
        _drive_until_stopped(self)

    def _abandon_at_exit(self) -> None:
        """The interpreter is exiting with this pool running: end the workers quickly."""
        self.dispatcher._plain = False
        links = self._links()
        for link in links:
            if link.channel is not None and not link.channel.closed:
                _parent_fds.discard(link.channel.fileno())
                link.channel.close()   # end of file: the worker exits
        for link in links:
            assert link.process is not None
            link.process.join(self._options['kill_grace'])
            if link.process.is_alive():
                link.process.kill()
                link.process.join(5)
        self._state = STOPPED
        _live_pools.discard(self.pool)


def _disown(process: multiprocessing.process.BaseProcess) -> None:
    """Take a process we supervise ourselves out of multiprocessing's list of children.

    A process forked from this one later (a web server's workers) inherits that list, and
    at exit multiprocessing would try to join our workers from there, which fails with an
    AssertionError ("can only join a child process"). We reap our processes through their
    sentinels, and end them at exit, so multiprocessing need not know them.
    """
    children = getattr(multiprocessing.process, '_children', None)
    if isinstance(children, set):
        children.discard(process)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return 'vanished'
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f'signal {-exitcode}'
        return f'died with signal {-exitcode} ({name})'
    return f'exited with code {exitcode}'


def _likely_cause(exitcode: int | None) -> str:
    if exitcode == -signal.SIGKILL:
        return ('likely causes: the kernel\'s out-of-memory killer (check dmesg), '
                'or a kill -9')
    if exitcode == -signal.SIGSEGV:
        return 'likely cause: a crash in native code (segmentation fault)'
    if exitcode == -signal.SIGABRT:
        return 'likely cause: an abort in native code or a failed assertion in C'
    if exitcode is not None and exitcode >= 0:
        return 'likely cause: os._exit() or sys.exit() in a handler, or the worker\'s ' \
               'parent-death signal'
    return 'likely cause: a signal sent to the worker'


def _current_loop_or_none() -> asyncio.AbstractEventLoop | None:
    return asyncio._get_running_loop()


@atexit.register
def _end_pools_at_exit() -> None:
    # Registered after multiprocessing's own exit hook (multiprocessing.util is imported
    # above), so it runs first: that hook joins child processes, which would wait forever
    # for workers that were never stopped.
    for pool in list(_live_pools):
        if pool._supervisor._state in (RUNNING, STOPPING):
            pool._supervisor._abandon_at_exit()


def _back_off(attempt: int) -> float:
    """Seconds before the next start after ``attempt`` failed ones: 0.1, 0.2, 0.4 ... 10."""
    return min(0.1 * 2.0 ** (attempt - 1), 10.0)


def _drive_until_stopped(supervisor: Supervisor) -> None:
    """Run ``supervisor``'s stop to its end without the loop: read the channels and
    sentinels with a selector of our own, keep the deadlines."""
    future = supervisor._stop_future
    assert future is not None
    loop = supervisor.pool._loop
    with selectors.DefaultSelector() as selector:
        while not future.done():
            now = loop.time()
            if now >= supervisor._stop_deadline and supervisor._kill_at is None:
                supervisor._escalate()
            if supervisor._kill_at is not None and now >= supervisor._kill_at:
                supervisor._kill_all()
            wait = (supervisor._kill_at if supervisor._kill_at is not None
                    else supervisor._stop_deadline)
            links = supervisor._links()
            for link in links:
                assert link.channel is not None
                if link.channel.wants_write or link.acks or link.batch:
                    link.channel.flush()
            keys = []
            for link in links:
                assert link.channel is not None
                if not link.channel.closed:
                    events = selectors.EVENT_READ
                    if link.channel.wants_write:
                        events |= selectors.EVENT_WRITE
                    keys.append(selector.register(link.channel.fileno(), events,
                                                  ('channel', link)))
                keys.append(selector.register(link.sentinel, selectors.EVENT_READ,
                                              ('exit', link)))
            if not keys:
                supervisor._check_stopped()
                break
            ready = selector.select(max(0.0, min(wait - now, 0.5)))
            for key in keys:
                selector.unregister(key.fileobj)
            for key, events in ready:
                what, link = key.data
                if what == 'exit':
                    supervisor._on_exit(link)
                elif not link.exited and link.channel is not None:
                    if events & selectors.EVENT_READ:
                        link.channel.read_ready()
                    if events & selectors.EVENT_WRITE:
                        link.channel.flush()
            supervisor._check_stopped()
