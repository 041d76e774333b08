"""Sphinx configuration for the looppool manual.

Build it with ``sphinx-build -W --keep-going -b html manual manual/_build/html``.

It needs no network. Links to the Python and Tornado documentation come from the two
inventories committed in ``manual/_intersphinx/`` (see the README there for where they
come from and how to refresh them); a missing inventory only turns its links off.
"""

import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Autodoc documents the checkout this manual belongs to, installed or not.
sys.path.insert(0, ROOT)


def _version():
    path = os.path.join(ROOT, 'looppool', '_version.py')
    with open(path, encoding='utf-8') as file:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]",
                          file.read(), re.M)
    if match is None:
        raise RuntimeError('looppool/_version.py does not set __version__')
    return match.group(1)


project = 'looppool'
author = 'the looppool authors'
copyright = 'the looppool authors'
release = _version()
version = '.'.join(release.split('.')[:2])

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.intersphinx',
    'sphinx.ext.viewcode',
]

root_doc = 'index'
exclude_patterns = ['_build', '_intersphinx']
templates_path = []

# The pages mark every block with its language (tests/test_manual.py runs the Python
# ones); a bare ``::`` block, as in docstrings, is taken for Python where it parses.
highlight_language = 'default'
pygments_style = 'sphinx'
pygments_dark_style = 'monokai'

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
# looppool.dask imports Dask's ``distributed``, an optional extra: without it the API page
# still documents DaskPool, from its source.
autodoc_mock_imports = [name for name in ('distributed',)
                        if importlib.util.find_spec(name) is None]

# Offline intersphinx: each entry is used when its inventory is in manual/_intersphinx/.
_INVENTORIES = {
    'python': ('https://docs.python.org/3/', 'python.inv'),
    'tornado': ('https://www.tornadoweb.org/en/stable/', 'tornado.inv'),
}
intersphinx_mapping = {
    name: (url, os.path.join(HERE, '_intersphinx', inventory))
    for name, (url, inventory) in _INVENTORIES.items()
    if os.path.isfile(os.path.join(HERE, '_intersphinx', inventory))
}
intersphinx_timeout = 1

html_theme = 'furo'
html_title = f'looppool {release}'
html_short_title = 'looppool'
html_static_path = ['_static']
html_css_files = ['manual.css']
html_theme_options = {'navigation_with_keys': True}
