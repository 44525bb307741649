#!/usr/bin/env bash
# Set up the environments (scripts/setup_env.sh --sj2-full) and run the tests in three passes:
#   1. .venv                            torch 2.14.1, SpikingJelly 0.0.0.0.14: the whole suite
#   2. .venv, PYTHONPATH=.venv/sj/2.0.0  torch 2.14.1, SpikingJelly 2.0.0 (neuron API only, no
#                                        torchaudio): the whole suite but the tests marked one_pass
#                                        (independent of the SpikingJelly line and expensive: nvcc,
#                                        the MNIST-1D accuracy run, the GPU benchmark's CPU smoke);
#                                        the DVS example's tests skip
#   3. .venv-sj2                        SpikingJelly 2.0.0 as `pip install spikingjelly` gives it
#                                        (torch 2.9.1, torchaudio 2.9): PASS3_TESTS below, i.e. what
#                                        needs spikingjelly.datasets plus the core kernel and neuron
#                                        tests (a second torch version)
#   docs .venv (as pass 1)              the documentation site: sphinx-build -W --keep-going into
#                                        docs/_build/html (a warning fails the run); the code on its
#                                        pages runs as doctests in passes 1 and 2
# Each pass tells tests/conftest.py what it claims to test (SPIKINGJELLY_CF_EXPECT_SJ,
# SPIKINGJELLY_CF_EXPECT_TORCH, SPIKINGJELLY_CF_EXPECT_DATASETS); a mismatch fails that pass at
# start. The smoke runs of the documented commands (tests/test_documented_commands.py) pick their
# own environment, so only pass 1 runs them (pass 2 sets SPIKINGJELLY_CF_SKIP_DOC_SMOKE=1).
# Extra arguments go to pytest in every pass (e.g. scripts/test.sh -k kernels).
# Environment: VENV, VENV_SJ2 (as in setup_env.sh), PASSES (default "1 docs 2 3").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV_SJ2=${VENV_SJ2:-.venv-sj2}
PASSES=${PASSES:-1 docs 2 3}
# pass 3: every test that needs spikingjelly.datasets, and the kernel / custom-op / neuron / PNB core
# and torch.compile / export / checkpoint, which lean on torch internals that change between versions
PASS3_TESTS=(tests/test_examples.py tests/test_synthetic_gesture.py tests/test_kernels_cpu.py
             tests/test_ops.py tests/test_neuron.py tests/test_pnb.py tests/test_compile.py
             tests/test_checkpoint.py tests/test_tsg_spikingjelly.py tests/test_cfrect.py
             tests/test_layout.py tests/test_streaming.py)

case " $PASSES " in
  *" 3 "*) bash scripts/setup_env.sh --sj2-full ;;
  *) bash scripts/setup_env.sh ;;
esac

status=0 summary=()
run_pass() {  # run_pass NAME ENV-ASSIGNMENTS... -- COMMAND...
  local name=$1; shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  echo "=== pass $name ==="
  local start=$SECONDS rc=0
  env "${envs[@]}" "$@" || rc=$?
  local took=$((SECONDS - start))
  summary+=("pass $name: exit status $rc, ${took} s")
  echo "=== pass $name: exit status $rc, ${took} s ==="
  # 5 = no test collected (e.g. a -k that matches nothing in this pass's files): not a failure
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=1; fi
}

for p in $PASSES; do
  case $p in
    1) run_pass "1 (torch 2.14.1, SpikingJelly 0.0.0.0.14)" \
         PYTHONPATH= SPIKINGJELLY_CF_EXPECT_SJ=0.0.0.0.14 SPIKINGJELLY_CF_EXPECT_TORCH=2.14.1 -- \
         "$VENV/bin/python" -m pytest -q --durations=15 "$@" ;;
    2) run_pass "2 (torch 2.14.1, SpikingJelly 2.0.0 without its dependencies)" \
         PYTHONPATH="$VENV/sj/2.0.0" SPIKINGJELLY_CF_EXPECT_SJ=2.0.0 SPIKINGJELLY_CF_EXPECT_TORCH=2.14.1 \
         SPIKINGJELLY_CF_SKIP_DOC_SMOKE=1 -- \
         "$VENV/bin/python" -m pytest -q --durations=15 -m "not one_pass" "$@" ;;
    docs) rm -rf docs/_build
       run_pass "docs (sphinx-build -W: a warning fails it)" PYTHONPATH= -- \
         "$VENV/bin/python" -m sphinx -W --keep-going -q -b html docs docs/_build/html ;;
    3) run_pass "3 (torch 2.9.1, SpikingJelly 2.0.0 with its dependencies)" \
         PYTHONPATH= SPIKINGJELLY_CF_EXPECT_SJ=2.0.0 SPIKINGJELLY_CF_EXPECT_TORCH=2.9.1 SPIKINGJELLY_CF_EXPECT_DATASETS=1 -- \
         "$VENV_SJ2/bin/python" -m pytest -q --durations=15 "${PASS3_TESTS[@]}" "$@" ;;
    *) echo "unknown pass $p in PASSES (allowed: 1 docs 2 3)" >&2; exit 2 ;;
  esac
done
printf '%s\n' "${summary[@]}"
if [ $status -ne 0 ]; then echo "=== FAILED (see above) ===" >&2; fi
exit $status
