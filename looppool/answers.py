"""What a worker sends back to the parent: replies and errors, freed task slots, and
``_put_nowait`` results within the parent's credit.

:class:`Answers` is the part of the worker side of the channel (looppool.runner) that
answers; the runner is made of it. Replies of one loop iteration go together as one
REPLIES frame; a reply that cannot be pickled, or is over the frame limit, answers its own
task with the error. Results wait in the worker while the parent holds its share of
``max_results`` unacknowledged, and while any wait, no task slot is freed (backpressure all
the way to ``put_nowait``).

Lives in the worker process, on its loop thread; not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import pickle
import traceback
from typing import Any

from . import protocol
from .channel import Channel, check_size
from .protocol import dumps, dumps_shared, loads

log = logging.getLogger('looppool.worker')

# The task (or note origin) a handler runs for, so that a _put_nowait result can be routed
# back to whoever sent the message (a remote client of a pool host). Tasks copy the context
# when they are created, so concurrent handlers each see their own.
_origin: contextvars.ContextVar[int] = contextvars.ContextVar('looppool_origin', default=0)
# The origin of a replayed sticky broadcast: its return value goes nowhere.
_REPLAYED = -1


class Answers:
    """The answering half of a worker's runner (see looppool.runner)."""

    channel: Channel
    number: int
    pid: int
    credit: int                       # results the parent may still take
    held: collections.deque[tuple[int, Any]]   # results past the credit, in order
    deferred: int                     # slots whose freeing waits for held results
    freed: int                        # slots freed since the last flush
    open_slots: int                   # Looppool-style tasks whose _task_done() is due
    reply_tids: list[int]             # this iteration's replies, sent together
    reply_values: list[Any]
    looppool_style: bool
    batch_replies: bool
    stopping: bool
    shared_memory: int                # buffers this large go in shared memory (0: never)

    def maybe_stop(self) -> None:  # pragma: no cover - the runner's
        raise NotImplementedError

    def finish(self, tid: int, reply: bool, value: Any, failed: bool = False,
               note: str | None = None) -> None:
        """Answer a task: a reply for submit(), or a freed slot (and result) for a note."""
        # A modern task's end frees its slot (Looppool style: _task_done does), unless
        # results are held back, which defers it: see hold_or_send.
        frees = not self.looppool_style
        if frees and self.held:
            frees = False
            self.deferred += 1
        if reply:
            if frees and not failed and self.batch_replies:
                # Pickled with the other replies of this loop iteration, at the flush.
                self.reply_tids.append(tid)
                self.reply_values.append(value)
                if len(self.reply_tids) == 1:
                    self.channel.schedule_flush()
            elif failed:
                kind = protocol.ERROR if frees else protocol.ERROR_KEEP
                self.channel.send(kind, tid, self.encode_error(value, note))
            else:
                self.send_reply(tid, value, frees)
        else:
            if failed and not isinstance(value, asyncio.CancelledError):
                log.error('worker %d: %s %s', self.number,
                          note or 'message handler raised', _describe(value),
                          exc_info=(type(value), value, value.__traceback__))
            elif not failed and value is not None and not self.looppool_style \
                    and tid != _REPLAYED:
                self.send_result(value)
            if frees:
                self.slot_freed()
        if self.stopping:
            self.maybe_stop()

    def send_reply(self, tid: int, value: Any, frees: bool) -> None:
        """Answer one task on its own frame; a reply that cannot be pickled, or is over
        the frame limit, answers it with the error instead."""
        kind = protocol.REPLY if frees else protocol.REPLY_KEEP
        try:
            payload = dumps_shared(value, self.shared_memory)
        except BaseException as exc:
            kind = protocol.ERROR if frees else protocol.ERROR_KEEP
            payload = self.unpicklable(value, exc)
        try:
            self.channel.send(kind, tid, payload)
        except ValueError as exc:   # over the 4 GiB frame limit
            self.channel.send(protocol.ERROR if frees else protocol.ERROR_KEEP, tid,
                              self.encode_error(exc, None))

    def unpicklable(self, value: Any, exc: BaseException) -> bytes:
        """The error that answers a task whose reply could not be pickled."""
        return self.encode_error(pickle.PicklingError(
            f'worker {self.number} (pid {self.pid}) could not pickle the reply '
            f'({type(value).__qualname__}): {exc!r}'), None)

    def encode_error(self, exc: BaseException, note: str | None) -> bytes:
        text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if note:
            text = f'{note} in worker {self.number} (pid {self.pid}):\n{text}'
        try:
            payload = dumps((exc, text))
            loads(payload)  # an exception that pickles but cannot be rebuilt fails here
            return payload
        except BaseException as pickling_error:
            stand_in = pickle.PicklingError(
                f'worker {self.number} (pid {self.pid}) raised {type(exc).__qualname__}: '
                f'{exc}, which cannot be sent to the parent ({pickling_error!r})')
            return dumps((stand_in, text))

    def slot_freed(self) -> None:
        self.freed += 1
        if self.freed == 1:
            self.channel.schedule_flush()

    def task_done(self) -> None:
        if self.open_slots <= 0:
            raise RuntimeError('_task_done() called more often than messages were received')
        self.open_slots -= 1
        if self.held:
            self.deferred += 1
        else:
            self.slot_freed()
        if self.stopping:
            self.maybe_stop()

    def send_replies(self) -> None:
        """Send this iteration's replies as one frame; a reply that cannot be pickled
        fails its own task with a PicklingError instead."""
        tids, values = self.reply_tids, self.reply_values
        self.reply_tids, self.reply_values = [], []
        if len(tids) == 1:
            # One reply (a round trip at a time): a REPLY frame, one pickle, no ids list.
            self.send_reply(tids[0], values[0], True)
            return
        try:
            data = dumps_shared(values, self.shared_memory)
        except Exception:
            good_tids, good_values = [], []
            for tid, value in zip(tids, values):
                try:
                    dumps(value)
                except Exception as exc:
                    self.channel.send(protocol.ERROR, tid, self.unpicklable(value, exc))
                else:
                    good_tids.append(tid)
                    good_values.append(value)
            tids, values = good_tids, good_values
            data = dumps_shared(good_values, self.shared_memory)
        if tids:
            try:
                self.channel.send_parts(protocol.REPLIES, len(tids), protocol.pack(tids, data))
            except ValueError:   # over the frame limit together: each on a frame of its own,
                # so that only a reply over the limit on its own fails
                for tid, value in zip(tids, values):
                    self.send_reply(tid, value, True)

    def put_result(self, result: Any) -> None:
        # A result that cannot be pickled raises to the caller.
        payload = dumps_shared(result, self.shared_memory)
        check_size(len(payload))   # so does one over the frame limit, even if it would wait
        self.hold_or_send(_origin.get(), payload)

    def send_result(self, result: Any) -> None:
        """Send a note's return value; one that cannot be pickled is logged."""
        try:
            payload = dumps_shared(result, self.shared_memory)
            check_size(len(payload))
        except Exception:
            log.exception('worker %d: could not send a result of type %s; it was dropped',
                          self.number, type(result).__qualname__)
            return
        self.hold_or_send(_origin.get(), payload)

    def hold_or_send(self, origin: int, payload: Any) -> None:
        """Send a result if the parent has room for it, else hold it here.

        At most this worker's share of ``max_results`` results wait for ``result_done()``
        in the parent. Past that, results wait in this process, and while any wait the
        worker frees no task slots, so the parent sends it no more work: backpressure from
        a slow ``process_message`` all the way to ``put_nowait``, and nothing is dropped.
        """
        if self.credit > 0 and not self.held:
            self.credit -= 1
            self.channel.send(protocol.RESULT, origin, payload)
        else:
            self.held.append((origin, payload))

    def credited(self, count: int) -> None:
        """The parent acknowledged ``count`` results: send what was held, then free the
        slots that waited for it."""
        self.credit += count
        held = self.held
        while held and self.credit > 0:
            self.credit -= 1
            origin, payload = held.popleft()
            self.channel.send(protocol.RESULT, origin, payload)
        if not held and self.deferred:
            self.freed += self.deferred
            self.deferred = 0
            self.channel.schedule_flush()
        if self.stopping:
            self.maybe_stop()


def _describe(exc: BaseException) -> str:
    return f'{type(exc).__qualname__}: {exc}'
