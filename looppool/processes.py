"""The transport of a :class:`~looppool.Pool`: worker processes on this machine, each
with its own socketpair to the parent.

A transport is what the :class:`~looppool.supervise.Supervisor` asks to start, end and
measure a worker; everything else (dispatch, windows, replies, restarts, stop) is the
same for every transport. Its interface::

    start(link)                start a worker for link.number; set link.channel (the
                               Channel interface of looppool.channel), link.pid and
                               link.started_at; report its exit with supervisor._on_exit
    reap(link) -> exitcode     the worker has ended: release what it held
    kill(link)                 end it now (its exit is reported as always)
    rss(link) -> bytes | None  its resident memory, for max_memory_per_worker
    name(link), how_it_ended(link, code), likely_cause(link, code)
                               words for the errors and logs
    blocking                   whether stop() may drive the workers without the loop
    lag_check                  seconds between the looks for blocked workers
    finish()                   the pool has stopped

:class:`Processes` is the local one: a ``multiprocessing`` process per worker, watched
through its sentinel (readable the moment it exits, nothing polls); the pool host uses it
too. :mod:`looppool.dask` has the other, Dask actors.

Who owns what: the module owns the parent-side descriptors of every live worker of every
pool (a forked worker closes them) and the pools to end at interpreter exit. Lives in the
parent, on the pool's loop; not thread-safe.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import multiprocessing.process
import multiprocessing.util  # noqa: F401 - imported first so its exit hook runs after ours
import os
import selectors
import signal
import sys
from typing import TYPE_CHECKING

from . import protocol
from .channel import Channel, socketpair
from .child import worker_main
from .link import _Link
from .part import Part

if TYPE_CHECKING:
    from .pool import Pool

# Parent-side channel descriptors of every live worker of every pool in this process. A
# forked worker closes them all: a copy held by a sibling would hide its parent's death.
_parent_fds: set[int] = set()
# Pools with running workers, held until stopped so that interpreter exit can end them.
_live_pools: set[Pool] = set()
# A process forked from this one (a web server's worker) does not own our pools: at its exit
# it must not end them. (_parent_fds stays: its copies are still worth closing in workers.)
os.register_at_fork(after_in_child=_live_pools.clear)

# How often the pool looks for workers that hold work and have said nothing since the last
# look (see looppool.inflight): a local worker answers within a loop turn.
_LAG_CHECK = 0.015


class Processes(Part):
    """Worker processes on this machine; see the module's docstring."""

    blocking = True
    lag_check = _LAG_CHECK
    shared_memory = True   # big buffers may go through shared memory (looppool.shm)

    def start(self, link: _Link) -> None:
        """Start the process of worker ``link.number``, with its channel."""
        pool = self.pool
        ctx = pool._mp_context
        parent_sock, child_sock = socketpair()
        start_method = ctx.get_start_method()
        close_fds = tuple(_parent_fds | {parent_sock.fileno()}) if start_method == 'fork' \
            else ()
        batch_size, batch_timeout = pool._batch_config()
        config = protocol.WorkerConfig(
            number=link.number,
            pool_size=self.pool_size,
            result_credit=pool._result_share,
            start_method=start_method,
            title=self._title(link.number),
            close_fds=close_fds,
            log_level=logging.getLogger().getEffectiveLevel(),
            forward_logs=bool(self._options['forward_logs']),
            batch_replies=pool._batch_replies,
            cancel_grace=self._options['cancel_grace'],
            worker_arguments=pool._worker_arguments,
            batch_size=batch_size,
            batch_timeout=batch_timeout,
            shared_memory=pool._shared_memory,
            origins=pool._raw_results is not None,
        )
        process = ctx.Process(target=worker_main,  # type: ignore[attr-defined]
                              args=(pool._worker_class, child_sock, config, os.getpid()),
                              name=f'looppool-worker-{link.number}')
        try:
            process.start()
        finally:
            child_sock.close()
        _disown(process)
        link.process = process
        link.pid = process.pid or 0
        link.sentinel = process.sentinel
        link.started_at = pool._loop.time()
        link.channel = Channel(parent_sock, pool._loop,
                               functools.partial(self.receiver._on_frames, link),
                               _ignore_close,
                               before_flush=functools.partial(self.dispatcher._before_flush,
                                                              link),
                               shared_memory=bool(pool._shared_memory))
        _parent_fds.add(link.channel.fileno())
        pool._loop.add_reader(link.sentinel, self.supervisor._on_exit, link)

    def reap(self, link: _Link) -> int | None:
        """The process has exited: its exit code; its last frames are read first."""
        loop = self.pool._loop
        if not loop.is_closed():
            loop.remove_reader(link.sentinel)
        assert link.process is not None and link.channel is not None
        link.process.join(5)
        exitcode = link.process.exitcode
        if exitcode is not None:
            # Its sentinel and the other end of that pipe are closed now, not when the
            # process object is collected: until then they would stay open here, and be
            # inherited by every worker forked meanwhile.
            link.process.close()
        if not link.channel.closed:
            link.channel.drain()   # replies the worker sent before it exited
            link.channel.close()
        _parent_fds.discard(link.channel.fileno())
        return exitcode

    def kill(self, link: _Link) -> None:
        if link.process is not None and not link.exited:
            try:
                link.process.kill()
            except (OSError, ValueError):  # pragma: no cover - already reaped
                pass

    def rss(self, link: _Link) -> int | None:
        import psutil
        try:
            return int(psutil.Process(link.pid).memory_info().rss)
        except psutil.Error:
            return None

    def name(self, link: _Link) -> str:
        """The worker, as errors and logs name it."""
        return f'worker {link.number} (pid {link.pid})'

    def how_it_ended(self, link: _Link, exitcode: int | None) -> str:
        return _how_it_ended(exitcode)

    def likely_cause(self, link: _Link, exitcode: int | None) -> str:
        return _likely_cause(exitcode)

    def running(self) -> None:
        """The pool started: end its workers at interpreter exit if it is not stopped."""
        _live_pools.add(self.pool)

    def finish(self) -> None:
        _live_pools.discard(self.pool)

    def _title(self, number: int) -> str | None:
        title = self._options['title']
        if not title:
            return None
        if isinstance(title, str):
            return f'{title} {number}'
        try:
            import setproctitle
            parent = setproctitle.getproctitle()
        except Exception:  # pragma: no cover
            parent = ' '.join(sys.argv)
        return f'looppool worker {number} | {parent}'

    def abandon_at_exit(self) -> None:
        """The interpreter is exiting with this pool running: end the workers quickly."""
        supervisor = self.supervisor
        self.dispatcher._plain = False
        links = supervisor._links()
        for link in links:
            if link.channel is not None and not link.channel.closed:
                _parent_fds.discard(link.channel.fileno())
                link.channel.close()   # end of file: the worker exits
        for link in links:
            assert link.process is not None
            link.process.join(self._options['kill_grace'])
            if link.process.is_alive():
                link.process.kill()
                link.process.join(5)
        supervisor._state = 'stopped'
        _live_pools.discard(self.pool)

    def drive_until_stopped(self) -> None:
        """Run the stop to its end without the loop (``stop()`` was called and not
        awaited): read the channels and sentinels with a selector of our own, keep the
        deadlines."""
        supervisor = self.supervisor
        future = supervisor._stop_future
        assert future is not None
        loop = self.pool._loop
        with selectors.DefaultSelector() as selector:
            while not future.done():
                now = loop.time()
                if now >= supervisor._stop_deadline and supervisor._kill_at is None:
                    supervisor._escalate()
                if supervisor._kill_at is not None and now >= supervisor._kill_at:
                    supervisor._kill_all()
                wait = (supervisor._kill_at if supervisor._kill_at is not None
                        else supervisor._stop_deadline)
                links = supervisor._links()
                for link in links:
                    assert link.channel is not None
                    if link.channel.wants_write or link.acks or link.batch:
                        link.channel.flush()
                keys = []
                for link in links:
                    assert link.channel is not None
                    if not link.channel.closed:
                        events = selectors.EVENT_READ
                        if link.channel.wants_write:
                            events |= selectors.EVENT_WRITE
                        keys.append(selector.register(link.channel.fileno(), events,
                                                      ('channel', link)))
                    keys.append(selector.register(link.sentinel, selectors.EVENT_READ,
                                                  ('exit', link)))
                if not keys:
                    supervisor._check_stopped()
                    break
                ready = selector.select(max(0.0, min(wait - now, 0.5)))
                for key in keys:
                    selector.unregister(key.fileobj)
                for key, events in ready:
                    what, link = key.data
                    if what == 'exit':
                        supervisor._on_exit(link)
                    elif not link.exited and link.channel is not None:
                        if events & selectors.EVENT_READ:
                            link.channel.read_ready()
                        if events & selectors.EVENT_WRITE:
                            link.channel.flush()
                supervisor._check_stopped()


def _ignore_close() -> None:
    # End of file: the process is exiting; its sentinel reports the exit itself.
    pass


def _disown(process: multiprocessing.process.BaseProcess) -> None:
    """Take a process we supervise ourselves out of multiprocessing's list of children.

    A process forked from this one later (a web server's workers) inherits that list, and
    at exit multiprocessing would try to join our workers from there, which fails with an
    AssertionError ("can only join a child process"). We reap our processes through their
    sentinels, and end them at exit, so multiprocessing need not know them.
    """
    children = getattr(multiprocessing.process, '_children', None)
    if isinstance(children, set):
        children.discard(process)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return 'vanished'
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f'signal {-exitcode}'
        return f'died with signal {-exitcode} ({name})'
    return f'exited with code {exitcode}'


def _likely_cause(exitcode: int | None) -> str:
    if exitcode == -signal.SIGKILL:
        return ('likely causes: the kernel\'s out-of-memory killer (check dmesg), '
                'or a kill -9')
    if exitcode == -signal.SIGSEGV:
        return 'likely cause: a crash in native code (segmentation fault)'
    if exitcode == -signal.SIGABRT:
        return 'likely cause: an abort in native code or a failed assertion in C'
    if exitcode is not None and exitcode >= 0:
        return 'likely cause: os._exit() or sys.exit() in a handler, or the worker\'s ' \
               'parent-death signal'
    return 'likely cause: a signal sent to the worker'


@atexit.register
def _end_pools_at_exit() -> None:
    # Registered after multiprocessing's own exit hook (multiprocessing.util is imported
    # above), so it runs first: that hook joins child processes, which would wait forever
    # for workers that were never stopped.
    for pool in list(_live_pools):
        if pool._supervisor._state in ('running', 'stopping'):
            pool._transport.abandon_at_exit()

