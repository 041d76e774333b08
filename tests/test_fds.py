"""A replaced worker leaves nothing open behind it, in the parent or in later workers.

Each worker process costs the parent its channel's socket and the two ends of the pipe
multiprocessing watches it by (the sentinel). All three must be closed when the process
has ended, whether it was killed or recycled, without waiting for the cyclic garbage
collector: the tests run with it disabled. A worker forked later inherits the parent's
descriptors, so what the parent leaks, every new worker holds too.
"""

from __future__ import annotations

import gc
import os
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

import looppool
import looppool.pool
from conftest import run, wait_until
from workers import Echo

pytestmark = pytest.mark.timeout(90)

REPLACEMENTS = 20


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f'/proc/{pid or "self"}/fd'))


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize('how', ['killed', 'recycled'])
def test_replaced_workers_leave_no_descriptor_open(no_gc: None, how: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Twenty kills in a row would otherwise be restarted with back-off (quick deaths).
    monkeypatch.setattr(looppool.supervise, '_QUICK_DEATH', 0.0)
    options: dict[str, Any] = {'max_tasks_per_worker': 1} if how == 'recycled' else {}

    async def replace(pool: looppool.Pool) -> tuple[int, Any]:
        """Replace worker 0 once; return the new worker's pid and the old one's link,
        once the old process has exited and the pool has reaped it."""
        old = pool._slots[0].link
        pid = await pool.submit(('pid',))   # recycled: its only task
        if how == 'killed':
            os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            worker = pool.stats()['workers'][0]
            return (worker['pid'] != pid and worker['ready']
                    and not psutil.pid_exists(pid))   # reaped: the pool saw it end
        await wait_until(replaced, what=f'worker 0 (pid {pid}) to be {how} and replaced')
        return pool.stats()['workers'][0]['pid'], old

    async def main() -> list[tuple[int, int]]:
        counts = []
        async with looppool.Pool(pool_size=1, worker_class=Echo, **options) as pool:
            for number in range(REPLACEMENTS):
                new_pid, old_link = await replace(pool)
                if number in (0, REPLACEMENTS - 1):
                    # A recycled worker's replacement is forked while the old one still
                    # serves, so it holds that one's descriptors: compare like with like,
                    # the first replacement with the last.
                    counts.append((open_fds(), open_fds(new_pid)))
            # The dead process's link went with its last reference (nothing but the pool
            # held it), not at a cyclic collection.
            old_link = weakref.ref(old_link)
            assert old_link() is None, gc.get_referrers(old_link())
        return counts

    (parent_first, worker_first), (parent_last, worker_last) = run(main())
    assert parent_last == parent_first, (
        f'the parent has {parent_last - parent_first} more descriptors open after '
        f'{REPLACEMENTS - 1} more workers were {how}')
    assert worker_last == worker_first, (
        f'the last worker has {worker_last - worker_first} more descriptors open than the '
        f'first replacement had')
