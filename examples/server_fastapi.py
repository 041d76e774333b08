#!/usr/bin/env python3
"""A FastAPI application under gunicorn with uvicorn workers, whose web workers share one
pool worker that takes their requests in batches.

The scenario: a model that is expensive to load and cheaper per input when it scores
many inputs in one call (a GPU, a vectorised library) serves an asynchronous web API
that runs in several processes. The model lives once, in a looppool pool host that
gunicorn's master starts in its ``on_starting`` hook (see ``gunicorn_fastapi_conf.py``);
each uvicorn web worker's ``async`` endpoint awaits a :func:`looppool.remote.connect`
client, and the pool worker's ``handle_batch`` gets the requests in batches, formed from
whatever reached it: one batch carries the requests of several web workers::

    gunicorn master ── on_starting: serve() ──> keeper ──> pool host ──> pool worker
      ├── uvicorn worker 1 ── await client.submit() ──────────^        handle_batch
      └── uvicorn worker 2 ── await client.submit() ──────────┘        (Unix socket)

Deploy it with ``gunicorn -c gunicorn_fastapi_conf.py`` in this directory. FastAPI,
uvicorn and uvicorn's gunicorn worker are not looppool dependencies: ``pip install
fastapi uvicorn uvicorn-worker``.

``python examples/server_fastapi.py`` runs the demo: it starts gunicorn with that
configuration on a free port, sends it HTTP requests until a batch has carried the
requests of both web workers, prints which web worker asked, which batch answered and
which web workers' requests shared each batch, reads the host's own count of batches,
stops gunicorn with SIGTERM and checks that the pool host and its worker have exited.
Without FastAPI installed it says what to install and exits.
"""

import contextlib
import os
import sys

import looppool
from looppool import remote
from shared_workers import BatchHasher, gunicorn_demo

try:
    import fastapi
    import fastapi.responses
    import uvicorn_worker  # noqa: F401 - gunicorn loads it by name
except ImportError:
    fastapi = None

# Made at import, in gunicorn's master (preload_app), and inherited by every web worker;
# it connects on its first call, in each web worker, on that worker's loop.
client = remote.connect(
    os.environ.get('POOL_ADDRESS') or remote.default_address(BatchHasher))


def create_app():
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.close()   # this web worker stops: its connection closes cleanly

    app = fastapi.FastAPI(lifespan=lifespan)

    @app.get('/hash')
    async def hash_password(password: str, salt: str = 'looppool-demo'):
        """The pool hashes ``password`` in a batch with whatever else reached it, while
        this web worker's loop serves other requests."""
        try:
            reply = await client.submit((password, salt, os.getpid()), timeout=10)
        except (remote.ConnectionLost, looppool.WorkerLost, looppool.PoolClosed) as error:
            # Expected now and then, and no bug: the host died (its keeper starts it
            # again, and the next call connects), the pool worker died, or the pool is
            # stopping. Ask the client to try again; log no traceback.
            return fastapi.responses.JSONResponse(
                {'error': str(error)}, status_code=503, headers={'Retry-After': '1'})
        except TimeoutError:
            return fastapi.responses.JSONResponse(
                {'error': 'the pool did not answer within 10 s'}, status_code=504)
        return dict(reply, web_pid=os.getpid())

    return app


app = create_app() if fastapi is not None else None


def shared_batch(replies):
    """Whether some batch carried the requests of more than one web worker."""
    return any(len(reply.get('batch_web_pids', ())) > 1 for reply in replies)


def report_batches(replies, address):
    """Print which web workers' requests each batch carried, and the host's own count of
    the batches (its ``stats()``); return whether the two agree and a batch was shared."""
    batches = {}
    for reply in replies:
        if reply['status'] == 200:
            batches[reply['pool_pid'], reply['batch']] = reply
    for reply in sorted(batches.values(), key=lambda reply: reply['batch']):
        print(f'batch {reply["batch"]} of pool worker {reply["pool_worker"]} carried '
              f'{reply["batch_size"]} requests of web workers '
              f'{", ".join(map(str, reply["batch_web_pids"]))}')
    shared = sum(len(reply['batch_web_pids']) > 1 for reply in batches.values())
    print(f'{shared} of {len(batches)} batches carried the requests of more than one '
          'web worker')
    stats_client = remote.connect_sync(address)
    try:
        counted = stats_client.stats()['batches']
    finally:
        stats_client.close()
    sizes = ', '.join(f'{count} of {size} message{"s" if size > 1 else ""}'
                      for size, count in counted['sizes'].items())
    print(f'the pool host handed {counted["messages"]} messages to handle_batch in '
          f'{counted["count"]} batches: {sizes}')
    answered = sum(reply['status'] == 200 for reply in replies)
    if counted['messages'] != answered or counted['count'] != len(batches):
        print(f'FAILED: {answered} requests were answered in {len(batches)} batches')
        return False
    return shared > 0


def main():
    if fastapi is None:
        print('this example needs FastAPI: pip install fastapi uvicorn uvicorn-worker')
        return 0
    return gunicorn_demo('gunicorn_fastapi_conf.py', pool_size=1, until=shared_batch,
                         report=report_batches)


if __name__ == '__main__':
    sys.exit(main())
