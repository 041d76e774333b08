"""Frames kept in memory until an actor call carries them: what both ends of a Dask actor
(looppool.dask.pipe on the client, looppool.dask.actor on the Dask worker) have of the
:class:`looppool.channel.Channel` interface, where a worker process has a socket.

Lives on one loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from ..channel import check_size

Frame = tuple[int, int, Any]   # (kind, arg, payload): see looppool.protocol


class Frames:
    """Frames waiting for a call; a subclass says in :meth:`flush` where they go."""

    backed_up = False   # never refused: the next call takes whatever waits

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 before_flush: Callable[[], None]) -> None:
        self.loop = loop
        self.before_flush = before_flush
        self.on_drained: Callable[[], None] | None = None
        self.frames: list[Frame] = []
        self.flush_due = False
        self.handling = False   # frames from the other end are being handled
        self.closed = False

    @property
    def wants_write(self) -> bool:
        return bool(self.frames)

    def send(self, kind: int, arg: int, payload: Any = b'', now: bool = False) -> None:
        """Keep one frame (a copy of a lent buffer); it leaves at the flush, or now."""
        if type(payload) is not bytes:
            payload = bytes(payload)
        check_size(len(payload))
        self.frames.append((kind, arg, payload))
        if now:
            self.flush()
        else:
            self.schedule_flush()

    def send_parts(self, kind: int, arg: int, parts: Sequence[Any], now: bool = False
                   ) -> None:
        self.send(kind, arg, b''.join(parts), now)

    def schedule_flush(self) -> None:
        if not self.flush_due and not self.closed:
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:  # pragma: no cover - each end has its own
        raise NotImplementedError

    def drain(self) -> None:
        pass   # nothing to read: what comes from the other end comes with a call
