"""Worker classes the tests share; importable by spawned and forkserver workers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from tornado import gen

import looppool


class Echo(looppool.Worker):
    """Answers with what it got; a few special messages do something else."""

    def _initialise(self) -> None:
        self.initialised_at = time.monotonic()
        self.seen: list[Any] = []
        self.concurrent = 0
        self.max_concurrent = 0

    async def handle(self, message: Any) -> Any:
        if isinstance(message, tuple) and message and isinstance(message[0], str):
            return await getattr(self, 'do_' + message[0])(*message[1:])
        return message

    async def do_pid(self) -> int:
        return os.getpid()

    async def do_whoami(self) -> tuple[int, int]:
        return self._number, os.getpid()

    async def do_sleep(self, seconds: float, value: Any = None) -> Any:
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.concurrent -= 1
        return value

    async def do_max_concurrent(self) -> int:
        return self.max_concurrent

    async def do_record(self, value: Any) -> None:
        self.seen.append(value)

    async def do_seen(self) -> list[Any]:
        return self.seen

    async def do_raise(self, exc: BaseException) -> None:
        raise exc

    async def do_touch(self, path: str, value: Any = None) -> Any:
        with open(path, 'a'):
            pass
        return value

    async def do_gate(self, path: str, marker: str, value: Any = None) -> Any:
        """Wait (the loop runs) until the file at ``path`` exists, at most 30 s; then
        return, and create the file at ``marker`` once what this reply is part of has been
        written to the parent (a few loop iterations later; twenty are ample)."""
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

        async def touch_later() -> None:
            for _ in range(20):
                await asyncio.sleep(0)
            await self.do_touch(marker)

        self.gates = getattr(self, 'gates', set())
        task = asyncio.get_running_loop().create_task(touch_later())
        self.gates.add(task)
        task.add_done_callback(self.gates.discard)
        return value

    async def do_cancellable(self, seconds: float) -> str:
        """Sleeps; says so (a _put_nowait result) if it is cancelled."""
        return await self._sleep_reporting(seconds, started=False)

    async def do_watched(self, seconds: float) -> str:
        """Sleeps; says when it starts and when it is cancelled."""
        return await self._sleep_reporting(seconds, started=True)

    async def _sleep_reporting(self, seconds: float, started: bool) -> str:
        if started:
            self._put_nowait(('started', self._number))
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self._put_nowait(('cancelled', self._number))
            raise
        return 'finished'

    async def do_spin(self, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
        return 'spun'

    async def do_exit(self, code: int) -> None:
        os._exit(code)

    async def do_system_exit(self, code: int | None) -> None:
        raise SystemExit(code)

    async def do_kill_self(self, signum: int = signal.SIGKILL) -> None:
        os.kill(os.getpid(), signum)

    async def do_put(self, *results: Any) -> int:
        sent = 0
        for result in results:
            self._put_nowait(result)
            sent += 1
        return sent

    async def do_try_put(self, count: int) -> int:
        sent = 0
        try:
            for index in range(count):
                self._put_nowait(index)
                sent += 1
        except Exception as exc:
            return -sent if type(exc).__name__ == 'Full' else -1000
        return sent

    async def do_ioloop(self) -> str:
        return type(self._ioloop).__name__


class Classic(looppool.Worker):
    """A Looppool 0.3 style worker: gen.coroutine _process_message and _put_nowait."""

    def _initialise(self) -> None:
        self.count = 0

    @looppool.task_done
    @gen.coroutine
    def _process_message(self, message: Any) -> Any:
        yield gen.sleep(0.01)
        self.count += 1
        self._put_nowait((message, self._number, os.getpid()))


class ClassicAsync(looppool.Worker):
    """Looppool style with ``async def`` and an explicit ``_task_done()``."""

    async def _process_message(self, message: Any) -> Any:
        try:
            await asyncio.sleep(0)
            self._put_nowait((message, self._number))
            return message
        finally:
            self._task_done()


class ClassicPlain(looppool.Worker):
    """Looppool style with a plain function."""

    @looppool.task_done
    def _process_message(self, message: Any) -> None:
        self._put_nowait((message, self._number))


class SlowStart(looppool.Worker):
    """Takes its time in _initialise, and says when it is in there."""

    def _initialise(self) -> None:
        import os
        import time
        with open(os.environ['LOOPPOOL_TEST_STARTING'], 'a') as marker:
            marker.write(f'{os.getpid()}\n')
        time.sleep(30)

    async def handle(self, message: Any) -> Any:  # pragma: no cover - killed first
        return message


class FailingStart(looppool.Worker):
    def _initialise(self) -> None:
        raise RuntimeError('cannot open the database')

    async def handle(self, message: Any) -> Any:  # pragma: no cover - never starts
        return message


class Chatty(looppool.Worker):
    """Logs from its handlers, on purpose."""

    async def handle(self, message: Any) -> Any:
        import logging
        logger = logging.getLogger('app.worker')
        if message == 'fail':
            try:
                raise ValueError('the parser choked')
            except ValueError:
                logger.exception('could not handle %s', message)
            return 'logged'
        logger.warning('handled %s in worker %d', message, self._number)
        return message


class ClassicBroken(looppool.Worker):
    """A Looppool-style worker whose handler raises: nobody awaits it, so it is logged."""

    @looppool.task_done
    @gen.coroutine
    def _process_message(self, message: Any) -> Any:
        yield gen.sleep(0)
        raise RuntimeError(f'broken on {message}')


class SelfTitled(Echo):
    def _initialise(self) -> None:
        super()._initialise()
        import setproctitle
        setproctitle.setproctitle(f'my-app lookup worker {self._number}')


_tag: Any = None


class Tagger(looppool.Worker):
    """Reports a context variable's value as its handler found it, then sets it; with
    ``('wait', tag)`` it sets it, suspends, and reports what it holds after."""

    def _initialise(self) -> None:
        import contextvars
        global _tag
        _tag = contextvars.ContextVar('tag', default='unset')

    async def handle(self, message: Any) -> Any:
        import asyncio
        kind, tag = message
        found = _tag.get()
        if kind == 'set':
            _tag.set(tag)
            return found
        if kind == 'wait':
            _tag.set(tag)
            await asyncio.sleep(0.01)
            return found, _tag.get()
        return found


class Configured(looppool.Worker):
    """Made with arguments, as ``Pool(worker_args=(table,), worker_kwargs={'scale': 2})``
    makes it: ``Configured(table, *, scale=1)``."""

    def __init__(self, table: dict[str, Any], *, scale: int = 1) -> None:
        if scale < 0:
            raise ValueError(f'scale must not be negative, got {scale}')
        self.table = table
        self.scale = scale

    async def handle(self, message: Any) -> Any:
        if message == 'mutate':
            self.table['changed by'] = self._number   # this process's copy only
        return {'table': self.table, 'scale': self.scale, 'number': self._number,
                'pid': os.getpid()}


class CountsPickles:
    """Counts, in the process that pickles it, how often it was pickled."""

    pickled = 0

    def __reduce__(self) -> tuple[Any, ...]:
        type(self).pickled += 1
        return (CountsPickles, ())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CountsPickles)

    def __hash__(self) -> int:
        return 0


class Batched(looppool.Worker):
    """A handle_batch worker. A plain message is answered with ``(message, batch, size,
    pid)``: the number of its batch in this process, the batch's size, this process's pid.
    A tuple whose first item is a str does something to its batch or to itself:

    ``('raise', exc)``   handle_batch raises ``exc``: the whole batch fails
    ``('fail', exc)``    its own reply is ``exc``: only it fails
    ``('short',)``       handle_batch returns one reply too few
    ``('dict',)``        handle_batch returns a dict, not a list
    ``('tuple',)``       handle_batch returns a tuple (that is fine)
    ``('array',)``       handle_batch returns a NumPy array of each message's len(str())
    ``('put', value)``   handle_batch sends ``value`` with _put_nowait, then answers
    ``('lambda',)``      its reply is a lambda, which cannot be pickled
    ``('sleep', s)``     the batch sleeps ``s`` seconds before it answers; if cancelled
                         meanwhile, it sends ``('batch cancelled', size)`` with _put_nowait
    ``('pid',)``         answered like a plain message (its pid is in the reply)
    """

    def _initialise(self) -> None:
        self.count = 0

    async def handle_batch(self, messages: list[Any]) -> Any:
        self.count += 1
        number, size = self.count, len(messages)
        commands = {message[0]: message[1:] for message in messages if _command(message)}
        if 'raise' in commands:
            raise commands['raise'][0]
        if 'put' in commands:
            self._put_nowait(commands['put'][0])
        if 'sleep' in commands:
            try:
                await asyncio.sleep(commands['sleep'][0])
            except asyncio.CancelledError:
                self._put_nowait(('batch cancelled', size))
                raise
        replies: list[Any] = []
        for message in messages:
            command = message[0] if _command(message) else None
            if command == 'fail':
                replies.append(message[1])
            elif command == 'lambda':
                replies.append(lambda: None)
            else:
                replies.append((message, number, size, os.getpid()))
        if 'short' in commands:
            return replies[:-1]
        if 'dict' in commands:
            return dict(enumerate(replies))
        if 'tuple' in commands:
            return tuple(replies)
        if 'array' in commands:
            import numpy
            return numpy.array([len(str(message)) for message in messages])
        return replies


def _command(message: Any) -> bool:
    return isinstance(message, tuple) and bool(message) and isinstance(message[0], str)


class Spanning(looppool.Worker):
    """Makes a span around each message (with the OpenTelemetry SDK, kept in memory), and
    answers 'spans' with what it recorded: (name, trace id, parent span id)."""

    def _initialise(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter)
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer('looppool-test-worker')

    async def handle(self, message: Any) -> Any:
        if message == 'spans':
            return [(span.name, span.context.trace_id,
                     span.parent.span_id if span.parent else None)
                    for span in self.exporter.get_finished_spans()]
        with self.tracer.start_as_current_span(f'handle {message}'):
            await asyncio.sleep(0.001)   # the context holds across a suspension
            with self.tracer.start_as_current_span(f'inner {message}'):
                pass
        return message


def exists(path: str, timeout: float) -> bool:
    """Whether the file at ``path`` appears within ``timeout`` seconds (this thread waits,
    its loop does not run)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
