#!/usr/bin/env bash
# One-shot check of a GPU machine, from a clean checkout, within a fixed time budget:
#   1. `python -m spikingjelly_cf info`                  versions, devices, backends
#   2. `python -m spikingjelly_cf check --devices cuda`  every GPU backend against the float64
#                                                        reference (cupy, triton, torch; inductor
#                                                        if time is left), with its JSON
#   3. `pytest tests/test_gpu.py`                        the GPU tests (first-use check and
#                                                        deterministic mode included)
#   4. `python -m spikingjelly_cf bench --device cuda`   CF's cupy and triton backends vs
#                                                        SpikingJelly's LIFNode, T=8, the largest
#                                                        N <= 2^24 that fits
#   5. benchmarks/first_use_cost.py                      the first-use check's one-time cost
#   6. if time is left: `check` of the inductor backend, `bench` against SpikingJelly 2.0's
#      LIFNode, benchmarks/bench_protocol.py on CUDA
# Every step has its own timeout (a share of GPU_CHECK_BUDGET_S, default 420 s); a step that
# fails or times out is logged and the script goes on. Run it from anywhere:
#   bash benchmarks/gpu_check.sh
# Syntax check without a GPU: bash -n benchmarks/gpu_check.sh
#
# Offline machine (this project's H200: Python 3.12, torch with its Triton, cupy-cuda13x, no
# SpikingJelly, no network): first, on a machine that reaches PyPI,
#   bash benchmarks/fetch_gpu_wheels.sh        # fills benchmarks/wheels/ (ignored by git, ~5 MB)
# and bring benchmarks/wheels/ along. This script installs from it, with --no-deps and into a
# folder of its own (GPU_CHECK_SITE, default /tmp/spikingjelly_cf_gpu_check), only what does not
# import already: SpikingJelly 0.0.0.0.14 (2.0.0 for step 6), pytest, hypothesis, tqdm, loguru...
# With the project's device tool (15 minutes of device time in all, a cold start included):
#   run(command='GPU_CHECK_EXPORT=$OUT bash benchmarks/gpu_check.sh',
#       carry=['benchmarks/wheels'], timeout_s=600)
# GPU_CHECK_EXPORT=<folder> copies the summary, the log, the JSON reports and a tarball of the
# whole results folder there at the end (the tool brings back 8 files); to commit the results,
# extract it here: tar xzf results.tar.gz -C benchmarks/results. The default budget (420 s),
# the machine's cold start (2-4 min) and the transfers fit in the 15 minutes with a margin, but
# leave no time for a second full run.
#
# Results: benchmarks/results/<YYYY-MM-DD>_<gpu>/
#   gpu_check.log      everything printed          gpu_check.json  summary (exit codes, counts,
#   info.json          `info --json`                                fastest CF backend per case)
#   check.json         `check --json`              pytest_gpu.xml  JUnit report of test_gpu.py
#   bench.json         `bench --json` (sj0.0.0.0.14 LIF)   bench_sj2.json  (SpikingJelly 2.0 LIF)
#   first_use_cost_*.json
# The summary names, per dtype and mode, the fastest CF backend at the largest N: the evidence
# for the order of backends.AUTO_ORDER['cuda'].
# Exit status 0 when `check` passed and the GPU tests ran (not all skipped) and passed.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (420), GPU_CHECK_SITE,
# GPU_CHECK_EXPORT, SJ_PATH (a SpikingJelly to put on PYTHONPATH instead of the wheel),
# GPU_CHECK_RESULTS (the results folder instead of benchmarks/results/<date>_<gpu>).
# Dry run of the script itself on a machine without a GPU (tests/test_benchmarks.py does it):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 GPU_CHECK_RESULTS=/tmp/x bash benchmarks/gpu_check.sh
set -u
START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET=${GPU_CHECK_BUDGET_S:-420}
SITE="${GPU_CHECK_SITE:-/tmp/spikingjelly_cf_gpu_check}"
WHEELS="$ROOT/benchmarks/wheels"
DEV="${GPU_CHECK_DEVICE:-cuda}"
QUICK=()
[ -n "${GPU_CHECK_QUICK:-}" ] && QUICK=(--quick)
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
cap() {  # cap <seconds>: the smaller of <seconds> and what is left minus a reserve of 15 s
  local l; l=$(( $(left) - 15 )); if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}

DEVICE_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 \
  | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//;s/-$//')
DEVICE_TAG="nvidia-${DEVICE_TAG:-unknown}"
RESULTS="${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results/$(date +%F)_${DEVICE_TAG}}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
STEPS="$RESULTS/.steps"
: > "$STEPS"
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
run() {  # run <seconds> <cmd...>: output to console and log; returns the command's status
  local limit=$1; shift
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}
step() {  # step <name> <seconds> <cmd...>: run if at least 20 s are left; record status and time
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then
    log "SKIPPED $name: only $(left) s of the budget left"
    echo "$name skipped 0" >> "$STEPS"
    return 125
  fi
  log "$name (limit ${limit} s)"
  local t0 rc; t0=$(date +%s)
  run "$limit" "$@"; rc=$?
  log "$name: exit status $rc$([ $rc -eq 124 ] && echo ' (timed out)') in $(( $(date +%s) - t0 )) s"
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$STEPS"
  return $rc
}

log "gpu_check: repo $ROOT, python $PY, budget ${BUDGET} s, results in $RESULTS"
run 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
run 60 "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"

# -- 0. dependencies, offline, into $SITE (only what does not import already) ---------------------
mkdir -p "$SITE/common" "$SITE/sj014" "$SITE/sj2"
export PYTHONPATH="$ROOT:$SITE/common${PYTHONPATH:+:$PYTHONPATH}"
install_into() {  # install_into <folder> <module> <wheel name pattern>
  local folder=$1 module=$2 pattern=$3 wheel
  if PYTHONPATH="$folder:$PYTHONPATH" "$PY" -c "import $module" >/dev/null 2>&1; then return 0; fi
  wheel=$(find "$WHEELS" -maxdepth 2 -iname "$pattern" 2>/dev/null | sort | tail -n1)
  if [ -z "$wheel" ]; then
    log "WARNING: $module does not import and no $pattern in benchmarks/wheels (run benchmarks/fetch_gpu_wheels.sh)"
    return 1
  fi
  log "installing $(basename "$wheel") into $folder"
  run 120 "$PY" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$folder" "$wheel" || log "WARNING: installing $wheel failed"
}
for spec in pluggy:pluggy-*.whl iniconfig:iniconfig-*.whl pygments:pygments-*.whl \
            packaging:packaging-*.whl pytest:pytest-*.whl attr:attrs-*.whl \
            sortedcontainers:sortedcontainers-*.whl hypothesis:hypothesis-*.whl tqdm:tqdm-*.whl \
            loguru:loguru-*.whl scienceplots:scienceplots-*.whl; do
  install_into "$SITE/common" "${spec%%:*}" "${spec#*:}"
done
install_sj() {  # install_sj <folder> <wheel name pattern>: a SpikingJelly line of its own
  local wheel
  [ -d "$1/spikingjelly" ] && return 0
  wheel=$(find "$WHEELS" -maxdepth 2 -iname "$2" 2>/dev/null | sort | tail -n1)
  if [ -z "$wheel" ]; then
    log "WARNING: no $2 in benchmarks/wheels (run benchmarks/fetch_gpu_wheels.sh)"
    return 1
  fi
  log "installing $(basename "$wheel") into $1"
  run 120 "$PY" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$1" "$wheel" || log "WARNING: installing $wheel failed"
}
if [ -n "${SJ_PATH:-}" ]; then
  export PYTHONPATH="$SJ_PATH:$PYTHONPATH"
elif ! "$PY" -c "import spikingjelly" >/dev/null 2>&1; then
  install_sj "$SITE/sj014" 'spikingjelly-0.0.0.0.14-*.whl'
  export PYTHONPATH="$SITE/sj014:$PYTHONPATH"
fi
SJ2_PATH="$SITE/sj2"
install_sj "$SJ2_PATH" 'spikingjelly-2.0.0-*.whl'
run 60 "$PY" -c "import spikingjelly_cf, spikingjelly, cupy, triton; print('spikingjelly', spikingjelly_cf.SPIKINGJELLY_VERSION, 'cupy', cupy.__version__, 'triton', triton.__version__)" \
  || log "WARNING: an import failed (see above)"

# -- 1. info ------------------------------------------------------------------------------------
step info "$(cap 60)" "$PY" -m spikingjelly_cf info --json "$RESULTS/info.json"

# -- 2. check: the GPU backends against the float64 reference -------------------------------------
LIMIT=$(cap 200)
step check "$LIMIT" "$PY" -m spikingjelly_cf check --devices "$DEV" --backends torch cupy triton \
  "${QUICK[@]}" --no-progress --deadline-s $(( LIMIT > 120 ? LIMIT - 40 : LIMIT * 2 / 3 )) \
  --json "$RESULTS/check.json"
CHECK_RC=$(awk '$1 == "check" {print $2}' "$STEPS")

# -- 3. the GPU tests -----------------------------------------------------------------------------
step pytest_gpu "$(cap 150)" "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider \
  -o addopts="" --junitxml="$RESULTS/pytest_gpu.xml"
PYTEST_RC=$(awk '$1 == "pytest_gpu" {print $2}' "$STEPS")

# -- 4. bench: CF's backends vs SpikingJelly 0.0.0.0.14's LIFNode ---------------------------------
LIMIT=$(cap 130)
step bench "$LIMIT" "$PY" -m spikingjelly_cf bench --device "$DEV" --backends cupy triton \
  "${QUICK[@]}" --deadline-s $(( LIMIT > 60 ? LIMIT - 30 : LIMIT / 2 )) --json "$RESULTS/bench.json"

# -- 5. the first-use check's one-time cost ------------------------------------------------------
for backend in triton cupy; do
  step "first_use_cost_$backend" "$(cap 60)" "$PY" benchmarks/first_use_cost.py --device "$DEV" \
    --backend "$backend" --repeats 2 --timeout-s 25 --out "$RESULTS"
done

# -- 6. if time is left: the inductor backend's check, SpikingJelly 2.0's LIFNode ------------------
if [ ${#QUICK[@]} -eq 0 ]; then
  LIMIT=$(cap 90)
  step check_inductor "$LIMIT" "$PY" -m spikingjelly_cf check --devices "$DEV" --backends inductor \
    --surrogates CFRect TSG --no-progress --deadline-s $(( LIMIT > 60 ? LIMIT - 40 : 20 )) \
    --json "$RESULTS/check_inductor.json"
fi
LIMIT=$(cap 80)
step bench_sj2 "$LIMIT" env PYTHONPATH="$SJ2_PATH:$PYTHONPATH" "$PY" -m spikingjelly_cf bench \
  --device "$DEV" --dtypes float32 --backends cupy triton "${QUICK[@]}" \
  --deadline-s $(( LIMIT > 50 ? LIMIT - 30 : 20 )) --json "$RESULTS/bench_sj2.json"
# -- 7. if time is left: the open-neuromorphic protocol on CUDA (bench_protocol.py) -------------------
if [ ${#QUICK[@]} -eq 0 ] && [ -f benchmarks/bench_protocol.py ]; then
  step bench_protocol "$(cap 120)" "$PY" benchmarks/bench_protocol.py --device "$DEV" --no-long-T \
    --max-call-s 20 --out "$(dirname "$RESULTS")"
fi

# -- summary ------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
"$PY" - "$RESULTS" "$TOTAL" <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, json, os, subprocess, sys
import xml.etree.ElementTree as ET
out, total = sys.argv[1], int(sys.argv[2])
steps = {}
for line in open(os.path.join(out, '.steps')):
    name, rc, seconds = line.split()
    steps[name] = dict(exit_status=None if rc == 'skipped' else int(rc), seconds=int(seconds))
summary = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
               total_s=total, steps=steps)
try:
    summary['git_commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                                           text=True).stdout.strip()
except OSError:
    pass
def load(name):
    path = os.path.join(out, name)
    try:
        return json.load(open(path)) if os.path.exists(path) else None
    except ValueError:
        return None
info = load('info.json')
if info:
    summary['versions'] = {k: info.get(k) for k in ('python', 'torch', 'torch_cuda', 'spikingjelly',
                                                   'cupy', 'triton', 'nvrtc')}
    summary['gpus'] = [d['name'] for d in info['devices'] if d['type'] == 'cuda']
check = load('check.json')
if check:
    summary['check'] = dict(passed=check['passed'], complete=check.get('complete'),
                            rows=len(check['rows']),
                            failed=[f"{r['backend']} {r['device']} {r['dtype']} {r['surrogate']}: "
                                    f"{r['message']}" for r in check['rows'] if not r['passed']],
                            not_checked=check['not_checked'],
                            first_use_checks=check.get('first_use_checks'))
junit = os.path.join(out, 'pytest_gpu.xml')
if os.path.exists(junit):
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    summary['tests'] = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
for name in ('bench', 'bench_sj2'):
    bench = load(f'{name}.json')
    if not bench:
        continue
    fastest = {}
    for r in bench['rows']:
        if r.get('status') != 'ok' or not r['candidate'].startswith('CF[') or r['candidate'] == 'CF[inductor]':
            continue
        key = f"{r['dtype']} {r['mode']} N=2^{r['log2n']}"
        if key not in fastest or r['time_s'] < fastest[key]['time_s']:
            fastest[key] = dict(candidate=r['candidate'], time_s=r['time_s'],
                                frac_copy=r.get('frac_copy'), ratio_vs_lif=r.get('ratio_vs_lif'))
    summary[name] = dict(fastest_cf_kernel=fastest, targets=bench.get('targets'),
                         notes=bench.get('notes'))
costs = {}
for f in sorted(os.listdir(out)):
    if f.startswith('first_use_cost_') and f.endswith('.json'):
        d = json.load(open(os.path.join(out, f)))
        costs[f[len('first_use_cost_'):-5]] = dict(cost_s=d['first_use_check_cost_s'],
                                                   median=d['median'])
summary['first_use_cost'] = costs
tests = summary.get('tests', {})
summary['ok'] = bool(check and check['passed'] and steps.get('pytest_gpu', {}).get('exit_status') == 0
                     and tests.get('skipped', 1) < tests.get('tests', 0))
json.dump(summary, open(os.path.join(out, 'gpu_check.json'), 'w'), indent=1)
print(json.dumps(summary, indent=1))
EOF
log "done in ${TOTAL} s; results in $RESULTS"
rm -f "$STEPS"
if [ -n "${GPU_CHECK_EXPORT:-}" ]; then
  mkdir -p "$GPU_CHECK_EXPORT"
  for f in gpu_check.json gpu_check.log check.json bench.json info.json pytest_gpu.xml; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$GPU_CHECK_EXPORT/"
  done
  tar czf "$GPU_CHECK_EXPORT/results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
  log "copied the reports and results.tar.gz to $GPU_CHECK_EXPORT"
fi
"$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" \
  "$RESULTS/gpu_check.json"
