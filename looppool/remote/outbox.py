"""The sending half of the asynchronous client (:class:`looppool.remote.client.Client`):
what waits to be sent, in order, and the client's share of unacknowledged messages.

A ``submit()`` for any worker waits as its own future (its message pickled with the others
of its loop iteration into one C_TASKS frame); every other call as a tuple ``(kind, task
id, payload, future or None)``. Lives on the client's loop; not thread-safe.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from ..protocol import dumps
from .wire import (_MAX_MESSAGE, C_CONTROL, C_NOTE, C_STATS, C_TASK, C_TASKS, _read_resend,
                   _task_payload)

if TYPE_CHECKING:
    import asyncio

    from .client import _ClientConnection, _ClientFuture

# Calls that take none of the client's share of unacknowledged messages.
_UNCOUNTED = frozenset((C_STATS, C_CONTROL))
# The most tasks in one C_TASKS frame, and the most a burst of submit() calls leaves
# waiting before they are written (the host starts on them while the caller goes on).
_BATCH = 1024


class _Outbox:
    """Mixed into Client: sends what waits, as the share allows."""

    _connection: _ClientConnection | None
    _outbox: collections.deque[tuple[int, int, bytes, Any] | list[_ClientFuture]]
    _group: list[_ClientFuture] | None
    _gave_up: bool
    _futures: dict[int, asyncio.Future[Any]]
    _uncounted: set[int]
    _unacked: int
    _notes_unacked: int
    _share: int
    _pump_due: bool

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        raise NotImplementedError

    def _start_connecting(self) -> None:
        raise NotImplementedError

    def _queue(self, kind: int, tid: int, payload: bytes, future: Any,
               counted: bool = True) -> None:
        self._get_loop()
        if future is not None and kind != C_NOTE:
            self._futures[tid] = future
        if not counted:
            self._uncounted.add(tid)
        self._group = None   # submit()s after this one go after it
        self._outbox.append((kind, tid, payload, future))
        connection = self._connection
        if connection is None or connection.closed or not connection.ready.done():
            self._start_connecting()
        else:
            self._pump()

    def _pump_soon(self) -> None:
        """Send what waits, and write it now (this runs at the end of a loop iteration, or
        for a call that has nothing to wait for)."""
        self._pump_due = False
        connection = self._connection
        if connection is None or connection.closed or not connection.ready.done():
            self._start_connecting()
        else:
            self._pump()
            connection.flush()

    def _pump(self) -> None:
        """Send what the share allows, in order."""
        connection = self._connection
        if connection is None or connection.closed or not connection.ready.done():
            return
        outbox = self._outbox
        while outbox:
            item = outbox[0]
            if isinstance(item, list):
                if self._unacked >= self._share:
                    break
                self._send_tasks(connection, item)
                continue
            if self._unacked >= self._share and item[0] not in _UNCOUNTED:
                break
            outbox.popleft()
            kind, tid, payload, future = item
            if future is not None and future.done():
                self._futures.pop(tid, None)   # the caller gave up on it before it left
                continue
            if kind not in _UNCOUNTED:
                self._unacked += 1
            if kind == C_NOTE:
                self._notes_unacked += 1
                if future is not None:
                    future.set_result(None)
            connection.send(kind, tid, payload)

    def _send_tasks(self, connection: _ClientConnection, group: list[_ClientFuture]) -> None:
        """Send the submit()s of ``group``, the head of the outbox, as many as the share
        allows, as one C_TASKS frame."""
        room = min(self._share - self._unacked, _BATCH)
        batch = group[:room]
        del group[:room]
        if not group:
            self._outbox.popleft()
            if group is self._group:
                self._group = None
        if self._gave_up:   # a caller gave up on one before it left: leave it out
            self._gave_up = bool(self._outbox)
            for future in batch:
                if future.done():
                    self._futures.pop(future._lp_tid, None)
            batch = [future for future in batch if not future.done()]
            if not batch:
                return
        try:
            data = dumps([future._lp_message for future in batch])
            if len(data) > _MAX_MESSAGE:
                raise ValueError('too large together')
        except Exception:
            # One of them cannot be pickled, or they are too large together: one by one,
            # so that only a message at fault fails.
            self._unacked += len(batch)
            for future in batch:
                self._send_alone(connection, future)
            return
        self._unacked += len(batch)
        connection.send_batch(C_TASKS, [future._lp_tid for future in batch], data)

    def _send_alone(self, connection: _ClientConnection, future: _ClientFuture) -> None:
        """Send a submit() for any worker on its own (counted already as sent); a message
        that cannot be sent fails its own future."""
        try:
            payload = _task_payload(future._lp_message, None, traced=True)
        except Exception as exc:
            self._unacked -= 1
            self._futures.pop(future._lp_tid, None)
            if future._lp_timer is not None:
                future._lp_timer.cancel()
            future.set_exception(exc)
            return
        connection.send(C_TASK, future._lp_tid, payload)

    def _resend(self, count: int, payload: Any) -> None:
        """The host could not unpickle a batch: its tasks go again one by one."""
        connection = self._connection
        assert connection is not None
        try:
            ids = _read_resend(count, payload)
        except ValueError as exc:
            connection.refuse(str(exc))
            return
        futures = self._futures
        for tid in ids:
            future = futures.get(tid)
            if future is None or future.done():   # the caller gave up on it meanwhile
                futures.pop(tid, None)
                self._unacked -= 1
            else:
                self._send_alone(connection, future)  # type: ignore[arg-type]
        self._pump()
