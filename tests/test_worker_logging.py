"""Logging that a worker's own code sets up works there, and forwarding to the parent's
handlers goes on beside it (unless the pool is made with ``forward_logs=False``)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import looppool
from conftest import run, wait_until
from logging_workers import ConfiguresLogging, LoggingInstrumentatedWorker

pytestmark = pytest.mark.timeout(60)


class Collect(logging.Handler):
    """The parent's handler: keeps the records forwarded to it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def parent_handler() -> Iterator[Collect]:
    handler = Collect()
    app = logging.getLogger('app')
    app.addHandler(handler)
    app.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        app.removeHandler(handler)
        app.setLevel(logging.NOTSET)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_looppool_03_instrumented_workers_sentry_handler_gets_the_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parent_handler: Collect) -> None:
    """The README's worker calls logging.basicConfig(handlers=[SentryHandler(...)]) in
    _initialise (tests/looppool03_instrumented.py, Sentry played by a file)."""
    sentry = tmp_path / 'sentry.log'
    monkeypatch.setenv('LOOPPOOL_TEST_SENTRY_FILE', str(sentry))
    results: list[Any] = []

    async def main() -> list[int]:
        @looppool.task_done
        def process_message(result: Any, result_done: Any) -> None:
            results.append(result)

        pool = looppool.Pool(asyncio.get_running_loop(), 2, LoggingInstrumentatedWorker)
        pool.process_message = process_message
        pool.start()
        try:
            for message in ('alpha', 'beta'):
                pool.put_nowait(message)
            await wait_until(lambda: len(results) == 2 and len(lines(sentry)) == 2,
                             what="both results, and both records in the Sentry handler's file")
            await wait_until(lambda: len(parent_handler.records) == 2,
                             what="both records in the parent's handler")
            return [worker['pid'] for worker in pool.stats()['workers']]
        finally:
            await pool.stop()

    pids = run(main())
    assert sorted(lines(sentry)) == [
        f"{pids[0]} WARNING app.instrumented worker 0 got 'alpha'",
        f"{pids[1]} WARNING app.instrumented worker 1 got 'beta'"]
    forwarded = sorted((r.worker_number, r.process, r.getMessage())   # type: ignore[attr-defined]
                       for r in parent_handler.records)
    assert forwarded == [(0, pids[0], "worker 0 got 'alpha'"),
                         (1, pids[1], "worker 1 got 'beta'")]


@pytest.mark.parametrize('where', ['constructor', 'initialise, basicConfig(force=True)',
                                   'start, dictConfig', 'handler, later'])
def test_a_handler_the_worker_configures_gets_its_records(
        where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        parent_handler: Collect) -> None:
    log_file = tmp_path / 'worker.log'
    monkeypatch.setenv('LOOPPOOL_TEST_LOG_FILE', str(log_file))

    async def main() -> int:
        async with looppool.Pool(pool_size=1, worker_class=ConfiguresLogging,
                                 worker_args=(where,)) as pool:
            pid = await pool.submit('first')
            await pool.submit('second')
            # A record travels on the channel ahead of the reply that follows it.
            assert [r.getMessage() for r in parent_handler.records] == [
                "worker 0 got 'first'", "worker 0 got 'second'"]
            return pid   # type: ignore[no-any-return]

    pid = run(main())
    assert lines(log_file) == [f"{pid} WARNING app.worker worker 0 got 'first'",
                               f"{pid} WARNING app.worker worker 0 got 'second'"]


def test_forward_logs_false_keeps_the_records_in_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parent_handler: Collect) -> None:
    log_file = tmp_path / 'worker.log'
    monkeypatch.setenv('LOOPPOOL_TEST_LOG_FILE', str(log_file))

    async def main() -> int:
        # The worker keeps the handlers it inherited from this process: force=True
        # replaces them.
        async with looppool.Pool(pool_size=1, worker_class=ConfiguresLogging,
                                 worker_args=('initialise, basicConfig(force=True)',),
                                 forward_logs=False) as pool:
            return await pool.submit('only')  # type: ignore[no-any-return]

    pid = run(main())
    assert lines(log_file) == [f"{pid} WARNING app.worker worker 0 got 'only'"]
    assert parent_handler.records == []


@pytest.mark.parametrize('method', ['fork', 'spawn'])
def test_a_handler_configured_at_import_writes_each_record_once(
        method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module configures its handler in every process that imports it, the parent
    included: the parent's copy writes the forwarded records, the worker's copy (inherited,
    or made again by a spawned worker's import) is the parent's configuration and is
    removed, so each record is written once."""
    log_file = tmp_path / 'at_import.log'
    monkeypatch.setenv('LOOPPOOL_TEST_LOG_FILE', str(log_file))
    sys.modules.pop('logging_at_import', None)
    module = importlib.import_module('logging_at_import')
    try:
        async def main() -> int:
            async with looppool.Pool(pool_size=1, worker_class=module.LogsAtImport,
                                     mp_context=method) as pool:
                return await pool.submit('once')  # type: ignore[no-any-return]

        pid = run(main())
    finally:
        module.logger.removeHandler(module.handler)
        module.handler.close()
        sys.modules.pop('logging_at_import', None)
    assert lines(log_file) == [f"{pid} WARNING app.at_import worker 0 got 'once'"]
