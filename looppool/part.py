"""What each part of a pool's parent side holds: the pool, the other parts, and the tables
they share.

A :class:`~looppool.Pool` is made of six parts, one concept each, along the path of a
message: the :class:`~looppool.dispatch.Dispatcher` (sending), the
:class:`~looppool.inflight.InFlight` (what workers hold), the
:class:`~looppool.receive.Receiver` (what they send back), the
:class:`~looppool.supervise.Supervisor` (the workers, from start to stop), the transport
(:class:`~looppool.processes.Processes`, or a DaskPool's actors: how a worker is started
and reached) and the :class:`~looppool.lifecycle.Lifecycle` (pause, resume, restart). Each owns its own state and says
so; what they share the pool makes once and none of them replaces: the worker slots (the
supervisor's), the backlog (the dispatcher's, which the others give work back to or fail),
the counters behind ``stats()``, the options.

All of it lives in the parent, on the pool's loop, and is not thread-safe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Deque

if TYPE_CHECKING:
    import collections

    from .dispatch import Dispatcher
    from .inflight import InFlight
    from .lifecycle import Lifecycle
    from .link import _Slot
    from .pool import Pool
    from .processes import Processes
    from .receive import Receiver
    from .supervise import Supervisor
    from .tasks import Entry


class Part:
    """One part of a pool; see the module's docstring."""

    supervisor: Supervisor
    dispatcher: Dispatcher
    inflight: InFlight
    receiver: Receiver
    transport: Processes   # or another transport with its interface (looppool.processes)
    lifecycle: Lifecycle

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.pool_size: int = pool.pool_size
        self._slots: list[_Slot] = pool._slots
        self._pending: Deque[Entry] = pool._pending
        self._counts: collections.Counter[str] = pool._counts
        self._options: dict[str, Any] = pool._options
        self._share: int = pool._share
        self._recycle_after: int | None = pool._recycle_after

    def bind(self, supervisor: Supervisor, dispatcher: Dispatcher, inflight: InFlight,
             receiver: Receiver, transport: Processes, lifecycle: Lifecycle) -> None:
        """Know the other parts (they are made one after another)."""
        (self.supervisor, self.dispatcher, self.inflight, self.receiver, self.transport,
         self.lifecycle) = supervisor, dispatcher, inflight, receiver, transport, lifecycle

    def resized(self) -> None:
        """The pool learnt its size after the parts were made (a DaskPool of one actor
        per Dask worker): take the numbers that follow from it again."""
        pool = self.pool
        self.pool_size = pool.pool_size
        self._share = pool._share
        self._recycle_after = pool._recycle_after
