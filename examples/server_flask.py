#!/usr/bin/env python3
"""A plain Flask application whose processes share one looppool pool, started by
whichever process needs it first.

No hook of a server is needed: :func:`looppool.remote.shared` connects to the pool host
for the worker class, and starts that host first if none is running. Whatever forks or
spawns the application's processes (mod_wsgi's daemon processes, gunicorn without
``preload_app``, several ``flask run`` in a row), each one calls ``shared()`` as it
builds the app, and exactly one host starts however many call at once: they take turns
under a lock file beside the socket. The host is detached: it outlives the process that
started it, and exits once it has had no client for ``idle_timeout`` seconds::

    Flask process 1 ── shared() started the host ──> pool host ──> pool workers 0, 1
    Flask process 2 ── shared() connected ─────────────^   (Unix socket, mode 0600)

``sync=True`` gives a :class:`looppool.remote.SyncClient`: a blocking ``submit`` that the
Flask request threads may call at once.

Deploy it under any WSGI server through the application factory, e.g.
``gunicorn -w 4 'server_flask:create_app()'`` in this directory, or a mod_wsgi ``.wsgi``
file with ``application = create_app()``. Flask is not a looppool dependency:
``pip install flask``.

``python examples/server_flask.py`` runs the demo: it starts two Flask processes (each
serves with Werkzeug on a free port) at the same moment, sends both HTTP requests, prints
which process started the host, which web worker asked and which pool workers answered
(the same ones for both), stops both with SIGTERM and waits for the host to go idle and
exit. Without Flask installed it says what to install and exits.
"""

import os
import signal
import sys

import looppool
from looppool import remote
from shared_workers import (PasswordHasher, ServerProcess, demo, private_socket, say,
                            socket_removed)

try:
    import flask
except ImportError:
    flask = None

POOL_SIZE = 2


def create_app():
    """The application factory: every process that serves the app calls it once."""
    app = flask.Flask(__name__)
    pool = remote.shared(
        PasswordHasher,
        os.environ.get('POOL_ADDRESS'),          # None: remote.default_address(...)
        sync=True,
        idle_timeout=float(os.environ.get('POOL_IDLE_TIMEOUT', 30)),
        pool_size=POOL_SIZE)
    app.extensions['looppool'] = pool
    say(f'web worker pid {os.getpid()} '
        + ('started the pool host' if pool.created_new_pool else
           'connected to the running pool host'))

    @app.route('/hash')
    def hash_password():
        password = flask.request.args.get('password')
        if password is None:
            return {'error': 'try /hash?password=...'}, 404
        salt = flask.request.args.get('salt', 'looppool-demo')
        try:
            reply = pool.submit((password, salt), timeout=10)
        except (remote.ConnectionLost, looppool.WorkerLost, looppool.PoolClosed) as error:
            # Expected now and then, and no bug: the host died (the next call starts a
            # new one), the pool worker running this died, or the pool is stopping. Ask
            # the client to try again; log no traceback.
            return {'error': str(error)}, 503, {'Retry-After': '1'}
        except TimeoutError:
            return {'error': 'the pool did not answer within 10 s'}, 504
        return dict(reply, web_pid=os.getpid())

    return app


def run_server():
    """One Flask process: Werkzeug's threaded server on a free port, until SIGTERM."""
    from werkzeug.serving import make_server

    app = create_app()
    server = make_server('127.0.0.1', 0, app, threaded=True)
    say(f'listening on http://127.0.0.1:{server.server_port}')

    def stop(*_):
        raise SystemExit(0)   # out of serve_forever, through the finally below

    signal.signal(signal.SIGTERM, stop)
    say(f'web worker pid {os.getpid()} ready')
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.extensions['looppool'].close()
        say(f'web worker pid {os.getpid()} stopped')


def main():
    here = os.path.abspath(__file__)
    command = [sys.executable, *[f'-W{option}' for option in sys.warnoptions], here,
               '--serve']
    with private_socket('looppool-flask-') as address:
        # A short idle timeout, so that the demo sees the host exit soon after the servers.
        environment = dict(os.environ, POOL_ADDRESS=address, POOL_IDLE_TIMEOUT='1')
        # Both at once, as a WSGI server starts its processes: only one starts the host.
        servers = [ServerProcess(f'flask {number}', command, env=environment)
                   for number in (1, 2)]
        status = demo(servers, web_workers=len(servers), pool_size=POOL_SIZE,
                      host_timeout=15)
        started = [line for server in servers for line in server.output
                   if line.endswith('started the pool host')]
        print(f'{len(started)} of the {len(servers)} Flask processes started the pool host')
        if len(started) != 1:
            status = 1
        return status if socket_removed(address) else 1


if __name__ == '__main__':
    if flask is None:
        print('this example needs Flask: pip install flask')
        sys.exit(0)
    if sys.argv[1:2] == ['--serve']:
        run_server()
    else:
        sys.exit(main())
