"""The frames between a pool host and its clients: kinds, options, errors, and an
asyncio protocol that reads and writes them.

A client-host frame has the same 13-byte header as the local channel
(:mod:`looppool.channel`); its kind says what the payload is. Before a peer is
authenticated only the handshake kinds (``HELLO``, ``AUTH``, ``WELCOME``, ``REFUSED``) are
read, none of them a pickle; see :mod:`looppool.remote.access`.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import logging
import pickle
import struct
from collections.abc import Callable
from typing import Any

from ..channel import HEADER, FrameTooLarge, Parser
from ..errors import RemoteTraceback
from .. import tracing
from ..protocol import dumps, loads, pack, unpack_ids

log = logging.getLogger('looppool.remote')


# 2: WELCOME carries its share as an integer, not a pickle; H_NOTICE.
# 3: C_TASKS and H_REPLIES, batches of tasks and of replies.
VERSION = 3
# client -> host
AUTH, C_TASK, C_NOTE, C_BROADCAST, C_CANCEL, C_CREDIT, C_STATS, C_CONTROL = range(40, 48)
# A batch of tasks for any worker, as the pool's TASKS frame: ``count`` as arg, the payload
# packed by looppool.protocol.pack (the client's task ids, then the messages' list).
C_TASKS = 48
# What a C_CONTROL frame asks of the host's pool (its payload, ASCII); the answer is the
# pool's state once the change is complete.
CONTROLS = frozenset((b'pause', b'resume', b'restart'))
# host -> client
HELLO, WELCOME, REFUSED, H_REPLY, H_ERROR, H_ACK, H_RESULT, H_BROADCAST, H_NOTICE = \
    range(60, 69)
# Replies to any of the client's tasks, packed like C_TASKS: the ids, then the values' list.
H_REPLIES = 69
# A C_TASKS batch the host could not unpickle (one of its messages names what the host
# cannot import, say): ``count`` as arg, the ids as unsigned 64-bit integers (no pickle).
# The client sends those tasks again one by one, so that only the message at fault fails.
H_RESEND = 70
# The handshake (HELLO, AUTH, WELCOME, REFUSED) is all either side reads before its peer is
# authenticated, and none of it is a pickle: see access.py.

_NONCE = 32
_OPTS = struct.Struct('<h')     # worker_num (-1: any); for a broadcast, sticky: 0, 1, 2=named
_KEY = struct.Struct('<H')      # a broadcast's sticky name (UTF-8) follows its size
_PRE_AUTH_FRAME = 256           # nothing bigger is read before the peer is authenticated
_WELCOME = struct.Struct('<Q')  # the client's share of unacknowledged messages
_SESSION_SHIFT = 32
_MAX_TID = 2 ** _SESSION_SHIFT - 1   # a client's task ids are 1.._MAX_TID, then wrap
# The largest frame a client may send a host (a message or a broadcast), received into a
# buffer that grows as its bytes arrive: the most one session can make the host hold.
_MAX_MESSAGE = 1 << 30
# A connection's read buffer, kept for its life (see _Framed.get_buffer).
_READ_SIZE = 256 * 1024


def _checked_size(payload: bytes) -> bytes:
    """``payload``, if a pool host accepts a message of its size."""
    if len(payload) > _MAX_MESSAGE:
        raise ValueError(f'a message to a pool host is at most {_MAX_MESSAGE} bytes '
                         f'pickled; this one is {len(payload)}')
    return payload

def _broadcast_payload(message: Any, sticky: bool | str) -> bytes:
    if isinstance(sticky, str):
        key = sticky.encode()
        return _checked_size(_OPTS.pack(2) + _KEY.pack(len(key)) + key
                             + dumps(_traced(message)))
    if not isinstance(sticky, bool):
        raise TypeError(f'sticky must be a bool or a str name, got {sticky!r}')
    return _checked_size(_OPTS.pack(1 if sticky else 0) + _KEY.pack(0)
                         + dumps(_traced(message)))


def _task_payload(message: Any, worker_num: int | None, traced: bool = False) -> bytes:
    """A C_TASK or C_NOTE payload: the target worker (-1: any) and the pickled message
    (with the caller's trace context, unless ``traced`` says it has it already)."""
    if worker_num is not None and (type(worker_num) is not int or worker_num < 0):
        raise ValueError(f'worker_num must be a worker number, got {worker_num!r}')
    return _checked_size(_OPTS.pack(-1 if worker_num is None else worker_num)
                         + dumps(message if traced else _traced(message)))


def _traced(message: Any) -> Any:
    """``message``, with the caller's trace context when OpenTelemetry is on (and the
    context holds anything: the cheap test first)."""
    if tracing.ENABLED and tracing.current_context():
        return tracing.outgoing(message)
    return message


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


def _resolve(future: Any, kind: int, payload: Any) -> None:
    """Resolve a call's future (asyncio or concurrent) from the host's answer to it."""
    if kind == H_REPLY:
        try:
            future.set_result(loads(payload))
        except BaseException as exc:
            future.set_exception(pickle.UnpicklingError(
                f'the reply could not be unpickled here: {exc!r}'))
    elif kind == H_ERROR:
        error = _decode_error(payload)
        if isinstance(error, (asyncio.CancelledError, concurrent.futures.CancelledError)):
            future.cancel()   # the task was cancelled in its worker
        else:
            future.set_exception(error)
    else:
        _resolve_broadcast(future, payload)


def _resend_payload(ids: list[int]) -> bytes:
    return array.array('Q', ids).tobytes()


def _read_resend(arg: int, payload: Any) -> list[int]:
    """The ids of an H_RESEND frame (``arg`` of them)."""
    ids = array.array('Q')
    ids.frombytes(bytes(payload))
    if len(ids) != arg:
        raise ValueError(f'an H_RESEND frame of {len(ids)} ids says {arg}')
    return ids.tolist()


def _read_replies(payload: Any) -> tuple[list[int], list[Any] | BaseException]:
    """An H_REPLIES frame's task ids, and their values (or why they cannot be read)."""
    ids, data = unpack_ids(payload)
    try:
        values = loads(data)
    except BaseException as exc:
        return ids, pickle.UnpicklingError(
            f'a batch of {len(ids)} replies could not be unpickled here: {exc!r}')
    if type(values) is not list or len(values) != len(ids):
        return ids, ValueError('a batch of replies from the pool host does not match its ids')
    return ids, values


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


class _Framed(asyncio.BufferedProtocol):
    """Frames over an asyncio transport, with writes coalesced per loop iteration.

    The transport reads into one buffer this connection keeps for its life: a fresh
    256 KiB object for every read (a plain Protocol's ``data_received``) costs a mapping,
    a shrink, an unmapping and a page fault each time, about 15 us of a round trip through
    a pool host here. The frames of a read are views of it, valid while they are handled:
    what a handler keeps, or hands to a later loop iteration, it copies (the parser itself
    copies a partial frame)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = Parser(_PRE_AUTH_FRAME, grow=True)
        self.out: list[bytes] = []
        self.closed = False
        self._buffer: memoryview | None = None   # made at the first read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, kind: int, arg: int, payload: Any = b'', now: bool = False) -> None:
        """Queue a frame, written at the end of this loop iteration with the others; with
        ``now`` and nothing else queued, written at once (a round trip at a time)."""
        if self.closed:
            return
        out = self.out
        if now and not out and self.transport is not None:
            self.transport.write(HEADER.pack(len(payload), kind, arg) + payload)
            return
        out.append(HEADER.pack(len(payload), kind, arg))
        out.append(payload if type(payload) is bytes else bytes(payload))
        if len(out) == 2:
            self.loop.call_soon(self.flush)

    def send_batch(self, kind: int, ids: list[int], items_pickle: bytes) -> None:
        """Send a C_TASKS or H_REPLIES frame: ``ids`` and the pickle of their items."""
        if self.closed:
            return
        parts = pack(ids, items_pickle)
        out = self.out
        if not out:
            self.loop.call_soon(self.flush)
        out.append(HEADER.pack(sum(map(len, parts)), kind, len(ids)))
        out.extend(parts)

    def flush(self) -> None:
        if self.out and not self.closed and self.transport is not None:
            data = b''.join(self.out)
            self.out.clear()
            self.transport.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._buffer is None:
            self._buffer = memoryview(bytearray(_READ_SIZE))
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        assert self._buffer is not None
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: Any) -> None:
        """The bytes of one read (lent for this call: see the class docstring)."""
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

