"""Worker classes for test_dispatch.py: handlers that hold their loop, sleep or die on
request. Importable by spawned and forkserver workers (the tests directory is on their
path)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import looppool


def spin(seconds: float) -> tuple[int, float]:
    """Hold the loop (busy, no await) until this process has used ``seconds`` of CPU time
    (so that the CPU time a worker is given is the work it was dealt, however loaded the
    machine); return this process's pid and the CPU time it used."""
    cpu = time.process_time()
    deadline = cpu + seconds
    while time.process_time() < deadline:
        pass
    return os.getpid(), time.process_time() - cpu


class Balance(looppool.Worker):
    """``('pid',)`` answers the pid; ``('spin', s)`` holds the loop ``s`` seconds and answers
    ``(pid, cpu_time_used)``; ``('sleep', s)`` awaits ``s`` seconds and answers the pid;
    ``('exit', code)`` ends the process at once with ``code``."""

    async def handle(self, message: Any) -> Any:
        kind, *args = message
        if kind == 'pid':
            return os.getpid()
        if kind == 'spin':
            return spin(*args)
        if kind == 'sleep':
            await asyncio.sleep(*args)
            return os.getpid()
        if kind == 'exit':
            os._exit(*args)
        raise ValueError(f'unknown message {message!r}')


class RoundRobin(looppool.Worker):
    """A Looppool 0.3 style worker: ``_process_message`` (spinning first for ``('spin', s)``)
    sends ``(message, worker number, pid)`` back with ``_put_nowait``."""

    @looppool.task_done
    def _process_message(self, message: Any) -> None:
        if message[0] == 'spin':
            spin(message[1])
        self._put_nowait((message, self._number, os.getpid()))
