"""What the web server examples (``server_*.py``) share: the pool workers
(``PasswordHasher``, and ``BatchHasher``, its batch form for ``server_fastapi.py``), and
the demo client that runs a server, sends it requests and checks what happened.

The worker classes live in a module of their own, not in the programs that use them, for
two reasons. A web server loads its application by module name (``gunicorn
server_gunicorn:app``), and a host started by :func:`looppool.remote.shared` is a fresh
interpreter that imports the worker class by module name too; a class defined in a
``__main__`` module can be found by neither.

The demo client is not part of any deployment: it stands in for the users of the web
service. It starts the server program as a subprocess, reads what the server prints,
fires real HTTP requests at it until every web worker has been answered by every pool
worker, prints who answered whom, stops the server with SIGTERM and checks that the pool
host and its workers are gone. Each server program prints these lines for it::

    listening on http://127.0.0.1:PORT
    web worker pid PID ready            (once per web worker process)

(the gunicorn configurations print them with this module's ``when_ready`` and
``post_worker_init`` hooks).

This module is not an example to run; ``python examples/shared_workers.py`` says so.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import psutil

import looppool

# PBKDF2 rounds per password: a few milliseconds of pure CPU, the kind of work that blocks
# a web worker's loop (or holds one of its threads) for as long as it lasts.
ROUNDS = 20_000


class PasswordHasher(looppool.Worker):
    """Hashes passwords for the web workers, and says which process did it.

    One instance runs in each pool worker process, inside the pool host: every web worker
    of a server reaches the same few instances.
    """

    def _initialise(self):
        self.hashed = 0
        # The process that started this worker is the pool host, whatever the start method.
        parent = multiprocessing.parent_process()
        self.host_pid = parent.pid if parent is not None else os.getppid()

    # A plain method: the work is CPU-bound, there is nothing to await.
    def handle(self, message):
        password, salt = message
        return self.hash(password, salt)

    def hash(self, password, salt):
        digest = hashlib.pbkdf2_hmac('sha256', password.encode(), salt.encode(), ROUNDS)
        self.hashed += 1
        return {
            'digest': digest.hex()[:16],
            'pool_worker': self._number,
            'pool_pid': os.getpid(),
            'host_pid': self.host_pid,
        }


class BatchHasher(PasswordHasher):
    """Hashes the passwords a batch at a time, the way a model scores a batch of inputs
    in one call (``server_fastapi.py``), and says in which batch each one came.

    Each message is ``(password, salt, web_pid)``: the web worker that asked rides along,
    so that a reply can tell which web workers' requests shared its batch.
    """

    def _initialise(self):
        super()._initialise()
        self.batches = 0

    async def handle_batch(self, messages):
        self.batches += 1
        web_pids = sorted({web_pid for _, _, web_pid in messages})
        replies = []
        for password, salt, _ in messages:
            reply = self.hash(password, salt)
            reply.update(batch=self.batches, batch_size=len(messages),
                         batch_web_pids=web_pids)
            replies.append(reply)
        return replies   # one per message, in order


def say(text):
    """Print one line in one write, so that lines from the several processes of a server
    sharing one pipe do not interleave (``print`` may write the text and the newline
    separately)."""
    sys.stdout.write(text + '\n')
    sys.stdout.flush()


def hash_query(environ_query):
    """The ``(password, salt)`` message for a ``/hash?password=...&salt=...`` query string,
    or ``None`` when the password is missing. The web handlers of every example use it."""
    query = urllib.parse.parse_qs(environ_query)
    if 'password' not in query:
        return None
    return query['password'][0], query.get('salt', ['looppool-demo'])[0]


# -- the demo's lines from gunicorn's master -----------------------------------------------

def when_ready(server):
    """gunicorn's hook once the master listens: says where, for the demo client."""
    for listener in server.LISTENERS:
        say(f'listening on {listener}')


def post_worker_init(worker):
    """gunicorn's hook in each web worker: says it is there, for the demo client."""
    say(f'web worker pid {worker.pid} ready')


# -- the demo client -------------------------------------------------------------------------

class ServerProcess:
    """A web server program run for the demo, in a session (process group) of its own.

    Its standard output and error arrive on one pipe, which this object reads without
    threads, with a deadline; each line is echoed, indented, as it is read.
    """

    def __init__(self, name, command, *, cwd=None, env=None):
        self.name = name
        print(f'starting {name}: {" ".join(command)}', flush=True)
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env,
            start_new_session=True)
        self.output = []
        self._buffer = b''
        self._eof = False

    def expect(self, pattern, timeout=20.0):
        """Read the server's output until a line matches ``pattern``; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            while self._buffer.count(b'\n') or (self._eof and self._buffer):
                match = re.search(pattern, self._next_line())
                if match:
                    return match
            if self._eof:
                raise RuntimeError(f'{self.name} exited (code {self.process.wait()}) before '
                                   f'printing a line matching {pattern!r}')
            if not self._read(deadline - time.monotonic()):
                raise TimeoutError(f'{self.name} printed no line matching {pattern!r} '
                                   f'within {timeout} s')

    def stop(self, timeout=20.0):
        """SIGTERM to the server's main process, as a process manager stops a server;
        read the rest of its output and return its exit code. A server that has not
        exited after ``timeout`` seconds is an error: its whole session is killed."""
        print(f'stopping {self.name} (SIGTERM to pid {self.process.pid})', flush=True)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not self._eof and self._read(deadline - time.monotonic()):
            pass
        while self._buffer:
            self._next_line()
        try:
            code = self.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        self.process.stdout.close()
        if code is None or not self._eof:
            self.kill()
            raise RuntimeError(f'{self.name} did not stop within {timeout} s; killed it')
        return code

    def kill(self):
        """Kill everything in the server's session (the demo failed)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process.stdout.close()

    def _read(self, timeout):
        if timeout <= 0:
            return False
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        data = os.read(fd, 65536)
        if data:
            self._buffer += data
        else:
            self._eof = True
        return True

    def _next_line(self):
        line, _, rest = self._buffer.partition(b'\n')
        self._buffer = rest
        text = line.decode(errors='replace')
        self.output.append(text)
        print(f'    [{self.name}] {text}', flush=True)
        return text


def fetch(url):
    """GET ``url``; return the status and the decoded JSON body (or the error text)."""
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode(errors='replace')


def fire_requests(urls, web_pids, pool_size, timeout=15.0, until=None):
    """Send bursts of concurrent ``GET /hash`` requests (spread over ``urls``) until each
    web worker in ``web_pids`` has been answered by ``pool_size`` pool workers (and
    ``until(replies)`` is true, if given); return the replies. Which web worker takes a
    request is up to the kernel, and which pool worker answers is up to the host's
    round-robin, hence the bursts."""
    answered = {pid: set() for pid in web_pids}
    replies = []
    burst = 2 * len(web_pids) * pool_size
    deadline = time.monotonic() + timeout
    sent = 0
    with concurrent.futures.ThreadPoolExecutor(burst) as executor:
        while time.monotonic() < deadline and not (all(
                len(pool_pids) >= pool_size for pool_pids in answered.values())
                and (until is None or until(replies))):
            passwords = [f'password {number}' for number in range(sent, sent + burst)]
            futures = [executor.submit(fetch, urls[number % len(urls)] + '/hash?'
                                       + urllib.parse.urlencode({'password': password}))
                       for number, password in zip(range(sent, sent + burst), passwords)]
            sent += burst
            for password, future in zip(passwords, futures):
                status, reply = future.result()
                if status != 200:
                    print(f'HTTP {status} for {password!r}: {reply}')
                    replies.append({'status': status})
                    continue
                replies.append(dict(reply, status=status))
                answered.setdefault(reply['web_pid'], set()).add(reply['pool_pid'])
                print(f'HTTP {status} from web worker {reply["web_pid"]}: {password!r} '
                      f'hashed by pool worker {reply["pool_worker"]} '
                      f'(pid {reply["pool_pid"]}) -> {reply["digest"]}')
    return replies


def summarise(replies, web_pids):
    """Print which pool workers answered each web worker; return whether every request
    succeeded and every web worker was answered by the same pool workers of one host."""
    ok = bool(replies) and all(reply['status'] == 200 for reply in replies)
    by_web_worker = {pid: set() for pid in web_pids}
    hosts = set()
    for reply in replies:
        if reply['status'] == 200:
            by_web_worker.setdefault(reply['web_pid'], set()).add(reply['pool_pid'])
            hosts.add(reply['host_pid'])
    for web_pid, pool_pids in sorted(by_web_worker.items()):
        print(f'web worker {web_pid} was answered by pool worker pids '
              f'{", ".join(map(str, sorted(pool_pids))) or "(none)"}')
    pool_sets = {frozenset(pool_pids) for pool_pids in by_web_worker.values()}
    if ok and len(pool_sets) == 1 and len(hosts) == 1:
        pool_pids = sorted(pool_sets.pop())
        print(f'all {len(by_web_worker)} web workers were answered by the same '
              f'{len(pool_pids)} pool workers (pids {", ".join(map(str, pool_pids))}) '
              f'of pool host {hosts.pop()}')
        return True
    problems = []
    failed = sum(reply['status'] != 200 for reply in replies)
    if failed or not replies:
        problems.append(f'{failed} of {len(replies)} requests failed')
    if len(hosts) != 1:
        problems.append(f'pool host pids seen: {sorted(hosts)}')
    if len(pool_sets) != 1:
        problems.append('the web workers were not all answered by the same pool workers')
    print('FAILED: ' + '; '.join(problems))
    return False


def gone(pids, timeout):
    """Wait up to ``timeout`` seconds for the processes ``pids`` to exit; return those
    still running."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    still = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                still.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return still


def demo(servers, *, web_workers, pool_size, host_timeout=10.0, until=None, report=None):
    """Run the demo against ``servers`` (:class:`ServerProcess` objects, already started)
    that together run ``web_workers`` web worker processes; return the exit status for
    the example: 0 when every check passed.

    ``host_timeout``: how long the pool host may take to exit once the servers stopped
    (a host made by :func:`~looppool.remote.shared` waits for its idle timeout first).
    ``until``: the requests go on until ``until(replies)`` is true too (or time is up).
    ``report``: called with the replies before the servers stop; prints what the
    example shows besides, and returns whether that is as it should be.
    """
    replies = []
    codes = []
    try:
        urls = [server.expect(r'listening on (http://\S+)').group(1) for server in servers]
        web_pids = []
        for index in range(web_workers):
            server = servers[index % len(servers)]
            web_pids.append(int(server.expect(r'web worker pid (\d+) ready').group(1)))
        replies = fire_requests(urls, web_pids, pool_size, until=until)
        ok = summarise(replies, web_pids)
        if report is not None:
            ok = report(replies) and ok
    except BaseException:
        for server in servers:
            server.kill()
        raise
    for server in servers:
        codes.append(server.stop())
    print(f'the server exited with code {", ".join(map(str, codes))}'
          if len(codes) == 1 else
          f'the servers exited with codes {", ".join(map(str, codes))}')
    hosts = {reply['host_pid'] for reply in replies if reply['status'] == 200}
    pool_pids = {reply['pool_pid'] for reply in replies if reply['status'] == 200}
    left = gone(sorted(hosts | pool_pids), host_timeout)
    if left:
        print(f'FAILED: still running after the server stopped: pids {left}')
        return 1
    print(f'the pool host (pid {", ".join(map(str, sorted(hosts)))}) and its pool workers '
          f'(pids {", ".join(map(str, sorted(pool_pids)))}) have exited')
    return 0 if ok and not any(codes) else 1



@contextlib.contextmanager
def private_socket(prefix):
    """A path for the pool host's socket, in a fresh directory only this user may enter
    (mode 0700), removed afterwards."""
    directory = tempfile.mkdtemp(prefix=prefix)
    try:
        yield os.path.join(directory, 'pool.sock')
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def socket_removed(address):
    """Whether the stopped host removed its socket (and says so if it did not)."""
    if os.path.exists(address):
        print(f'FAILED: the socket {address} is still there')
        return False
    return True


def gunicorn_demo(config, *, pool_size, until=None, report=None):
    """Run the demo against gunicorn started with the configuration file ``config`` (in
    this directory) on a free port, its pool host at a private socket;
    ``report(replies, address)``, if given, reports besides (see :func:`demo`). Returns
    the exit status for the example."""
    here = os.path.dirname(os.path.abspath(__file__))
    with private_socket('looppool-gunicorn-') as address:
        environment = dict(os.environ, POOL_ADDRESS=address, GUNICORN_BIND='127.0.0.1:0')
        server = ServerProcess(
            'gunicorn', [sys.executable, '-m', 'gunicorn', '--config', config],
            cwd=here, env=environment)
        status = demo([server], web_workers=2, pool_size=pool_size, until=until,
                      report=report and (lambda replies: report(replies, address)))
        return status if socket_removed(address) else 1


if __name__ == '__main__':
    print('shared_workers.py holds what the server examples share; run one of them '
          'instead, e.g. python examples/server_tornado.py')
    sys.exit(0)
