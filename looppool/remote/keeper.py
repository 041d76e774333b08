"""The keeper: the process :func:`~looppool.remote.serve` starts, which runs the pool host as
its own child and starts it again whenever it dies.

::

    caller of serve()             keeper process                   host process
    (a web server's master)       (this module)                    (host.py)
      HostHandle ── control ────> _Keeper ── starts, reaps ───────> _Host: Pool + server
        │     <── first start ──    │       again after it dies,        └── pool workers
        │                           │       with back-off
        └── reads ─ shared memory <─┘ writes: the host's pid, the restart count

Who owns what:

* The caller of ``serve()`` owns the keeper. It started it and signals it only through a
  pidfd (see ``serve.py``), since something else in the caller may reap it: gunicorn's
  master and Tornado's ``fork_processes`` wait for every child that exits.
* The keeper owns the host. It is the host's parent and the only process that reaps it,
  and it runs on one thread, so a host it signals is always its own (alive, or a zombie
  that no one else can reap): it never signals a pid that may belong to another process.
* The host owns its pool workers (``pool.py``).

Control messages are small named records over a pipe: the first host's outcome goes to
``serve()`` (:class:`_Started` or :class:`_Failed`), and :class:`_Stop` comes back. After
the first start nothing flows to the caller; what it may read (the host's pid, the
restart count) sits in shared memory, which processes forked from the caller read too.

The keeper has no event loop: it blocks in :func:`multiprocessing.connection.wait` on its
descriptors (the control pipe, its parent's sentinel, the host's pidfd and report pipe,
a signal wake-up socket), with a timeout only while a restart waits out its back-off.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, NamedTuple

from ..pool import _resolve_context
from ..processes import _how_it_ended, _likely_cause
from ..supervise import _back_off
from ..worker import Worker
from .access import Address, _answers
from .host import _run_host

log = logging.getLogger('looppool.remote')

# A host that dies within this many seconds of accepting clients counts, like one that
# could not start, as one more failure in a row; the next start waits _back_off(failures)
# (0.1 s, doubling, at most 10 s). A host that ran longer is started again at once.
_QUICK_DEATH = 10.0


class _Started(NamedTuple):
    """Host -> keeper, and for the first host keeper -> serve(): it accepts clients."""
    address: Address
    pid: int


class _StartError(NamedTuple):
    """Host -> keeper: it could not start, with the traceback."""
    traceback: str


class _Failed(NamedTuple):
    """Keeper -> serve(): the first host could not start, and why."""
    reason: str


class _Stop(NamedTuple):
    """serve()'s handle -> keeper: stop the host, and kill it after ``timeout`` seconds."""
    timeout: float


class _State:
    """The running host's pid and the number of restarts, in shared memory: the keeper
    writes them, the handle (and any process forked from its owner) reads them, and
    reading never blocks."""

    def __init__(self, ctx: Any) -> None:
        self.values = ctx.RawArray('q', 2)

    @property
    def pid(self) -> int:
        return int(self.values[0])

    @pid.setter
    def pid(self, pid: int) -> None:
        self.values[0] = pid

    @property
    def restarts(self) -> int:
        return int(self.values[1])

    @restarts.setter
    def restarts(self, restarts: int) -> None:
        self.values[1] = restarts


def _context(pool_options: dict[str, Any]) -> Any:
    """The start method of the keeper and the host: the pool's, but spawn for forkserver.

    Each must be the parent of the next (a forkserver's children are the forkserver's);
    the pool's workers still come from the forkserver."""
    ctx = _resolve_context(pool_options.get('mp_context'))
    if ctx.get_start_method() == 'forkserver':
        return multiprocessing.get_context('spawn')
    return ctx


# The keeper's own descriptors. A host forked from the keeper closes its copies first: one
# of them is the keeper's end of the control pipe, whose end of file tells the caller that
# the keeper is gone.
_inherited: list[Any] = []


def _host_main(worker_class: type[Worker], address: Address, secret: bytes | None,
               ssl_context: Any, pool_options: dict[str, Any], allowed_uids: set[int],
               reports: Any) -> None:
    """The host process's main, as the keeper's child."""
    for held in _inherited:
        held.close()
    _inherited.clear()
    signal.set_wakeup_fd(-1)
    # The keeper's dispositions, not the host's: a SIGTERM while the host starts ends it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    parent = multiprocessing.parent_process()

    def ready(state: str, detail: Any) -> None:
        reports.send(_Started(detail, os.getpid()) if state == 'ready'
                     else _StartError(detail))
        reports.close()

    _run_host(worker_class, address, secret, ssl_context, pool_options, allowed_uids, None,
              ready, parent.sentinel if parent is not None else None)


def _keeper_main(worker_class: type[Worker], address: Address, secret: bytes | None,
                 ssl_context: Any, pool_options: dict[str, Any], allowed_uids: set[int],
                 restart: bool, control: Any, state: _State) -> None:
    """The keeper process's main: keep a host running until told to stop or orphaned."""
    wakeup, wakeup_writer = socket.socketpair()
    _inherited.extend((control, wakeup, wakeup_writer))
    # Forked from a web server's master, the keeper would run the master's signal handlers
    # (gunicorn reaps every child on SIGCHLD; this process reaps its host itself).
    for number in signal.valid_signals():
        if number not in (signal.SIGKILL, signal.SIGSTOP) and \
                callable(signal.getsignal(number)):
            signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Stopped by its starter, not by a Ctrl-C or a hang-up sent to the whole group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    wakeup_writer.setblocking(False)
    signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda *_: None)   # the wake-up socket says it came
    parent = multiprocessing.parent_process()
    keeper = _Keeper(_context(pool_options),
                     (worker_class, address, secret, ssl_context, pool_options, allowed_uids),
                     restart, control, state, wakeup,
                     parent.sentinel if parent is not None else None)
    sys.exit(keeper.run())


class _Keeper:
    """The keeper's state: the host it runs and when to start it again.

    Lives in the keeper process, on its only thread, and has no loop: :meth:`run` blocks on
    descriptors. Not thread-safe.
    """

    def __init__(self, ctx: Any, host_args: tuple[Any, ...], restart: bool, control: Any,
                 state: _State, wakeup: socket.socket, parent_sentinel: int | None) -> None:
        self.ctx = ctx
        self.worker_class, self.address, *self.host_options = host_args
        self.restart = restart
        self.control = control
        self.state = state
        self.wakeup = wakeup
        self.parent_sentinel = parent_sentinel
        self.host: multiprocessing.process.BaseProcess | None = None
        self.host_ended_fd: Any = None     # readable once the host has ended
        self.reports: Any = None           # the host's report pipe, until it reported
        self.ready_at: float | None = None  # when the current host accepted clients
        self.start_error = ''              # the current host's start-up traceback
        self.first = True                  # no host has accepted clients yet
        self.failures = 0                  # starts in a row that failed or died soon
        self.restart_at: float | None = None

    def run(self) -> int:
        """Keep a host running; return the keeper's exit code."""
        if not self.start_host():
            return 1
        while True:
            watched: list[Any] = [self.control, self.wakeup]
            if self.parent_sentinel is not None:
                watched.append(self.parent_sentinel)
            if self.reports is not None:
                watched.append(self.reports)
            if self.host is not None:
                watched.append(self.host_ended_fd)
            timeout = None if self.restart_at is None else \
                max(0.0, self.restart_at - time.monotonic())
            ready = multiprocessing.connection.wait(watched, timeout)
            if self.reports is not None and self.reports in ready:
                self.read_report()
            if self.host is not None and self.host_ended_fd in ready \
                    and not self.host_ended():
                return 1
            if self.control in ready:
                try:
                    request = self.control.recv()
                except EOFError:
                    request = None   # the caller and everything it forked are gone
                self.stop(request.timeout if isinstance(request, _Stop) else None)
                return 0
            if self.wakeup in ready and signal.SIGTERM in self.wakeup.recv(64):
                self.stop(None)
                return 0
            if self.parent_sentinel is not None and self.parent_sentinel in ready:
                self.stop(None)   # the caller of serve() exited: the host goes with it
                return 0
            if self.restart_at is not None and time.monotonic() >= self.restart_at \
                    and not self.start_host():
                return 1

    def start_host(self) -> bool:
        """Start a host process; False when the first one could not even be started."""
        self.restart_at = None
        if not self.first and isinstance(self.address, str) and _answers(self.address):
            # Someone started another host here while ours was dead (a second serve());
            # ours would unlink its socket and take its clients.
            self.schedule(f'another pool host answers at {self.address}; not starting '
                          'one over it')
            return True
        reports, sender = self.ctx.Pipe(duplex=False)
        host = self.ctx.Process(target=_host_main, name='looppool-host',
                                args=(self.worker_class, self.address, *self.host_options,
                                      sender))
        try:
            host.start()
        except Exception:
            reports.close()
            sender.close()
            if self.first:
                self.tell_serve(_Failed('the keeper could not start the pool host:\n'
                                        + traceback.format_exc()))
                return False
            self.schedule('the keeper could not start the pool host:\n'
                          + traceback.format_exc())
            return True
        sender.close()
        self.host, self.reports = host, reports
        # The host's sentinel reads end of file only once its pool workers (forked, they
        # hold copies) have exited too; a pidfd says when the host itself ended.
        pidfd = _pidfd(host)
        self.host_ended_fd = host.sentinel if pidfd is None else pidfd
        self.ready_at, self.start_error = None, ''
        self.state.pid = host.pid or 0
        if not self.first:
            self.state.restarts += 1
        return True

    def tell_serve(self, outcome: _Started | _Failed) -> None:
        """Send serve() the first host's outcome, unless its caller is gone already (the
        loop then sees that, and stops)."""
        try:
            self.control.send(outcome)
        except OSError:
            pass

    def read_report(self) -> None:
        """Read what the host said about its start, if it said anything."""
        reports, self.reports = self.reports, None
        # Under fork a host's pool workers hold copies of the report pipe: a host that died
        # before reporting may leave it open. poll() says whether a report is there to read.
        report = None
        if reports.poll(0):
            try:
                report = reports.recv()
            except EOFError:
                pass
        reports.close()
        if isinstance(report, _StartError):
            self.start_error = report.traceback
        elif isinstance(report, _Started):
            self.ready_at = time.monotonic()
            # A TCP port 0 became a port: a restarted host binds that one again.
            self.address = report.address
            if self.first:
                self.first = False
                self.tell_serve(report)
            else:
                log.warning('the pool host was started again (pid %d, restart %d) and '
                            'serves %s', report.pid, self.state.restarts, report.address)

    def host_ended(self) -> bool:
        """Reap the ended host and plan its restart; False when it was the first host,
        which never started (serve() hears why)."""
        host = self.host
        assert host is not None
        if self.reports is not None:
            self.read_report()
        host.join()   # ended already: this only reaps it
        self.close_host_fd()
        self.host = None
        how = _how_it_ended(host.exitcode)
        if self.first:
            self.tell_serve(_Failed(
                f'the pool host could not start:\n{self.start_error}' if self.start_error
                else f'the pool host {how} before it was ready'))
            return False
        if self.start_error:
            what = (f'the pool host (pid {host.pid}) could not start:\n'
                    f'{self.start_error.rstrip()}')
        else:
            served = '' if self.ready_at is None else \
                f' after serving for {time.monotonic() - self.ready_at:.1f} s'
            what = f'the pool host (pid {host.pid}) {how}{served}'
            if host.exitcode is not None and host.exitcode < 0:
                what += f'; {_likely_cause(host.exitcode)}'
        if not self.restart:
            log.error('%s; it is not started again (serve(restart=False)): clients fail '
                      'with ConnectionLost until the server restarts', what)
            return True
        if self.ready_at is not None and time.monotonic() - self.ready_at >= _QUICK_DEATH:
            self.failures = 0
            log.error('%s; starting it again now', what)
            self.restart_at = time.monotonic()
            return True
        self.schedule(what)
        return True

    def schedule(self, what: str) -> None:
        """One more failure in a row: log it, and start a host again after a back-off."""
        self.failures += 1
        delay = _back_off(self.failures)
        log.error('%s; starting it again in %.1f s (%d failure%s in a row)', what, delay,
                  self.failures, '' if self.failures == 1 else 's')
        self.restart_at = time.monotonic() + delay

    def stop(self, timeout: float | None) -> None:
        """Stop the host: SIGTERM (it finishes accepted tasks), SIGKILL after ``timeout``
        seconds (``None``: no limit; the host's pool bounds its own stop)."""
        self.restart_at = None
        host = self.host
        # exitcode polls, and reaps a host that has ended: only a live one is signalled.
        if host is None or host.exitcode is not None:
            return
        host.terminate()
        multiprocessing.connection.wait([self.host_ended_fd], timeout)
        if host.exitcode is None:
            log.error('the pool host (pid %d) did not stop within %s s; killing it',
                      host.pid, timeout)
            host.kill()
        host.join()
        self.close_host_fd()

    def close_host_fd(self) -> None:
        if self.host is not None and self.host_ended_fd != self.host.sentinel:
            os.close(self.host_ended_fd)
        self.host_ended_fd = None


def _pidfd(process: multiprocessing.process.BaseProcess) -> int | None:
    """A pidfd for a child that has not been reaped (Linux 5.3+), or None."""
    pidfd_open = getattr(os, 'pidfd_open', None)
    if pidfd_open is None or not process.pid:
        return None
    try:
        fd: int = pidfd_open(process.pid)
    except OSError:
        return None
    return fd
