"""Batch handlers: a Worker with handle_batch gets its messages in batches, formed in the
worker from whatever reached it (the messages of several clients of a pool host too),
handed over when full or ``batch_timeout`` after the first message; replies in order,
failures of a whole batch or of one message, cancellation, stop, and the numbers in
stats() and statsd."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from typing import Any

import pytest
import statsd

import looppool
from conftest import run, wait_until
from looppool import remote
from looppool.errors import RemoteTraceback
from test_metrics import UdpSink
from workers import Batched, Classic, Echo

pytestmark = pytest.mark.timeout(60)

# A batch_timeout no test waits for: a batch that must not be handed over on time alone.
NEVER = 30.0


def batched(batch_size: int, batch_timeout: float = NEVER, results: list[Any] | None = None,
            pool_size: int = 1, **options: Any) -> looppool.Pool:
    """A pool of :class:`Batched` workers; ``results`` collects what reaches
    ``process_message``."""
    pool = looppool.Pool(pool_size=pool_size, worker_class=Batched, batch_size=batch_size,
                         batch_timeout=batch_timeout, **options)
    if results is not None:
        pool.process_message = lambda result, done: (results.append(result), done())
    return pool


async def outcomes_of(pool: looppool.Pool, *messages: Any) -> list[Any]:
    """What each message's submit() ended in: its reply, or its exception."""
    return await asyncio.gather(*map(pool.submit, messages), return_exceptions=True)


def batches_of(replies: list[Any]) -> dict[int, list[Any]]:
    """The messages of each batch, by batch number, in the order of ``replies``."""
    found: dict[int, list[Any]] = {}
    for message, number, _, _ in replies:
        found.setdefault(number, []).append(message)
    return found


def test_a_full_batch_goes_at_once_and_a_lone_message_after_the_timeout() -> None:
    async def main() -> None:
        async with batched(4) as pool:
            # Full: handed over when the fourth message arrives, long before the timeout.
            replies = await asyncio.wait_for(
                asyncio.gather(*[pool.submit(i) for i in range(4)]), 10)
            assert [(message, size) for message, _, size, _ in replies] == \
                [(i, 4) for i in range(4)]
            assert len(batches_of(replies)) == 1
        async with batched(64, 0.2) as pool:
            # Alone: handed over once batch_timeout passed since it arrived, not before.
            began = time.monotonic()
            assert (await pool.submit('alone'))[:3] == ('alone', 1, 1)
            took = time.monotonic() - began
            assert 0.2 <= took < 2.0, took

    run(main())


@pytest.mark.parametrize('start_method', ['forkserver', 'spawn'])
def test_batches_under_every_start_method(start_method: str) -> None:
    async def main() -> None:
        async with batched(4, mp_context=start_method) as pool:
            replies = await asyncio.gather(*[pool.submit(i) for i in range(4)])
            assert [(message, size) for message, _, size, _ in replies] == \
                [(i, 4) for i in range(4)]

    run(main())


def test_replies_answer_their_messages_in_order() -> None:
    async def main() -> None:
        async with batched(8, 0.05) as pool:
            replies = await asyncio.gather(*[pool.submit(i) for i in range(100)])
            assert [reply[0] for reply in replies] == list(range(100))
            for number, messages in batches_of(replies).items():
                assert messages == sorted(messages) and 1 <= len(messages) <= 8, number
                assert all(reply[2] == len(messages) for reply in replies
                           if reply[1] == number)
            # map(): its chunks' messages join batches too, and the order holds.
            mapped = [reply async for reply in pool.map(range(300), chunksize=7)]
            assert [reply[0] for reply in mapped] == list(range(300))
            assert max(reply[2] for reply in mapped) <= 8
            # A tuple is a list of replies too.
            replies = await asyncio.gather(*[pool.submit(m) for m in ('a', ('tuple',))])
            assert [reply[0] for reply in replies] == ['a', ('tuple',)]
            stats = pool.stats()
            assert stats['batches']['messages'] == stats['completed'] == 402
            assert sum(stats['batches']['sizes'].values()) == stats['batches']['count']
            assert stats['workers'][0]['batches'] == stats['batches']['count']

    run(main())


def test_a_batch_that_raises_fails_each_of_its_messages() -> None:
    async def main() -> None:
        async with batched(3) as pool:
            for error in await outcomes_of(pool, 'a', ('raise', KeyError('the model broke')),
                                           'c'):
                assert type(error) is KeyError and error.args == ('the model broke',)
                assert isinstance(error.__cause__, RemoteTraceback)
                assert 'in handle_batch' in str(error.__cause__)
            # The worker goes on.
            assert [r[0] for r in await asyncio.gather(*map(pool.submit, 'xyz'))] == \
                list('xyz')
            assert pool.stats()['failed'] == 3

    run(main())


def test_one_message_fails_alone_when_its_reply_is_an_exception() -> None:
    async def main() -> None:
        async with batched(4) as pool:
            outcomes = await outcomes_of(pool, 'a', ('fail', ValueError('no such word')),
                                         ('lambda',), 'd')
            assert outcomes[0][:3] == ('a', 1, 4) and outcomes[3][:3] == ('d', 1, 4)
            assert type(outcomes[1]) is ValueError
            assert outcomes[1].args == ('no such word',)
            assert isinstance(outcomes[1].__cause__, RemoteTraceback)
            # A reply that cannot be pickled fails its own message too.
            assert isinstance(outcomes[2], pickle.PicklingError)
            assert pool.stats()['failed'] == 2

    run(main())


def test_a_numpy_array_is_a_list_of_replies() -> None:
    pytest.importorskip('numpy')

    async def main() -> None:
        async with batched(3) as pool:
            assert await outcomes_of(pool, 'ab', 'abc', ('array',)) == [2, 3, 10]

    run(main())


@pytest.mark.parametrize('command, error, words', [
    (('short',), ValueError, 'returned 2 replies for a batch of 3 messages'),
    (('dict',), TypeError, 'must return a list with one reply per message'),
])
def test_a_wrong_return_value_fails_each_message_clearly(command: tuple[str], error: type,
                                                         words: str) -> None:
    async def main() -> None:
        async with batched(3) as pool:
            for outcome in await outcomes_of(pool, 'a', command, 'c'):
                assert type(outcome) is error, outcome
                assert words in str(outcome) and 'Batched.handle_batch()' in str(outcome)
            after = await asyncio.gather(*[pool.submit(('after', i)) for i in range(3)])
            assert [reply[0] for reply in after] == [('after', i) for i in range(3)]

    run(main())


def test_a_cancelled_message_leaves_its_batch() -> None:
    cancelled: list[Any] = []

    async def main() -> None:
        async with batched(3, results=cancelled) as pool:
            # Timed out while its batch forms: answered at once, and left out of it.
            with pytest.raises(TimeoutError):
                await pool.submit('late', timeout=0.2)
            replies = await asyncio.wait_for(
                asyncio.gather(*[pool.submit(i) for i in range(3)]), 10)
            assert [(m, size) for m, _, size, _ in replies] == [(0, 3), (1, 3), (2, 3)]
            # Every message of a running batch gave up: the batch is cancelled.
            doomed = [pool.submit(('sleep', NEVER), timeout=0.3),
                      pool.submit('x', timeout=0.3), pool.submit('y', timeout=0.3)]
            for outcome in await asyncio.gather(*doomed, return_exceptions=True):
                assert isinstance(outcome, TimeoutError)
            await wait_until(lambda: cancelled, what='the batch to be cancelled')
            assert cancelled == [('batch cancelled', 3)]
            after = await asyncio.gather(*[pool.submit(('after', i)) for i in range(3)])
            assert [reply[0] for reply in after] == [('after', i) for i in range(3)]

    run(main())


def test_stop_hands_over_a_forming_batch_at_once() -> None:
    async def main() -> None:
        pool = batched(64)
        await pool.start()
        waiting = [pool.submit(i) for i in range(3)]
        await wait_until(lambda: pool.stats()['workers'][0]['queued'] == 0,
                         what='the worker to take the messages into its batch')
        await asyncio.wait_for(pool.stop(), 10)
        replies = [future.result() for future in waiting]
        assert [(message, size) for message, _, size, _ in replies] == \
            [(0, 3), (1, 3), (2, 3)]

    run(main())


def test_pause_hands_over_a_forming_batch_and_waits_for_it() -> None:
    async def main() -> None:
        async with batched(64) as pool:
            waiting = pool.submit('before the pause')
            await wait_until(lambda: pool.stats()['workers'][0]['queued'] == 0,
                             what='the worker to take the message into its batch')
            await asyncio.wait_for(pool.pause(), 10)
            assert waiting.done() and waiting.result()[:3] == ('before the pause', 1, 1)
            later = pool.submit('while paused')
            await pool.resume()
            await asyncio.wait_for(pool.stop(), 10)   # hands over the forming batch
            assert later.result()[:3] == ('while paused', 2, 1)

    run(main())


def test_a_message_in_a_forming_batch_has_started_and_is_lost_with_its_worker() -> None:
    """What a worker took into a forming batch counts as started: when the worker dies,
    it fails with WorkerLost and does not run again elsewhere."""
    async def main() -> None:
        async with batched(64, pool_size=2) as pool:
            doomed = pool.submit('doomed', worker_num=0)
            await wait_until(lambda: pool.stats()['workers'][0]['queued'] == 0 and
                             pool.stats()['workers'][0]['in_flight'] == 1,
                             what='the message to wait in a forming batch')
            os.kill(pool.stats()['workers'][0]['pid'], signal.SIGKILL)
            with pytest.raises(looppool.WorkerLost):
                await doomed
            assert pool.stats()['completed'] == 0

    run(main())


def test_notes_join_batches_and_their_replies_reach_process_message() -> None:
    results: list[Any] = []

    async def main() -> None:
        async with batched(4, results=results) as pool:
            for i in range(4):
                pool.put_nowait(i)
            await wait_until(lambda: len(results) == 4, what='four results')
            assert [(m, size) for m, _, size, _ in results] == [(i, 4) for i in range(4)]

    run(main())


def test_batch_sizes_reach_statsd() -> None:
    sink = UdpSink()
    client = statsd.StatsClient('127.0.0.1', sink.port, prefix='app')

    async def main() -> None:
        async with batched(5, statsd=client, statsd_interval=0.2) as pool:
            await asyncio.gather(*[pool.submit(i) for i in range(10)])
            assert pool.stats()['batches'] == {'count': 2, 'messages': 10,
                                               'sizes': {5: 2}}
            await wait_until(lambda: any(name == 'app.looppool.batches.handed'
                                         for name, _, _ in sink.metrics()),
                             what='a report of the batches')

    try:
        run(main())
        metrics = sink.metrics()
    finally:
        client.close()
        sink.close()
    counted = {name: 0.0 for name, _, kind in metrics if kind == 'c'}
    for name, value, kind in metrics:
        if kind == 'c':
            counted[name] += value
    assert counted['app.looppool.batches.handed'] == 2
    assert counted['app.looppool.batches.messages'] == 10
    gauges = {name: value for name, value, kind in metrics if kind == 'g'}
    assert gauges['app.looppool.batches.mean_size'] == 5
    assert gauges['app.looppool.batches.max_size'] == 5


def test_batch_sizes_reach_prometheus() -> None:
    prometheus_client = pytest.importorskip('prometheus_client')
    from looppool.metrics import PrometheusCollector

    async def main() -> str:
        async with batched(4) as pool:
            await asyncio.gather(*[pool.submit(i) for i in range(8)])
            await asyncio.gather(*[pool.submit(i) for i in range(3)], pool.submit(
                ('fail', ValueError('alone'))), return_exceptions=True)
            registry = prometheus_client.CollectorRegistry()
            registry.register(PrometheusCollector(pool))
            return str(prometheus_client.generate_latest(registry).decode())

    text = run(main())
    samples = {(sample.name, sample.labels.get('le')): sample.value
               for family in text_families(text) for sample in family.samples
               if family.name == 'looppool_batch_size'}
    # Three batches of 4 (one holds the message that failed alone): 12 messages.
    assert samples[('looppool_batch_size_count', None)] == 3
    assert samples[('looppool_batch_size_sum', None)] == 12
    assert samples[('looppool_batch_size_bucket', '2.0')] == 0
    assert samples[('looppool_batch_size_bucket', '4.0')] == 3
    assert samples[('looppool_batch_size_bucket', '+Inf')] == 3


def text_families(text: str) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families
    return list(text_string_to_metric_families(text))


def test_the_messages_of_several_host_clients_share_a_batch(sock_path: str) -> None:
    """Batches form in the pool worker from whatever reached it: here one batch of six
    holds the messages of two clients, three each."""
    handle = remote.serve(Batched, sock_path, pool_size=1, batch_size=6,
                          batch_timeout=NEVER)

    async def main() -> None:
        async with remote.connect(handle.address) as first, \
                remote.connect(handle.address) as second:
            replies = await asyncio.wait_for(asyncio.gather(
                *[first.submit(('first', i)) for i in range(3)],
                *[second.submit(('second', i)) for i in range(3)]), 20)
            assert {number for _, number, _, _ in replies} == {1}
            assert {size for _, _, size, _ in replies} == {6}
            assert [message for message, *_ in replies] == \
                [('first', 0), ('first', 1), ('first', 2),
                 ('second', 0), ('second', 1), ('second', 2)]
            stats = await first.stats()
            assert stats['batches'] == {'count': 1, 'messages': 6, 'sizes': {6: 1}}

    try:
        run(main())
    finally:
        handle.stop()


def test_the_options_are_checked_where_they_enter(sock_path: str) -> None:
    with pytest.raises(TypeError, match='batch_size is for a Worker that overrides '
                                        'handle_batch'):
        looppool.Pool(pool_size=1, worker_class=Echo, batch_size=8)
    with pytest.raises(TypeError, match='batch_timeout is for a Worker'):
        looppool.Pool(pool_size=1, worker_class=Echo, batch_timeout=0.1)

    class Both(Classic):
        async def handle_batch(self, messages: list[Any]) -> list[Any]:
            return messages

    with pytest.raises(TypeError, match='both handle_batch'):
        looppool.Pool(pool_size=1, worker_class=Both)
    for value in (0, -1):
        with pytest.raises(ValueError, match=f'batch_size must be at least 1, got {value}'):
            looppool.Pool(pool_size=1, worker_class=Batched, batch_size=value)
    for value in (2.5, True, '8'):
        with pytest.raises(TypeError, match='batch_size must be an int'):
            looppool.Pool(pool_size=1, worker_class=Batched, batch_size=value)
    for value in (-0.1, float('inf'), float('nan')):
        with pytest.raises(ValueError, match='batch_timeout must be a finite number'):
            looppool.Pool(pool_size=1, worker_class=Batched, batch_timeout=value)
    with pytest.raises(TypeError, match='batch_timeout must be a number of seconds'):
        looppool.Pool(pool_size=1, worker_class=Batched, batch_timeout='1')
    with pytest.raises(ValueError, match=r'share of max_tasks \(64 // 2 workers = 32'):
        looppool.Pool(pool_size=2, worker_class=Batched, max_tasks=64, batch_size=33)
    # serve() and shared() check them in the caller, before any process starts.
    with pytest.raises(TypeError, match='batch_size is for a Worker'):
        remote.serve(Echo, sock_path, pool_size=1, batch_size=8)
    with pytest.raises(ValueError, match='batch_size must be at least 1'):
        remote.shared(Batched, sock_path, pool_size=1, batch_size=0)
    # The defaults: 64 messages, 5 ms, or the worker's share of max_tasks if smaller.
    assert looppool.Pool(pool_size=1, worker_class=Batched)._batch_config() == (64, 0.005)
    assert looppool.Pool(pool_size=2, worker_class=Batched, max_tasks=40,
                         batch_timeout=0)._batch_config() == (20, 0.0)
    assert looppool.Pool(pool_size=1, worker_class=Echo)._batch_config() == (0, 0.0)


def test_a_pool_without_batches_says_nothing_of_them() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            await pool.submit(1)
            stats = pool.stats()
            assert 'batches' not in stats and 'batches' not in stats['workers'][0]

    run(main())


def test_a_map_chunk_goes_to_handle_batch_in_pieces_at_once() -> None:
    # A chunk of map() is a batch's worth of messages read together: it is cut into
    # pieces of batch_size, each handed over at once; the last, short piece does not wait
    # for batch_timeout (NEVER here) or for other messages.
    async def main() -> None:
        async with batched(4) as pool:
            replies = await asyncio.wait_for(collect(pool, range(10), chunksize=10), 10)
            assert [reply[0] for reply in replies] == list(range(10))
            assert list(batches_of(replies).values()) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
            assert [reply[2] for reply in replies] == [4] * 8 + [2] * 2
            stats = pool.stats()
            assert stats['batches']['sizes'] == {4: 2, 2: 1}, stats['batches']
            assert stats['completed'] == 10

    run(main())


def test_a_map_chunk_takes_the_batch_forming_with_it() -> None:
    # 'a' forms a batch of 1 (of 4); the chunk's two messages join it, and it goes at
    # once with them, not batch_timeout (NEVER) after 'a' arrived.
    async def main() -> None:
        async with batched(4) as pool:
            alone = pool.submit('a')
            mapped = await asyncio.wait_for(collect(pool, ['b', 'c'], chunksize=2), 10)
            assert [reply[:3] for reply in [await alone, *mapped]] == \
                [('a', 1, 3), ('b', 1, 3), ('c', 1, 3)]
            # A chunk larger than the room left: the rest goes in pieces of its own.
            alone = pool.submit('d')
            mapped = await asyncio.wait_for(collect(pool, list('efghijk'), chunksize=7),
                                            10)
            assert [reply[:3] for reply in [await alone, *mapped]] == \
                [(m, 2, 4) for m in 'defg'] + [(m, 3, 4) for m in 'hijk']

    run(main())


def test_a_map_piece_fails_in_its_places() -> None:
    async def main() -> None:
        async with batched(2) as pool:
            # handle_batch raises: each message of its piece fails, the first in its place.
            got = []
            with pytest.raises(KeyError, match='the model broke') as raised:
                async for reply in pool.map(['a', 'b', 'c', ('raise', KeyError('the model broke'))],
                                            chunksize=4):
                    got.append(reply[0])
            assert got == ['a', 'b']
            assert 'in handle_batch' in str(raised.value.__cause__)
            # A reply that is an exception fails its message alone.
            got = []
            with pytest.raises(ValueError, match='no such word'):
                async for reply in pool.map(['a', 'b', 'c', ('fail', ValueError('no such word'))],
                                            chunksize=4):
                    got.append(reply[0])
            assert got == ['a', 'b', 'c']
            # A piece that suspends, among pieces that do not.
            replies = await collect(pool, ['a', ('sleep', 0.05), 'c', 'd', 'e'], chunksize=5)
            assert [reply[0] for reply in replies] == ['a', ('sleep', 0.05), 'c', 'd', 'e']

    run(main())


def test_leaving_map_early_cancels_its_suspended_pieces() -> None:
    async def main() -> None:
        results: list[Any] = []
        async with batched(2, results=results) as pool:
            replies = pool.map(['a', 'b', ('sleep', 30), 'd', 'e', 'f'], chunksize=2)
            async for reply in replies:
                assert reply[0] == 'a'
                break
            await replies.aclose()
            await wait_until(lambda: pool.stats()['in_flight'] == 0, what='in_flight 0')
            await wait_until(lambda: ('batch cancelled', 2) in results,
                             what='the sleeping batch cancelled')
            assert (await collect(pool, ['still', 'here']))[1][0] == 'here'

    run(main())


async def collect(pool: looppool.Pool, messages: Any, **options: Any) -> list[Any]:
    return [reply async for reply in pool.map(messages, **options)]
