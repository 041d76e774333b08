#!/usr/bin/env bash
# Run the test suite from a fresh clone, on every Python version looppool supports.
#
#   bash scripts/test.sh                        # the whole suite on each version found
#   bash scripts/test.sh -k stop -x             # arguments go to pytest, on each version
#   PYTHON=3.12 bash scripts/test.sh            # one version only (or PYTHON=python3.12,
#                                               # or a path to an interpreter)
#
# The supported versions are the "Programming Language :: Python :: 3.N" classifiers of
# setup.py. Each version gets a virtualenv of its own: the version of `python3` (the default
# interpreter) uses .venv, the others .venv-3.N (each holds a .gitignore of its own). Each is
# created when missing, and looppool is installed in it (editable) with the test, bench and
# dask extras, so that the Dask tests and the server examples run too. An interpreter for
# 3.N is looked for as python3.N on PATH, then under pyenv's versions; a version that is
# not installed is skipped with a message, except under CI=true, where every supported
# version must run. The reference statsd daemon (statsd@0.9.0, for one test of
# tests/test_metrics.py) is installed under .npm/ with npm; under CI=true npm must be there
# and the install must work.
#
# The versions run one after another (the suite starts many processes, and some of its
# tests measure how soon things happen). Each run ends with pytest's own summary line; the
# script then repeats those lines, one per version, and ends with the totals. The exit
# status is 0 only if every version that ran passed (and, under CI=true, every version ran).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ci=false
[[ "${CI:-}" == true ]] && ci=true

say() { echo "scripts/test.sh: $*" >&2; }

# The X.Y of an interpreter, or nothing if it does not run (a pyenv shim for a version that
# is installed but not selected prints an error and exits 127).
version_of() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

# An interpreter for version X.Y: pythonX.Y on PATH, else the newest pyenv build of X.Y.
find_python() {
    local wanted=$1 candidate root
    candidate=$(command -v "python$wanted" 2>/dev/null) || candidate=
    if [[ -n "$candidate" && "$(version_of "$candidate")" == "$wanted" ]]; then
        echo "$candidate"
        return 0
    fi
    root=${PYENV_ROOT:-$HOME/.pyenv}
    if command -v pyenv >/dev/null 2>&1; then
        root=$(pyenv root 2>/dev/null || echo "$root")
    fi
    while read -r candidate; do
        if [[ -x "$candidate" && "$(version_of "$candidate")" == "$wanted" ]]; then
            echo "$candidate"
            return 0
        fi
    done < <(ls -d "$root"/versions/"$wanted".*/bin/python"$wanted" 2>/dev/null | sort -rV)
    return 1
}

# The virtualenv for version X.Y: .venv if it is that version (or is missing and X.Y is the
# default interpreter's), else .venv-X.Y.
venv_for() {
    local wanted=$1 default=$2
    if [[ -x .venv/bin/python ]]; then
        [[ "$(version_of .venv/bin/python)" == "$wanted" ]] && { echo .venv; return; }
    elif [[ ! -e .venv && "$wanted" == "$default" ]]; then
        echo .venv
        return
    fi
    echo ".venv-$wanted"
}

supported=$(grep -oE "Programming Language :: Python :: 3\.[0-9]+'" setup.py |
            grep -oE '3\.[0-9]+' | sort -uV | tr '\n' ' ')
if [[ -z "$supported" ]]; then
    say "found no 'Programming Language :: Python :: 3.N' classifier in setup.py"
    exit 2
fi

# The runs to make: "X.Y interpreter" pairs.
runs=()
missing=()
if [[ -n "${PYTHON:-}" ]]; then
    # A version (3.12), or an interpreter: a path or a command (python3.12; if that is a
    # pyenv shim for a version not selected, the version's own build under pyenv).
    if [[ "$PYTHON" =~ ^3\.[0-9]+$ ]]; then
        wanted=$PYTHON
        python=$(find_python "$wanted") || python=
    else
        python=$(command -v "$PYTHON" 2>/dev/null) || python=
        [[ -n "$python" ]] && wanted=$(version_of "$python") || wanted=
        if [[ -z "$wanted" && "$(basename "$PYTHON")" =~ ^python(3\.[0-9]+)$ ]]; then
            wanted=${BASH_REMATCH[1]}
            python=$(find_python "$wanted") || python=
        fi
    fi
    if [[ -z "$python" || -z "$wanted" ]]; then
        say "PYTHON=$PYTHON: no such Python interpreter runs here"
        exit 2
    fi
    if [[ " $supported" != *" $wanted "* ]]; then
        say "PYTHON=$PYTHON is Python $wanted; looppool supports $supported"
        exit 2
    fi
    runs+=("$wanted $python")
else
    default=$(version_of python3 || true)
    for version in $supported; do
        if python=$(find_python "$version"); then
            runs+=("$version $python")
        else
            missing+=("$version")
        fi
    done
fi

if (( ${#missing[@]} )); then
    if $ci; then
        say "CI=true: every supported Python version must run, and these are not installed:" \
            "${missing[*]}"
        exit 2
    fi
    say "skipping Python ${missing[*]}: not installed (no python<version> on PATH nor" \
        "under pyenv); CI runs every supported version"
fi
if (( ${#runs[@]} == 0 )); then
    say "no supported Python ($supported) found; set PYTHON to one"
    exit 2
fi

# The reference statsd daemon, once for every version.
if command -v npm >/dev/null 2>&1; then
    if ! npm install --no-save --no-audit --no-fund --loglevel=error \
            --prefix .npm statsd@0.9.0 >/dev/null; then
        if $ci; then
            say "CI=true: npm could not install statsd@0.9.0, which" \
                "tests/test_metrics.py needs"
            exit 2
        fi
        say "npm could not install statsd@0.9.0; the test that needs the reference statsd" \
            "daemon will be skipped (under CI=true it fails)"
    fi
elif $ci; then
    say "CI=true: npm is not installed; it installs statsd@0.9.0, which" \
        "tests/test_metrics.py needs"
    exit 2
else
    say "npm not found; the test that needs the reference statsd daemon (statsd@0.9.0)" \
        "will be skipped (under CI=true it fails)"
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

summaries=()
status=0
totals=(0 0 0)   # passed, failed (errors included), skipped

# Add the counts of one kind ("N passed", "N failed, N errors", ...) in pytest's closing
# line to totals[index].
count() {
    local number
    for number in $(grep -oE "[0-9]+ ($2)\b" <<<"$1" | grep -oE '^[0-9]+'); do
        totals[$3]=$(( totals[$3] + number ))
    done
}

for run in "${runs[@]}"; do
    version=${run%% *}
    python=${run#* }
    venv=$(venv_for "$version" "${default:-$version}")
    log="$logs/$version.log"
    started=$SECONDS
    echo "==== scripts/test.sh: Python $version in $venv ===="
    if [[ ! -x "$venv/bin/python" ]]; then
        say "creating $venv with $python"
        # --upgrade-deps: a current pip (3.10's own builds uWSGI the deprecated way).
        if ! "$python" -m venv --upgrade-deps "$venv"; then
            summaries+=("Python $version: could not create $venv")
            status=1
            totals[1]=$(( totals[1] + 1 ))
            continue
        fi
        # Keeps the virtualenv out of git (.gitignore names .venv/ only).
        [[ "$venv" == .venv ]] || echo '*' > "$venv/.gitignore"
    fi
    if ! "$venv/bin/python" -m pip install -q -e '.[test,bench,dask]'; then
        summaries+=("Python $version: pip could not install looppool with its test, bench \
and dask extras in $venv")
        status=1
        totals[1]=$(( totals[1] + 1 ))
        continue
    fi
    "$venv/bin/python" -m pytest "$@" 2>&1 | tee "$log"
    code=${PIPESTATUS[0]}
    (( code == 0 )) || status=1
    # pytest's closing line: "==== 3 failed, 500 passed, 2 skipped in 201.33s (0:03:21) ===="
    # ("3 failed, ... in 201.33s" with -q).
    line=$(grep -E '^(=+ )?(([0-9]+ [a-z]+,? ?)+|no tests ran) in [0-9.]+s' "$log" | tail -n 1)
    shown=$(sed -E 's/^=+ //; s/ =+$//' <<<"$line")
    summaries+=("Python $version: ${shown:-(pytest printed no summary line)}, exit code \
$code, $((SECONDS - started)) s with the install")
    count "$line" passed 0
    count "$line" 'failed|errors?' 1
    count "$line" skipped 2
    if (( code != 0 )) && [[ -z "$line" ]]; then
        totals[1]=$(( totals[1] + 1 ))   # a run that ended without a summary failed
    fi
done

echo "==== scripts/test.sh: one line per Python version ===="
for summary in "${summaries[@]}"; do
    echo "$summary"
done
for version in "${missing[@]}"; do
    echo "Python $version: skipped, not installed"
done
echo "total: ${totals[0]} passed, ${totals[1]} failed, ${totals[2]} skipped"
exit $status
