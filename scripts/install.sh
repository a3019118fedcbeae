#!/usr/bin/env bash
# Create .venv (once) and install topro with its dependencies and dev tools.
# torch is pinned first: an unpinned torch in an empty environment pulls a
# multi-GB CUDA build where a CPU wheel is what this kind of machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TOPRO_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev]"
