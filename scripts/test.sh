#!/usr/bin/env bash
# The tests in one command: creates .venv if missing (scripts/install.sh), then runs the fast tier.
# The full tier (Ray, Serve, MLflow servers, browsers, minutes of training) is `-m slow`; .ci/run runs both.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/topro ] || bash scripts/install.sh
exec .venv/bin/python -m pytest tests -m "not slow" -q "$@"
