"""What crosses the pipe between the pool and a worker: frame kinds and the start-up record.

Every frame is ``(kind, arg, payload)`` (see :mod:`looppool.channel` for the bytes).

Parent to worker:

========== ============ ===========================================================
kind       arg          payload
========== ============ ===========================================================
TASK       task id      pickled message; the worker answers with REPLY or ERROR
NOTE       origin       pickled message; no answer, the worker sends FREED when done
CANCEL     task id      --; cancel the task's coroutine
CREDIT     count        --; that many results were acknowledged (``result_done``)
STOP       0            --; finish accepted tasks, run ``_finalise``, exit
TERMINATE  0            --; cancel every task, run ``_finalise``, exit now
REPLAY     0            pickled sticky broadcast, replayed to a replacement: run like
                        NOTE, but its return value is dropped (nobody asked for it)
TASKS      count        a batch of TASKs sent in one loop iteration: see ``pack``
MAP        task id      pickled list of messages (a chunk of ``Pool.map``): each is
                        handled as a TASK; the worker answers with one MAPPED
RECALL     count        pickled ids of tasks: send back those you hold, not started
PAUSE      0            --; run ``Worker._pause()``, answer PAUSED (no work comes
                        until a RESUME)
RESUME     0            --; run ``Worker._resume()``, answer RESUMED
========== ============ ===========================================================

Worker to parent:

============ ============ =========================================================
kind         arg          payload
============ ============ =========================================================
READY        pid          --; ``_initialise`` returned, work can flow
START_FAILED pid          pickled traceback text of the failed start
REPLY        task id      pickled return value; frees the task's slot
ERROR        task id      pickled ``(exception, traceback text)``; frees the slot
REPLY_KEEP   task id      as REPLY, but the slot is freed later by FREED
ERROR_KEEP   task id      as ERROR, but the slot is freed later by FREED
FREED        count        --; that many slots are free (``_task_done`` and notes)
RESULT       origin       pickled ``_put_nowait`` result for ``process_message``; origin is
                          the id of the task (or the note's origin) being handled
LOG          0            pickled ``logging.LogRecord`` attributes
REPLIES      count        a batch of REPLYs: see ``pack``
RESEND       0            pickled task ids of a TASKS batch the worker could not
                          unpickle: send them again one by one, so that only the
                          message at fault fails
MAPPED       task id      the answer to a MAP, packed like a batch (see ``pack``): the
                          "ids" are ``[slots freed]``, the items ``(replies, errors)``,
                          errors mapping a position to a pickled ``(exception, text)``;
                          ``(None, {-1: error})`` when the chunk could not be unpickled
ACK          count        --; that many messages were read (a TASKS frame counts its
                          tasks, every other frame that carries work one)
HELD         count        pickled ids of tasks (TASK, TASKS, MAP) put in the worker's
                          inbox, not started: its loop ran over its budget
TAKEN        count        --; the first ``count`` held tasks are about to start. Sent,
                          and written, before they start: a held task the parent has
                          not seen taken never ran, whatever happens to the worker
RECALLED     count        pickled ids of the held tasks sent back for a RECALL (none
                          of them started); they are no longer held
PAUSED       0            --; ``_pause()`` returned (or raised: logged here)
RESUMED      0            --; ``_resume()`` returned (or raised: logged here)
BATCHED      size         --; a batch of ``size`` messages was handed to
                          ``handle_batch`` (for ``stats()``: see looppool.batch)
============ ============ =========================================================

Batches (TASKS, REPLIES) carry two pickles, the task ids first, so that the ids can be read
even when the messages or replies cannot be unpickled: see :func:`pack`, :func:`unpack_ids`.

Any payload that carries a message, a reply or a result may instead be a
:class:`looppool.shm.Big` (its kind flagged ``shm.BIG`` on the wire): a small pickle whose
large buffers travel through shared memory. :func:`loads` and :func:`unpack_ids` take
either. The channels also send each other ``shm.RELEASE`` frames (kind 0xFF: these shared
memory segments may be written again), which they keep to themselves.

The ``*_KEEP`` kinds exist for Looppool-style workers, where a task's slot is freed by
``_task_done()`` rather than by the end of ``_process_message``.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, NamedTuple

from . import shm

TASK, NOTE, CANCEL, CREDIT, STOP, TERMINATE, REPLAY, TASKS, MAP, RECALL = range(1, 11)
PAUSE, RESUME = range(11, 13)
READY, START_FAILED, REPLY, ERROR, REPLY_KEEP, ERROR_KEEP, FREED, RESULT, LOG = range(16, 25)
REPLIES, RESEND, MAPPED, ACK, HELD, TAKEN, RECALLED, PAUSED, RESUMED, BATCHED = \
    range(25, 35)

# The frames that carry work to a worker.
WORK = frozenset((TASK, NOTE, REPLAY, TASKS, MAP))

# Protocol 5 adds out-of-band buffers and is the fastest for large bytes-like payloads.
PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, PROTOCOL)


_loads = pickle.loads
_Big = shm.Big


def loads(data: Any) -> Any:
    """What a payload holds: a pickle, or a :class:`looppool.shm.Big`."""
    if type(data) is _Big:
        return shm.loads(data)
    return _loads(data)


def dumps_shared(obj: Any, threshold: int) -> Any:
    """``obj`` pickled: bytes, or a :class:`looppool.shm.Big` when it holds buffers of
    ``threshold`` bytes or more (0: never), for a channel that takes them."""
    if threshold:
        return shm.dumps(obj, threshold)
    return pickle.dumps(obj, PROTOCOL)

_IDS_SIZE = struct.Struct('<I')


def pack(ids: list[int], items_pickle: Any) -> list[Any]:
    """The parts of a batch payload: size of the ids' pickle, the ids, the items."""
    head = dumps(ids)
    return [_IDS_SIZE.pack(len(head)), head, items_pickle]


def unpack_ids(payload: Any) -> tuple[list[int], Any]:
    """The ids of a batch and the (still pickled) items."""
    if type(payload) is _Big:   # the buffers belong to the items
        ids, _ = unpack_ids(payload.data)
        size, = _IDS_SIZE.unpack_from(payload.data)
        return ids, payload.split(_IDS_SIZE.size + size)
    size, = _IDS_SIZE.unpack_from(payload)
    start = _IDS_SIZE.size
    view = memoryview(payload)
    return _loads(view[start:start + size]), view[start + size:]


class WorkerConfig(NamedTuple):
    """Everything a worker process needs from the pool, passed once at start."""

    number: int
    pool_size: int
    result_credit: int
    start_method: str
    title: str | None
    close_fds: tuple[int, ...]
    log_level: int
    forward_logs: bool
    cancel_grace: float
    batch_replies: bool
    worker_arguments: bytes   # pickled (worker_args, worker_kwargs): see worker_arguments()
    # A handle_batch worker's batches (looppool.batch): the most messages in one, and the
    # seconds a batch waits after its first message; 0 for a worker that does not batch.
    batch_size: int = 0
    batch_timeout: float = 0.0
    # Buffers at least this large go through shared memory (0: never): see looppool.shm.
    shared_memory: int = 0
    # Every task's id is set as the origin of the _put_nowait results its handler sends
    # (a pool host routes them to the task's client by it); else only where it is free.
    origins: bool = False
