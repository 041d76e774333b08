"""A worker's inbox: the work it read and has not started, and the budget of a turn.

A worker starts what it reads at once, for at most :data:`_BUDGET` seconds of one turn of
its loop (see ``_Runner.on_frames``). Past that the turn has *overran*: what is left, and
what comes next, waits here, in order, and the parent is told which tasks wait (HELD).
Later turns first read the socket (a RECALL, a CANCEL, more work), then take the next
messages, as many as fit the budget at the pace seen so far. A take of tasks the parent
was told about is announced (TAKEN) and written before they start: so the parent knows
exactly which tasks never started. It may take those back (RECALL, answered RECALLED with
the ones not started), and if the process dies they run elsewhere.

Lives in the worker process, on its loop; not thread-safe.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

from . import chunk, protocol, shm
from .protocol import dumps, loads

if TYPE_CHECKING:
    from .runner import _Runner

# Seconds of starting work in one turn of the loop; what is left waits in the inbox, where
# the parent can see it and take it back, and the loop gets to read the socket.
_BUDGET = 0.005
# The most held messages one turn takes.
_MAX_TAKE = 4096
# An inbox entry of a batch: its messages are unpickled, some may have started.
_REST = -1
_monotonic = time.monotonic


class Inbox:
    """The work one worker holds unstarted. Lives in the worker process, on its loop; not
    thread-safe."""

    def __init__(self, runner: _Runner) -> None:
        self.runner = runner
        self.channel = runner.channel
        # Work read and not started, in order: (kind, task id(s) or origin, payload).
        self.entries: collections.deque[tuple[int, Any, Any]] = collections.deque()
        self.new_held: list[int] = []   # ids in the inbox not yet reported HELD
        self.reported = 0          # ids in the inbox reported HELD (they come first)
        self.cancelled: set[int] = set()  # held tasks the parent gave up on
        self.slow = False          # a turn overran its budget: new work is held
        self.resume_due = False
        self.take = 1              # how many held messages the next turn takes
        self.taken: list[tuple[int, Any, Any]] | None = None   # waits for TAKEN to leave
        self.starting = False      # run_taken is starting what it took

    @property
    def busy(self) -> bool:
        """Whether anything waits here (a stop waits for it)."""
        return bool(self.entries) or self.taken is not None or self.starting

    def hold_rest(self, tids: list[int], messages: list[Any]) -> None:
        """The rest of a batch, unpickled, after the turn overran."""
        self.entries.append((_REST, tids, messages))
        self.new_held.extend(tids)

    def cancel(self, tid: int) -> None:
        """The parent gave up on ``tid``, which may wait here: answered when its turn
        comes, without running."""
        if self.busy:
            self.cancelled.add(tid)

    def drop(self) -> list[tuple[int, Any, Any]]:
        """Empty the inbox; return what was in it (taken or not)."""
        dropped = [*(self.taken or ()), *self.entries]
        self.taken = None
        self.entries = collections.deque()
        return dropped

    def overran(self) -> None:
        """This turn used its budget: what comes next waits in the inbox, and a later turn
        (after the loop has read the socket) takes it."""
        self.slow = True
        if not self.resume_due:
            self.resume_due = True
            self.runner.loop.call_soon(self.resume)

    def hold(self, kind: int, arg: int, payload: Any) -> None:
        """Put the work of one frame in the inbox (its payload is only lent: copied)."""
        if kind == protocol.TASKS:
            tids, messages_pickle = protocol.unpack_ids(payload)
            try:
                messages = loads(messages_pickle)
            except BaseException:
                self.runner.read += len(tids)   # done with: the parent sends them again
                self.channel.send(protocol.RESEND, 0, dumps(tids))
                return
            self.entries.append((_REST, tids, messages))
            self.new_held.extend(tids)
            return
        if type(payload) is not shm.Big:   # (a received Big owns what it holds)
            payload = bytes(payload)
        self.entries.append((kind, arg, payload))
        if kind == protocol.TASK or kind == protocol.MAP:
            self.new_held.append(arg)

    def report_held(self) -> None:
        """Tell the parent which tasks wait in the inbox, not reported yet. Not while it
        does not read what this process sends: a task it never heard was held may start
        without a TAKEN (to the parent it is as good as started), so nothing waits for a
        parent whose loop is held."""
        if self.new_held and not self.channel.backed_up:
            held, self.new_held = self.new_held, []
            self.reported += len(held)
            self.channel.send(protocol.HELD, len(held), dumps(held))

    def recall(self, wanted: set[int]) -> None:
        """Send back to the parent the held tasks it asks for (reported held or not: it
        asks for what it sent and may not have heard of); the rest stays, in order."""
        tids: list[int] = []
        kept: collections.deque[tuple[int, Any, Any]] = collections.deque()
        count = 0   # task ids left in the inbox
        for entry in self.entries:
            kind, arg, payload = entry
            if kind == _REST:
                stay = [i for i, tid in enumerate(arg) if tid not in wanted]
                if len(stay) < len(arg):
                    tids.extend(tid for tid in arg if tid in wanted)
                    if not stay:
                        continue
                    entry = (_REST, [arg[i] for i in stay], [payload[i] for i in stay])
                count += len(stay)
            elif (kind == protocol.TASK or kind == protocol.MAP):
                if arg in wanted:
                    tids.append(arg)
                    continue
                count += 1
            kept.append(entry)
        self.entries = kept
        if tids:
            gone = set(tids)
            self.new_held = [tid for tid in self.new_held if tid not in gone]
            self.reported = count - len(self.new_held)
            self.cancelled.difference_update(gone)
        self.channel.send(protocol.RECALLED, len(tids), dumps(tids))

    def resume(self) -> None:
        """A later turn: read what came first (a RECALL, a CANCEL, more work), then take
        the next held messages, announced to the parent before they start."""
        self.resume_due = False
        if self.runner.stopped or self.runner.orphaned or self.taken is not None:
            return
        self.channel.drain()   # (nothing, if it is closed)
        if self.channel.closed:
            return
        entries = self.entries
        if not entries:
            self.slow = False
            self.channel.flush()
            if self.runner.stopping:
                self.runner.maybe_stop()
            return
        want = self.take
        taken: list[tuple[int, Any, Any]] = []
        count = announced = 0
        while entries and count < want:
            kind, arg, payload = entries[0]
            if kind == _REST:
                room = want - count
                if len(arg) > room:
                    taken.append((_REST, arg[:room], payload[:room]))
                    entries[0] = (_REST, arg[room:], payload[room:])
                    count += room
                    announced += room
                    break
                count += len(arg)
                announced += len(arg)
            else:
                count += 1
                if kind == protocol.TASK or kind == protocol.MAP:
                    announced += 1
            taken.append(entries.popleft())
        # Those reported held come first; a TAKEN tells the parent they start. The others
        # it never heard of: they start as they are.
        reported = min(announced, self.reported)
        self.reported -= reported
        del self.new_held[:announced - reported]
        if reported:
            self.channel.send(protocol.TAKEN, reported)
        self.report_held()   # what stays behind
        self.channel.flush()
        self.taken = taken
        if reported and self.channel.wants_write:
            # Not started before the parent can read that they were: else, were this
            # process to die, it would think them never started and run them again.
            self.channel.on_drained = self.run_taken
            return
        self.run_taken()

    def run_taken(self) -> None:
        """Start the messages this turn took (their TAKEN is written)."""
        taken, self.taken = self.taken, None
        if taken is None or self.runner.stopped or self.runner.orphaned:
            return
        began = _monotonic()
        # A stop waits until all of the take has started: a plain handler that finishes
        # inside this loop must not let _finalise() run before the rest of it.
        self.starting = True
        try:
            count = self._start_taken(taken)
        finally:
            self.starting = False
        self.runner.read += count
        spent = _monotonic() - began
        # Take as many next time as fit the budget at this turn's pace.
        each = spent / count if count else _BUDGET
        self.take = max(1, min(_MAX_TAKE, int(_BUDGET / each) if each > 0 else _MAX_TAKE))
        if self.entries or spent > _BUDGET:
            self.overran()   # (a turn that overran leaves the next read held too)
        else:
            self.slow = False
        self.channel.flush()
        if self.runner.stopping:
            self.runner.maybe_stop()

    def _start_taken(self, taken: list[tuple[int, Any, Any]]) -> int:
        """Start the messages of a take, in order; return how many there were."""
        count = 0
        cancelled = self.cancelled
        for kind, arg, payload in taken:
            if kind == _REST:
                count += len(arg)
                if cancelled:
                    tids, messages = [], []
                    for tid, message in zip(arg, payload):
                        if tid in cancelled:
                            self.runner.refuse(tid)
                        else:
                            tids.append(tid)
                            messages.append(message)
                    arg, payload = tids, messages
                self.runner.start_list(arg, payload, float('inf'))
                continue
            count += 1
            if cancelled and arg in cancelled and kind in (protocol.TASK, protocol.MAP):
                if kind == protocol.TASK:
                    self.runner.refuse(arg)
                else:
                    cancelled.discard(arg)
                    chunk.refuse(self.runner, arg)
                continue
            self.runner.start_one(kind, arg, payload)
        return count
