"""The manual builds with Sphinx, warnings as errors, and its pages show their pictures (the
message path, the shared pool, Dask, the benchmark plot); the README's example runs."""

from __future__ import annotations

import ast
import html.parser
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import urllib.parse

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
    ('performance', 'benchmark.png'),    # the benchmark's plot
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
                 'looppool.utility.ResourceReporter'):
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
