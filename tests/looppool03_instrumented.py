# The "Instrumentated worker" of the Looppool 0.3 README, as it is printed there but for its
# Sentry lines (raven is not a dependency): the compatibility test runs this text unchanged.

import logging

import looppool
from looppool.utility import ResourceReporter 
from statsd import StatsClient
from setproctitle import setproctitle


class InstrumentatedWorker(looppool.Worker):

    _resource_reporter = None
    '''CPU, RSS and IO loop stats reporter'''
    
    
    def _initialise(self):
        setproctitle('python APP_NAME POOL_NAME pool worker')
        
        statsd = StatsClient('localhost', 8125, 'APP_PREFIX')
        self._resource_reporter = ResourceReporter(self._ioloop, statsd,
            'worker.instrumentated.process.{}'.format(self._number))
    
    @looppool.task_done
    def _process_message(self, message):
        self._put_nowait((message, self._number))
        
    def start(self):
        super().start()
        
        self._resource_reporter.start()
        
    def join(self):
        self._resource_reporter.stop()
        
        super().join()
