"""shared(): connect to the pool host for a worker class, starting a detached one first if
none runs."""

from __future__ import annotations

import fcntl
import multiprocessing
import multiprocessing.spawn
import os
import pickle
import select
import socket
import ssl
import subprocess
import sys
import tempfile
from typing import Any

from ..pool import Pool
from ..worker import Worker
from .access import (Address, _allowed, _answers, _check_address, _private_directory,
                     _secret_bytes, default_address)
from .client import Client
from .host import _run_host
from .sync import SyncClient

# -- create-or-connect -------------------------------------------------------------------------

def shared(worker_class: type[Worker], address: Address | None = None, *,
           idle_timeout: float = 30.0, secret: str | bytes | None = None,
           ssl_context: ssl.SSLContext | None = None, allowed_uids: Any = None,
           sync: bool = False, start_timeout: float = 60.0,
           **pool_options: Any) -> Client | SyncClient:
    """Connect to the pool host for ``worker_class`` at ``address``, starting it first if
    none runs; ``created_new_pool`` on the returned client says which happened.

    Exactly one host starts even when many processes call this at once: they take turns
    under a lock file beside the socket. The host is detached from the process that started
    it (a web server recycles its workers): it lives while clients are connected and exits
    ``idle_timeout`` seconds after the last one leaves. If it dies, the next call of a client
    made here starts a new one. ``worker_class`` must be importable by module name (not
    defined in ``__main__``), because the host is a fresh interpreter. ``sync=True`` returns
    a :class:`SyncClient`, otherwise a :class:`Client`.
    """
    if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
        raise TypeError(f'worker_class must be a subclass of looppool.Worker, '
                        f'got {worker_class!r}')
    if worker_class.__module__ == '__main__':
        raise ValueError(f'{worker_class.__qualname__} is defined in __main__; a shared host '
                         'is a fresh interpreter that imports the class by module name, so '
                         'move it into a module')
    if not (isinstance(idle_timeout, (int, float)) and idle_timeout > 0):
        raise ValueError(f'idle_timeout must be a positive number of seconds, got '
                         f'{idle_timeout!r}')
    address = default_address(worker_class) if address is None else address
    key = _secret_bytes(secret)
    _check_address(address, key, ssl_context)
    if ssl_context is not None:
        raise ValueError('shared() starts its host in a fresh interpreter, which cannot '
                         'receive an SSLContext; use serve() with fork for TLS')
    Pool(None, **pool_options, worker_class=worker_class)  # check the options here
    spec = {'worker_class': worker_class, 'address': address, 'secret': key,
            'pool_options': pool_options, 'allowed_uids': _allowed(allowed_uids),
            'idle_timeout': float(idle_timeout)}
    client: Client | SyncClient

    def ensure() -> bool:
        created = _ensure_host(spec, start_timeout)
        client.created_new_pool = client.created_new_pool or created
        return created

    if sync:
        client = SyncClient(address, secret=key, ensure_host=ensure)
    else:
        client = Client(address, secret=key, ensure_host=ensure)
    ensure()
    return client


def _lock_path(address: Address) -> str:
    if isinstance(address, str):
        return address + '.lock'
    base = os.environ.get('XDG_RUNTIME_DIR') or tempfile.gettempdir()
    directory = os.path.join(base, f'looppool-{os.getuid()}')
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.join(directory, f'tcp-{address[0]}-{address[1]}.lock')


def _host_answers(address: Address) -> bool:
    if isinstance(address, str):
        return _answers(address)
    try:
        socket.create_connection(address, 2).close()
        return True
    except OSError:
        return False


def _ensure_host(spec: dict[str, Any], start_timeout: float) -> bool:
    """Start the shared host unless one answers; returns whether this call started it."""
    address = spec['address']
    if isinstance(address, str):
        _private_directory(address)
    with open(_lock_path(address), 'a+b') as lock:
        os.chmod(lock.name, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)   # processes racing to start take turns here
        try:
            if _host_answers(address):
                return False
            _start_detached_host(spec, start_timeout)
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_detached_host(spec: dict[str, Any], start_timeout: float) -> None:
    # Not sys.executable: under uWSGI or mod_wsgi that is the server's binary. This is the
    # interpreter multiprocessing would start (multiprocessing.set_executable() sets it).
    python = multiprocessing.spawn.get_executable()
    process = subprocess.Popen(
        [python, '-m', 'looppool.remote'], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        close_fds=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, sys.path))))
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(pickle.dumps(spec))
        process.stdin.close()
        process.wait(start_timeout)   # the launcher exits once its host child forked
        ready, _, _ = select.select([process.stdout], [], [], start_timeout)
        line = process.stdout.readline().decode() if ready else ''
    finally:
        process.stdout.close()
    if not line.startswith('ready'):
        raise RuntimeError(f'the shared pool host did not start: {line.strip() or "timeout"}')


def _detached_main() -> None:
    """``python -m looppool.remote``: fork a detached host and report once it serves."""
    spec = pickle.loads(sys.stdin.buffer.read())
    out = os.dup(sys.stdout.fileno())
    if os.fork():
        os._exit(0)   # the launcher ends at once; the host is re-parented, never a zombie
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)

    def ready(state: str, detail: Any) -> None:
        message = f'ready {detail}\n' if state == 'ready' else \
            'error ' + str(detail).replace('\n', ' | ') + '\n'
        os.write(out, message.encode())
        os.close(out)

    _run_host(spec['worker_class'], spec['address'], spec['secret'], None,
              spec['pool_options'], spec['allowed_uids'], spec['idle_timeout'], ready, None)
