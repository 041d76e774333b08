"""Big buffers through shared memory: pickle protocol 5, out of band, over memfd descriptors.

A message or reply that holds a large buffer does not travel through the socket::

    sender                                              receiver
      dumps(obj, threshold) -> Big: a small pickle,
        the large buffers kept aside (bytes,
        bytearray, memoryview by persistent id;
        NumPy and other PickleBuffers out of band)
      Channel.send: each buffer written into an
        anonymous memfd (one copy), the frame's kind
        flagged BIG, the descriptors attached with
        SCM_RIGHTS  ----- the socket carries the small pickle and the descriptors ----->
                                                        Channel: take the frame's
                                                        descriptors, read or map each
                                                        one, close it -> Big
                                                        loads(Big): bytes and bytearray
                                                        are fresh copies; memoryviews
                                                        and NumPy arrays are views of
                                                        the mapping

Nothing has a name: a memfd lives as long as a descriptor or a mapping refers to it, so
whatever process dies, the kernel frees the memory with the last holder (a descriptor in
flight in a socket is released with the socket). There is nothing to unlink, in
``/dev/shm`` or anywhere.

Frame payload of a BIG frame::

    count: uint32 | count x (size: uint64, mode: uint8) | the pickle
    (plus ``count`` descriptors, in order, in the ancillary data of the socket)

Who owns what: a :class:`Big` being sent holds references to the sender's buffers until
the channel writes them (the channel owns the descriptors from then until ``sendmsg``
has carried them); a received :class:`Big` owns its buffers, and a mapping is unmapped
when the last object viewing it goes. Used on one loop of one process; not thread-safe.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

__all__ = ['AVAILABLE', 'BIG', 'Big', 'RELEASE', 'Segments', 'THRESHOLD', 'dumps', 'loads',
           'receive']

# memfd_create and descriptor passing: Linux (and FreeBSD 13). Elsewhere big buffers stay
# in the socket.
AVAILABLE = hasattr(os, 'memfd_create') and hasattr(socket, 'SCM_RIGHTS') \
    and hasattr(socket.socket, 'recvmsg_into')

# A buffer at least this large travels through shared memory (see the manual's "Big
# payloads" page for the measurements behind it). Read when a pool is made.
THRESHOLD = 1 << 18

# The flag on a frame's kind that says its payload is a Big (see the module's docstring).
BIG = 0x80
# A frame kind the channels keep to themselves: the peer has read these segments (payload:
# their ids, uint32 each), which may be written again.
RELEASE = 0xFF

_PROTOCOL = 5
_COUNT = struct.Struct('<I')
_ENTRY = struct.Struct('<QBI')
_IDS = struct.Struct('<I')
# How the receiver gives a buffer back: a bytes (read), a bytearray (read), a view of the
# mapping (memoryview, by persistent id), or a view passed to pickle as an out-of-band
# buffer (NumPy arrays and every other PickleBuffer).
_BYTES, _BYTEARRAY, _VIEW, _OUT_OF_BAND = range(4)
# At most this many buffers of one message go out of band (the rest stay in its pickle):
# one sendmsg() carries a frame's descriptors, and Linux takes at most 253 at a time.
MAX_BUFFERS = 250
# What one end of a channel keeps of the segments its peer has read, to write into again
# (a fresh memfd costs its pages: allocated, zeroed and freed again, three times the copy).
_KEEP_SEGMENTS = 4
_KEEP_BYTES = 64 << 20
# One read or write moves at most this much (Linux stops at 2 GiB less a page).
_CHUNK = 1 << 30


class Big:
    """A payload whose large buffers travel beside it: ``data`` is the pickle, ``buffers``
    the buffers (being sent: the sender's; received: fresh objects or views), ``modes``
    how each one is given back."""

    __slots__ = ('data', 'buffers', 'modes')

    def __init__(self, data: Any, buffers: list[Any], modes: list[int]) -> None:
        self.data = data
        self.buffers = buffers
        self.modes = modes

    def __len__(self) -> int:
        return len(self.data)

    @property
    def nbytes(self) -> int:
        """The bytes of the buffers (what shared memory carries)."""
        return sum(memoryview(buffer).nbytes for buffer in self.buffers)

    @property
    def head_size(self) -> int:
        return _COUNT.size + len(self.buffers) * _ENTRY.size

    def head(self, ids: list[int]) -> bytes:
        """The descriptor of the buffers that starts the frame's payload (``ids``: the
        segment of each, 0 for one given away)."""
        return _COUNT.pack(len(self.buffers)) + b''.join(
            _ENTRY.pack(memoryview(buffer).nbytes, mode, segment)
            for buffer, mode, segment in zip(self.buffers, self.modes, ids))

    def split(self, start: int) -> Big:
        """The same buffers with the pickle from ``start`` on (a batch's items)."""
        return Big(memoryview(self.data)[start:], self.buffers, self.modes)


class _Pickler(pickle.Pickler):
    """Keeps every large bytes, bytearray and memoryview out of the pickle by persistent
    id, and every large PickleBuffer (NumPy's arrays) out of band."""

    def __init__(self, file: io.BytesIO, threshold: int, keep: bool = True) -> None:
        self.buffers: list[Any] = []
        self.modes: list[int] = []
        self.threshold = threshold if keep else 1 << 62
        super().__init__(file, _PROTOCOL, buffer_callback=self.out_of_band)

    def reducer_override(self, obj: Any) -> Any:
        # A memoryview below the threshold (which plain pickle refuses) is sent as a copy,
        # and arrives as a memoryview of that copy: small or large, it pickles.
        if type(obj) is memoryview:
            return _view, (obj.tobytes(), obj.format, obj.shape, obj.readonly)
        return NotImplemented

    def out_of_band(self, buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < self.threshold or len(self.buffers) >= MAX_BUFFERS:
            return True   # in the pickle
        self.buffers.append(view)
        self.modes.append(_OUT_OF_BAND)
        return False

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if len(self.buffers) >= MAX_BUFFERS:
            return None
        if kind is bytes or kind is bytearray:
            if len(obj) < self.threshold:
                return None
            self.buffers.append(obj)
            self.modes.append(_BYTES if kind is bytes else _BYTEARRAY)
            return len(self.buffers) - 1
        if kind is memoryview and obj.nbytes >= self.threshold and obj.c_contiguous:
            self.buffers.append(obj.cast('B') if obj.ndim != 1 or obj.format != 'B'
                                else obj)
            self.modes.append(_VIEW)
            return (len(self.buffers) - 1, obj.format, obj.shape, obj.readonly)
        return None


def _big(obj: Any, threshold: int) -> Big | None:
    file = io.BytesIO()
    pickler = _Pickler(file, threshold)
    pickler.dump(obj)
    if not pickler.buffers:
        return None
    return Big(file.getvalue(), pickler.buffers, pickler.modes)


def _small(obj: Any, threshold: int) -> bytes:
    """``obj`` pickled whole, its memoryviews as copies."""
    file = io.BytesIO()
    _Pickler(file, threshold, keep=False).dump(obj)
    return file.getvalue()


def _view(data: Any, fmt: str, shape: tuple[int, ...], readonly: bool) -> memoryview:
    """A memoryview of ``data`` with the format, shape and read-only flag of the one
    pickled."""
    view: Any = memoryview(data)
    if fmt != 'B' or len(shape) != 1:
        view = view.cast(fmt, shape)
    return view.toreadonly() if readonly else view


def dumps(obj: Any, threshold: int) -> Any:
    """``obj`` pickled (protocol 5): bytes, or a :class:`Big` when it holds buffers of
    ``threshold`` bytes or more (0: never)."""
    if threshold:
        kind = type(obj)
        if kind is bytes or kind is bytearray or kind is memoryview:
            big = _big(obj, threshold)
            if big is not None:
                return big
            if kind is memoryview:
                return _small(obj, threshold)
        else:
            found: list[pickle.PickleBuffer] = []

            def in_band(buffer: pickle.PickleBuffer) -> bool:
                if buffer.raw().nbytes < threshold:
                    return True
                found.append(buffer)
                return False

            try:
                data = pickle.dumps(obj, _PROTOCOL, buffer_callback=in_band)
            except TypeError:   # a memoryview in it, say: the second pass takes those
                return _big(obj, threshold) or _small(obj, threshold)
            if found or len(data) >= threshold:
                # Large, or with buffers out of band: pickled again, keeping what is large
                # aside (a pickle this large costs more than a second pass over it).
                big = _big(obj, threshold)
                if big is not None:
                    return big
                if found:   # (not seen: the second pass finds what the first did)
                    return pickle.dumps(obj, _PROTOCOL)
            return data
    return pickle.dumps(obj, _PROTOCOL)


class _Unpickler(pickle.Unpickler):
    def __init__(self, big: Big) -> None:
        self.big = big
        super().__init__(io.BytesIO(big.data), buffers=[
            buffer for buffer, mode in zip(big.buffers, big.modes) if mode == _OUT_OF_BAND])

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, int):
            return self.big.buffers[pid]
        index, fmt, shape, readonly = pid
        return _view(self.big.buffers[index], fmt, shape, readonly)


def loads(big: Big) -> Any:
    """What a received :class:`Big` holds."""
    return _Unpickler(big).load()


# -- the descriptors -----------------------------------------------------------------------

class Segments:
    """The memfds one end of a channel writes buffers into.

    A buffer the peer reads into an object of its own (bytes, bytearray) goes in a segment
    that is *lent*: this end keeps its descriptor, and writes into it again once the peer
    has said it read it (``RELEASE``). A buffer the peer maps (a view) goes in a fresh
    memfd that is given away: the peer's mapping keeps it as long as it needs. At most
    ``_KEEP_SEGMENTS`` segments of ``_KEEP_BYTES`` in all are kept for use again. Owned by
    one channel; not thread-safe.
    """

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []       # (fd, bytes written into it at most)
        self.lent: dict[int, tuple[int, int]] = {}  # id -> (fd, size), being read
        self.next_id = 1

    def write(self, big: Big) -> tuple[list[int], list[int], list[int]]:
        """Write ``big``'s buffers: the descriptors to send, the id of each segment (0:
        given away), and the descriptors to close once sent."""
        fds: list[int] = []
        ids: list[int] = []
        given: list[int] = []
        try:
            for buffer, mode in zip(big.buffers, big.modes):
                view = memoryview(buffer).cast('B')
                size = view.nbytes
                if mode == _BYTES or mode == _BYTEARRAY:
                    fd, capacity = self.take(size)
                    segment = self.next_id
                    self.next_id = segment + 1 if segment < 0xFFFFFFFF else 1
                    self.lent[segment] = (fd, max(size, capacity))
                else:
                    fd = os.memfd_create('looppool', os.MFD_CLOEXEC)
                    segment = 0
                    given.append(fd)
                fds.append(fd)
                ids.append(segment)
                done = 0
                while done < size:
                    done += os.pwrite(fd, view[done:done + _CHUNK], done)
        except BaseException:
            for fd in given:
                os.close(fd)
            for segment in ids:
                if segment:
                    self.released(segment)
            raise
        return fds, ids, given

    def take(self, size: int) -> tuple[int, int]:
        """A kept segment large enough for ``size`` bytes (the smallest), or a new one."""
        best = -1
        for index, (_, capacity) in enumerate(self.free):
            if capacity >= size and (best < 0 or capacity < self.free[best][1]):
                best = index
        if best >= 0:
            return self.free.pop(best)
        return os.memfd_create('looppool', os.MFD_CLOEXEC), 0

    def released(self, segment: int) -> None:
        """The peer has read ``segment``: keep it for the next buffer, or close it."""
        found = self.lent.pop(segment, None)
        if found is None:
            return
        self.free.append(found)
        self.free.sort(key=_capacity, reverse=True)
        while len(self.free) > _KEEP_SEGMENTS or \
                sum(capacity for _, capacity in self.free) > _KEEP_BYTES:
            os.close(self.free.pop(0)[0])   # the largest goes first

    def close(self) -> None:
        for fd, _ in self.free:
            os.close(fd)
        for fd, _ in self.lent.values():
            os.close(fd)
        self.free.clear()
        self.lent.clear()


def _capacity(entry: tuple[int, int]) -> int:
    return entry[1]


def release_payload(segments: list[int]) -> bytes:
    """The payload of a RELEASE frame."""
    return b''.join(_IDS.pack(segment) for segment in segments)


def released_ids(payload: Any) -> list[int]:
    """The segment ids of a RELEASE frame."""
    return [segment for segment, in _IDS.iter_unpack(payload)]


def receive(payload: Any, take: Callable[[int], list[int]],
            release: Callable[[int], None]) -> Big:
    """The :class:`Big` a BIG frame's ``payload`` describes; ``take(count)`` gives its
    descriptors, which are closed here, and ``release(id)`` is called for each lent
    segment read. ``payload`` is only lent."""
    view = memoryview(payload)
    count, = _COUNT.unpack_from(view)
    entries = [_ENTRY.unpack_from(view, _COUNT.size + index * _ENTRY.size)
               for index in range(count)]
    data = bytes(view[_COUNT.size + count * _ENTRY.size:])
    fds = take(count)
    buffers: list[Any] = []
    try:
        for fd, (size, mode, segment) in zip(fds, entries):
            buffers.append(_read(fd, size, mode))
            if segment:
                release(segment)
    finally:
        for fd in fds:
            os.close(fd)
    return Big(data, buffers, [mode for _, mode, _ in entries])


def _read(fd: int, size: int, mode: int) -> Any:
    if mode == _BYTES and size <= _CHUNK:
        data = os.pread(fd, size, 0)
        if len(data) == size:
            return data
    if mode == _BYTES or mode == _BYTEARRAY:
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            count = os.preadv(fd, [view[done:done + _CHUNK]], done)
            if not count:
                raise EOFError(f'a shared-memory buffer ended at {done} of {size} bytes')
            done += count
        return bytes(buffer) if mode == _BYTES else buffer
    # A view: the mapping lives as long as something refers to it (closing the descriptor
    # does not end it); populated at once, rather than a page fault per 4 KiB later.
    flags = mmap.MAP_SHARED | getattr(mmap, 'MAP_POPULATE', 0)
    return memoryview(mmap.mmap(fd, size, flags=flags))
