"""The dispatcher: the backlog, each worker's window, and sending.

The path of a message through the parent::

    Pool.submit() / put() / put_nowait() / broadcast() / map()     (looppool.pool)
      |
      v
    Dispatcher   the outbox (this loop iteration's submit()s), the backlog (pending, in
      |          order) and each worker number's own queue (worker_num, put_nowait's
      |          turn); gives each message to the worker with room and the fewest queued
      |          (room: under its share of max_tasks, and under its window of unstarted
      |          messages), and records it in that worker's in-flight table
      v
    _Link        the worker process's channel (looppool.link, looppool.channel): one
                 frame per loop iteration, a batch of tasks pickled together

What comes back is read by the :class:`~looppool.receive.Receiver`; what a worker holds
and has not finished is watched by :class:`~looppool.inflight.InFlight` (timeouts,
cancellation, blocked workers, work taken back); the processes themselves are the
:class:`~looppool.supervise.Supervisor`'s.

Who owns what: the :class:`Dispatcher` owns the outbox, the backlog, the turns, the task
ids and the sticky broadcasts; each link's window and counts are its own fields, changed
here and by the receiver. It lives in the parent, on the pool's loop, and is not
thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import protocol, tracing
from .errors import PoolClosed
from .link import _Link, _Slot
from .part import Part
from .protocol import dumps, dumps_shared, loads
from .supervise import RUNNING, STOPPING
from .tracing import ENABLED as TRACING
from .tracing import current_context
from .tasks import (Entry, _AnyTaskFuture, _cancel_timer, _pickle_batch, _TaskFuture,
                    _tid_of, _wake)

if TYPE_CHECKING:
    from .pool import Pool

# A batch is cut at this many tasks, so one frame stays a bounded amount of work.
_MAX_BATCH = 256
# A burst of submit() calls is handed to the workers every this many calls per worker (at
# most four workers' worth): often enough that they start while the caller goes on, and, past
# their shares, that replies are read inside the burst (see Dispatcher._catch_up).
_OUTBOX_PER_WORKER = _MAX_BATCH


class Dispatcher(Part):
    """Gives each message to a worker; holds what no worker has room for.

    Lives in the parent, on the pool's loop; not thread-safe.
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        # This pool's submit() futures: a class whose _lp_pool is the pool (see _TaskFuture).
        self._task_future: type[_TaskFuture] = type(
            '_TaskFuture', (_TaskFuture,), {'__slots__': (), '_lp_pool': pool,
                                            '__module__': _TaskFuture.__module__})
        self._rr = 0
        self._note_turn = 0   # put_nowait()'s own turn: exact round-robin, as in Looppool 0.3
        self._next_tid = 1
        self._submits = 0   # submit() calls; stats() adds them to _counts['submitted']
        # submit()s of this loop iteration not yet handed to a worker, in order; handed out
        # at the end of the iteration, or once there are _outbox_limit (see submit()).
        self._outbox: list[_TaskFuture] = []
        self._outbox_limit = _OUTBOX_PER_WORKER * min(pool.pool_size, 4)
        self._outbox_due = False   # a callback to flush it is scheduled
        self._outbox_gave_up = False   # a future in it was cancelled or timed out
        # submit() may take its shortest path: running, no statsd, no max_tasks_per_worker.
        self._plain = False
        self._room_waiters: list[asyncio.Future[None]] = []   # map()s waiting for room
        self._catching_up = False   # reading replies inside submit(): see _catch_up

    def resized(self) -> None:
        super().resized()
        self._outbox_limit = _OUTBOX_PER_WORKER * min(self.pool_size, 4)

    def submit(self, message: Any, worker_num: int | None,
               timeout: float | None) -> asyncio.Future[Any]:
        """:meth:`Pool.submit`."""
        if TRACING and current_context():   # (empty: no trace to carry)
            message = tracing.outgoing(message)
        tid = self._next_tid
        self._next_tid = tid + 1
        if worker_num is None and timeout is None and self._plain:   # _plain: running
            # The path of every message of a burst, kept to the least: the future goes in
            # the outbox, which _flush_outbox() hands to the workers in bulk. The future
            # itself waits there and in the queues: no per-message tuple (the fewer objects
            # a burst leaves, the less the cyclic GC has to walk).
            future = self._task_future(loop=self.pool._loop)
            future._lp_tid = tid
            future._lp_message = message
            outbox = self._outbox
            if outbox:
                outbox.append(future)
                if len(outbox) >= self._outbox_limit:
                    # A long burst: the replies that came meanwhile are read, which makes
                    # room, then this part goes now, so the workers start on it while the
                    # caller goes on.
                    self._catch_up()
                    self._flush_outbox(now=True)
                return future
            rr = self._rr
            slot = self._slots[rr]
            link = slot.link
            if link is not None and not link.used and not link.unread \
                    and not slot.targeted and not self._pending:
                # The next worker in turn is idle: this one goes at once (latency).
                self._rr = rr + 1 if rr + 1 < self.pool_size else 0
                self._submits += 1
                self._send_task(link, future)
                return future
            outbox.append(future)
            if not self._outbox_due:
                self._outbox_due = True
                self.pool._loop.call_soon(self._flush_outbox_due)
            return future
        if self._outbox:
            self._flush_outbox()   # what was submitted before goes first
        if self.supervisor._state is not RUNNING:
            raise self.pool._not_running()
        if worker_num is not None:
            self.pool._check_worker_num(worker_num)
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        future = self._new_future(self._task_future, tid, message, None, timeout)
        if worker_num is not None:
            future._lp_target = worker_num
        self._submits += 1
        self._dispatch(future, worker_num)
        return future

    def take(self, futures: Sequence[_TaskFuture], worker_num: int | None) -> None:
        """Tasks a pool host made for a client (ids and classes of its own): dealt as a
        burst of ``submit()`` calls is, after what was submitted before (a lone one, with
        nothing before it, straight to a worker: latency)."""
        if self._plain and worker_num is None and (self._outbox or len(futures) > 1):
            outbox = self._outbox
            outbox.extend(futures)
            if len(outbox) >= self._outbox_limit:
                self._catch_up()
                self._flush_outbox(now=True)
            elif not self._outbox_due:
                self._outbox_due = True
                self.pool._loop.call_soon(self._flush_outbox_due)
            return
        if self._outbox:
            self._flush_outbox()
        self._submits += len(futures)
        for future in futures:
            if worker_num is not None:
                future._lp_target = worker_num
            self._dispatch(future, worker_num)

    def _flush_outbox_due(self) -> None:
        self._outbox_due = False
        self._flush_outbox(now=True)

    def _flush_outbox(self, now: bool = False) -> None:
        """Hand the ``submit()`` calls in the outbox to the workers, in order; with ``now``,
        write each worker's batch at once rather than at the end of the loop iteration.

        The outbox is dealt out in bulk, exactly as one-by-one round-robin would: in turn
        from the pointer, over the workers with room (none with messages of its own
        waiting), as many whole rounds as each has room for; the ``i``-th of them gets
        ``outbox[i::width]``, recorded with one dict update, pickled as one batch. Then
        again over those that still have room. What finds no room waits in the pool.
        """
        outbox = self._outbox
        if not outbox:
            return
        self._outbox = []
        self._submits += len(outbox)
        if self._outbox_gave_up:   # a caller gave up on one before it left: leave it out
            self._outbox_gave_up = False
            outbox = [future for future in outbox if not future.done()]
        count = len(outbox)
        if not count:
            return
        pending = self._pending
        if pending:
            pending.extend(outbox)
            return
        slots = self._slots
        size = len(slots)
        touched = []
        start = 0
        while start < count:
            rr = self._rr
            turn = []
            rounds = count - start
            for step in range(size):
                index = rr + step if rr + step < size else rr + step - size
                slot = slots[index]
                link = slot.link
                if link is not None and not slot.targeted:
                    room = self._room(link)
                    if room > 0:
                        turn.append((link.unread, index, link))
                        if room < rounds:
                            rounds = room
            if not turn:
                break
            if len(turn) > 1:
                turn.sort(key=_queued_first)   # the least queued, then the heard from last
            width = len(turn)
            dealt = min(count - start, rounds * width)
            for offset, (_, _, link) in enumerate(turn[:dealt]):
                part = outbox[start + offset:start + dealt:width]
                link.used += len(part)
                link.unread += len(part)
                link.inflight.update(zip(map(_tid_of, part), part))
                if link.batch:
                    link.batch.extend(part)
                else:
                    link.batch = part
                if link not in touched:
                    touched.append(link)
            last = turn[(dealt - 1) % width][1]
            self._rr = last + 1 if last + 1 < size else 0
            start += dealt
        for link in touched:
            if now:
                self._send_batch(link, now=True)
            else:
                link.channel.schedule_flush()  # type: ignore[union-attr]
        for index in range(start, count):   # no room: they wait (or fail, if no worker
            if pending:                       # can start)
                pending.extend(outbox[index:])
                break
            self._dispatch(outbox[index], None)

    def _catch_up(self) -> None:
        """Take in what the workers have sent, during a burst of ``submit()`` calls.

        The loop runs nothing until the caller of a long burst awaits, so without this the
        workers would finish their shares of ``max_tasks`` early in the burst and then sit
        idle until it ends. Reading their replies here frees slots, and the refill that
        follows sends them more of the waiting messages at once. Nothing of the caller's
        runs in between: futures resolve (their callbacks wait for the loop, as always),
        and what would call application code (``process_message``, log records) is held
        for the next loop iteration, in order (see :meth:`_hold`).

        A channel whose frames are being handled right now (the burst comes from a
        ``process_message`` called for one of them) is not read: what it holds would be
        taken in before the rest of that read, out of order.
        """
        self._catching_up = True
        try:
            for slot in self._slots:
                link = slot.link
                if link is not None and link.channel is not None \
                        and not link.channel.handling:
                    link.channel.drain()
        finally:
            self._catching_up = False

    def _new_future(self, cls: type[_AnyTaskFuture], tid: int, payload: Any, sink: Any,
                    timeout: float | None) -> _AnyTaskFuture:
        future = cls(loop=self.pool._loop)
        if future._lp_pool is not self.pool:
            future._lp_pool = self.pool   # a class of its own (map's chunks, a host's tasks)
        future._lp_tid = tid
        if sink is not None:
            future._lp_sink = sink
        future._lp_message = payload
        if self.pool._metrics is not None:
            future._lp_started = self.pool._loop.time()
        if timeout is not None:
            future._lp_timer = self.pool._loop.call_later(timeout, self.inflight._expire,
                                                          future, timeout)
        return future

    def _wake_room(self) -> None:
        """Room came free, a worker is back or the pool is stopping: map()s look again."""
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            _wake(waiter)

    def _next_link(self, count: int = 1) -> _Link | None:
        """The worker with room for ``count`` more tasks (a map() chunk counts one in its
        window), nothing waiting for it in particular, and the fewest messages queued:
        among equals the one heard from last (a worker whose loop a handler holds is silent
        before it is found blocked), then in turn; the turn moves past it. None if there
        is none."""
        limit = self._share - count
        slots = self._slots
        size = len(slots)
        index = self._rr
        best: _Link | None = None
        best_queued = 0
        after = index
        for _ in range(size):
            slot = slots[index]
            index = index + 1 if index + 1 < size else 0
            link = slot.link
            if link is not None and link.used <= limit and not slot.targeted \
                    and not link.blocked and not link.paused:
                queued = link.unread
                if queued < link.window and (
                        best is None or queued < best_queued
                        or (queued == best_queued and link.heard_at > best.heard_at)):
                    best, best_queued, after = link, queued, index
                    if not queued:
                        break
        if best is not None:
            self._rr = after
        return best

    def _room(self, link: _Link) -> int:
        """How many more messages from the backlog ``link`` may take now."""
        if link.blocked or link.retiring or link.paused:
            return 0
        return min(self._share - link.used, link.window - link.unread)

    def _dispatch(self, item: Entry, worker_num: int | None) -> None:
        share = self._share
        if worker_num is None:
            if not self._pending:
                link = self._next_link()
                if link is not None:
                    self._send(link, item)
                    return
                slots = self._slots
                if slots and all(slot.start_error is not None for slot in slots):
                    self._fail_item(item, slots[0].start_error)
                    return
            self._pending.append(item)
        else:
            slot = self._slots[worker_num]
            if slot.start_error is not None:
                self._fail_item(item, slot.start_error)
                return
            link = slot.link
            if link is not None and link.used < share and not slot.targeted \
                    and link.unread < link.window and not link.blocked and not link.paused:
                self._send(link, item)
            else:
                slot.targeted.append(item)

    def _send(self, link: _Link, item: Entry) -> None:
        if not isinstance(item, tuple):
            self._send_task(link, item)
            return
        kind, tid, payload, future = item
        weight = future._lp_count if kind == protocol.MAP else 1
        link.used += weight
        if link.batch:
            self._send_batch(link)   # what was submitted earlier goes first
        try:
            # To an idle worker at once (latency), as submit() does; else at the flush.
            link.channel.send(kind, tid, payload,  # type: ignore[union-attr]
                              link.used == weight)
        except ValueError as exc:   # over the 4 GiB frame limit: nothing was sent
            link.used -= weight
            if future is None:
                raise               # put_nowait(): raise to its caller
            if not future.done():
                future.set_exception(exc)
            return
        link.unread += 1
        if self.inflight._lag_timer is None:
            self.inflight._watch_lag()
        if kind == protocol.TASK or kind == protocol.MAP:
            link.inflight[tid] = future
        elif future is not None:
            future.set_result(None)
        if self._recycle_after is not None:
            self._count_sent(link, weight)

    def _send_task(self, link: _Link, future: _TaskFuture) -> None:
        """A submit() to ``link``: pickled with the rest of this loop iteration's tasks, at
        the flush."""
        link.used += 1
        link.unread += 1
        link.inflight[future._lp_tid] = future
        batch = link.batch
        batch.append(future)
        if link.used == 1:
            # The worker was idle: nothing to coalesce with, so go now (latency).
            self._send_batch(link, now=True)
        elif len(batch) == 1:
            link.channel.schedule_flush()  # type: ignore[union-attr]
        elif len(batch) >= _MAX_BATCH:
            # A long burst: write this part now, so the worker starts on it while the caller
            # goes on submitting.
            self._send_batch(link, now=True)
        if self._recycle_after is not None:
            self._count_sent(link)

    def _count_sent(self, link: _Link, count: int = 1) -> None:
        assert self._recycle_after is not None
        link.sent += count
        if link.sent >= self._recycle_after:
            self.supervisor._recycle(
                link, f'it was sent max_tasks_per_worker={self._recycle_after} tasks')

    def _refill(self, slot: _Slot) -> None:
        link = slot.link
        if link is None:
            return
        share = self._share
        targeted = slot.targeted
        pending = self._pending
        metrics = self.pool._metrics
        if link.blocked or link.paused:
            pass   # its turn comes when it is heard from again
        elif not targeted and metrics is None and self._recycle_after is None:
            # The common case, kept tight: submit()s move from the queue into the batch.
            inflight = link.inflight
            batch = link.batch
            used = link.used
            room = min(share - used, link.window - link.unread)
            taken = 0
            while taken < room and pending:
                item = pending[0]
                if isinstance(item, tuple):
                    break   # a broadcast's or a host's task: the general path below
                pending.popleft()
                if item.done():
                    continue   # cancelled or timed out while it waited
                taken += 1
                inflight[item._lp_tid] = item
                batch.append(item)
                if len(batch) >= _MAX_BATCH:
                    link.used = used + taken
                    link.unread += taken
                    room -= taken
                    self._send_batch(link)
                    used, taken, batch = link.used, 0, link.batch
            link.used = used + taken
            link.unread += taken
            if batch:
                # Now rather than at the end of the iteration: the worker may be idle.
                self._send_batch(link, now=True)
            if slot.link is not link:
                return
        # slot.link is read again each time: a send may recycle the process.
        while (link := slot.link) is not None and link.used < share and (targeted or pending) \
                and link.unread < link.window and not link.blocked and not link.paused:
            item = targeted.popleft() if targeted else pending.popleft()
            if isinstance(item, tuple):
                future = item[3]
                if future is not None and future.done():
                    continue  # cancelled or timed out while it waited
                if metrics is not None and isinstance(future, _TaskFuture):
                    metrics.waits.offer(self.pool._loop.time() - future._lp_started)
                self._send(link, item)
            elif not item.done():   # else cancelled or timed out while it waited
                if metrics is not None:
                    metrics.waits.offer(self.pool._loop.time() - item._lp_started)
                self._send_task(link, item)
        if self.supervisor._state is STOPPING:
            self.supervisor._stop_when_drained(slot)

    def _fail_item(self, item: Entry, error: BaseException | None) -> None:
        future = item if not isinstance(item, tuple) else item[3]
        if future is not None and not future.done():
            _cancel_timer(future)
            future.set_exception(error or PoolClosed('the pool is stopped'))

    def _refill_all(self, but: _Link | None = None) -> None:
        for slot in self._slots:
            if slot.link is not None and slot.link is not but \
                    and (self._pending or slot.targeted):
                self._refill(slot)
        if self._room_waiters:
            self._wake_room()

    def _before_flush(self, link: _Link) -> None:
        link.before_flush()
        if link.batch:
            self._send_batch(link)

    def _send_batch(self, link: _Link, now: bool = False) -> None:
        """Pickle the tasks queued for ``link`` in one go and send them as one frame; with
        ``now``, write it at once rather than at the end of the loop iteration.

        A message that cannot be pickled fails its own future (nothing of it is sent); a
        task cancelled before it left is dropped here, freeing its slot.
        """
        batch = link.batch
        link.batch = []
        before = len(batch)
        if link.batch_gave_up:
            link.batch_gave_up = False
            for future in batch:
                if future.done():
                    self._unsend(link, future)
            batch = [future for future in batch if not future.done()]
        shared_memory = self.pool._shared_memory
        try:
            data = _pickle_batch(batch, shared_memory)
        except Exception:
            for future in batch:
                try:
                    dumps_shared(future._lp_message, shared_memory)
                except Exception as exc:
                    future.set_exception(exc)
                    self._counts['failed'] += 1
                    self._unsend(link, future)
            batch = [future for future in batch if not future.done()]
            data = _pickle_batch(batch, shared_memory)
        assert link.channel is not None
        if len(batch) == 1:
            # One task (a round trip at a time): a TASK frame, without the ids' pickle.
            future = batch[0]
            try:
                link.channel.send(protocol.TASK, future._lp_tid, data, now)
                now = False   # written
            except ValueError as exc:   # over the 4 GiB frame limit
                self._unsend(link, future)
                future.set_exception(exc)
                self._counts['failed'] += 1
                batch = []
        elif batch:
            try:
                link.channel.send_parts(protocol.TASKS, len(batch), protocol.pack(
                    list(map(_tid_of, batch)), data), now)
                now = False   # written
            except ValueError:   # over the 4 GiB frame limit together: send one by one,
                # so that only a message over the limit on its own fails
                link.unread -= len(batch)   # counted again as each goes
                _resend(self, link, dumps([future._lp_tid for future in batch]))
                batch = [future for future in batch if not future.done()]
        if now:
            link.channel.flush()
        if self.inflight._lag_timer is None:
            self.inflight._watch_lag()
        if len(batch) < before:   # slots came free: let waiting messages have them
            slot = self._slots[link.number]
            if slot.link is link:
                self._refill(slot)

    def _unsend(self, link: _Link, future: _TaskFuture, counted: bool = True) -> None:
        """``future`` was dealt to ``link`` but is not sent after all (with ``counted``,
        it was counted as on its way)."""
        link.inflight.pop(future._lp_tid, None)
        link.used -= 1
        if counted:
            link.unread -= 1


def _queued_first(entry: tuple[int, int, _Link]) -> tuple[int, float]:
    return entry[0], -entry[2].heard_at


def _resend(dispatcher: Dispatcher, link: _Link, payload: Any) -> None:
    """The worker could not unpickle a batch: send its tasks one by one, so that only
    the message at fault fails (with the worker's unpickling error)."""
    try:
        tids = loads(payload)
    except BaseException:  # pragma: no cover - a list of ints
        return
    assert link.channel is not None
    for tid in tids:
        future = link.inflight.get(tid)
        if future is None:
            continue
        if future.done():   # cancelled while its batch came back: never ran
            dispatcher._unsend(link, future, counted=False)
            continue
        try:
            link.channel.send(protocol.TASK, tid, dumps(future._lp_message))
        except Exception as exc:   # over the frame limit on its own
            dispatcher._unsend(link, future, counted=False)
            future.set_exception(exc)
            dispatcher._counts['failed'] += 1
            continue
        link.unread += 1
