"""The worker side of the channel: runs the parent's frames on the :class:`~looppool.Worker`.

Inside one worker process::

    channel (socket to the parent) --frames--> _Runner.on_frames
        TASK / NOTE  -> Worker.handle(message)            (modern)
                        Worker._process_message(message)  (Looppool style)
                        a batch of Worker.handle_batch    (see looppool.batch)
                        run as a coroutine on this process's loop, started eagerly
                        (see looppool.eager): one that never suspends costs no Task
        CANCEL       -> the task's asyncio.Task is cancelled
        CREDIT       -> room for more _put_nowait results
        RECALL       -> the held tasks go back to the parent (RECALLED), unstarted
        STOP         -> accepted tasks finish, _finalise(), the loop stops, join()
    replies, FREED counts and _put_nowait results go back through the same channel
    (looppool.answers), with an ACK of what was started at every flush (see
    looppool.inbox for the rest).

Work is started as it is read, for at most _BUDGET seconds of one turn of the loop. What
comes after that (the rest of a batch behind a CPU-bound handler, the next frames) waits
in the inbox and is reported HELD; later turns take it in order, a few at a time, and
announce each take (TAKEN) before starting it, so that the parent knows exactly which
tasks never started: it may take those back (RECALL) for a worker with room, and if this
process dies they run elsewhere instead of failing.

Who owns what: the :class:`_Runner` owns the channel, the table of suspended tasks and the
counters; the :class:`~looppool.Worker` instance is the user's and owns only the user's
state. All of it lives on the worker process's single loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import logging
import os
import signal
import socket
import threading
import types
from collections.abc import Awaitable, Callable
from typing import Any

from . import eager, protocol, tracing
from .channel import Channel, _ignore
from . import chunk
from .batch import Batcher
from .inbox import _BUDGET, _REST, Inbox, _monotonic
from .answers import _REPLAYED, Answers, _origin
from .protocol import dumps, loads
from .worker import Worker

log = logging.getLogger('looppool.worker')

# Once the parent is gone: how long cancelled handlers may take to clean up, and the
# deadline after which the process ends whatever it is doing. Both fit in the promised
# second.
_CLEANUP_GRACE = 0.8
_ORPHAN_DEADLINE = 0.9


# Kept for callers of the earlier name: eager.start is the one to use.
start_coroutine = eager.start

# Replies that leave before the end of a read that holds many batches.
_EARLY_REPLIES = 256

class _Runner(Answers):
    """Drives one :class:`Worker` in its process: frames in, tasks run, frames out.

    Lives in the worker process, on its loop thread; not thread-safe.
    """

    def __init__(self, worker_class: type[Worker], sock: socket.socket | None,
                 loop: asyncio.AbstractEventLoop, config: protocol.WorkerConfig) -> None:
        # The runner (its channel) comes first, so that whatever the worker's code does,
        # from its constructor on, can be logged and reported: see attach().
        self.worker: Worker | None = None
        self.loop = loop
        self.config = config
        self.number = config.number
        self.pid = os.getpid()
        self.credit = config.result_credit
        # Suspended tasks: a submit()'s task id, or -id(task) for a note (no id needed).
        self.running: dict[int, asyncio.Future[Any]] = {}
        self.open_slots = 0       # Looppool-style tasks whose _task_done() is still due
        self.freed = 0            # slots freed since the last flush, sent as one FREED
        self.held: collections.deque[tuple[int, Any]] = collections.deque()
        self.reply_tids: list[int] = []
        self.reply_values: list[Any] = []
        self.deferred = 0         # slots whose freeing waits for held results to drain
        self.stopping = False
        self.stopped = False
        self.orphaned = False     # the parent is gone: exit without _finalise
        self.looppool_style = worker_class._process_message is not Worker._process_message
        self.call: Callable[[Any], Any] = _ignore   # the worker's handler, once attached
        self.batch_replies = config.batch_replies and not self.looppool_style
        self.origins = config.origins
        self.read = 0              # messages started since the last ACK
        self.hook: asyncio.Future[Any] | None = None   # the last _pause() or _resume()
        self.deadline = 0.0        # the end of this turn's budget (see looppool.inbox)
        # Buffers at least this large go to the parent through shared memory (0: never).
        self.shared_memory = config.shared_memory
        self.channel = self.make_channel(sock)
        self.inbox = Inbox(self)
        self.batcher = Batcher(self, config.batch_size, config.batch_timeout) \
            if config.batch_size else None

    def make_channel(self, sock: Any) -> Channel:
        """The channel to the parent (a subclass may bring another end with the same
        interface: a Dask actor's, see looppool.dask.actor)."""
        return Channel(sock, self.loop, self.on_frames, self.on_parent_lost,
                       before_flush=self.before_flush,
                       shared_memory=bool(self.config.shared_memory))

    def attach(self, worker: Worker) -> None:
        """Run ``worker``'s handlers from now on (it was made after this runner)."""
        worker._runner = self
        self.worker = worker
        self.call = worker._process_message if self.looppool_style else worker.handle
        if self.batcher is not None:
            self.batcher.attach(worker)
            self.call = self.batcher.add   # a future per message, answered by its batch
        elif tracing.ENABLED:   # once a message carries its caller's trace context
            tracing.when_traced(self.trace_handlers)

    def trace_handlers(self) -> None:
        """Run each traced message's handler in its trace context from now on."""
        self.call = tracing.wrap_handler(self.call)

    # -- frames from the parent ------------------------------------------------------------

    def on_frames(self, frames: list[tuple[int, int, Any]]) -> None:
        self.deadline = _monotonic() + _BUDGET
        for kind, arg, payload in frames:
            if kind in protocol.WORK:
                if self.inbox.slow:
                    self.inbox.hold(kind, arg, payload)
                    continue
                if kind == protocol.TASKS:
                    self.start_batch(payload)
                    if len(self.reply_tids) >= _EARLY_REPLIES:
                        # A long read: send what is answered so far, so the parent can
                        # send more work while this process goes on with the rest.
                        self.channel.flush()
                else:
                    self.start_one(kind, arg, payload)
                    self.read += 1
                if not self.inbox.slow and _monotonic() > self.deadline:
                    self.inbox.overran()
            elif kind == protocol.CANCEL:
                task = self.running.get(arg)
                if task is not None:
                    task.cancel()
                    if self.batcher is not None:
                        self.batcher.dropped()
                else:
                    self.inbox.cancel(arg)   # answered when its turn comes, if it waits
            elif kind == protocol.RECALL:
                self.inbox.recall(set(loads(payload)))
            elif kind == protocol.CREDIT:
                self.credited(arg)
            elif kind == protocol.STOP:
                self.stopping = True
                if self.batcher is not None:
                    self.batcher.hand_over()   # what it started finishes now
                self.maybe_stop()
            elif kind == protocol.PAUSE or kind == protocol.RESUME:
                if kind == protocol.PAUSE and self.batcher is not None:
                    self.batcher.hand_over()   # a pause waits for what it started
                self.run_hook(kind)
            elif kind == protocol.TERMINATE:
                self.terminate()
        # What these frames produced (replies of handlers that did not suspend, freed
        # slots) leaves now, together, instead of one loop iteration later.
        self.channel.flush()

    def start_batch(self, payload: Any) -> None:
        """Run a batch of tasks, in order. If the batch cannot be unpickled (a message's
        class cannot be imported here), ask the parent to send its tasks one by one."""
        tids, messages_pickle = protocol.unpack_ids(payload)
        try:
            messages = loads(messages_pickle)
        except BaseException:
            self.read += len(tids)   # done with: the parent sends them again
            self.channel.send(protocol.RESEND, 0, dumps(tids))
            return
        position = self.start_list(tids, messages, self.deadline)
        self.read += position
        if position < len(tids):   # over budget: the rest waits in the inbox
            self.inbox.hold_rest(tids[position:], messages[position:])

    def start_list(self, tids: list[int], messages: list[Any], deadline: float) -> int:
        """Start the tasks of a batch in order until the clock passes ``deadline`` (then
        the turn has overran); return how many were started."""
        count = len(tids)
        if self.looppool_style or not self.batch_replies or self.batcher is not None:
            run = self.run
            for position in range(count):
                run(tids[position], messages[position], True)
                if _monotonic() > deadline:
                    self.inbox.overran()
                    return position + 1
            return count
        # The common case, kept tight: handle() coroutines stepped eagerly one after
        # another; those that finish at once answer in this iteration's REPLIES frame.
        with eager.Steps(self.loop) as steps:
            if eager.NATIVE:
                return self.start_some(steps, tids, messages, 0, None, None, deadline)
            # Every first step runs in a copy of this context, as a Task's would. One copy
            # serves consecutive handlers while none of them changes a variable in it
            # (comparing it with the original is a pointer comparison until one does):
            # entering a context per handler would cost a fifth of this loop.
            base = contextvars.copy_context()
            position = 0
            while position < count:
                context = base.copy()
                position = context.run(self.start_some, steps, tids, messages, position,
                                       context, base, deadline)
                if position < count and _monotonic() > deadline:
                    self.inbox.overran()
                    break
            return position
        # No flush to schedule for these replies: the caller flushes.

    def start_some(self, steps: eager.Steps, tids: list[int], messages: list[Any],
                   position: int, context: contextvars.Context | None,
                   base: contextvars.Context | None, deadline: float) -> int:
        """Start the batch's handlers from ``position`` on; return where it stopped: at the
        end, once the clock passes ``deadline`` (the turn overran), or (with ``context``,
        on Python 3.10 and 3.11) right after a handler that changed a context variable, so
        that the next one starts in a fresh copy.

        The task's id is set as the origin of its _put_nowait results only with
        ``origins`` (a pool host's worker, which routes them to the task's client by it):
        a context variable costs a tenth of this loop, and on 3.10 and 3.11 a fresh copy
        of the context for each handler.
        """
        call = self.call
        finish = self.finish
        reply_tids = self.reply_tids
        reply_values = self.reply_values
        held = self.held   # results waiting for credit: replies must wait behind them
        NOT_DONE = eager.NOT_DONE
        stopping = self.stopping
        first_step = steps.run if context is None else steps.send_first
        count = len(tids)
        clock = _monotonic
        set_origin = _origin.set if self.origins else None
        while position < count:
            if clock() > deadline:
                self.inbox.overran()
                return position
            tid = tids[position]
            message = messages[position]
            position += 1
            if set_origin is not None:
                set_origin(tid)
            try:
                result = call(message)
            except (SystemExit, KeyboardInterrupt):
                raise  # the handler asked the process to end: see worker_main
            except BaseException as exc:
                finish(tid, True, exc, failed=True)
            else:
                if type(result) is not types.CoroutineType:
                    if inspect.isawaitable(result):
                        result = _await(result)
                    else:
                        finish(tid, True, result)
                        continue
                value = first_step(result)
                if value is not NOT_DONE:
                    if not held and not stopping:
                        reply_tids.append(tid)
                        reply_values.append(value)
                    else:
                        finish(tid, True, value)
                else:
                    state, value = steps.outcome
                    if state == eager.PENDING:
                        self.running[tid] = value
                        value.add_done_callback(
                            functools.partial(self.task_finished, tid, True))
                    else:
                        finish(tid, True, value, failed=state == eager.RAISED)
            if context is not None and context != base:
                return position
        return position

    def start_one(self, kind: int, arg: int, payload: Any) -> None:
        """Start the work of one frame other than TASKS."""
        if kind == protocol.TASK:
            self.start_task(arg, payload, True)
        elif kind == protocol.MAP:
            chunk.start(self, arg, payload)
        elif kind == protocol.NOTE:
            self.start_task(arg, payload, False)
        else:   # REPLAY
            self.start_task(_REPLAYED, payload, False)

    # -- the inbox: work held while the loop is over its budget ---------------------------

    def refuse(self, tid: int) -> None:
        """Answer a held task the parent cancelled before it started: it never runs."""
        self.inbox.cancelled.discard(tid)
        if self.looppool_style:
            self.open_slots += 1   # freed right away: the handler never ran
        self.finish(tid, True, asyncio.CancelledError(), failed=True)
        if self.looppool_style:
            self.task_done()

    def start_task(self, tid: int, payload: Any, reply: bool) -> None:
        """Unpickle and run one message; ``tid`` is the task id, or for a note (``reply``
        false) the origin its results are routed to."""
        try:
            message = loads(payload)
        except BaseException as exc:
            _origin.set(tid)
            if self.looppool_style:
                self.open_slots += 1   # freed right away: the handler never ran
            self.finish(tid, reply, exc, failed=True, note='could not unpickle the message')
            if self.looppool_style:
                self.task_done()
            return
        self.run(tid, message, reply)

    def run(self, tid: int, message: Any, reply: bool) -> None:
        _origin.set(tid)
        if self.looppool_style:
            self.open_slots += 1
        try:
            result = self.call(message)
        except (SystemExit, KeyboardInterrupt):
            raise  # the handler asked the process to end: see worker_main
        except BaseException as exc:
            self.finish(tid, reply, exc, failed=True)
            return
        if type(result) is types.CoroutineType or inspect.isawaitable(result):
            if isinstance(result, asyncio.Future):   # a place in a batch (see Batcher.add)
                # (Even if its batch was answered at once: after the others, in order.)
                self.running[tid if reply else -id(result)] = result
                result.add_done_callback(functools.partial(self.task_finished, tid, reply))
                return
            if type(result) is not types.CoroutineType:
                result = _await(result)
            state, task = eager.step(self.loop, result)
            if state != eager.PENDING:
                self.finish(tid, reply, task, failed=state == eager.RAISED)
                return
            self.running[tid if reply else -id(task)] = task
            task.add_done_callback(functools.partial(self.task_finished, tid, reply))
            return
        self.finish(tid, reply, result)

    def task_finished(self, tid: int, reply: bool, task: asyncio.Future[Any]) -> None:
        self.running.pop(tid if reply else -id(task), None)
        if task.cancelled():
            self.finish(tid, reply, asyncio.CancelledError(), failed=True)
            return
        exc = task.exception()
        if exc is not None:
            self.finish(tid, reply, exc, failed=True)
        else:
            self.finish(tid, reply, task.result())

    # -- flushing --------------------------------------------------------------------------

    def before_flush(self) -> None:
        if self.read:
            read, self.read = self.read, 0
            self.channel.send(protocol.ACK, read)
        if self.reply_tids:
            self.send_replies()
        if self.freed:
            freed, self.freed = self.freed, 0
            self.channel.send(protocol.FREED, freed)

    # -- pause and resume ------------------------------------------------------------------

    def run_hook(self, kind: int) -> None:
        """Run ``_pause()`` (PAUSE) or ``_resume()`` (RESUME) after the hooks before it,
        then answer PAUSED or RESUMED."""
        previous = self.hook
        self.hook = eager.start(self.loop, self.hook_then_answer(previous, kind))

    async def hook_then_answer(self, previous: asyncio.Future[Any] | None, kind: int) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait({previous})
        worker = self.worker
        assert worker is not None
        name = '_pause' if kind == protocol.PAUSE else '_resume'
        try:
            result = getattr(worker, name)()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception('worker %d: %s() raised', self.number, name)
        self.channel.send(protocol.PAUSED if kind == protocol.PAUSE else protocol.RESUMED, 0)

    # -- stopping --------------------------------------------------------------------------

    def maybe_stop(self) -> None:
        if self.stopped or self.orphaned or self.running or self.open_slots or self.held \
                or self.inbox.busy:
            return
        self.stopped = True
        eager.start(self.loop, self.finalise_and_exit())

    async def finalise_and_exit(self) -> None:
        assert self.worker is not None   # a stop is taken only once the worker is ready
        try:
            result = self.worker._finalise()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception('worker %d: _finalise() raised', self.number)
        self.channel.flush()
        self.loop.stop()

    def terminate(self) -> None:
        self.stopping = True
        # What never started is answered as cancelled, as what runs is.
        for kind, arg, _ in self.inbox.drop():
            if kind == _REST:
                for tid in arg:
                    self.refuse(tid)
            elif kind == protocol.TASK:
                self.refuse(arg)
            elif kind == protocol.MAP:
                chunk.refuse(self, arg)
        for task in list(self.running.values()):
            task.cancel()
        if self.batcher is not None:
            self.batcher.hand_over()   # (its messages were cancelled: nothing to hand over)
        self.open_slots = 0
        self.credited(len(self.held))   # past the deadline: send what is held regardless
        self.maybe_stop()

    def on_parent_lost(self) -> None:
        # The parent closed its end or died: nobody is left to answer, so cancel what runs,
        # let the handlers' except/finally blocks run (for at most _CLEANUP_GRACE), and
        # exit. Called by the channel (end of file) and by the death signal, whichever
        # reaches the loop first; the second call finds it done.
        if self.orphaned:
            return
        self.stopping = True
        self.orphaned = True
        self.inbox.drop()
        # The loop runs, so the short deadline the death signal set (for a blocked loop)
        # gives way to the cleanup's; past it, a handler that blocks in its cleanup, or a
        # join() that hangs, must not keep the process alive.
        _end_process_after(_ORPHAN_DEADLINE)
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        if not tasks:
            self.loop.stop()
            return
        self.loop.call_later(_CLEANUP_GRACE, self.loop.stop)
        done = asyncio.gather(*tasks, return_exceptions=True)
        done.add_done_callback(lambda _: self.loop.stop())


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable



def _end_process_after(seconds: float) -> None:
    """End this process with SIGALRM after ``seconds`` (replacing an earlier deadline).

    SIGALRM's default action is carried out by the kernel, so it ends the process even while
    the loop is blocked, in Python or in C. The default is restored first: a forked worker
    inherits the parent's handlers (pytest-timeout's, for one).
    """
    if not hasattr(signal, 'setitimer') or \
            threading.current_thread() is not threading.main_thread():  # pragma: no cover
        return   # (signals are set from the main thread only; worker_main runs there)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, seconds)
