"""The pool host: a Pool, a server, and one session per connected client."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from .. import protocol
from ..errors import PoolClosed
from ..pool import Pool
from ..processes import _parent_fds
from ..tasks import _RawFuture, _TaskFuture
from ..protocol import dumps, loads, unpack_ids
from ..worker import Worker
from .access import Address, _host_proof, _peer_uid, _private_directory, _still_private
from .wire import (_KEY, _MAX_MESSAGE, _MAX_TID, _NONCE, _OPTS, _SESSION_SHIFT, _WELCOME,
                   AUTH, C_BROADCAST, C_CANCEL, C_CONTROL, C_CREDIT, C_NOTE, C_STATS, C_TASK,
                   C_TASKS, CONTROLS, H_ACK, H_BROADCAST, H_ERROR, H_NOTICE, H_REPLIES,
                   H_REPLY, H_RESEND, H_RESULT, HELLO, REFUSED, VERSION, WELCOME,
                   _encode_error, _Framed, _resend_payload)

log = logging.getLogger('looppool.remote')

# The client that started a host connects next; under load that can take a while.
_FIRST_CLIENT_GRACE = 10.0
# A connection that has not authenticated within this many seconds is closed, and at most
# _MAX_WAITING may wait at once (a new one closes the oldest): unauthenticated peers cannot
# use up the host's descriptors, nor keep an honest client out.
_AUTH_TIMEOUT = 5.0
_MAX_WAITING = 64
_INT = {int}
_future_set_result = asyncio.Future.set_result
# The frames that carry a client's task id.
_WITH_TID = frozenset((C_TASK, C_BROADCAST, C_CANCEL, C_STATS, C_CONTROL))


def _parse_broadcast(payload: Any) -> tuple[bytes, bool | str]:
    """A C_BROADCAST payload's message and sticky flag (or name)."""
    head = _OPTS.size + _KEY.size
    if len(payload) < head:
        raise _Malformed(f'a broadcast of {len(payload)} bytes has no options')
    flag, = _OPTS.unpack_from(payload)
    key_size, = _KEY.unpack_from(payload, _OPTS.size)
    if flag not in (0, 1, 2) or len(payload) < head + key_size:
        raise _Malformed('a broadcast with malformed options')
    sticky: bool | str = bool(flag)
    if flag == 2:
        try:
            sticky = bytes(payload[head:head + key_size]).decode()
        except UnicodeDecodeError:
            raise _Malformed('a sticky broadcast whose name is not UTF-8') from None
    return bytes(payload[head + key_size:]), sticky


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


class _HostTask(_TaskFuture):
    """A task of one of the host's clients, in the host's pool: its outcome goes back to
    the client's session (each session makes a subclass with ``_lp_session`` set). Nobody
    awaits it here. Its id in the pool is the session's number, then the client's id."""

    __slots__ = ()
    _lp_session: _Session

    def set_result(self, result: Any) -> None:
        # The path of every reply: the session's reply() inlined.
        _future_set_result(self, None)
        session = self._lp_session
        tid = self._lp_tid & _MAX_TID
        session.tasks.pop(tid, None)
        if session.closed:
            return
        ids = session.reply_ids
        if not ids:   # those of one read from a worker go in one frame, at its end
            session.host.pool._receiver.after_read(session.send_replies)
        ids.append(tid)
        session.reply_values.append(result)

    def set_exception(self, exception: Any) -> None:
        super().set_exception(exception)
        self.exception()   # reported to the client, so never "unretrieved"
        self._lp_session.answer(self._lp_tid & _MAX_TID, True, _encode_error(exception))

    def _lp_sink(self, is_error: bool, payload: Any) -> None:
        # A worker's own REPLY or ERROR frame, forwarded as it came (an error keeps its
        # traceback text).
        self._lp_session.answer(self._lp_tid & _MAX_TID, is_error, payload)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        # Answered now, so that the client's share of messages is freed.
        self._lp_session.answer(self._lp_tid & _MAX_TID, True,
                                _encode_error(asyncio.CancelledError()))
        return True


class _Malformed(ValueError):
    """A frame from an authenticated client that does not parse; it is answered with an
    error and the session goes on."""


class _Session(_Framed):
    """The host's side of one client connection.

    Until the client authenticates (the uid was checked on connecting; on TCP it proves the
    secret) only its AUTH frame is read, and only for :data:`_AUTH_TIMEOUT` seconds; any
    other frame ends the connection unread.
    """

    def __init__(self, host: _Host) -> None:
        super().__init__(host.loop)
        self.host = host
        self.number = host.next_session
        host.next_session += 1
        self.nonce = os.urandom(_NONCE)
        self.authenticated = False
        self.deadline: asyncio.TimerHandle | None = None
        self.tasks: dict[int, _HostTask] = {}   # client task id -> its task in the pool
        self.task_class: type[_HostTask] = type(
            '_HostTask', (_HostTask, host.pool._dispatcher._task_future),
            {'__slots__': (), '_lp_session': self, '__module__': _HostTask.__module__})
        self.reply_ids: list[int] = []      # replies of this loop iteration, sent at its end
        self.reply_values: list[Any] = []
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
        waiting = self.host.waiting
        if len(waiting) >= _MAX_WAITING:   # make room: the oldest has had the longest
            oldest = next(iter(waiting))
            oldest.refuse(f'{_MAX_WAITING} newer connections are waiting to authenticate')
        waiting[self] = None
        self.deadline = self.loop.call_later(_AUTH_TIMEOUT, self.refuse,
                                             f'no authentication within {_AUTH_TIMEOUT} s')
        uid = _peer_uid(sock) if sock is not None else None
        if uid is not None and uid not in self.host.allowed_uids:
            self.refuse(f'uid {uid} may not use this pool (allowed: '
                        f'{sorted(self.host.allowed_uids)})')
            return
        self.send(HELLO, VERSION, self.nonce)

    def settle(self) -> None:
        """The handshake is over, either way: stop its clock and its count."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
            del self.host.waiting[self]

    def refuse(self, reason: str) -> None:
        log.warning('pool host refused a client: %s', reason)
        self.send(REFUSED, 0, reason.encode())
        self.close()

    def close(self) -> None:
        self.settle()
        super().close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.settle()
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
        for kind, arg, payload in frames:
            if self.closed:
                return   # refused on an earlier frame of this read: read nothing after it
            if not self.authenticated:
                self.authenticate(kind, bytes(payload))
                continue
            try:
                self.handle(kind, arg, payload)
            except _Malformed as exc:
                self.malformed(kind, arg, str(exc))

    def handle(self, kind: int, arg: int, payload: Any) -> None:
        if kind in _WITH_TID and not 0 < arg <= _MAX_TID:
            raise _Malformed(f'task id {arg} is outside 1..{_MAX_TID}')
        if kind == C_TASKS:
            self.start_batch(arg, payload)
        elif kind == C_TASK:
            self.start(arg, payload[_OPTS.size:], self.worker_num(payload))
        elif kind == C_NOTE:
            self.note(payload[_OPTS.size:], self.worker_num(payload))
        elif kind == C_BROADCAST:
            self.broadcast(arg, *_parse_broadcast(payload))
        elif kind == C_CANCEL:
            future = self.tasks.get(arg)
            if future is not None:
                future.cancel()
        elif kind == C_CREDIT:
            for _ in range(min(arg, len(self.result_dones))):
                self.result_dones.popleft()()
        elif kind == C_STATS:
            stats = self.host.pool.stats()
            stats['clients'] = len(self.host.sessions)
            stats['host_pid'] = os.getpid()
            for worker in stats['workers']:
                worker['rss'] = _rss(worker['pid'])
            self.send(H_REPLY, arg, dumps(stats))
        elif kind == C_CONTROL:
            self.control(arg, bytes(payload))
        else:
            raise _Malformed(f'unknown frame kind {kind}')

    def control(self, tid: int, command: bytes) -> None:
        """Pause, resume or restart the host's pool; answer with its state once done (or
        with the error that stopped it)."""
        if command not in CONTROLS:
            raise _Malformed(f'unknown control command {command[:32]!r}')
        pool = self.host.pool
        log.info('a client asked the pool host to %s its pool', command.decode())
        try:
            change = getattr(pool, command.decode())()
        except Exception as exc:
            self.send(H_ERROR, tid, _encode_error(exc))
            return

        def done(future: asyncio.Future[None]) -> None:
            if self.closed:
                return
            error = None if future.cancelled() else future.exception()
            if future.cancelled() or error is not None:
                self.send(H_ERROR, tid, _encode_error(error or RuntimeError('cancelled')))
            else:
                self.send(H_REPLY, tid, dumps(pool.state))

        change.add_done_callback(done)

    def malformed(self, kind: int, arg: int, reason: str) -> None:
        """Answer a frame that does not parse, so that nothing waits for it."""
        text = f'the pool host could not read a frame of kind {kind}: {reason}'
        log.warning('a client sent a malformed frame: %s', text)
        if kind in _WITH_TID and kind != C_CANCEL:
            self.send(H_ERROR, arg, _encode_error(ValueError(text)))
            return
        if kind == C_NOTE:
            self.acknowledge()   # the client counts it against its share: free that
        self.send(H_NOTICE, 0, text.encode())

    def worker_num(self, payload: Any) -> int | None:
        if len(payload) < _OPTS.size:
            raise _Malformed(f'a message of {len(payload)} bytes has no options')
        worker_num: int = _OPTS.unpack_from(payload)[0]
        if worker_num == -1:
            return None
        if not 0 <= worker_num < self.host.pool.pool_size:
            raise _Malformed(f'worker_num must be in 0..{self.host.pool.pool_size - 1}, '
                             f'got {worker_num}')
        return worker_num

    def authenticate(self, kind: int, payload: bytes) -> None:
        answer = _host_proof(self.host.secret, self.nonce, payload) if kind == AUTH else None
        if answer is None:
            self.refuse('wrong or missing secret' if kind == AUTH
                        else f'a frame of kind {kind} before authenticating')
            return
        self.settle()
        self.authenticated = True
        self.parser.max_frame = _MAX_MESSAGE
        self.host.session_started(self)
        self.send(WELCOME, self.host.pool.pool_size,
                  answer + _WELCOME.pack(self.host.client_share))

    def note(self, payload: Any, worker_num: int | None) -> None:
        if not self.host.accepting(self, 0):
            self.acknowledge()
            return
        pool = self.host.pool
        pool._counts['submitted'] += 1
        note = (protocol.NOTE, self.number << _SESSION_SHIFT, bytes(payload), _Ack(self))
        pool._dispatcher._dispatch(note, worker_num)

    def start(self, tid: int, payload: Any, worker_num: int | None) -> None:
        """One task (C_TASK), for any worker or for ``worker_num``."""
        ok, message = self.unpickle(payload, [tid], 'message')
        if ok:
            self.start_tasks([tid], [message], worker_num)

    def start_batch(self, count: int, payload: Any) -> None:
        """A batch of tasks for any worker (C_TASKS): one pickle of their messages."""
        try:
            tids, data = unpack_ids(payload)
        except Exception as exc:
            raise _Malformed(f'a batch whose task ids do not unpickle: {exc!r}') from None
        if type(tids) is not list or len(tids) != count or not count \
                or set(map(type, tids)) != _INT or not 0 < min(tids) <= max(tids) <= _MAX_TID:
            raise _Malformed(f'a batch whose task ids are not {count} ids in 1..{_MAX_TID}')
        if count > 1 and self.host.accepting(self, 0):
            try:
                messages = loads(data)
            except BaseException:
                # One of them, likely: the client sends them again one by one.
                self.send(H_RESEND, count, _resend_payload(tids))
                return
        else:
            ok, messages = self.unpickle(data, tids, 'batch of messages')
            if not ok:
                return
        if type(messages) is not list or len(messages) != count:
            reason = f'a batch whose messages are not a list of {count}'
            log.warning('a client sent a malformed frame: %s', reason)
            error = _encode_error(ValueError(
                f'the pool host could not read a frame of kind {C_TASKS}: {reason}'))
            for tid in tids:
                self.send(H_ERROR, tid, error)
            return
        self.start_tasks(tids, messages, None)

    def unpickle(self, data: Any, tids: list[int], what: str) -> tuple[bool, Any]:
        """``(True, what data holds)``; or ``(False, None)`` once the tasks of ``tids``
        were answered with why the host cannot take them."""
        if not self.host.accepting(self, 0):
            error = _encode_error(PoolClosed('the pool host is stopping'))
        else:
            try:
                return True, loads(data)
            except BaseException as exc:
                error = _encode_error(pickle.UnpicklingError(
                    f'the pool host could not unpickle this {what}: {exc!r}'))
        for tid in tids:
            self.send(H_ERROR, tid, error)
        return False, None

    def start_tasks(self, tids: list[int], messages: Any, worker_num: int | None) -> None:
        cls = self.task_class
        loop = self.loop
        base = self.number << _SESSION_SHIFT
        futures = [cls(loop=loop) for _ in tids]
        for future, tid, message in zip(futures, tids, messages):
            future._lp_tid = base | tid
            future._lp_message = message
        self.tasks.update(zip(tids, futures))
        self.host.pool._dispatcher.take(futures, worker_num)

    def answer(self, tid: int, is_error: bool, payload: Any) -> None:
        self.tasks.pop(tid, None)
        # The only frame for this client (a round trip at a time) goes at once.
        self.send(H_ERROR if is_error else H_REPLY, tid, payload, now=True)

    def send_replies(self) -> None:
        """Send the return values of the tasks answered by one read from a worker
        (_HostTask.set_result gathers them; Receiver.after_read calls this at the end of
        the read) in one H_REPLIES frame."""
        ids, values = self.reply_ids, self.reply_values
        self.reply_ids, self.reply_values = [], []
        try:
            data = dumps(values)
        except Exception:
            # One of them cannot be pickled here: that one fails, the others go.
            for tid, value in zip(ids, values):
                try:
                    self.send(H_REPLY, tid, dumps(value))
                except Exception as exc:
                    self.send(H_ERROR, tid, _encode_error(exc))
            return
        self.send_batch(H_REPLIES, ids, data)
        self.flush()   # (the end of a read from a worker: at once)

    def broadcast(self, tid: int, payload: bytes, sticky: bool | str) -> None:
        if not self.host.accepting(self, tid):
            return
        pool = self.host.pool
        if sticky:
            pool._supervisor._remember_sticky(sticky, payload)
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
        # Replies to a client leave the host in the same loop iteration as the worker's
        # frame that brought them, re-pickled with the others for that client: none may
        # still refer to a shared-memory buffer of the worker's (see looppool.shm).
        self.pool._shared_memory = 0
        self.client_share = self.pool._max_tasks
        self.sessions: dict[int, _Session] = {}
        self.waiting: dict[_Session, None] = {}   # not yet authenticated, oldest first
        self.next_session = 1
        self.server: asyncio.AbstractServer | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.done = loop.create_future()
        self.stopping = False
        self.warned_batch_result = False

    async def start(self) -> None:
        await self.pool.__aenter__()
        if isinstance(self.address, str):
            checked = _private_directory(self.address)
            if os.path.lexists(self.address):
                os.unlink(self.address)   # the caller checked that no host answers there
            old_mask = os.umask(0o177)    # the socket is born 0600: no window for others
            try:
                self.server = await self.loop.create_unix_server(
                    lambda: _Session(self), self.address, ssl=self.ssl_context)
            finally:
                os.umask(old_mask)
            try:
                _still_private(self.address, checked)
            except PermissionError:
                self.server.close()
                raise
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
        if self.pool.state not in ('stopping', 'stopped'):   # paused: it waits
            return True
        if tid:
            session.send(H_ERROR, tid, _encode_error(PoolClosed('the pool host is stopping')))
        return False

    def route_result(self, origin: int, payload: Any, result_done: Callable[[], None]) -> None:
        session = self.sessions.get(origin >> _SESSION_SHIFT)
        if origin == 0 and not self.warned_batch_result:
            # Origin 0 is no client's: a _put_nowait() in handle_batch(), whose batch
            # holds the messages of any number of clients (see looppool.batch).
            self.warned_batch_result = True
            log.warning('a result sent with _put_nowait() from handle_batch() belongs to '
                        'no one client of the pool host, so it was dropped (and so will '
                        'be the others): answer through the replies instead')
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


def _rss(pid: int | None) -> int | None:
    """A worker's resident memory in bytes, for ``stats()`` through a host (``None`` if
    it cannot be read)."""
    if not pid:
        return None
    import psutil
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
