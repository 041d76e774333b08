"""The parent's side of one worker: :class:`_Link` for each worker process (its process,
its channel, what it was sent), :class:`_Slot` for each worker number (stable across
replacements: the messages waiting for that number, restart counts).

A replacement gets a new link, so nothing meant for a dead process reaches the new one.
Both live in the parent, on the pool's loop, and are not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing.process
from typing import TYPE_CHECKING, Deque

from . import protocol
from .channel import Channel

if TYPE_CHECKING:
    from .errors import WorkerStartError
    from .tasks import Entry, _TaskFuture

# The messages a worker may hold unstarted (sent and not started): the window starts here,
# doubles when the worker has started at least half of what it may hold within its
# turns' budget while the backlog waits, halves when the worker is found blocked, never
# past its share of max_tasks.
_FIRST_WINDOW = 4
_MIN_WINDOW = 2


class _Link:
    """The parent's side of one worker process."""

    __slots__ = ('number', 'process', 'pid', 'sentinel', 'channel', 'inflight', 'used',
                 'acks', 'ready', 'start_error', 'stop_sent', 'exited', 'kill_reason',
                 'started_at', 'sent', 'retiring', 'batch', 'baseline_rss', 'terminated',
                 'batch_gave_up', 'unread', 'held', 'window', 'reads', 'reads_seen',
                 'was_queued', 'blocked', 'recalling', 'heard_at', 'overran', 'paused',
                 'pause_state', '__weakref__')

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: multiprocessing.process.BaseProcess | None = None
        self.pid = 0
        self.sentinel = -1
        self.channel: Channel | None = None
        self.inflight: dict[int, _TaskFuture] = {}
        self.used = 0
        self.acks = 0
        self.ready = False
        self.start_error: tuple[str, str] | None = None   # (what raised, traceback text)
        self.stop_sent = False
        self.exited = False
        self.kill_reason: str | None = None
        self.started_at = 0.0
        self.batch: list[_TaskFuture] = []   # tasks to pickle together at the next flush
        self.batch_gave_up = False   # one of them was cancelled or timed out: leave it out
        self.baseline_rss = 0     # its RSS when first measured (fork shares parent pages)
        self.terminated = False   # told to cancel everything (stop or recycle deadline)
        self.sent = 0           # tasks sent, for max_tasks_per_worker
        self.retiring = False   # being recycled: takes no new work, exits when drained
        # What it holds unstarted: messages sent and not yet started (an ACK counts those
        # that start), at most `window`; among them, the ids of the tasks it reported held
        # in its inbox (HELD), oldest first (a TAKEN count starts the oldest): those, if it
        # dies, never ran.
        self.unread = 0
        self.held: Deque[int] = collections.deque()
        self.window = _FIRST_WINDOW
        self.overran = False    # it held work since its queue last ran empty
        self.reads = 0          # reads of its frames; the lag check compares them
        self.reads_seen = 0
        self.was_queued = False
        self.blocked = False    # held work and said nothing for a lag check or more
        self.recalling = False  # a RECALL is on its way, not yet answered
        self.heard_at = 0.0     # loop time of its last frames
        self.paused = False     # the pool is paused: it gets no work (see looppool.lifecycle)
        self.pause_state: str | None = None   # pausing, paused, resuming (told to)

    def result_done(self) -> None:
        """Acknowledge one result; the credit goes back to the worker with the next flush."""
        self.acks += 1
        if self.acks == 1 and self.channel is not None:
            self.channel.schedule_flush()

    def before_flush(self) -> None:
        if self.acks:
            acks, self.acks = self.acks, 0
            assert self.channel is not None
            self.channel.send(protocol.CREDIT, acks)


class _Slot:
    """One worker number: its current process and the messages waiting for it."""

    __slots__ = ('number', 'link', 'targeted', 'restarts', 'failures', 'start_error',
                 'restart_timer', 'retiring', 'recycles', 'quick_deaths', 'successor',
                 'successor_failures', 'next_recycle', 'done', 'batches')

    def __init__(self, number: int) -> None:
        self.number = number
        self.link: _Link | None = None
        self.targeted: Deque[Entry] = collections.deque()
        self.restarts = 0
        self.failures = 0
        self.start_error: WorkerStartError | None = None
        self.restart_timer: asyncio.TimerHandle | None = None
        self.retiring: list[_Link] = []   # recycled processes finishing their last tasks
        self.recycles = 0
        self.quick_deaths = 0
        # A recycle starts the replacement first: it takes over once ready (see _take_over).
        self.successor: _Link | None = None
        self.successor_failures = 0   # replacements in a row that could not start
        self.next_recycle = 0.0       # loop time before which no recycle is tried again
        self.done = 0                 # tasks answered (replies and errors), all processes
        self.batches = 0              # batches its workers handed to handle_batch

