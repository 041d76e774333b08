"""Big buffers through shared memory: pickle protocol 5, out of band, over memfd descriptors.

A message or reply that holds a large buffer does not travel through the socket::

    sender                                   receiver
      dumps(obj, threshold) -> Big: a small
        pickle, the large buffers kept aside
        (bytes, bytearray, memoryview by
        persistent id; NumPy arrays and other
        PickleBuffers out of band)
      Channel.send: each buffer copied into
        a memfd (Segments), the frame's kind
        flagged BIG, the descriptors riding
        on the same sendmsg (SCM_RIGHTS)
                      --- small pickle + descriptors --->
                                               Channel: take the frame's
                                               descriptors in order; bytes and
                                               bytearray copied out (Mappings,
                                               or pread), views mapped -> Big
                      <-- RELEASE (segment ids) ---------
      the segments read may be written again   loads(Big): fresh bytes and
                                               bytearrays; memoryviews and
                                               NumPy arrays view the mapping

A bytes read from a lent segment and sent back as it is before the segment is released
(an echo) goes back as that segment, flagged _BACK, with no descriptor and no copy: the
sender, which kept the bytes it wrote there, gives that very object back.

Nothing has a name: a memfd lives as long as a descriptor or a mapping refers to it, so
whatever process dies, the kernel frees the memory with the last holder (a descriptor in
flight in a socket is released with the socket). There is nothing to unlink, in
``/dev/shm`` or anywhere.

Frame payload of a BIG frame::

    count: uint32 | count x (size: uint64, mode: uint8, segment: uint32) | the pickle
    (plus a descriptor for each entry, in order, in the ancillary data of the socket;
    segment 0 is a memfd given away, any other a segment the sender lends and keeps. An
    entry whose mode is flagged _BACK has no descriptor: its segment is the receiver's
    own, lent to the sender, and sent back unread with the bytes read from it)

Who owns what: a :class:`Big` being sent holds references to the sender's buffers until
the channel writes them; the channel's :class:`Segments` own the memfds it writes into
(those given away, until ``sendmsg`` has carried them), its :class:`Mappings` the
peer's segments it keeps mapped; a received :class:`Big` owns its buffers, and a view's
mapping is unmapped when the last object viewing it goes. Used on one loop of one
process; not thread-safe.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import socket
import struct
import time
import weakref
from collections.abc import Callable
from typing import Any, Union

__all__ = ['AVAILABLE', 'BIG', 'Big', 'Mappings', 'RELEASE', 'Segments', 'THRESHOLD', 'dumps',
           'inline', 'loads', 'receive']

# memfd_create and descriptor passing: Linux (and FreeBSD 13). Elsewhere big buffers stay
# in the socket.
AVAILABLE = hasattr(os, 'memfd_create') and hasattr(socket, 'SCM_RIGHTS') \
    and hasattr(socket.socket, 'recvmsg_into')

# A buffer at least this large travels through shared memory (see the manual's "Big
# payloads" page for the measurements behind it). Read when a pool is made.
THRESHOLD = 1 << 20

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
# Flag on an entry's mode: the buffer is a bytes this end read from a segment the peer lent
# it and has not yet released, sent back as it came; no descriptor goes with it, and the
# peer gives back the bytes it wrote there (see Segments.back).
_BACK = 0x10
# At most this many buffers of one message go out of band (the rest stay in its pickle):
# one sendmsg() carries a frame's descriptors, and Linux takes at most 253 at a time.
MAX_BUFFERS = 250
# What one end of a channel keeps of the segments its peer has read, to write into again
# (a fresh memfd costs its pages: allocated, zeroed and freed again, three times the copy).
_KEEP_SEGMENTS = 4
_KEEP_BYTES = 64 << 20
# One larger segment is kept besides, for as long as it is used again within this many
# seconds (round trips of hundreds of MiB: a fresh segment costs a third of the copy).
KEEP_LARGE_SECONDS = 1.0
# Segments up to this size are mapped by both ends for as long as they are kept (larger
# ones are written and read with pwrite() and pread(), so that a mapping does not count
# them in the resident size of both processes a second time); none smaller than _MAP_MIN.
_MAP_MAX = 4 << 20
_MAP_MIN = 64 << 10
# A buffer at least this large, written again into pages a segment already has, is copied
# through a mapping made for that write alone (MAP_POPULATE: its page-table entries in one
# go), not with pwrite(), which looks up every 4 KiB page in the page cache: a third less
# time at 256 MiB. (Into new pages pwrite() is faster: it allocates them as it goes.)
_MAP_WRITE_MIN = 32 << 20
# One read or write moves at most this much (Linux stops at 2 GiB less a page).
_CHUNK = 1 << 30
_POPULATE = getattr(mmap, 'MAP_POPULATE', 0)


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

    def head(self, ids: list[int], back: list[int]) -> bytes:
        """The descriptor of the buffers that starts the frame's payload (``ids``: the
        segment of each, 0 for one given away; ``back``: the indexes of those that are
        the peer's own segments, sent back)."""
        flags = [0] * len(self.buffers)
        for index in back:
            flags[index] = _BACK
        return _COUNT.pack(len(self.buffers)) + b''.join(
            _ENTRY.pack(memoryview(buffer).nbytes, mode | flag, segment)
            for buffer, mode, segment, flag in zip(self.buffers, self.modes, ids, flags))

    def split(self, start: int) -> Big:
        """The same buffers with the pickle from ``start`` on (a batch's items)."""
        return Big(memoryview(self.data)[start:], self.buffers, self.modes)


class _Aside:
    """The large buffers a :class:`_Pickler` keeps out of its pickle, and how each is to be
    given back. Its own object, not the pickler's attributes: the pickler's
    ``buffer_callback`` is a method of it, and one of the pickler's own would make a
    reference cycle, which holds the buffers until the cyclic garbage collector runs (a
    1 MiB reply each time, piling up to hundreds of MiB, and fresh pages for every one)."""

    __slots__ = ('buffers', 'modes', 'threshold')

    def __init__(self, threshold: int) -> None:
        self.buffers: list[Any] = []
        self.modes: list[int] = []
        self.threshold = threshold

    def out_of_band(self, buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < self.threshold or len(self.buffers) >= MAX_BUFFERS:
            return True   # in the pickle
        self.buffers.append(view)
        self.modes.append(_OUT_OF_BAND)
        return False


class _Pickler(pickle.Pickler):
    """Keeps every large bytes, bytearray and memoryview out of the pickle by persistent
    id, and every large PickleBuffer (NumPy's arrays) out of band, in ``aside``."""

    def __init__(self, file: io.BytesIO, threshold: int, keep: bool = True) -> None:
        self.aside = _Aside(threshold if keep else 1 << 62)
        super().__init__(file, _PROTOCOL, buffer_callback=self.aside.out_of_band)

    def reducer_override(self, obj: Any) -> Any:
        # A memoryview below the threshold (which plain pickle refuses) is sent as a copy,
        # and arrives as a memoryview of that copy: small or large, it pickles.
        if type(obj) is memoryview:
            return _view, (obj.tobytes(), obj.format, obj.shape, obj.readonly)
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        aside = self.aside
        buffers = aside.buffers
        if len(buffers) >= MAX_BUFFERS:
            return None
        if kind is bytes or kind is bytearray:
            if len(obj) < aside.threshold:
                return None
            buffers.append(obj)
            aside.modes.append(_BYTES if kind is bytes else _BYTEARRAY)
            return len(buffers) - 1
        if kind is memoryview and obj.nbytes >= aside.threshold and obj.c_contiguous:
            buffers.append(obj.cast('B') if obj.ndim != 1 or obj.format != 'B' else obj)
            aside.modes.append(_VIEW)
            return (len(buffers) - 1, obj.format, obj.shape, obj.readonly)
        return None


def _big(obj: Any, threshold: int) -> Big | None:
    file = io.BytesIO()
    pickler = _Pickler(file, threshold)
    pickler.dump(obj)
    aside = pickler.aside
    if not aside.buffers:
        return None
    return Big(file.getvalue(), aside.buffers, aside.modes)


def _small(obj: Any, threshold: int) -> bytes:
    """``obj`` pickled whole, its memoryviews as copies."""
    file = io.BytesIO()
    _Pickler(file, threshold, keep=False).dump(obj)
    return file.getvalue()


def _view(data: Any, fmt: str, shape: tuple[int, ...], readonly: bool) -> Any:
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


def inline(big: Big) -> bytes:
    """A :class:`Big` being sent, pickled whole instead (its buffers in the pickle)."""
    return _small(loads(big), 1 << 62)


# -- the descriptors -----------------------------------------------------------------------

class _Segment:
    """One memfd a channel's end writes buffers into; mapped here if it is small. While it
    is lent, ``source`` is the bytes written into it (the peer may send it back)."""

    __slots__ = ('id', 'fd', 'capacity', 'map', 'source', 'idle_since', 'filled')

    def __init__(self, segment: int, size: int) -> None:
        self.id = segment
        self.fd = os.memfd_create('looppool', os.MFD_CLOEXEC)
        self.capacity = size
        self.map: mmap.mmap | None = None
        self.source: bytes | None = None
        self.idle_since = 0.0
        self.filled = 0   # the bytes written into it so far (the most): its pages
        if size <= _MAP_MAX:
            # Written through a mapping kept for the segment's life: a copy, and no page
            # faults or page-cache lookups once its pages exist (pwrite() looks up each
            # 4 KiB page, every time).
            self.capacity = max(_MAP_MIN, 1 << (size - 1).bit_length())
            os.ftruncate(self.fd, self.capacity)
            self.map = mmap.mmap(self.fd, self.capacity)

    def write(self, view: memoryview) -> None:
        if self.map is not None:
            with memoryview(self.map) as target:
                target[:view.nbytes] = view
        elif _MAP_WRITE_MIN <= view.nbytes <= self.filled:
            # Unmapped at once: this process's resident size counts its pages during the
            # copy only.
            with mmap.mmap(self.fd, view.nbytes, flags=mmap.MAP_SHARED | _POPULATE) as found:
                with memoryview(found) as target:
                    target[:] = view
        else:
            _pwrite(self.fd, view)
            self.filled = max(self.filled, view.nbytes)
            self.capacity = max(self.capacity, view.nbytes)

    def read(self, size: int, mode: int) -> Any:
        """What was written into it, as the peer would have read it."""
        if self.map is None:
            return _read(self.fd, size, mode)
        with memoryview(self.map) as view:
            return bytes(view[:size]) if mode == _BYTES else bytearray(view[:size])

    def close(self) -> None:
        self.source = None
        if self.map is not None:
            self.map.close()
        os.close(self.fd)


class Segments:
    """The memfds one end of a channel writes buffers into.

    A buffer the peer reads into an object of its own (bytes, bytearray) goes in a segment
    that is *lent*: this end keeps its descriptor, and writes into it again once the peer
    has said it read it (``RELEASE``); a segment keeps its id, so that the peer may keep
    its mapping too. A buffer the peer maps (a view) goes in a fresh memfd that is given
    away: the peer's mapping keeps it as long as it needs. At most ``_KEEP_SEGMENTS``
    segments of ``_KEEP_BYTES`` in all are kept for use again, and one larger segment for
    as long as it is used again within ``KEEP_LARGE_SECONDS`` (see :meth:`expire`).

    A lent segment written from a ``bytes`` keeps that object until the peer releases
    it: a peer that sends the bytes it read from it back as they were (``_BACK``) gets
    the very object back (:meth:`back`), with no copy either way. Owned by one channel;
    not thread-safe.
    """

    def __init__(self) -> None:
        _held.add(self)
        self.free: list[_Segment] = []
        self.large: _Segment | None = None   # larger than _KEEP_BYTES, idle
        self.lent: dict[int, _Segment] = {}   # being read by the peer
        self.next_id = 1
        self.written = 0   # buffers written, for tests and curiosity
        self.sent_back = 0   # buffers sent back to the peer, likewise

    def write(self, big: Big, received: dict[int, tuple[bytes, int]] | None = None
              ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Write ``big``'s buffers: the descriptors to send, the id of each segment (0:
        given away), the descriptors to close once sent, and the indexes of the buffers
        sent back: ``received`` maps ``id()`` of each bytes this end read from a segment
        of the peer's, not yet released, to that bytes and the segment's id."""
        fds: list[int] = []
        ids: list[int] = []
        given: list[int] = []
        back: list[int] = []
        try:
            for index, (buffer, mode) in enumerate(zip(big.buffers, big.modes)):
                found = received.get(id(buffer)) if received and mode == _BYTES else None
                if found is not None and found[0] is buffer:
                    ids.append(found[1])   # the peer's own segment: nothing to write
                    back.append(index)
                    self.sent_back += 1
                    continue
                view = memoryview(buffer).cast('B')
                self.written += 1
                if mode == _BYTES or mode == _BYTEARRAY:
                    segment = self.take(view.nbytes)
                    self.lent[segment.id] = segment
                    ids.append(segment.id)
                    fds.append(segment.fd)
                    segment.write(view)
                    if mode == _BYTES:
                        segment.source = buffer
                else:
                    fd = os.memfd_create('looppool', os.MFD_CLOEXEC)
                    given.append(fd)
                    ids.append(0)
                    fds.append(fd)
                    _pwrite(fd, view)
        except BaseException:
            for fd in given:
                os.close(fd)
            for index, segment_id in enumerate(ids):
                if segment_id and index not in back:
                    self.released(segment_id)
            raise
        return fds, ids, given, back

    def take(self, size: int) -> _Segment:
        """A kept segment large enough for ``size`` bytes (the smallest), or a new one."""
        best: _Segment | None = None
        for segment in self.free:
            if segment.capacity >= size and (best is None or segment.capacity < best.capacity):
                best = segment
        if best is not None:
            self.free.remove(best)
            return best
        large = self.large
        if large is not None and size > _KEEP_BYTES:
            # Written with pwrite(), which makes it larger if it must.
            self.large = None
            return large
        segment = _Segment(self.next_id, size)
        self.next_id = self.next_id + 1 if self.next_id < 0xFFFFFFFF else 1
        return segment

    def released(self, segment_id: int) -> None:
        """The peer has read segment ``segment_id``: keep it for the next buffer, or close
        it."""
        segment = self.lent.pop(segment_id, None)
        if segment is None:
            return
        segment.source = None
        if segment.capacity > _KEEP_BYTES:
            if self.large is not None:
                self.large.close()
            segment.idle_since = time.monotonic()
            self.large = segment
            return
        self.free.append(segment)
        self.free.sort(key=_capacity, reverse=True)
        while len(self.free) > _KEEP_SEGMENTS or \
                sum(kept.capacity for kept in self.free) > _KEEP_BYTES:
            self.free.pop(0).close()   # the largest goes first

    def back(self, segment_id: int, size: int, mode: int) -> Any:
        """The peer sends segment ``segment_id`` back, unread since: the bytes written
        into it (the object itself), and the segment is released."""
        segment = self.lent.get(segment_id)
        if segment is None:
            raise ValueError(f'segment {segment_id} sent back, and not lent')
        found: Any = segment.source
        if found is None or len(found) != size or mode != _BYTES:
            found = segment.read(size, mode)   # (not seen: only a bytes is sent back)
        self.released(segment_id)
        return found

    def expire(self) -> float:
        """Close the large segment kept if it has been idle ``KEEP_LARGE_SECONDS``; the
        seconds until it would be (0: none kept)."""
        large = self.large
        if large is None:
            return 0.0
        left = large.idle_since + KEEP_LARGE_SECONDS - time.monotonic()
        if left > 0:
            return left
        self.large = None
        large.close()
        return 0.0

    def close(self) -> None:
        for segment in [*self.free, *self.lent.values()]:
            segment.close()
        if self.large is not None:
            self.large.close()
            self.large = None
        self.free.clear()
        self.lent.clear()


class Mappings:
    """The peer's lent segments this end has mapped, by id, to read the next buffer lent
    in the same segment without mapping it again (at most ``_KEEP_SEGMENTS``, the least
    recently used dropped first). Owned by one channel; not thread-safe."""

    def __init__(self) -> None:
        _held.add(self)
        self.maps: dict[int, mmap.mmap] = {}

    def read(self, fd: int, segment: int, size: int, mode: int) -> Any:
        found = self.maps.pop(segment, None)
        if found is None or len(found) < size:
            if found is not None:
                found.close()
            found = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
        self.maps[segment] = found   # the most recently used last
        while len(self.maps) > _KEEP_SEGMENTS:
            self.maps.pop(next(iter(self.maps))).close()
        with memoryview(found) as view:
            return bytes(view[:size]) if mode == _BYTES else bytearray(view[:size])

    def close(self) -> None:
        for found in self.maps.values():
            found.close()
        self.maps.clear()


# Every channel's segments and mappings in this process. A process forked from it (a
# worker, under fork) lets go of its copies at once: they are the parent's, and would keep
# that memory alive for as long as the child lives.
_held: weakref.WeakSet[Union[Segments, Mappings]] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for held in list(_held):
        try:
            held.close()
        except Exception:  # pragma: no cover - a view of one still exported: it stays
            pass


os.register_at_fork(after_in_child=_forget_after_fork)


def _capacity(segment: _Segment) -> int:
    return segment.capacity


def _pwrite(fd: int, view: memoryview) -> None:
    done = 0
    size = view.nbytes
    while done < size:
        done += os.pwrite(fd, view[done:done + _CHUNK], done)


def release_payload(segments: list[int]) -> bytes:
    """The payload of a RELEASE frame."""
    return b''.join(_IDS.pack(segment) for segment in segments)


def released_ids(payload: Any) -> list[int]:
    """The segment ids of a RELEASE frame."""
    return [segment for segment, in _IDS.iter_unpack(payload)]


def receive(payload: Any, take: Callable[[int], list[int]],
            release: Callable[[int, Any], None], mappings: Mappings,
            back: Callable[[int, int, int], Any]) -> Big:
    """The :class:`Big` a BIG frame's ``payload`` describes; ``take(count)`` gives its
    descriptors, which are closed here, and ``release(id, bytes or None)`` is called for
    each lent segment read (through ``mappings`` if it is small), with the bytes read from
    it; ``back(id, size, mode)`` gives a buffer that is this end's own segment, sent back
    (:meth:`Segments.back`). ``payload`` is only lent."""
    view = memoryview(payload)
    count, = _COUNT.unpack_from(view)
    entries = [_ENTRY.unpack_from(view, _COUNT.size + index * _ENTRY.size)
               for index in range(count)]
    data = bytes(view[_COUNT.size + count * _ENTRY.size:])
    fds = take(sum(1 for _, mode, _ in entries if not mode & _BACK))
    buffers: list[Any] = []
    returned: dict[int, Any] = {}   # segments sent back, by id (one may come twice)
    try:
        next_fd = iter(fds)
        for size, mode, segment in entries:
            if mode & _BACK:
                if segment not in returned:
                    returned[segment] = back(segment, size, mode ^ _BACK)
                buffers.append(returned[segment])
                continue
            fd = next(next_fd)
            if segment and size <= _MAP_MAX:
                buffers.append(mappings.read(fd, segment, size, mode))
            else:
                buffers.append(_read(fd, size, mode))
            if segment:
                release(segment, buffers[-1] if mode == _BYTES else None)
    finally:
        for fd in fds:
            os.close(fd)
    return Big(data, buffers, [mode & ~_BACK for _, mode, _ in entries])


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
    return memoryview(mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE))
