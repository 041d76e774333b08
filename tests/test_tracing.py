"""OpenTelemetry: the caller's trace context travels with each message, so the spans a
handler makes in a worker process are children of the caller's span: through a local
pool (submit, map, broadcast, put_nowait, put), and through a pool host's client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip('opentelemetry.sdk', reason='the tracing tests need opentelemetry-sdk')

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

import looppool  # noqa: E402
from conftest import run  # noqa: E402
from looppool import remote  # noqa: E402
from workers import Spanning  # noqa: E402

pytestmark = pytest.mark.timeout(90)

TRACER = TracerProvider().get_tracer('looppool-test-caller')


def _check(recorded: list[list[tuple[str, int, int | None]]], names: list[str],
           trace_id: int, span_id: int, untraced: str) -> None:
    spans = {name: (trace, parent) for spans in recorded for name, trace, parent in spans}
    for name in names:
        assert spans[f'handle {name}'] == (trace_id, span_id), (name, spans)
    # the inner span is the handler span's child: the context is the handler's own
    assert spans[f'inner {names[0]}'][0] == trace_id
    assert spans[f'inner {names[0]}'][1] != span_id
    # a message sent outside any span starts no trace of the caller's
    assert spans[f'handle {untraced}'][0] != trace_id
    assert spans[f'handle {untraced}'][1] is None


@pytest.mark.parametrize('start_method', ['fork', 'spawn'])
def test_spans_in_the_worker_are_children_of_the_callers(start_method: str) -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Spanning,
                                 mp_context=start_method) as pool:
            results: list[Any] = []
            pool.process_message = lambda result, done: (results.append(result), done())
            with TRACER.start_as_current_span('caller') as span:
                context = span.get_span_context()
                assert await pool.submit('a') == 'a'
                assert await pool.broadcast('b') == ['b', 'b']
                assert [reply async for reply in pool.map(['c', 'd'])] == ['c', 'd']
                pool.put_nowait('e')
                await pool.put('f')
            assert await pool.submit('z') == 'z'   # no span current
            deadline = asyncio.get_running_loop().time() + 10
            while len(results) < 2 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert sorted(results) == ['e', 'f']
            recorded = await pool.broadcast('spans')
            _check(recorded, ['a', 'b', 'c', 'd', 'e', 'f'], context.trace_id,
                   context.span_id, 'z')
    run(main())


def test_spans_cross_a_pool_host(sock_path: str) -> None:
    handle = remote.serve(Spanning, sock_path, pool_size=2, mp_context='fork')
    try:
        async def main() -> None:
            async with remote.connect(sock_path) as client:
                with TRACER.start_as_current_span('caller') as span:
                    context = span.get_span_context()
                    assert await client.submit('a') == 'a'
                    assert await client.broadcast('b') == ['b', 'b']
                assert await client.submit('z') == 'z'
                recorded = await client.broadcast('spans')
                _check(recorded, ['a', 'b'], context.trace_id, context.span_id, 'z')
        run(main())
    finally:
        handle.stop()


def test_a_worker_without_opentelemetry_gets_the_bare_message(monkeypatch: Any) -> None:
    """Unpickled where OpenTelemetry is missing, a traced message is the message itself."""
    from looppool import tracing
    from looppool.protocol import dumps, loads
    with TRACER.start_as_current_span('caller'):
        traced = tracing.outgoing({'n': 1})
    assert isinstance(traced, tracing.Traced) and 'traceparent' in traced.carrier
    payload = dumps(traced)
    monkeypatch.setattr(tracing, 'ENABLED', False)
    assert loads(payload) == {'n': 1}


def test_a_batch_worker_gets_traced_messages_bare() -> None:
    """A batch holds the messages of many callers, so handle_batch runs in none of their
    trace contexts: it gets each message as it was sent."""
    from workers import Batched

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Batched, batch_size=3,
                                 batch_timeout=30) as pool:
            async def mapped() -> list[Any]:
                return [reply async for reply in pool.map(['c'])]

            with TRACER.start_as_current_span('caller'):
                a, b, c = await asyncio.gather(pool.submit('a'), pool.submit(('b',)),
                                               mapped())
            assert [reply[:3] for reply in [a, b, *c]] == \
                [('a', 1, 3), (('b',), 1, 3), ('c', 1, 3)]

    run(main())
