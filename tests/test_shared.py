"""shared(): create-or-connect, checked as a local user who does not trust the machine's
other users would check it."""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import psutil
import pytest

import looppool
from looppool import remote
from conftest import wait_for
from test_auth import SECRET, FakeHost, welcome_without_proof
from workers import Batched, Chatty, Echo, FailingStart

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(looppool.__path__[0])
TESTS = os.path.dirname(__file__)



@pytest.fixture
def host_pids() -> Iterator[list[int]]:
    """Detached hosts are nobody's children: the test lists them here to be stopped."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            host = psutil.Process(pid)
            host.send_signal(signal.SIGTERM)
            host.wait(15)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:   # pragma: no cover - a host that hangs
            host.kill()


def test_a_tcp_listener_that_cannot_prove_the_secret_is_not_taken_for_the_host(mark) -> None:
    path, pickled = mark
    fake = FakeHost(('127.0.0.1', 0), welcome_without_proof(pickled))
    try:
        with pytest.raises(remote.AuthenticationError, match='could not prove'):
            remote.shared(Echo, fake.address, secret=SECRET, pool_size=1)
    finally:
        fake.close()
    assert not os.path.exists(path)


def test_a_symlinked_runtime_directory_is_refused(tmp_path, monkeypatch) -> None:
    runtime = tmp_path / 'xdg'
    runtime.mkdir(mode=0o700)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, runtime / f'looppool-{os.getuid()}')
    monkeypatch.setenv('XDG_RUNTIME_DIR', str(runtime))
    with pytest.raises(PermissionError, match='symbolic link'):
        remote.serve(Echo, pool_size=1)
    with pytest.raises(PermissionError, match='symbolic link'):
        remote.shared(Echo, pool_size=1)
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize('target', ['dangling', 'existing'])
def test_a_symlinked_lock_file_is_not_followed(sock_path, tmp_path, target) -> None:
    victim = tmp_path / 'victim'
    if target == 'existing':
        victim.write_bytes(b'keep me')
        victim.chmod(0o644)
    os.symlink(victim, sock_path + '.lock')
    with pytest.raises(OSError):
        remote.shared(Echo, sock_path, pool_size=1)
    if target == 'existing':
        assert victim.read_bytes() == b'keep me'
        assert victim.stat().st_mode & 0o777 == 0o644
    else:
        assert not victim.exists()


def test_a_lock_held_by_another_process_is_waited_on_for_a_bounded_time(sock_path) -> None:
    # flock() locks conflict between two open files, even in one process: this one plays the
    # other process, which holds the lock and never lets go.
    holder = os.open(sock_path + '.lock', os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match='lock'):
            remote.shared(Echo, sock_path, pool_size=1, start_timeout=0.5)
    finally:
        os.close(holder)


def _script(tmp_path, body: str) -> str:
    path = tmp_path / 'app' / 'main.py'
    path.parent.mkdir()
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_a_class_from_the_main_script_is_shared_and_the_working_directory_is_not_imported(
        tmp_path, sock_path, host_pids) -> None:
    # The caller's working directory holds a module named like one of the standard library's
    # that the host imports; the caller never imports from there (its script is elsewhere),
    # so neither may the host.
    work = tmp_path / 'work'
    work.mkdir()
    trap = tmp_path / 'trap'
    (work / 'hmac.py').write_text(f'open({str(trap)!r}, "w").close()\n'
                                  'raise ImportError("the wrong hmac")\n')
    script = _script(tmp_path, f'''
        import looppool
        from looppool import remote

        class Doubler(looppool.Worker):
            async def handle(self, message):
                return message * 2

        if __name__ == '__main__':
            client = remote.shared(Doubler, {sock_path!r}, sync=True, pool_size=1)
            print(client.submit(21), client.stats()['host_pid'], flush=True)
            client.close()
    ''')
    done = subprocess.run([sys.executable, script], cwd=work, capture_output=True, text=True,
                          timeout=90, env={**os.environ, 'PYTHONPATH': ROOT})
    assert done.returncode == 0, done.stderr
    answer, pid = done.stdout.split()
    host_pids.append(int(pid))
    assert answer == '42'
    assert not trap.exists(), 'the host imported a module from the caller\'s directory'


def test_a_class_made_inside_a_function_gets_a_clear_error(sock_path) -> None:
    class Local(looppool.Worker):
        pass
    Local.__module__ = '__main__'
    with pytest.raises(ValueError, match='cannot be found there by name'):
        remote.shared(Local, sock_path)


def test_shared_over_tls(tmp_path, host_pids) -> None:
    cert, key = tmp_path / 'cert.pem', tmp_path / 'key.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
                    '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1',
                    '-keyout', str(key), '-out', str(cert)], check=True, capture_output=True)
    with socket.socket() as probe:   # a free port, for a host this test starts itself
        probe.bind(('127.0.0.1', 0))
        address = ('127.0.0.1', probe.getsockname()[1])
    with pytest.raises(ValueError, match='certfile and keyfile'):
        remote.shared(Echo, address, secret=SECRET, certfile=str(cert))
    with pytest.raises(ValueError, match='pass certfile and keyfile'):
        remote.shared(Echo, address, secret=SECRET, ssl_context=object())
    # Missing files are named here, not by a host that fails to start.
    missing = str(tmp_path / 'missing.pem')
    for name, paths in (('certfile', (missing, key, None)), ('keyfile', (cert, missing, None)),
                        ('cafile', (cert, key, missing))):
        with pytest.raises(FileNotFoundError, match=f'{name} .*is not a file'):
            remote.shared(Echo, address, secret=SECRET, certfile=str(paths[0]),
                          keyfile=str(paths[1]), cafile=paths[2])
    client = remote.shared(Echo, address, secret=SECRET, certfile=str(cert),
                           keyfile=str(key), sync=True, pool_size=1)
    try:
        host_pids.append(client.stats()['host_pid'])
        assert client.created_new_pool
        assert client.submit('over tls') == 'over tls'
        again = remote.shared(Echo, address, secret=SECRET, certfile=str(cert),
                              keyfile=str(key), sync=True, pool_size=1)
        assert not again.created_new_pool and again.submit(2) == 2
        again.close()
        # A client without TLS does not get through.
        plain = remote.connect_sync(address, secret=SECRET, connect_timeout=1)
        with pytest.raises(remote.ConnectionLost):
            plain.submit(1)
        plain.close()
    finally:
        client.close()


def test_the_shared_hosts_output_goes_to_its_log(sock_path, host_pids) -> None:
    client = remote.shared(Chatty, sock_path, sync=True, pool_size=1)
    try:
        host_pids.append(client.stats()['host_pid'])
        assert client.submit('fail') == 'logged'
        log = pathlib.Path(sock_path + '.log')
        wait_for(lambda: log.exists() and 'the parser choked' in log.read_text(),
                 what='the worker\'s log record in the host\'s log file')
        text = log.read_text()
        assert 'could not handle fail' in text and 'pool host starting' in text
        assert os.stat(log).st_mode & 0o777 == 0o600
    finally:
        client.close()


def test_a_shared_host_batches_with_the_options_it_was_given(sock_path, host_pids) -> None:
    """shared() passes batch_size and batch_timeout to its host's pool: four requests
    made at once from four threads are one batch. A _put_nowait() in handle_batch
    belongs to no client: the host drops it, and says so in its log."""
    client = remote.shared(Batched, sock_path, sync=True, pool_size=1, batch_size=4,
                           batch_timeout=30.0)
    try:
        host_pids.append(client.stats()['host_pid'])
        messages = ['a', 'b', 'c', ('put', 'for nobody')]
        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            replies = list(threads.map(lambda m: client.submit(m, timeout=20), messages))
        assert sorted(str(message) for message, *_ in replies) == sorted(map(str, messages))
        assert {(number, size) for _, number, size, _ in replies} == {(1, 4)}
        assert client.stats()['batches'] == {'count': 1, 'messages': 4, 'sizes': {4: 1}}
        log = pathlib.Path(sock_path + '.log')
        wait_for(lambda: log.exists() and 'belongs to no one client' in log.read_text(),
                 what='the host\'s warning about a result from handle_batch')
    finally:
        client.close()


def test_a_host_that_cannot_start_names_its_log(sock_path) -> None:
    with pytest.raises(RuntimeError, match=r'its log is .*echo\.sock\.log'):
        remote.shared(FailingStart, sock_path, pool_size=1)
