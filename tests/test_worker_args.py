"""worker_args and worker_kwargs: every worker, and every replacement of one, is made as
``worker_class(*worker_args, **worker_kwargs)``, with the arguments pickled once, when the
pool is made; arguments that do not fit or do not pickle are refused there, by name."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest

import looppool
import looppool.pool
from conftest import run, wait_until
from workers import Configured, CountsPickles, Echo

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize('method', ['fork', 'forkserver', 'spawn'])
def test_every_worker_and_replacement_gets_the_arguments(method: str) -> None:
    CountsPickles.pickled = 0
    table = {'marker': CountsPickles(), 'rows': [1, 2, 3]}

    async def main() -> tuple[list[Any], Any, Any]:
        pool = looppool.Pool(pool_size=2, worker_class=Configured, mp_context=method,
                             worker_args=(table,), worker_kwargs={'scale': 2})
        assert CountsPickles.pickled == 1   # pickled here, once
        table['rows'].append(4)   # after the pool was made: the workers do not see it
        async with pool:
            first = await pool.broadcast('mutate')   # each changes its own copy
            again = await pool.broadcast('ask')
            os.kill(first[1]['pid'], signal.SIGKILL)

            def replaced() -> bool:
                worker = pool.stats()['workers'][1]
                return worker['ready'] and worker['pid'] != first[1]['pid']
            await wait_until(replaced, what='worker 1 to be replaced')
            replacement = await pool.submit('ask', worker_num=1)
        return again, first, replacement

    again, first, replacement = run(main())
    assert CountsPickles.pickled == 1   # not again for the start, nor for the replacement
    for number, reply in enumerate(again):
        assert reply['number'] == number and reply['scale'] == 2
        assert reply['table'] == {'marker': CountsPickles(), 'rows': [1, 2, 3],
                                  'changed by': number}
    assert replacement['pid'] != first[1]['pid']
    assert replacement['scale'] == 2
    assert replacement['table'] == {'marker': CountsPickles(), 'rows': [1, 2, 3]}


def _lock() -> Any:
    return threading.Lock()


@pytest.mark.parametrize('options, message', [
    ({'worker_args': (_lock(),)}, "worker_args cannot be pickled, .*cannot pickle '_thread.lock"),
    ({'worker_args': ({},), 'worker_kwargs': {'scale': _lock()}},
     'worker_kwargs cannot be pickled'),
    ({'worker_args': {}}, 'worker_args must be a tuple of positional arguments for '
                          r'Configured\(\), got dict'),
    ({'worker_args': ({},), 'worker_kwargs': [('scale', 1)]},
     'worker_kwargs must be a dict of keyword arguments'),
    ({'worker_args': ({},), 'worker_kwargs': {1: 2}}, 'worker_kwargs must be a dict'),
    ({}, r"Configured\(table, \*, scale=1\) cannot be called with worker_args \(0 "
         r"positional\) and worker_kwargs \(none\): missing a required argument: 'table'"),
    ({'worker_args': ({},), 'worker_kwargs': {'size': 1}},
     r'worker_kwargs \(size\): got an unexpected keyword argument'),
])
def test_arguments_that_do_not_fit_are_refused_where_the_pool_is_made(
        options: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        looppool.Pool(None, 1, Configured, **options)


def test_a_worker_without_a_constructor_takes_no_arguments() -> None:
    with pytest.raises(TypeError, match=r'Echo\(\) cannot be called with worker_args \(1 '
                                        r'positional\).*too many positional arguments'):
        looppool.Pool(None, 1, Echo, worker_args=(1,))


def test_a_constructor_that_raises_fails_the_start_with_its_traceback() -> None:
    async def main() -> None:
        async with looppool.Pool(pool_size=1, worker_class=Configured,
                                 worker_args=({},), worker_kwargs={'scale': -1}):
            pass   # pragma: no cover - it cannot start

    with pytest.raises(looppool.WorkerStartError) as raised:
        run(main())
    message = str(raised.value)
    assert 'worker 0 (pid ' in message
    assert ('could not start: Configured(*worker_args, **worker_kwargs) raised\n'
            in message), message
    assert 'ValueError: scale must not be negative, got -1' in raised.value.traceback


def test_serve_and_shared_refuse_bad_arguments_before_starting_anything(tmp_path) -> None:
    from looppool import remote
    address = str(tmp_path / 'configured.sock')
    with pytest.raises(TypeError, match='worker_args cannot be pickled'):
        remote.serve(Configured, address, pool_size=1, worker_args=(_lock(),))
    with pytest.raises(TypeError, match='worker_kwargs must be a dict'):
        remote.shared(Configured, address, worker_args=({},), worker_kwargs='scale=2')
    assert not os.path.exists(address)


def test_a_served_pool_makes_its_workers_with_the_arguments(tmp_path) -> None:
    from looppool import remote
    directory = tmp_path / 'run'
    directory.mkdir(mode=0o700)
    handle = remote.serve(Configured, str(directory / 'configured.sock'), pool_size=2,
                          worker_args=({'rows': [1]},), worker_kwargs={'scale': 3})
    try:
        client = remote.connect_sync(handle.address)
        try:
            replies = client.broadcast('ask')
        finally:
            client.close()
    finally:
        handle.stop()
    assert [(r['number'], r['scale'], r['table']) for r in replies] == [
        (0, 3, {'rows': [1]}), (1, 3, {'rows': [1]})]
