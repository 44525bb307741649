#!/usr/bin/env bash
# The README's main command: set up the environment, then train examples/dvs_gesture.py with its
# defaults (CF neurons, TSG, CE + 0.25 * PNB) on the built-in synthetic DVS128 Gesture data, and
# say where the outputs are (summary.json, figures, checkpoints, TensorBoard logs).
#   VENV (default .venv)                   the environment scripts/setup_env.sh creates
#   DATA (default data/synthetic_gesture)  where the synthetic set is written (cached)
# Extra arguments go to the example, e.g. `bash scripts/run_dvs_gesture.sh --neuron lif`
# or `--out-dir DIR` (default runs/dvs_gesture_<arch>_<neuron>_T<T>_seed<seed>).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DATA=${DATA:-data/synthetic_gesture}
bash scripts/setup_env.sh
echo "[run] examples/dvs_gesture.py on the built-in synthetic data (cached in $DATA)"
exec "$VENV/bin/python" examples/dvs_gesture.py --synthetic-root "$DATA" "$@"
