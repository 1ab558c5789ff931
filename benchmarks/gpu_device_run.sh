#!/usr/bin/env bash
# Everything to run on a machine with a real GPU, in one go, from the repository root:
#
#   OUT=/some/folder benchmarks/gpu_device_run.sh [--small]
#
#   1. benchmarks/gpu_first_run.py: the stages that decide most per minute (preflight, the
#      direct launch against Numba's bit for bit, no host wait, two streams and two threads,
#      bad labels, graph capture, memory outside torch's allocator), each verdict written to
#      $OUT/first-run.json as soon as its stage ends. If the preflight fails (no GPU, a driver
#      that refuses the kernels' PTX) nothing after it runs.
#   2. one small case under compute-sanitizer's memcheck (where it is installed)
#   3. the CUDA tests on the device: real torch and CuPy arrays
#   4. tests/test_gpu_training.py: a training step captured in a CUDA graph, streams
#   5. benchmarks/gpu_check.py: correctness on the device, then the timings and the goals
#   6. tests/test_gpu_jax.py: centerkern.jax's custom call on XLA's device buffers and stream
#   7. the small case under compute-sanitizer's racecheck (where installed; slow, so last)
#
# Each step's output goes to a log under $OUT (and to the terminal), the logs packed into
# $OUT/logs.tgz at the end; a failed step other than the preflight does not stop the next one. The whole run keeps within BUDGET_S seconds (default
# 480, 8 minutes): each step gets its own limit, cut to what is left. The last lines list every
# step's exit code (124: out of time); the script exits 1 if any step failed.
#
# --small runs the first step alone, at tiny sizes, as the simulator can (NUMBA_ENABLE_CUDASIM=1
# in the environment): the script's own bugs show before a GPU is at hand.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
: "${OUT:?set OUT to the folder that receives the logs and results}"
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-480}
SMALL=0
if [ "${1:-}" = "--small" ]; then
    SMALL=1
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMALL" = 0 ]; then
    # the real GPU, at the kernels' real launch shape
    unset NUMBA_ENABLE_CUDASIM CENTERKERN_CUDA_TILE
fi
PYTHON=${PYTHON:-python3}

# The machine comes with its own numba and numba-cuda; newer ones carried in .whl/ are installed
# beside them (first on PYTHONPATH) where their requirements are met there (gpu_packages.py).
if [ -d .whl ]; then
    if timeout 120 "$PYTHON" benchmarks/gpu_packages.py .whl /tmp/centerkern-site 2>&1 | tee "$OUT/packages.log"; then
        export PYTHONPATH="/tmp/centerkern-site:$PYTHONPATH"
    else
        echo "the carried wheels were not installed (see $OUT/packages.log); going on with the machine's"
    fi
fi
"$PYTHON" -c 'import numpy, numba, numba_cuda; print("numpy", numpy.__version__, "numba", numba.__version__,
    "numba-cuda", numba_cuda.__version__)' 2>&1 | tee -a "$OUT/packages.log"

STEPS=()
CODES=()

# run_step NAME LIMIT_S COMMAND...: run COMMAND with a time limit, its output tee'd to $OUT/NAME.log
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((limit > left)); then
        limit=$left
    fi
    STEPS+=("$name")
    if ((limit < 10)); then
        echo "== $name: not run, the time budget is spent" | tee "$OUT/$name.log"
        CODES+=("not run")
        return
    fi
    local command="$*"
    echo "== $name (at most ${limit} s): ${command%%$'\n'*}"  # its first line
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local code=${PIPESTATUS[0]}
    CODES+=("$code")
    echo "== $name: exit code $code"
}

{
    date -u +"%F %T UTC"
    git rev-parse HEAD 2>/dev/null || echo "(no git metadata in this copy)"
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
} >"$OUT/machine.txt"

if [ "$SMALL" = 1 ]; then
    run_step first-run 300 "$PYTHON" benchmarks/gpu_first_run.py "$OUT" --small
else
    run_step first-run 240 "$PYTHON" benchmarks/gpu_first_run.py "$OUT"
fi
if ! "$PYTHON" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["stages"]["preflight"]["verdict"] == "failed")' \
        "$OUT/first-run.json" 2>/dev/null; then
    echo "== the preflight failed (or never wrote its verdict): nothing after it can run here"
    SMALL=stop
fi
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ "$SMALL" = 0 ]; then
    if [ -n "$SANITIZER" ]; then
        run_step memcheck 60 "$SANITIZER" --tool memcheck --error-exitcode 9 \
            "$PYTHON" benchmarks/gpu_first_run.py --sanitized-case
    else
        echo "== memcheck, racecheck: compute-sanitizer is not installed here" | tee "$OUT/sanitizer.log"
    fi
    # -rs lists every skip with its reason: on this machine none may be for want of a GPU
    # (the test of what a machine without a GPU says is skipped here, by design: deselected)
    run_step cuda-tests 120 "$PYTHON" -m pytest -q --maxfail=5 -rs --durations=15 -p no:cacheprovider \
        -k "(cuda or gpu) and not without_a_gpu" --ignore=tests/test_gpu_training.py tests/
    run_step gpu-training-tests 60 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_training.py
    run_step gpu-check 150 "$PYTHON" benchmarks/gpu_check.py "$OUT/gpu-$(date +%F).json"
    # JAX's custom call on the GPU: opt-in until this run has shown it right (tests/test_gpu_jax.py)
    run_step gpu-jax-tests 45 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_jax.py
    if [ -n "$SANITIZER" ]; then
        run_step racecheck 90 "$SANITIZER" --tool racecheck --error-exitcode 9 \
            "$PYTHON" benchmarks/gpu_first_run.py --sanitized-case
    fi
fi

failed=0
for code in "${CODES[@]}"; do
    if [ "$code" != 0 ]; then
        failed=1
    fi
done
{
    echo "== summary (exit codes; 124: out of time), ${SECONDS} s in all"
    for i in "${!STEPS[@]}"; do
        printf '%-20s %s\n' "${STEPS[$i]}" "${CODES[$i]}"
    done
    if grep -iE "^SKIPPED.*(gpu|cuda|cupy|device)" "$OUT/cuda-tests.log" "$OUT/gpu-training-tests.log" 2>/dev/null \
        | grep -v "is available here"; then
        echo "(the skips above may be for want of a GPU: check them)"
    fi
} | tee "$OUT/summary.txt"
# The device machine returns at most 8 files: the step logs travel as one archive, beside the
# summary, the machine's description and the JSON results
(cd "$OUT" && tar czf logs.tgz -- *.log && rm -f -- *.log)
exit "$failed"
