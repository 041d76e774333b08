"""The frame limit: a frame's payload length is a uint32, so one pickle carries at most
4 GiB less one byte, in each direction.

Two tests cross the real limit, with a message and a reply that pickle to exactly one byte
more (each costs a 4 GiB pickle, about ten seconds here, and 4 GiB of memory). The others
lower the limit to 1 MiB, in this process and in the workers, which are forked from it
and so inherit the lowered module constant: the same code paths, at a size a test can
afford many times.

Big buffers through shared memory (looppool.shm) are turned off here: a buffer that goes
that way crosses the socket as a descriptor, and the limit does not apply to it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

import looppool
import looppool.channel
import looppool.shm
from conftest import run, wait_until
from looppool.errors import RemoteTraceback
from looppool.protocol import dumps

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every payload in the socket (the pool reads the setting when it is made, and
    passes it to its workers)."""
    monkeypatch.setattr(looppool.shm, 'THRESHOLD', 0)

REAL_LIMIT = 2 ** 32 - 1
LIMIT = 1 << 20       # the lowered limit
UNDER = 600 * 1024    # one such payload fits, two together do not
OVER = LIMIT + 1


def message_of(pickled_size: int) -> bytes:
    """A bytes object that pickles, on its own, to exactly ``pickled_size`` bytes (at least
    64 KiB, where the pickle's overhead is the same for every size); its pages are not
    touched until it is pickled."""
    overhead = len(dumps(bytes(1 << 20))) - (1 << 20)
    message = bytes(pickled_size - overhead)
    if pickled_size < 1 << 24:
        assert len(dumps(message)) == pickled_size
    return message


class Sizes(looppool.Worker):
    async def handle(self, message: Any) -> Any:
        if isinstance(message, bytes):
            return len(message)   # it came in whole
        kind, size = message
        if kind == 'reply':
            return message_of(size)
        if kind == 'put':
            try:
                self._put_nowait(message_of(size))
            except ValueError as exc:
                return f'ValueError: {exc}'
            return 'sent'
        return os.getpid()


# -- the real limit ----------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_message_one_byte_over_4_gib_fails_alone_and_the_worker_goes_on() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Sizes) as pool:
            pid = await pool.submit(('pid', 0))
            with pytest.raises(ValueError, match=f'pickled, it is {REAL_LIMIT + 1} bytes: '
                                                 f'more than one frame carries '
                                                 f'\\({REAL_LIMIT} bytes'):
                await pool.submit(message_of(REAL_LIMIT + 1))
            assert await pool.submit(('pid', 0)) == pid
            stats = pool.stats()
            assert stats['in_flight'] == 0 and stats['restarts'] == 0 and stats['failed'] == 1
    run(main())


@pytest.mark.timeout(120)
def test_a_reply_one_byte_over_4_gib_fails_its_task_and_the_worker_goes_on() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Sizes) as pool:
            pid = await pool.submit(('pid', 0))
            with pytest.raises(ValueError, match=f'pickled, it is {REAL_LIMIT + 1} bytes') \
                    as raised:
                await pool.submit(('reply', REAL_LIMIT + 1))
            assert isinstance(raised.value.__cause__, RemoteTraceback)   # raised in the worker
            assert await pool.submit(('pid', 0)) == pid
            assert pool.stats()['restarts'] == 0
    run(main())


# -- the same paths under a lowered limit ------------------------------------------------------

@pytest.fixture
def lowered_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(looppool.channel, '_MAX_PAYLOAD', LIMIT)
    yield


def pool(**options: Any) -> looppool.Pool:
    # fork: the workers inherit the lowered limit.
    return looppool.Pool(pool_size=1, worker_class=Sizes, mp_context='fork', **options)


def test_messages_over_the_limit_together_are_sent_one_by_one(lowered_limit: None) -> None:
    async def main() -> list[Any]:
        async with pool() as p:
            # Submitted in one loop iteration to one worker: one batch, pickled together.
            futures = [p.submit(message)
                       for message in (b'a', message_of(UNDER), message_of(UNDER),
                                       message_of(OVER), b'b')]
            return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = run(main())
    assert [type(outcome) for outcome in outcomes] == [int, int, int, ValueError, int]
    assert f'pickled, it is {OVER} bytes' in str(outcomes[3])


def test_replies_over_the_limit_together_are_sent_one_by_one(lowered_limit: None) -> None:
    async def main() -> list[Any]:
        async with pool() as p:
            # Answered in one loop iteration of the worker: one batch of replies.
            futures = [p.submit(('reply', size)) for size in (UNDER, UNDER, OVER, UNDER)]
            return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = run(main())
    assert [type(outcome) for outcome in outcomes] == [bytes, bytes, ValueError, bytes]
    assert [len(dumps(outcomes[i])) for i in (0, 1, 3)] == [UNDER] * 3
    assert f'pickled, it is {OVER} bytes' in str(outcomes[2])


def test_put_nowait_and_put_over_the_limit_raise_and_take_no_slot(lowered_limit: None) -> None:
    async def main() -> None:
        async with pool(max_tasks=2) as p:
            for _ in range(3):
                with pytest.raises(ValueError, match=f'pickled, it is {OVER} bytes'):
                    p.put_nowait(message_of(OVER))
                with pytest.raises(ValueError, match=f'pickled, it is {OVER} bytes'):
                    await p.put(message_of(OVER))
            assert p.stats()['in_flight'] == 0
            p.put_nowait(message_of(UNDER))   # the worker's share is all free
            p.put_nowait(message_of(UNDER))
    run(main())


def test_a_result_over_the_limit_raises_in_put_nowait_even_when_results_wait(
        lowered_limit: None) -> None:
    held: list[Any] = []

    def process_message(result: Any, result_done: Any) -> None:
        held.append(result_done)   # acknowledged later: the worker's credit is used up

    async def main() -> list[Any]:
        async with pool(max_results=1) as p:
            p.process_message = process_message
            answers = [await p.submit(('put', size), timeout=10)
                       for size in (UNDER, UNDER, OVER)]
            for result_done in held:
                result_done()
            await wait_until(lambda: len(held) == 2, what='the held result')
            held[1]()
            answers.append(await p.submit(('put', OVER), timeout=10))
            return answers

    answers = run(main())
    assert answers[:2] == ['sent', 'sent']   # the second waits in the worker for credit
    for answer in answers[2:]:
        assert answer.startswith(f'ValueError: pickled, it is {OVER} bytes'), answer


def test_a_sticky_broadcast_over_the_limit_is_refused_and_not_replayed(
        lowered_limit: None) -> None:
    async def main() -> None:
        async with pool() as p:
            with pytest.raises(ValueError, match=f'pickled, it is {OVER} bytes'):
                await p.broadcast(message_of(OVER), sticky=True)
            pid = await p.submit(('pid', 0))
            os.kill(pid, signal.SIGKILL)

            def replaced() -> bool:
                worker = p.stats()['workers'][0]
                return worker['ready'] and worker['pid'] != pid
            await wait_until(replaced, what='worker 0 to be replaced')
            assert await p.submit(b'abc') == 3
    run(main())


def test_a_map_chunk_over_the_limit_raises_at_its_first_message(lowered_limit: None) -> None:
    async def main() -> list[Any]:
        got: list[Any] = []
        async with pool() as p:
            messages = [b'a', b'b', message_of(UNDER), message_of(UNDER)]
            with pytest.raises(ValueError, match='pickled, it is'):
                async for reply in p.map(messages, chunksize=2):
                    got.append(reply)
            assert await p.submit(('pid', 0)) > 0
        return got

    assert len(run(main())) == 2   # the first chunk's replies, then the error
