"""Worker classes for test_serve.py: hosts that fail to start, on purpose. Importable by
spawned and forkserver processes (the tests directory is on their path)."""

from __future__ import annotations

import os
import time

from workers import Echo

# The path of a file whose existence makes FailsWhileFlagged refuse to start. An
# environment variable reaches the host however it was started, and a file can be made
# and removed while the host runs.
FLAG = 'LOOPPOOL_TEST_FAIL_FLAG'


class FailsWhileFlagged(Echo):
    """An :class:`Echo` that cannot start while the file named by ``$LOOPPOOL_TEST_FAIL_FLAG``
    exists: a host of it keeps failing at start until the file is removed."""

    def _initialise(self) -> None:
        flag = os.environ.get(FLAG)
        if flag and os.path.exists(flag):
            raise RuntimeError(f'{flag} exists: this worker refuses to start')
        super()._initialise()


class NeverStarts(Echo):
    """Its ``_initialise()`` always raises."""

    def _initialise(self) -> None:
        raise RuntimeError('this worker never starts')


class NeverReady(Echo):
    """Its ``_initialise()`` blocks for a minute: a host of it is never ready in time."""

    def _initialise(self) -> None:
        time.sleep(60)
