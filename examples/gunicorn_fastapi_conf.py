"""gunicorn settings for ``server_fastapi.py``: FastAPI on uvicorn workers, one looppool
pool host for all of them, whose pool worker takes the requests in batches.

Run it with ``gunicorn -c gunicorn_fastapi_conf.py`` from this directory. The hooks run
in gunicorn's master process:

``on_starting``
    starts the pool host with :func:`looppool.remote.serve`, once, before the master binds
    its socket and forks the web workers: one pool worker (the model, loaded once) with
    ``batch_size`` and ``batch_timeout``. The host runs under a small keeper process,
    which starts it again if it dies.
``on_exit``
    stops it, after the web workers have stopped.

``preload_app`` imports the application once, in the master, before the fork; that is
safe because the client in ``server_fastapi.py`` connects on its first call, in each web
worker, on that worker's own loop, never in the master.

The web workers are uvicorn's gunicorn worker class, from the ``uvicorn-worker`` package
(``pip install fastapi uvicorn uvicorn-worker``).

Not an example to run with ``python``: doing so says how to run it.
"""

import os
import sys

from looppool import remote
from shared_workers import BatchHasher, say
# Hooks that print what the demo client waits for (the address, each web worker's pid).
from shared_workers import post_worker_init, when_ready  # noqa: F401 - gunicorn's hooks

wsgi_app = 'server_fastapi:app'
bind = os.environ.get('GUNICORN_BIND', '127.0.0.1:8000')
workers = 2
worker_class = 'uvicorn_worker.UvicornWorker'
preload_app = True
graceful_timeout = 10
loglevel = 'warning'
# gunicorn 24 and later open a control socket at one fixed path per user; two servers of
# the same user would fight over it. Older versions ignore the setting.
control_socket_disable = True

# One pool worker holds the model; the requests of every web worker reach it, and it
# takes them in batches of up to 16, each handed over at most 50 ms after its first
# request arrived.
POOL_SIZE = 1
BATCH_SIZE = 16
BATCH_TIMEOUT = 0.05
POOL_ADDRESS = os.environ.setdefault('POOL_ADDRESS', remote.default_address(BatchHasher))

host = None


def on_starting(server):
    global host
    host = remote.serve(BatchHasher, POOL_ADDRESS, pool_size=POOL_SIZE,
                        batch_size=BATCH_SIZE, batch_timeout=BATCH_TIMEOUT)
    say(f'pool host pid {host.pid} runs {POOL_SIZE} pool worker, serving {POOL_ADDRESS}')


def on_exit(server):
    if host is not None:
        host.stop()
        say('the web workers have exited; pool host stopped')


if __name__ == '__main__':
    print('gunicorn_fastapi_conf.py is a gunicorn configuration: run '
          '"gunicorn -c gunicorn_fastapi_conf.py" in examples/, or the demo: '
          'python examples/server_fastapi.py')
    sys.exit(0)
