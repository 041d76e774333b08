"""Workers that configure logging themselves, each at a different point of their life;
importable by spawned and forkserver workers. Each writes to the file named by
``LOOPPOOL_TEST_LOG_FILE``, one line a record: ``pid LEVEL logger message``."""

from __future__ import annotations

import logging
import logging.config
import os
from typing import Any

import looppool
from looppool03_instrumented import InstrumentatedWorker

FORMAT = '%(process)d %(levelname)s %(name)s %(message)s'


def file_handler() -> logging.Handler:
    handler = logging.FileHandler(os.environ['LOOPPOOL_TEST_LOG_FILE'])
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def dict_config() -> None:
    logging.config.dictConfig({
        'version': 1,
        # Loggers made before (inherited under fork) would be disabled otherwise.
        'disable_existing_loggers': False,
        'formatters': {'plain': {'format': FORMAT}},
        'handlers': {'file': {'class': 'logging.FileHandler', 'formatter': 'plain',
                              'filename': os.environ['LOOPPOOL_TEST_LOG_FILE']}},
        'root': {'handlers': ['file'], 'level': 'INFO'},
    })


class LoggingInstrumentatedWorker(InstrumentatedWorker):
    """The README's worker, and a warning for every message it handles."""

    def _process_message(self, message: Any) -> Any:
        logging.getLogger('app.instrumented').warning('worker %d got %r', self._number,
                                                      message)
        return super()._process_message(message)


class ConfiguresLogging(looppool.Worker):
    """Configures logging where ``where`` says; every message is logged at WARNING."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.configured = False
        if where == 'constructor':
            logging.basicConfig(handlers=[file_handler()])

    def _initialise(self) -> None:
        if self.where == 'initialise, basicConfig(force=True)':
            logging.basicConfig(handlers=[file_handler()], force=True)

    def start(self) -> None:
        super().start()
        if self.where == 'start, dictConfig':
            dict_config()

    async def handle(self, message: Any) -> int:
        if self.where == 'handler, later' and not self.configured:
            logging.basicConfig(handlers=[file_handler()])
        self.configured = True
        logging.getLogger('app.worker').warning('worker %d got %r', self._number, message)
        return os.getpid()
