#!/usr/bin/env bash
# The one check to run on a machine with a CUDA GPU, from the repository root:
#   bash benchmarks/gpu_check.sh
# 1. builds and installs the extension against the installed torch (offline),
# 2. runs the whole test suite, CUDA cases included,
# 3. runs a small CUDA forward+backward+merge under compute-sanitizer memcheck,
# 4. runs the latency benchmark on the GPU.
# Prints everything; the benchmark's JSON and PNG and a log go to $OUT (or
# ./benchmark-results). Each step has its own time limit; the whole check
# is sized to finish in under 8 minutes on one H100/H200.
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
step() {  # step NAME SECONDS COMMAND...: run, time and record a step
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s ==="
    [ $rc -eq 0 ] || failed+=("$name")
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index --force-reinstall "$REPO" \
    || { echo "build failed: nothing else to run"; exit 1; }
cd /tmp  # import the installed package, not the source tree
"$PYTHON" -c "import moslora_ext; print(moslora_ext.build_info())"

step tests 240 "$PYTHON" -m pytest "$REPO/tests" -q -rs -x -p no:cacheprovider

SMOKE=$(cat <<'EOF'
import torch, moslora_ext
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n, d, k, r in ((1, 7, 5, 1), (37, 130, 70, 8), (300, 256, 512, 64)):
        layer = moslora_ext.Linear(d, k, r=r, lora_dropout=0.1, device="cuda", dtype=dtype)
        torch.nn.init.normal_(layer.lora_B)
        x = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
        layer(x).square().mean().backward()
        x_t = torch.randn(d, n, device="cuda", dtype=dtype).t()  # non-contiguous input
        layer.eval()(x_t)
        layer.merge(); layer.unmerge()
torch.cuda.synchronize()
print("cuda smoke: ok")
EOF
)
if command -v compute-sanitizer > /dev/null; then
    step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -c "$SMOKE"
else
    echo "compute-sanitizer not found: running the smoke test without it"
    step smoke 60 "$PYTHON" -c "$SMOKE"
fi

step latency 240 "$PYTHON" "$REPO/benchmarks/latency.py" --device cuda --reps 30 --out "$OUT"

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed"
else
    echo "gpu_check: FAILED steps: ${failed[*]}"
    exit 1
fi
