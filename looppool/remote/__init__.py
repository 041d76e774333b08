"""One pool for many processes: :func:`serve`, :func:`connect`, :func:`connect_sync`,
:func:`shared`.

::

    web process 1 --+
    web process 2 --+--- Unix socket (mode 0600, peer uid checked) ---> host process
    web process N --+    or TCP (HMAC secret, optional TLS)            Pool -> workers

The host is an ordinary :class:`~looppool.Pool` in a process of its own, plus a server.
Each client connection is a *session*. A client's message crosses twice: client -> host
(the same 13-byte frames as the local channel, over an asyncio transport so TLS works; the
calls of one loop iteration in one frame), then host -> worker: the host, once the client
has authenticated, unpickles a frame's messages into tasks of its pool, dealt as a local
burst of ``submit()`` calls is, and sends each client the replies of one read from a
worker in one frame, at the end of that read.

The modules, along the path of a message:

``access``  who may talk to whom: addresses, private directories, secrets, peer uids
``wire``    the frames between a client and a host, and the protocol that reads them
``client``  :class:`Client`, the asynchronous client (:func:`connect`)
``sync``    :class:`SyncClient`, the blocking client (:func:`connect_sync`)
``host``    the host process: its pool, its server, one session per client
``serve``   :func:`serve`: a host as a child of this process, and its :class:`HostHandle`
``keeper``  the process between ``serve()``'s caller and its host: restarts a host that dies
``shared``  :func:`shared`: create-or-connect, with a detached host

Security: messages are pickles, and unpickling runs code. Only trusted peers may connect;
what is checked before the first pickle is read is listed in :mod:`looppool.remote.access`
and on the manual's Sharing page.
"""

from ..errors import AuthenticationError, ConnectionLost
from .access import default_address
from .client import Client, connect
from .serve import HostHandle, serve
from .shared import shared
from .sync import SyncClient, connect_sync

__all__ = ['serve', 'connect', 'connect_sync', 'shared', 'default_address', 'HostHandle',
           'Client', 'SyncClient', 'ConnectionLost', 'AuthenticationError']
