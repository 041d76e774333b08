#!/usr/bin/env python3
"""A multi-process Tornado server whose web workers share one looppool pool.

Tornado's ``fork_processes(2)`` forks two web workers that accept connections on the
same listening socket. Each web worker has its own loop, and each would start a pool of
its own if it called ``looppool.Pool()``: two web workers, two pools, twice the memory.
Here the master starts one pool host with :func:`looppool.remote.serve` *before* it
forks, and each web worker connects to it with :func:`looppool.remote.connect`; its
handlers ``await client.submit(...)`` exactly as they would await ``pool.submit(...)``::

    master ── serve() ──> keeper ──> pool host ──> pool workers 0, 1
      │ fork_processes(2)                ^
      ├── web worker 0 ──────────────────┤  Unix socket (0600, in a 0700 directory)
      └── web worker 1 ──────────────────┘

(The keeper, a small process of ``serve()``'s, starts the host again if it dies.)

The order matters: ``serve()`` first (the host must not inherit the web server's
listening socket), then ``bind_sockets``, then ``fork_processes`` (each web worker makes
its own connection, after the fork). To stop the server, send SIGTERM to the master: it
tells the web workers to finish through a pipe, waits for them, then stops the host.

``python examples/server_tornado.py --serve [SOCKET]`` runs just the server, as you
would deploy it. ``python examples/server_tornado.py`` runs the demo: it starts the
server, sends it HTTP requests, prints which web worker asked and which pool workers
answered (the same ones for every web worker), stops the server and checks that the pool
host and its workers have exited.
"""

import asyncio
import os
import signal
import sys

import tornado.httpserver
import tornado.netutil
import tornado.process
import tornado.web

import looppool
from looppool import remote
from shared_workers import (PasswordHasher, ServerProcess, demo, private_socket, say,
                            socket_removed)

WEB_WORKERS = 2
POOL_SIZE = 2


class HashHandler(tornado.web.RequestHandler):
    """``GET /hash?password=...``: the pool hashes it; this loop stays free meanwhile."""

    def initialize(self, pool):
        self.pool = pool

    async def get(self):
        message = (self.get_argument('password'), self.get_argument('salt', 'looppool-demo'))
        try:
            reply = await self.pool.submit(message, timeout=10)
        except (remote.ConnectionLost, looppool.WorkerLost, looppool.PoolClosed) as error:
            # Expected now and then, and no bug: the pool host died (its keeper starts it
            # again, and the next call connects to it), the pool worker running this died,
            # or the pool is stopping. Ask the client to try again; log no traceback.
            self.fail(503, error, retry_after=1)
        except TimeoutError:
            self.fail(504, 'the pool did not answer within 10 s')
        else:
            self.write(dict(reply, web_pid=os.getpid()))

    def fail(self, status, error, retry_after=None):
        self.set_status(status)
        if retry_after is not None:
            self.set_header('Retry-After', str(retry_after))
        self.write({'error': str(error)})


async def web_worker(task_id, sockets, address, stop_fd):
    """One web worker process: serve HTTP until the master closes the stop pipe."""
    pool = remote.connect(address)
    await pool.connect()    # a call would connect by itself; this fails early instead
    server = tornado.httpserver.HTTPServer(
        tornado.web.Application([(r'/hash', HashHandler, {'pool': pool})]))
    server.add_sockets(sockets)
    say(f'web worker pid {os.getpid()} ready (Tornado task id {task_id})')

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(stop_fd, stopping.set)   # readable at EOF: the master closed its end
    await stopping.wait()
    loop.remove_reader(stop_fd)
    os.close(stop_fd)
    server.stop()
    await server.close_all_connections()
    await pool.close()
    say(f'web worker pid {os.getpid()} stopped')


def run_server(address):
    """The server program: the master starts the pool host, then forks the web workers."""
    host = remote.serve(PasswordHasher, address, pool_size=POOL_SIZE)
    say(f'pool host pid {host.pid} runs {POOL_SIZE} pool workers, serving {address}')
    sockets = tornado.netutil.bind_sockets(0, '127.0.0.1')
    say(f'listening on http://127.0.0.1:{sockets[0].getsockname()[1]}')

    # Each web worker watches the read end; closing the last write end (the master's) is
    # the signal to stop. A master killed outright closes it too: no orphaned web workers.
    stop_reader, stop_writer = os.pipe()
    writers = [stop_writer]

    def close_stop_pipe(*_):
        if writers:
            os.close(writers.pop())

    signal.signal(signal.SIGTERM, close_stop_pipe)
    try:
        task_id = tornado.process.fork_processes(WEB_WORKERS)
    except BaseException:
        # Only the master gets here: all its web workers exited (fork_processes raises
        # SystemExit then), or it failed. Either way the pool host goes last.
        close_stop_pipe()
        for sock in sockets:
            sock.close()
        host.stop()
        say('the web workers have exited; pool host stopped')
        raise
    # A web worker from here on.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    close_stop_pipe()   # this process's copy of the write end
    asyncio.run(web_worker(task_id, sockets, address, stop_reader))


def main():
    with private_socket('looppool-tornado-') as address:
        server = ServerProcess('tornado', [sys.executable, *[f'-W{option}' for option in
                                                              sys.warnoptions],
                                           __file__, '--serve', address])
        status = demo([server], web_workers=WEB_WORKERS, pool_size=POOL_SIZE)
        return status if socket_removed(address) else 1


if __name__ == '__main__':
    if sys.argv[1:2] == ['--serve']:
        run_server(sys.argv[2] if len(sys.argv) > 2
                   else remote.default_address(PasswordHasher))
    else:
        sys.exit(main())
