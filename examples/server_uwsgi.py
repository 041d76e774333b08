#!/usr/bin/env python3
"""A WSGI application under uWSGI whose web workers share one looppool pool.

uWSGI's master imports this module once and then forks the web workers (unless
``lazy-apps`` is set). At import, in the master, the module starts the pool host with
:func:`looppool.remote.serve`; a ``@postfork`` hook (from ``uwsgidecorators``) then runs
in each web worker right after its fork and makes that worker's own
:func:`looppool.remote.connect_sync` client, so that no connection is ever shared
across a fork::

    uWSGI master ── import: serve() ──> keeper ──> pool host ──> pool workers 0, 1
      ├── worker 1 ── @postfork: connect_sync ───────^
      └── worker 2 ── @postfork: connect_sync ───────┘     (one Unix socket, mode 0600)

The keeper, a small process of ``serve()``'s, starts the host again if it dies.

uWSGI calls no Python hook in the master when it stops, and needs none here: the host
exits when the master does (the keeper watches its parent), after its pool has finished
the tasks it had accepted. uWSGI binds its listening socket before it imports the
application, so the host holds a copy of it until then. Deploy it with, in this
directory::

    uwsgi --master --processes 2 --http-socket 127.0.0.1:8000 --die-on-term \\
          --wsgi-file server_uwsgi.py

``python examples/server_uwsgi.py`` runs the demo: it starts uWSGI like that on a free
port, sends it HTTP requests, prints which web worker asked and which pool workers
answered (the same ones for every web worker), stops uWSGI with SIGTERM and checks that
the pool host and its workers have exited. Without uWSGI installed it says what to
install and exits.
"""

import json
import os
import shutil
import socket
import sys

import looppool
from looppool import remote
from shared_workers import (PasswordHasher, ServerProcess, demo, hash_query, private_socket,
                            say, socket_removed)

try:
    import uwsgi
    from uwsgidecorators import postfork
except ImportError:   # imported by plain Python: the demo, below
    uwsgi = None

POOL_SIZE = 2
WEB_WORKERS = 2
ADDRESS = os.environ.get('POOL_ADDRESS') or remote.default_address(PasswordHasher)

client = None   # each web worker's own, made after its fork

if uwsgi is not None:
    host = remote.serve(PasswordHasher, ADDRESS, pool_size=POOL_SIZE)
    say(f'pool host pid {host.pid} runs {POOL_SIZE} pool workers, serving {ADDRESS}')
    for fd in uwsgi.sockets:
        with socket.socket(fileno=os.dup(fd)) as listener:
            say('listening on http://{}:{}'.format(*listener.getsockname()[:2]))

    @postfork
    def connect_to_pool():
        global client
        client = remote.connect_sync(ADDRESS)
        say(f'web worker pid {os.getpid()} ready')


def application(environ, start_response):
    """``GET /hash?password=...``: the pool hashes it while this web worker waits."""
    message = hash_query(environ.get('QUERY_STRING', ''))
    if environ.get('PATH_INFO') != '/hash' or message is None:
        return respond(start_response, '404 Not Found', {'error': 'try /hash?password=...'})
    try:
        reply = client.submit(message, timeout=10)
    except (remote.ConnectionLost, looppool.WorkerLost, looppool.PoolClosed) as error:
        # Expected now and then, and no bug: the pool host died (its keeper starts it
        # again, and the next call connects to it), the pool worker running this died, or
        # the pool is stopping. Ask the client to try again; log no traceback.
        return respond(start_response, '503 Service Unavailable', {'error': str(error)},
                       [('Retry-After', '1')])
    except TimeoutError:
        return respond(start_response, '504 Gateway Timeout',
                       {'error': 'the pool did not answer within 10 s'})
    return respond(start_response, '200 OK', dict(reply, web_pid=os.getpid()))


def respond(start_response, status, document, headers=()):
    body = json.dumps(document).encode()
    start_response(status, [('Content-Type', 'application/json'),
                            ('Content-Length', str(len(body))), *headers])
    return [body]


def find_uwsgi():
    """The uwsgi program beside this interpreter (pip installs it there), or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), 'uwsgi')
    return beside if os.access(beside, os.X_OK) else shutil.which('uwsgi')


def main():
    program = find_uwsgi()
    if program is None:
        print('this example needs uWSGI: pip install uwsgi (it builds with a C compiler)')
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    command = [program, '--master', '--processes', str(WEB_WORKERS), '--die-on-term',
               '--http-socket', '127.0.0.1:0', '--wsgi-file', 'server_uwsgi.py',
               '--need-app', '--disable-logging', '--pythonpath', here]
    if sys.prefix != sys.base_prefix:   # run the application in this virtualenv
        command += ['--virtualenv', sys.prefix]
    with private_socket('looppool-uwsgi-') as address:
        server = ServerProcess('uwsgi', command, cwd=here,
                               env=dict(os.environ, POOL_ADDRESS=address))
        status = demo([server], web_workers=WEB_WORKERS, pool_size=POOL_SIZE)
        return status if socket_removed(address) else 1


if __name__ == '__main__':
    sys.exit(main())
