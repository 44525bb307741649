#!/usr/bin/env bash
# One-shot GPU check of the CuPy backend (issue 3): the GPU tests, then a short kernel benchmark.
#
# Meant for a GPU machine without internet (H200, torch + cupy-cuda13x preinstalled, no
# SpikingJelly). Run from anywhere:   bash benchmarks/gpu_check.sh
# Installs SpikingJelly from benchmarks/wheels/*.whl when it is not importable, then writes
#   benchmarks/results/<YYYY-MM-DD>_<device>/gpu_check.log    everything printed
#   benchmarks/results/<YYYY-MM-DD>_<device>/gpu_check.json   versions, return codes, test counts
#   benchmarks/results/<YYYY-MM-DD>_<device>/pytest_gpu.xml   JUnit report of tests/test_gpu.py
#   benchmarks/results/<YYYY-MM-DD>_<device>/kernel_bench.json  CuPy kernel vs reference timings
# plus whatever benchmarks/bench_neuron.py --quick --device cuda writes (if present).
# Every step has its own `timeout`; the whole script stays under 8 minutes.
# Environment: PYTHON (default python3, else python), SJ_PATH (an unpacked SpikingJelly to put
# on PYTHONPATH instead of installing a wheel).
set -u
START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${SJ_PATH:+:$SJ_PATH}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

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

# 1. dependencies, offline: SpikingJelly (and pytest/hypothesis if missing) from benchmarks/wheels
INSTALL_RC=0
if ! "$PY" -c "import spikingjelly" >/dev/null 2>&1; then
  if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    log "installing SpikingJelly from benchmarks/wheels"
    run 90 "$PY" -m pip install --no-deps --no-index benchmarks/wheels/spikingjelly*.whl
    INSTALL_RC=$?
  else
    log "ERROR: spikingjelly is not importable and benchmarks/wheels/*.whl is missing"
    INSTALL_RC=1
  fi
fi
for mod in pytest hypothesis; do
  if ! "$PY" -c "import $mod" >/dev/null 2>&1 && ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    run 60 "$PY" -m pip install --no-index --find-links benchmarks/wheels "$mod" || true
  fi
done

# 2. GPU tests (parity grid for float32/16/bf16, sentinel, multi vs single step, autocast, ...)
log "pytest tests/test_gpu.py"
run 240 "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/pytest_gpu.xml"
PYTEST_RC=$?
log "pytest exit code $PYTEST_RC"

# 3. short kernel benchmark of our own (always), CuPy kernel vs reference, CUDA events
log "kernel benchmark"
run 75 "$PY" - "$OUT/kernel_bench.json" <<'EOF'
import json, sys, time
import torch
from spikingjelly_cf.backends import cupy as cb
from spikingjelly_cf.functional.neuron import cf_multi_step_ref

def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]

rows = []
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for log2n in (20, 22, 24):
        T, N = 8, 2 ** log2n
        x = torch.randn(T, N, device='cuda', dtype=dtype, requires_grad=True)
        v = torch.zeros(N, device='cuda', dtype=dtype)
        g = torch.randn(T, N, device='cuda', dtype=dtype)
        def train(fn=cb.cf_multi_step_cupy):
            x.grad = None
            s, *_ = fn(x, v)
            s.backward(g)
        def infer(fn=cb.cf_multi_step_cupy):
            with torch.no_grad():
                fn(x, v)
        src = torch.empty(T * N * 3, device='cuda', dtype=dtype); dst = torch.empty_like(src)
        t_copy = timed(lambda: dst.copy_(src))          # 3 TN elements read + 3 TN written
        t_train, t_infer = timed(train), timed(infer)
        es = x.element_size()
        # fused kernel: fwd reads x, writes s, saves h (float32); bwd reads grad_s, h, writes grad_x
        moved_train = T * N * (es * 4 + 4 * 2)
        row = dict(dtype=str(dtype).split('.')[-1], T=T, N=N, train_s=t_train, infer_s=t_infer,
                   copy_GBps=6 * T * N * es / t_copy / 1e9,
                   train_GBps=moved_train / t_train / 1e9,
                   infer_GBps=2 * T * N * es / t_infer / 1e9)
        if log2n == 20:
            row['ref_train_s'] = timed(lambda: train(cf_multi_step_ref), reps=3)
            row['speedup_vs_ref'] = row['ref_train_s'] / t_train
        row['train_frac_of_copy'] = row['train_GBps'] / row['copy_GBps']
        rows.append(row)
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del x, v, g, src, dst
        torch.cuda.empty_cache()
json.dump({'device': torch.cuda.get_device_name(), 'torch': torch.__version__,
           'launches': cb.launch_count, 'rows': rows}, open(sys.argv[1], 'w'), indent=1)
EOF
KBENCH_RC=$?
log "kernel benchmark exit code $KBENCH_RC"

# 4. the package benchmark (another issue's script), if present and time is left
BENCH_RC=-1
ELAPSED=$(( $(date +%s) - START ))
if [ -f benchmarks/bench_neuron.py ]; then
  LEFT=$(( 440 - ELAPSED ))
  if [ "$LEFT" -gt 30 ]; then
    log "bench_neuron.py --quick --device cuda (limit ${LEFT}s)"
    run "$LEFT" "$PY" benchmarks/bench_neuron.py --quick --device cuda --out "$ROOT/benchmarks/results"
    BENCH_RC=$?
  else
    log "skipping bench_neuron.py: only ${LEFT}s left"
  fi
else
  log "benchmarks/bench_neuron.py not found: skipped"
fi

# 4b. issue 11: the open-neuromorphic protocol (Linear(n, n) + neuron, batch 16, T = 500,
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
               kernel_bench_rc=int(kbench_rc), bench_neuron_rc=int(bench_rc),
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
    import cupy
    summary['cupy'] = cupy.__version__
except Exception as exc:  # noqa: BLE001
    summary['import_error'] = repr(exc)
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
