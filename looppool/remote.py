"""One pool for many processes: :func:`serve`, :func:`connect`, :func:`connect_sync`,
:func:`shared`.

::

    web process 1 --+
    web process 2 --+--- Unix socket (mode 0600, peer uid checked) ---> host process
    web process N --+    or TCP (HMAC secret, optional TLS)            Pool -> workers

The host is an ordinary :class:`~looppool.Pool` in a process of its own, plus a server.
Each client connection is a *session*. A client's message crosses twice: client -> host
(the same 13-byte frames as the local channel, over an asyncio transport so TLS works),
then host -> worker unchanged: the host never unpickles messages or replies, it forwards
their bytes. The host gives each task the id ``session << 32 | client task id``, so a
result a worker sends with ``_put_nowait`` while handling it (its *origin*) finds its way
back to that session's ``process_message`` without a routing table.

Security: messages are pickles, and unpickling runs code. Only trusted peers may connect.
A Unix socket lives in a directory only its owner can enter, is created with mode 0600,
and on Linux the host checks each peer's uid (``SO_PEERCRED``). A TCP address needs a
``secret``: host and client prove knowledge of it with HMAC-SHA256 over fresh nonces,
compared in constant time, before either side reads a pickle. A non-loopback TCP address
also needs TLS (``ssl_context``).

Who owns what: in the host, the :class:`_Host` owns the pool, the server and the sessions;
a :class:`_Session` owns its transport and the tasks its client sent. In a client process,
:class:`Client` owns its connection and futures (one loop, not thread-safe);
:class:`SyncClient` owns a socket, written under a lock by any thread and read by one
reader thread it starts, which resolves the callers' futures.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fcntl
import hashlib
import hmac
import ipaddress
import logging
import multiprocessing
import multiprocessing.spawn
import os
import pickle
import queue
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Union

from . import protocol
from .channel import HEADER, FrameTooLarge, Parser, encode
from .errors import LooppoolError, PoolClosed, RemoteTraceback
from .pool import Pool, _disown, _parent_fds, _RawFuture
from .protocol import dumps, loads
from .worker import Worker

__all__ = ['serve', 'connect', 'connect_sync', 'shared', 'default_address', 'HostHandle',
           'Client', 'SyncClient', 'ConnectionLost', 'AuthenticationError']

log = logging.getLogger('looppool.remote')

Address = Union[str, tuple[str, int]]

VERSION = 1
# client -> host
AUTH, C_TASK, C_NOTE, C_BROADCAST, C_CANCEL, C_CREDIT, C_STATS = range(40, 47)
# host -> client
HELLO, WELCOME, REFUSED, H_REPLY, H_ERROR, H_ACK, H_RESULT, H_BROADCAST = range(60, 68)

_NONCE = 32
_OPTS = struct.Struct('<h')     # worker_num (-1: any); for a broadcast, sticky: 0, 1, 2=named
_KEY = struct.Struct('<H')      # a broadcast's sticky name (UTF-8) follows its size
_PRE_AUTH_FRAME = 256           # nothing bigger is read before the peer is authenticated
_SESSION_SHIFT = 32
_FIRST_CLIENT_GRACE = 10.0


class ConnectionLost(LooppoolError):
    """The connection to a pool host broke; the calls in flight on it failed with this.

    The next call connects again (and, for a client made by :func:`shared`, starts a new
    host if none is running).
    """


class AuthenticationError(LooppoolError):
    """The pool host refused this client (wrong or missing secret, or a foreign uid), the
    host failed to prove it knows the secret, or the client refused a host on a Unix
    socket that runs as another user."""


# -- addresses and access ----------------------------------------------------------------------

def default_address(worker_class: type[Worker]) -> str:
    """The Unix socket path :func:`serve` and :func:`shared` use when given no address:
    ``$XDG_RUNTIME_DIR/looppool-<uid>/<module>.<class>.sock`` (or under the temporary
    directory), in a directory only this user can enter."""
    base = os.environ.get('XDG_RUNTIME_DIR') or tempfile.gettempdir()
    directory = os.path.join(base, f'looppool-{os.getuid()}')
    name = f'{worker_class.__module__}.{worker_class.__qualname__}'
    name = ''.join(c if c.isalnum() or c in '._-' else '_' for c in name)
    path = os.path.join(directory, name + '.sock')
    if len(path.encode()) > 100:  # sun_path holds 108 bytes
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        path = os.path.join(directory, f'{name[:40]}-{digest}.sock')
    return path


def _private_directory(path: str) -> None:
    """Create the socket's directory with mode 0700, or check that an existing one is ours
    and closed to others."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.stat(directory)
    if info.st_uid != os.getuid():
        raise PermissionError(f'{directory} belongs to uid {info.st_uid}, not to this user '
                              f'({os.getuid()}); choose another address')
    if info.st_mode & 0o022 and not info.st_mode & 0o1000:
        raise PermissionError(f'{directory} is writable by other users; other users could '
                              'replace the socket. Use a directory only you can write to')


def _check_address(address: Address, secret: bytes | None, ssl_context: Any) -> None:
    if isinstance(address, str):
        return
    if not (isinstance(address, tuple) and len(address) == 2
            and isinstance(address[0], str) and isinstance(address[1], int)):
        raise TypeError(f'address must be a Unix socket path or a (host, port) tuple, got '
                        f'{address!r}')
    if secret is None:
        raise ValueError('a TCP address needs a secret: anyone who can connect could '
                         'otherwise send pickles, which run code in the host')
    if ssl_context is None and not _is_loopback(address[0]):
        raise ValueError(f'refusing to serve {address[0]!r} without TLS: pass ssl_context, '
                         'or bind a loopback address')


def _is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or not secret:
        raise ValueError('secret must be a non-empty str or bytes')
    return secret


def _mac(secret: bytes, nonce: bytes, role: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _peer_uid(sock: socket.socket) -> int | None:
    if not hasattr(socket, 'SO_PEERCRED') or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize('3i'))
    uid: int = struct.unpack('3i', creds)[1]
    return uid


def _check_host(sock: Any, address: Any) -> None:
    """Refuse a pool host on a Unix socket that runs as another user (Linux).

    The host sends pickles, which run code as they are read: a socket another user put at
    the address (in a shared directory, say) must not be talked to. A host run by root is
    accepted, as root can reach this process anyway.
    """
    uid = _peer_uid(sock) if sock is not None else None
    if uid is not None and uid != os.getuid() and uid != 0:
        raise AuthenticationError(
            f'the pool host at {address!r} runs as uid {uid}, not as this user (uid '
            f'{os.getuid()}) or root; refusing to exchange pickles with it')


def _broadcast_payload(message: Any, sticky: bool | str) -> bytes:
    if isinstance(sticky, str):
        key = sticky.encode()
        return _OPTS.pack(2) + _KEY.pack(len(key)) + key + dumps(message)
    if not isinstance(sticky, bool):
        raise TypeError(f'sticky must be a bool or a str name, got {sticky!r}')
    return _OPTS.pack(1 if sticky else 0) + _KEY.pack(0) + dumps(message)


def _resolve_broadcast(future: Any, payload: Any) -> None:
    """Resolve a broadcast's future (asyncio or concurrent) from the host's answer: the
    replies in worker order, or the first worker's exception."""
    replies = []
    for is_error, reply in loads(payload):
        if is_error:
            future.set_exception(_decode_error(reply))
            return
        replies.append(loads(reply))
    future.set_result(replies)


def _drop_result(client: Any, result_done: Callable[[], None]) -> None:
    result_done()
    if not client._warned:
        client._warned = True
        log.warning('a worker sent a result but client.process_message is not set; '
                    'results are dropped')


def _encode_error(exc: BaseException) -> bytes:
    return dumps((exc, ''))


def _decode_error(payload: Any) -> BaseException:
    try:
        exc, text = loads(payload)
    except BaseException as error:
        return pickle.UnpicklingError(f'an exception from the pool host could not be '
                                      f'unpickled here: {error!r}')
    if text:
        exc.__cause__ = RemoteTraceback(text)
    return exc  # type: ignore[no-any-return]


# -- the host ----------------------------------------------------------------------------------

class _Framed(asyncio.Protocol):
    """Frames over an asyncio transport, with writes coalesced per loop iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = Parser(_PRE_AUTH_FRAME)
        self.out: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, kind: int, arg: int, payload: Any = b'') -> None:
        if self.closed:
            return
        out = self.out
        out.append(HEADER.pack(len(payload), kind, arg))
        out.append(payload if type(payload) is bytes else bytes(payload))
        if len(out) == 2:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        if self.out and not self.closed and self.transport is not None:
            data = b''.join(self.out)
            self.out.clear()
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.parser.feed(data)
        except FrameTooLarge as exc:
            self.refuse(str(exc))
            return
        if frames:
            self.on_frames(frames)

    def on_frames(self, frames: list[tuple[int, int, Any]]) -> None:
        raise NotImplementedError

    def refuse(self, reason: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class _Ack:
    """Stands in for a future on a client's note: handing it to a worker acknowledges it."""

    __slots__ = ('session', 'is_done')

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.is_done = False

    def done(self) -> bool:
        return self.is_done

    def set_result(self, _: Any) -> None:
        self.is_done = True
        self.session.acknowledge()


class _Session(_Framed):
    """The host's side of one client connection."""

    def __init__(self, host: _Host) -> None:
        super().__init__(host.loop)
        self.host = host
        self.number = host.next_session
        host.next_session += 1
        self.nonce = os.urandom(_NONCE)
        self.authenticated = False
        self.tasks: dict[int, Any] = {}   # client task id -> the pool's _RawFuture
        self.result_dones: collections.deque[Callable[[], None]] = collections.deque()
        self.acks = 0
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info('socket')
        if sock is not None:
            # A worker forked later (a replacement) must not hold this connection open.
            self.fd = sock.fileno()
            _parent_fds.add(self.fd)
        uid = _peer_uid(sock) if sock is not None else None
        if uid is not None and uid not in self.host.allowed_uids:
            self.refuse(f'uid {uid} may not use this pool (allowed: '
                        f'{sorted(self.host.allowed_uids)})')
            return
        self.send(HELLO, VERSION, self.nonce)

    def refuse(self, reason: str) -> None:
        log.warning('pool host refused a client: %s', reason)
        self.send(REFUSED, 0, reason.encode())
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        _parent_fds.discard(self.fd)
        self.host.session_ended(self)
        for future in list(self.tasks.values()):
            future.cancel()   # nobody is left to answer: stop the work in the worker
        self.tasks.clear()
        for result_done in self.result_dones:
            result_done()
        self.result_dones.clear()

    def on_frames(self, frames: list[tuple[int, int, Any]]) -> None:
        pool = self.host.pool
        for kind, arg, payload in frames:
            if self.closed:
                return
            if not self.authenticated:
                self.authenticate(kind, bytes(payload))
                continue
            if kind == C_TASK:
                worker_num = _OPTS.unpack_from(payload)[0]
                self.start(arg, payload[_OPTS.size:], None if worker_num < 0 else worker_num)
            elif kind == C_NOTE:
                worker_num = _OPTS.unpack_from(payload)[0]
                if not self.host.accepting(self, 0):
                    continue
                pool._counts['submitted'] += 1
                pool._dispatch((protocol.NOTE, self.number << _SESSION_SHIFT,
                                bytes(payload[_OPTS.size:]), _Ack(self)),
                               None if worker_num < 0 else worker_num)
            elif kind == C_BROADCAST:
                flag, = _OPTS.unpack_from(payload)
                key_size, = _KEY.unpack_from(payload, _OPTS.size)
                start = _OPTS.size + _KEY.size
                sticky: bool | str = bytes(payload[start:start + key_size]).decode() \
                    if flag == 2 else bool(flag)
                self.broadcast(arg, bytes(payload[start + key_size:]), sticky)
            elif kind == C_CANCEL:
                future = self.tasks.get(arg)
                if future is not None:
                    future.cancel()
            elif kind == C_CREDIT:
                for _ in range(min(arg, len(self.result_dones))):
                    self.result_dones.popleft()()
            elif kind == C_STATS:
                stats = pool.stats()
                stats['clients'] = len(self.host.sessions)
                stats['host_pid'] = os.getpid()
                self.send(H_REPLY, arg, dumps(stats))

    def authenticate(self, kind: int, payload: bytes) -> None:
        secret = self.host.secret
        if kind != AUTH or len(payload) < _NONCE:
            self.refuse('the client did not authenticate')
            return
        client_nonce, proof = payload[:_NONCE], payload[_NONCE:]
        if secret is not None:
            if not hmac.compare_digest(proof, _mac(secret, self.nonce, b'client')):
                self.refuse('wrong or missing secret')
                return
            answer = _mac(secret, client_nonce, b'host')
        else:
            answer = b''
        self.authenticated = True
        self.parser.max_frame = 2 ** 32 - 1
        self.host.session_started(self)
        self.send(WELCOME, self.host.pool.pool_size,
                  answer + dumps({'share': self.host.client_share}))

    def start(self, tid: int, payload: Any, worker_num: int | None) -> None:
        if not self.host.accepting(self, tid):
            return
        if worker_num is not None and not 0 <= worker_num < self.host.pool.pool_size:
            self.send(H_ERROR, tid, _encode_error(ValueError(
                f'worker_num must be in 0..{self.host.pool.pool_size - 1}, got {worker_num}')))
            return
        future: Any = self.host.pool._submit_payload(
            bytes(payload), worker_num, None, _RawFuture,
            lambda is_error, reply, tid=tid: self.answer(tid, is_error, reply),
            self.number << _SESSION_SHIFT | tid)
        self.tasks[tid] = future

    def answer(self, tid: int, is_error: bool, payload: Any) -> None:
        self.tasks.pop(tid, None)
        self.send(H_ERROR if is_error else H_REPLY, tid, payload)

    def broadcast(self, tid: int, payload: bytes, sticky: bool | str) -> None:
        if not self.host.accepting(self, tid):
            return
        pool = self.host.pool
        if sticky:
            pool._remember_sticky(sticky, payload)
        replies: list[Any] = [None] * pool.pool_size
        missing = [pool.pool_size]

        def collect(number: int, is_error: bool, reply: Any) -> None:
            replies[number] = (is_error, bytes(reply))
            missing[0] -= 1
            if missing[0] == 0:
                self.send(H_BROADCAST, tid, dumps(replies))

        for number in range(pool.pool_size):
            # One id for all: in-flight tables are per worker, and results route by it.
            pool._submit_payload(payload, number, None, _RawFuture,
                                 lambda e, r, n=number: collect(n, e, r),
                                 self.number << _SESSION_SHIFT | tid)


    def acknowledge(self) -> None:
        self.acks += 1
        if self.acks == 1:
            self.loop.call_soon(self.send_acks)

    def send_acks(self) -> None:
        if self.acks:
            acks, self.acks = self.acks, 0
            self.send(H_ACK, acks)

    def result(self, payload: Any, result_done: Callable[[], None]) -> None:
        self.result_dones.append(result_done)
        self.send(H_RESULT, 0, payload)


class _Host:
    """The pool host: a Pool, a server and its sessions, on the host process's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker_class: type[Worker],
                 address: Address, secret: bytes | None, ssl_context: Any,
                 pool_options: dict[str, Any], allowed_uids: set[int],
                 idle_timeout: float | None) -> None:
        self.loop = loop
        self.address = address
        self.secret = secret
        self.ssl_context = ssl_context
        self.allowed_uids = allowed_uids
        self.idle_timeout = idle_timeout
        self.pool = Pool(loop, worker_class=worker_class, **pool_options)
        self.pool._raw_results = self.route_result
        self.pool._batch_replies = False
        self.client_share = self.pool._max_tasks
        self.sessions: dict[int, _Session] = {}
        self.next_session = 1
        self.server: asyncio.AbstractServer | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.done = loop.create_future()
        self.stopping = False

    async def start(self) -> None:
        await self.pool.__aenter__()
        if isinstance(self.address, str):
            _private_directory(self.address)
            if os.path.exists(self.address):
                os.unlink(self.address)   # the caller checked that no host answers there
            old_mask = os.umask(0o177)    # the socket is born 0600: no window for others
            try:
                self.server = await self.loop.create_unix_server(
                    lambda: _Session(self), self.address, ssl=self.ssl_context)
            finally:
                os.umask(old_mask)
            os.chmod(self.address, 0o600)
        else:
            self.server = await self.loop.create_server(
                lambda: _Session(self), self.address[0], self.address[1],
                ssl=self.ssl_context, reuse_address=True)
            if self.address[1] == 0:
                port = self.server.sockets[0].getsockname()[1]
                self.address = (self.address[0], port)
        # Replacement workers are forked after this: they must not keep the listening
        # socket open, or a dead host would still seem to accept connections.
        for sock in self.server.sockets:
            _parent_fds.add(sock.fileno())
        # The client that started this host connects next; under load that can take a
        # while, so a new host waits at least _FIRST_CLIENT_GRACE before idling out.
        self.arm_idle_timer(max(self.idle_timeout or 0.0, _FIRST_CLIENT_GRACE))

    def accepting(self, session: _Session, tid: int) -> bool:
        if self.pool._state == 'running':
            return True
        if tid:
            session.send(H_ERROR, tid, _encode_error(PoolClosed('the pool host is stopping')))
        return False

    def route_result(self, origin: int, payload: Any, result_done: Callable[[], None]) -> None:
        session = self.sessions.get(origin >> _SESSION_SHIFT)
        if session is None or session.closed:
            result_done()   # its client is gone: nobody to deliver to
            return
        session.result(bytes(payload), result_done)

    def session_started(self, session: _Session) -> None:
        self.sessions[session.number] = session
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def session_ended(self, session: _Session) -> None:
        self.sessions.pop(session.number, None)
        self.arm_idle_timer()

    def arm_idle_timer(self, delay: float | None = None) -> None:
        if self.idle_timeout is not None and not self.sessions and self.idle_timer is None \
                and not self.stopping:
            self.idle_timer = self.loop.call_later(delay or self.idle_timeout, self.idle)

    def idle(self) -> None:
        self.idle_timer = None
        if not self.sessions:
            log.info('pool host at %s had no clients for %s s; stopping', self.address,
                     self.idle_timeout)
            self.shutdown()

    def shutdown(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        if isinstance(self.address, str):
            try:
                os.unlink(self.address)
            except OSError:
                pass
        await self.pool.stop()
        for session in list(self.sessions.values()):
            session.close()
        if self.server is not None:
            await self.server.wait_closed()
        if not self.done.done():
            self.done.set_result(None)


def _run_host(worker_class: type[Worker], address: Address, secret: bytes | None,
              ssl_context: Any, pool_options: dict[str, Any], allowed_uids: set[int],
              idle_timeout: float | None, ready: Callable[[str, Any], None],
              parent_sentinel: int | None) -> None:
    """The host process's main: serve until stopped, idle, or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # stopped by its starter, not a Ctrl-C
    asyncio.events._set_running_loop(None)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    host = _Host(loop, worker_class, address, secret, ssl_context, pool_options,
                 allowed_uids, idle_timeout)
    try:
        loop.run_until_complete(host.start())
    except BaseException:
        ready('error', traceback.format_exc())
        loop.run_until_complete(host.pool.stop())
        loop.close()
        sys.exit(1)
    loop.add_signal_handler(signal.SIGTERM, host.shutdown)
    if parent_sentinel is not None:
        loop.add_reader(parent_sentinel, host.shutdown)
    ready('ready', host.address)
    try:
        loop.run_until_complete(host.done)
    finally:
        loop.close()


def _serve_process(worker_class: type[Worker], address: Address, secret: bytes | None,
                   ssl_context: Any, pool_options: dict[str, Any], allowed_uids: set[int],
                   conn: Any) -> None:
    parent = multiprocessing.parent_process()

    def ready(state: str, detail: Any) -> None:
        conn.send((state, detail))
        conn.close()

    _run_host(worker_class, address, secret, ssl_context, pool_options, allowed_uids, None,
              ready, parent.sentinel if parent is not None else None)


class HostHandle:
    """A running pool host started by :func:`serve`: its ``address`` and ``pid``."""

    def __init__(self, address: Address, process: multiprocessing.process.BaseProcess
                 ) -> None:
        self.address = address
        self.process = process
        self.pid: int = process.pid or 0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the host: its pool finishes accepted tasks and exits; killed after
        ``timeout`` seconds."""
        if self.process.is_alive():
            os.kill(self.pid, signal.SIGTERM)
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
        self.process.join(5)

    def __repr__(self) -> str:
        return f'<HostHandle address={self.address!r} pid={self.pid}>'


def serve(worker_class: type[Worker], address: Address | None = None, *,
          pool_size: int | None = None, secret: str | bytes | None = None,
          ssl_context: ssl.SSLContext | None = None, allowed_uids: Any = None,
          start_timeout: float = 60.0, **pool_options: Any) -> HostHandle:
    """Start a host process that runs a :class:`~looppool.Pool` of ``worker_class`` and
    serves it at ``address``; return once it accepts clients.

    ``address`` is a Unix socket path (``None``: :func:`default_address`) or a
    ``(host, port)`` tuple (port 0 picks a free one; the handle's ``address`` has it). A
    socket's directory is created with mode 0700 if missing; one that belongs to another
    user or that others may write to raises :class:`PermissionError` here. The
    host exits when the process that called ``serve()`` exits, and on
    :meth:`HostHandle.stop`. This is the form for a web server's master process: call it
    before the server forks its workers (gunicorn's ``on_starting``, before Tornado's
    ``fork_processes``), and :func:`connect` in each worker.

    The host process is started with the pool's ``mp_context`` (the interpreter's default
    when not given); TLS (``ssl_context``) needs ``fork``, as an ``SSLContext`` cannot be
    pickled for ``spawn``.
    """
    if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
        raise TypeError(f'worker_class must be a subclass of looppool.Worker, '
                        f'got {worker_class!r}')
    address = default_address(worker_class) if address is None else address
    key = _secret_bytes(secret)
    _check_address(address, key, ssl_context)
    uids = _allowed(allowed_uids)
    options = dict(pool_options, pool_size=pool_size)
    Pool(None, **options, worker_class=worker_class)  # check the options here, not later
    ctx = multiprocessing.get_context(pool_options.get('mp_context'))
    if isinstance(address, str):
        # Checked here too (the host checks again before it binds) so that an unsafe
        # directory raises PermissionError in the caller, not a host's traceback.
        _private_directory(address)
        if _answers(address):
            raise FileExistsError(f'a pool host already answers at {address}')
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_serve_process, name='looppool-host',
                          args=(worker_class, address, key, ssl_context, options, uids,
                                sender))
    process.start()
    _disown(process)   # web workers forked after this must not try to join the host
    sender.close()
    try:
        if not receiver.poll(start_timeout):
            process.kill()
            raise TimeoutError(f'the pool host did not start within {start_timeout} s')
        state, detail = receiver.recv()
    except EOFError:
        process.join(5)
        raise RuntimeError(f'the pool host exited with code {process.exitcode} before it '
                           'was ready') from None
    finally:
        receiver.close()
    if state != 'ready':
        process.join(5)
        raise RuntimeError(f'the pool host could not start:\n{detail}')
    return HostHandle(detail, process)


def _allowed(allowed_uids: Any) -> set[int]:
    if allowed_uids is None:
        return {os.getuid()}
    uids = set(allowed_uids)
    if not all(isinstance(uid, int) for uid in uids):
        raise TypeError(f'allowed_uids must be ints, got {allowed_uids!r}')
    return uids


def _answers(path: str) -> bool:
    """Whether something accepts connections on a Unix socket path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


# -- the asynchronous client -------------------------------------------------------------------

class _ClientFuture(asyncio.Future[Any]):
    __slots__ = ('_lp_client', '_lp_tid', '_lp_timer')
    _lp_client: Client
    _lp_tid: int
    _lp_timer: asyncio.TimerHandle | None

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._lp_client._abandon(self)
        return True


class _ClientConnection(_Framed):
    def __init__(self, client: Client) -> None:
        loop = client._get_loop()
        super().__init__(loop)
        self.client = client
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.nonce = os.urandom(_NONCE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        try:
            _check_host(transport.get_extra_info('socket'), self.client.address)
        except AuthenticationError as exc:
            self.fail(exc)

    def refuse(self, reason: str) -> None:
        self.fail(ConnectionLost(f'the pool host sent something unexpected: {reason}'))

    def fail(self, error: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
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
        client = self.client
        for kind, arg, payload in frames:
            if kind == H_REPLY or kind == H_ERROR or kind == H_BROADCAST:
                client._answer(kind, arg, payload)
            elif kind == H_ACK:
                client._acknowledged(arg)
            elif kind == H_RESULT:
                client._result(payload)
            elif kind == HELLO:
                self.hello(arg, bytes(payload))
            elif kind == WELCOME:
                self.welcome(arg, bytes(payload))
            elif kind == REFUSED:
                self.fail(AuthenticationError(
                    f'the pool host at {client.address!r} refused this client: '
                    f'{bytes(payload).decode(errors="replace")}'))

    def hello(self, version: int, nonce: bytes) -> None:
        if version != VERSION:
            self.fail(ConnectionLost(f'the pool host speaks protocol {version}, this client '
                                     f'{VERSION}'))
            return
        secret = self.client._secret
        proof = _mac(secret, nonce, b'client') if secret is not None else b''
        self.send(AUTH, 0, self.nonce + proof)

    def welcome(self, pool_size: int, payload: bytes) -> None:
        secret = self.client._secret
        if secret is not None:
            if not hmac.compare_digest(payload[:32], _mac(secret, self.nonce, b'host')):
                self.fail(AuthenticationError('the pool host could not prove it knows the '
                                              'secret'))
                return
            payload = payload[32:]
        self.parser.max_frame = 2 ** 32 - 1
        info = loads(payload)
        self.client.pool_size = pool_size
        self.client._share = info['share']
        self.ready.set_result(None)


class Client:
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
                 server_hostname: str | None = None,
                 ensure_host: Callable[[], bool] | None = None) -> None:
        self.address = address
        self._secret = _secret_bytes(secret)
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._ensure_host = ensure_host
        self.created_new_pool = False
        self.pool_size: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._next_tid = 1
        self._share = 4096
        self._unacked = 0
        self._notes_unacked = 0
        self._outbox: collections.deque[tuple[int, int, bytes, Any]] = collections.deque()
        self._closed = False
        self._warned = False

    # -- the Pool's interface --------------------------------------------------------------

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> asyncio.Future[Any]:
        """Send ``message`` to the host's pool; resolves to the worker's reply. Waits for
        room when this client's share of unacknowledged messages is used up."""
        payload = self._payload(message, worker_num)
        future = self._new_future(timeout)
        self._queue(C_TASK, future._lp_tid, payload, future)
        return future

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
        payload = self._payload(message, worker_num)
        self._check_open()
        if self._unacked + len(self._outbox) >= self._share:
            raise queue.Full(f'{self._share} messages from this client are not yet '
                             'acknowledged by the pool host')
        self._queue(C_NOTE, 0, payload, None)

    def put(self, message: Any, worker_num: int | None = None) -> asyncio.Future[None]:
        """Send without a reply, waiting for room instead of raising ``queue.Full``; the
        future resolves once the message is queued for the host."""
        payload = self._payload(message, worker_num)
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

    def _payload(self, message: Any, worker_num: int | None) -> bytes:
        if worker_num is not None and (not isinstance(worker_num, int) or worker_num < 0):
            raise ValueError(f'worker_num must be a worker number, got {worker_num!r}')
        return _OPTS.pack(-1 if worker_num is None else worker_num) + dumps(message)

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
        self._next_tid += 1
        future = _ClientFuture(loop=loop)
        future._lp_client = self
        future._lp_tid = tid
        future._lp_timer = None
        if timeout is not None:
            if not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(f'timeout must be a positive number of seconds, got '
                                 f'{timeout!r}')
            future._lp_timer = loop.call_later(timeout, self._expire, future, timeout)
        return future

    def _queue(self, kind: int, tid: int, payload: bytes, future: Any,
               counted: bool = True) -> None:
        self._get_loop()
        if future is not None and kind != C_NOTE:
            self._futures[tid] = future
        self._outbox.append((kind, tid, payload, future))
        connection = self._connection
        if connection is None or connection.closed or not connection.ready.done():
            self._start_connecting()
        else:
            self._pump()

    def _pump(self) -> None:
        """Send what the share allows, in order."""
        connection = self._connection
        if connection is None or connection.closed:
            return
        outbox = self._outbox
        while outbox and (self._unacked < self._share or outbox[0][0] == C_STATS):
            kind, tid, payload, future = outbox.popleft()
            if future is not None and future.done():
                continue
            if kind != C_STATS:
                self._unacked += 1
            if kind == C_NOTE:
                self._notes_unacked += 1
                if future is not None:
                    future.set_result(None)
            connection.send(kind, tid, payload)

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

    # -- answers ---------------------------------------------------------------------------

    def _answer(self, kind: int, tid: int, payload: Any) -> None:
        self._unacked -= 1
        future = self._futures.pop(tid, None)
        if future is not None and not future.done():
            timer = future._lp_timer  # type: ignore[attr-defined]
            if timer is not None:
                timer.cancel()
            if kind == H_REPLY:
                try:
                    future.set_result(loads(payload))
                except BaseException as exc:
                    future.set_exception(pickle.UnpicklingError(
                        f'the reply could not be unpickled here: {exc!r}'))
            elif kind == H_ERROR:
                error = _decode_error(payload)
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(error)
            else:
                _resolve_broadcast(future, payload)
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
        if future._lp_timer is not None:
            future._lp_timer.cancel()
        connection = self._connection
        if future._lp_tid in self._futures and connection is not None and not connection.closed:
            connection.send(C_CANCEL, future._lp_tid)

    def _connection_lost(self, connection: _ClientConnection, exc: Exception | None) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        self._fail_all(ConnectionLost(
            f'the connection to the pool host at {self.address!r} was lost '
            f'({exc!r}); the next call connects again' if exc else
            f'the pool host at {self.address!r} closed the connection; the next call '
            'connects again'))

    def _fail_all(self, error: BaseException) -> None:
        futures = list(self._futures.values())
        self._futures.clear()
        for item in self._outbox:
            if item[3] is not None and item[3] not in futures:
                futures.append(item[3])
        self._outbox.clear()
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
            server_hostname: str | None = None) -> Client:
    """A :class:`Client` of the pool host at ``address`` (it connects on first use)."""
    if address is not None and not isinstance(address, (str, tuple)):
        raise TypeError(f'address must be a Unix socket path or a (host, port) tuple, got '
                        f'{address!r}')
    return Client(address, secret=secret, ssl_context=ssl_context,
                  server_hostname=server_hostname)


# -- the synchronous client --------------------------------------------------------------------

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
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._ensure_host = ensure_host
        self.created_new_pool = False
        self.pool_size: int | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._next_tid = 1
        self._room: threading.BoundedSemaphore | None = None
        self._generation = 0
        self._closed = False
        self._warned = False

    def submit(self, message: Any, *, worker_num: int | None = None,
               timeout: float | None = None) -> Any:
        """Send ``message`` and wait for the reply (at most ``timeout`` seconds, then
        :class:`TimeoutError` and the task is cancelled in the worker)."""
        payload = _OPTS.pack(-1 if worker_num is None else worker_num) + dumps(message)
        return self._call(C_TASK, payload, timeout)

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
        payload = _OPTS.pack(-1 if worker_num is None else worker_num) + dumps(message)
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
            self._next_tid += 1
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
                self._generation += 1
                reader = threading.Thread(target=self._read, args=(self._sock,),
                                          name='looppool-client-reader', daemon=True)
                reader.start()
            assert self._room is not None
            return self._sock, self._room

    def _handshake(self) -> tuple[socket.socket, int]:
        sock: socket.socket | None = None
        try:
            if isinstance(self.address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._connect_timeout)
                sock.connect(self.address)
                try:
                    _check_host(sock, self.address)
                except AuthenticationError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self.address, self._connect_timeout)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(
                    sock, server_hostname=self._server_hostname or (
                        self.address[0] if isinstance(self.address, tuple) else None))
        except OSError as exc:
            if sock is not None:   # a refused connect() leaves an open socket behind
                sock.close()
            raise ConnectionLost(f'could not connect to the pool host at {self.address!r}: '
                                 f'{exc!r}') from exc
        try:
            parser = Parser(_PRE_AUTH_FRAME)
            kind, version, nonce = _read_frame(sock, parser)
            if kind == REFUSED:
                raise AuthenticationError(f'the pool host at {self.address!r} refused this '
                                          f'client: {bytes(nonce).decode(errors="replace")}')
            if kind != HELLO or version != VERSION:
                raise ConnectionLost(f'unexpected greeting from the pool host ({kind}, '
                                     f'{version})')
            mine = os.urandom(_NONCE)
            proof = _mac(self._secret, bytes(nonce), b'client') if self._secret else b''
            sock.sendall(encode(AUTH, 0, mine + proof))
            kind, pool_size, payload = _read_frame(sock, parser)
            if kind == REFUSED:
                raise AuthenticationError(f'the pool host at {self.address!r} refused this '
                                          f'client: {bytes(payload).decode(errors="replace")}')
            payload = bytes(payload)
            if self._secret is not None:
                if not hmac.compare_digest(payload[:32], _mac(self._secret, mine, b'host')):
                    raise AuthenticationError('the pool host could not prove it knows the '
                                              'secret')
                payload = payload[32:]
            self.pool_size = pool_size
            sock.settimeout(None)
            return sock, loads(payload)['share']
        except BaseException:
            sock.close()
            raise

    def _read(self, sock: socket.socket) -> None:
        parser = Parser()
        error: BaseException = ConnectionLost(
            f'the pool host at {self.address!r} closed the connection; the next call '
            'connects again')
        try:
            while True:
                data = sock.recv(1 << 18)
                if not data:
                    break
                for kind, arg, payload in parser.feed(data):
                    self._on_frame(sock, kind, arg, payload)
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
        with self._lock:
            future = self._futures.pop(arg, None)
        if future is None:
            return
        if future.counted:  # type: ignore[attr-defined]
            self._release()
        if kind == H_REPLY:
            try:
                future.set_result(loads(payload))
            except BaseException as exc:
                future.set_exception(pickle.UnpicklingError(
                    f'the reply could not be unpickled here: {exc!r}'))
        elif kind == H_ERROR:
            future.set_exception(_decode_error(payload))
        elif kind == H_BROADCAST:
            _resolve_broadcast(future, payload)

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


def _read_frame(sock: socket.socket, parser: Parser) -> tuple[int, int, Any]:
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionLost('the pool host closed the connection during the handshake')
        frames = parser.feed(data)
        if frames:
            return frames[0]


def connect_sync(address: Address, *, secret: str | bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> SyncClient:
    """A :class:`SyncClient` of the pool host at ``address`` (it connects on first use)."""
    return SyncClient(address, secret=secret, ssl_context=ssl_context,
                      server_hostname=server_hostname)


# -- create-or-connect -------------------------------------------------------------------------

def shared(worker_class: type[Worker], address: Address | None = None, *,
           idle_timeout: float = 30.0, secret: str | bytes | None = None,
           ssl_context: ssl.SSLContext | None = None, allowed_uids: Any = None,
           sync: bool = False, start_timeout: float = 60.0,
           **pool_options: Any) -> Client | SyncClient:
    """Connect to the pool host for ``worker_class`` at ``address``, starting it first if
    none runs; ``created_new_pool`` on the returned client says which happened.

    Exactly one host starts even when many processes call this at once: they take turns
    under a lock file beside the socket. The host is detached from the process that started
    it (a web server recycles its workers): it lives while clients are connected and exits
    ``idle_timeout`` seconds after the last one leaves. If it dies, the next call of a client
    made here starts a new one. ``worker_class`` must be importable by module name (not
    defined in ``__main__``), because the host is a fresh interpreter. ``sync=True`` returns
    a :class:`SyncClient`, otherwise a :class:`Client`.
    """
    if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
        raise TypeError(f'worker_class must be a subclass of looppool.Worker, '
                        f'got {worker_class!r}')
    if worker_class.__module__ == '__main__':
        raise ValueError(f'{worker_class.__qualname__} is defined in __main__; a shared host '
                         'is a fresh interpreter that imports the class by module name, so '
                         'move it into a module')
    if not (isinstance(idle_timeout, (int, float)) and idle_timeout > 0):
        raise ValueError(f'idle_timeout must be a positive number of seconds, got '
                         f'{idle_timeout!r}')
    address = default_address(worker_class) if address is None else address
    key = _secret_bytes(secret)
    _check_address(address, key, ssl_context)
    if ssl_context is not None:
        raise ValueError('shared() starts its host in a fresh interpreter, which cannot '
                         'receive an SSLContext; use serve() with fork for TLS')
    Pool(None, **pool_options, worker_class=worker_class)  # check the options here
    spec = {'worker_class': worker_class, 'address': address, 'secret': key,
            'pool_options': pool_options, 'allowed_uids': _allowed(allowed_uids),
            'idle_timeout': float(idle_timeout)}
    client: Client | SyncClient

    def ensure() -> bool:
        created = _ensure_host(spec, start_timeout)
        client.created_new_pool = client.created_new_pool or created
        return created

    if sync:
        client = SyncClient(address, secret=key, ensure_host=ensure)
    else:
        client = Client(address, secret=key, ensure_host=ensure)
    ensure()
    return client


def _lock_path(address: Address) -> str:
    if isinstance(address, str):
        return address + '.lock'
    base = os.environ.get('XDG_RUNTIME_DIR') or tempfile.gettempdir()
    directory = os.path.join(base, f'looppool-{os.getuid()}')
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.join(directory, f'tcp-{address[0]}-{address[1]}.lock')


def _host_answers(address: Address) -> bool:
    if isinstance(address, str):
        return _answers(address)
    try:
        socket.create_connection(address, 2).close()
        return True
    except OSError:
        return False


def _ensure_host(spec: dict[str, Any], start_timeout: float) -> bool:
    """Start the shared host unless one answers; returns whether this call started it."""
    address = spec['address']
    if isinstance(address, str):
        _private_directory(address)
    with open(_lock_path(address), 'a+b') as lock:
        os.chmod(lock.name, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)   # processes racing to start take turns here
        try:
            if _host_answers(address):
                return False
            _start_detached_host(spec, start_timeout)
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_detached_host(spec: dict[str, Any], start_timeout: float) -> None:
    # Not sys.executable: under uWSGI or mod_wsgi that is the server's binary. This is the
    # interpreter multiprocessing would start (multiprocessing.set_executable() sets it).
    python = multiprocessing.spawn.get_executable()
    process = subprocess.Popen(
        [python, '-m', 'looppool.remote'], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        close_fds=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, sys.path))))
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(pickle.dumps(spec))
        process.stdin.close()
        process.wait(start_timeout)   # the launcher exits once its host child forked
        ready, _, _ = select.select([process.stdout], [], [], start_timeout)
        line = process.stdout.readline().decode() if ready else ''
    finally:
        process.stdout.close()
    if not line.startswith('ready'):
        raise RuntimeError(f'the shared pool host did not start: {line.strip() or "timeout"}')


def _detached_main() -> None:
    """``python -m looppool.remote``: fork a detached host and report once it serves."""
    spec = pickle.loads(sys.stdin.buffer.read())
    out = os.dup(sys.stdout.fileno())
    if os.fork():
        os._exit(0)   # the launcher ends at once; the host is re-parented, never a zombie
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)

    def ready(state: str, detail: Any) -> None:
        message = f'ready {detail}\n' if state == 'ready' else \
            'error ' + str(detail).replace('\n', ' | ') + '\n'
        os.write(out, message.encode())
        os.close(out)

    _run_host(spec['worker_class'], spec['address'], spec['secret'], None,
              spec['pool_options'], spec['allowed_uids'], spec['idle_timeout'], ready, None)


if __name__ == '__main__':
    _detached_main()
