#!/usr/bin/env bash
# Create .venv (once) and install topro with its dependencies and dev tools; works on a fresh machine as root.
# torch is pinned first: an unpinned torch in an empty environment pulls a multi-GB CUDA build where a CPU
# wheel is what this kind of machine has. Chromium (Debian's package) is for the browser tests of the MLflow
# UI and the tagging page: installed under CI, or wherever it is missing and apt-get can run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TOPRO_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev]"
if [ "${CI:-}" = "true" ] || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/install.sh: no chromium and no root apt-get: the browser tests will fail (apt-get install chromium)" >&2
  fi
fi
