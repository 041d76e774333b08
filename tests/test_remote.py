"""One pool shared by many processes: serve, connect, connect_sync, shared."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil
import pytest

import looppool
from looppool import remote
from looppool.remote import wire
from conftest import run, wait_for, wait_until
from workers import Echo

pytestmark = pytest.mark.timeout(90)

ROOT = os.path.dirname(looppool.__path__[0])
TESTS = os.path.dirname(__file__)


def _env() -> dict[str, str]:
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, TESTS])}



@pytest.fixture
def host(sock_path):
    handle = remote.serve(Echo, sock_path, pool_size=2)
    yield handle
    handle.stop()


def _ask_pids(address: str, out: multiprocessing.Queue) -> None:
    client = remote.connect_sync(address)
    try:
        out.put((os.getpid(), sorted(client.broadcast(('pid',)))))
    finally:
        client.close()


def test_forked_clients_share_one_host(host) -> None:
    ctx = multiprocessing.get_context('fork')
    out = ctx.Queue()
    clients = [ctx.Process(target=_ask_pids, args=(host.address, out)) for _ in range(4)]
    for process in clients:
        process.start()
    answers = [out.get(timeout=30) for _ in clients]
    for process in clients:
        process.join(10)
    out.close()
    out.join_thread()
    assert len({client_pid for client_pid, _ in answers}) == 4
    worker_pids = {tuple(pids) for _, pids in answers}
    assert len(worker_pids) == 1   # the same two workers answered every process
    assert len(next(iter(worker_pids))) == 2


def test_the_async_client_has_the_pools_interface(host) -> None:
    async def main() -> None:
        results: list = []
        async with remote.connect(host.address) as client:
            client.process_message = lambda result, done: (results.append(result), done())
            assert client.pool_size == 2
            assert await client.submit({'x': 1}) == {'x': 1}
            assert [n for n, _ in await client.broadcast(('whoami',))] == [0, 1]
            assert await client.submit(('whoami',), worker_num=1) == (
                1, (await client.broadcast(('pid',)))[1])
            # results sent with _put_nowait while handling this client's message come here
            assert await client.submit(('put', 'a', 'b')) == 2
            await client.put(('put', 'c'))
            client.put_nowait(('put', 'd'))
            await wait_until(lambda: len(results) >= 6, what='six results')
            assert sorted(r for r in results if isinstance(r, str)) == ['a', 'b', 'c', 'd']
            # a note's return value (do_put returns how many it sent) comes here too
            assert [r for r in results if isinstance(r, int)] == [1, 1]
            with pytest.raises(KeyError) as caught:
                await client.submit(('raise', KeyError('gone')))
            assert 'do_raise' in str(caught.value.__cause__)
            with pytest.raises(TimeoutError):
                await client.submit(('cancellable', 30), timeout=0.2)
            # The timeout cancels the task in its worker, which says so.
            await wait_until(lambda: ('cancelled', 0) in results or ('cancelled', 1) in results,
                             what='the worker to report the cancellation')
            stats = await client.stats()
            assert stats['clients'] == 1 and stats['pool_size'] == 2
            assert stats['host_pid'] == host.pid
            pid = await client.submit(('pid',), worker_num=0)
            doomed = client.submit(('sleep', 30), worker_num=0)
            # Worker 0 starts the sleep before it answers the next message.
            assert await client.submit(('max_concurrent',), worker_num=0) >= 1
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(looppool.WorkerLost, match=f'worker 0 \\(pid {pid}\\)'):
                await doomed
            assert await client.submit(1, worker_num=0) == 1

    run(main())


def test_backpressure_holds_end_to_end(sock_path) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=1, max_tasks=4)
    try:
        async def main() -> None:
            async with remote.connect(handle.address) as client:
                busy = [client.submit(('sleep', 0.5, i)) for i in range(4)]
                with pytest.raises(queue.Full):   # the client's share is taken at once
                    client.put_nowait('no room')
                waiting = client.submit('later')   # waits in the client, then goes
                await asyncio.sleep(0.1)
                assert not waiting.done()
                assert await asyncio.gather(*busy) == [0, 1, 2, 3]
                assert await asyncio.wait_for(waiting, 5) == 'later'
                assert await client.submit(('max_concurrent',)) == 4

        run(main())
    finally:
        handle.stop()


def test_the_sync_client_from_32_threads(host) -> None:
    client = remote.connect_sync(host.address)
    replies: dict[int, object] = {}
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            replies[index] = client.submit(('sleep', 0.01, index))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not errors
        assert replies == {i: i for i in range(32)}
        with pytest.raises(KeyError):
            client.submit(('raise', KeyError('k')))
        with pytest.raises(TimeoutError):
            client.submit(('sleep', 5), timeout=0.2)
        assert client.stats()['clients'] == 1
    finally:
        client.close()


def test_a_socket_at_a_given_path_is_born_0600(host, sock_path) -> None:
    info = os.stat(sock_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()


def test_the_default_address_is_private(tmp_path, monkeypatch) -> None:
    """serve() with no address makes its own directory (0700, ours) and socket (0600)."""
    runtime = tmp_path / 'xdg'
    runtime.mkdir(mode=0o755)
    monkeypatch.setenv('XDG_RUNTIME_DIR', str(runtime))
    expected = remote.default_address(Echo)
    directory = os.path.dirname(expected)
    assert directory == str(runtime / f'looppool-{os.getuid()}')
    assert not os.path.exists(directory)   # serve() has to make it, not the test
    handle = remote.serve(Echo, pool_size=1)
    try:
        assert handle.address == expected
        sock_info, dir_info = os.stat(expected), os.stat(directory)
        assert stat.S_ISSOCK(sock_info.st_mode)
        assert stat.S_IMODE(sock_info.st_mode) == 0o600
        assert sock_info.st_uid == os.getuid()
        assert stat.S_IMODE(dir_info.st_mode) == 0o700
        assert dir_info.st_uid == os.getuid()
        client = remote.connect_sync(handle.address)
        try:
            assert client.submit('private') == 'private'
        finally:
            client.close()
    finally:
        handle.stop()
    assert not os.path.exists(expected)


_UNSAFE = [('group-writable', 0o770, None, 'writable by other users'),
           ('other-writable', 0o707, None, 'writable by other users'),
           ('sticky and writable by all', 0o1777, None, 'writable by other users'),
           ('owned by another user', 0o700, 65534, 'belongs to uid 65534')]


@pytest.mark.parametrize('mode, owner, refusal', [case[1:] for case in _UNSAFE],
                         ids=[case[0] for case in _UNSAFE])
def test_an_unsafe_socket_directory_is_refused(tmp_path, monkeypatch, mode, owner,
                                               refusal) -> None:
    if owner is not None and os.getuid() != 0:
        pytest.skip('needs root to give the directory to another uid')
    runtime = tmp_path / 'xdg'
    runtime.mkdir(mode=0o755)
    monkeypatch.setenv('XDG_RUNTIME_DIR', str(runtime))
    directory = os.path.dirname(remote.default_address(Echo))
    os.mkdir(directory)
    os.chmod(directory, mode)   # not through mkdir: the umask would clear group/other bits
    if owner is not None:
        os.chown(directory, owner, owner)
    with pytest.raises(PermissionError, match=refusal):
        remote.serve(Echo, pool_size=1)
    with pytest.raises(PermissionError, match=refusal):
        remote.shared(Echo, idle_timeout=1.0, pool_size=1)
    assert os.listdir(directory) == []   # no socket, no lock file: nothing was started


def test_a_uid_not_allowed_is_refused(sock_path) -> None:
    handle = remote.serve(Echo, sock_path, pool_size=1, allowed_uids=[os.getuid() + 4242])
    try:
        client = remote.connect_sync(handle.address)
        with pytest.raises(remote.AuthenticationError, match=f'uid {os.getuid()} may not'):
            client.submit(1)
    finally:
        handle.stop()


@pytest.mark.skipif(os.getuid() != 0, reason='needs root to run a client as another uid')
def test_a_foreign_uid_is_refused_even_past_the_file_mode() -> None:
    # Open the first layer (directory and socket modes) to test the second (SO_PEERCRED):
    # a directory others may traverse, and a socket file others may write.
    directory = tempfile.mkdtemp(prefix='looppool-uid-test-', dir='/tmp')
    os.chmod(directory, 0o711)
    sock_path = os.path.join(directory, 'echo.sock')
    handle = remote.serve(Echo, sock_path, pool_size=1)
    try:
        os.chmod(sock_path, 0o666)
        code = textwrap.dedent(f'''
            import os, sys
            from looppool import remote   # imported first: nobody cannot read root's files
            os.setgid(65534); os.setuid(65534)
            try:
                remote.connect_sync({sock_path!r}).submit(1)
            except remote.AuthenticationError as exc:
                print('refused:', exc)
            else:
                print('accepted')
        ''')
        done = subprocess.run([sys.executable, '-c', code], env=_env(), capture_output=True,
                              text=True, timeout=30)
        assert 'refused:' in done.stdout and 'uid 65534 may not' in done.stdout, done.stderr
        # and the host keeps serving its own user
        client = remote.connect_sync(handle.address)
        try:
            assert client.submit('still') == 'still'
        finally:
            client.close()
    finally:
        handle.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason='needs root to run a host as another uid')
@pytest.mark.skipif(not hasattr(socket, 'SO_PEERCRED'), reason='SO_PEERCRED is Linux only')
def test_clients_refuse_a_host_that_runs_as_another_user() -> None:
    # Someone else's socket at the address (a shared directory): its "pickles" would run
    # code in the client, so the client checks who listens before it reads a byte.
    directory = tempfile.mkdtemp(prefix='looppool-host-uid-test-', dir='/tmp')
    os.chmod(directory, 0o777)
    sock_path = os.path.join(directory, 'impostor.sock')
    code = textwrap.dedent(f'''
        import os, socket, sys
        os.setgid(65534); os.setuid(65534)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind({sock_path!r})
        os.chmod({sock_path!r}, 0o666)
        server.listen(8)
        print('listening', flush=True)
        while True:
            connection, _ = server.accept()
            try:
                connection.sendall(b'not a looppool host')
            except OSError:
                pass   # the client hung up first, as it should
            connection.close()
    ''')
    impostor = subprocess.Popen([sys.executable, '-c', code], env=_env(),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline().strip() == 'listening'
        with pytest.raises(remote.AuthenticationError, match='runs as uid 65534'):
            remote.connect_sync(sock_path).submit(1)

        async def main() -> None:
            client = remote.connect(sock_path)
            try:
                with pytest.raises(remote.AuthenticationError, match='runs as uid 65534'):
                    await client.submit(1)
            finally:
                await client.close()

        run(main())
    finally:
        impostor.kill()
        impostor.wait(5)
        if impostor.stdout:
            impostor.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_tcp_needs_a_secret_and_refuses_wrong_ones() -> None:
    with pytest.raises(ValueError, match='needs a secret'):
        remote.serve(Echo, ('127.0.0.1', 0))
    with pytest.raises(ValueError, match='without TLS'):
        remote.serve(Echo, ('0.0.0.0', 0), secret='s3cret')
    handle = remote.serve(Echo, ('127.0.0.1', 0), pool_size=1, secret='s3cret')
    try:
        with pytest.raises(remote.AuthenticationError, match='wrong or missing secret'):
            remote.connect_sync(handle.address, secret='wrong').submit(1)
        # The clients apply the host's rules: no plaintext pickles over TCP without a secret,
        # nor to an address that is not a loopback one without TLS.
        for make in (remote.connect, remote.connect_sync):
            with pytest.raises(ValueError, match='needs a secret'):
                make(handle.address)
            with pytest.raises(ValueError, match='without TLS'):
                make(('192.0.2.1', handle.address[1]), secret='s3cret')

        async def main() -> None:
            with pytest.raises(remote.AuthenticationError):
                await remote.connect(handle.address, secret='wrong').connect()
            async with remote.connect(handle.address, secret='s3cret') as client:
                assert await client.submit('ok') == 'ok'

        run(main())
        client = remote.connect_sync(handle.address, secret=b's3cret')
        assert client.submit('sync ok') == 'sync ok'
        client.close()
    finally:
        handle.stop()


def test_an_oversized_frame_before_authentication_is_refused(host) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(host.address)
        sock.recv(100)   # the greeting
        sock.sendall(wire.HEADER.pack(2 ** 31, wire.AUTH, 0) + b'x' * 100)
        answer = sock.recv(1000)
        assert b'at most' in answer
    client = remote.connect_sync(host.address)
    try:
        assert client.submit('fine') == 'fine'
    finally:
        client.close()


@pytest.mark.skipif(shutil.which('openssl') is None, reason='openssl is needed to make a '
                    'test certificate')
def test_tls_over_tcp(tmp_path) -> None:
    cert, key = tmp_path / 'cert.pem', tmp_path / 'key.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
                    '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1',
                    '-keyout', str(key), '-out', str(cert)], check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    handle = remote.serve(Echo, ('127.0.0.1', 0), pool_size=1, secret='tls-too',
                          ssl_context=server, mp_context='fork')
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))

        async def main() -> None:
            async with remote.connect(handle.address, secret='tls-too',
                                      ssl_context=client_ctx) as client:
                assert await client.submit('over tls') == 'over tls'

        run(main())
        sync = remote.connect_sync(handle.address, secret='tls-too', ssl_context=client_ctx)
        assert sync.submit('sync tls') == 'sync tls'
        sync.close()
    finally:
        handle.stop()


def test_killing_the_host_fails_calls_in_flight_cleanly(sock_path) -> None:
    host = remote.serve(Echo, sock_path, pool_size=2, restart=False)

    async def main() -> None:
        client = remote.connect(host.address)
        assert await client.submit(1) == 1
        in_flight = client.submit(('sleep', 30))
        await wait_until(lambda: in_flight in client._futures.values(), what='the call sent')
        assert (await client.stats())['in_flight'] == 1
        os.kill(host.pid, signal.SIGKILL)
        with pytest.raises(remote.ConnectionLost, match='next call connects again'):
            await asyncio.wait_for(in_flight, 10)
        with pytest.raises(remote.ConnectionLost, match='could not connect'):
            await client.submit(2)
        await client.close()

    try:
        run(main())
        wait_for(lambda: not _alive(host.pid), 10, 'the killed host to be gone')
    finally:
        host.stop()


def test_the_host_ends_with_the_process_that_served_it(tmp_path, sock_path) -> None:
    program = tmp_path / 'master.py'
    program.write_text(textwrap.dedent(f'''
        import time
        from looppool import remote
        from workers import Echo
        if __name__ == '__main__':
            handle = remote.serve(Echo, {sock_path!r}, pool_size=2)
            client = remote.connect_sync(handle.address)
            print(handle.pid, *client.broadcast(('pid',)), flush=True)
            client.close()
            time.sleep(60)
    '''))
    master = subprocess.Popen([sys.executable, str(program)], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout is not None
        pids = [int(p) for p in master.stdout.readline().split()]
        assert len(pids) == 3
        master.kill()
        master.wait(5)
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=10,
                 what='the host and its workers to exit after the master died')
    finally:
        master.kill()
        master.wait(5)
        if master.stdout:
            master.stdout.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _shared_race(address: str, start: float, out: multiprocessing.Queue) -> None:
    time.sleep(max(0.0, start - time.time()))
    client = remote.shared(Echo, address, idle_timeout=1.0, sync=True, pool_size=2)
    try:
        stats = client.stats()
        out.put((client.created_new_pool, stats['host_pid'],
                 tuple(sorted(client.broadcast(('pid',))))))
    finally:
        client.close()


def test_racing_shared_calls_create_exactly_one_host(sock_path) -> None:
    ctx = multiprocessing.get_context('fork')
    out = ctx.Queue()
    start = time.time() + 0.5
    racers = [ctx.Process(target=_shared_race, args=(sock_path, start, out))
              for _ in range(6)]
    for process in racers:
        process.start()
    answers = [out.get(timeout=60) for _ in racers]
    for process in racers:
        process.join(10)
    out.close()
    out.join_thread()
    assert sorted(created for created, _, _ in answers) == [False] * 5 + [True]
    assert len({host_pid for _, host_pid, _ in answers}) == 1
    assert len({pids for _, _, pids in answers}) == 1
    host_pid = answers[0][1]
    # detached: not a child of any racer; it exits after idle_timeout without clients
    wait_for(lambda: not _alive(host_pid), timeout=15, what='the idle shared host to exit')
    assert not os.path.exists(sock_path)


def test_a_shared_client_starts_a_new_host_when_the_old_one_died(sock_path) -> None:
    async def main() -> None:
        client = remote.shared(Echo, sock_path, idle_timeout=1.0, pool_size=1)
        assert client.created_new_pool
        first = (await client.stats())['host_pid']
        first_workers = await client.broadcast(('pid',))
        in_flight = client.submit(('sleep', 30))
        await asyncio.sleep(0.1)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(remote.ConnectionLost):
            await asyncio.wait_for(in_flight, 10)
        assert await client.submit('again') == 'again'   # a new host, started for us
        second = (await client.stats())['host_pid']
        assert second != first
        await client.close()
        await wait_until(lambda: not _alive(second), timeout=15, what='the idle host to exit')
        # the killed host's workers saw it die and left
        await wait_until(lambda: not any(_alive(pid) for pid in first_workers), timeout=10,
                         what="the killed host's workers to exit")

    run(main())


def test_shared_rejects_classes_from_main_and_bad_options(sock_path) -> None:
    class Local(looppool.Worker):
        pass
    Local.__module__ = '__main__'
    with pytest.raises(ValueError, match='defined in __main__'):
        remote.shared(Local, sock_path)
    with pytest.raises(ValueError, match='pool_size must be at least 1'):
        remote.shared(Echo, sock_path, pool_size=0)
    with pytest.raises(ValueError, match='idle_timeout'):
        remote.shared(Echo, sock_path, idle_timeout=0)
    with pytest.raises(TypeError, match='worker_class'):
        remote.serve(object, sock_path)


# -- routing, recycled starters, the sync client's reconnect -----------------------------------

def test_each_client_gets_only_the_results_of_its_own_messages(host) -> None:
    """Three clients (two async, one sync) use the same two workers at once; each one's
    process_message gets exactly the _put_nowait results of its own messages."""
    rounds = 20
    names = ['async-0', 'async-1', 'sync']
    got: dict[str, list] = {name: [] for name in names}

    def collector(name: str):
        def process_message(result, result_done) -> None:
            got[name].append(result)
            result_done()
        return process_message

    def expected(name: str) -> list:
        tagged = [(name, r, part) for r in range(rounds) for part in (0, 1, 'note')]
        return sorted(tagged, key=repr) + [1] * rounds   # a note's return value comes too

    def received(name: str) -> list:
        tagged = [r for r in got[name] if isinstance(r, tuple)]
        return sorted(tagged, key=repr) + [r for r in got[name] if not isinstance(r, tuple)]

    sync_client = remote.connect_sync(host.address)
    sync_client.process_message = collector('sync')

    def sync_work() -> None:
        for r in range(rounds):
            assert sync_client.submit(('put', ('sync', r, 0), ('sync', r, 1)),
                                      worker_num=r % 2) == 2
            sync_client.put_nowait(('put', ('sync', r, 'note')), worker_num=r % 2)

    async def main() -> None:
        clients = [remote.connect(host.address) for _ in range(2)]
        try:
            for name, client in zip(names, clients):
                client.process_message = collector(name)
            loop = asyncio.get_running_loop()
            in_thread = loop.run_in_executor(None, sync_work)
            calls = []
            for r in range(rounds):   # interleaved: both workers serve every client at once
                for name, client in zip(names, clients):
                    calls.append(client.submit(('put', (name, r, 0), (name, r, 1)),
                                               worker_num=r % 2))
                    client.put_nowait(('put', (name, r, 'note')), worker_num=r % 2)
            assert await asyncio.wait_for(asyncio.gather(*calls), 30) == [2] * len(calls)
            await asyncio.wait_for(in_thread, 30)
            total = len(names) * rounds * 4
            # Wherever they went, every result arrives; then each must be with its owner.
            await wait_until(lambda: sum(map(len, got.values())) >= total, 10,
                             'every result to reach some client')
            for name in names:
                assert received(name) == expected(name), name
        finally:
            for client in clients:
                await client.close()

    try:
        run(main())
    finally:
        sync_client.close()


def _start_shared_then_leave(address: str, idle: float, out: multiprocessing.Queue,
                             leave) -> None:
    client = remote.shared(Echo, address, idle_timeout=idle, sync=True, pool_size=1)
    out.put((client.created_new_pool, client.stats()['host_pid']))
    leave.wait(30)
    # As a recycled web worker may end: no close(), the kernel drops the connection.
    os._exit(0)


def test_a_shared_host_outlives_the_process_that_started_it(sock_path) -> None:
    idle = 1.0
    ctx = multiprocessing.get_context('fork')
    out, leave = ctx.Queue(), ctx.Event()
    winner = ctx.Process(target=_start_shared_then_leave, args=(sock_path, idle, out, leave))
    winner.start()
    host_pid = None
    try:
        created, host_pid = out.get(timeout=60)
        assert created
        host = psutil.Process(host_pid)
        assert host.ppid() != winner.pid
        client = remote.shared(Echo, sock_path, idle_timeout=idle, sync=True, pool_size=1)
        try:
            assert not client.created_new_pool
            stats = client.stats()
            assert stats['host_pid'] == host_pid and stats['clients'] == 2
            leave.set()
            winner.join(10)
            assert winner.exitcode == 0
            wait_for(lambda: client.stats()['clients'] == 1, 10,
                     'the host to see the starting process leave')
            # Three idle timeouts later the host still runs, and still serves this client.
            with pytest.raises(psutil.TimeoutExpired):
                host.wait(timeout=3 * idle)
            assert client.submit('still served') == 'still served'
            assert client.stats()['host_pid'] == host_pid
        finally:
            client.close()
        # With no client left it waits idle_timeout, then exits and removes its socket.
        with pytest.raises(psutil.TimeoutExpired):
            host.wait(timeout=idle / 2)
        host.wait(timeout=15)
        assert not os.path.exists(sock_path)
    finally:
        leave.set()
        winner.join(10)
        out.close()
        out.join_thread()
        if host_pid is not None and _alive(host_pid):   # a failed test: do not leave it
            os.kill(host_pid, signal.SIGKILL)


def test_the_sync_client_reconnects_after_the_host_is_lost(sock_path) -> None:
    first = remote.serve(Echo, sock_path, pool_size=1, restart=False)
    second = None
    client = remote.connect_sync(first.address)
    try:
        assert client.submit(1) == 1
        first_workers = client.broadcast(('pid',))
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                outcome['reply'] = client.submit(('sleep', 30))
            except BaseException as exc:
                outcome['error'] = exc

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: client.stats()['in_flight'] == 1, 10, 'the call to reach a worker')
        os.kill(first.pid, signal.SIGKILL)
        caller.join(10)
        assert not caller.is_alive(), 'the call in flight did not end when the host died'
        error = outcome.get('error')
        assert isinstance(error, remote.ConnectionLost), outcome
        assert 'next call connects again' in str(error) and sock_path in str(error)
        wait_for(lambda: not _alive(first.pid), 10, 'the killed host to be gone')
        with pytest.raises(remote.ConnectionLost, match='could not connect'):
            client.submit(2)   # no host there yet: said at once, not a hang
        second = remote.serve(Echo, sock_path, pool_size=1)
        assert client.submit('again') == 'again'
        assert client.stats()['host_pid'] == second.pid != first.pid
        assert client.broadcast(('pid',)) != first_workers
        wait_for(lambda: not any(_alive(pid) for pid in first_workers), 10,
                 "the killed host's workers to exit")
    finally:
        client.close()
        first.stop()
        if second is not None:
            second.stop()
