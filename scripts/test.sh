#!/usr/bin/env bash
# Run the test suite from a fresh clone. Needs Python 3.10 or later; npm is optional.
#
#   bash scripts/test.sh                 # the whole suite
#   bash scripts/test.sh -k stop -x      # arguments go to pytest
#
# Creates .venv if it is missing, installs looppool in it (editable) with the test, bench
# and dask extras (so the Dask tests run too), installs the reference statsd daemon under .npm/ when npm is available, then runs
# pytest. The exit status is pytest's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}

if [[ ! -x .venv/bin/python ]]; then
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "scripts/test.sh: $python not found; set PYTHON to a Python 3.10+ interpreter" >&2
        exit 2
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "scripts/test.sh: looppool needs Python 3.10 or later;" \
             "$python is $("$python" -V 2>&1)" >&2
        exit 2
    fi
    echo "scripts/test.sh: creating .venv with $python"
    "$python" -m venv .venv
fi

.venv/bin/python -m pip install -q -e '.[test,bench,dask]'

if command -v npm >/dev/null 2>&1; then
    if ! npm install --no-save --no-audit --no-fund --loglevel=error \
            --prefix .npm statsd@0.9.0 >/dev/null; then
        echo "scripts/test.sh: npm could not install statsd@0.9.0;" \
             "tests that need the reference statsd daemon will be skipped" >&2
    fi
else
    echo "scripts/test.sh: npm not found; tests that need the reference statsd daemon" \
         "(statsd@0.9.0) will be skipped" >&2
fi

exec .venv/bin/python -m pytest "$@"
