"""The user's side of a worker: the :class:`Worker` base class, :func:`task_done`, and the
checking of ``worker_args``.

The process a Worker lives in is set up by :mod:`looppool.child`, and the frames from the
parent are run on it by :mod:`looppool.runner`. A Worker instance is the user's and owns
only the user's state; it lives on its worker process's single loop thread.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import tornado.ioloop

from .protocol import dumps

if TYPE_CHECKING:
    from .runner import _Runner

__all__ = ['Worker', 'task_done']

log = logging.getLogger('looppool.worker')

_F = TypeVar('_F', bound=Callable[..., Any])


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

    def _pause(self) -> Any:
        """Called when the pool is paused (:meth:`Pool.pause <looppool.Pool.pause>`):
        e.g. stop consuming a queue, release a connection. No message comes until
        :meth:`_resume`; what was started before goes on. The process and its state stay.

        May return an awaitable, which is awaited; an exception is logged, and the worker
        counts as paused all the same.
        """

    def _resume(self) -> Any:
        """Called when the pool resumes after a pause, before any message that waited
        is handed over. May return an awaitable; an exception is logged, and the worker
        takes work all the same.
        """

    async def handle(self, message: Any) -> Any:
        """Handle one message; the return value (or exception) answers ``submit()``.

        May be ``async def`` or a plain ``def``. A message sent with ``put_nowait()`` or
        ``put()`` has no caller waiting: a return value other than ``None`` is then
        delivered to the pool's ``process_message``, like :meth:`_put_nowait`.
        """
        raise NotImplementedError(
            f'{type(self).__qualname__} must override handle() or _process_message()')

    async def handle_batch(self, messages: list[Any]) -> list[Any]:
        """Handle a batch of messages; return one reply per message, in order.

        Optional: a subclass that overrides it gets every message in batches instead of
        one by one through :meth:`handle` (which the pool then never calls). The pool's
        ``batch_size`` and ``batch_timeout`` say how batches form: a batch is handed over
        once it holds ``batch_size`` messages, or ``batch_timeout`` seconds after its first
        message arrived, whichever comes first. The messages of a batch are whatever
        reached this worker, from any caller (the clients of a pool host included).

        An exception raised here fails every message of the batch with it. An item of
        the returned list that is an :class:`Exception` instance fails only its own
        message, as if ``handle`` had raised it. May be ``async def`` or a plain ``def``::

            class Embedder(looppool.Worker):
                def _initialise(self):
                    self.model = load_model()

                async def handle_batch(self, texts):
                    return self.model.embed(texts)   # one vector per text

        See the manual's "Batches" page.
        """
        raise NotImplementedError(
            f'{type(self).__qualname__} must override handle_batch() to be sent batches')

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
    signature: inspect.Signature | None = None
    if args or kwargs or worker_class.__init__ is not object.__init__ \
            or worker_class.__new__ is not object.__new__:
        # (A class that takes nothing needs no check: and reading object's signature
        # parses its text, which costs a start-up some milliseconds the first time.)
        try:
            signature = inspect.signature(worker_class)
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
