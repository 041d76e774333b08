"""What the workers send back, read on the parent's loop.

Every frame a worker sends reaches :meth:`Receiver._on_frames`, in order::

    worker process --frames--> channel --> Receiver
        REPLY / ERROR / REPLIES / MAPPED   resolve futures from the worker's in-flight
                                           table; the slots they free let the dispatcher
                                           send that worker more
        ACK / HELD / TAKEN / RECALLED      what the worker started, holds, takes and gives
                                           back: its window (see looppool.inflight)
        BATCHED                            a batch handed to handle_batch: counted for
                                           stats() (see looppool.batch)
        RESULT                             a _put_nowait result: process_message(result,
                                           result_done)
        LOG                                a log record, to this process's handlers
        READY / START_FAILED               to the supervisor

Lives in the parent, on the pool's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import pickle
import types
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import eager, protocol, shm
from .errors import PoolClosed, RemoteTraceback
from .link import _Link
from .part import Part
from .protocol import loads
from .supervise import STOPPING
from .dispatch import _resend
from .tasks import _await, _cancel_timer, _ChunkFuture, _TaskFuture

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger('looppool')

# Freed slots that are refilled before the end of a read that holds many frames.
_EARLY_REFILL = 256


class Receiver(Part):
    """Takes in the frames of every worker. Lives in the parent, on the pool's loop; not
    thread-safe."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._result_tasks: set[asyncio.Future[Any]] = set()
        self._warned_results = False
        # Results and log records that arrived while the pool read inside a submit() call
        # (see Dispatcher._catch_up), held for the next loop iteration: see _hold.
        self._held: list[tuple[_Link, int, int, Any]] | None = None
        # What runs once the frames of the read under way are taken in (see after_read).
        self._reading = 0
        self._after_read: list[Callable[[], None]] = []

    def _on_mapped(self, link: _Link, tid: int, payload: Any) -> int:
        """A chunk's answer: resolve its future; returns the slots it frees."""
        future = link.inflight.pop(tid, None)
        frees_list, data = protocol.unpack_ids(payload)
        frees = frees_list[0]
        count = future._lp_count if isinstance(future, _ChunkFuture) else frees
        try:
            replies, blobs = loads(data)
        except BaseException as exc:
            replies, blobs = None, {-1: exc}
        if replies is None:
            frees = count   # the worker could not tell how many it was sent
        if not isinstance(future, _ChunkFuture) or future.done():
            return frees
        self._counts['completed'] += count
        self._slots[link.number].done += count
        errors: dict[int, BaseException] = {}
        for index, blob in blobs.items():
            error = blob if isinstance(blob, BaseException) else self._decode_error(link, blob)
            if isinstance(error, asyncio.CancelledError) and link.terminated:
                error = PoolClosed(f'worker {link.number} was told to give up '
                                   f'({link.kill_reason}), so this task was cancelled there')
            errors[max(index, 0)] = error
        self._counts['failed'] += len(errors)
        if future._lp_after is not None:   # a message after these could not be pickled
            errors.update(future._lp_after)
        future.set_result((replies if replies is not None else [], errors))
        return frees

    def after_read(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the frames of the read under way are taken in (at once
        after them, not in the next loop iteration: a pool host sends its client the
        replies of one read together, and without delay), or in the next loop iteration
        outside a read."""
        if self._reading:
            self._after_read.append(callback)
        else:
            self.pool._loop.call_soon(callback)

    def _on_frames(self, link: _Link, frames: list[tuple[int, int, Any]]) -> None:
        """The frames of one read from ``link``, in order; then what :meth:`after_read`
        was given meanwhile."""
        self._reading += 1
        try:
            self._take_frames(link, frames)
        finally:
            self._reading -= 1
            if self._after_read and not self._reading:
                callbacks, self._after_read = self._after_read, []
                for callback in callbacks:
                    callback()

    def _take_frames(self, link: _Link, frames: list[tuple[int, int, Any]]) -> None:
        freed = 0
        completed = 0
        errors = 0
        acked = False
        link.reads += 1   # heard from: its loop runs
        link.heard_at = self.pool._loop.time()
        link.blocked = False
        for kind, arg, payload in frames:
            if kind == protocol.ACK:
                link.unread -= arg
                acked = True
                if link.unread <= link.window >> 1 and not link.overran \
                        and link.window < self._share \
                        and (self._pending or self._slots[link.number].targeted):
                    # It started at least half of what it may hold, within the budget of
                    # its turns, while work waited here: a longer queue keeps it busy
                    # through the round trip. (Here, before the replies after this ACK
                    # send it more.)
                    link.window = min(self._share, link.window * 2)
                if not link.unread:
                    link.overran = False
            elif kind == protocol.REPLIES:
                count = self._on_replies(link, payload)
                freed += count
                completed += count
                if freed >= _EARLY_REFILL and len(frames) > 1:
                    # A long read: send the worker more work now, not after the rest.
                    link.used -= freed
                    freed = 0
                    slot = self._slots[link.number]
                    if slot.link is link:
                        self.dispatcher._refill(slot)
            elif kind == protocol.REPLY or kind == protocol.REPLY_KEEP:
                freed += kind == protocol.REPLY
                completed += 1
                self._on_reply(link, arg, payload)
            elif kind == protocol.ERROR or kind == protocol.ERROR_KEEP:
                freed += kind == protocol.ERROR
                errors += 1
                self._on_error(link, arg, payload)
            elif kind == protocol.MAPPED:
                freed += self._on_mapped(link, arg, payload)
            elif kind == protocol.FREED:
                freed += arg
            else:
                acked = self._on_other(link, kind, arg, payload) or acked
        if completed or errors:
            self._counts['completed'] += completed
            self._slots[link.number].done += completed + errors
        if freed or acked:
            self._room_made(link, freed, acked)

    def _on_reply(self, link: _Link, tid: int, payload: Any) -> None:
        future = link.inflight.pop(tid, None)
        if future is None or future.done():
            return
        if future._lp_timer is not None:
            future._lp_timer.cancel()
        if future._lp_sink is not None:
            _TaskFuture.set_result(future, None)
            future._lp_sink(False, payload)
            return
        try:
            value = loads(payload)
        except BaseException as exc:
            future.set_exception(self._unpickle_error(link, 'reply', exc))
            return
        future.set_result(value)
        metrics = self.pool._metrics
        if metrics is not None:
            metrics.durations.offer(self.pool._loop.time() - future._lp_started)

    def _on_error(self, link: _Link, tid: int, payload: Any) -> None:
        future = link.inflight.pop(tid, None)
        if future is None or future.done():
            return   # the caller gave up (cancel, timeout): not a failure
        self._counts['failed'] += 1
        _cancel_timer(future)
        if future._lp_sink is not None:
            _TaskFuture.set_result(future, None)
            future._lp_sink(True, payload)
            return
        error = self._decode_error(link, payload)
        if not isinstance(error, asyncio.CancelledError):
            future.set_exception(error)
        elif link.terminated:   # cancelled by a deadline (stop, or a recycle)
            future.set_exception(PoolClosed(
                f'worker {link.number} was told to give up '
                f'({link.kill_reason}), so this task was cancelled there'))
        else:                   # the handler cancelled itself
            future.cancel()

    def _on_other(self, link: _Link, kind: int, arg: int, payload: Any) -> bool:
        """The rarer frames; returns whether the worker's queue got shorter."""
        if kind == protocol.HELD:
            link.held.extend(loads(payload))
            link.overran = True
        elif kind == protocol.TAKEN:
            held = link.held
            for _ in range(min(arg, len(held))):
                held.popleft()
            return True
        elif kind == protocol.RECALLED:
            self.inflight._recalled(link, loads(payload))
            return True
        elif kind == protocol.RESEND:
            _resend(self.dispatcher, link, payload)
        elif kind == protocol.BATCHED:
            self._counts['batches'] += 1
            self._counts['batched'] += arg
            self.pool._batch_sizes[arg] += 1
            self._slots[link.number].batches += 1
        elif kind == protocol.RESULT or kind == protocol.LOG:
            if self.dispatcher._catching_up or self._held is not None:
                self._hold(link, kind, arg, payload)
            elif kind == protocol.RESULT:
                self._deliver(link, arg, payload)
            else:
                self._on_log(link, payload)
        elif kind == protocol.READY:
            self.supervisor._on_ready(link)
        elif kind == protocol.PAUSED:
            self.lifecycle.on_paused(link)
        elif kind == protocol.RESUMED:
            self.lifecycle.on_resumed(link)
        elif kind == protocol.START_FAILED:
            try:
                link.start_error = loads(payload)
            except BaseException:  # pragma: no cover - two plain strs
                link.start_error = ('its start', '(the traceback could not be read)')
        return False

    def _room_made(self, link: _Link, freed: int, acked: bool) -> None:
        """``link`` freed slots or started what it held: it may take more."""
        link.used -= freed
        slot = self._slots[link.number]
        if slot.link is link and (self._pending or slot.targeted
                                  or self.supervisor._state is STOPPING):
            self.dispatcher._refill(slot)
        if self.dispatcher._room_waiters:
            self.dispatcher._wake_room()
        if self.lifecycle.phase is not None:
            self.lifecycle.check()   # a pause waits for what runs to finish

    def _on_replies(self, link: _Link, payload: Any) -> int:
        tids, values_pickle = protocol.unpack_ids(payload)
        inflight = link.inflight
        try:
            values = loads(values_pickle)
        except BaseException as exc:
            # Rare: a reply whose class this process cannot import. Its batch-mates' values
            # are in the same pickle, so they fail with it; the error says so.
            error = self._unpickle_error(link, f'batch of {len(tids)} replies', exc)
            for tid in tids:
                future = inflight.pop(tid, None)
                if future is not None and not future.done():
                    _cancel_timer(future)
                    future.set_exception(error)
            return len(tids)
        metrics = self.pool._metrics
        if metrics is None:
            # The path of every reply of a burst: no call to done() (set_result() on a
            # future the caller gave up on raises, which is rarer and costs no more).
            found: Iterable[Any] = map(inflight.pop, tids, itertools.repeat(None))
            for waiter, value in zip(found, values):
                try:
                    if waiter._lp_timer is None:
                        waiter.set_result(value)
                        continue
                except AttributeError:   # None: no longer in flight here
                    continue
                except asyncio.InvalidStateError:   # cancelled or timed out meanwhile
                    continue
                if not waiter.done():
                    waiter._lp_timer.cancel()
                    waiter.set_result(value)
            return len(tids)
        now = self.pool._loop.time()
        for tid, value in zip(tids, values):
            future = inflight.pop(tid, None)
            if future is None or future.done():
                continue
            if future._lp_timer is not None:
                future._lp_timer.cancel()
            future.set_result(value)
            metrics.durations.offer(now - future._lp_started)
        return len(tids)

    def _hold(self, link: _Link, kind: int, arg: int, payload: Any) -> None:
        """Keep a result or log record for the next loop iteration: it arrived while the
        pool was reading inside a ``submit()`` call (see :meth:`_catch_up`), or after one
        that is still held, which must go first."""
        if self._held is None:
            self._held = []
            self.pool._loop.call_soon(self._release_held)
        if type(payload) is not shm.Big:   # (a received Big owns what it holds)
            payload = bytes(payload)       # the view is only lent
        self._held.append((link, kind, arg, payload))

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for link, kind, arg, payload in held or ():
            if kind == protocol.RESULT:
                self._deliver(link, arg, payload)
            else:
                self._on_log(link, payload)

    def _deliver(self, link: _Link, origin: int, payload: Any) -> None:
        if self.pool._raw_results is not None:
            self.pool._raw_results(origin, payload, link.result_done)
            return
        try:
            result = loads(payload)
        except BaseException as exc:
            log.error('a result from worker %d (pid %d) could not be unpickled and was '
                      'dropped: %r', link.number, link.pid, exc)
            link.result_done()
            return
        try:
            outcome = self.pool.process_message(result, link.result_done)
        except Exception:
            log.exception('process_message raised for a result from worker %d', link.number)
            return
        if outcome is not None and inspect.isawaitable(outcome):
            if type(outcome) is not types.CoroutineType:
                outcome = _await(outcome)
            task = eager.start(self.pool._loop, outcome)
            if task.done():
                self._result_task_done(task)
            else:
                self._result_tasks.add(task)
                task.add_done_callback(self._result_task_done)

    def _result_task_done(self, task: asyncio.Future[Any]) -> None:
        self._result_tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error('process_message raised', exc_info=exc)
        if self.supervisor._state is STOPPING:
            self.supervisor._check_stopped()

    def _on_log(self, link: _Link, payload: Any) -> None:
        try:
            record = logging.makeLogRecord(loads(payload))
        except BaseException:  # pragma: no cover - records are plain dicts
            return
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)

    def _decode_error(self, link: _Link, payload: Any) -> BaseException:
        """The exception a worker sent, with its traceback text as ``__cause__``."""
        try:
            exc, text = loads(payload)
        except BaseException as error:
            return self._unpickle_error(link, 'exception', error)
        exc.__cause__ = RemoteTraceback(text)
        return exc  # type: ignore[no-any-return]

    def _unpickle_error(self, link: _Link, what: str, exc: BaseException) -> BaseException:
        return pickle.UnpicklingError(
            f'the {what} from worker {link.number} (pid {link.pid}) could not be unpickled '
            f'in the parent: {exc!r} (is its class importable here?)')
