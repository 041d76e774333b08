# The "Instrumentated worker" of the Looppool 0.3 README, as it is printed there: the
# compatibility tests run this text unchanged. raven (Sentry's old client) is not a
# dependency, so the three names the README imports from it are stood in for below: the
# "Sentry handler" is a logging.FileHandler writing to the file named by the
# LOOPPOOL_TEST_SENTRY_FILE environment variable, and a DSN is invalid when that variable
# is not set.

import logging
import os

import looppool
from looppool.utility import ResourceReporter 
from statsd import StatsClient
from setproctitle import setproctitle


class InvalidDsn(ValueError):
    """Stands in for raven.exceptions.InvalidDsn."""


def Client(dsn):
    """Stands in for raven.Client: the path of the file that plays Sentry."""
    path = os.environ.get('LOOPPOOL_TEST_SENTRY_FILE')
    if not path:
        raise InvalidDsn(f'{dsn}: LOOPPOOL_TEST_SENTRY_FILE is not set')
    return path


def SentryHandler(client):
    """Stands in for raven.handlers.logging.SentryHandler: a handler of its own process."""
    handler = logging.FileHandler(client)
    handler.setFormatter(logging.Formatter('%(process)d %(levelname)s %(name)s %(message)s'))
    return handler


class InstrumentatedWorker(looppool.Worker):

    _resource_reporter = None
    '''CPU, RSS and IO loop stats reporter'''
    
    
    def _initialise(self):
        setproctitle('python APP_NAME POOL_NAME pool worker')
        
        statsd = StatsClient('localhost', 8125, 'APP_PREFIX')
        self._resource_reporter = ResourceReporter(self._ioloop, statsd,
            'worker.instrumentated.process.{}'.format(self._number))
        
        try:
            handler = SentryHandler(Client('SENTRY_DSN'))
            handler.setLevel(logging.WARNING)
        except InvalidDsn:
            logging.exception('Cannot configure Sentry handler')
        else:
            logging.basicConfig(handlers=[handler], level=logging.WARNING)
    
    @looppool.task_done
    def _process_message(self, message):
        self._put_nowait((message, self._number))
        
    def start(self):
        super().start()
        
        self._resource_reporter.start()
        
    def join(self):
        self._resource_reporter.stop()
        
        super().join()
