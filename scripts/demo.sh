#!/usr/bin/env bash
# The main job in one command: creates .venv if missing (scripts/install.sh), then runs the demo sweep on the
# embedded default (local Ray on 127.0.0.1, MLflow in ./mlflow.db). The data is found as by every topro
# command: --data-dir, else $TOPRO_DATA_DIR, else ../shared/data/xtreme beside this clone, else the hub.
# Extra arguments go to the sweep (key=value overrides, --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/topro ] || bash scripts/install.sh
exec .venv/bin/python jobs/sweep.py --config configs/sweeps/demo.yaml "$@"
