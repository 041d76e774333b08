"""The ceiling: the smallest pool design that is still a good one, written for comparison.

It has what a fast message-passing pool needs and nothing else::

    parent loop                                   worker process (its own loop)
      submit(msg) -> future                         read frames -> for each (id, msg):
      batch[worker] += (id, msg)                       step handler(msg) once, eagerly;
      once per loop iteration:                         done -> reply now,
        one pickle of the batch, one sendmsg() ---->   suspended -> a Task finishes it
      readable: frames -> set_result(future)    <---- replies of one read: one frame

- one Unix socketpair per worker, read and written by the loop itself (no threads);
- a frame is a 4-byte length and one pickle of a whole batch (what one loop iteration
  submitted, cut every MAX_BATCH messages), so the per-message cost is pickling a tuple,
  not a system call;
- a frame that is large is received straight into a buffer of its own size;
- in the worker each handler runs its first step right away, inside the read callback,
  by sending ``None`` into the coroutine: an echo never touches the loop's ready queue,
  and its reply leaves with the others from the same read.

What it leaves out on purpose, because a benchmark does not need it: bounds and
backpressure, cancellation, timeouts, worker replacement, logging. Everything it keeps is
done properly: partial writes wait for writability, stop lets accepted tasks finish and
waits on the process sentinels rather than polling.

Everything here lives on one loop in its process and is not thread-safe.
"""

import asyncio
import collections
import functools
import multiprocessing
import os
import pickle
import socket
import struct

_HEADER = struct.Struct('<I')
_READ_SIZE = 1 << 18
# A frame at least this large that arrives in pieces gets a buffer of its own, so the part
# already received is not copied again on every read.
_LARGE = 1 << 16
_PROTOCOL = pickle.HIGHEST_PROTOCOL
# A batch this long is sent at once rather than at the end of the loop iteration, so that a
# burst of submit() calls keeps the workers busy while the parent is still submitting.
# Measured on the project's machine: 256 beat 64, 1024, 4096 and one frame per iteration.
MAX_BATCH = 256
# Kernel buffers larger than the default (208 KiB) let a 1 MiB payload go in one or two
# system calls; about 10% more throughput for W4 (the kernel caps it at wmem_max).
SOCKET_BUFFER = 4 << 20


class _Conn:
    """One end of a socketpair carrying length-prefixed frames, driven by a loop.

    ``on_frames(frames)`` gets every complete frame of one read at once, so the owner can
    answer them together.
    """

    def __init__(self, sock, loop, on_frames, on_eof):
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.on_frames = on_frames
        self.on_eof = on_eof
        self.rest = b''            # the start of a frame not yet complete
        self.big = None            # a large frame being received into its own buffer
        self.big_fill = 0
        self.out = collections.deque()   # what the kernel did not take yet
        self.drained = None        # a future for stop(): set once `out` is empty
        self.at_eof = False
        self.closed = False
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, payload):
        header = _HEADER.pack(len(payload))
        if self.out:   # already waiting for room: keep the order
            self.out.append(header)
            self.out.append(payload)
            return
        try:
            sent = self.sock.sendmsg([header, payload])
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(header) + len(payload):
            if sent < len(header):
                self.out.append(header[sent:])
                self.out.append(payload)
            else:
                self.out.append(memoryview(payload)[sent - len(header):])
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self):
        out = self.out
        try:
            sent = self.sock.sendmsg(list(out)[:512])
        except (BlockingIOError, InterruptedError):
            return
        while sent:
            head = out[0]
            if sent >= len(head):
                out.popleft()
                sent -= len(head)
            else:
                out[0] = memoryview(head)[sent:]
                sent = 0
        if not out:
            self.loop.remove_writer(self.sock.fileno())
            if self.drained is not None:
                self.drained.set_result(None)
                self.drained = None

    async def wait_drained(self):
        if self.out:
            self.drained = self.loop.create_future()
            await self.drained

    def flush_blocking(self):
        """Write what is left, waiting as long as it takes (the process is about to end)."""
        if self.out:
            self.loop.remove_writer(self.sock.fileno())
            self.sock.setblocking(True)
            for piece in self.out:
                self.sock.sendall(piece)
            self.out.clear()

    def _readable(self):
        if self.big is not None:
            try:
                count = self.sock.recv_into(memoryview(self.big)[self.big_fill:])
            except (BlockingIOError, InterruptedError):
                return
            if not count:
                return self._eof()
            self.big_fill += count
            if self.big_fill == len(self.big):
                frame, self.big = self.big, None
                self.on_frames([frame])
            return
        try:
            data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return self._eof()
        if self.rest:
            data = self.rest + data
        view = memoryview(data)
        frames = []
        pos, end = 0, len(data)
        while end - pos >= 4:
            (size,) = _HEADER.unpack_from(data, pos)
            start = pos + 4
            stop = start + size
            if stop > end:
                if size >= _LARGE:
                    self.big = bytearray(size)
                    self.big[:end - start] = view[start:]
                    self.big_fill = end - start
                    pos = end
                break
            frames.append(view[start:stop])
            pos = stop
        self.rest = data[pos:] if pos < end else b''
        if frames:
            self.on_frames(frames)

    def _eof(self):
        self.at_eof = True
        self.loop.remove_reader(self.sock.fileno())
        self.on_eof()

    def drain(self):
        """Read every frame still in the socket; the peer has exited, so this ends."""
        if not self.at_eof:
            self.sock.setblocking(True)
            while not self.at_eof:
                self._readable()

    def close(self):
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            if self.out:
                self.loop.remove_writer(self.sock.fileno())
            self.sock.close()


# -- the worker process ------------------------------------------------------------------

class _Carry:
    """Awaitable that lets a Task carry on a coroutine whose first step already ran.

    ``first`` is what that step yielded (a future, or ``None`` for a bare yield); the Task
    waits on it exactly as it would have, then the coroutine goes on under the Task.
    """

    __slots__ = ('coro', 'first')

    def __init__(self, coro, first):
        self.coro = coro
        self.first = first

    def __await__(self):
        coro, value = self.coro, self.first
        while True:
            try:
                yield value
            except BaseException as exc:   # cancelled while waiting: the coroutine decides
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            return (yield from coro.__await__())


async def _carry_on(coro, first):
    return await _Carry(coro, first)


class _Worker:
    """The worker's side: runs each message's handler and batches the replies.

    Lives in the worker process, on its loop; not thread-safe.
    """

    def __init__(self, sock, loop, handler):
        self.loop = loop
        self.handler = handler
        self.replies = []
        self.flush_scheduled = False
        self.tasks = 0
        self.eof = False
        self.conn = _Conn(sock, loop, self.on_frames, self.on_eof)

    def on_frames(self, frames):
        handler, replies = self.handler, self.replies
        for frame in frames:
            for tid, message in pickle.loads(frame):
                coro = handler(message)
                # The first step runs here and now (no Task, no trip through the ready
                # queue); only a handler that really waits pays for a Task.
                try:
                    first = coro.send(None)
                except StopIteration as done:
                    replies.append((tid, True, done.value))
                except BaseException as exc:
                    replies.append((tid, False, exc))
                else:
                    self.tasks += 1
                    task = self.loop.create_task(_carry_on(coro, first))
                    task.add_done_callback(functools.partial(self.finished, tid))
        self.flush()   # the replies of this read leave together, without waiting a turn

    def finished(self, tid, task):
        self.tasks -= 1
        if task.cancelled():
            self.replies.append((tid, False, asyncio.CancelledError()))
        elif task.exception() is not None:
            self.replies.append((tid, False, task.exception()))
        else:
            self.replies.append((tid, True, task.result()))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self):
        self.flush_scheduled = False
        if self.replies:
            replies, self.replies = self.replies, []
            self.conn.send(pickle.dumps(replies, _PROTOCOL))
        if self.eof and not self.tasks:
            self.loop.stop()

    def on_eof(self):
        # The parent closed its writing side: that is the stop signal (or the parent died).
        self.eof = True
        if not self.tasks:
            self.loop.stop()


def _worker_main(sock, handler, close_fds):
    for fd in close_fds:
        # Forked copies of the parent's ends of the other sockets: holding them would hide
        # the parent's exit (no EOF) from those workers.
        os.close(fd)
    # Forked from inside the parent's running loop: this thread must start clean.
    asyncio.events._set_running_loop(None)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = _Worker(sock, loop, handler)
    try:
        loop.run_forever()
        worker.flush()
        worker.conn.flush_blocking()
    finally:
        worker.conn.close()
        loop.close()


# -- the parent --------------------------------------------------------------------------

class Pool:
    """The parent's side: ``submit()`` returns a future; messages go round-robin.

    Lives in the parent, on the loop current at ``start()``; not thread-safe.
    """

    def __init__(self, handler, size=2):
        self.handler = handler
        self.size = size
        self.loop = None
        self.conns = []
        self.processes = []
        self.batches = []
        self.futures = {}
        self.next_tid = 0
        self.rr = 0
        self.flush_scheduled = False

    def start(self):
        self.loop = asyncio.get_running_loop()
        context = multiprocessing.get_context('fork')
        for _ in range(self.size):
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for sock in (parent_sock, child_sock):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            close_fds = [conn.sock.fileno() for conn in self.conns] + [parent_sock.fileno()]
            process = context.Process(target=_worker_main,
                                      args=(child_sock, self.handler, close_fds), daemon=True)
            process.start()
            child_sock.close()
            self.processes.append(process)
            self.conns.append(_Conn(parent_sock, self.loop, self.on_frames, lambda: None))
            self.batches.append([])

    def submit(self, message):
        future = self.loop.create_future()
        tid = self.next_tid
        self.next_tid = tid + 1
        self.futures[tid] = future
        rr = self.rr
        batch = self.batches[rr]
        batch.append((tid, message))
        if len(batch) >= MAX_BATCH:
            self.batches[rr] = []
            self.conns[rr].send(pickle.dumps(batch, _PROTOCOL))
        self.rr = rr + 1 if rr + 1 < self.size else 0
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)
        return future

    def flush(self):
        self.flush_scheduled = False
        for number, batch in enumerate(self.batches):
            if batch:
                self.batches[number] = []
                self.conns[number].send(pickle.dumps(batch, _PROTOCOL))

    def on_frames(self, frames):
        futures = self.futures
        for frame in frames:
            for tid, ok, value in pickle.loads(frame):
                future = futures.pop(tid)
                if not future.done():
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)

    async def stop(self):
        """Let accepted tasks finish, then wait (on the sentinels) for every worker to exit."""
        self.flush()
        exited = []
        for process in self.processes:
            done = self.loop.create_future()
            self.loop.add_reader(process.sentinel, self._exited, process.sentinel, done)
            exited.append(done)
        for conn in self.conns:
            await conn.wait_drained()
            conn.sock.shutdown(socket.SHUT_WR)   # end of file is the worker's stop signal
        for conn, process, done in zip(self.conns, self.processes, exited):
            await done
            process.join()
            conn.drain()   # replies sent just before the exit
            conn.close()

    def _exited(self, sentinel, done):
        self.loop.remove_reader(sentinel)
        done.set_result(None)

    def pids(self):
        return [process.pid for process in self.processes]
