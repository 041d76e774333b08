"""serve(): a pool host for this process and the processes it forks, kept running by a
keeper process; and :class:`HostHandle`, this process's hold on it.

::

    caller of serve() ──> keeper process ──> host process ──> pool workers
    HostHandle            keeper.py          host.py          worker.py

Who owns what: this process owns the keeper (it started it, and only it may reap it; the
handle signals it only through a pidfd); the keeper owns the host (it is the host's only
reaper, and starts it again when it dies); the host owns its pool workers. The reasons,
and what flows between them, are in :mod:`looppool.remote.keeper`.

Why a keeper, and not the caller, watches the host: the caller is typically a web server's
master (gunicorn's ``on_starting``, before Tornado's ``fork_processes``), which has no
loop of ours to watch with and reaps every child that exits; and a thread started before
the master forks its web workers would be missing from every fork.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import ssl
from typing import Any

from ..pool import Pool
from ..processes import _disown, _how_it_ended
from ..worker import Worker
from .access import (Address, _allowed, _answers, _check_address, _private_directory,
                     _secret_bytes, default_address)
from .keeper import _context, _Failed, _keeper_main, _Started, _State, _Stop

log = logging.getLogger('looppool.remote')

# After the keeper was told to stop and its host had ``timeout`` seconds, how long it may
# take to kill and reap the host and exit, before the handle kills the keeper itself.
_KEEPER_GRACE = 10.0


class _Child:
    """The keeper, as the process that started it sees it: waited for, signalled and reaped
    without trusting its pid.

    Something else in this process may reap the keeper first: gunicorn's master and
    Tornado's ``fork_processes`` wait for every child that exits. From then on its pid may
    be given to any new process. A pidfd (Linux 5.3+) names the process itself: a signal
    sent through it never reaches another, and it turns readable once the process has
    ended, reaped or not. Where there are no pidfds, the end of file of the control pipe
    (which only the keeper holds open) says whether the keeper still runs, and it is
    signalled only while it does, with SIGCHLD held off in between.

    Lives in the process that called :func:`serve`; not thread-safe.
    """

    def __init__(self, process: multiprocessing.process.BaseProcess, control: Any) -> None:
        self.process = process
        self.pid = process.pid or 0
        self.control = control
        self.exitcode: int | None = None
        self.reaped = False       # by us, or we found that someone else did
        self.pidfd: int | None = None
        pidfd_open = getattr(os, 'pidfd_open', None)
        if pidfd_open is not None:
            try:
                self.pidfd = pidfd_open(self.pid)
            except ProcessLookupError:   # reaped already, and no process has its pid
                self.reaped = True
            except OSError:              # not Linux 5.3+
                pass
        if self.pidfd is not None:
            # Prove the pidfd names our child: waitid() on a pidfd fails with ECHILD for
            # any process that is not (or no longer) our unreaped child.
            try:
                os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                self.close()
                self.reaped = True

    def ended(self, timeout: float | None = 0) -> bool:
        """Wait up to ``timeout`` seconds for the keeper to end; say whether it has."""
        if self.reaped:
            return True
        if self.pidfd is not None:
            return bool(multiprocessing.connection.wait([self.pidfd], timeout))
        while multiprocessing.connection.wait([self.control], timeout):
            try:
                self.control.recv()   # nothing is sent after the first start; drop it
            except (EOFError, OSError):
                return True
        return False

    def signal(self, signum: int) -> None:
        """Send the keeper ``signum`` if it still runs; never to a pid reused by another."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signum)
            except ProcessLookupError:
                pass
            return
        if self.reaped:
            return
        # While the keeper holds its end of the pipe open it has not exited, so its pid is
        # its own; a SIGCHLD handler of this process (gunicorn's) cannot reap it in between.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            if not self.ended(0):
                os.kill(self.pid, signum)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def reap(self) -> None:
        """Collect the ended keeper's exit status, unless someone else did."""
        if self.reaped:
            return
        try:
            if self.pidfd is not None:
                result = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
                if result is None:
                    return
                self.exitcode = result.si_status if result.si_code == os.CLD_EXITED \
                    else -result.si_status
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return
                self.exitcode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass   # reaped by another part of this process: its status is gone with it
        self.reaped = True

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _end_keeper(keeper: _Child, timeout: float) -> None:
    """Tell the keeper to stop its host (killed after ``timeout`` seconds), wait for the
    keeper to exit, kill it if it does not, and reap it."""
    if not keeper.ended():
        try:
            keeper.control.send(_Stop(timeout))
        except OSError:
            pass   # it is exiting
        if not keeper.ended(timeout + _KEEPER_GRACE):
            log.error('the pool host\'s keeper (pid %d) did not exit within %.1f s of '
                      'being told to stop; killing it', keeper.pid, timeout + _KEEPER_GRACE)
            keeper.signal(signal.SIGKILL)
            keeper.ended(5)
    keeper.reap()
    keeper.close()
    keeper.control.close()


class HostHandle:
    """A pool host started by :func:`serve`, and the keeper process that runs it.

    ``address``
        where clients connect (a TCP port 0 given to :func:`serve` is the real port here).
    ``pid``
        the pid of the host process running now: the one that answers clients, and the
        ``host_pid`` of a client's ``stats()``. It changes when the keeper starts the
        host again; while a new host starts, it is the new one's.
    ``restarts``
        how many times the keeper started the host again after it died (starts that
        failed included).
    ``keeper_pid``
        the keeper, the child of this process that runs the host.

    It belongs to the process that called :func:`serve`, and is not thread-safe.
    Processes forked from that one (web workers) may read ``pid`` and ``restarts``, which
    live in shared memory, but only the caller may :meth:`stop` the host.
    """

    def __init__(self, address: Address, keeper: _Child, state: _State) -> None:
        self.address = address
        self._keeper = keeper
        self._state = state
        self._owner = os.getpid()
        self._stopped = False

    @property
    def pid(self) -> int:
        """The pid of the host process serving now (a new one after a restart)."""
        return self._state.pid

    @property
    def restarts(self) -> int:
        """How many times the keeper started the host again after it died."""
        return self._state.restarts

    @property
    def keeper_pid(self) -> int:
        """The pid of the keeper, the process between this one and the host."""
        return self._keeper.pid

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the host: its pool finishes accepted tasks and exits; killed after
        ``timeout`` seconds. Then the keeper exits, and is reaped.

        Quiet when the keeper was reaped by another part of this process (a web server's
        master reaping every child that exits); a second call does nothing.
        """
        if os.getpid() != self._owner:
            raise RuntimeError(f'HostHandle.stop() must be called in the process that '
                               f'called serve() (pid {self._owner}), not in pid '
                               f'{os.getpid()}')
        if self._stopped:
            return
        self._stopped = True
        if self._keeper.ended():
            log.warning('the pool host\'s keeper (pid %d) had exited before stop() was '
                        'called; its host stops by itself', self._keeper.pid)
        _end_keeper(self._keeper, timeout)

    def __repr__(self) -> str:
        return (f'<HostHandle address={self.address!r} pid={self.pid} '
                f'restarts={self.restarts} keeper_pid={self.keeper_pid}>')


def serve(worker_class: type[Worker], address: Address | None = None, *,
          pool_size: int | None = None, secret: str | bytes | None = None,
          ssl_context: ssl.SSLContext | None = None, allowed_uids: Any = None,
          start_timeout: float = 60.0, restart: bool = True,
          **pool_options: Any) -> HostHandle:
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

    The host runs under a small *keeper* process, a child of this one, which starts the
    host again when it dies (at once if it had served for a while, else after a back-off
    of 0.1 s doubling to 10 s), logs why on the ``looppool.remote`` logger and counts it
    in :attr:`HostHandle.restarts`. Clients connect again on their next call. With
    ``restart=False`` a host that dies stays dead. A host that cannot start the first time
    raises here (:class:`RuntimeError` with its traceback, or :class:`TimeoutError` after
    ``start_timeout`` seconds).

    The keeper and the host are started with the pool's ``mp_context`` (the interpreter's
    default when not given; ``spawn`` for ``forkserver``, as each must be the parent of
    the next, while the pool's workers still come from a forkserver); TLS
    (``ssl_context``) needs ``fork``, as an ``SSLContext`` cannot be pickled for
    ``spawn``.
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
    ctx = _context(pool_options)
    if isinstance(address, str):
        # Checked here too (the host checks again before it binds) so that an unsafe
        # directory raises PermissionError in the caller, not a host's traceback.
        _private_directory(address)
        if _answers(address):
            raise FileExistsError(f'a pool host already answers at {address}')
    state = _State(ctx)
    control, keeper_end = ctx.Pipe()
    process = ctx.Process(target=_keeper_main, name='looppool-keeper',
                          args=(worker_class, address, key, ssl_context, options, uids,
                                restart, keeper_end, state))
    process.start()
    keeper = _Child(process, control)   # at once: its pid is surely its own now
    _disown(process)   # web workers forked after this must not try to join the keeper
    keeper_end.close()
    report: Any = None
    try:
        if not control.poll(start_timeout):
            raise TimeoutError(f'the pool host did not start within {start_timeout} s')
        report = control.recv()
    except EOFError:
        pass
    finally:
        if not isinstance(report, _Started):
            _end_keeper(keeper, 0)
    if isinstance(report, _Failed):
        raise RuntimeError(report.reason)
    if not isinstance(report, _Started):
        raise RuntimeError(f'the pool host\'s keeper {_how_it_ended(keeper.exitcode)} '
                           'before the host was ready')
    return HostHandle(report.address, keeper, state)
