#!/usr/bin/env bash
# Create (or update) the project's virtual environment: torch, both SpikingJelly lines, the package.
#   VENV (default .venv)  where the environment lives
# SpikingJelly 0.0.0.0.14 goes into the venv itself (the default line; its datasets work beside
# torch 2.14). SpikingJelly 2.0.0 goes, without its dependencies, into $VENV/sj/2.0.0: put that
# folder first on PYTHONPATH to run against 2.0.0 (its datasets need torchaudio, which only loads
# beside torch 2.11, so 2.0.0 is used for the neuron API only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "[setup] torch, torchvision and tools"
$PIP install 'torch==2.14.1' 'torchvision==0.29.1' 2>&1 | grep -v 'is ignored' || true
$VENV/bin/python -c 'import torch, torchvision' || { echo '[setup] torch install failed' >&2; exit 1; }
$PIP install -r requirements.txt 2>&1 | grep -v 'is ignored' || true
echo "[setup] SpikingJelly 0.0.0.0.14 (default) and 2.0.0 (in $VENV/sj/2.0.0)"
$PIP install --no-deps 'spikingjelly==0.0.0.0.14' 2>&1 | grep -v 'is ignored' || true
if [ ! -f "$VENV/sj/2.0.0/spikingjelly/__init__.py" ]; then
  $PIP install --no-deps --target "$VENV/sj/2.0.0" 'spikingjelly==2.0.0' 2>&1 | grep -v 'is ignored' || true
fi
echo "[setup] spikingjelly-cf (editable, with the compiled CPU kernel)"
$PIP install --no-deps --no-build-isolation -e . 2>&1 | grep -v 'is ignored' || true
$VENV/bin/python -c 'import spikingjelly_cf' || { echo '[setup] spikingjelly_cf does not import' >&2; exit 1; }
PYTHONPATH="$VENV/sj/2.0.0" $VENV/bin/python -c 'import spikingjelly_cf' \
  || { echo '[setup] spikingjelly_cf does not import with SpikingJelly 2.0.0' >&2; exit 1; }
echo "[setup] done: $VENV"
