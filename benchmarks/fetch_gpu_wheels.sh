#!/usr/bin/env bash
# Fill benchmarks/wheels/ (ignored by git) with the wheels benchmarks/gpu_check.sh installs on an
# offline GPU machine: both SpikingJelly lines and the pure-Python packages the GPU tests and
# benchmarks need, for the GPU machine's Python (default CPython 3.12 on x86-64 Linux).
#
#   bash benchmarks/fetch_gpu_wheels.sh            # on a machine that reaches PyPI
#   GPU_PYTHON_VERSION=3.11 bash benchmarks/fetch_gpu_wheels.sh
#
# Layout (what gpu_check.sh expects):
#   benchmarks/wheels/sj-0.0.0.0.14/spikingjelly-0.0.0.0.14-py3-none-any.whl
#   benchmarks/wheels/sj-2.0.0/spikingjelly-2.0.0-py3-none-any.whl
#   benchmarks/wheels/*.whl   pytest and its dependencies, hypothesis, tqdm, loguru and
#                             SciencePlots (SpikingJelly 2.0's neuron API), snntorch, norse
# Every wheel is fetched with --no-deps: gpu_check.sh installs only what does not import already
# (the GPU machine's image has torch, Triton, CuPy, NumPy, matplotlib). Prints the total size: the
# folder travels with the working tree to the device machine (64 MiB at most there).
# Environment: PYTHON (default python3), GPU_PYTHON_VERSION (3.12), WHEELS_DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEELS_DIR:-$ROOT/benchmarks/wheels}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
PYVER="${GPU_PYTHON_VERSION:-3.12}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)

fetch() {  # fetch <folder> <requirement...>
  local folder=$1; shift
  mkdir -p "$folder"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$folder" "$@"
}

echo "fetching wheels for CPython $PYVER (x86-64 Linux) into $DEST"
fetch "$DEST/sj-0.0.0.0.14" 'spikingjelly==0.0.0.0.14'
fetch "$DEST/sj-2.0.0" 'spikingjelly==2.0.0'
# the tests (pytest 8 needs iniconfig, packaging, pluggy, pygments; hypothesis needs attrs and
# sortedcontainers), the progress bar, SpikingJelly 2.0's neuron API (loguru, SciencePlots)
fetch "$DEST" pytest iniconfig packaging pluggy pygments hypothesis attrs sortedcontainers tqdm \
  loguru SciencePlots
# the benchmarks' peers (benchmarks/bench_protocol.py), if a session has time for them; best
# effort: norse >= 1.1 publishes no pure-Python wheel for every Python
for peer in 'snntorch>=0.9' 'norse>=1.1'; do
  fetch "$DEST" "$peer" 2>/dev/null || echo "WARNING: no wheel of $peer for CPython $PYVER (skipped)"
done
ls -1 "$DEST"/*.whl "$DEST"/sj-*/*.whl
echo "total: $(du -sh "$DEST" | cut -f1) in $DEST"
