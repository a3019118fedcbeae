#!/usr/bin/env bash
# The tests, in two tiers (tests/conftest.py says what goes where):
#   bash scripts/test.sh          the fast tier: unit tests + one real run of Ray Train, Serve and a sweep (minutes)
#   bash scripts/test.sh full     everything, with the 25 slowest tests listed at the end (CI runs both)
# Creates .venv first if it is missing; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
tier=fast
if [ "${1:-}" = fast ] || [ "${1:-}" = full ]; then tier=$1; shift; fi
if [ "$tier" = fast ]; then
  exec .venv/bin/python -m pytest tests -q -p no:cacheprovider -m "smoke or not slow" "$@"
fi
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=25 "$@"
