"""A worker whose module configures a handler when it is imported, as many applications'
modules do: in the parent that imports it, and again in a spawned worker that imports it."""

from __future__ import annotations

import logging
import os
from typing import Any

import looppool
from logging_workers import file_handler

logger = logging.getLogger('app.at_import')
if os.environ.get('LOOPPOOL_TEST_LOG_FILE'):
    handler = file_handler()
    logger.addHandler(handler)


class LogsAtImport(looppool.Worker):
    async def handle(self, message: Any) -> int:
        logger.warning('worker %d got %r', self._number, message)
        return os.getpid()
