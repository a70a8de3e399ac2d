#!/usr/bin/env bash
# The one check to run on a machine with a CUDA GPU, from the repository root:
#   bash benchmarks/gpu_check.sh
# 1. builds and installs the extension against the installed torch (offline),
#    for the GPU that is here,
# 2. runs every CUDA test case (the CUDA-parametrised tests, the CUDA-only
#    tests and the property tests, which draw CUDA cases),
# 3. runs a small CUDA forward+backward+merge under compute-sanitizer memcheck,
#    then racecheck and initcheck on a smaller case, all with the caching
#    allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that an access past a
#    tensor's end is not hidden inside a cached block,
# 4. runs the latency benchmark on the GPU (one shape, N = 2048 and 8192).
# Prints everything and a pass/fail line per step at the end; the benchmark's
# JSON and PNG and a log go to $OUT (or ./benchmark-results). Each step has its
# own time limit, together under 8 minutes on one H100/H200.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/benchmark-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

# Build only for the GPU that is here (compute capability from nvidia-smi).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)} MOSLORA_BUILD_CUDA=1 PYTHONUNBUFFERED=1

failed=()
summary=()
step() {  # step NAME SECONDS COMMAND...: run, time and record a step
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    local verdict=PASS
    if [ $rc -ne 0 ]; then
        verdict="FAIL (exit $rc)"
        [ $rc -eq 124 ] && verdict="FAIL (timed out)"
        failed+=("$name")
    fi
    summary+=("$(printf '%-10s %-18s %4ss' "$name" "$verdict" $((SECONDS - start)))")
    echo "=== $name: $verdict after $((SECONDS - start))s ==="
    return $rc
}
print_summary() {
    echo
    echo "=== gpu_check summary ==="
    printf '%s\n' "${summary[@]}"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

step build 150 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index --force-reinstall "$REPO" \
    || { print_summary; echo "build failed: nothing else to run"; exit 1; }
cd /tmp  # import the installed package, not the source tree
"$PYTHON" -c "import moslora_ext; print(moslora_ext.build_info())"

# Every test id with "cuda" in it (the device-parametrised cases and the
# CUDA-only tests) and the property tests; the CPU-only rest runs in CI.
step tests 120 "$PYTHON" -m pytest "$REPO/tests" -q -rs -p no:cacheprovider -k "cuda or test_properties"

# SMOKE_SIZES picks the cases: racecheck and initcheck, which track every
# access, get the two smaller ones.
SMOKE=$(cat <<'EOF'
import os, torch, moslora_ext
torch.manual_seed(0)
sizes = ((1, 7, 5, 1), (37, 130, 70, 8), (300, 256, 512, 64))[:int(os.environ.get("SMOKE_SIZES", "3"))]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n, d, k, r in sizes:
        layer = moslora_ext.Linear(d, k, r=r, lora_dropout=0.1, device="cuda", dtype=dtype)
        torch.nn.init.normal_(layer.lora_B)
        x = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
        layer(x).square().mean().backward()
        x_t = torch.randn(d, n, device="cuda", dtype=dtype).t()  # non-contiguous input
        layer(x_t).sum().backward()
        moslora_ext.ops.dropout(x_t, 0.3, torch.tensor([1]))
        layer.eval()(x_t)
        layer.merge(); layer.unmerge()
torch.cuda.synchronize()
print("cuda smoke: ok")
EOF
)
if command -v compute-sanitizer > /dev/null; then
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -c "$SMOKE"
    SMOKE_SIZES=2 step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 "$PYTHON" -c "$SMOKE"
    SMOKE_SIZES=2 step initcheck 45 compute-sanitizer --tool initcheck --error-exitcode 1 "$PYTHON" -c "$SMOKE"
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
    echo "compute-sanitizer not found: running the smoke test without it"
    step smoke 60 "$PYTHON" -c "$SMOKE"
fi

step latency 120 "$PYTHON" "$REPO/benchmarks/latency.py" --device cuda --quick --tokens 2048 8192 --out "$OUT"

print_summary
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed"
else
    echo "gpu_check: FAILED steps: ${failed[*]}"
    exit 1
fi
