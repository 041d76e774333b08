"""The worker side: the :class:`Worker` base class, :func:`task_done`, and the worker
process's main function.

Inside one worker process::

    channel (socket to the parent) --frames--> _Runner.on_frames
        TASK / NOTE  -> Worker.handle(message)            (modern)
                        Worker._process_message(message)  (Looppool style)
                        run as a coroutine on this process's loop, started eagerly
                        (see looppool.eager): one that never suspends costs no Task
        CANCEL       -> the task's asyncio.Task is cancelled
        CREDIT       -> room for more _put_nowait results
        STOP         -> accepted tasks finish, _finalise(), the loop stops, join()
    replies, FREED counts and _put_nowait results go back through the same channel.

Who owns what: the :class:`_Runner` owns the channel, the table of suspended tasks and the
counters; the :class:`Worker` instance is the user's and owns only the user's state. All of
it lives on the worker process's single loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
import types
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import tornado.ioloop

from . import eager, protocol
from .channel import Channel, _ignore, check_size
from .protocol import dumps, loads

__all__ = ['Worker', 'task_done']

log = logging.getLogger('looppool.worker')

_F = TypeVar('_F', bound=Callable[..., Any])


# The task (or note origin) a handler runs for, so that a _put_nowait result can be routed
# back to whoever sent the message (a remote client of a pool host). Tasks copy the context
# when they are created, so concurrent handlers each see their own.
# Kept for callers of the earlier name (looppool.dask): eager.start is the one to use.
start_coroutine = eager.start

_origin: contextvars.ContextVar[int] = contextvars.ContextVar('looppool_origin', default=0)
# The origin of a replayed sticky broadcast: its return value goes nowhere.
_REPLAYED = -1
# Replies that leave before the end of a read that holds many batches.
_EARLY_REPLIES = 256


def task_done(fn: _F) -> _F:
    """Decorate a message handler so that the task (or result) counts as done when it returns.

    On a :class:`Worker`'s ``_process_message`` it calls ``self._task_done()``; on a pool's
    ``process_message(result, result_done)`` it calls ``result_done()``. For a coroutine or
    a function returning an awaitable (``gen.coroutine``), the call happens when the
    awaitable finishes, whether it succeeds or raises::

        class FetchWorker(looppool.Worker):
            @looppool.task_done
            @gen.coroutine
            def _process_message(self, url):
                response = yield self._http_client.fetch(url)
                self._put_nowait((url, response.code))

        @looppool.task_done
        def process_message(result, result_done):
            print(result)
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], Worker):
            done: Callable[[], None] = args[0]._task_done
        elif args and callable(args[-1]):
            done = args[-1]
        else:
            raise TypeError(f'{fn.__qualname__} decorated with @task_done must be a Worker '
                            'method or take result_done as its last argument')
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            done()
            raise
        if inspect.isawaitable(result):
            loop = asyncio.get_event_loop()
            future = asyncio.ensure_future(result, loop=loop)
            future.add_done_callback(lambda _: done())
            return future
        done()
        return result

    return wrapper  # type: ignore[return-value]


class Worker:
    """Base class of the code that runs in each worker process; subclass it.

    One instance is made in each worker process, after the process starts, so anything
    built in :meth:`_initialise` (connections, caches, a lookup table) lives in that
    process only. All of its methods run on the worker's own IO loop thread; it is not
    thread-safe (from another thread, use ``self._ioloop.add_callback``).

    Override :meth:`handle` (modern: its return value answers :meth:`Pool.submit
    <looppool.Pool.submit>`), or :meth:`_process_message` (Looppool 0.3 style: call
    :meth:`_task_done` when done, or decorate it with :func:`task_done`)::

        class Resizer(looppool.Worker):
            def _initialise(self):
                self.cache = {}

            async def handle(self, message):
                return expensive(message)

    Attributes set before :meth:`_initialise` runs:

    ``_number``
        This worker's number, ``0 .. pool_size - 1``; a replacement keeps it.
    ``_ioloop``
        This process's :class:`tornado.ioloop.IOLoop`.
    """

    _number: int
    _ioloop: tornado.ioloop.IOLoop
    _runner: _Runner | None = None

    def _initialise(self) -> Any:
        """Set the worker up; called once per process, before the first message.

        May return an awaitable, which is awaited before the worker takes work. An
        exception here fails the start: the pool reports it and retries with back-off.
        """

    def _finalise(self) -> Any:
        """Clean up (close connections); called once per process on a clean stop.

        Runs on the loop after the last accepted task finished. May return an awaitable.
        """

    async def handle(self, message: Any) -> Any:
        """Handle one message; the return value (or exception) answers ``submit()``.

        May be ``async def`` or a plain ``def``. A message sent with ``put_nowait()`` or
        ``put()`` has no caller waiting: a return value other than ``None`` is then
        delivered to the pool's ``process_message``, like :meth:`_put_nowait`.
        """
        raise NotImplementedError(
            f'{type(self).__qualname__} must override handle() or _process_message()')

    def _process_message(self, message: Any) -> Any:
        """Looppool 0.3 style handler: plain function or coroutine.

        It must call :meth:`_task_done` once the task is done (in ``try``/``finally``, or by
        decorating it with :func:`task_done`); until then the task holds one of the worker's
        slots. Its return value answers ``submit()``.
        """
        raise NotImplementedError  # pragma: no cover - never called for modern workers

    def _put_nowait(self, result: Any) -> None:
        """Send ``result`` to the parent's ``Pool.process_message(result, result_done)``.

        Never blocks and never drops: when this worker's share of ``max_results`` results
        already wait for ``result_done()`` in the parent, the result waits here, and the
        worker frees no task slot until the parent has caught up (so the parent sends it no
        more work meanwhile). Raises whatever pickling raises if ``result`` cannot be
        pickled.
        """
        self._require_runner().put_result(result)

    def _task_done(self) -> None:
        """Free the slot of one Looppool-style task (see :meth:`_process_message`)."""
        self._require_runner().task_done()

    def start(self) -> None:
        """Called in the worker process after :meth:`_initialise`, before the loop runs.

        Subclasses extend it (call ``super().start()``), e.g. to start a periodic reporter.
        """

    def join(self) -> None:
        """Called in the worker process after its loop stopped, before it exits.

        Subclasses extend it (call ``super().join()``), e.g. to stop a reporter.
        """

    def _require_runner(self) -> _Runner:
        runner = self._runner
        if runner is None:
            raise RuntimeError('this Worker is not running in a looppool worker process')
        return runner


def worker_arguments(worker_class: type[Worker], worker_args: Any, worker_kwargs: Any,
                     pickle_with: Callable[[Any], bytes] = dumps) -> bytes:
    """Check the arguments every worker is made with, ``worker_class(*worker_args,
    **worker_kwargs)``, and pickle them, once for the whole life of a pool: every worker
    and every replacement unpickles its own copy of them as they were now.

    :raises TypeError: naming the parameter, if ``worker_args`` is not a tuple or list,
        ``worker_kwargs`` not a dict with str keys (or ``None``), the class does not take
        them, or one of them cannot be pickled.
    """
    if not isinstance(worker_args, (tuple, list)):
        raise TypeError(f'worker_args must be a tuple of positional arguments for '
                        f'{worker_class.__qualname__}(), got {type(worker_args).__qualname__}')
    if worker_kwargs is None:
        worker_kwargs = {}
    elif not (isinstance(worker_kwargs, dict) and all(isinstance(key, str)
                                                      for key in worker_kwargs)):
        raise TypeError(f'worker_kwargs must be a dict of keyword arguments for '
                        f'{worker_class.__qualname__}() or None, got {worker_kwargs!r}')
    args, kwargs = tuple(worker_args), dict(worker_kwargs)
    try:
        signature: inspect.Signature | None = inspect.signature(worker_class)
    except (TypeError, ValueError):   # pragma: no cover - a class without a signature
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            signature = signature.replace(   # the names are enough here
                parameters=[parameter.replace(annotation=parameter.empty)
                            for parameter in signature.parameters.values()],
                return_annotation=signature.empty)
            raise TypeError(
                f'{worker_class.__qualname__}{signature} cannot be called with '
                f'worker_args ({len(args)} positional) and worker_kwargs '
                f'({", ".join(kwargs) or "none"}): {exc}') from None
    try:
        return pickle_with((args, kwargs))
    except Exception as exc:
        # Which one: the other pickles alone (a message names one parameter, not both).
        try:
            pickle_with(args)
        except Exception:
            name = 'worker_args'
        else:
            name = 'worker_kwargs'
        raise TypeError(f'{name} cannot be pickled, and every worker gets its own pickled '
                        f'copy of them: {exc!r}') from exc


class _Runner:
    """Drives one :class:`Worker` in its process: frames in, tasks run, frames out.

    Lives in the worker process, on its loop thread; not thread-safe.
    """

    def __init__(self, worker_class: type[Worker], sock: socket.socket,
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
        self.held: collections.deque[tuple[int, bytes]] = collections.deque()
        self.reply_tids: list[int] = []
        self.reply_values: list[Any] = []
        self.deferred = 0         # slots whose freeing waits for held results to drain
        self.stopping = False
        self.stopped = False
        self.orphaned = False     # the parent is gone: exit without _finalise
        self.looppool_style = worker_class._process_message is not Worker._process_message
        self.call: Callable[[Any], Any] = _ignore   # the worker's handler, once attached
        self.batch_replies = config.batch_replies and not self.looppool_style
        self.channel = Channel(sock, loop, self.on_frames, self.on_parent_lost,
                               before_flush=self.before_flush)

    def attach(self, worker: Worker) -> None:
        """Run ``worker``'s handlers from now on (it was made after this runner)."""
        worker._runner = self
        self.worker = worker
        self.call = worker._process_message if self.looppool_style else worker.handle

    # -- frames from the parent ------------------------------------------------------------

    def on_frames(self, frames: list[tuple[int, int, Any]]) -> None:
        for kind, arg, payload in frames:
            if kind == protocol.TASKS:
                self.start_batch(payload)
                if len(self.reply_tids) >= _EARLY_REPLIES:
                    # A long read: send what is answered so far, so the parent can send
                    # more work while this process goes on with the rest of the read.
                    self.channel.flush()
            elif kind == protocol.MAP:
                self.start_map(arg, payload)
            elif kind == protocol.TASK:
                self.start_task(arg, payload, True)
            elif kind == protocol.NOTE:
                self.start_task(arg, payload, False)
            elif kind == protocol.REPLAY:
                self.start_task(_REPLAYED, payload, False)
            elif kind == protocol.CANCEL:
                task = self.running.get(arg)
                if task is not None:
                    task.cancel()
            elif kind == protocol.CREDIT:
                self.credited(arg)
            elif kind == protocol.STOP:
                self.stopping = True
                self.maybe_stop()
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
            self.channel.send(protocol.RESEND, 0, dumps(tids))
            return
        if self.looppool_style or not self.batch_replies:
            run = self.run
            for tid, message in zip(tids, messages):
                run(tid, message, True)
            return
        # The common case, kept tight: handle() coroutines stepped eagerly one after
        # another; those that finish at once answer in this iteration's REPLIES frame.
        with eager.Steps(self.loop) as steps:
            if eager.NATIVE:
                self.start_some(steps, tids, messages, 0, None, None)
                return
            # Every first step runs in a copy of this context, as a Task's would. One copy
            # serves consecutive handlers while none of them changes a variable in it
            # (comparing it with the original is a pointer comparison until one does):
            # entering a context per handler would cost a fifth of this loop.
            base = contextvars.copy_context()
            position, count = 0, len(tids)
            while position < count:
                context = base.copy()
                position = context.run(self.start_some, steps, tids, messages, position,
                                       context, base)
        # No flush to schedule for these replies: on_frames, our only caller, flushes.

    def start_some(self, steps: eager.Steps, tids: list[int], messages: list[Any],
                   position: int, context: contextvars.Context | None,
                   base: contextvars.Context | None) -> int:
        """Start the batch's handlers from ``position`` on; return where it stopped: at the
        end, or (with ``context``, on Python 3.10 and 3.11) right after a handler that
        changed a context variable, so that the next one starts in a fresh copy.

        No origin is set for these tasks (a context variable costs a tenth of this loop):
        it routes _put_nowait results to a pool host's clients, and a host's workers never
        take this path (their replies are not batched).
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
        while position < count:
            tid = tids[position]
            message = messages[position]
            position += 1
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

    def start_map(self, tid: int, payload: Any) -> None:
        """Run a chunk of ``Pool.map``: every message's handler at once, stepped eagerly in
        order; the chunk is answered with one MAPPED frame once all have ended."""
        try:
            messages = loads(payload)
        except BaseException as exc:
            self.send_mapped(tid, None, {-1: self.encode_error(
                exc, 'could not unpickle a chunk of map()')})
            return
        replies: list[Any] = [None] * len(messages)
        errors: dict[int, bytes] = {}
        waiting: dict[int, asyncio.Future[Any]] = {}
        call = self.call
        _origin.set(tid)
        with eager.Steps(self.loop) as steps:
            for index, message in enumerate(messages):
                try:
                    result = call(message)
                except (SystemExit, KeyboardInterrupt):
                    raise  # the handler asked the process to end: see worker_main
                except BaseException as exc:
                    errors[index] = self.encode_error(exc, None)
                    continue
                if type(result) is not types.CoroutineType:
                    if not inspect.isawaitable(result):
                        replies[index] = result
                        continue
                    result = _await(result)
                state, value = steps.step(result)
                if state == eager.DONE:
                    replies[index] = value
                elif state == eager.RAISED:
                    errors[index] = self.encode_error(value, None)
                else:
                    waiting[index] = value
        if not waiting:
            self.send_mapped(tid, replies, errors)
            return
        task = self.loop.create_task(self.finish_map(tid, replies, errors, waiting))
        self.running[tid] = task
        task.add_done_callback(functools.partial(self.map_finished, tid))

    async def finish_map(self, tid: int, replies: list[Any], errors: dict[int, bytes],
                         waiting: dict[int, asyncio.Future[Any]]) -> None:
        """Wait for a chunk's suspended handlers; cancelled (the caller gave up), cancel
        them all, and answer with what each one did."""
        try:
            await asyncio.wait(waiting.values())
        except asyncio.CancelledError:
            for task in waiting.values():
                task.cancel()
            await asyncio.wait(waiting.values())
        for index, task in waiting.items():
            if task.cancelled():
                errors[index] = self.encode_error(asyncio.CancelledError(), None)
            elif task.exception() is not None:
                errors[index] = self.encode_error(task.exception(), None)  # type: ignore[arg-type]
            else:
                replies[index] = task.result()
        self.send_mapped(tid, replies, errors)

    def map_finished(self, tid: int, task: asyncio.Future[Any]) -> None:
        self.running.pop(tid, None)
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover
            log.error('worker %d: a chunk of map() failed', self.number,
                      exc_info=task.exception())
        if self.stopping:
            self.maybe_stop()

    def send_mapped(self, tid: int, replies: list[Any] | None,
                    errors: dict[int, bytes]) -> None:
        """Answer a chunk: its replies and errors, and the slots it frees (none while
        results are held here: see hold_or_send)."""
        count = len(replies) if replies is not None else 0
        frees = count
        if self.held:
            frees = 0
            self.deferred += count
        try:
            data = dumps((replies, errors))
        except Exception:
            assert replies is not None
            for index, value in enumerate(replies):
                try:
                    dumps(value)
                except Exception as exc:
                    replies[index] = None
                    errors[index] = self.unpicklable(value, exc)
            data = dumps((replies, errors))
        try:
            self.channel.send_parts(protocol.MAPPED, tid, protocol.pack([frees], data))
        except ValueError as exc:   # over the 4 GiB frame limit: every reply fails with it
            self.channel.send_parts(protocol.MAPPED, tid, protocol.pack(
                [frees], dumps((None, {-1: self.encode_error(exc, None)}))))

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

    def finish(self, tid: int, reply: bool, value: Any, failed: bool = False,
               note: str | None = None) -> None:
        """Answer a task: a reply for submit(), or a freed slot (and result) for a note."""
        # A modern task's end frees its slot (Looppool style: _task_done does), unless
        # results are held back, which defers it: see hold_or_send.
        frees = not self.looppool_style
        if frees and self.held:
            frees = False
            self.deferred += 1
        if reply:
            if frees and not failed and self.batch_replies:
                # Pickled with the other replies of this loop iteration, at the flush.
                self.reply_tids.append(tid)
                self.reply_values.append(value)
                if len(self.reply_tids) == 1:
                    self.channel.schedule_flush()
            elif failed:
                kind = protocol.ERROR if frees else protocol.ERROR_KEEP
                self.channel.send(kind, tid, self.encode_error(value, note))
            else:
                self.send_reply(tid, value, frees)
        else:
            if failed and not isinstance(value, asyncio.CancelledError):
                log.error('worker %d: %s %s', self.number,
                          note or 'message handler raised', _describe(value),
                          exc_info=(type(value), value, value.__traceback__))
            elif not failed and value is not None and not self.looppool_style \
                    and tid != _REPLAYED:
                self.send_result(value)
            if frees:
                self.slot_freed()
        if self.stopping:
            self.maybe_stop()

    def send_reply(self, tid: int, value: Any, frees: bool) -> None:
        """Answer one task on its own frame; a reply that cannot be pickled, or is over
        the frame limit, answers it with the error instead."""
        kind = protocol.REPLY if frees else protocol.REPLY_KEEP
        try:
            payload = dumps(value)
        except BaseException as exc:
            kind = protocol.ERROR if frees else protocol.ERROR_KEEP
            payload = self.unpicklable(value, exc)
        try:
            self.channel.send(kind, tid, payload)
        except ValueError as exc:   # over the 4 GiB frame limit
            self.channel.send(protocol.ERROR if frees else protocol.ERROR_KEEP, tid,
                              self.encode_error(exc, None))

    def unpicklable(self, value: Any, exc: BaseException) -> bytes:
        """The error that answers a task whose reply could not be pickled."""
        return self.encode_error(pickle.PicklingError(
            f'worker {self.number} (pid {self.pid}) could not pickle the reply '
            f'({type(value).__qualname__}): {exc!r}'), None)

    def encode_error(self, exc: BaseException, note: str | None) -> bytes:
        text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if note:
            text = f'{note} in worker {self.number} (pid {self.pid}):\n{text}'
        try:
            payload = dumps((exc, text))
            loads(payload)  # an exception that pickles but cannot be rebuilt fails here
            return payload
        except BaseException as pickling_error:
            stand_in = pickle.PicklingError(
                f'worker {self.number} (pid {self.pid}) raised {type(exc).__qualname__}: '
                f'{exc}, which cannot be sent to the parent ({pickling_error!r})')
            return dumps((stand_in, text))

    # -- slots and results -----------------------------------------------------------------

    def slot_freed(self) -> None:
        self.freed += 1
        if self.freed == 1:
            self.channel.schedule_flush()

    def task_done(self) -> None:
        if self.open_slots <= 0:
            raise RuntimeError('_task_done() called more often than messages were received')
        self.open_slots -= 1
        if self.held:
            self.deferred += 1
        else:
            self.slot_freed()
        if self.stopping:
            self.maybe_stop()

    def before_flush(self) -> None:
        if self.reply_tids:
            self.send_replies()
        if self.freed:
            freed, self.freed = self.freed, 0
            self.channel.send(protocol.FREED, freed)

    def send_replies(self) -> None:
        """Send this iteration's replies as one frame; a reply that cannot be pickled
        fails its own task with a PicklingError instead."""
        tids, values = self.reply_tids, self.reply_values
        self.reply_tids, self.reply_values = [], []
        if len(tids) == 1:
            # One reply (a round trip at a time): a REPLY frame, one pickle, no ids list.
            self.send_reply(tids[0], values[0], True)
            return
        try:
            data = dumps(values)
        except Exception:
            good_tids, good_values = [], []
            for tid, value in zip(tids, values):
                try:
                    dumps(value)
                except Exception as exc:
                    self.channel.send(protocol.ERROR, tid, self.unpicklable(value, exc))
                else:
                    good_tids.append(tid)
                    good_values.append(value)
            tids, values, data = good_tids, good_values, dumps(good_values)
        if tids:
            try:
                self.channel.send_parts(protocol.REPLIES, len(tids), protocol.pack(tids, data))
            except ValueError:   # over the frame limit together: each on a frame of its own,
                # so that only a reply over the limit on its own fails
                for tid, value in zip(tids, values):
                    self.send_reply(tid, value, True)

    def put_result(self, result: Any) -> None:
        payload = dumps(result)  # a result that cannot be pickled raises to the caller
        check_size(len(payload))   # so does one over the frame limit, even if it would wait
        self.hold_or_send(_origin.get(), payload)

    def send_result(self, result: Any) -> None:
        """Send a note's return value; one that cannot be pickled is logged."""
        try:
            payload = dumps(result)
            check_size(len(payload))
        except Exception:
            log.exception('worker %d: could not send a result of type %s; it was dropped',
                          self.number, type(result).__qualname__)
            return
        self.hold_or_send(_origin.get(), payload)

    def hold_or_send(self, origin: int, payload: bytes) -> None:
        """Send a result if the parent has room for it, else hold it here.

        At most this worker's share of ``max_results`` results wait for ``result_done()``
        in the parent. Past that, results wait in this process, and while any wait the
        worker frees no task slots, so the parent sends it no more work: backpressure from
        a slow ``process_message`` all the way to ``put_nowait``, and nothing is dropped.
        """
        if self.credit > 0 and not self.held:
            self.credit -= 1
            self.channel.send(protocol.RESULT, origin, payload)
        else:
            self.held.append((origin, payload))

    def credited(self, count: int) -> None:
        """The parent acknowledged ``count`` results: send what was held, then free the
        slots that waited for it."""
        self.credit += count
        held = self.held
        while held and self.credit > 0:
            self.credit -= 1
            origin, payload = held.popleft()
            self.channel.send(protocol.RESULT, origin, payload)
        if not held and self.deferred:
            self.freed += self.deferred
            self.deferred = 0
            self.channel.schedule_flush()
        if self.stopping:
            self.maybe_stop()

    # -- stopping --------------------------------------------------------------------------

    def maybe_stop(self) -> None:
        if self.stopped or self.orphaned or self.running or self.open_slots or self.held:
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
        for task in list(self.running.values()):
            task.cancel()
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


def _describe(exc: BaseException) -> str:
    return f'{type(exc).__qualname__}: {exc}'


# -- the worker process ------------------------------------------------------------------------

# Sent by Linux when the parent dies. Its default action ends the process; once the worker
# runs, a handler turns it into an orderly exit (see _on_parent_death).
_PARENT_DEATH = getattr(signal, 'SIGRTMIN', signal.SIGUSR2) + 1 \
    if hasattr(signal, 'SIGRTMIN') else signal.SIGUSR2

# Once the parent is gone: how long cancelled handlers may take to clean up, and the
# deadline after which the process ends whatever it is doing. Both fit in the promised
# second.
_CLEANUP_GRACE = 0.8
_ORPHAN_DEADLINE = 0.9
# How long the loop may take to run the death signal's callback. A loop that has not run it
# by then is blocked by a handler that does not yield (CPU-bound): its cleanup could not run
# anyway, so the process ends at once instead of after the cleanup grace.
_BLOCKED_LOOP_GRACE = 0.2


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


def _set_parent_death_signal() -> None:
    """Ask Linux to signal this process when its parent dies (a backstop for EOF)."""
    if not sys.platform.startswith('linux'):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, _PARENT_DEATH, 0, 0, 0)
    except Exception:  # pragma: no cover - EOF on the channel still ends the worker
        pass


def _release_forkserver() -> None:
    """Close the forkserver's "alive" pipe that a forkserver child inherits.

    The forkserver exits when every holder of that pipe has closed it; a worker that holds
    it keeps the forkserver, its parent, alive after the pool's process died, and so never
    gets the parent-death signal. Without it the worker's loop, if a handler blocks it,
    would not see the end of file either. The worker does not use the pipe: a forkserver
    it started itself would get a pipe of its own.
    """
    try:
        from multiprocessing import forkserver
        server: Any = getattr(forkserver, '_forkserver')   # private, as its attributes
        fd = server._forkserver_alive_fd
        if fd is not None and server._forkserver_pid is None:
            server._forkserver_alive_fd = None
            os.close(fd)
    except Exception:  # pragma: no cover - end of file still ends an idle worker
        pass


def _on_parent_death(runner: _Runner) -> None:
    """The parent died: cancel the handlers and let them clean up, as on end of file.

    The Python-level handler runs in the main thread between two bytecodes, even while a
    handler spins without yielding; the loop, though, runs the callback only once that
    handler returns. So the handler also sets a short deadline: if the loop does not get to
    the callback within it (on_parent_lost would replace the deadline), the process ends.
    Workers never outlive their parent for more than a fraction of a second. (C code that
    runs long without returning to the interpreter, one huge regular expression say, holds
    the Python-level handler back until it returns.)
    """
    def handler(signum: int, frame: Any) -> None:
        if runner.orphaned:
            return   # end of file got there first: the cleanup runs, with its deadline
        _end_process_after(_BLOCKED_LOOP_GRACE)
        runner.loop.call_soon_threadsafe(runner.on_parent_lost)
    signal.signal(_PARENT_DEATH, handler)


def _set_title(config: protocol.WorkerConfig) -> None:
    if config.title is None:
        return
    try:
        import setproctitle
        setproctitle.setproctitle(config.title)
    except Exception:  # pragma: no cover - a title is a convenience
        pass


def worker_main(worker_class: type[Worker], sock: socket.socket,
                config: protocol.WorkerConfig, parent_pid: int) -> None:
    """The worker process's main function (the target of its ``multiprocessing.Process``)."""
    # The parent stops workers by message; a terminal's Ctrl-C or a service manager's
    # SIGTERM reach the whole process group and must not kill tasks in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _set_parent_death_signal()
    if os.getppid() != parent_pid and config.start_method != 'forkserver':
        os._exit(0)  # the parent died before the death signal was armed
    if config.start_method == 'forkserver':
        _release_forkserver()
    for fd in config.close_fds:
        # Under fork this process inherited the parent's ends of every channel; holding
        # them would keep other workers from seeing their parent's death.
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):  # pragma: no cover
        pass
    _set_title(config)

    # A forked child starts inside the parent's running loop callback; forget that loop.
    asyncio.events._set_running_loop(None)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    io_loop = tornado.ioloop.IOLoop.current()

    runner = _Runner(worker_class, sock, loop, config)
    if config.forward_logs:
        _forward_logs(runner, config)   # before any of the worker's own code runs
    if sys.platform.startswith('linux'):
        _on_parent_death(runner)
    step = f'{worker_class.__qualname__}(*worker_args, **worker_kwargs)'
    try:
        args, kwargs = loads(config.worker_arguments)
        worker = worker_class(*args, **kwargs)
        worker._number = config.number
        worker._ioloop = io_loop
        runner.attach(worker)
        step = 'its _initialise()'
        result = worker._initialise()
        if inspect.isawaitable(result):
            loop.run_until_complete(_await(result))
        step = 'its start()'
        worker.start()
    except BaseException:
        _fail_start(runner.channel, sock, step)
    runner.channel.send(protocol.READY, os.getpid())
    exit_code = 0
    try:
        loop.run_forever()
    except (SystemExit, KeyboardInterrupt) as exc:
        # A handler raised it: the process ends as asked; the pool fails this worker's
        # tasks with WorkerLost and replaces it.
        if isinstance(exc, SystemExit):
            exit_code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        else:
            exit_code = 1
        log.error('worker %d (pid %d): a handler raised %s; the worker exits with code %d',
                  config.number, os.getpid(), type(exc).__name__, exit_code)
    finally:
        try:
            worker.join()
        finally:
            _flush_blocking(runner.channel, sock)
            runner.channel.close()
            loop.close()
    if exit_code:
        sys.exit(exit_code)


def _fail_start(channel: Channel, sock: socket.socket, step: str) -> NoReturn:
    """Tell the pool that ``step`` raised the exception being handled, and exit."""
    channel.send(protocol.START_FAILED, os.getpid(), dumps((step, traceback.format_exc())))
    _flush_blocking(channel, sock)
    sys.stderr.flush()
    os._exit(3)


class _LogForwarder(logging.Handler):
    """Sends every record to the parent, which hands it to its own handlers.

    Never blocks: the channel only buffers. A record made on another thread of the worker
    is passed to the loop thread with ``call_soon_threadsafe``.
    """

    def __init__(self, runner: _Runner) -> None:
        super().__init__()
        self.runner = runner
        self.loop_thread = threading.get_ident()
        self.process_name = f'looppool worker {runner.number}'

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data['msg'] = record.getMessage()
            data['args'] = None
            if record.exc_info:
                data['exc_text'] = record.exc_text or logging.Formatter().formatException(
                    record.exc_info)
            data['exc_info'] = None
            data.pop('message', None)
            data['processName'] = self.process_name
            data['worker_number'] = self.runner.number
            data['worker_pid'] = self.runner.pid
            try:
                payload = dumps(data)
            except Exception:
                payload = dumps({key: value if isinstance(value, (str, int, float, type(None)))
                                 else repr(value) for key, value in data.items()})
        except Exception:
            self.handleError(record)
            return
        channel = self.runner.channel
        if threading.get_ident() == self.loop_thread:
            channel.send(protocol.LOG, 0, payload)
        else:
            self.runner.loop.call_soon_threadsafe(channel.send, protocol.LOG, 0, payload)


def _forward_logs(runner: _Runner, config: protocol.WorkerConfig) -> None:
    """Route this process's log records to the parent's handlers, next to whatever
    handlers the worker's own code configures. Called before any of that code runs.

    What the process holds at this point is the parent's configuration (inherited under
    fork, or made again by the imports of spawn and forkserver). Its handlers are removed:
    the parent applies them to every forwarded record, and here they would write a second
    copy of each.
    """
    root = logging.getLogger()
    loggers = [root] + [logger for logger in logging.Logger.manager.loggerDict.values()
                        if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        # A logger that does not propagate in the parent (it has handlers of its own) must
        # here, or its records never reach the forwarder; the parent hands each record to
        # the logger of its name, where propagate=False applies again.
        logger.propagate = True
    # Where the forwarder goes, and why not on the root logger. logging hands a record to
    # the handlers of the logger it was made on, then to those of each ancestor in turn
    # (logger.parent) as long as propagate is true; the root logger is normally the last.
    # A handler *on* the root logger would count as configuration made by the worker's
    # code: logging.basicConfig(), which does nothing once the root logger has a handler,
    # would do nothing (Looppool 0.3's README calls it in _initialise), and dictConfig(),
    # fileConfig() or basicConfig(force=True), which remove the root logger's handlers,
    # would end forwarding. So the forwarder gets a logger of its own, outside the named
    # hierarchy, made the root logger's parent: every record that reaches the root logger
    # goes to the root's handlers (whatever the worker's code puts there) and then to the
    # forwarder, and configuring the root logger leaves it alone.
    forwarding = logging.Logger('looppool.forwarding')
    forwarding.addHandler(_LogForwarder(runner))
    root.parent = forwarding
    root.setLevel(config.log_level)


def _flush_blocking(channel: Channel, sock: socket.socket) -> None:
    """Write out what the channel holds, waiting for the parent to read it (bounded)."""
    import selectors
    if channel.closed:
        return
    channel.flush()
    deadline = 5.0
    with selectors.DefaultSelector() as selector:
        selector.register(channel.fileno(), selectors.EVENT_WRITE)
        while channel.wants_write and not channel.closed and deadline > 0:
            if selector.select(0.1):
                channel.flush()
            deadline -= 0.1
