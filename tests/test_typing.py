"""The package is mypy --strict clean, as STYLE.md asks (the settings are pyproject.toml's)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A run with a warm cache takes seconds; a cold one (a fresh clone) well under a minute.
MYPY_TIMEOUT = 300


@pytest.mark.timeout(MYPY_TIMEOUT)
def test_the_package_is_mypy_strict_clean() -> None:
    # No arguments: mypy reads [tool.mypy] from pyproject.toml (strict, files = looppool).
    result = subprocess.run([sys.executable, '-m', 'mypy'], cwd=ROOT, capture_output=True,
                            text=True, timeout=MYPY_TIMEOUT - 10)
    assert result.returncode == 0, (
        f'mypy reported problems (exit code {result.returncode}):\n'
        f'{result.stdout}\n{result.stderr}')
    assert result.stdout.startswith('Success: no issues found'), result.stdout
