"""The manual builds with Sphinx, warnings as errors, and its pages show their pictures (the
message path, the shared pool, Dask, the benchmark's figures); the README's example runs;
every code block of the manual, the README and the changelog fits the text column, and
each block of Python either runs as printed or says it is a fragment (see
:func:`test_code_block_runs` for the convention)."""

from __future__ import annotations

import ast
import html.parser
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import urllib.parse

import psutil
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANUAL = ROOT / 'manual'
IMAGE = 'message-path.svg'

# Sphinx imports the package for autodoc and renders every page: well within this on any
# machine, yet a hung build (a worker started at import time, say) cannot stall the suite.
BUILD_TIMEOUT = 240


@pytest.fixture(scope='module')
def built_manual(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp('manual-html')
    doctrees = tmp_path_factory.mktemp('manual-doctrees')
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-b', 'html',
         '-d', str(doctrees), str(MANUAL), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT - 10)
    assert result.returncode == 0, (
        f'sphinx-build failed with exit code {result.returncode}\n'
        f'--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}')
    return out


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_manual_builds_without_warnings(built_manual: pathlib.Path) -> None:
    for page in ('index', 'guide', 'design', 'api', 'migration'):
        assert (built_manual / f'{page}.html').is_file(), f'{page}.html was not written'


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_design_page_shows_the_message_path(built_manual: pathlib.Path) -> None:
    copied = list(built_manual.rglob(IMAGE))
    assert copied, f'{IMAGE} was not copied into the built manual'
    assert copied[0].read_bytes() == (MANUAL / '_static' / IMAGE).read_bytes()
    design = (built_manual / 'design.html').read_text(encoding='utf-8')
    assert f'{IMAGE}"' in design, 'design.html does not reference the message-path picture'
    assert '<img' in design


class _ImageSources(html.parser.HTMLParser):
    """The ``src`` of every ``<img>`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == 'img':
            source = dict(attrs).get('src')
            if source:
                self.sources.append(source)


def _shown_pictures(built: pathlib.Path, page: str) -> dict[str, pathlib.Path]:
    """The pictures ``page`` shows, by file name, each resolved to its file in the build
    (the test fails for an ``<img>`` whose file is missing)."""
    parser = _ImageSources()
    parser.feed((built / f'{page}.html').read_text(encoding='utf-8'))
    pictures = {}
    for source in parser.sources:
        path = urllib.parse.urlparse(source).path
        if urllib.parse.urlparse(source).scheme or path.startswith('/'):
            continue   # not part of the build
        resolved = (built / urllib.parse.unquote(path)).resolve()
        assert resolved.is_file(), f'{page}.html shows {source}, which is not in the build'
        pictures[resolved.name] = resolved
    return pictures


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize('page, picture', [
    ('design', 'message-path.svg'),      # the path of a message
    ('sharing', 'sharing.svg'),          # one pool for a pre-forked web server
    ('dask', 'dask.svg'),                # the same workers on a Dask cluster
    # the benchmark: one figure per question (benchmarks/plot.py --figures)
    ('performance', 'bench-throughput.png'),
    ('performance', 'bench-latency.png'),
    ('performance', 'bench-io.png'),
    ('performance', 'bench-payload.png'),
    ('performance', 'bench-startup.png'),
    ('performance', 'bench-cpu.png'),
    ('performance', 'bench-uneven.png'),
    ('performance', 'bench-blocked.png'),
    ('performance', 'bench-memory.png'),
])
def test_pages_show_their_pictures(built_manual: pathlib.Path, page: str,
                                   picture: str) -> None:
    shown = _shown_pictures(built_manual, page)
    assert picture in shown, f'{page}.html shows no {picture}; it shows {sorted(shown)}'
    assert shown[picture].read_bytes() == (MANUAL / '_static' / picture).read_bytes(), (
        f'{page}.html shows a {picture} that differs from manual/_static/{picture}')


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_api_page_documents_the_public_names(built_manual: pathlib.Path) -> None:
    api = (built_manual / 'api.html').read_text(encoding='utf-8')
    for name in ('looppool.Pool', 'looppool.Pool.submit', 'looppool.Pool.map',
                 'looppool.Worker', 'looppool.task_done',
                 'looppool.WorkerLost', 'looppool.PoolClosed',
                 'looppool.utility.ResourceReporter', 'looppool.__version__',
                 'module-looppool.remote', 'looppool.remote.serve',
                 'looppool.remote.SyncClient', 'module-looppool.dask',
                 'looppool.dask.DaskPool', 'module-looppool.utility',
                 'looppool.utility.loop_readings', 'module-looppool.metrics',
                 'looppool.metrics.PoolMetrics'):
        assert f'id="{name}"' in api, f'the API page has no entry for {name}'


@pytest.mark.timeout(60)
def test_the_readme_example_runs(tmp_path: pathlib.Path) -> None:
    """The README's example is a program: it runs as printed and prints what it says."""
    readme = (ROOT / 'README.rst').read_text(encoding='utf-8')
    block = re.search(r'^\.\. code-block:: python\n\n((?:    .*\n|\n)+)', readme, re.M)
    assert block, 'README.rst has no python code block'
    program = tmp_path / 'readme_example.py'
    program.write_text(textwrap.dedent(block.group(1)), encoding='utf-8')
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    outcome = subprocess.run([sys.executable, '-W', 'error', str(program)], cwd=tmp_path,
                             env=environment, capture_output=True, text=True, timeout=50)
    assert outcome.returncode == 0, outcome.stderr
    one, many, sizes, completed = re.fullmatch(
        r"([0-9a-f]{64}) (\[.*\]) (\[.*\]) (\d+)\n", outcome.stdout).groups()
    assert len(ast.literal_eval(many)) == 3, outcome
    assert ast.literal_eval(sizes) == [64] * 4 and completed == '8', outcome


# -- The code blocks of the manual and the README ------------------------------------------

CODE_DOCS = sorted(MANUAL.glob('*.rst')) + [ROOT / 'README.rst', ROOT / 'CHANGES.rst']
FRAGMENT = '# fragment:'
LINE_LIMIT = 72
BLOCK_TIMEOUT = 60
# Languages whose blocks are not Python programs: shell commands and sessions, what a
# program prints, configuration, queries. Nothing runs them; a block of Python is run.
OTHER_LANGUAGES = {'console', 'shell', 'bash', 'text', 'none', 'yaml', 'ini', 'pycon',
                   'promql', 'json', 'pytb'}


class _Block:
    """A literal block of a page: where it starts, its language (``None`` for a bare
    ``::`` block, which the manual shows as plain text) and its text, dedented."""

    def __init__(self, path: pathlib.Path, line: int, language: str | None,
                 text: str) -> None:
        self.path, self.line, self.language, self.text = path, line, language, text

    @property
    def where(self) -> str:
        return f'{self.path.relative_to(ROOT)}:{self.line}'

    @property
    def is_fragment(self) -> bool:
        return self.text.lstrip().lower().startswith(FRAGMENT)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(path: pathlib.Path) -> list[_Block]:
    """Every ``.. code-block::`` and every ``::`` literal block of the page ``path``."""
    lines = path.read_text(encoding='utf-8').split('\n')
    found, i = [], 0
    while i < len(lines):
        line = lines[i]
        directive = re.match(r'\s*\.\. (?:code-block|code|sourcecode)::\s*(\S*)', line)
        bare = (not directive and line.rstrip().endswith('::')
                and not line.lstrip().startswith('..'))
        if not (directive or bare):
            i += 1
            continue
        indent = _indent(line)
        j = i + 1
        if directive:   # skip the directive's options
            while j < len(lines) and lines[j].strip().startswith(':'):
                j += 1
        k = j
        while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > indent):
            k += 1
        body = textwrap.dedent('\n'.join(lines[j:k])).strip('\n')
        if body:
            language = (directive.group(1) or 'python') if directive else None
            found.append(_Block(path, i + 1, language, body + '\n'))
        i = max(k, i + 1)
    return found


ALL_BLOCKS = [block for path in CODE_DOCS for block in _blocks(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language in ('python', 'python3')]
PROGRAMS = [block for block in PYTHON_BLOCKS if not block.is_fragment]


def test_the_code_blocks_are_found() -> None:
    """The extraction sees the blocks (a change of markup must not empty the list)."""
    assert len(PROGRAMS) >= 5, [block.where for block in PROGRAMS]
    assert any(block.path.name == 'README.rst' for block in PROGRAMS)


@pytest.mark.parametrize('block', ALL_BLOCKS, ids=lambda block: block.where)
def test_code_lines_fit_the_column(block: _Block) -> None:
    """No line of a code block is cut off in the manual's text column."""
    long = [line for line in block.text.splitlines() if len(line) > LINE_LIMIT]
    assert not long, f'{block.where}: lines over {LINE_LIMIT} characters: {long}'


@pytest.mark.parametrize('block', ALL_BLOCKS, ids=lambda block: block.where)
def test_code_blocks_say_their_language(block: _Block) -> None:
    """A block is Python (and so is run, or says it is a fragment) or names another
    language; a bare ``::`` block is plain text, never Python."""
    assert block.language is None or block.language in OTHER_LANGUAGES | {
        'python', 'python3'}, f'{block.where}: unexpected language {block.language!r}'
    if block.language is None:
        try:
            ast.parse(block.text)
        except SyntaxError:
            return
        assert not re.search(r'^\s*(import|from|def|class|async def) ', block.text,
                             re.M), (
            f'{block.where}: Python in a bare :: block; mark it '
            f'".. code-block:: python" (and "{FRAGMENT}" if it is not a whole program)')


@pytest.mark.parametrize('block', [block for block in PYTHON_BLOCKS if block.is_fragment],
                         ids=lambda block: block.where)
def test_fragments_are_valid_python(block: _Block) -> None:
    """A fragment is not run, but it is Python: it compiles (``await`` allowed)."""
    compile(block.text, block.where, 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True)


def _left_behind(marker: str) -> list[psutil.Process]:
    """The processes whose environment carries ``marker``: those a block started."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get('LOOPPOOL_MANUAL_BLOCK') == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.timeout(BLOCK_TIMEOUT + 30)
@pytest.mark.parametrize('block', PROGRAMS, ids=lambda block: block.where)
def test_code_block_runs(block: _Block, tmp_path: pathlib.Path) -> None:
    """Every Python block that is not marked as a fragment is a program: it runs as
    printed, with warnings as errors, exits 0 within the time limit and leaves no
    process behind.

    The convention, for whoever writes the manual: a block of Python that is only part
    of a program starts with a comment line ``# fragment: <what it needs>``, which the
    reader sees too, and is only compiled. Any other ``.. code-block:: python`` is run.
    Shell commands, output and configuration are blocks of another language
    (``shell``, ``console``, ``text``, ``yaml``...), which are not run; a bare ``::``
    block must not hold Python (see :func:`test_code_blocks_say_their_language`).
    """
    program = tmp_path / 'example.py'
    program.write_text(block.text, encoding='utf-8')
    marker = f'{os.getpid()}-{block.where}'
    environment = dict(os.environ, PYTHONPATH=str(ROOT), LOOPPOOL_MANUAL_BLOCK=marker)
    process = subprocess.Popen(
        [sys.executable, '-W', 'error', str(program)], cwd=tmp_path, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f'{block.where} did not end within {BLOCK_TIMEOUT} s\n{out}\n{err}')
    finally:
        left = _left_behind(marker)
        for child in left:
            child.kill()
        psutil.wait_procs(left, timeout=5)
    assert process.returncode == 0, f'{block.where} failed:\n{out}\n{err}'
    assert not left, f'{block.where} left processes behind: {left}'
    if 'print(' in block.text:
        assert out.strip(), f'{block.where} printed nothing'


def test_the_readme_keeps_its_two_commands() -> None:
    """From a fresh clone, one command sets up and runs the demo, one the whole suite."""
    shell = [block.text for block in _blocks(ROOT / 'README.rst')
             if block.language == 'shell']
    assert any('pip install' in text and 'examples/webapp.py' in text
               for text in shell), shell
    assert any(re.search(r'^bash scripts/test\.sh\b', text, re.M) for text in shell), shell
