"""The server examples answer the pool's expected failures as a web service should.

``ConnectionLost`` (the pool host is being restarted), ``WorkerLost`` (the pool worker
running the request died) and ``PoolClosed`` (the pool is stopping) are 503 with
``Retry-After``; a ``TimeoutError`` is 504; none of them logs a traceback. Each example's
own request handler runs here: with a stand-in client that raises each error as the real
clients raise it, and, for the gunicorn application, with the real client against a real
host whose pool worker is killed mid-request and which is then stopped.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

import looppool
from looppool import remote
from conftest import run, wait_for

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parent.parent / 'examples'

EXPECTED = [
    (remote.ConnectionLost('the pool host at x closed the connection'), 503),
    (looppool.WorkerLost('worker 0 (pid 1) died with signal 9 (SIGKILL)', 0, 1, -9), 503),
    (looppool.WorkerStartError('worker 0 (pid 1) could not start', 0, 1, 1), 503),
    (looppool.PoolClosed('the pool host is stopping'), 503),
    (TimeoutError('no answer within 10 s'), 504),
]
IDS = ['ConnectionLost', 'WorkerLost', 'WorkerStartError', 'PoolClosed', 'TimeoutError']


@pytest.fixture
def examples(monkeypatch):
    """Import an example by name, from examples/."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


def _no_tracebacks(caplog) -> None:
    logged = [record for record in caplog.records if record.exc_info]
    assert logged == [], [record.getMessage() for record in logged]


class FakeSyncClient:
    """Stands in for a SyncClient: ``submit`` raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def submit(self, message: Any, timeout: float | None = None) -> Any:
        raise self.error


def _call_wsgi(app, query: str = 'password=secret') -> tuple[str, dict[str, str], Any]:
    answer: dict[str, Any] = {}

    def start_response(status, headers):
        answer['status'], answer['headers'] = status, dict(headers)

    body = b''.join(app({'PATH_INFO': '/hash', 'QUERY_STRING': query}, start_response))
    return answer['status'], answer['headers'], json.loads(body)


@pytest.mark.parametrize('error,status', EXPECTED, ids=IDS)
@pytest.mark.parametrize('name,app', [('server_gunicorn', 'app'),
                                      ('server_uwsgi', 'application')])
def test_wsgi_recipes_map_pool_errors(examples, monkeypatch, caplog, name, app, error,
                                      status) -> None:
    module = examples(name)
    monkeypatch.setattr(module, 'client', FakeSyncClient(error))
    with caplog.at_level(logging.DEBUG):
        line, headers, document = _call_wsgi(getattr(module, app))
    assert line.split()[0] == str(status)
    assert ('Retry-After' in headers) == (status == 503), headers
    assert document['error']
    _no_tracebacks(caplog)


@pytest.mark.parametrize('error,status', EXPECTED, ids=IDS)
def test_the_tornado_recipe_maps_pool_errors(examples, caplog, error, status) -> None:
    module = examples('server_tornado')

    class FakeClient:
        async def submit(self, message: Any, timeout: float | None = None) -> Any:
            raise error

    async def main() -> tornado.httpclient.HTTPResponse:
        app = tornado.web.Application([(r'/hash', module.HashHandler,
                                        {'pool': FakeClient()})])
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets([sock])
        client = tornado.httpclient.AsyncHTTPClient()
        try:
            return await client.fetch(f'http://127.0.0.1:{port}/hash?password=secret',
                                      raise_error=False, request_timeout=10)
        finally:
            client.close()
            server.stop()
            await server.close_all_connections()

    with caplog.at_level(logging.DEBUG):
        response = run(main())
    assert response.code == status, response.body
    assert (response.headers.get('Retry-After') == '1') == (status == 503)
    assert json.loads(response.body)['error']
    _no_tracebacks(caplog)


@pytest.mark.parametrize('error,status', EXPECTED, ids=IDS)
def test_the_flask_recipe_maps_pool_errors(examples, monkeypatch, caplog, error,
                                           status) -> None:
    pytest.importorskip('flask')
    module = examples('server_flask')
    client = FakeSyncClient(error)
    client.created_new_pool = False   # type: ignore[attr-defined]
    monkeypatch.setattr(module.remote, 'shared', lambda *args, **kwargs: client)
    with caplog.at_level(logging.DEBUG):
        response = module.create_app().test_client().get('/hash?password=secret')
    assert response.status_code == status
    assert ('Retry-After' in response.headers) == (status == 503)
    _no_tracebacks(caplog)


def test_the_gunicorn_recipe_with_a_real_host(examples, monkeypatch, caplog, tmp_path) -> None:
    """The real client raises WorkerLost when the pool worker dies mid-request, and
    ConnectionLost once no host answers: both reach the user as a 503."""
    module = examples('server_gunicorn')
    shared_workers = examples('shared_workers')
    # Many more rounds, so that a request is still hashing when its worker is killed. The
    # host is forked from this process after this, so it hashes with them too.
    monkeypatch.setattr(shared_workers, 'ROUNDS', 100_000_000)
    directory = tmp_path / 'run'
    directory.mkdir(mode=0o700)
    address = str(directory / 'pool.sock')
    host = remote.serve(shared_workers.PasswordHasher, address, pool_size=1,
                        mp_context='fork', restart=False)
    client = remote.connect_sync(address)
    monkeypatch.setattr(module, 'client', client)
    try:
        answers: list[Any] = []

        def ask() -> None:
            try:
                answers.append(_call_wsgi(module.app))
            except BaseException as exc:   # the application let it out: a 500, logged
                answers.append(exc)

        request = threading.Thread(target=ask)
        with caplog.at_level(logging.DEBUG):
            request.start()
            wait_for(lambda: client.stats()['in_flight'] == 1, 10, 'the request to arrive')
            os.kill(client.stats()['workers'][0]['pid'], signal.SIGKILL)
            request.join(10)
            host.stop()
            ask()
        assert not any(isinstance(answer, BaseException) for answer in answers), answers
        (lost_status, lost_headers, lost), (gone_status, gone_headers, gone) = answers
        assert lost_status.startswith('503') and 'Retry-After' in lost_headers, lost
        assert 'died with signal 9' in lost['error']
        assert gone_status.startswith('503') and 'Retry-After' in gone_headers, gone
        assert 'could not connect' in gone['error']
        _no_tracebacks(caplog)
    finally:
        client.close()
        host.stop()
