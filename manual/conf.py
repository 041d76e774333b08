"""Sphinx configuration for the looppool manual.

Build it with ``sphinx-build -W --keep-going -b html manual manual/_build/html``. It needs no
network: intersphinx is deliberately off.
"""

import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
# Autodoc documents the checkout this manual belongs to, installed or not.
sys.path.insert(0, ROOT)


def _version():
    with open(os.path.join(ROOT, 'looppool', '_version.py'), encoding='utf-8') as file:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", file.read(), re.M)
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
    'sphinx.ext.viewcode',
]

root_doc = 'index'
exclude_patterns = ['_build']
templates_path = []
pygments_style = 'sphinx'

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True

html_theme = 'alabaster'
html_title = f'looppool {release}'
html_static_path = []
