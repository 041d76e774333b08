"""Framing and batched, non-blocking transport over one end of a socketpair.

A frame is a 13-byte header followed by a payload::

    +----------------+--------+------------------+-------------------+
    | length: uint32 | kind:  | arg: int64       | payload: `length` |
    | (payload only) | uint8  | (task id, count) | bytes (a pickle)  |
    +----------------+--------+------------------+-------------------+

Kind and argument travel outside the pickle so that a payload which cannot be unpickled can
still be answered for the right task, and control frames (cancel, credit, stop) cost no
pickling at all.

Frames sent during one loop iteration are coalesced: ``send()`` appends to a buffer and the
first call in an iteration schedules one ``flush()`` for the next, which hands everything to
the kernel in one ``send``/``sendmsg`` call. Large payloads are queued as their own buffers
rather than copied into the small-frame buffer. Reads are driven by the loop's reader
callback; a frame larger than a read is received straight into a buffer of its own size.

A :class:`Channel` lives in one process, on one asyncio loop, and is not thread-safe.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, Union

from . import shm

log = logging.getLogger('looppool')

__all__ = ['Channel', 'FrameTooLarge', 'HEADER', 'Parser', 'check_size', 'encode',
           'socketpair']

HEADER = struct.Struct('<IBq')
_HEADER_SIZE = HEADER.size
# The most one frame carries: its length field is a uint32. Read where it is checked, at
# the time (a test lowers it).
_MAX_PAYLOAD = 2 ** 32 - 1
# Payloads at least this large are sent from their own buffer, not copied.
_LARGE = 1 << 16
# A large frame is received into a buffer of its own size. One buffer up to this size is
# kept and used again for the next large frame, once nothing refers to it any more: a new
# one costs a page fault per 4 KiB, which for 1 MiB is about as much as the copy itself.
_SPARE_MAX = 64 << 20
# Reads go into one buffer per channel, kept for its life: a fresh 256 KiB object per read
# would be mapped, shrunk and unmapped by the allocator, three system calls and a page fault
# on every read (a fifth of a round trip's time).
_READ_SIZE = 1 << 18
# sendmsg() takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 512
# Kernel socket buffers: larger than the default so a burst of frames (or a 1 MiB payload)
# moves in few system calls. The kernel caps the value at net.core.wmem_max/rmem_max.
_SOCKET_BUFFER = 4 << 20

_SHM_KIND = shm.BIG
# How long the news that a peer's segment was read may wait for other frames to ride with
# before it is sent on its own (see Channel._release).
_RELEASE_DELAY = 0.005
# Room for the descriptors of one sendmsg() (see looppool.shm: at most MAX_BUFFERS).
_ANCILLARY = socket.CMSG_SPACE(shm.MAX_BUFFERS * 4) if shm.AVAILABLE else 0

Buffer = Union[bytes, bytearray, memoryview]
Frame = tuple[int, int, Buffer]


class _Fds:
    """In a channel's write queue: the descriptors that go with the bytes after it (the
    next sendmsg() carries them); those given away are closed here once it has, the
    others are the channel's segments (see looppool.shm.Segments)."""

    __slots__ = ('fds', 'given')

    def __init__(self, fds: list[int], given: list[int]) -> None:
        self.fds = fds
        self.given = given

    def close(self) -> None:
        given, self.given = self.given, []
        for fd in given:
            os.close(fd)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """Return a connected pair of Unix stream sockets with large kernel buffers."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (parent, child):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:  # pragma: no cover - a platform that refuses keeps its default
                pass
    return parent, child


def check_size(size: int) -> None:
    """Raise :class:`ValueError` if a pickle of ``size`` bytes is more than one frame
    carries."""
    if size > _MAX_PAYLOAD:
        raise _too_large(size)


def _too_large(size: int) -> ValueError:
    return ValueError(f'pickled, it is {size} bytes: more than one frame carries '
                      f'({_MAX_PAYLOAD} bytes, 4 GiB less one); send data that large '
                      f'through a file or shared memory')


def encode(kind: int, arg: int, payload: Buffer = b'') -> bytes:
    """One frame as bytes (for transports that take whole writes)."""
    return HEADER.pack(len(payload), kind, arg) + payload


def _peer_pid(sock: socket.socket) -> int | str:
    try:
        pid, _, _ = struct.unpack('3i', sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize('3i')))
        return int(pid)
    except (OSError, AttributeError):
        return '?'


def _ignore(*args: object) -> None:
    """What a closed channel calls instead of its owner's callbacks (it calls none)."""


class FrameTooLarge(ValueError):
    """A peer announced a frame larger than this channel accepts."""


class Parser:
    """Turns a byte stream into frames; owns the partial frame between reads.

    ``feed(data)`` returns the complete frames; a frame larger than one read is collected
    into a buffer of its own size, so a large payload is copied once, not once per read.
    With ``grow=True`` (for a peer that is not our own child) that buffer grows as the bytes
    arrive instead, so that a header alone cannot make this process allocate 4 GiB.
    """

    __slots__ = ('max_frame', '_leftover', '_big_view', '_big_fill', '_big_head', '_spare',
                 'delivered_big', '_grow', '_growing', '_grow_size', 'saw_shm')

    def __init__(self, max_frame: int = _MAX_PAYLOAD, grow: bool = False) -> None:
        self.max_frame = max_frame
        self._grow = grow
        self._growing: bytearray | None = None   # with grow=True: the large frame so far
        self._grow_size = 0
        self._leftover = b''
        self._big_view: memoryview | None = None   # the large frame being collected
        self._big_fill = 0
        self._big_head = (0, 0)
        self._spare: bytearray | None = None   # a large frame's buffer, to use again
        self.delivered_big = False   # a large frame was handed out: see reclaim()
        self.saw_shm = False   # a frame flagged shm.BIG was handed out: see Channel

    @property
    def collecting(self) -> memoryview | None:
        """The free part of a large frame's buffer, to ``recv_into`` directly, if any."""
        if self._big_view is None:
            return None
        return self._big_view[self._big_fill:]

    def collected(self, count: int) -> list[Frame]:
        """``count`` bytes were received into :attr:`collecting`."""
        assert self._big_view is not None
        self._big_fill += count
        if self._big_fill < len(self._big_view):
            return []
        kind, arg = self._big_head
        payload = self._big_view
        self._big_view = None
        self.delivered_big = True
        if kind & shm.BIG:
            self.saw_shm = True
        return [(kind, arg, payload)]

    def reclaim(self) -> None:
        """The frames handed out are done with: keep the large frame's buffer for the next
        one, unless something still refers to it (a view kept, or queued to be sent on)."""
        self.delivered_big = False
        # Held by this attribute and by getrefcount's argument, and by nothing else when
        # every memoryview of it is gone (the views share one reference to it).
        if self._spare is not None and sys.getrefcount(self._spare) > 2:
            self._spare = None

    def _buffer(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes for a large frame."""
        spare = self._spare
        # Not while a frame handed out may still be in it (until reclaim(): one read can
        # end a large frame and begin the next).
        if spare is not None and len(spare) >= size and not self.delivered_big:
            return memoryview(spare)[:size]
        buffer = bytearray(size)
        self._spare = buffer if size <= _SPARE_MAX else None
        return memoryview(buffer)

    def feed(self, data: Buffer) -> list[Frame]:
        """The frames ``data`` completes. ``data`` may be a buffer lent for this call only
        (a channel's read buffer): what is kept of it, a partial frame, is copied."""
        if self._growing is not None:
            growing = self._growing
            take = min(self._grow_size - len(growing), len(data))
            growing += data[:take]
            if len(growing) < self._grow_size:
                return []
            self._growing = None
            done: list[Frame] = [(*self._big_head, memoryview(growing))]
            return done + self.feed(data[take:]) if take < len(data) else done
        if self._big_view is not None:
            view = self.collecting
            assert view is not None
            take = min(len(view), len(data))
            view[:take] = data[:take]
            done = self.collected(take)
            if take == len(data):
                return done
            return done + self.feed(data[take:])
        if self._leftover:
            data = self._leftover + data
            self._leftover = b''
        frames: list[Frame] = []
        unpack = HEADER.unpack_from
        total = len(data)
        whole = memoryview(data)
        pos = 0
        while total - pos >= _HEADER_SIZE:
            size, kind, arg = unpack(data, pos)
            if size > self.max_frame:
                raise FrameTooLarge(f'the peer sent a frame of {size} bytes; at most '
                                    f'{self.max_frame} are accepted here')
            start = pos + _HEADER_SIZE
            end = start + size
            if kind & _SHM_KIND:
                self.saw_shm = True
            if end > total:
                if size >= _LARGE and self._grow:
                    self._growing = bytearray(whole[start:])
                    self._grow_size = size
                    self._big_head = (kind, arg)
                    pos = total
                elif size >= _LARGE:
                    big = self._buffer(size)
                    have = total - start
                    big[:have] = whole[start:]
                    self._big_view = big
                    self._big_fill = have
                    self._big_head = (kind, arg)
                    pos = total
                break
            frames.append((kind, arg, whole[start:end]))
            pos = end
        if pos < total:
            self._leftover = bytes(whole[pos:])   # data may be a lent buffer: copy
        return frames


class Channel:
    """One end of a duplex frame channel, read and written by an asyncio loop.

    ``on_frames(frames)`` is called on the loop with a list of ``(kind, arg, payload)``
    tuples; a payload may be a ``memoryview`` that is only valid during the call.
    ``on_close()`` is called once when the peer closes its end or the socket breaks.
    ``before_flush`` (optional) is called right before queued frames are written, so the
    owner can append frames that summarise the iteration (credits, counts).

    With ``shared_memory`` (both ends must agree, and the peer must be trusted: our own
    parent or child), a payload may be a :class:`looppool.shm.Big`: its buffers go in
    memfds whose descriptors travel with the frame, and a frame flagged so reaches
    ``on_frames`` as a received ``Big``.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_frames: Callable[[list[Frame]], None], on_close: Callable[[], None],
                 before_flush: Callable[[], None] | None = None,
                 shared_memory: bool = False) -> None:
        sock.setblocking(False)
        self._sock = sock
        # Descriptors received and not yet taken by their frame, in the order sent, and
        # how many _Fds wait in the write queue.
        self._fds: collections.deque[int] = collections.deque()
        self._markers = 0
        self._segments = shm.Segments()
        self._mappings = shm.Mappings()
        self._released: list[int] = []   # the peer's segments read here, to tell it
        # The bytes read from those of them that held one, by id(): one sent back before
        # its segment is released goes back as that segment (see shm.Segments.back).
        self._received: dict[int, tuple[bytes, int]] = {}
        self._release_timer: asyncio.TimerHandle | None = None
        self._expire_timer: asyncio.TimerHandle | None = None   # the large segment kept
        self._recv_into: Callable[[Buffer], int] = sock.recv_into
        self._recv: Callable[[int], bytes] = sock.recv
        if shared_memory and shm.AVAILABLE:
            self._recv_into = self._recv_into_fds
            self._recv = self._recv_fds
        self._fd = sock.fileno()
        self._loop = loop
        self._on_frames = on_frames
        self._on_close = on_close
        self.before_flush = before_flush
        # Called once (from the loop) when everything queued has been written; set by an
        # owner that must not go on before the peer can read what it sent (see _Runner).
        self.on_drained: Callable[[], None] | None = None
        self._wbuf = bytearray()
        self._queue: collections.deque[Any] = collections.deque()   # Buffer or _Fds
        self._flush_scheduled = False
        self._writer_registered = False
        self._parser = Parser()
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._reading = False   # frames from _rbuf are being handled: see _read_once
        self.closed = False
        self._write_closed = False   # a write failed: the peer is gone, its data is not
        loop.add_reader(self._fd, self.read_ready)

    def fileno(self) -> int:
        return self._fd

    @property
    def handling(self) -> bool:
        """Whether ``on_frames`` is running for frames of this channel right now."""
        return self._reading

    @property
    def backed_up(self) -> bool:
        """Whether the kernel refused to take more: the peer is not reading."""
        return self._writer_registered

    @property
    def wants_write(self) -> bool:
        """Whether frames are waiting to be written."""
        return bool(self._wbuf or self._queue)

    # -- writing ---------------------------------------------------------------------------

    def send(self, kind: int, arg: int, payload: Buffer | shm.Big = b'', now: bool = False
             ) -> None:
        """Queue one frame; it is written when the loop next flushes this channel, or at
        once with ``now``."""
        if isinstance(payload, shm.Big):
            self._send_shm(kind, arg, [], payload, now)
            return
        size = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
        if size > _MAX_PAYLOAD:
            raise _too_large(size)   # nothing of it is sent
        wbuf = self._wbuf
        wbuf += HEADER.pack(size, kind, arg)
        if size < _LARGE:
            wbuf += payload
        else:
            self._queue.append(wbuf)
            self._queue.append(payload)
            self._wbuf = bytearray()
        if now:
            self.flush()
        elif not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def send_parts(self, kind: int, arg: int, parts: Sequence[Buffer | shm.Big],
                   now: bool = False) -> None:
        """Queue one frame whose payload is ``parts`` joined, without joining them; with
        ``now``, write it (and what waits before it) at once instead of at the flush. The
        last part may be a :class:`looppool.shm.Big`."""
        last = parts[-1] if parts else b''
        if type(last) is shm.Big:
            self._send_shm(kind, arg, parts[:-1], last, now)  # type: ignore[arg-type]
            return
        self._queue_parts(kind, arg, parts)  # type: ignore[arg-type]
        if now:
            self.flush()
        elif not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def _queue_parts(self, kind: int, arg: int, parts: Sequence[Buffer]) -> None:
        size = sum(len(part) if type(part) is bytes else memoryview(part).nbytes
                   for part in parts)
        if size > _MAX_PAYLOAD:
            raise _too_large(size)   # nothing of it is sent
        wbuf = self._wbuf
        wbuf += HEADER.pack(size, kind, arg)
        for part in parts:
            if len(part) < _LARGE:
                wbuf += part
            else:
                self._queue.append(wbuf)
                self._queue.append(part)
                wbuf = self._wbuf = bytearray()

    def _send_shm(self, kind: int, arg: int, parts: Sequence[Buffer], big: shm.Big,
                  now: bool) -> None:
        """Queue a frame whose payload is ``parts`` and ``big``: its buffers are written to
        memfds now, and their descriptors go with the frame's first bytes. On the wire the
        payload is ``big``'s head, ``parts``, then ``big``'s pickle; the receiver's
        ``Big.data`` is ``parts`` and the pickle."""
        parts = [b'', *parts, big.data]   # the head first: see below
        size = sum(memoryview(part).nbytes for part in parts) + big.head_size
        if size > _MAX_PAYLOAD:
            raise _too_large(size)   # nothing of it is sent
        try:
            fds, ids, given, back = self._segments.write(big, self._received)
        except OSError as exc:   # no memory for it, say: the socket takes it instead
            log.warning('a payload could not be put in shared memory (%r); it goes '
                        'through the socket', exc)
            self._queue_parts(kind, arg, [*parts[1:-1], shm.inline(big)])
            if now:
                self.flush()
            else:
                self.schedule_flush()
            return
        parts[0] = big.head(ids, back)
        for index in back:   # the peer has it back with this frame: no RELEASE for it
            segment = ids[index]
            if segment in self._released:
                self._released.remove(segment)
        if back:
            self._received = {key: found for key, found in self._received.items()
                              if found[1] in self._released}
        marker = _Fds(fds, given)
        if self._wbuf:
            self._queue.append(self._wbuf)
            self._wbuf = bytearray()
        self._queue.append(marker)
        self._markers += 1
        self._queue_parts(kind | _SHM_KIND, arg, parts)
        if now:
            self.flush()
        elif not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def schedule_flush(self) -> None:
        """Make sure ``before_flush`` and a flush run in the next loop iteration."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write as much as the kernel takes now; the rest waits for writability."""
        if self.closed or self._write_closed:
            self._flush_scheduled = False
            self._drop_queue()
            self._wbuf = bytearray()
            self._released.clear()
            self._received.clear()
            if self._release_timer is not None:
                self._release_timer.cancel()
                self._release_timer = None
            if self._writer_registered and not self.closed:
                self._loop.remove_writer(self._fd)
                self._writer_registered = False
            return
        if self.before_flush is not None:
            # What it queues is written below: no other flush to schedule for it (that
            # would cost the loop one more turn).
            self._flush_scheduled = True
            try:
                self.before_flush()
            finally:
                self._flush_scheduled = False
        else:
            self._flush_scheduled = False
        if self._released and (self._wbuf or self._queue):
            self._queue_released()   # with what goes anyway: no write of its own
        queue = self._queue
        if self._wbuf:
            queue.append(self._wbuf)
            self._wbuf = bytearray()
        sock = self._sock
        while queue:
            try:
                if self._markers:
                    sent = self._send_with_fds()
                elif len(queue) == 1:
                    sent = sock.send(queue[0])
                else:
                    sent = sock.sendmsg([queue[i] for i in range(min(len(queue), _IOV_MAX))])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # The peer is gone; its exit is reported by its owner (sentinel or EOF).
                # What it wrote before it went is still to be read, up to the end of file:
                # only writing ends here (a RELEASE, say, sent as a worker exits must not
                # lose that worker's last replies).
                self._drop_queue()
                self._write_closed = True
                break
            while sent:
                first = queue[0]
                size = len(first) if type(first) is not memoryview else first.nbytes
                if sent >= size:
                    queue.popleft()
                    sent -= size
                else:
                    queue[0] = memoryview(first).cast('B')[sent:]
                    sent = 0
        if queue and not self._writer_registered:
            self._loop.add_writer(self._fd, self.flush)
            self._writer_registered = True
        elif not queue and self._writer_registered:
            self._loop.remove_writer(self._fd)
            self._writer_registered = False
        if not queue and self.on_drained is not None and not self._write_closed:
            drained, self.on_drained = self.on_drained, None
            self._loop.call_soon(drained)

    def _send_with_fds(self) -> int:
        """One sendmsg() of what waits, with the descriptors of the frames among it.

        They ride on its first byte, so they reach the peer before (or with) the frames
        they belong to, in order; the peer takes them from its queue as each frame arrives.
        Descriptors and bytes go out together, in one system call and one wake-up of the
        peer, rather than each group of frames on its own.
        """
        queue = self._queue
        buffers: list[Buffer] = []
        fds: list[int] = []
        markers: list[_Fds] = []
        for item in queue:
            if type(item) is _Fds:
                if len(fds) + len(item.fds) > shm.MAX_BUFFERS:
                    break
                markers.append(item)
                fds += item.fds
            elif len(buffers) < _IOV_MAX:
                buffers.append(item)
            else:
                break
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))] \
            if fds else []
        sent = self._sock.sendmsg(buffers, ancillary)
        # Carried: the peer holds them now, and so we need not.
        for marker in markers:
            queue.remove(marker)
            marker.close()
        self._markers -= len(markers)
        return sent

    def _drop_queue(self) -> None:
        """Forget what waits to be written, closing the descriptors among it."""
        for item in self._queue:
            if type(item) is _Fds:
                item.close()
        self._queue.clear()
        self._markers = 0

    # -- reading ---------------------------------------------------------------------------

    def _recv_into_fds(self, buffer: Buffer) -> int:
        count, ancillary, flags, _ = self._sock.recvmsg_into([buffer], _ANCILLARY)
        self._keep_fds(ancillary, flags)
        return count

    def _recv_fds(self, size: int) -> bytes:
        data, ancillary, flags, _ = self._sock.recvmsg(size, _ANCILLARY)
        self._keep_fds(ancillary, flags)
        return data

    def _keep_fds(self, ancillary: list[tuple[int, int, bytes]], flags: int) -> None:
        fds = array.array('i')
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if flags & socket.MSG_CTRUNC:
            # Descriptors were dropped (this process is at its limit of open files): the
            # frames they belong to cannot be read; a ConnectionError reads as the end.
            for fd in fds:
                os.close(fd)
            log.error('pid %d could not take the descriptors of a frame in shared memory '
                      '(too many open files?); the channel to pid %s is closed',
                      os.getpid(), _peer_pid(self._sock))
            raise ConnectionError('shared-memory descriptors were dropped')
        self._fds.extend(fds)

    def _take_fds(self, count: int) -> list[int]:
        fds = self._fds
        if len(fds) < count:
            raise ConnectionError(f'a frame needs {count} shared-memory descriptors and '
                                  f'{len(fds)} arrived')
        return [fds.popleft() for _ in range(count)]

    def _shared(self, frames: list[Frame]) -> list[Frame]:
        """The frames with each payload flagged shm.BIG read from its descriptors; the
        peer's RELEASE frames are taken out here."""
        self._parser.saw_shm = False
        segments = self._segments
        # The segments released first: the bytes they kept (see shm.Segments.back) are
        # let go before the buffers of the frames that came with them are read.
        for kind, _, payload in frames:
            if kind == shm.RELEASE:
                for segment in shm.released_ids(payload):
                    segments.released(segment)
        found: list[Frame] = []
        for kind, arg, payload in frames:
            if kind & _SHM_KIND and kind != shm.RELEASE:
                found.append((kind ^ _SHM_KIND, arg, shm.receive(  # type: ignore[arg-type]
                    payload, self._take_fds, self._release, self._mappings,
                    segments.back)))
            elif kind != shm.RELEASE:
                found.append((kind, arg, payload))
        if segments.large is not None and self._expire_timer is None:
            self._expire_timer = self._loop.call_later(shm.KEEP_LARGE_SECONDS,
                                                       self._expire)
        return found

    def _expire(self) -> None:
        """Close the large segment kept if it has been idle long enough (see
        shm.Segments.expire); look again later if not."""
        self._expire_timer = None
        left = self._segments.expire()
        if left and not self.closed:
            self._expire_timer = self._loop.call_later(left, self._expire)

    def _release(self, segment: int, read: bytes | None) -> None:
        """The peer's ``segment`` is read (into ``read``, a bytes, if it was one): tell it
        with the next frames written (a reply, the next message), or on its own after
        _RELEASE_DELAY if none go by then: no write, wake-up or loop iteration of its own
        in a steady exchange."""
        self._released.append(segment)
        if read is not None:
            self._received[id(read)] = (read, segment)
        if self._release_timer is None:
            self._release_timer = self._loop.call_later(_RELEASE_DELAY, self._send_released)

    def _send_released(self) -> None:
        self._release_timer = None
        if self._released and not self.closed:
            self._queue_released()
            self.flush()

    def _queue_released(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        released, self._released = self._released, []
        self._received.clear()
        self._queue_parts(shm.RELEASE, len(released), [shm.release_payload(released)])


    def read_ready(self) -> None:
        """Read what the socket holds and hand complete frames to ``on_frames``."""
        self._read_once()

    def _read_once(self) -> bool:
        """One read; returns whether any bytes arrived."""
        if self.closed:
            return False
        parser = self._parser
        target = parser.collecting
        target_set = target is not None
        reading = self._reading
        data: Buffer
        try:
            if target is not None:
                count = self._recv_into(target)
                data = b''
            elif not reading:
                count = self._recv_into(self._rbuf)
                data = self._rview[:count]
            else:
                # A read while this channel's frames are being handled (an owner that
                # drains it from inside on_frames; the pool does not): _rbuf still holds
                # them, so a buffer of its own.
                data = self._recv(_READ_SIZE)
                count = len(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            count = 0
        if not count:
            self._lost()
            return False
        del target
        frames = parser.collected(count) if target_set else parser.feed(data)
        if parser.saw_shm:
            try:
                frames = self._shared(frames)
            except (OSError, ValueError) as exc:
                # Shared memory that cannot be read (no memory to map it, descriptors
                # refused at this process's limit): the channel cannot go on in order.
                # Ending it ends the peer, whose tasks fail as lost: none waits forever.
                log.error('a frame in shared memory could not be read (%r); the channel '
                          'to pid %s is closed', exc, _peer_pid(self._sock))
                self._lost()
                return False
        if frames:
            self._reading = True
            try:
                if self._flush_scheduled:
                    self._on_frames(frames)
                else:
                    # What the owner sends while it handles these frames is written right
                    # after, in this same turn of the loop: no flush to schedule for it.
                    self._flush_scheduled = True
                    try:
                        self._on_frames(frames)
                    finally:
                        if self._flush_scheduled and not self.closed:
                            self.flush()
            finally:
                self._reading = reading
            if parser.delivered_big:
                del frames
                parser.reclaim()
        return True

    def drain(self) -> None:
        """Read every frame the socket holds now, without waiting for the loop to say so:
        once the peer has exited, or while the owner is busy in one long callback and wants
        what came meanwhile."""
        while self._read_once():
            pass

    # -- closing ---------------------------------------------------------------------------

    def _lost(self) -> None:
        if self.closed:
            return
        on_close = self._on_close
        self.close()
        on_close()

    def close(self) -> None:
        """Stop reading and writing and close the socket. Unsent frames are dropped."""
        if self.closed:
            return
        self.closed = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._writer_registered:
                self._loop.remove_writer(self._fd)
        self._writer_registered = False
        self._drop_queue()
        self._wbuf = bytearray()
        while self._fds:   # arrived for frames that will not be read
            os.close(self._fds.popleft())
        self._segments.close()
        self._mappings.close()
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._expire_timer is not None:
            self._expire_timer.cancel()
            self._expire_timer = None
        self._received.clear()
        self._sock.close()
        # The callbacks refer to the owner (the pool's, to the link of a worker process,
        # which refers to this channel): dropping them ends that reference cycle, so a dead
        # worker's link and this channel's buffers are freed as soon as nothing else holds
        # them, not at some later cyclic garbage collection.
        self._on_frames = self._on_close = _ignore
        self.before_flush = None
