#!/usr/bin/env bash
# Check that the main job runs under `ray job submit` against a Ray head started with `ray start --head`
# on 127.0.0.1: start a private head (its own ports and temp dir), submit a small sweep (the demo with a
# smaller budget), check what it left in MLflow, and stop the head again (only the head this script started).
#
#   bash scripts/check_ray_job_submit.sh            # uses .venv, or the active virtualenv
#
# Settings (environment): TOPRO_DATA_DIR (default ../shared/data/xtreme), RAY_PORT (6391),
# DASHBOARD_PORT (8276), KEEP (set to keep the work folder).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/activate ]; then . .venv/bin/activate; fi
# The head's environment is the job's: the job's `python` is the one on PATH when `ray start` runs.
export RAY_AUTH_MODE=disabled              # Ray 2.5x+ turns token auth on; the local dashboard must answer
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 # keep every Ray process on 127.0.0.1
export TOKENIZERS_PARALLELISM=false
export TOPRO_DATA_DIR=${TOPRO_DATA_DIR:-$(cd .. && pwd)/shared/data/xtreme}
RAY_PORT=${RAY_PORT:-6391}
DASHBOARD_PORT=${DASHBOARD_PORT:-8276}
WORK=$(mktemp -d /tmp/topro-job-check.XXXX)
TRACKING="sqlite:///$WORK/mlflow.db"

ray start --head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --port="$RAY_PORT" \
  --dashboard-port="$DASHBOARD_PORT" --temp-dir="$WORK/ray" --num-cpus="${RAY_NUM_CPUS:-2}" \
  --object-store-memory=$((768 * 1024 * 1024)) --disable-usage-stats > "$WORK/head.log" 2>&1 &
HEAD_PID=$!
stop_head() {
  kill -TERM "$HEAD_PID" 2>/dev/null || true   # `ray start --block` stops the processes it started
  wait "$HEAD_PID" 2>/dev/null || true
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap stop_head EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$DASHBOARD_PORT/api/version" > /dev/null && break
  kill -0 "$HEAD_PID" 2>/dev/null || { cat "$WORK/head.log"; exit 1; }
  sleep 1
done
echo "head up: dashboard http://127.0.0.1:$DASHBOARD_PORT"

# The working directory is uploaded (minus .gitignore'd files); the job and every Ray worker import
# topro from it (py_modules), so a plain checkout works without installing it. Paths the sweep writes
# are absolute: the job's working directory is a temporary copy.
start=$(date +%s)
ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . \
  --runtime-env-json "{\"py_modules\": [\"platform/topro\"], \"env_vars\": {\"TOPRO_DATA_DIR\": \"$TOPRO_DATA_DIR\"}}" \
  -- python jobs/sweep.py --config configs/sweeps/demo.yaml --tracking-uri "$TRACKING" \
     name=job-check storage_path="$WORK/sweeps" max_train_sentences=30 max_dev_sentences=10 \
     "search_space.learning_rate.grid=[1e-3]" "eval_langs=[de,ru,fr]" max_sentences=10 \
  | tee "$WORK/job.log"
echo "job wall time: $(( $(date +%s) - start ))s"
# The job ran this checkout's code (shipped as py_modules), not an installed copy.
grep -q "with topro from .*runtime_resources" "$WORK/job.log" || { echo "the job did not import the shipped topro"; exit 1; }

# What the job left in MLflow: a finished parent run, two finished child runs with per-language metrics,
# and two registered models with the champion alias.
python - "$TRACKING" <<'EOF'
import sys

from mlflow import MlflowClient

import mlflow

mlflow.set_tracking_uri(sys.argv[1])
client = MlflowClient()
exp = client.get_experiment_by_name("topro-sweep-job-check")
runs = client.search_runs([exp.experiment_id])
parent = [r for r in runs if r.data.tags.get("topro.kind") == "sweep"]
children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
assert len(parent) == 1 and parent[0].info.status == "FINISHED", parent
assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children), children
assert all("accuracy.de" in c.data.metrics and "accuracy.avg" in c.data.metrics for c in children)
for name in ("topro-udpos-topro", "topro-udpos-vanilla"):
    version = client.get_model_version_by_alias(name, "champion")
    print(f"{name}@champion -> version {version.version} (run {version.run_id})")
print(f"ok: parent run {parent[0].info.run_id} FINISHED with {len(children)} finished child runs")
EOF
echo "ray job submit: ok"
