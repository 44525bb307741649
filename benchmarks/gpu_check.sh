#!/usr/bin/env bash
# One-shot GPU check of the GPU backends ('cupy', 'triton', 'inductor' where present): the GPU
# tests, then a benchmark of all of them against SpikingJelly's LIFNode on its fastest GPU backend.
#
# Meant for a GPU machine without internet (H200, torch with its bundled Triton, cupy-cuda13x if
# present). Run from anywhere:   bash benchmarks/gpu_check.sh
# Finishes within 8 minutes: every step has its own `timeout`, logs and the script goes on.
# Installs what is missing from the wheels in benchmarks/wheels/ (ignored by git; fill it on a
# machine with internet, for the GPU machine's Python, e.g. 3.12 on x86-64 Linux):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d benchmarks/wheels \
#     spikingjelly==0.0.0.0.14 snntorch norse pytest hypothesis pluggy iniconfig \
#     sortedcontainers attrs
# (pure-Python wheels; add cupy-cuda13x for the CuPy backend if the machine lacks it). Results:
#   benchmarks/results/<YYYY-MM-DD>_<device>/gpu_check.log    everything printed
#   benchmarks/results/<YYYY-MM-DD>_<device>/gpu_check.json   versions, return codes, test counts
#   benchmarks/results/<YYYY-MM-DD>_<device>/pytest_gpu.xml   JUnit report of tests/test_gpu.py
#   benchmarks/results/<YYYY-MM-DD>_<device>/gpu_bench.{json,md}  CF backends vs LIFNode, T=8,
#       N=2^20..2^24, float32/16/bf16, training and inference: time, fraction of copy
#       bandwidth, peak memory, the targets (benchmarks/gpu_bench.py)
# plus whatever benchmarks/bench_neuron.py --quick --device cuda writes, if time is left.
# Environment: PYTHON (default python3, else python), SJ_PATH (an unpacked SpikingJelly to put
# on PYTHONPATH instead of installing a wheel), GPU_CHECK_BUDGET_S (default 470).
# Syntax check without a GPU: bash -n benchmarks/gpu_check.sh
set -u
START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${SJ_PATH:+:$SJ_PATH}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-470}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

DEVICE_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 \
  | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//;s/-$//')
DEVICE_TAG="nvidia-${DEVICE_TAG:-unknown}"
OUT="$ROOT/benchmarks/results/$(date +%F)_${DEVICE_TAG}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
run() {  # run <seconds> <cmd...>: output to console and log, returns the command's status
  local limit=$1; shift
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

log "gpu_check: repo $ROOT, python $PY, results in $OUT"
run 30 nvidia-smi
run 30 "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
run 60 "$PY" -c "import cupy; print('cupy', cupy.__version__)" || log "WARNING: cupy does not import"
run 60 "$PY" -c "import triton; print('triton', triton.__version__)" || log "WARNING: triton does not import"

# 1. dependencies, offline, from benchmarks/wheels (only what does not import already)
INSTALL_RC=0
install_wheel() {  # install_wheel <module> <wheel glob>
  if "$PY" -c "import $1" >/dev/null 2>&1; then return 0; fi
  if ls benchmarks/wheels/$2 >/dev/null 2>&1; then
    log "installing $1 from benchmarks/wheels"
    run 90 "$PY" -m pip install -q --no-deps --no-index --no-cache-dir benchmarks/wheels/$2 \
      || { INSTALL_RC=1; log "WARNING: installing $1 failed"; }
  else
    log "WARNING: $1 is not importable and benchmarks/wheels/$2 is missing"
    [ "$1" = spikingjelly ] && INSTALL_RC=1
  fi
}
install_wheel spikingjelly 'spikingjelly-*.whl'
install_wheel snntorch 'snntorch-*.whl'
install_wheel norse 'norse-*.whl'
for mod in pluggy iniconfig sortedcontainers attrs pytest hypothesis; do
  install_wheel "$mod" "${mod}-*.whl"
done
# 2. GPU tests (parity grid for float32/16/bf16, sentinel, multi vs single step, autocast, ...)
# (cupy, triton, inductor where present; Triton compiles ~60 kernel variants on first use)
log "pytest tests/test_gpu.py (limit 270 s)"
run 270 "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/pytest_gpu.xml"
PYTEST_RC=$?
log "pytest exit code $PYTEST_RC"

# 3. every GPU backend vs SpikingJelly's LIFNode (gpu_bench.py stops starting cases at its deadline)
KBENCH_RC=-1
LEFT=$(( $(left) - 25 ))
if [ "$LEFT" -gt 30 ]; then
  log "gpu_bench.py (deadline $((LEFT - 20)) s, limit $LEFT s)"
  run "$LEFT" "$PY" benchmarks/gpu_bench.py --device cuda --T 8 --log2n 20 22 24 \
    --dtypes float32 float16 bfloat16 --modes training inference --budget-s 0.3 \
    --deadline-s $((LEFT - 20)) --out "$OUT"
  KBENCH_RC=$?
else
  log "skipping gpu_bench.py: only $(left) s left"
fi
log "gpu_bench exit code $KBENCH_RC"

# 4. the package benchmark (bench_neuron.py), if present and time is left
BENCH_RC=-1
if [ -f benchmarks/bench_neuron.py ]; then
  LEFT=$(( $(left) - 15 ))
  if [ "$LEFT" -gt 60 ]; then
    log "bench_neuron.py --quick --device cuda (limit ${LEFT}s)"
    run "$LEFT" "$PY" benchmarks/bench_neuron.py --quick --device cuda --out "$ROOT/benchmarks/results"
    BENCH_RC=$?
  else
    log "skipping bench_neuron.py: only ${LEFT}s left"
  fi
else
  log "benchmarks/bench_neuron.py not found: skipped"
fi

# 4b. the open-neuromorphic protocol (Linear(n, n) + neuron, batch 16, T = 500,
#     n = 512 / 4096 / 16384) on CUDA, if present and time is left; writes protocol_sj*.{json,md,png}
ELAPSED=$(( $(date +%s) - START ))
LEFT=$(( 470 - ELAPSED ))
if [ -f benchmarks/bench_protocol.py ] && [ "$LEFT" -gt 30 ]; then
  log "bench_protocol.py --device cuda (limit ${LEFT}s)"
  run "$LEFT" "$PY" benchmarks/bench_protocol.py --device cuda --no-long-T --max-call-s 20 \
    --out "$ROOT/benchmarks/results" || log "bench_protocol.py exit code $?"
else
  log "skipping bench_protocol.py (missing, or only ${LEFT}s left)"
fi

# 5. summary JSON
TOTAL=$(( $(date +%s) - START ))
"$PY" - "$OUT" "$INSTALL_RC" "$PYTEST_RC" "$KBENCH_RC" "$BENCH_RC" "$TOTAL" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, subprocess, sys, datetime
import xml.etree.ElementTree as ET
out, install_rc, pytest_rc, kbench_rc, bench_rc, total = sys.argv[1:]
summary = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
               install_rc=int(install_rc), pytest_rc=int(pytest_rc),
               gpu_bench_rc=int(kbench_rc), bench_neuron_rc=int(bench_rc),
               total_s=int(total))
try:
    summary['git_commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                                           text=True).stdout.strip()
except OSError:
    pass
try:
    import torch
    summary.update(torch=torch.__version__, cuda=torch.version.cuda,
                   gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
except Exception as exc:  # noqa: BLE001
    summary['import_error'] = repr(exc)
for mod in ('cupy', 'triton', 'spikingjelly', 'snntorch', 'norse'):
    try:
        summary[mod] = __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001
        summary[mod] = f'not importable: {type(exc).__name__}'
bench = os.path.join(out, 'gpu_bench.json')
if os.path.exists(bench):
    summary['targets'] = json.load(open(bench)).get('targets')
junit = os.path.join(out, 'pytest_gpu.xml')
if os.path.exists(junit):
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    summary['tests'] = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
summary['ok'] = summary['pytest_rc'] == 0 and summary.get('tests', {}).get('skipped', 1) < \
    summary.get('tests', {}).get('tests', 0)
json.dump(summary, open(os.path.join(out, 'gpu_check.json'), 'w'), indent=1)
print(json.dumps(summary, indent=1))
EOF
log "done in ${TOTAL}s; results in $OUT"
# exit 0 only when the GPU tests ran (not all skipped) and passed
"$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" \
  "$OUT/gpu_check.json"
