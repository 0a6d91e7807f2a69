#!/usr/bin/env bash
# Set up, then run the whole check: ruff, mypy, and the test suite (unit + integration, against
# the embedded broker, SQLite and PostgreSQL). Extra arguments go to pytest.
#
# --quick (first argument): the developer loop. ruff, mypy and the unit tests not marked slow;
# no system tools, no PostgreSQL, and setup only when .venv does not exist yet. CI runs the
# default, never --quick.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${RECSYS_VENV:-$here/.venv}"

quick=0
if [[ "${1:-}" == "--quick" ]]; then
    quick=1
    shift
fi

if ((quick)); then
    [[ -x "$venv/bin/python" ]] || "$here/scripts/setup.sh"
else
    "$here/scripts/setup.sh"
    "$here/scripts/install-tools.sh"

    # PostgreSQL: start the local server if it is installed but not running.
    if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        for version in $(ls /etc/postgresql 2>/dev/null); do
            pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        done
        for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
fi

export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check recsys workers tests benchmarks
ruff format --check recsys workers tests benchmarks
mypy
# The benchmark scripts are not a package; checking them catches an import that rotted.
mypy benchmarks/*.py
if ((quick)); then
    pytest -q -p no:cacheprovider tests/unit -m "not slow" "$@"
else
    pytest -q -p no:cacheprovider "$@"
fi
