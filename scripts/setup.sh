#!/usr/bin/env bash
# Create .venv and install recsys with its dev and postgres extras. Idempotent; safe to re-run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python="${PYTHON:-python3}"
venv="${RECSYS_VENV:-$here/.venv}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
# torch first, pinned: 2.13.0 is the release CI is built and tested on (and a CPU build of it is
# what a plain `pip install torch==2.13.0` takes where a local wheel is configured). pyproject
# itself only asks for torch>=2.10, so users may bring any newer build, CUDA included.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install -q "torch==${RECSYS_TORCH_VERSION:-2.13.0}"
fi
"$venv/bin/python" -m pip install -q -e ".[dev,postgres]"
echo "recsys installed in $venv"
