"""Who may talk to whom: socket addresses and their directories, secrets and their proofs,
peer uids."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import stat
import struct
import tempfile
from typing import Any, Union

from ..errors import AuthenticationError, ConnectionLost
from ..worker import Worker
from .wire import _NONCE, _WELCOME, HELLO, REFUSED, VERSION, WELCOME

Address = Union[str, tuple[str, int]]


# -- addresses and access ----------------------------------------------------------------------

def _runtime_directory() -> str:
    """``$XDG_RUNTIME_DIR/looppool-<uid>`` (or under the temporary directory): the private
    directory of default sockets, and of the lock and log files of TCP hosts."""
    base = os.environ.get('XDG_RUNTIME_DIR') or tempfile.gettempdir()
    return os.path.join(base, f'looppool-{os.getuid()}')


def default_address(worker_class: type[Worker]) -> str:
    """The Unix socket path :func:`serve` and :func:`shared` use when given no address:
    ``$XDG_RUNTIME_DIR/looppool-<uid>/<module>.<class>.sock`` (or under the temporary
    directory), in a directory only this user can enter."""
    directory = _runtime_directory()
    name = f'{worker_class.__module__}.{worker_class.__qualname__}'
    name = ''.join(c if c.isalnum() or c in '._-' else '_' for c in name)
    path = os.path.join(directory, name + '.sock')
    if len(path.encode()) > 100:  # sun_path holds 108 bytes
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        path = os.path.join(directory, f'{name[:40]}-{digest}.sock')
    return path


def _private_directory(path: str) -> os.stat_result:
    """Create the directory of ``path`` with mode 0700, or check that an existing one is a
    real directory (not a link), ours, and that no one else may write to it (sticky or not:
    in a shared directory another user could bind the socket first). Returns its status, to
    compare after binding (:func:`_still_private`)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f'{directory} is a symbolic link or not a directory; use a '
                              'directory only you can write to')
    if info.st_uid != os.getuid():
        raise PermissionError(f'{directory} belongs to uid {info.st_uid}, not to this user '
                              f'({os.getuid()}); choose another address')
    if info.st_mode & 0o022:
        raise PermissionError(f'{directory} is writable by other users; other users could '
                              'replace the socket. Use a directory only you can write to')
    return info


def _still_private(path: str, before: os.stat_result) -> None:
    """After binding ``path``: its directory is the one checked before, and the socket is
    ours (nothing was swapped in between)."""
    directory = os.path.dirname(os.path.abspath(path))
    now = os.lstat(directory)
    sock = os.lstat(path)
    if (now.st_dev, now.st_ino, now.st_uid) != (before.st_dev, before.st_ino, before.st_uid) \
            or now.st_mode & 0o022 or sock.st_uid != os.getuid() \
            or not stat.S_ISSOCK(sock.st_mode):
        raise PermissionError(f'{directory} changed while the socket was being bound; '
                              'refusing to serve there')


def _open_private(path: str) -> int:
    """Open (or create, mode 0600) a lock or log file in a private directory: never through
    a symbolic link, and only a regular file of ours."""
    _private_directory(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    info = os.fstat(fd)
    if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PermissionError(f'{path} is not a regular file of this user')
    return fd


def _check_address(address: Address, secret: bytes | None, ssl_context: Any) -> None:
    """The rules for an address, the same for a host and its clients: a TCP address needs
    a secret, and one that is not a loopback address needs TLS too."""
    if isinstance(address, str):
        return
    if not (isinstance(address, tuple) and len(address) == 2
            and isinstance(address[0], str) and isinstance(address[1], int)):
        raise TypeError(f'address must be a Unix socket path or a (host, port) tuple, got '
                        f'{address!r}')
    if secret is None:
        raise ValueError('a TCP address needs a secret: anyone who can connect could '
                         'otherwise send pickles, which run code in the host')
    if ssl_context is None and not _is_loopback(address[0]):
        raise ValueError(f'refusing plain TCP to {address[0]!r} without TLS: pass '
                         'ssl_context, or use a loopback address')


def _is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or not secret:
        raise ValueError('secret must be a non-empty str or bytes')
    return secret


def _mac(secret: bytes, nonce: bytes, role: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _peer_uid(sock: socket.socket) -> int | None:
    if not hasattr(socket, 'SO_PEERCRED') or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize('3i'))
    uid: int = struct.unpack('3i', creds)[1]
    return uid


def _check_host(sock: Any, address: Any) -> None:
    """Refuse a pool host on a Unix socket that runs as another user (Linux).

    The host sends pickles, which run code as they are read: a socket another user put at
    the address (in a shared directory, say) must not be talked to. A host run by root is
    accepted, as root can reach this process anyway.
    """
    uid = _peer_uid(sock) if sock is not None else None
    if uid is not None and uid != os.getuid() and uid != 0:
        raise AuthenticationError(
            f'the pool host at {address!r} runs as uid {uid}, not as this user (uid '
            f'{os.getuid()}) or root; refusing to exchange pickles with it')


def _allowed(allowed_uids: Any) -> set[int]:
    if allowed_uids is None:
        return {os.getuid()}
    uids = set(allowed_uids)
    if not all(isinstance(uid, int) for uid in uids):
        raise TypeError(f'allowed_uids must be ints, got {allowed_uids!r}')
    return uids


def _answers(path: str) -> bool:
    """Whether something accepts connections on a Unix socket path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()




# -- the handshake -----------------------------------------------------------------------------
#
# Before either side has proved itself, only the handshake kinds are read,
# frames of at most _PRE_AUTH_FRAME bytes, and none holds a pickle:
#
#   host   -> HELLO    version, the host's nonce
#   client -> AUTH     the client's nonce, HMAC(secret, 'client' + host nonce) on TCP
#   host   -> WELCOME  pool size, HMAC(secret, 'host' + client nonce) on TCP, the share
#
# On a Unix socket the host checks the client's uid when it connects, and the client the
# host's; on TCP each checks the other's proof of the secret. Only then does either side read
# a pickle. Any other frame before that ends the connection.

class _ClientHandshake:
    """A client's half of the handshake, without I/O, shared by both clients."""

    def __init__(self, secret: bytes | None, address: Any) -> None:
        self.secret = secret
        self.address = address
        self.nonce = os.urandom(_NONCE)

    def unexpected(self, kind: int, step: str) -> ConnectionLost:
        return ConnectionLost(f'the pool host at {self.address!r} sent a frame of kind '
                              f'{kind} {step}; closing the connection without reading it')

    def refused(self, payload: Any) -> AuthenticationError:
        return AuthenticationError(f'the pool host at {self.address!r} refused this client: '
                                   f'{bytes(payload).decode(errors="replace")}')

    def answer_hello(self, kind: int, version: int, payload: Any) -> bytes:
        """The AUTH payload that answers the host's first frame."""
        if kind == REFUSED:
            raise self.refused(payload)
        if kind != HELLO:
            raise self.unexpected(kind, 'instead of its greeting')
        if version != VERSION:
            raise ConnectionLost(f'the pool host at {self.address!r} speaks protocol '
                                 f'{version}, this client {VERSION}: run the same looppool '
                                 'version on both sides')
        nonce = bytes(payload)
        if len(nonce) != _NONCE:
            raise ConnectionLost(f'the pool host at {self.address!r} sent a malformed '
                                 'greeting')
        proof = _mac(self.secret, nonce, b'client') if self.secret is not None else b''
        return self.nonce + proof

    def check_welcome(self, kind: int, pool_size: int, payload: Any) -> tuple[int, int]:
        """``(pool_size, share)`` from the host's WELCOME, once its proof checks out."""
        if kind == REFUSED:
            raise self.refused(payload)
        if kind != WELCOME:
            raise self.unexpected(kind, 'before it was authenticated')
        payload = bytes(payload)
        if self.secret is not None:
            expected = _mac(self.secret, self.nonce, b'host')
            if not hmac.compare_digest(payload[:len(expected)], expected):
                raise AuthenticationError(f'the pool host at {self.address!r} could not '
                                          'prove it knows the secret')
            payload = payload[len(expected):]
        if len(payload) != _WELCOME.size or pool_size < 1:
            raise ConnectionLost(f'the pool host at {self.address!r} sent a malformed '
                                 'welcome')
        share: int = _WELCOME.unpack(payload)[0]
        return pool_size, share


def _host_proof(secret: bytes | None, nonce: bytes, payload: bytes) -> bytes | None:
    """The host's check of a client's AUTH payload: its answer to put in WELCOME, or
    ``None`` when the client did not prove the secret."""
    if len(payload) < _NONCE:
        return None
    client_nonce, proof = payload[:_NONCE], payload[_NONCE:]
    if secret is None:
        return b''
    if not hmac.compare_digest(proof, _mac(secret, nonce, b'client')):
        return None
    return _mac(secret, client_nonce, b'host')


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'{name} must be a positive number of seconds, got {value!r}')
    return float(value)


def _no_greeting(address: Any, timeout: float, ssl_context: Any) -> str:
    """Why a handshake may have timed out, for the error a client raises."""
    hint = ('; if it serves TLS, pass ssl_context' if ssl_context is None else
            '; if it serves plain TCP or a Unix socket, do not pass ssl_context')
    return (f'the pool host at {address!r} did not complete the handshake within '
            f'{timeout} s (is it busy, or not a looppool host?){hint}')
