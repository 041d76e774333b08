"""The futures of tasks sent to workers, and how they wait to be sent.

A ``submit()`` is one :class:`_TaskFuture`; a chunk of ``map()`` one :class:`_ChunkFuture`;
a pool host's broadcast one :class:`_RawFuture` per worker (a host's client's task is a
``_HostTask``, see looppool.remote.host). What waits for room in a worker is an
:data:`Entry`: such a future, or an :data:`Item` (a pickled note or task). All of them live
in the parent, on the pool's loop, and are not thread-safe.
"""

from __future__ import annotations

import asyncio
import operator
from typing import TYPE_CHECKING, Any, Callable, TypeVar, Union

from . import protocol
from .protocol import dumps, dumps_shared

if TYPE_CHECKING:
    from .pool import Pool

# (kind, task id or origin, payload, future or None); for a remote client's note the last
# is a stand-in whose set_result() acknowledges it (see remote._Ack).
Item = tuple[int, int, Any, Any]


class _TaskFuture(asyncio.Future[Any]):
    """The future of one ``submit()``: cancelling it cancels the task in the worker."""

    # What every task sets lives in slots; what few set (a timeout, a host's sink, the time
    # for statsd) defaults on the class and goes in the instance's dict when set: three
    # stores fewer on the path every message takes. Which worker holds it is not kept here
    # either: the rare caller that needs it looks it up (Pool._link_of), so a burst is
    # handed to the workers in bulk, without a store per message. The pool is an attribute
    # of a subclass each pool makes (Pool._task_future), not of each future: a store fewer
    # again, and a slot fewer for the cyclic GC to visit in every future of a burst.
    __slots__ = ('_lp_tid', '_lp_message')
    _lp_message: Any    # the message itself, kept to batch it and, rarely, to resend it
    _lp_tid: int
    _lp_pool: Pool | None = None
    _lp_timer: asyncio.TimerHandle | None = None
    _lp_started: float = 0.0
    _lp_sink: Callable[[bool, Any], None] | None = None
    _lp_target: int | None = None   # worker_num, for a task given back unstarted

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        pool = self._lp_pool
        if pool is not None:
            pool._inflight._abandon(self)
        return True


class _RawFuture(_TaskFuture):
    """A pickled message a pool host sends (a client's broadcast): the reply goes to
    ``_lp_sink(is_error, payload)`` as a pickle, as does an error the pool raises itself
    (WorkerLost, TimeoutError, PoolClosed). Nobody awaits it."""

    __slots__ = ()

    def set_exception(self, exception: Any) -> None:
        super().set_exception(exception)
        self.exception()  # reported through the sink, so never "unretrieved"
        assert self._lp_sink is not None
        self._lp_sink(True, dumps((exception, '')))

    def set_result(self, result: Any) -> None:
        # A reply that came in a worker's batch, unpickled with its batch-mates.
        super().set_result(None)
        assert self._lp_sink is not None
        self._lp_sink(False, dumps(result))


_AnyTaskFuture = TypeVar('_AnyTaskFuture', bound=_TaskFuture)
_message_of = operator.attrgetter('_lp_message')
_tid_of = operator.attrgetter('_lp_tid')

# What waits in a queue for room in a worker: a submit()'s own future (its message is
# pickled with the batch of its loop iteration), or an Item (a pickled note or task).
Entry = Union[_TaskFuture, Item]


class _ChunkFuture(_TaskFuture):
    """One chunk of ``map()`` in a worker: resolves to ``(replies, errors)``."""

    __slots__ = ('_lp_count', '_lp_after')
    _lp_count: int      # messages in the chunk
    _lp_after: dict[int, BaseException] | None   # a message after them failed to pickle


class _StopFuture(asyncio.Future[None]):
    """What ``stop()`` returns. It notes whether anyone awaits it or waits on it."""

    __slots__ = ('_lp_awaited',)
    _lp_awaited: bool

    def __await__(self):  # type: ignore[no-untyped-def]
        self._lp_awaited = True
        return super().__await__()

    __iter__ = __await__

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        self._lp_awaited = True
        super().add_done_callback(fn, context=context)




def _cancel_timer(future: Any) -> None:
    timer = getattr(future, '_lp_timer', None)
    if timer is not None:
        timer.cancel()
        future._lp_timer = None


def _pickle_batch(batch: list[_TaskFuture], shared_memory: int = 0) -> Any:
    """The payload of a batch's frame: the messages' list, or one message on its own;
    with ``shared_memory``, a :class:`looppool.shm.Big` if they hold large buffers."""
    if len(batch) == 1:
        return dumps_shared(batch[0]._lp_message, shared_memory)
    return dumps_shared(list(map(_message_of, batch)), shared_memory)


def _entry(future: _TaskFuture) -> Entry:
    """How a task given back unstarted waits to be sent again."""
    if isinstance(future, _ChunkFuture):
        return (protocol.MAP, future._lp_tid, future._lp_message, future)
    if isinstance(future, _RawFuture):   # its message is a pickle
        return (protocol.TASK, future._lp_tid, future._lp_message, future)
    return future


def _weight(future: _TaskFuture) -> int:
    """How many messages a future stands for: a chunk of map() many, others one."""
    return future._lp_count if isinstance(future, _ChunkFuture) else 1


def _wake(waiter: asyncio.Future[None], _: Any = None) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _await(awaitable: Any) -> Any:
    return await awaitable
