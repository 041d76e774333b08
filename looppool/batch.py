"""Batches: a worker's messages collected for :meth:`Worker.handle_batch
<looppool.Worker.handle_batch>`.

Inside a worker process whose class overrides ``handle_batch``::

    _Runner.run(tid, message)        a TASK, a TASKS batch, a note, a replayed broadcast
      | Batcher.add(message) -> the message's future (the runner answers the task
      v                          with it, as it would with a handle() coroutine)
    the forming batch                messages in the order they were read, whichever
      |                              frame, and so whichever caller, they came from
      | handed over when it holds batch_size messages, or batch_timeout seconds after
      | its first message arrived (at once when the worker is told to stop or pause)
      v
    handle_batch(messages)           one coroutine per batch, started eagerly; several
                                     may run at once when they await
      -> replies                     each resolves its message's future, in order

A chunk of ``map()`` (chunk.start) is a batch's worth of messages read together: its first
messages fill the batch forming, if one is, and it is handed over at once; the rest goes
to ``handle_batch`` in pieces of at most ``batch_size`` (:meth:`Batcher.start_piece`),
each at once, with one future for the piece rather than one per message.

A message taken into the forming batch has *started*, as far as the parent knows: it is
acknowledged (ACK) with the others the read started, it cannot be recalled for another
worker, and if the process dies it fails with WorkerLost. It waits there at most
``batch_timeout``. Each batch handed over is reported to the parent (BATCHED, its size)
for ``stats()``.

A message sent with a trace context (looppool.tracing) joins its batch bare:
``handle_batch`` runs in none of its callers' contexts.

Cancelling a message (its caller cancelled, or its ``timeout`` passed) answers it at
once: while its batch forms, it is left out of the batch; once its batch runs, its reply
is dropped, and the batch's coroutine is cancelled when every message of it was.

Who owns what: the :class:`Batcher` owns the forming batch, its timer and the batches
running; the messages' futures are in the runner's table of what runs, like any task.
Lives in the worker process, on its loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import inspect
import logging
import math
from typing import TYPE_CHECKING, Any

from . import eager, protocol, tracing

if TYPE_CHECKING:
    from .runner import _Runner
    from .worker import Worker

log = logging.getLogger('looppool.worker')

# The options' defaults for a class with handle_batch: batches of up to 64 messages (at
# most a worker's share of max_tasks, which bounds what it may hold), each handed over
# at most 5 ms after its first message arrived.
DEFAULT_SIZE = 64
DEFAULT_TIMEOUT = 0.005


def batches(worker_class: type[Worker]) -> bool:
    """Whether ``worker_class`` takes its messages in batches (overrides handle_batch)."""
    from .worker import Worker
    return worker_class.handle_batch is not Worker.handle_batch


def check_options(worker_class: type[Worker], size: Any, timeout: Any, max_tasks: int,
                  pool_size: int) -> tuple[int | None, float] | None:
    """Check the pool's ``batch_size`` and ``batch_timeout`` against ``worker_class`` and
    the pool's bounds; return ``(size or None for the default, timeout)``, or ``None``
    for a class that does not batch.

    :raises TypeError: the options given for a class without ``handle_batch``, a class
        with both ``handle_batch`` and ``_process_message``, or an option of the wrong
        type.
    :raises ValueError: ``batch_size`` under 1 or over a worker's share of
        ``max_tasks``, ``batch_timeout`` negative or not finite.
    """
    from .worker import Worker
    name = worker_class.__qualname__
    if not batches(worker_class):
        if size is not None or timeout is not None:
            given = 'batch_size' if size is not None else 'batch_timeout'
            raise TypeError(f'{given} is for a Worker that overrides handle_batch(), and '
                            f'{name} does not: it handles messages one by one')
        return None
    if worker_class._process_message is not Worker._process_message:
        raise TypeError(f'{name} overrides both handle_batch() and _process_message(): '
                        'a batch worker takes every message through handle_batch(); '
                        'remove one of them')
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f'batch_size must be an int, got {size!r}')
        if size < 1:
            raise ValueError(f'batch_size must be at least 1, got {size}')
        share = max(1, max_tasks // pool_size)
        if size > share:
            raise ValueError(
                f'batch_size is {size}, but a worker holds at most its share of max_tasks '
                f'({max_tasks} // {pool_size} workers = {share} messages), so no batch '
                'could fill: lower batch_size or raise max_tasks')
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    elif not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f'batch_timeout must be a number of seconds, got {timeout!r}')
    elif not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f'batch_timeout must be a finite number of seconds, 0 or more, '
                         f'got {timeout!r}')
    return size, float(timeout)


def config(options: tuple[int | None, float] | None, share: int) -> tuple[int, float]:
    """A worker's ``(batch_size, batch_timeout)`` from what :func:`check_options`
    returned, for a worker's ``share`` of ``max_tasks``; ``(0, 0.0)`` if it does not
    batch."""
    if options is None:
        return 0, 0.0
    size, timeout = options
    return min(size or DEFAULT_SIZE, share), timeout


class Batcher:
    """Forms a batch worker's batches and runs ``handle_batch`` on them; see the module's
    docstring. Lives in the worker process, on its loop; not thread-safe."""

    def __init__(self, runner: _Runner, size: int, timeout: float) -> None:
        from .answers import _origin
        self.runner = runner
        self.loop = runner.loop
        self.size = size
        self.timeout = timeout
        self.origin = _origin
        self.name = 'handle_batch()'
        self.call: Any = None          # the worker's handle_batch, once attached
        self.messages: list[Any] = []   # the forming batch, in order
        self.futures: list[asyncio.Future[Any]] = []
        self.timer: asyncio.TimerHandle | None = None
        # The batches running: their coroutine's future, and their messages' futures.
        self.running: dict[asyncio.Future[Any], list[asyncio.Future[Any]]] = {}

    def attach(self, worker: Worker) -> None:
        self.call = worker.handle_batch
        self.name = f'{type(worker).__qualname__}.handle_batch()'

    def add(self, message: Any) -> asyncio.Future[Any]:
        """Take ``message`` into the forming batch; returns the future of its reply."""
        if tracing.ENABLED and type(message) is tracing.Traced:
            # A batch has many callers, so it runs in none of their trace contexts (see
            # the manual): handle_batch gets the bare message.
            message = message.message
        future = self.loop.create_future()
        self.messages.append(message)
        self.futures.append(future)
        count = len(self.messages)
        if count >= self.size:
            self.hand_over()
        elif count == 1:
            delay = 0.0 if self.runner.stopping else self.timeout
            self.timer = self.loop.call_later(delay, self.hand_over)
        return future

    def hand_over(self) -> None:
        """Start ``handle_batch`` on the forming batch, but for the messages cancelled
        while it formed."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.purge()
        messages, futures = self.messages, self.futures
        if not messages:
            return
        self.messages, self.futures = [], []
        self.runner.channel.send(protocol.BATCHED, len(messages))
        # No one caller's batch: a _put_nowait() in handle_batch() goes to the pool's
        # process_message, not to the client of one of its messages (see the manual).
        context = contextvars.copy_context()
        context.run(self.origin.set, 0)
        task = context.run(eager.start, self.loop, self.run(messages, futures))
        if task.done():
            # (Its messages' answers are callbacks to come: a stop waits for them.)
            self.report(task)
            return
        self.running[task] = futures
        self.runner.running[-id(task)] = task
        task.add_done_callback(self.ended)

    def start_piece(self, messages: list[Any]) -> tuple[int, Any]:
        """Start ``handle_batch`` at once on ``messages``, a piece of a map() chunk, as a
        batch of their own; returns what :func:`eager.step <looppool.eager.step>` does,
        with the list of replies when it ended at its first step."""
        if tracing.ENABLED:   # a batch runs in none of its callers' trace contexts
            messages = [message.message if type(message) is tracing.Traced else message
                        for message in messages]
        self.runner.channel.send(protocol.BATCHED, len(messages))
        context = contextvars.copy_context()
        context.run(self.origin.set, 0)   # no one caller's batch: see hand_over()
        return context.run(eager.step, self.loop, self.run_piece(messages))

    async def run_piece(self, messages: list[Any]) -> list[Any]:
        """``handle_batch`` on a piece of a chunk: its replies, or the error that fails
        every message of it."""
        result = self.call(messages)
        if inspect.isawaitable(result):
            result = await result
        replies = self.replies(result, len(messages))
        if isinstance(replies, Exception):
            raise replies
        return replies

    def purge(self) -> None:
        """Leave out of the forming batch the messages cancelled (and so answered) while
        it formed."""
        futures = self.futures
        if any(future.done() for future in futures):
            kept = [i for i, future in enumerate(futures) if not future.done()]
            self.messages = [self.messages[i] for i in kept]
            self.futures = [futures[i] for i in kept]

    def dropped(self) -> None:
        """Some message was cancelled: leave it out of the forming batch (where it no
        longer counts towards ``batch_size``), and cancel the running batches none of
        whose messages is still waited for."""
        self.purge()
        if not self.futures and self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for task, futures in list(self.running.items()):
            if all(future.done() for future in futures):
                task.cancel()

    async def run(self, messages: list[Any], futures: list[asyncio.Future[Any]]) -> None:
        """Run ``handle_batch`` on one batch; answer each message from what it did."""
        try:
            result = self.call(messages)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except (SystemExit, KeyboardInterrupt):
            raise   # the handler asked the process to end, as from handle()
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        replies = self.replies(result, len(messages))
        if isinstance(replies, Exception):
            for future in futures:
                if not future.done():
                    future.set_exception(replies)
            return
        for future, reply in zip(futures, replies):
            if future.done():
                continue   # cancelled while the batch ran: nobody waits for it
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def replies(self, result: Any, count: int) -> list[Any] | Exception:
        """``handle_batch``'s return value as a list of ``count`` replies, or the error
        that fails every message of the batch."""
        if isinstance(result, list):
            replies = result
        elif (isinstance(result, collections.abc.Sequence)
              and not isinstance(result, (str, bytes, bytearray))) \
                or hasattr(result, '__array_interface__'):
            replies = list(result)   # a tuple, a NumPy array: one item (row) per message
        else:
            return TypeError(f'{self.name} must return a list with one reply per message, '
                             f'in order; it returned {type(result).__qualname__} for a '
                             f'batch of {count} messages')
        if len(replies) != count:
            return ValueError(f'{self.name} returned {len(replies)} replies for a batch of '
                              f'{count} messages; it must return one reply per message, '
                              'in order')
        return replies

    def ended(self, task: asyncio.Future[Any]) -> None:
        """A batch that suspended has ended."""
        self.running.pop(task, None)
        self.runner.running.pop(-id(task), None)
        self.report(task)
        if self.runner.stopping:
            self.runner.maybe_stop()

    def report(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover
            log.error('worker %d: a batch failed', self.runner.number,
                      exc_info=task.exception())
