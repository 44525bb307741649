#!/usr/bin/env bash
# The README's main command: set up the environment, then train examples/dvs_gesture.py with its
# defaults (CF neurons, TSG, CE + 0.25 * PNB) on the built-in synthetic DVS128 Gesture data, and
# say where the outputs are (summary.json, figures, checkpoints, TensorBoard logs).
#
#   bash scripts/run_dvs_gesture.sh [--sj2] [example arguments...]
#
# Default: SpikingJelly 0.0.0.0.14 in VENV (default .venv; scripts/setup_env.sh creates it).
# --sj2 (or SJ=2): SpikingJelly 2.0.0 as `pip install spikingjelly` gives it (torch 2.9.1,
#   torchaudio), in VENV_SJ2 (default .venv-sj2; scripts/setup_env.sh --sj2-full-only creates it
#   on first use, about 7 GB). Same defaults; the outputs go to their own folder
#   (runs/dvs_gesture_<arch>_<neuron>_T<T>_seed<seed>_sj2.0.0) and the frames SpikingJelly 2.0
#   integrates to their own data folder (default data/synthetic_gesture_sj2).
#   DATA                                   where the synthetic set is written (cached); default
#                                          data/synthetic_gesture (data/synthetic_gesture_sj2)
# Extra arguments go to the example, e.g. `bash scripts/run_dvs_gesture.sh --neuron lif`
# or `--out-dir DIR` (default runs/dvs_gesture_<arch>_<neuron>_T<T>_seed<seed>[_sj<version>]).
set -euo pipefail
cd "$(dirname "$0")/.."
SJ=${SJ:-0}
if [ "${1:-}" = --sj2 ]; then SJ=2; shift; fi
case "$SJ" in
  2)
    VENV_SJ2=${VENV_SJ2:-.venv-sj2}
    DATA=${DATA:-data/synthetic_gesture_sj2}
    bash scripts/setup_env.sh --sj2-full-only
    PYTHON="$VENV_SJ2/bin/python"
    LINE="SpikingJelly 2.0.0 ($VENV_SJ2)" ;;
  0|0.0.0.0.14|"")
    VENV=${VENV:-.venv}
    DATA=${DATA:-data/synthetic_gesture}
    bash scripts/setup_env.sh
    PYTHON="$VENV/bin/python"
    LINE="SpikingJelly 0.0.0.0.14 ($VENV)" ;;
  *) echo "SJ must be 0 (SpikingJelly 0.0.0.0.14, the default) or 2 (SpikingJelly 2.0.0), got '$SJ'" >&2
     exit 2 ;;
esac
echo "[run] examples/dvs_gesture.py with $LINE on the built-in synthetic data (cached in $DATA)"
exec env -u PYTHONPATH "$PYTHON" examples/dvs_gesture.py --synthetic-root "$DATA" "$@"
