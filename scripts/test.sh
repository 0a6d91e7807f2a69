#!/usr/bin/env bash
# Set up, then run the whole check: ruff, mypy, and the test suite (unit + integration, against
# the embedded broker, SQLite and PostgreSQL). Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
"$here/scripts/setup.sh"
"$here/scripts/install-tools.sh"

# PostgreSQL: start the local server if it is installed but not running.
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

venv="${RECSYS_VENV:-$here/.venv}"
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check recsys workers tests benchmarks
ruff format --check recsys workers tests benchmarks
mypy
pytest -q -p no:cacheprovider "$@"
