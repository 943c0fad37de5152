#!/usr/bin/env bash
# One prepared check for a GPU machine (written for an H200), ~8 minutes:
#   1. environment (GPU, driver, python, torch, triton, nvcc)
#   2. offline install of the wheels carried in .whl/ (if any) into /tmp/site
#   3. in-place build of the extension with CUDA (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)
#   4. the test suite (python_tests) with the GPU visible, so the CUDA tests run
#   5. benchmarks/bench_gpu.py (backends, CUDA-graph replay, peers, sync/capture checks)
#   6. benchmarks/overhead.py on the GPU (training step, uniform vs vaw)
#   7. a short CUDA run of the trainer (train, resume, --compile)
#   8. the fused kernels (VARWEIGHT_FUSED_KERNELS=1, issue #19), not yet the default:
#      fused_tests  the GPU tests once more with the switch on in the environment (the step tests
#                   also run both kernel sets by themselves, in step 4)
#      fused_bench  bench_gpu.py --fused: today's kernels and the fused ones at B = 1024 and 65536,
#                   K = 64 (eager, graphed whole step, sync-free and capture checks) and the raw step
#                   at B = 2^24, K = 64 for lam uniform / EDM / one bin, cold and warm L2 ($OUT/fused)
#      sanitizer    compute-sanitizer racecheck, synccheck and memcheck on small fused steps
#                   (B = 2^16 + 3, K = 64: several blocks, so the ticket path runs) of cuda and triton
#   9. images_per_s  the paper preset's images/s against a minimal loop (issue #15)
#  10. evidence      benchmarks/evidence.py: the convergence-budget study of issue 22 (quad-digits,
#                    5,000 steps, 10 seeds x 5 weightings trained at once), report in $OUT/evidence
# Every step has its own time limit and the script carries on after a failing step; all
# output is tee'd to $OUT/gpu_check.log and a summary is printed last and saved as
# $OUT/summary.md. $OUT defaults to ./gpu_results.
#
# Usage, from the repository root of a GPU machine (a .whl/ folder there, if any, holds wheels to
# install offline, e.g. torch-fidelity for the evaluation tests):
#   bash benchmarks/gpu_check.sh
#   OUT=/tmp/gpu_results timeout 600 bash benchmarks/gpu_check.sh    # results elsewhere, hard limit
# Budget knobs: GPU_CHECK_BUDGET (seconds for the whole script, default 500), GPU_CHECK_QUICK=1
# (smaller benchmark grid), GPU_CHECK_XDIST (pytest workers, default 8), GPU_CHECK_TESTS (pytest -k
# expression, default "cuda or gpu"; empty runs the whole suite), PYTHON (default python3),
# GPU_CHECK_STEPS (run only these steps, e.g. "environment build bench_gpu" for a rerun).
# The fused kernels and the paper preset's images/s, within ~8 minutes:
#   GPU_CHECK_STEPS='environment wheels build tests fused_tests fused_bench sanitizer images_per_s' \
#       bash benchmarks/gpu_check.sh
set -uo pipefail  # no -e: a failing step is recorded and the next one still runs

cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-500}"
START=$SECONDS
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET  # the interpreter is for CPU-only CI, never for timing

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

SUMMARY=()
# step NAME LIMIT RESERVE CMD...: run CMD with at most LIMIT seconds, keeping RESERVE seconds of
# the budget for the steps after it.
step() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        echo "=== $name: not selected (GPU_CHECK_STEPS=$GPU_CHECK_STEPS)"
        SUMMARY+=("| $name | not selected | 0 |")
        return 0
    fi
    reserve=$((reserve * BUDGET / 500))  # the reserves below are sized for the default 500 s budget
    local left=$((BUDGET - (SECONDS - START) - reserve))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 10)); then
        echo "=== $name: skipped, budget spent"
        SUMMARY+=("| $name | skipped (budget) | 0 |")
        return 0
    fi
    echo
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    local t0=$SECONDS
    # bash -c: the steps are shell functions (exported below); timeout signals the whole group
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@"
    local rc=$?
    local took=$((SECONDS - t0))
    local what="rc=$rc"
    if ((rc == 124 || rc == 137)); then what="TIMEOUT after ${limit}s"; fi
    echo "=== $name: $what in ${took}s"
    SUMMARY+=("| $name | $what | $took |")
    return 0
}

env_info() {
    date -u
    uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    command -v nvcc && nvcc --version | tail -2
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton missing:", exc)
for name in ("pytest", "pytest_benchmark", "xdist", "pytest_timeout", "scipy", "sklearn", "torch_fidelity"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
EOF
}

install_wheels() {
    shopt -s nullglob
    local wheels=("$ROOT"/.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in .whl/: nothing to install"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
}

build_extension() {
    # In place, so the tree itself is the package (PYTHONPATH=$ROOT); pip -e as a fallback.
    export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    "$PY" setup.py build_ext --inplace ||
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
    "$PY" - <<'EOF'
import varweight_kernels
from varweight_kernels import backends
import torch
print("available backends:", varweight_kernels.available_backends())
for name in backends.BACKEND_NAMES:
    print(f"  {name}: cuda -> {backends.backend_reason(name, torch.device('cuda'))}; "
          f"cpu -> {backends.backend_reason(name, torch.device('cpu'))}")
from varweight_kernels.backends import extension as _ext
import glob, re
for lib in sorted(glob.glob("varweight_kernels/*.so")):
    data = open(lib, "rb").read()
    hits = [data[m.start():m.start() + 60] for m in re.finditer(_ext.MARKER_PREFIX, data)]
    print(f"{lib}: marker {_ext.read_marker(lib)!r}; prefix found {len(hits)}x: {hits[:3]}")
print("extension status:", _ext._STATUS)
missing = [b for b in ("cuda", "triton") if b not in varweight_kernels.available_backends()]
raise SystemExit(f"not available on this GPU machine: {missing}" if missing else 0)
EOF
}

run_tests() {
    local xdist=()
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n "${GPU_CHECK_XDIST:-8}"); fi
    local timeout_opt=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then timeout_opt=(--timeout=90); fi
    # The CPU tests run in CI; here the ones that need the GPU (GPU_CHECK_TESTS="" runs all).
    "$PY" -m pytest python_tests -q -rs -p no:cacheprovider --durations=15 "${xdist[@]}" "${timeout_opt[@]}" \
        -k "${GPU_CHECK_TESTS-cuda or gpu}" --junitxml="$OUT/tests.xml"
}

trainer_smoke() {
    # The trainer's CUDA paths (bf16 autocast, the auto backend, checkpoints, resume, --compile).
    local run=/tmp/varweight-gpu-run
    rm -rf "$run" "$run-compiled"
    "$PY" train_cifar.py --preset digits-smoke --weighting vaw --device cuda --out "$run" --quiet --steps 10 --analysis-batches 4 &&
        "$PY" train_cifar.py --preset digits-smoke --weighting vaw --device cuda --out "$run" --quiet --resume --steps 20 \
            --analysis-batches 4 &&
        ls "$run" && tail -n 2 "$run/metrics.jsonl" &&
        "$PY" train_cifar.py --preset digits-smoke --weighting vaw --device cuda --out "$run-compiled" --quiet --compile --steps 10 \
            --analysis-batches 4 && tail -n 1 "$run-compiled/metrics.jsonl"
}

fused_tests() {
    VARWEIGHT_FUSED_KERNELS=1 "$PY" -m pytest python_tests/test_cuda_backend.py python_tests/test_triton.py \
        python_tests/test_module.py -q -rs -p no:cacheprovider -k "${GPU_CHECK_TESTS-cuda or gpu}" \
        --junitxml="$OUT/tests_fused.xml"
}

sanitize() {
    # racecheck: shared-memory hazards (the fused CUDA kernel's columns, its block sums and the
    # last block's finalize); synccheck: barrier use; memcheck: out-of-bounds and misaligned accesses.
    local tool_bin
    tool_bin=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    if [[ ! -x "$tool_bin" ]]; then
        echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
        return 1
    fi
    local rc=0 tool name
    for tool in racecheck synccheck memcheck; do
        for name in cuda triton; do
            echo "--- compute-sanitizer --tool $tool: $name"
            "$tool_bin" --tool "$tool" --error-exitcode 3 --print-limit 20 "$PY" benchmarks/fused_step.py "$name" || rc=1
        done
    done
    return $rc
}

export ROOT OUT PY
export -f env_info install_wheels build_extension run_tests trainer_smoke fused_tests sanitize

bench_args=(--sweep)
if [[ "${GPU_CHECK_QUICK:-0}" != "0" ]]; then
    bench_args=(--sweep --batches 1024 65536 1048576 16777216 67108864 --bins 64 1024 --rep-ms 30)
fi

#    name      limit reserve (seconds kept for the later steps, for a 500 s budget)
step environment 30 470 env_info
step wheels      30 460 install_wheels
if [[ -d /tmp/site ]]; then export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
step build      200 300 build_extension
step tests      120 180 run_tests
step bench_gpu  150 110 "$PY" benchmarks/bench_gpu.py --out "$OUT" "${bench_args[@]}"
step overhead    60  50 "$PY" benchmarks/overhead.py --device cuda --out "$OUT"
step trainer     60   0 trainer_smoke
step fused_tests 90   0 fused_tests
step fused_bench 120  0 "$PY" benchmarks/bench_gpu.py --out "$OUT/fused" --fused --batches 1024 65536 --bins 64 \
    --no-compile --rep-ms 30
step sanitizer  150   0 sanitize
step images_per_s 180 0 "$PY" benchmarks/images_per_s.py --device cuda --out "$OUT/images_per_s"
step evidence   300 0 "$PY" benchmarks/evidence.py --device cuda --out "$OUT/evidence"

{
    echo "# gpu_check.sh on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) ($(date -u +%F))"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "total: $((SECONDS - START)) s of a ${BUDGET} s budget"
} > "$OUT/summary.md"
echo
[[ -f "$OUT/bench_gpu.md" ]] && cat "$OUT/bench_gpu.md"
[[ -f "$OUT/overhead.md" ]] && cat "$OUT/overhead.md"
[[ -f "$OUT/fused/bench_gpu.md" ]] && cat "$OUT/fused/bench_gpu.md"
[[ -f "$OUT/fused/bench_gpu_fused.md" ]] && cat "$OUT/fused/bench_gpu_fused.md"
echo
cat "$OUT/summary.md"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || true
