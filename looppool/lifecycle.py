"""The pool's lifecycle between start and stop: pause and resume, the rolling restart, and
the state the pool shows.

The states of a pool (``pool.state``; every transition is logged, and counted with
``statsd=``)::

    new ──start()──> starting ──every worker ready──> running
                        ^                               │  ^
                        │                       pause() │  │ every worker resumed
                        │                               v  │
                        │                           pausing │
                        │      every worker paused,  │    starting <── resume()
                        │      nothing running       v       ^
                        │                          paused ───┘
    stopped <── stopping <──stop(), from any state
       └──start()──> starting (new workers)

- **pause**: no worker gets a message from now on; what they were sent and had not
  started comes back to the pool (RECALL), and everything waits there in order, as for
  workers without room. Each worker runs its ``_pause()`` hook; the pool is *paused*
  once every worker has and nothing runs. A worker started meanwhile (a replacement, a
  recycle's successor) is paused as soon as it is ready.
- **resume**: each worker runs ``_resume()``, then takes the messages that waited, in
  order; the pool is *running* once every worker has resumed.
- **restart**: a rolling restart: worker by worker, a replacement is started while the old
  process serves, takes over once ready (as recycling does), and the old one finishes
  what it has and exits before the next worker's turn. Nothing fails or is lost.

Who owns what: :class:`Lifecycle` owns the pause phase, the futures that ``pause()``,
``resume()`` and ``restart()`` return, and the state last shown; each link's own pause
state is a field of the link (``paused``: it gets no work; ``pause_state``: pausing,
paused or resuming). Lives in the parent, on the pool's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from . import protocol
from .errors import WorkerStartError
from .link import _Link
from .part import Part
from .reload import Reloader
from .supervise import NEW, RUNNING

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger('looppool')

PAUSING, PAUSED, RESUMING, STARTING = 'pausing', 'paused', 'resuming', 'starting'


class Lifecycle(Part):
    """Pause, resume and the rolling restart of one pool; see the module's docstring."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.phase: str | None = None   # None (running), PAUSING, PAUSED or RESUMING
        self._pausing: asyncio.Future[None] | None = None
        self._resuming: asyncio.Future[None] | None = None
        self._restarting: asyncio.Future[None] | None = None
        self._changed: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._shown = NEW
        self.reloader: Reloader | None = None

    # -- the state -------------------------------------------------------------------------

    def state(self) -> str:
        """The pool's state, as ``pool.state`` shows it."""
        state = self.supervisor._state
        if state is not RUNNING:
            return state
        phase = self.phase
        if phase is PAUSING or phase is PAUSED:
            return phase
        ready = self.supervisor._ready
        if phase is RESUMING or (ready is not None and not ready.done()):
            return STARTING
        return RUNNING

    def note(self) -> None:
        """Log (and count) the pool's state if it changed since it was last shown."""
        state = self.state()
        if state == self._shown:
            return
        log.info('pool of %s: %s -> %s', self.pool._worker_class.__qualname__, self._shown,
                 state)
        self._shown = state
        statsd = self.pool._statsd
        if statsd is not None:
            try:
                statsd.incr(f'{self._options["statsd_prefix"]}.state.{state}')
            except Exception:  # pragma: no cover - statsd never raises for a lost packet
                log.debug('could not count a state change', exc_info=True)

    # -- pause and resume ------------------------------------------------------------------

    def pause(self) -> asyncio.Future[None]:
        """:meth:`Pool.pause <looppool.Pool.pause>`."""
        self._check_running()
        loop = self.pool._loop
        if self.phase is PAUSED:
            return _done(loop)
        if self.phase is PAUSING:
            assert self._pausing is not None
            return self._pausing
        self.phase = PAUSING
        self._pausing = future = loop.create_future()
        self.dispatcher._plain = False
        self.dispatcher._flush_outbox()   # what was submitted waits here now
        for link in self._current():
            link.paused = True
            if link.pause_state is None and link.ready:
                self._pause_link(link)
        self.note()
        self.check()
        return future

    def resume(self) -> asyncio.Future[None]:
        """:meth:`Pool.resume <looppool.Pool.resume>`."""
        self._check_running()
        return self._resume()

    def _resume(self) -> asyncio.Future[None]:
        loop = self.pool._loop
        if self.phase is None:
            return _done(loop)
        if self.phase is RESUMING:
            assert self._resuming is not None
            return self._resuming
        _resolve(self._pausing)   # a pause() still waiting: overtaken
        self.phase = RESUMING
        self._resuming = future = loop.create_future()
        for link in self._current():
            if link.pause_state is None:
                link.paused = False   # never told to pause (not ready yet)
            elif link.pause_state is not RESUMING:
                link.pause_state = RESUMING
                self._send(link, protocol.RESUME)
        self.note()
        self.check()
        return future

    def resume_for_stop(self) -> None:
        """The pool stops while paused: the workers resume, so that what waits runs."""
        if self.phase is not None and self.phase is not RESUMING:
            self._resume()

    def _pause_link(self, link: _Link) -> None:
        """Tell a ready worker to pause; what it holds unstarted comes back here."""
        link.paused = True
        link.pause_state = PAUSING
        self._send(link, protocol.PAUSE)
        if link.batch:   # dealt to it in this loop iteration, not sent: it stays here
            tids = [future._lp_tid for future in link.batch]
            link.batch = []
            link.unread -= len(tids)
            self.inflight._take_back(link, tids)
        wanted = [tid for tid, future in link.inflight.items() if not future.done()]
        if wanted and not link.recalling and link.channel is not None \
                and not link.channel.closed:
            link.recalling = True
            link.channel.send(protocol.RECALL, len(wanted), protocol.dumps(wanted))

    def on_ready(self, link: _Link) -> None:
        """A worker is ready: paused at once if the pool is (it got no work till now)."""
        if link.paused and self.phase in (PAUSING, PAUSED):
            self._pause_link(link)

    def on_paused(self, link: _Link) -> None:
        if link.pause_state is PAUSING:
            link.pause_state = PAUSED
        self.check()

    def on_resumed(self, link: _Link) -> None:
        link.pause_state = None
        if self.phase is PAUSING or self.phase is PAUSED:
            self._pause_link(link)   # paused again while it resumed
            return
        link.paused = False
        slot = self._slots[link.number]
        if slot.link is link:
            self.dispatcher._refill(slot)
        self.dispatcher._wake_room()
        self.check()

    def check(self) -> None:
        """Has the pause or the resume under way come to its end?"""
        phase = self.phase
        if phase is PAUSING:
            for slot in self._slots:
                if slot.retiring:
                    return   # a recycled process still finishing what it started
                link = slot.link
                if link is not None and link.ready and not link.exited \
                        and (link.pause_state is not PAUSED or link.used):
                    return
            self.phase = PAUSED
            _resolve(self._pausing)
            self.note()
        elif phase is RESUMING:
            for link in self._current():
                if link.paused and not link.exited:
                    return
            self.phase = None
            self.dispatcher._plain = self.pool._metrics is None and self._recycle_after is None
            _resolve(self._resuming)
            self.note()
            self.dispatcher._refill_all()

    def watch(self) -> None:
        """Restart the workers when the application's code changes (``reload=True``)."""
        self.reloader = Reloader(self.pool)
        self.reloader.start()

    def finish(self) -> None:
        """The pool stopped: whatever waits on a pause, resume or restart ends."""
        if self.reloader is not None:
            self.reloader.stop()
        self.phase = None
        _resolve(self._pausing)
        _resolve(self._resuming)
        self.changed()

    # -- the rolling restart ---------------------------------------------------------------

    def restart(self) -> asyncio.Future[None]:
        """:meth:`Pool.restart <looppool.Pool.restart>`."""
        self._check_running()
        if self._restarting is not None and not self._restarting.done():
            return self._restarting
        self._restarting = self.pool._loop.create_task(self._roll())
        return self._restarting

    async def _roll(self) -> None:
        for slot in self._slots:
            link = slot.link
            if link is None or not link.ready:
                continue   # starting (or backing off): a new process is coming anyway
            self._failure = None
            self.supervisor._recycle(link, 'a rolling restart (pool.restart())', force=True)
            while slot.link is link and slot.successor is not None:
                self._check_running()
                await self._next_change()
            if slot.link is link:
                failure = self._failure
                raise WorkerStartError(
                    f'pool.restart() stopped at worker {slot.number}: its replacement could '
                    f'not start, so the worker (pid {link.pid}) goes on serving'
                    + (f': {failure}' if failure else ''), slot.number, link.pid, None,
                    getattr(failure, 'traceback', ''))
            while not link.exited:
                await self._next_change()
        log.info('pool of %s: rolling restart done', self.pool._worker_class.__qualname__)

    def changed(self, failure: BaseException | None = None) -> None:
        """A worker took over, exited or could not start: a restart looks again."""
        if failure is not None:
            self._failure = failure
        _resolve(self._changed)
        self._changed = None

    async def _next_change(self) -> None:
        if self._changed is None:
            self._changed = self.pool._loop.create_future()
        await self._changed

    # -- helpers ---------------------------------------------------------------------------

    def _current(self) -> list[_Link]:
        """The workers that serve, or are about to (not those retiring)."""
        links = []
        for slot in self._slots:
            for link in (slot.link, slot.successor):
                if link is not None and not link.exited:
                    links.append(link)
        return links

    def _send(self, link: _Link, kind: int) -> None:
        if link.channel is not None and not link.channel.closed:
            link.channel.send(kind, 0)

    def _check_running(self) -> None:
        if self.supervisor._state is not RUNNING:
            raise self.pool._not_running()


def _done(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    future: asyncio.Future[None] = loop.create_future()
    future.set_result(None)
    return future


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)

