"""``python -m looppool``: look at and control a served pool from the command line.

::

    python -m looppool status ADDRESS [--json]
    python -m looppool pause ADDRESS
    python -m looppool resume ADDRESS
    python -m looppool restart ADDRESS

``ADDRESS`` is the pool host's Unix socket path, or ``host:port`` for TCP (then
``--secret-file`` names a file holding the shared secret, and ``--ca-file`` a CA
certificate for TLS). ``pause``, ``resume`` and ``restart`` return once the change is
complete. Exit codes: 0 done, 1 refused or failed (the message says why), 2 usage.

The host's access control applies: the command is a client like any other (same user for
a Unix socket, the secret for TCP).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from .errors import LooppoolError
from .remote import connect_sync

COMMANDS = ('status', 'pause', 'resume', 'restart')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m looppool',
        description='Show or change the state of a pool served with looppool.remote.serve() '
                    'or shared().')
    parser.add_argument('command', choices=COMMANDS)
    parser.add_argument('address', help='the Unix socket path, or host:port')
    parser.add_argument('--secret-file', help='a file holding the secret (TCP)')
    parser.add_argument('--ca-file', help='a CA certificate to verify the host (TLS)')
    parser.add_argument('--json', action='store_true',
                        help='status: print the stats as JSON, for scripts')
    parser.add_argument('--timeout', type=float, default=None,
                        help='give up after this many seconds (default: wait)')
    args = parser.parse_args(argv)
    try:
        address = _address(args.address)
        secret = _secret(args.secret_file)
    except ValueError as exc:
        parser.error(str(exc))   # exits with 2
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    try:
        with connect_sync(address, secret=secret, ssl_context=context) as client:
            if args.command == 'status':
                stats = client.stats()
                print(json.dumps(stats, indent=2, sort_keys=True) if args.json
                      else format_status(stats))
            else:
                state = getattr(client, args.command)(timeout=args.timeout)
                print(f'{args.command}: done; the pool is {state}')
    except (LooppoolError, OSError, TimeoutError, ValueError) as exc:
        print(f'python -m looppool {args.command}: {exc}', file=sys.stderr)
        return 1
    return 0


def _count(number: int, noun: str) -> str:
    return f'{number} {noun}' if number == 1 else f'{number} {noun}s'


def format_status(stats: dict[str, Any]) -> str:
    """The stats of a served pool as a table a person reads at a glance."""
    lines = [f"pool: {stats['state']}, {_count(stats['pool_size'], 'worker')}, "
             f"{_count(stats.get('clients', 0), 'client')}, "
             f"host pid {stats.get('host_pid', '?')}",
             f"tasks: {stats['in_flight']} in flight, {stats['waiting']} waiting, "
             f"{stats['completed']} completed, {stats['failed']} failed,",
             f"       {stats['lost']} lost; {_count(stats['restarts'], 'worker restart')}",
             '']
    header = ('worker', 'pid', 'state', 'in flight', 'done', 'RSS', 'loop lag')
    rows = [header]
    for worker in stats['workers']:
        rows.append((str(worker['number']), str(worker['pid'] or '-'), worker['state'],
                     str(worker['in_flight']), str(worker.get('done', 0)),
                     _mebibytes(worker.get('rss')),
                     f"{worker['lag'] * 1000:.0f} ms" if worker.get('lag') else '-'))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = [cell.ljust(width) if column == 2 else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append('  '.join(cells).rstrip())
    return '\n'.join(lines)


def _mebibytes(size: int | None) -> str:
    return '-' if not size else f'{size / 2 ** 20:.1f} MiB'


def _address(text: str) -> str | tuple[str, int]:
    """A socket path (it has a slash, or no colon), or ``host:port``."""
    if '/' in text or ':' not in text:
        return text
    host, _, port = text.rpartition(':')
    if not port.isdigit() or not host:
        raise ValueError(f'ADDRESS must be a socket path or host:port, got {text!r}')
    return host.strip('[]'), int(port)


def _secret(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, 'rb') as file:
            return file.read().strip()
    except OSError as exc:
        raise ValueError(f'cannot read --secret-file: {exc}') from None
