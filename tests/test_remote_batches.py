"""A pool host's clients in bulk: submit() bursts in C_TASKS frames, replies in H_REPLIES
frames, map() on both clients, and what fails alone."""

from __future__ import annotations

import asyncio
import operator
import pickle
import select
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from looppool import remote
from conftest import run, wait_until
from workers import Echo

pytestmark = pytest.mark.timeout(90)


class UnpicklesBadly:
    """Pickles anywhere; unpickling it raises ZeroDivisionError (in the host)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return operator.truediv, (1, 0)


@pytest.fixture
def host(sock_path):
    handle = remote.serve(Echo, sock_path, pool_size=2)
    yield handle
    handle.stop()


@pytest.fixture
def small_host(sock_path):
    """A host whose clients may each have only 8 messages out: bursts outgrow it."""
    handle = remote.serve(Echo, sock_path, pool_size=2, max_tasks=8)
    yield handle
    handle.stop()


def test_a_burst_far_over_the_share_answers_every_caller_in_order(small_host) -> None:
    async def main() -> None:
        async with remote.connect(small_host.address) as client:
            futures = [client.submit(('sleep', 0, index)) for index in range(5000)]
            assert [await future for future in futures] == list(range(5000))
            stats = await client.stats()
            assert stats['completed'] >= 5000 and stats['failed'] == 0

    run(main())


def test_a_burst_calls_process_message_only_once_the_caller_awaits(small_host) -> None:
    """A long burst reads the host's replies while the caller submits (so that the rest
    of it can leave); the results of _put_nowait that come with them wait for the loop:
    process_message never runs inside submit()."""
    async def main() -> None:
        results: list[Any] = []
        async with remote.connect(small_host.address) as client:
            client.process_message = lambda result, done: (results.append(result), done())
            futures = [client.submit(('put', index)) for index in range(1100)]
            # The first went at once; once the host's answer to it is here to be read,
            # the rest of the burst reads it (and more) while it goes on.
            assert select.select([client._connection.fd], [], [], 30)[0]
            futures += [client.submit(('put', index)) for index in range(1100, 3000)]
            assert sum(future.done() for future in futures) > 0   # replies were read
            assert results == []   # but nothing ran inside the 3,000 submit() calls
            assert [await future for future in futures] == [1] * 3000
            await wait_until(lambda: len(results) == 3000, what='every result')
            assert sorted(results) == list(range(3000))

    run(main())


def test_a_message_that_cannot_be_pickled_fails_alone(host) -> None:
    async def main(address: str) -> None:
        async with remote.connect(address) as client:
            futures = [client.submit(1), client.submit(lambda: 2), client.submit(3)]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            assert outcomes[0] == 1 and outcomes[2] == 3
            assert isinstance(outcomes[1], (pickle.PicklingError, AttributeError))
            assert await client.submit('next') == 'next'

    run(main(host.address))


def test_a_batch_the_host_cannot_unpickle_is_sent_again_so_only_the_bad_message_fails(
        host) -> None:
    async def main() -> None:
        async with remote.connect(host.address) as client:
            futures = [client.submit(1), client.submit(UnpicklesBadly()), client.submit(3)]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            assert outcomes[0] == 1 and outcomes[2] == 3, outcomes
            assert isinstance(outcomes[1], pickle.UnpicklingError), outcomes[1]
            assert 'ZeroDivisionError' in str(outcomes[1])
            assert [reply async for reply in client.map(range(10))] == list(range(10))

    run(main())
    client = remote.connect_sync(host.address)
    try:
        replies = client.map([1, UnpicklesBadly(), 3])
        assert next(replies) == 1
        with pytest.raises(pickle.UnpicklingError, match='ZeroDivisionError'):
            next(replies)
        assert list(client.map([4, 5])) == [4, 5]
    finally:
        client.close()


def test_cancelled_tasks_give_the_client_its_share_back(small_host) -> None:
    """A task the caller cancels is answered by the host at once: its share comes back.
    (Were it not, eight cancels would leave the client unable to send anything.)"""
    async def main() -> None:
        async with remote.connect(small_host.address) as client:
            for _ in range(3):
                doomed = [client.submit(('sleep', 30)) for _ in range(8)]
                deadline = time.monotonic() + 30
                while (await client.stats())['in_flight'] < 8:   # the share is used up
                    assert time.monotonic() < deadline, 'the eight tasks never started'
                    await asyncio.sleep(0.01)
                for future in doomed:
                    future.cancel()
                assert await asyncio.wait_for(client.submit('after'), 10) == 'after'
            stats = await client.stats()
            assert stats['cancelled'] == 24

    run(main())


async def _countdown(count: int) -> AsyncIterator[int]:
    for value in range(count, 0, -1):
        await asyncio.sleep(0)
        yield value


def test_map_on_the_async_client(small_host) -> None:
    async def main() -> None:
        async with remote.connect(small_host.address) as client:
            assert [reply async for reply in client.map(range(3000))] == list(range(3000))
            assert [reply async for reply in client.map(_countdown(50))] == \
                list(range(50, 0, -1))
            assert [reply async for reply in client.map([])] == []
            # An error at its place, after the replies before it; the rest is cancelled.
            seen = []
            with pytest.raises(KeyError, match='third'):
                async for reply in client.map(['a', 'b', ('raise', KeyError('third')),
                                               *[('cancellable', 30)] * 5]):
                    seen.append(reply)
            assert seen == ['a', 'b']
            await wait_until(lambda: client._unacked == 0,
                             what='the cancelled messages to be answered')
            assert [reply async for reply in client.map('xyz')] == ['x', 'y', 'z']
            # Awaited: the list of the replies, or the first error, the rest cancelled.
            assert await client.map(range(3000)) == list(range(3000))
            assert await client.map(_countdown(5)) == [5, 4, 3, 2, 1]
            with pytest.raises(KeyError, match='third'):
                await client.map(['a', 'b', ('raise', KeyError('third')),
                                  *[('cancellable', 30)] * 5])
            await wait_until(lambda: client._unacked == 0,
                             what='the cancelled messages to be answered')
            assert await client.map([]) == []

    run(main())


def test_map_on_the_sync_client(small_host) -> None:
    client = remote.connect_sync(small_host.address)
    try:
        assert list(client.map(range(3000))) == list(range(3000))
        assert list(client.map(iter([]))) == []
        replies = client.map(['a', ('raise', KeyError('second')), *[('sleep', 30)] * 5])
        assert next(replies) == 'a'
        with pytest.raises(KeyError, match='second'):
            next(replies)
        # The five sleeps were cancelled: the share is free again for a full map.
        assert list(client.map(range(100))) == list(range(100))
        assert client.stats()['cancelled'] >= 5
    finally:
        client.close()


def test_results_of_concurrent_bursts_reach_their_own_clients(host) -> None:
    """Two clients' bursts share the workers' batches; each _put_nowait result still goes
    to the client whose message was being handled."""
    async def burst(name: str) -> list[Any]:
        results: list[Any] = []
        async with remote.connect(host.address) as client:
            client.process_message = lambda result, done: (results.append(result), done())
            for _ in range(3):
                futures = [client.submit(('put', (name, index))) for index in range(2000)]
                assert [await future for future in futures] == [1] * 2000
                await asyncio.sleep(0)
            await wait_until(lambda: len(results) >= 6000, what=f'the results of {name}')
        return results

    async def main() -> None:
        first, second = await asyncio.gather(burst('first'), burst('second'))
        assert {name for name, _ in first} == {'first'}
        assert {name for name, _ in second} == {'second'}
        assert len(first) == len(second) == 6000

    run(main())
