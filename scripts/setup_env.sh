#!/usr/bin/env bash
# Create (or update) the project's virtual environments. Run from anywhere; paths are relative to
# the repository root.
#
#   bash scripts/setup_env.sh                 the main environment only
#   bash scripts/setup_env.sh --sj2-full      the main environment and the SpikingJelly-2.0 one
#   bash scripts/setup_env.sh --sj2-full-only the SpikingJelly-2.0 environment only
#
# Main environment, VENV (default .venv): torch 2.14.1, torchvision 0.29.1, SpikingJelly
# 0.0.0.0.14 in the venv itself (the default line; its datasets work beside torch 2.14) and
# SpikingJelly 2.0.0, without its dependencies, in $VENV/sj/2.0.0: put that folder first on
# PYTHONPATH to run against 2.0.0's neuron API (its datasets need torchaudio, which does not load
# beside torch 2.14).
#
# SpikingJelly-2.0 environment, VENV_SJ2 (default .venv-sj2; about 7 GB): SpikingJelly 2.0.0 as
# `pip install spikingjelly` gives it to a user, with all its declared dependencies: torch 2.9.1,
# torchvision 0.24.1, torchaudio 2.9.x (torchaudio's wheels load only beside their own torch).
#
# Both get requirements.txt and this package in editable mode with its compiled CPU kernel. The
# kernel (spikingjelly_cf/_cf_cpu*.so, built in place) is plain C loaded through ctypes: it links
# no torch, so one build serves both environments (same Python).
#
# A finished environment is stamped ($VENV/.spikingjelly_cf-setup) with a hash of this script,
# requirements.txt, setup.py and setup.cfg; while the stamp matches, pip is not run again (only
# the kernel is rebuilt if its C sources changed). Any failed install stops the script with a
# non-zero exit status.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV_SJ2=${VENV_SJ2:-.venv-sj2}
PY=${PYTHON:-python3}

MAIN=1 SJ2=0
for arg in "$@"; do
  case "$arg" in
    --sj2-full) SJ2=1 ;;
    --sj2-full-only) SJ2=1 MAIN=0 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "[setup] unknown argument: $arg (allowed: --sj2-full, --sj2-full-only)" >&2; exit 2 ;;
  esac
done

die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# quiet CMD...: run CMD with pip's "Location ... is ignored" index noise filtered out of its output;
# the status is CMD's own (pipefail; the filter always succeeds).
quiet() {
  local rc=0
  "$@" 2>&1 | { grep -v 'is ignored' || true; } || rc=$?
  return "$rc"
}

# pip_install VENV ARGS...: pip install into VENV; stops the script if pip fails.
pip_install() {
  local venv=$1; shift
  local rc=0
  quiet "$venv/bin/python" -m pip --disable-pip-version-check -q install "$@" || rc=$?
  [ "$rc" -eq 0 ] || die "pip install $* into $venv failed (exit status $rc)"
}

stamp_of() {  # the inputs that decide what an environment holds
  cat scripts/setup_env.sh requirements.txt setup.py setup.cfg | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp_of)

make_venv() {
  local venv=$1
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$PY" -m venv "$venv" || die "could not create the virtual environment $venv"
  fi
}

# check_env VENV SJ_VERSION TORCH_VERSION [PYTHONPATH]: the environment holds what it claims
# (SpikingJelly and torch versions, spikingjelly_cf from this checkout, the CPU kernel loads).
check_env() {
  local venv=$1 sj=$2 torch_v=$3 path=${4:-}
  [ -x "$venv/bin/python" ] || { echo "[setup] $venv does not exist" >&2; return 1; }
  PYTHONPATH="$path" "$venv/bin/python" -W ignore::FutureWarning - "$sj" "$torch_v" "$PWD" <<'PYEOF'
import os
import sys
want_sj, want_torch, root = sys.argv[1:]
try:
    import torch
    import spikingjelly_cf
    from spikingjelly_cf.backends import cpp
except Exception as exc:  # noqa: BLE001
    sys.exit(f'[setup] import failed: {type(exc).__name__}: {exc}')
errors = []
if spikingjelly_cf.SPIKINGJELLY_VERSION != want_sj:
    errors.append(f'SpikingJelly {spikingjelly_cf.SPIKINGJELLY_VERSION}, expected {want_sj}')
if torch.__version__.split('+')[0] != want_torch:
    errors.append(f'torch {torch.__version__}, expected {want_torch}')
here = os.path.dirname(os.path.realpath(spikingjelly_cf.__file__))
if here != os.path.join(os.path.realpath(root), 'spikingjelly_cf'):
    errors.append(f'spikingjelly_cf is imported from {here}, not from this checkout')
if not cpp.available():
    errors.append('the compiled CPU kernel does not load')
if errors:
    sys.exit('[setup] ' + '; '.join(errors))
PYEOF
}

build_kernel() {  # in place; a no-op while the .so is newer than its C sources
  quiet "$1/bin/python" setup.py -q build_ext --inplace || die "building the CPU kernel failed"
}

stamped() { [ -f "$1/.spikingjelly_cf-setup" ] && [ "$(cat "$1/.spikingjelly_cf-setup")" = "$STAMP" ]; }

main_ok() {
  build_kernel "$VENV"
  check_env "$VENV" 0.0.0.0.14 2.14.1 && check_env "$VENV" 2.0.0 2.14.1 "$VENV/sj/2.0.0"
}

setup_main() {
  if stamped "$VENV" && main_ok; then
    echo "[setup] $VENV is set up (stamp matches, versions checked): pip skipped"
    return
  fi
  make_venv "$VENV"
  rm -f "$VENV/.spikingjelly_cf-setup"
  echo "[setup] $VENV: torch 2.14.1, torchvision 0.29.1 and tools"
  pip_install "$VENV" 'torch==2.14.1' 'torchvision==0.29.1'
  pip_install "$VENV" -r requirements.txt
  echo "[setup] $VENV: SpikingJelly 0.0.0.0.14 (default) and 2.0.0 (in $VENV/sj/2.0.0)"
  pip_install "$VENV" --no-deps 'spikingjelly==0.0.0.0.14'
  if [ ! -f "$VENV/sj/2.0.0/spikingjelly-2.0.0.dist-info/METADATA" ]; then
    rm -rf "$VENV/sj/2.0.0"
    pip_install "$VENV" --no-deps --target "$VENV/sj/2.0.0" 'spikingjelly==2.0.0'
  fi
  echo "[setup] $VENV: spikingjelly-cf (editable, with the compiled CPU kernel)"
  pip_install "$VENV" --no-deps --no-build-isolation -e .
  main_ok || die "$VENV is not as expected (see above)"
  echo "$STAMP" > "$VENV/.spikingjelly_cf-setup"
  echo "[setup] ready: $VENV (SpikingJelly 0.0.0.0.14; 2.0.0 with PYTHONPATH=$VENV/sj/2.0.0)"
}

sj2_ok() {
  build_kernel "$VENV_SJ2"
  check_env "$VENV_SJ2" 2.0.0 2.9.1 \
    && "$VENV_SJ2/bin/python" -c 'import torchaudio, spikingjelly.datasets.dvs128_gesture'
}

setup_sj2() {
  if stamped "$VENV_SJ2" && sj2_ok; then
    echo "[setup] $VENV_SJ2 is set up (stamp matches, versions checked): pip skipped"
    return
  fi
  make_venv "$VENV_SJ2"
  rm -f "$VENV_SJ2/.spikingjelly_cf-setup"
  # the order that gives a loadable torchaudio: torch + torchvision, then torchaudio pinned to the
  # same torch (torch 2.9.1 from PyPI is a CUDA build, about 7 GB with its libraries; runs on CPU)
  echo "[setup] $VENV_SJ2: torch 2.9.1, torchvision 0.24.1, torchaudio 2.9.x (several GB the first time)"
  pip_install "$VENV_SJ2" 'torch==2.9.1' 'torchvision==0.24.1'
  pip_install "$VENV_SJ2" 'torch==2.9.1' 'torchaudio==2.9.*'
  echo "[setup] $VENV_SJ2: SpikingJelly 2.0.0 with its declared dependencies, and tools"
  pip_install "$VENV_SJ2" 'spikingjelly==2.0.0' 'torch==2.9.1' 'torchvision==0.24.1' 'torchaudio==2.9.*'
  pip_install "$VENV_SJ2" -r requirements.txt 'torch==2.9.1'
  echo "[setup] $VENV_SJ2: spikingjelly-cf (editable, with the compiled CPU kernel)"
  pip_install "$VENV_SJ2" --no-deps --no-build-isolation -e .
  quiet "$VENV_SJ2/bin/python" -m pip --disable-pip-version-check check \
    || die "$VENV_SJ2 has broken dependencies (pip check, above)"
  sj2_ok || die "$VENV_SJ2 is not as expected (see above)"
  echo "$STAMP" > "$VENV_SJ2/.spikingjelly_cf-setup"
  echo "[setup] ready: $VENV_SJ2 (SpikingJelly 2.0.0 with torch 2.9.1, torchaudio and its datasets)"
}

[ "$MAIN" -eq 0 ] || setup_main
[ "$SJ2" -eq 0 ] || setup_sj2
