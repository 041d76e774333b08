"""looppool: a pool of worker processes, each running its own Tornado IO loop.

The public names; see the manual for the guide and the design.
"""

from ._version import __version__
from .errors import LooppoolError, PoolClosed, WorkerLost, WorkerStartError
from .pool import Pool
from .remote import connect, connect_sync, serve, shared
from .worker import Worker, task_done

__all__ = [
    'LooppoolError',
    'Pool',
    'PoolClosed',
    'Worker',
    'WorkerLost',
    'WorkerStartError',
    '__version__',
    'connect',
    'connect_sync',
    'serve',
    'shared',
    'task_done',
]
