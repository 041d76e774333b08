"""The exceptions looppool raises.

::

    LooppoolError
     ├── WorkerLost          the worker running a task died or was killed
     │    └── WorkerStartError   a worker could not start (its constructor, start() or
     │                           _initialise() raised)
     ├── PoolClosed          the pool is stopped or stopping
     ├── ConnectionLost      the connection to a pool host broke (looppool.remote)
     └── AuthenticationError a pool host or client refused its peer (looppool.remote)

An exception raised by a handler in a worker is not wrapped: it reaches the caller as
itself, with the worker's traceback attached as ``__cause__`` (a :class:`RemoteTraceback`).
A timeout raises the built-in :class:`TimeoutError`.
"""

from __future__ import annotations

__all__ = ['LooppoolError', 'WorkerLost', 'WorkerStartError', 'PoolClosed', 'ConnectionLost',
           'AuthenticationError', 'RemoteTraceback']


class LooppoolError(Exception):
    """Base class of the errors looppool raises about its own state."""


class WorkerLost(LooppoolError):
    """The worker process this task was given to died (signal, crash, ``os._exit``) or was
    killed, and the task may have started there.

    The worker is replaced under the same number; other workers' tasks are not affected. A
    task it held and had not started runs on another worker instead of failing.
    ``number``, ``pid`` and ``exitcode`` (negative: the signal) describe the lost process.
    """

    def __init__(self, message: str, number: int | None = None, pid: int | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.number = number
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.args[0] if self.args else '', self.number, self.pid,
                             self.exitcode))


class WorkerStartError(WorkerLost):
    """A worker could not start: its constructor, ``start()`` or ``_initialise()`` raised,
    or it died before it was ready.

    ``traceback`` holds the start-up traceback formatted in the worker.
    """

    def __init__(self, message: str, number: int | None = None, pid: int | None = None,
                 exitcode: int | None = None, traceback: str = '') -> None:
        super().__init__(message, number, pid, exitcode)
        self.traceback = traceback

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.args[0] if self.args else '', self.number, self.pid,
                             self.exitcode, self.traceback))


class PoolClosed(LooppoolError):
    """The pool is stopped or stopping, so it takes no new messages (or dropped this one)."""


class ConnectionLost(LooppoolError):
    """The connection to a pool host broke; the calls in flight on it failed with this.

    The next call connects again (and, for a client made by :func:`shared`, starts a new
    host if none is running).
    """


class AuthenticationError(LooppoolError):
    """The pool host refused this client (wrong or missing secret, or a foreign uid), the
    host failed to prove it knows the secret, or the client refused a host on a Unix
    socket that runs as another user."""



class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as ``__cause__``.

    Its ``str()`` is the traceback as the worker formatted it, so a traceback printed in
    the parent shows both where the caller awaited and where the worker raised.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
