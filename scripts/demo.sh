#!/usr/bin/env bash
# Set up, then run the closed-loop demo on embedded defaults (broker, workers, simulator) and
# write the report to demo-report/; the simulated users come from the packaged MovieLens copy
# (`--data DIR` for another). Extra arguments go to `recsys demo`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
"$here/scripts/setup.sh"
# The vw arm (Vowpal Wabbit's cb_explore_adf) runs in the default demo: the `vw` extra.
"${RECSYS_VENV:-$here/.venv}/bin/python" -m pip install -q -e ".[vw]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${RECSYS_VENV:-$here/.venv}/bin/recsys" demo "$@"
