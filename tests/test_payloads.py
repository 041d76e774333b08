"""Big payloads through shared memory: what arrives, and that nothing is left behind.

Big buffers travel in anonymous memfds (looppool.shm): nothing is ever named in /dev/shm,
and a segment lives only while a process holds its descriptor or a mapping of it. So the
checks after each kill look in both places: /dev/shm is as it was, and no process on the
machine still holds a looppool memfd, open or mapped.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import numpy
import psutil
import pytest

import looppool
from looppool import remote, shm
from conftest import run, wait_for, wait_until
from workers import Echo

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not shm.AVAILABLE, reason='no memfd_create or descriptor passing'),
]

ROOT = os.path.dirname(looppool.__path__[0])
TESTS = os.path.dirname(__file__)
MIB = 1 << 20


class Holder(Echo):
    """Says how a message arrived; keeps one past the handler's return on request."""

    def _initialise(self) -> None:
        super()._initialise()
        self.kept: Any = None

    async def do_describe(self, value: Any) -> tuple[str, bool, bool, int]:
        return (type(value).__name__, _is_shared(value), _writable(value),
                memoryview(value).nbytes)

    async def do_keep(self, array: numpy.ndarray) -> bool:
        self.kept = array   # a view of shared memory, kept after this handler returns
        return _is_shared(array)

    async def do_kept_sum(self) -> float:
        return float(self.kept.sum())

    async def do_flipped(self, value: bytes) -> bytes:
        return value[::-1]   # a bytes of its own: written to shared memory

    async def do_twice(self, value: bytes) -> tuple[bytes, bytes]:
        return value, value

    async def do_later(self, value: bytes, seconds: float) -> bytes:
        """``value`` back after ``seconds``, once its segment has been released (the
        release goes within 5 ms when no other frame carries it)."""
        await asyncio.sleep(seconds)
        return value

    async def do_no_more_files(self, size: int) -> bytes:
        """Lets this process open no more files, then answers with ``size`` bytes."""
        import resource
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_now = len(os.listdir('/proc/self/fd')) - 1   # (less the listing's own)
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, hard))
        return b'x' * size


def _is_shared(value: Any) -> bool:
    """Whether ``value`` is a view of a shared-memory mapping."""
    base = value
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        base = base.obj if isinstance(base, memoryview) else getattr(base, 'base', None)
    return False


def _writable(value: Any) -> bool:
    return not memoryview(value).readonly


def _segments_written(pool: looppool.Pool, number: int = 0) -> int:
    """How many buffers the parent has written to shared memory for worker ``number``."""
    channel = pool._slots[number].link.channel  # type: ignore[union-attr]
    return channel._segments.written  # type: ignore[union-attr]


def _memfds(pids: list[int] | None = None) -> list[str]:
    """Every looppool memfd a process holds, open or mapped: all processes, or ``pids``."""
    found = []
    if pids is None:
        pids = [int(name) for name in os.listdir('/proc') if name.isdigit()]
    for pid in pids:
        try:
            for fd in os.listdir(f'/proc/{pid}/fd'):
                target = os.readlink(f'/proc/{pid}/fd/{fd}')
                if target.startswith('/memfd:looppool'):
                    found.append(f'pid {pid} fd {fd}')
            with open(f'/proc/{pid}/maps') as maps:
                found += [f'pid {pid} maps {line.split()[0]}' for line in maps
                          if '/memfd:looppool' in line]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue   # gone meanwhile, or not ours to read
    return found


def _dev_shm() -> set[str]:
    return set(os.listdir('/dev/shm')) if os.path.isdir('/dev/shm') else set()


@pytest.mark.parametrize('method', ['fork', 'spawn'])
def test_sizes_around_the_threshold_arrive_whole(method: str) -> None:
    threshold = shm.THRESHOLD
    sizes = [0, 1, threshold - 1, threshold, threshold + 1, 3 * MIB]

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Holder,
                                 mp_context=method) as pool:
            for size in sizes:
                before = _segments_written(pool)
                payload = os.urandom(size)
                reply = await pool.submit(payload)
                assert type(reply) is bytes and reply == payload, size
                # Shared memory is used from the threshold on, and only then.
                assert _segments_written(pool) - before == (size >= threshold), size
                described = await pool.submit(('describe', bytearray(payload)))
                assert described == ('bytearray', False, True, size)
                echoed = await pool.submit(bytearray(payload))
                assert type(echoed) is bytearray and echoed == payload

    run(main())


@pytest.mark.timeout(180)
def test_a_256_mib_payload_goes_both_ways() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Echo) as pool:
            payload = os.urandom(256 * MIB)
            reply = await pool.submit(payload)
            assert len(reply) == len(payload) and reply == payload

    run(main())


def test_a_bytes_sent_back_as_it_arrived_is_the_bytes_sent() -> None:
    """A handler's reply that is the very bytes it was sent goes back as the sender's own
    segment, not written again; the sender gets its own bytes object back. Anything else
    is written and read as before."""
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Holder) as pool:
            for size in (MIB, 8 * MIB):
                payload = os.urandom(size)
                written = _segments_written(pool)
                reply = await pool.submit(payload)
                assert reply is payload
                assert _segments_written(pool) - written == 1
                flipped = await pool.submit(('flipped', payload))
                assert flipped is not payload and flipped == payload[::-1]
                first, second = await pool.submit(('twice', payload))
                assert first is payload and second is payload
                # Sent back once its segment is released, and may have been written again:
                # the worker writes it, and the reply is a bytes of its own.
                later = await pool.submit(('later', payload, 0.1))
                assert later is not payload and later == payload
                # A bytearray is the worker's to change: never the same object back.
                array = bytearray(payload)
                echoed = await pool.submit(array)
                assert echoed is not array and echoed == array
                assert await pool.submit(payload) is payload

    run(main())


def test_a_large_segment_is_kept_for_a_while_then_closed(monkeypatch) -> None:
    """A segment too large for the bound on those kept (64 MiB in all) is kept for the
    next buffer all the same, one per direction, and closed once it has been idle for
    KEEP_LARGE_SECONDS (its idle time is set back here rather than waited for)."""
    monkeypatch.setattr(shm, 'KEEP_LARGE_SECONDS', 3600.0)

    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Holder, mp_context='fork') as pool:
            pid = await pool.submit(('pid',))
            # New contents each time, the last shorter: written again into the same
            # segment's pages (through a mapping, from 32 MiB), each arrives whole.
            for size in (80 * MIB, 80 * MIB, 70 * MIB):
                payload = os.urandom(size)
                assert await pool.submit(('flipped', payload)) == payload[::-1]
            channel = pool._slots[0].link.channel  # type: ignore[union-attr]
            segments = channel._segments  # type: ignore[union-attr]
            assert segments.large is not None and segments.next_id == 2   # one, used again
            assert len(_memfds([os.getpid()])) == 1 and len(_memfds([pid])) == 1
            assert channel._expire_timer is not None  # type: ignore[union-attr]
            channel._expire()  # type: ignore[union-attr]
            assert segments.large is not None   # not idle long enough: kept
            segments.large.idle_since -= 7200
            channel._expire()  # type: ignore[union-attr]
            assert segments.large is None and _memfds([os.getpid()]) == []
            assert channel._expire_timer is None  # type: ignore[union-attr]
            assert await pool.submit(('flipped', payload)) == payload[::-1]
            assert segments.next_id == 3

    run(main())


def test_numpy_arrays_arrive_as_views_of_shared_memory() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Holder) as pool:
            array = numpy.arange(MIB, dtype=numpy.float64)   # 8 MiB
            name, shared, writable, size = await pool.submit(('describe', array))
            assert (name, shared, writable, size) == ('ndarray', True, True, array.nbytes)
            frozen = array.copy()
            frozen.flags.writeable = False
            assert (await pool.submit(('describe', frozen)))[:3] == ('ndarray', True, False)
            reply = await pool.submit({'array': array, 'label': 'x'})
            assert reply['label'] == 'x' and _is_shared(reply['array'])
            assert numpy.array_equal(reply['array'], array)
            small = numpy.arange(10)   # under the threshold: in the pickle, a copy
            assert (await pool.submit(('describe', small)))[:2] == ('ndarray', False)

    run(main())


def test_memoryviews_of_any_size_arrive_as_memoryviews() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Holder) as pool:
            data = os.urandom(2 * MIB)
            big = await pool.submit(('describe', memoryview(data)))
            assert big == ('memoryview', True, False, len(data))
            matrix = memoryview(bytearray(data)).cast('d', (1024, 256))
            reply = await pool.submit(matrix)
            assert (reply.format, reply.shape, reply.readonly) == ('d', (1024, 256), False)
            assert reply.tobytes() == data
            small = await pool.submit(memoryview(b'tiny'))
            assert type(small) is memoryview and small.tobytes() == b'tiny'

    run(main())


def test_a_handler_may_keep_a_view_past_its_return() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Holder) as pool:
            array = numpy.full(MIB, 3.0)
            assert await pool.submit(('keep', array)) is True
            # Other big payloads come and go meanwhile: the kept view's segment is its own.
            for _ in range(5):
                payload = os.urandom(MIB)
                assert await pool.submit(payload) == payload
                assert await pool.submit(numpy.zeros(MIB)) is not None
            assert await pool.submit(('kept_sum',)) == 3.0 * MIB

    run(main())


def test_put_nowait_results_and_map_carry_big_buffers() -> None:
    async def main() -> None:
        payload = os.urandom(MIB)
        results: list[Any] = []
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            def collect(result: Any, done: Any) -> None:
                results.append(result)
                done()
            pool.process_message = collect
            pool.put_nowait(('put', payload, payload))   # its return value, 2, comes too
            await wait_until(lambda: len(results) == 3, what='the results')
            assert results == [payload, payload, 2]
            replies = [reply async for reply in pool.map([payload] * 6)]
            assert replies == [payload] * 6

    run(main())


def test_a_process_out_of_descriptors_falls_back_to_the_socket_or_ends() -> None:
    """A worker that can open no more files sends its big reply through the socket; a big
    message sent to it cannot be received (its descriptor is refused), so the worker's
    channel ends, the worker exits, and the task fails as lost rather than wait."""
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Holder) as pool:
            pid = await pool.submit(('pid',))
            reply = await pool.submit(('no_more_files', 2 * MIB))
            assert reply == b'x' * (2 * MIB)
            with pytest.raises(looppool.WorkerLost):
                await pool.submit(os.urandom(2 * MIB))
            await wait_until(lambda: pool.stats()['workers'][0]['pid'] not in (None, pid),
                             what='the replacement of the worker')
            payload = os.urandom(2 * MIB)
            assert await pool.submit(payload) == payload

    run(main())


def test_a_pool_host_passes_big_payloads_inline(sock_path) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=1)
    try:
        async def main() -> None:
            async with remote.connect(handle.address) as client:
                payload = os.urandom(2 * MIB)
                assert await client.submit(payload) == payload
                array = numpy.arange(MIB // 8, dtype=numpy.float64)
                assert numpy.array_equal(await client.submit(array), array)

        run(main())
    finally:
        handle.stop()


def test_nothing_is_left_after_a_worker_is_killed_with_big_payloads_in_flight() -> None:
    before = _dev_shm()

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Holder, kill_grace=0.5) as pool:
            pids = await pool.broadcast(('pid',))
            payload = os.urandom(MIB)
            array = numpy.ones(MIB)
            assert await pool.submit(('keep', array), worker_num=0)
            sent = [pool.submit(payload, worker_num=0) for _ in range(8)]
            sent.append(pool.submit(('kill_self',), worker_num=0))
            sent += [pool.submit(array, worker_num=0) for _ in range(8)]
            outcomes = await asyncio.gather(*sent, return_exceptions=True)
            assert all(isinstance(outcome, looppool.WorkerLost) or outcome is not None
                       for outcome in outcomes)
            assert any(isinstance(outcome, looppool.WorkerLost) for outcome in outcomes)
            await wait_until(lambda: pool.stats()['workers'][0]['pid'] not in (None, pids[0]),
                             what='the replacement of worker 0')
            assert not psutil.pid_exists(pids[0]) or \
                psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
            assert await pool.submit(payload, worker_num=0) == payload
        # Stopped: no process holds a segment, and nothing has a name.
        assert _memfds([os.getpid(), *pids]) == []

    run(main())
    wait_for(lambda: not _memfds(), what='every looppool memfd to be gone')
    assert _dev_shm() <= before


def test_nothing_is_left_after_the_parent_is_killed_with_big_payloads_in_flight(
        tmp_path) -> None:
    before = _dev_shm()
    program = tmp_path / 'parent.py'
    program.write_text(textwrap.dedent('''
        import asyncio, os, numpy, looppool
        from workers import Echo

        async def main():
            async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
                print(*await pool.broadcast(('pid',)), flush=True)
                payload, array = os.urandom(1 << 20), numpy.ones(1 << 17)
                while True:   # until killed: big payloads in flight both ways, always
                    await asyncio.gather(*[pool.submit(payload) for _ in range(6)],
                                         *[pool.submit(array) for _ in range(6)])

        asyncio.run(main())
    '''))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, TESTS])}
    parent = subprocess.Popen([sys.executable, str(program)], env=env,
                              stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2
        wait_for(lambda: _memfds([parent.pid, *pids]), what='big payloads in flight')
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status()
                                 != psutil.STATUS_ZOMBIE for pid in pids),
                 what='the workers to exit after their parent was killed')
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_for(lambda: not _memfds(), what='every looppool memfd to be gone')
    assert _dev_shm() <= before


def test_a_forked_worker_lets_go_of_the_parents_segments() -> None:
    """A worker forked while the parent keeps segments for another worker holds none of
    them: it would keep that memory alive for as long as it lives."""
    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Holder, mp_context='fork') as pool:
            payload = os.urandom(2 * MIB)
            for _ in range(3):
                assert await pool.submit(payload, worker_num=0) == payload
            assert _memfds([os.getpid()])   # kept for use again
            old = await pool.submit(('pid',), worker_num=1)
            with pytest.raises(looppool.WorkerLost):
                await pool.submit(('kill_self',), worker_num=1)
            new = await wait_until(
                lambda: pool.stats()['workers'][1]['pid'] not in (None, old)
                and pool.stats()['workers'][1]['pid'], what='the replacement of worker 1')
            assert await pool.submit(('pid',), worker_num=1) == new
            assert _memfds([new]) == []

    run(main())


def test_nothing_is_left_after_stop() -> None:
    before = _dev_shm()

    async def main() -> None:
        async with looppool.Pool(pool_size=2, worker_class=Echo) as pool:
            pids = await pool.broadcast(('pid',))
            payload = os.urandom(MIB)
            replies = await asyncio.gather(*[pool.submit(payload) for _ in range(20)])
            assert replies == [payload] * 20
            # Sent just before the stop: the workers' last replies come back after their
            # RELEASE frames meet a closed socket, and are read all the same.
            unanswered = [pool.submit(payload) for _ in range(20)]
        assert await asyncio.gather(*unanswered) == [payload] * 20
        assert _memfds([os.getpid(), *pids]) == []

    run(main())
    assert _dev_shm() <= before


@pytest.mark.parametrize('wrap', [lambda array: array, lambda array: (array, memoryview(array))])
def test_a_pickled_payload_holds_its_buffers_in_no_reference_cycle(wrap) -> None:
    """Once a sent payload is dropped, its buffers go at once, not at the next run of the
    cyclic garbage collector: a pickler in a cycle would hold every big message and reply
    until then (hundreds of MiB, and fresh pages for each)."""
    import gc
    import weakref
    array = numpy.ones(MIB)
    gone = weakref.ref(array)
    enabled = gc.isenabled()
    gc.disable()
    try:
        big = shm.dumps(wrap(array), shm.THRESHOLD)
        assert isinstance(big, shm.Big) and big.buffers
        del array, big
        assert gone() is None
    finally:
        if enabled:
            gc.enable()
