"""shared(): connect to the pool host for a worker class, starting a detached one first if
none runs."""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import multiprocessing.spawn
import os
import pickle
import select
import ssl
import subprocess
import sys
import time
from typing import Any

from ..errors import ConnectionLost
from ..pool import Pool
from ..worker import Worker
from .access import (Address, _allowed, _check_address, _open_private, _runtime_directory,
                     _secret_bytes, default_address)
from .client import Client
from .host import _run_host
from .sync import SyncClient

# How long a shared() call waits for another process's host start (the lock) beyond its own
# start_timeout, before it says which file it waited on.
_LOCK_GRACE = 2.0
# The host's log file: rotated at this size, one old copy kept (``.log.1``).
_LOG_BYTES = 1 << 20


def shared(worker_class: type[Worker], address: Address | None = None, *,
           idle_timeout: float = 30.0, secret: str | bytes | None = None,
           certfile: str | None = None, keyfile: str | None = None,
           cafile: str | None = None, allowed_uids: Any = None,
           sync: bool = False, start_timeout: float = 60.0,
           ssl_context: ssl.SSLContext | None = None,
           **pool_options: Any) -> Client | SyncClient:
    """Connect to the pool host for ``worker_class`` at ``address``, starting it first if
    none runs; ``created_new_pool`` on the returned client says which happened.

    Exactly one host starts even when many processes call this at once: they take turns
    under a lock file beside the socket (for a TCP address, in the private runtime
    directory), waiting at most ``start_timeout`` plus a few seconds. The host is detached
    from the process that started it (a web server recycles its workers): it lives while
    clients are connected and exits ``idle_timeout`` seconds after the last one leaves. If
    it dies, the next call of a client made here starts a new one.

    Before a host that answers at ``address`` is used, it must pass the handshake: the
    socket's owner is checked on a Unix socket, and on TCP the host must prove the
    ``secret``. Something else listening there raises :class:`AuthenticationError` rather
    than being taken for the host.

    The host is a fresh interpreter, started with this process's ``sys.path`` (not its
    working directory). A ``worker_class`` defined in the main script is found as
    :mod:`multiprocessing`'s ``spawn`` finds it: the host runs the main script as
    ``__mp_main__`` first, so its entry code must be guarded by ``if __name__ ==
    '__main__':``. Classes defined in an interactive session cannot be shared.

    TLS over TCP: ``certfile`` and ``keyfile`` (paths: an ``SSLContext`` cannot be sent to
    a fresh interpreter) are the host's certificate and key; clients verify the host
    against ``cafile`` (default: ``certfile``, for a self-signed certificate).

    The host writes its output and its log records (its workers' included) to
    ``<address>.log`` (for TCP, ``tcp-<host>-<port>.log`` in the runtime directory), rotated
    at 1 MiB with one old copy kept; errors about the host name that file.

    ``sync=True`` returns a :class:`SyncClient`, otherwise a :class:`Client`.
    """
    if not (isinstance(worker_class, type) and issubclass(worker_class, Worker)):
        raise TypeError(f'worker_class must be a subclass of looppool.Worker, '
                        f'got {worker_class!r}')
    main = _main_preparation(worker_class)
    if not (isinstance(idle_timeout, (int, float)) and idle_timeout > 0):
        raise ValueError(f'idle_timeout must be a positive number of seconds, got '
                         f'{idle_timeout!r}')
    if ssl_context is not None:
        raise ValueError('shared() starts its host in a fresh interpreter, which cannot '
                         'receive an SSLContext: pass certfile and keyfile (and cafile) '
                         'instead')
    if (certfile is None) != (keyfile is None):
        raise ValueError('certfile and keyfile go together')
    address = default_address(worker_class) if address is None else address
    key = _secret_bytes(secret)
    _check_address(address, key, certfile)
    client_tls = _client_tls(certfile, keyfile, cafile)
    Pool(None, **pool_options, worker_class=worker_class)  # check the options here
    spec = {'worker_class': worker_class, 'address': address, 'secret': key,
            'pool_options': pool_options, 'allowed_uids': _allowed(allowed_uids),
            'idle_timeout': float(idle_timeout), 'tls': (certfile, keyfile)}
    try:
        pickle.dumps(spec)
    except Exception as exc:
        raise TypeError(f'shared() sends worker_class and the pool options to a fresh '
                        f'interpreter, and they cannot be pickled: {exc!r}') from exc
    client: Client | SyncClient

    def ensure() -> bool:
        created = _ensure_host(spec, main, start_timeout, client_tls)
        client.created_new_pool = client.created_new_pool or created
        return created

    if sync:
        client = SyncClient(address, secret=key, ssl_context=client_tls, ensure_host=ensure)
    else:
        client = Client(address, secret=key, ssl_context=client_tls, ensure_host=ensure)
    ensure()
    return client


def _client_tls(certfile: str | None, keyfile: str | None,
                cafile: str | None) -> ssl.SSLContext | None:
    """The clients' TLS context for a host with ``certfile`` (checked to exist), if any."""
    if certfile is None:
        return None
    for name, path in (('certfile', certfile), ('keyfile', keyfile),
                       ('cafile', cafile or certfile)):
        if not os.path.isfile(str(path)):
            raise FileNotFoundError(f'{name} {path!r} is not a file')
    return ssl.create_default_context(cafile=cafile or certfile)


def _main_preparation(worker_class: type[Worker]) -> dict[str, Any]:
    """What a fresh interpreter needs to find the classes this one has (the data
    :func:`multiprocessing.spawn.prepare` takes): ``sys.path`` with ``''`` made absolute,
    the working directory, and the main module when ``worker_class`` lives there."""
    sys_path = [path or os.getcwd() for path in sys.path]
    data: dict[str, Any] = {'sys_path': sys_path, 'dir': os.getcwd()}
    if worker_class.__module__ != '__main__':
        return data
    main = sys.modules['__main__']
    name = getattr(getattr(main, '__spec__', None), 'name', None)
    path = getattr(main, '__file__', None)
    if getattr(main, worker_class.__qualname__, None) is not worker_class:
        raise ValueError(f'{worker_class.__qualname__} is defined in __main__ but cannot be '
                         'found there by name (made inside a function?); a shared host is '
                         'a fresh interpreter that looks it up, so define it at the top '
                         'level of a module or script')
    if name is not None:
        data['init_main_from_name'] = name
    elif path is not None:
        data['init_main_from_path'] = os.path.abspath(path)
    else:
        raise ValueError(f'{worker_class.__qualname__} is defined in __main__ of an '
                         'interactive session; a shared host is a fresh interpreter that '
                         'cannot see it, so define the class in a module or script')
    return data


def _file_beside(address: Address, suffix: str) -> str:
    """The lock or log file of the host at ``address``."""
    if isinstance(address, str):
        return address + suffix
    return os.path.join(_runtime_directory(), f'tcp-{address[0]}-{address[1]}{suffix}')


# What a probe meets where no host is, or where one is dying (a killed host's queued
# connections are reset or closed): start a host there. A proof that fails, or anything that
# is not the handshake, is something else listening, and raises instead.
_NO_HOST = (ConnectionRefusedError, FileNotFoundError, ConnectionResetError, BrokenPipeError,
            EOFError)


def _host_answers(address: Address, secret: bytes | None, tls: Any) -> bool:
    """Whether a pool host that passes the handshake answers at ``address``.

    Raises :class:`AuthenticationError` for anything else that answers there: a host run
    by another user, or a listener that cannot prove the secret.
    """
    probe = SyncClient(address, secret=secret, ssl_context=tls, connect_timeout=10)
    try:
        sock, _ = probe._handshake()
    except ConnectionLost as exc:
        if isinstance(exc.__cause__, _NO_HOST):
            return False   # nothing listens there, or a host dying: start a host
        raise ConnectionLost(f'something answers at {address!r} but is not a pool host '
                             f'that completes the handshake: {exc}') from exc
    sock.close()
    return True


def _ensure_host(spec: dict[str, Any], main: dict[str, Any], start_timeout: float,
                 tls: Any) -> bool:
    """Start the shared host unless one answers; returns whether this call started it."""
    address = spec['address']
    path = _file_beside(address, '.lock')
    fd = _open_private(path)
    try:
        # flock() has no timeout: try at growing intervals until the deadline. The wait is
        # for another process's host start, not on the message path.
        deadline = time.monotonic() + start_timeout + _LOCK_GRACE
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f'waited {start_timeout + _LOCK_GRACE} s for the lock '
                                       f'{path}, held by another process starting the host; '
                                       'if none is, remove the file') from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
        if _host_answers(address, spec['secret'], tls):
            return False
        _start_detached_host(spec, main, start_timeout)
        return True
    finally:
        os.close(fd)   # and with it the lock


def _start_detached_host(spec: dict[str, Any], main: dict[str, Any],
                         start_timeout: float) -> None:
    # Not sys.executable: under uWSGI or mod_wsgi that is the server's binary. This is the
    # interpreter multiprocessing would start (multiprocessing.set_executable() sets it).
    # -I: nothing from the working directory, the environment or the user's site is
    # imported before the caller's own sys.path is in place (a hmac.py in the working
    # directory must not shadow the standard library's).
    python = multiprocessing.spawn.get_executable()
    log = _file_beside(spec['address'], '.log')
    log_fd = _open_private(log)   # the launcher's own errors (an import failing, say)
    try:
        process = subprocess.Popen(
            [python, '-I', '-c', _LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log_fd, start_new_session=True, close_fds=True)
    finally:
        os.close(log_fd)
    assert process.stdin is not None and process.stdout is not None
    try:
        pickle.dump(main, process.stdin)
        pickle.dump(spec, process.stdin)
        process.stdin.close()
        process.wait(start_timeout)   # the launcher exits once its host child forked
        ready, _, _ = select.select([process.stdout], [], [], start_timeout)
        line = process.stdout.readline().decode() if ready else ''
    finally:
        process.stdout.close()
    if not line.startswith('ready'):
        raise RuntimeError(f'the shared pool host did not start: '
                           f'{line.strip() or "no answer within start_timeout"}; its log is '
                           f'{log}')


# The detached host's first lines: the caller's sys.path (and its main module, if the worker
# class lives there), then the host. Both pickles come from the caller through a pipe.
_LAUNCHER = """import multiprocessing.spawn, pickle, sys
multiprocessing.spawn.prepare(pickle.load(sys.stdin.buffer))
from looppool.remote.shared import _detached_main
_detached_main()
"""


def _detached_main() -> None:
    """The launcher: fork a detached host, report once it serves, exit."""
    spec = pickle.load(sys.stdin.buffer)
    out = os.dup(sys.stdout.fileno())
    if os.fork():
        os._exit(0)   # the launcher ends at once; the host is re-parented, never a zombie
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    _log_to(_file_beside(spec['address'], '.log'))

    def ready(state: str, detail: Any) -> None:
        message = f'ready {detail}\n' if state == 'ready' else \
            'error ' + str(detail).replace('\n', ' | ') + '\n'
        os.write(out, message.encode())
        os.close(out)

    certfile, keyfile = spec['tls']
    context = None
    if certfile is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile)
    _run_host(spec['worker_class'], spec['address'], spec['secret'], context,
              spec['pool_options'], spec['allowed_uids'], spec['idle_timeout'], ready, None)


class _HostLog(logging.handlers.RotatingFileHandler):
    """The detached host's log: its log records, and (on descriptors 1 and 2) whatever it
    and its workers print, rotated together."""

    def _open(self) -> Any:
        stream = super()._open()
        for fd in (1, 2):
            os.dup2(stream.fileno(), fd)
        return stream


def _log_to(path: str) -> None:
    os.close(_open_private(path))   # checked: ours, not a link
    handler = _HostLog(path, maxBytes=_LOG_BYTES, backupCount=1)
    handler.setFormatter(logging.Formatter(
        '%(asctime)s %(process)d %(name)s %(levelname)s %(message)s'))
    logging.getLogger().addHandler(handler)
    logging.getLogger('looppool').setLevel(logging.INFO)
    logging.getLogger('looppool').info('pool host starting (pid %d)', os.getpid())
