"""The blocking client of a pool host, safe to call from many threads."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..channel import FrameTooLarge, Parser, encode
from ..errors import ConnectionLost, LooppoolError, PoolClosed
from ..protocol import dumps, loads, pack
from .access import (Address, _check_address, _check_host, _ClientHandshake, _no_greeting,
                     _positive, _secret_bytes)
from .outbox import _BATCH
from .wire import (_MAX_MESSAGE, _MAX_TID, _PRE_AUTH_FRAME, _READ_SIZE, AUTH, C_BROADCAST,
                   C_CANCEL, C_CONTROL, C_CREDIT, C_NOTE, C_STATS, C_TASK, C_TASKS, H_ACK,
                   H_BROADCAST, H_ERROR, H_NOTICE, H_REPLIES, H_REPLY, H_RESEND, H_RESULT,
                   _broadcast_payload, _drop_result, _read_replies,
                   _read_resend, _resolve, _task_payload, _traced)

log = logging.getLogger('looppool.remote')


class SyncClient:
    """A blocking client of a pool host, safe to use from many threads at once.

    For synchronous web code (Flask or Django under gunicorn's sync workers, uWSGI,
    mod_wsgi). Any thread may call it; frames are written under a lock, and one reader
    thread per connection resolves the callers' futures and calls ``process_message``
    (so that function runs on the reader thread).
    """

    def __init__(self, address: Address, *, secret: str | bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 connect_timeout: float = 10.0,
                 ensure_host: Callable[[], bool] | None = None) -> None:
        self.address = address
        self._secret = _secret_bytes(secret)
        _check_address(address, self._secret, ssl_context)
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._connect_timeout = _positive('connect_timeout', connect_timeout)
        self._ensure_host = ensure_host
        self.created_new_pool = False
        self.pool_size: int | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._next_tid = 1
        self._room: threading.BoundedSemaphore | None = None
        self._share = 1
        self._generation = 0
        self._closed = False
        self._warned = False

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> Any:
        """Send ``message`` and wait for the reply (at most ``timeout`` seconds, then
        :class:`TimeoutError` and the task is cancelled in the worker)."""
        payload = _task_payload(message, worker_num)
        return self._call(C_TASK, payload, timeout)

    def map(self, messages: Iterable[Any]) -> Iterator[Any]:
        """Send every message of ``messages`` to the host's pool; yield the replies in order.

        ``for reply in client.map(messages): ...``: the messages travel to the host in
        frames of up to 1,024, the host hands each to the worker with room, and
        ``messages`` is read as room frees up (at most this client's share of the host's
        ``max_tasks`` out at once). An exception raised by a handler is raised here at
        that message's place, after the replies before it; the messages still out are
        cancelled, as they are when the loop is left early."""
        return self._map(iter(messages))

    def _map(self, messages: Iterator[Any]) -> Iterator[Any]:
        window: collections.deque[tuple[int, concurrent.futures.Future[Any]]] = \
            collections.deque()
        try:
            while True:
                sock, _ = self._connection()
                share = self._share
                chunk = list(itertools.islice(messages, min(_BATCH, share)))
                if not chunk:
                    break
                window.extend(self._send_batch(sock, chunk))
                while len(window) > share:
                    yield window.popleft()[1].result()
            while window:
                yield window.popleft()[1].result()
        finally:
            for tid, future in window:
                if not future.done() and self._sock is not None:
                    self._send(self._sock, C_CANCEL, tid, b'', quiet=True)

    def _send_batch(self, sock: socket.socket, messages: list[Any]
                    ) -> list[tuple[int, concurrent.futures.Future[Any]]]:
        """Send ``messages`` as one C_TASKS frame, once the share has room for them all
        (one by one if they cannot be pickled together: only a message at fault fails)."""
        room = self._room
        assert room is not None
        for _ in messages:
            while not room.acquire(timeout=0.5):
                if self._room is not room:   # the connection was lost meanwhile
                    raise ConnectionLost(f'the connection to the pool host at '
                                         f'{self.address!r} was lost; the next call '
                                         'connects again')
        traced = [_traced(message) for message in messages]
        sent = []
        with self._lock:
            for message in traced:
                tid = self._next_tid
                self._next_tid = tid % _MAX_TID + 1
                future: concurrent.futures.Future[Any] = concurrent.futures.Future()
                future.counted = True  # type: ignore[attr-defined]
                future.message = message  # type: ignore[attr-defined]
                self._futures[tid] = future
                sent.append((tid, future))
        try:
            data = dumps(traced)
            if len(data) > _MAX_MESSAGE:
                raise ValueError('too large together')
        except Exception:
            for tid, future in sent:
                self._send_alone(sock, tid, future)
            return sent
        self._send(sock, C_TASKS, len(sent),
                   b''.join(pack([tid for tid, _ in sent], data)))
        return sent

    def _send_alone(self, sock: socket.socket, tid: int,
                    future: concurrent.futures.Future[Any]) -> None:
        """A task of a batch, on its own; a message that cannot be sent fails alone."""
        try:
            payload = _task_payload(future.message, None, traced=True)  # type: ignore[attr-defined]
        except Exception as exc:
            with self._lock:
                self._futures.pop(tid, None)
            self._release()
            future.set_exception(exc)
            return
        self._send(sock, C_TASK, tid, payload, quiet=True)

    def broadcast(self, message: Any, *, timeout: float | None = None,
                  sticky: bool | str = False) -> list[Any]:
        """Send ``message`` to every worker; return their replies in worker order."""
        payload = _broadcast_payload(message, sticky)
        replies: list[Any] = self._call(C_BROADCAST, payload, timeout)
        return replies

    def put_nowait(self, message: Any, worker_num: int | None = None) -> None:
        """Send without a reply; :class:`queue.Full` when this client's share of
        unacknowledged messages is used up."""
        self._note(message, worker_num, block=False)

    def put(self, message: Any, worker_num: int | None = None) -> None:
        """Send without a reply, waiting for room."""
        self._note(message, worker_num, block=True)

    def stats(self) -> dict[str, Any]:
        """The host pool's stats, plus ``clients`` and ``host_pid``."""
        stats: dict[str, Any] = self._call(C_STATS, b'', None, counted=False)
        return stats

    def pause(self, timeout: float | None = None) -> str:
        """Pause the host's pool; returns its state once the pause is complete (raises
        :class:`TimeoutError` after ``timeout`` seconds, the pause going on)."""
        state: str = self._call(C_CONTROL, b'pause', timeout, counted=False)
        return state

    def resume(self, timeout: float | None = None) -> str:
        """Resume the host's pool; returns its state once every worker has resumed."""
        state: str = self._call(C_CONTROL, b'resume', timeout, counted=False)
        return state

    def restart(self, timeout: float | None = None) -> str:
        """Restart the host's workers, rolling; returns the pool's state once done."""
        state: str = self._call(C_CONTROL, b'restart', timeout, counted=False)
        return state

    def process_message(self, result: Any, result_done: Callable[[], None]) -> Any:
        """Receive one ``_put_nowait`` result (on the reader thread); assign your own."""
        _drop_result(self, result_done)

    def close(self) -> None:
        """Close the connection; calls in flight fail with :class:`ConnectionLost`."""
        self._closed = True
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            self._disconnect(sock, ConnectionLost('the client was closed'))

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _note(self, message: Any, worker_num: int | None, block: bool) -> None:
        payload = _task_payload(message, worker_num)
        sock, room = self._connection()
        if not room.acquire(blocking=block):
            raise queue.Full('this client\'s share of unacknowledged messages is used up')
        self._send(sock, C_NOTE, 0, payload)

    def _call(self, kind: int, payload: bytes, timeout: float | None,
              counted: bool = True) -> Any:
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        deadline = None if timeout is None else time.monotonic() + timeout
        sock, room = self._connection()
        if counted and not room.acquire(timeout=timeout if timeout is not None else -1):
            raise TimeoutError(f'no room to send within {timeout} s')
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.counted = counted  # type: ignore[attr-defined]
        with self._lock:
            tid = self._next_tid
            self._next_tid = tid % _MAX_TID + 1
            self._futures[tid] = future
        self._send(sock, kind, tid, payload)
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return future.result(remaining)
        except concurrent.futures.TimeoutError:
            with self._lock:
                pending = self._futures.get(tid) is future
            if pending:
                self._send(sock, C_CANCEL, tid, b'', quiet=True)
            raise TimeoutError(f'no reply from the pool host within {timeout} s; the task '
                               'was cancelled') from None

    def _send(self, sock: socket.socket, kind: int, arg: int, payload: bytes,
              quiet: bool = False) -> None:
        try:
            with self._lock:
                sock.sendall(encode(kind, arg, payload))
        except OSError as exc:
            self._disconnect(sock, ConnectionLost(
                f'the connection to the pool host at {self.address!r} was lost ({exc!r}); '
                'the next call connects again'))
            if not quiet:
                raise ConnectionLost(f'could not send to the pool host at {self.address!r}: '
                                     f'{exc!r}') from exc

    def _connection(self) -> tuple[socket.socket, threading.BoundedSemaphore]:
        if self._closed:
            raise PoolClosed('this client was closed')
        with self._lock:
            if self._sock is not None and self._room is not None:
                return self._sock, self._room
        if self._ensure_host is not None:
            self._ensure_host()
        with self._lock:
            if self._sock is None:
                self._sock, share = self._handshake()
                self._room = threading.BoundedSemaphore(share)
                self._share = share
                self._generation += 1
                reader = threading.Thread(target=self._read, args=(self._sock,),
                                          name='looppool-client-reader', daemon=True)
                reader.start()
            assert self._room is not None
            return self._sock, self._room

    def _handshake(self) -> tuple[socket.socket, int]:
        address = self.address
        sock: socket.socket | None = None
        try:
            if isinstance(address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._connect_timeout)
                sock.connect(address)
                _check_host(sock, address)
            else:
                sock = socket.create_connection(address, self._connect_timeout)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(
                    sock, server_hostname=self._server_hostname or (
                        address[0] if isinstance(address, tuple) else None))
            handshake = _ClientHandshake(self._secret, address)
            frames = _frames(sock)
            sock.sendall(encode(AUTH, 0, handshake.answer_hello(*next(frames))))
            pool_size, share = handshake.check_welcome(*next(frames))
            sock.settimeout(None)
        except BaseException as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, LooppoolError):
                raise
            if isinstance(exc, TimeoutError):
                raise ConnectionLost(_no_greeting(address, self._connect_timeout,
                                                  self._ssl)) from exc
            if isinstance(exc, (OSError, FrameTooLarge)):
                raise ConnectionLost(f'could not connect to the pool host at {address!r}: '
                                     f'{exc!r}') from exc
            raise
        self.pool_size = pool_size
        return sock, share

    def _read(self, sock: socket.socket) -> None:
        parser = Parser(grow=True)
        error: BaseException = ConnectionLost(
            f'the pool host at {self.address!r} closed the connection; the next call '
            'connects again')
        # One buffer for the connection's life, as _Framed keeps: the frames of a read are
        # views of it, handled before the next read.
        buffer = memoryview(bytearray(_READ_SIZE))
        try:
            while True:
                count = sock.recv_into(buffer)
                if not count:
                    break
                for kind, arg, payload in parser.feed(buffer[:count]):
                    self._on_frame(sock, kind, arg, payload)
        except ConnectionLost as exc:
            error = exc
        except OSError as exc:
            error = ConnectionLost(f'the connection to the pool host at {self.address!r} '
                                   f'was lost ({exc!r}); the next call connects again')
        self._disconnect(sock, error)

    def _on_frame(self, sock: socket.socket, kind: int, arg: int, payload: Any) -> None:
        if kind == H_ACK:
            for _ in range(arg):
                self._release()
            return
        if kind == H_RESULT:
            try:
                result = loads(payload)
            except BaseException:
                log.exception('a result from the pool host could not be unpickled')
                return
            try:
                self.process_message(
                    result, lambda: self._send(sock, C_CREDIT, 1, b'', quiet=True))
            except Exception:
                log.exception('process_message raised')
            return
        if kind == H_NOTICE:
            log.warning('the pool host at %r: %s', self.address,
                        bytes(payload).decode(errors='replace'))
            return
        if kind == H_REPLIES:
            self._on_replies(payload)
            return
        if kind == H_RESEND:
            try:
                ids = _read_resend(arg, payload)
            except ValueError as exc:
                raise ConnectionLost(f'the pool host at {self.address!r}: {exc}') from None
            for tid in ids:
                with self._lock:
                    future = self._futures.get(tid)
                if future is not None:
                    self._send_alone(sock, tid, future)
            return
        if kind not in (H_REPLY, H_ERROR, H_BROADCAST):
            raise ConnectionLost(f'the pool host at {self.address!r} sent a frame of kind '
                                 f'{kind} after the handshake; the connection is closed')
        with self._lock:
            future = self._futures.pop(arg, None)
        if future is None:
            return
        if future.counted:  # type: ignore[attr-defined]
            self._release()
        _resolve(future, kind, payload)

    def _on_replies(self, payload: Any) -> None:
        ids, values = _read_replies(payload)
        with self._lock:
            futures = [self._futures.pop(tid, None) for tid in ids]
        for index, future in enumerate(futures):
            if future is None:
                continue
            if future.counted:  # type: ignore[attr-defined]
                self._release()
            if isinstance(values, BaseException):
                future.set_exception(values)
            else:
                future.set_result(values[index])

    def _release(self) -> None:
        room = self._room
        if room is not None:
            try:
                room.release()
            except ValueError:  # pragma: no cover - more acks than sends
                pass

    def _disconnect(self, sock: socket.socket, error: BaseException) -> None:
        with self._lock:
            if self._sock is sock:
                self._sock = None
                self._room = None
            futures = list(self._futures.values())
            self._futures.clear()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        for future in futures:
            if not future.done():
                future.set_exception(error)


def _frames(sock: socket.socket) -> Iterator[tuple[int, int, Any]]:
    """The handshake's frames, one at a time, as they arrive (at most _PRE_AUTH_FRAME
    bytes each)."""
    parser = Parser(_PRE_AUTH_FRAME)
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionLost('the pool host closed the connection during the '
                                 'handshake') from EOFError()
        yield from parser.feed(data)


def connect_sync(address: Address, *, secret: str | bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None,
                 connect_timeout: float = 10.0) -> SyncClient:
    """A :class:`SyncClient` of the pool host at ``address`` (it connects on first use).

    The address rules, the handshake and ``connect_timeout`` are those of
    :func:`~looppool.remote.connect`.
    """
    return SyncClient(address, secret=secret, ssl_context=ssl_context,
                      server_hostname=server_hostname, connect_timeout=connect_timeout)

