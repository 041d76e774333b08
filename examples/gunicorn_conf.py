"""gunicorn settings for ``server_gunicorn.py``: one looppool pool host for all web workers.

Run it with ``gunicorn -c gunicorn_conf.py`` from this directory. The hooks run in
gunicorn's master process:

``on_starting``
    starts the pool host with :func:`looppool.remote.serve`, once, before the master binds
    its socket and forks the web workers (so the host inherits neither). The host runs
    under a small keeper process, which starts it again if it dies.
``on_exit``
    stops it, after the web workers have stopped. (The host would exit with the master
    anyway; stopping it here lets accepted tasks finish first.)

The web workers connect with :func:`looppool.remote.connect_sync` (see
``server_gunicorn.py``). ``preload_app`` imports the application once, in the master,
before the fork; that is safe because the client connects on its first call, in each
web worker, never in the master.

Not an example to run with ``python``: doing so says how to run it.
"""

import os
import sys

from looppool import remote
from shared_workers import PasswordHasher, say
# Hooks that print what the demo client waits for (the address, each web worker's pid).
from shared_workers import post_worker_init, when_ready  # noqa: F401 - gunicorn's hooks

wsgi_app = 'server_gunicorn:app'
bind = os.environ.get('GUNICORN_BIND', '127.0.0.1:8000')
workers = 2
worker_class = 'sync'
preload_app = True
graceful_timeout = 10
loglevel = 'warning'
# gunicorn 24 and later open a control socket at one fixed path per user; two servers of
# the same user would fight over it. Older versions ignore the setting.
control_socket_disable = True

POOL_SIZE = 2
# The server and its web workers find the pool host here; ``default_address`` is a
# socket in a directory only this user can enter, named after the worker class.
POOL_ADDRESS = os.environ.setdefault('POOL_ADDRESS', remote.default_address(PasswordHasher))

host = None


def on_starting(server):
    global host
    host = remote.serve(PasswordHasher, POOL_ADDRESS, pool_size=POOL_SIZE)
    say(f'pool host pid {host.pid} runs {POOL_SIZE} pool workers, serving {POOL_ADDRESS}')


def on_exit(server):
    if host is not None:
        host.stop()
        say('the web workers have exited; pool host stopped')


if __name__ == '__main__':
    print('gunicorn_conf.py is a gunicorn configuration: run '
          '"gunicorn -c gunicorn_conf.py" in examples/, or the demo: '
          'python examples/server_gunicorn.py')
    sys.exit(0)
