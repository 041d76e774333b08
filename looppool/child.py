"""The worker process's main: its loop, its Worker, its title, the watch on its parent, and
the forwarding of its log records; then the :class:`~looppool.runner._Runner` takes over."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any, NoReturn

import tornado.ioloop

from . import protocol
from .channel import Channel
from .protocol import dumps, loads
from .runner import _await, _end_process_after, _Runner
from .worker import Worker

log = logging.getLogger('looppool.worker')

# Sent by Linux when the parent dies. Its default action ends the process; once the worker
# runs, a handler turns it into an orderly exit (see _on_parent_death).
_PARENT_DEATH = getattr(signal, 'SIGRTMIN', signal.SIGUSR2) + 1 \
    if hasattr(signal, 'SIGRTMIN') else signal.SIGUSR2

# How long the loop may take to run the death signal's callback. A loop that has not run it
# by then is blocked by a handler that does not yield (CPU-bound): its cleanup could not run
# anyway, so the process ends at once instead of after the cleanup grace.
_BLOCKED_LOOP_GRACE = 0.2


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
    channel.send(protocol.START_FAILED, os.getpid(),
                 dumps((f'{step} raised', traceback.format_exc())))
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
