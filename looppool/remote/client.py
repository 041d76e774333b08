"""The asynchronous client of a pool host, on the caller's asyncio loop."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import queue
import ssl
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from typing import Any

from .. import tracing
from ..channel import _MAX_PAYLOAD
from ..errors import AuthenticationError, ConnectionLost, LooppoolError, PoolClosed
from ..mapping import MapResult
from ..protocol import loads
from ..tracing import ENABLED as TRACING
from ..tracing import current_context
from .access import (Address, _check_address, _check_host, _ClientHandshake, _no_greeting,
                     _positive, _secret_bytes)
from .outbox import _BATCH, _Outbox
from .wire import (_MAX_TID, AUTH, C_BROADCAST, C_CANCEL, C_CONTROL, C_CREDIT, C_NOTE, C_STATS,
                   C_TASK, H_ACK, H_BROADCAST, H_ERROR, H_NOTICE, H_REPLIES, H_REPLY, H_RESEND,
                   H_RESULT, _broadcast_payload, _drop_result, _Framed, _read_replies,
                   _resolve, _task_payload)

log = logging.getLogger('looppool.remote')




class _ClientFuture(asyncio.Future[Any]):
    # Each client makes a subclass whose _lp_client is the client; a timer, rarely set,
    # goes in the instance's dict (as for the pool's own futures: looppool.tasks).
    __slots__ = ('_lp_tid', '_lp_message')
    _lp_client: Client
    _lp_tid: int
    _lp_timer: asyncio.TimerHandle | None = None
    _lp_message: Any    # a submit() for any worker: pickled with its batch

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._lp_client._abandon(self)
        return True


class _ClientConnection(_Framed):
    """One connection of a :class:`Client`: the handshake, then the host's frames.

    Until the host is proved (its uid on a Unix socket, its proof of the secret on TCP), only
    the handshake is read; any other frame ends the connection unread.
    """

    def __init__(self, client: Client) -> None:
        loop = client._get_loop()
        super().__init__(loop)
        self.client = client
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.handshake = _ClientHandshake(client._secret, client.address)
        self.greeted = False
        self.error: BaseException | None = None
        self.fd = -1             # read by read_now(); -1 under TLS (the transport decrypts)
        self.handling = False    # in on_frames: a burst from process_message reads nothing
        self.catching_up = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info('socket')
        if sock is not None and transport.get_extra_info('sslcontext') is None:
            self.fd = sock.fileno()
        try:
            _check_host(sock, self.client.address)
        except AuthenticationError as exc:
            self.fail(exc)

    def read_now(self) -> None:
        """Take in what the host has sent so far, during a long burst of ``submit()``
        calls (the loop reads nothing until the caller awaits): its replies free the
        client's share, so the rest of the burst leaves at once and the host's workers
        keep busy. What would call application code (a ``_put_nowait`` result, a notice)
        waits for the next loop iteration, in order. Not under TLS, and not while this
        connection's frames are being handled (a burst from ``process_message``): those
        bytes would be taken in out of order."""
        if self.fd < 0 or self.handling or self.closed or not self.ready.done():
            return
        self.catching_up = True
        try:
            buffer = self.get_buffer(-1)   # (free: these frames are not being handled)
            for _ in range(8):
                try:
                    count = os.readv(self.fd, [buffer])
                except OSError:   # nothing more for now (or an error the transport sees)
                    return
                if not count:
                    return   # the end: the transport sees it too, on its next read
                self.buffer_updated(count)
        finally:
            self.catching_up = False

    def refuse(self, reason: str) -> None:
        self.fail(ConnectionLost(f'the pool host at {self.client.address!r} sent something '
                                 f'unexpected: {reason}'))

    def fail(self, error: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
        else:
            self.error = error   # what the calls in flight fail with (see connection_lost)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionLost(
                f'the pool host at {self.client.address!r} closed the connection during '
                'the handshake'))
        self.client._connection_lost(self, exc)

    def on_frames(self, frames: list[tuple[int, int, Any]]) -> None:
        self.handling = True
        try:
            self.on_frames_in_order(frames)
        finally:
            self.handling = False

    def on_frames_in_order(self, frames: list[tuple[int, int, Any]]) -> None:
        client = self.client
        for kind, arg, payload in frames:
            if self.closed:
                return   # failed on an earlier frame of this read: read nothing after it
            if not self.ready.done():
                self.authenticate(kind, arg, payload)
            elif kind == H_REPLIES:
                client._answers(payload)
            elif kind == H_RESEND:
                client._resend(arg, payload)
            elif kind == H_REPLY or kind == H_ERROR or kind == H_BROADCAST:
                client._answer(kind, arg, payload)
            elif kind == H_ACK:
                client._acknowledged(arg)
            elif kind == H_RESULT:
                if self.catching_up:
                    self.loop.call_soon(client._result, bytes(payload))
                else:
                    client._result(payload)
            elif kind == H_NOTICE:
                self.loop.call_soon(log.warning, 'the pool host at %r: %s', client.address,
                                    bytes(payload).decode(errors='replace'))
            else:
                self.refuse(f'a frame of kind {kind} after the handshake')

    def authenticate(self, kind: int, arg: int, payload: Any) -> None:
        try:
            if not self.greeted:
                self.send(AUTH, 0, self.handshake.answer_hello(kind, arg, payload))
                self.greeted = True
                return
            pool_size, share = self.handshake.check_welcome(kind, arg, payload)
        except LooppoolError as exc:
            self.fail(exc)
            return
        self.parser.max_frame = _MAX_PAYLOAD
        self.client.pool_size = pool_size
        self.client._share = share
        self.ready.set_result(None)


class Client(_Outbox):
    """A pool host's client, with the Pool's interface, on this process's asyncio loop.

    Made by :func:`connect` or :func:`shared`; it connects on first use (or in ``async
    with``) and again on the first call after a lost connection. Not thread-safe: use it
    from the loop it was first used on.

    ``process_message`` receives the results workers send with ``_put_nowait`` while
    handling this client's messages, exactly as :attr:`Pool.process_message
    <looppool.Pool.process_message>` does locally. ``created_new_pool`` says whether
    :func:`shared` started the host.
    """

    def __init__(self, address: Address, *, secret: str | bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 10.0,
                 ensure_host: Callable[[], bool] | None = None) -> None:
        self.address = address
        self._secret = _secret_bytes(secret)
        _check_address(address, self._secret, ssl_context)
        self._connect_timeout = _positive('connect_timeout', connect_timeout)
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._ensure_host = ensure_host
        self.created_new_pool = False
        self.pool_size: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._uncounted: set[int] = set()   # the ids of calls that take no share (stats)
        self._next_tid = 1
        self._share = 4096
        self._unacked = 0
        self._notes_unacked = 0
        # What waits to be sent, in order: (kind, task id, payload, future or None), or a
        # list of submit()s' own futures (for any worker: their messages are pickled
        # together); _group is that list while submit()s may still join it.
        self._outbox: collections.deque[tuple[int, int, bytes, Any] | list[_ClientFuture]] = \
            collections.deque()
        self._group: list[_ClientFuture] | None = None
        self._gave_up = False   # a future waiting in a group was cancelled or timed out
        self._pump_due = False   # a call of _pump_soon is scheduled
        self._future_class: type[_ClientFuture] = type(
            '_ClientFuture', (_ClientFuture,), {'__slots__': (), '_lp_client': self,
                                                '__module__': _ClientFuture.__module__})
        self._closed = False
        self._warned = False

    # -- the Pool's interface --------------------------------------------------------------

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> asyncio.Future[Any]:
        """Send ``message`` to the host's pool; resolves to the worker's reply. Waits for
        room when this client's share of unacknowledged messages is used up.

        The messages submitted in one loop iteration travel to the host pickled together,
        as one frame: a message that cannot be pickled fails its own future with the
        pickling error, and the others go through."""
        if worker_num is not None:
            payload = _task_payload(message, worker_num)
            future = self._new_future(timeout)
            self._queue(C_TASK, future._lp_tid, payload, future)
            return future
        if timeout is None and self._loop is not None and not self._closed:
            # The path of every message of a burst, kept short.
            tid = self._next_tid
            self._next_tid = tid % _MAX_TID + 1
            future = self._future_class(loop=self._loop)
            future._lp_tid = tid
        else:
            future = self._new_future(timeout)
            tid = future._lp_tid
        future._lp_message = (tracing.outgoing(message) if TRACING and current_context()
                              else message)
        self._futures[tid] = future
        group = self._group
        if group is None:
            group = self._group = []
            self._outbox.append(group)
        group.append(future)
        waiting = len(group)
        if waiting == 1 and not self._unacked and len(self._outbox) == 1 \
                and not self._pump_due:
            # Nothing in flight: nothing to coalesce with, so it goes now (latency).
            self._pump_soon()
        elif waiting >= _BATCH and not waiting & 255:
            # A long burst: the replies that came meanwhile make room for more of it.
            connection = self._connection
            if connection is not None:
                connection.read_now()
                self._pump()
                connection.flush()   # now: the host starts on it while the caller goes on
        elif not self._pump_due:
            self._pump_due = True
            self._get_loop().call_soon(self._pump_soon)
        return future

    def map(self, messages: Iterable[Any] | AsyncIterable[Any]) -> MapResult:
        """Send every message of ``messages`` to the host's pool; yield the replies in order.

        ``async for reply in client.map(messages): ...`` (or ``await client.map(messages)``
        for the list of the replies), as :meth:`Pool.map <looppool.Pool.map>`: the
        messages travel to the host in frames of up to 1,024 (those of one loop iteration
        together), the host hands each to the worker with room, and the iterable (or async
        iterable) is read as replies come, so at most this client's share of the host's
        ``max_tasks`` is out at once. An exception
        raised by a handler is raised here at that message's place, after the replies
        before it; the messages still out are cancelled, as they are when the loop over
        ``map()`` is left early."""
        return MapResult(functools.partial(self._map, messages))

    async def _map(self, messages: Iterable[Any] | AsyncIterable[Any]
                   ) -> AsyncGenerator[Any, None]:
        window: collections.deque[asyncio.Future[Any]] = collections.deque()
        try:
            if isinstance(messages, AsyncIterable):
                async for message in messages:
                    window.append(self.submit(message))
                    if len(window) >= self._share:
                        yield await window.popleft()
            else:
                for message in messages:
                    window.append(self.submit(message))
                    if len(window) >= self._share:
                        yield await window.popleft()
            while window:
                yield await window.popleft()
        finally:
            for future in window:
                future.cancel()

    def broadcast(self, message: Any, *, timeout: float | None = None,
                  sticky: bool | str = False) -> asyncio.Future[list[Any]]:
        """Send ``message`` to every worker of the host's pool; resolves to their replies
        in worker order (``sticky`` as :meth:`Pool.broadcast <looppool.Pool.broadcast>`)."""
        payload = _broadcast_payload(message, sticky)
        future = self._new_future(timeout)
        self._queue(C_BROADCAST, future._lp_tid, payload, future)
        return future

    def put_nowait(self, message: Any, worker_num: int | None = None) -> None:
        """Send without a reply; raises :class:`queue.Full` when this client's share of
        unacknowledged messages is used up."""
        payload = _task_payload(message, worker_num)
        self._check_open()
        waiting = sum(len(item) if isinstance(item, list) else 1 for item in self._outbox)
        if self._unacked + waiting >= self._share:
            raise queue.Full(f'{self._share} messages from this client are not yet '
                             'acknowledged by the pool host')
        self._queue(C_NOTE, 0, payload, None)

    def put(self, message: Any, worker_num: int | None = None) -> asyncio.Future[None]:
        """Send without a reply, waiting for room instead of raising ``queue.Full``; the
        future resolves once the message is queued for the host."""
        payload = _task_payload(message, worker_num)
        self._check_open()
        future: asyncio.Future[None] = self._get_loop().create_future()
        self._queue(C_NOTE, 0, payload, future)
        return future

    async def stats(self) -> dict[str, Any]:
        """The host pool's :meth:`Pool.stats <looppool.Pool.stats>`, plus ``clients`` and
        ``host_pid``."""
        future = self._new_future(None)
        self._queue(C_STATS, future._lp_tid, b'', future, counted=False)
        stats: dict[str, Any] = await future
        return stats

    async def pause(self) -> str:
        """Pause the host's pool (:meth:`Pool.pause <looppool.Pool.pause>`); returns its
        state once the pause is complete."""
        return await self._control(b'pause')

    async def resume(self) -> str:
        """Resume the host's pool; returns its state once every worker has resumed."""
        return await self._control(b'resume')

    async def restart(self) -> str:
        """Restart the host's workers, rolling (:meth:`Pool.restart
        <looppool.Pool.restart>`); returns the pool's state once done."""
        return await self._control(b'restart')

    async def _control(self, command: bytes) -> str:
        future = self._new_future(None)
        self._queue(C_CONTROL, future._lp_tid, command, future, counted=False)
        state: str = await future
        return state

    def process_message(self, result: Any, result_done: Callable[[], None]) -> Any:
        """Receive one ``_put_nowait`` result; assign your own. This default drops it."""
        _drop_result(self, result_done)

    async def connect(self) -> Client:
        """Connect now (a call connects by itself; this surfaces errors early)."""
        self._check_open()
        await self._connected()
        return self

    async def close(self) -> None:
        """Close the connection; calls still in flight fail with :class:`ConnectionLost`.

        Returns once the connection is gone (a TLS connection's closing handshake included,
        at most 5 s, after which it is aborted)."""
        self._closed = True
        connection = self._connection
        self._fail_all(ConnectionLost('the client was closed'))
        if connection is not None and connection.transport is not None:
            connection.close()
            try:
                await asyncio.wait_for(asyncio.shield(connection.lost), 5)
            except asyncio.TimeoutError:
                connection.transport.abort()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------------

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed('this client was closed')

    def _new_future(self, timeout: float | None) -> _ClientFuture:
        self._check_open()
        loop = self._get_loop()
        tid = self._next_tid
        self._next_tid = tid % _MAX_TID + 1
        future = self._future_class(loop=loop)
        future._lp_tid = tid
        if timeout is not None:
            if not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(f'timeout must be a positive number of seconds, got '
                                 f'{timeout!r}')
            future._lp_timer = loop.call_later(timeout, self._expire, future, timeout)
        return future

    def _start_connecting(self) -> None:
        if self._connecting is None or self._connecting.done():
            task = self._get_loop().create_task(self._connect())
            # A failure also reaches every waiting future; only connect() re-raises it.
            task.add_done_callback(_retrieve)
            self._connecting = task

    async def _connected(self) -> None:
        connection = self._connection
        if connection is not None and not connection.closed and connection.ready.done():
            return
        self._start_connecting()
        assert self._connecting is not None
        await asyncio.shield(self._connecting)

    async def _connect(self) -> None:
        loop = self._get_loop()
        try:
            if self._ensure_host is not None:
                # Starting a host blocks (a lock, a process start): keep it off the loop.
                await loop.run_in_executor(None, self._ensure_host)
            connection = _ClientConnection(self)
            try:
                await asyncio.wait_for(self._open(connection), self._connect_timeout)
            except asyncio.TimeoutError:
                if connection.transport is not None:
                    connection.transport.abort()
                raise ConnectionLost(_no_greeting(self.address, self._connect_timeout,
                                                  self._ssl)) from None
        except BaseException as exc:
            error = exc if isinstance(exc, LooppoolError) else ConnectionLost(
                f'could not connect to the pool host at {self.address!r}: {exc!r}')
            self._fail_all(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise error from (exc if error is not exc else None)
        self._unacked = 0
        self._notes_unacked = 0
        self._pump()

    async def _open(self, connection: _ClientConnection) -> None:
        loop = self._get_loop()
        if isinstance(self.address, str):
            await loop.create_unix_connection(lambda: connection, self.address,
                                              ssl=self._ssl,
                                              server_hostname=self._server_hostname)
        else:
            await loop.create_connection(
                lambda: connection, self.address[0], self.address[1], ssl=self._ssl,
                server_hostname=(self._server_hostname or self.address[0])
                if self._ssl else None)
        self._connection = connection
        await connection.ready

    # -- answers ---------------------------------------------------------------------------

    def _answer(self, kind: int, tid: int, payload: Any) -> None:
        if self._uncounted and tid in self._uncounted:
            self._uncounted.discard(tid)   # a stats() call takes no share
        else:
            self._unacked -= 1
        future = self._futures.pop(tid, None)
        if future is not None and not future.done():
            timer = future._lp_timer  # type: ignore[attr-defined]
            if timer is not None:
                timer.cancel()
            _resolve(future, kind, payload)
        self._pump()

    def _answers(self, payload: Any) -> None:
        """An H_REPLIES frame: replies to tasks sent for any worker."""
        ids, values = _read_replies(payload)
        futures = self._futures
        self._unacked -= len(ids)
        if isinstance(values, BaseException):
            for tid in ids:
                future = futures.pop(tid, None)
                if future is not None and not future.done():
                    future.set_exception(values)
        else:
            for tid, value in zip(ids, values):
                future = futures.pop(tid, None)
                if future is None or future.done():
                    continue
                timer = future._lp_timer  # type: ignore[attr-defined]
                if timer is not None:
                    timer.cancel()
                future.set_result(value)
        self._pump()

    def _acknowledged(self, count: int) -> None:
        self._unacked -= count
        self._notes_unacked -= count
        self._pump()

    def _result(self, payload: Any) -> None:
        connection = self._connection
        try:
            result = loads(payload)
        except BaseException as exc:
            log.error('a result from the pool host could not be unpickled: %r', exc)
            self._result_done(connection)
            return
        outcome = self.process_message(result, lambda: self._result_done(connection))
        if outcome is not None and asyncio.iscoroutine(outcome):
            self._get_loop().create_task(outcome)

    def _result_done(self, connection: _ClientConnection | None) -> None:
        if connection is not None and connection is self._connection and not connection.closed:
            connection.send(C_CREDIT, 1)

    def _expire(self, future: _ClientFuture, timeout: float) -> None:
        future._lp_timer = None
        if not future.done():
            future.set_exception(TimeoutError(
                f'no reply from the pool host within {timeout} s; the task was cancelled'))
            self._abandon(future)

    def _abandon(self, future: _ClientFuture) -> None:
        self._gave_up = True   # (it may wait in the outbox: see _send_tasks)
        if future._lp_timer is not None:
            future._lp_timer.cancel()
        connection = self._connection
        if future._lp_tid in self._futures and connection is not None and not connection.closed:
            connection.send(C_CANCEL, future._lp_tid)

    def _connection_lost(self, connection: _ClientConnection, exc: Exception | None) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        ready = connection.ready
        if ready.done() and ready.exception() is not None:   # the handshake failed: say why
            self._fail_all(ready.exception())   # type: ignore[arg-type]
            return
        if connection.error is not None:   # the host sent something this client refused
            self._fail_all(connection.error)
            return
        self._fail_all(ConnectionLost(
            f'the connection to the pool host at {self.address!r} was lost '
            f'({exc!r}); the next call connects again' if exc else
            f'the pool host at {self.address!r} closed the connection; the next call '
            'connects again'))

    def _fail_all(self, error: BaseException) -> None:
        futures = dict.fromkeys(self._futures.values())
        self._futures.clear()
        self._group = None
        for item in self._outbox:
            if isinstance(item, list):
                futures.update(dict.fromkeys(item))
            elif item[3] is not None:
                futures[item[3]] = None
        self._outbox.clear()
        self._uncounted.clear()
        self._unacked = 0
        self._notes_unacked = 0
        for future in futures:
            if not future.done():
                timer = getattr(future, '_lp_timer', None)
                if timer is not None:
                    timer.cancel()
                future.set_exception(error)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def connect(address: Address, *, secret: str | bytes | None = None,
            ssl_context: ssl.SSLContext | None = None,
            server_hostname: str | None = None, connect_timeout: float = 10.0) -> Client:
    """A :class:`Client` of the pool host at ``address`` (it connects on first use).

    The rules of :func:`~looppool.remote.serve` apply here too: a TCP address needs the
    ``secret``, and one that is not a loopback address needs TLS (``ssl_context``), or
    :class:`ValueError` is raised. A connection whose handshake is not done within
    ``connect_timeout`` seconds fails with :class:`ConnectionLost`.
    """
    return Client(address, secret=secret, ssl_context=ssl_context,
                  server_hostname=server_hostname, connect_timeout=connect_timeout)

