"""serve(): start a pool host as a child of this process, and its handle."""

from __future__ import annotations

import multiprocessing
import multiprocessing.spawn
import os
import signal
import ssl
from typing import Any

from ..pool import Pool, _disown
from ..worker import Worker
from .access import (Address, _allowed, _answers, _check_address, _private_directory,
                     _secret_bytes, default_address)
from .host import _run_host


def _serve_process(worker_class: type[Worker], address: Address, secret: bytes | None,
                   ssl_context: Any, pool_options: dict[str, Any], allowed_uids: set[int],
                   conn: Any) -> None:
    parent = multiprocessing.parent_process()

    def ready(state: str, detail: Any) -> None:
        conn.send((state, detail))
        conn.close()

    _run_host(worker_class, address, secret, ssl_context, pool_options, allowed_uids, None,
              ready, parent.sentinel if parent is not None else None)


class HostHandle:
    """A running pool host started by :func:`serve`: its ``address`` and ``pid``."""

    def __init__(self, address: Address, process: multiprocessing.process.BaseProcess
                 ) -> None:
        self.address = address
        self.process = process
        self.pid: int = process.pid or 0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the host: its pool finishes accepted tasks and exits; killed after
        ``timeout`` seconds."""
        if self.process.is_alive():
            os.kill(self.pid, signal.SIGTERM)
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
        self.process.join(5)

    def __repr__(self) -> str:
        return f'<HostHandle address={self.address!r} pid={self.pid}>'


def serve(worker_class: type[Worker], address: Address | None = None, *,
          pool_size: int | None = None, secret: str | bytes | None = None,
          ssl_context: ssl.SSLContext | None = None, allowed_uids: Any = None,
          start_timeout: float = 60.0, **pool_options: Any) -> HostHandle:
    """Start a host process that runs a :class:`~looppool.Pool` of ``worker_class`` and
    serves it at ``address``; return once it accepts clients.

    ``address`` is a Unix socket path (``None``: :func:`default_address`) or a
    ``(host, port)`` tuple (port 0 picks a free one; the handle's ``address`` has it). A
    socket's directory is created with mode 0700 if missing; one that belongs to another
    user or that others may write to raises :class:`PermissionError` here. The
    host exits when the process that called ``serve()`` exits, and on
    :meth:`HostHandle.stop`. This is the form for a web server's master process: call it
    before the server forks its workers (gunicorn's ``on_starting``, before Tornado's
    ``fork_processes``), and :func:`connect` in each worker.

    The host process is started with the pool's ``mp_context`` (the interpreter's default
    when not given); TLS (``ssl_context``) needs ``fork``, as an ``SSLContext`` cannot be
    pickled for ``spawn``.
    """
    if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
        raise TypeError(f'worker_class must be a subclass of looppool.Worker, '
                        f'got {worker_class!r}')
    address = default_address(worker_class) if address is None else address
    key = _secret_bytes(secret)
    _check_address(address, key, ssl_context)
    uids = _allowed(allowed_uids)
    options = dict(pool_options, pool_size=pool_size)
    Pool(None, **options, worker_class=worker_class)  # check the options here, not later
    ctx = multiprocessing.get_context(pool_options.get('mp_context'))
    if isinstance(address, str):
        # Checked here too (the host checks again before it binds) so that an unsafe
        # directory raises PermissionError in the caller, not a host's traceback.
        _private_directory(address)
        if _answers(address):
            raise FileExistsError(f'a pool host already answers at {address}')
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_serve_process, name='looppool-host',
                          args=(worker_class, address, key, ssl_context, options, uids,
                                sender))
    process.start()
    _disown(process)   # web workers forked after this must not try to join the host
    sender.close()
    try:
        if not receiver.poll(start_timeout):
            process.kill()
            raise TimeoutError(f'the pool host did not start within {start_timeout} s')
        state, detail = receiver.recv()
    except EOFError:
        process.join(5)
        raise RuntimeError(f'the pool host exited with code {process.exitcode} before it '
                           'was ready') from None
    finally:
        receiver.close()
    if state != 'ready':
        process.join(5)
        raise RuntimeError(f'the pool host could not start:\n{detail}')
    return HostHandle(detail, process)
