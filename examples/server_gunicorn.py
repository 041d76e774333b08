#!/usr/bin/env python3
"""A WSGI application under gunicorn whose web workers share one looppool pool.

gunicorn's master forks the web workers; each handles one request at a time, with no
event loop. They all reach one pool host, which the master started in its
``on_starting`` hook (see ``gunicorn_conf.py``), through a
:func:`looppool.remote.connect_sync` client: a blocking ``client.submit(message)`` that
any thread may call::

    gunicorn master ── on_starting: serve() ──> keeper ──> pool host ──> pool workers
      ├── web worker 1 ── connect_sync ──────────────────────^
      └── web worker 2 ── connect_sync ──────────────────────┘  (a Unix socket, 0600)

The keeper, a small process of ``serve()``'s, starts the host again if it dies.

Deploy it with ``gunicorn -c gunicorn_conf.py`` in this directory.

``python examples/server_gunicorn.py`` runs the demo: it starts gunicorn with that
configuration on a free port, sends it HTTP requests, prints which web worker asked and
which pool workers answered (the same ones for every web worker), stops gunicorn with
SIGTERM and checks that the pool host and its workers have exited.
"""

import json
import os
import sys

import looppool
from looppool import remote
from shared_workers import PasswordHasher, gunicorn_demo, hash_query

# The client is made at import, in gunicorn's master (preload_app), and inherited by every
# web worker; it holds no connection until its first call, which each web worker makes
# for itself after the fork.
client = remote.connect_sync(
    os.environ.get('POOL_ADDRESS') or remote.default_address(PasswordHasher))


def app(environ, start_response):
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


def main():
    try:
        import gunicorn  # noqa: F401 - only to say what is missing
    except ImportError:
        print('this example needs gunicorn: pip install gunicorn')
        return 0
    return gunicorn_demo('gunicorn_conf.py', pool_size=2)


if __name__ == '__main__':
    sys.exit(main())
