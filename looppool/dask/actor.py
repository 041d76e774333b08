"""The worker side of a :class:`~looppool.dask.DaskPool`: one Dask actor per worker number.

The actor runs the same :class:`~looppool.runner._Runner` a worker process runs, on its
Dask worker's event loop (an IO loop like a worker process's own); only the end of its
channel differs. A worker process writes its frames to a socket; an actor cannot reach
the client, so its frames wait in an :class:`_End` until the client's next call takes
them: a ``run()`` call, which brings the client's frames and answers with those ready
one loop iteration later, or the ``collect()`` long poll the client keeps open on every
actor (whose connection also breaks the moment the Dask worker dies)::

    client ──run(batch, frames)──> _Host ──> _Runner.on_frames ──> Worker.handle
    client <──answer: (seq, frames, closed)── _End <──replies, ACK, FREED, RESULT──┘
    client ──collect()──> waits here until there are frames, or the actor closed

Answers are numbered (``seq``) so that the client takes them in order whatever comm
brought them, and run() calls are numbered so that their frames are read in the order
they were sent.

Who owns what: :class:`_Host` (the actor) owns the runner and the order of the calls;
the runner owns the user's Worker, as in a worker process. All of it lives on the Dask
worker's loop thread (the constructor alone runs in a Dask worker thread, and only stores
its arguments); nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
import socket
import traceback
import types
from collections.abc import Callable
from typing import Any

import tornado.ioloop

from .. import protocol
from ..protocol import dumps, loads
from ..runner import _Runner
from ..worker import Worker
from .frames import Frames

log = logging.getLogger('looppool.worker')


class _End(Frames):
    """The actor's end of its frames: they are kept until the client's next call takes
    them (:meth:`take`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 before_flush: Callable[[], None]) -> None:
        super().__init__(loop, before_flush)
        self.seq = 0               # the number of the next answer that carries frames
        self.active_runs = 0       # run() calls that answer with what is ready
        self.waiter: asyncio.Future[None] | None = None   # the open collect()

    def flush(self) -> None:
        """Add what sums up this iteration (ACK, replies, FREED), and let the open
        ``collect()`` answer unless a ``run()`` call is about to."""
        self.flush_due = True   # what before_flush sends needs no flush of its own
        try:
            self.before_flush()
        finally:
            self.flush_due = False
        if self.frames:
            self.wake()

    def wake(self, force: bool = False) -> None:
        if (force or not self.active_runs) and self.waiter is not None \
                and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self) -> bytes:
        """The answer to the client's call: the frames that wait, numbered."""
        frames, self.frames = self.frames, []
        if self.on_drained is not None and frames:
            drained, self.on_drained = self.on_drained, None
            self.loop.call_soon(drained)
        if not frames:
            return dumps((None, frames, self.closed))
        seq = self.seq
        self.seq = seq + 1
        return dumps((seq, frames, self.closed))

    def close(self) -> None:
        self.closed = True
        self.wake(force=True)   # the open collect() answers that the actor closed


class _ActorRunner(_Runner):
    """A runner whose channel is an :class:`_End`, on a loop that is not its own: a stop
    closes the actor instead of ending the process, and a handler cannot end the Dask
    worker (other actors and Dask's own work share it)."""

    end: _End

    def make_channel(self, sock: Any) -> Any:
        self.end = _End(self.loop, self.before_flush)
        return self.end

    def attach(self, worker: Worker) -> None:
        super().attach(worker)
        if self.batcher is not None:   # (its call only takes a message into a batch)
            self.batcher.call = _no_exit(self.batcher.call, self.number, self.pid)
        else:
            self.call = _no_exit(self.call, self.number, self.pid)

    async def finalise_and_exit(self) -> None:
        worker = self.worker
        assert worker is not None
        try:
            result = worker._finalise()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception('worker %d: _finalise() raised', self.number)
        try:
            worker.join()
        except Exception:
            log.exception('worker %d: join() raised', self.number)
        self.channel.flush()
        self.channel.close()

    def on_parent_lost(self) -> None:  # pragma: no cover - an actor has no end of file
        for task in list(self.running.values()):
            task.cancel()


class _Host:
    """The Dask actor behind one worker number; see the module's docstring."""

    def __init__(self, class_blob: bytes, config: protocol.WorkerConfig) -> None:
        self.class_blob = class_blob
        self.config = config
        self.runner: _ActorRunner | None = None
        self.next_batch = 0
        self.turns: dict[int, asyncio.Future[None]] = {}

    async def setup(self) -> tuple[str, Any, Any]:
        """Make the user's Worker and run its ``_initialise()`` and ``start()``.

        Returns ``('ready', pid, hostname)`` or ``('failed', what failed, traceback)``.
        """
        config = self.config
        try:
            cls = pickle.loads(self.class_blob)
            args, kwargs = pickle.loads(config.worker_arguments)
        except BaseException as exc:
            return ('failed', f'its worker class or worker_args could not be loaded on '
                              f'this Dask worker: {exc!r}; the module that defines it must '
                              'be importable on every Dask worker: install it there, '
                              'upload it with client.upload_file(), or have it sent by '
                              'value with cloudpickle.register_pickle_by_value(module) '
                              '(classes defined in __main__ are sent by value already)',
                    traceback.format_exc())
        runner = _ActorRunner(cls, None, asyncio.get_running_loop(), config)
        step = f'{cls.__qualname__}(*worker_args, **worker_kwargs)'
        try:
            worker = cls(*args, **kwargs)
            worker._number = config.number
            worker._ioloop = tornado.ioloop.IOLoop.current()
            runner.attach(worker)
            step = 'its _initialise()'
            result = worker._initialise()
            if inspect.isawaitable(result):
                await result
            step = 'its start()'
            worker.start()
        except BaseException:
            return ('failed', f'{step} raised', traceback.format_exc())
        self.runner = runner
        return ('ready', os.getpid(), socket.gethostname())

    async def run(self, batch: int, blob: bytes) -> bytes:
        """Read the client's frames of call ``batch`` (after those of every earlier call)
        and answer with the frames ready one loop iteration later."""
        if batch != self.next_batch:
            turn = self.turns[batch] = asyncio.get_running_loop().create_future()
            await turn
        runner = self.runner
        assert runner is not None
        end = runner.end
        end.active_runs += 1
        try:
            if not end.closed:
                end.handling = True
                try:
                    runner.on_frames(loads(blob))
                finally:
                    end.handling = False
            self.next_batch = batch + 1
            following = self.turns.pop(batch + 1, None)
            if following is not None and not following.done():
                following.set_result(None)
            # One loop iteration: what does not wait on IO finishes here and leaves with
            # this answer rather than with a collect().
            await asyncio.sleep(0)
        finally:
            end.active_runs -= 1
        return end.take()

    async def collect(self) -> bytes:
        """Wait until there are frames to send (or the actor closed), then answer."""
        runner = self.runner
        assert runner is not None
        end = runner.end
        if end.waiter is not None and not end.waiter.done():
            end.waiter.set_result(None)   # a stale poll: let it go with nothing
        loop = asyncio.get_running_loop()
        while not (end.frames or end.closed):
            waiter = end.waiter = loop.create_future()
            await waiter
            if end.waiter is not waiter:
                return dumps((None, [], end.closed))
        end.waiter = None
        return end.take()


def _no_exit(call: Callable[[Any], Any], number: int, pid: int) -> Callable[[Any], Any]:
    """``call``, with SystemExit and KeyboardInterrupt turned into a RuntimeError: raised in
    a handler, they would end the Dask worker's loop, which is not the pool's to end."""

    def stand_in(exc: BaseException) -> RuntimeError:
        error = RuntimeError(
            f'the handler raised {type(exc).__name__}({getattr(exc, "code", "")!r}) in '
            f'worker {number} (pid {pid}); the Dask worker was not ended')
        error.__traceback__ = exc.__traceback__
        return error

    async def finish(awaitable: Any) -> Any:
        try:
            return await awaitable
        except (SystemExit, KeyboardInterrupt) as exc:
            raise stand_in(exc) from None

    def guarded(message: Any) -> Any:
        try:
            result = call(message)
        except (SystemExit, KeyboardInterrupt) as exc:
            raise stand_in(exc) from None
        if type(result) is types.CoroutineType or inspect.isawaitable(result):
            return finish(result)
        return result

    return guarded


def host_reference() -> bytes:
    """:class:`_Host` pickled by reference: unpickling it imports this module only."""
    return pickle.dumps(_Host)
