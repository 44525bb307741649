#!/usr/bin/env bash
# Set up the environment and run the test suite twice: against SpikingJelly 0.0.0.0.14 and 2.0.0.
# Extra arguments go to pytest (e.g. scripts/test.sh -k kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/setup_env.sh
status=0
echo "=== tests with SpikingJelly 0.0.0.0.14 ==="
"$VENV/bin/python" -m pytest -q "$@" || status=1
echo "=== tests with SpikingJelly 2.0.0 ==="
PYTHONPATH="$VENV/sj/2.0.0" "$VENV/bin/python" -m pytest -q "$@" || status=1
if [ $status -ne 0 ]; then echo "=== FAILED (see above) ===" >&2; fi
exit $status
