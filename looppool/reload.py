"""Live reload for development: ``Pool(..., reload=True)`` restarts the workers on the new
code when a source file of the application changes.

- **What is watched**: the directories of the worker class's module and of every module
  of the application this process has imported (a module whose file is not in the
  standard library, in site-packages or in looppool itself), not recursively; a change
  to any ``.py`` file there counts. Watching uses the kernel's notifications (inotify on
  Linux) through ``watchfiles``, an optional extra: ``pip install "looppool[reload]"``.
- **What happens**: each changed file is compiled first; a syntax error is logged with its
  file and line, and the workers keep serving the last good code. Otherwise the pool does
  a rolling restart (:meth:`Pool.restart <looppool.Pool.restart>`): no request fails. A
  replacement that cannot start (an import error, ``_initialise`` raising) stops the
  restart; the error is logged with its traceback and the other workers keep serving.
  Saving a fix reloads again.
- **Fresh interpreters, fast**: a fork of this process would carry the old modules, and a
  spawned interpreter takes a while to import Tornado and looppool. So a reloading pool
  starts its workers from a *forkserver* that has imported looppool and Tornado, and
  nothing of the application: each worker is a fork of that small process, which then
  imports the application's modules from disk. ``mp_context='spawn'`` is allowed too;
  ``'fork'`` is refused.

Who owns what: the :class:`Reloader` owns the watch (its task and stop event). It lives
in the parent, on the pool's loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import multiprocessing
import multiprocessing.context
import os
import site
import sys
import sysconfig
from typing import TYPE_CHECKING, Any

from .errors import PoolClosed, WorkerStartError

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger('looppool')

# What the forkserver of a reloading pool imports once: the library, none of the
# application (its workers import that fresh, from disk).
_PRELOAD = ['looppool.child', 'looppool.runner', 'tornado.ioloop', 'psutil']
# How long the watch waits for more changes once one came (editors write in steps).
_QUIET_MS = 30


def reload_context(value: Any) -> multiprocessing.context.BaseContext:
    """The start method for a pool with ``reload=True`` (see the module's docstring)."""
    if value is None or value == 'forkserver':
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload(_PRELOAD)   # before its first start, else a no-op
        return context
    if value == 'spawn' or (isinstance(value, multiprocessing.context.BaseContext)
                            and value.get_start_method() in ('spawn', 'forkserver')):
        return value if not isinstance(value, str) else multiprocessing.get_context(value)
    raise ValueError('reload=True needs workers with fresh interpreters: leave mp_context '
                     'unset (a forkserver) or use "spawn", not "fork" (a fork carries '
                     'the old code)')


def watched_directories(worker_class: type) -> list[str]:
    """The directories of the application's own modules, the worker class's first."""
    library = {os.path.realpath(path) for path in (
        *(sysconfig.get_paths()[name] for name in ('stdlib', 'platstdlib', 'purelib',
                                                    'platlib')),
        *site.getsitepackages(), site.getusersitepackages(),
        os.path.dirname(os.path.abspath(__file__)))}
    found: dict[str, None] = {}
    module = sys.modules.get(worker_class.__module__)
    names = [module] + list(sys.modules.values())
    for module in names:
        path = getattr(module, '__file__', None)
        if not path or not path.endswith('.py'):
            continue
        directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        if not any(directory == root or directory.startswith(root + os.sep)
                   for root in library):
            found[directory] = None
    return list(found)


def syntax_error(path: str) -> SyntaxError | None:
    """The syntax error in the file at ``path``, if any (a file gone is none)."""
    try:
        with open(path, 'rb') as file:
            source = file.read()
    except OSError:
        return None
    try:
        compile(source, path, 'exec', dont_inherit=True)
    except SyntaxError as error:
        return error
    except ValueError:   # null bytes: the file is being written
        return None
    return None


class Reloader:
    """Watches the application's source and restarts the pool's workers on a change."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.directories: list[str] = []
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0   # rolling restarts done for a change

    def start(self) -> None:
        try:
            import watchfiles  # noqa: F401 - checked here, used by _watch
        except ImportError:
            raise ImportError('reload=True needs the watchfiles package: '
                              'pip install "looppool[reload]"') from None
        self.directories = watched_directories(self.pool._worker_class)
        self._stop = asyncio.Event()
        self._task = self.pool._loop.create_task(self._watch())
        log.info('reload: watching %s', ', '.join(self.directories))

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _watch(self) -> None:
        import watchfiles
        assert self._stop is not None
        try:
            async for changes in watchfiles.awatch(
                    *self.directories, stop_event=self._stop, step=_QUIET_MS,
                    recursive=False, watch_filter=lambda _, path: path.endswith('.py')):
                changed = sorted({path for _, path in changes})
                if await self._reload(changed) is False:
                    return
        except Exception:
            log.exception('reload: the watch on %s failed; the pool no longer reloads',
                          ', '.join(self.directories))

    async def _reload(self, changed: list[str]) -> bool:
        """Restart on the new code unless it cannot compile; False once the pool stops."""
        broken = [(path, error) for path in changed
                  if (error := syntax_error(path)) is not None]
        for path, error in broken:
            log.error('reload: %s, line %s: %s; the workers keep running the last good '
                      'code', path, error.lineno, error.msg)
        if broken:
            return True
        log.info('reload: %s changed; restarting the workers',
                 ', '.join(os.path.basename(path) for path in changed))
        _forget_bytecode(changed)
        try:
            await self.pool.restart()
        except WorkerStartError as error:
            why = str(error)
            if 'Traceback' not in why:   # it failed while its modules were imported
                why += '\n' + await _import_error(self.pool._worker_class)
            log.error('reload: the new code does not start; the workers keep running the '
                      'last good code: %s', why)
        except (PoolClosed, RuntimeError):
            return False   # stopping
        else:
            self.reloads += 1
            log.info('reload: the workers run the new code')
        return True


def _forget_bytecode(paths: list[str]) -> None:
    """Remove the cached bytecode of ``paths``. Python trusts a ``.pyc`` whose source has
    the same size and modification time to the second: a file saved twice within a second
    at the same size would otherwise be loaded as it was."""
    for path in paths:
        try:
            os.remove(importlib.util.cache_from_source(path))
        except (OSError, NotImplementedError, ValueError):
            pass


async def _import_error(worker_class: type) -> str:
    """What importing the application fails with, seen from a fresh interpreter: a worker
    that dies while its modules are imported (before it can report) prints it only to its
    stderr. The main module is run as the workers run it (not as ``__main__``)."""
    main = getattr(sys.modules.get('__main__'), '__file__', None)
    script = ('import importlib, runpy, sys\n'
              f'sys.path[:0] = {sys.path!r}\n'
              + (f'runpy.run_path({main!r}, run_name="__mp_main__")\n' if main else '')
              + f'importlib.import_module({worker_class.__module__!r})\n')
    if worker_class.__module__ == '__main__':
        script = script.rsplit('importlib.import_module', 1)[0]
    process = await asyncio.create_subprocess_exec(
        sys.executable, '-c', script, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        return '(importing the application again took over 30 s)'
    return stderr.decode(errors='replace').strip() or '(no error when imported again)'
