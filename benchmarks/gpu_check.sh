#!/usr/bin/env bash
# The one check to run on a machine with a CUDA GPU, from the repository root:
#   OUT=/some/folder bash benchmarks/gpu_check.sh
# in one command of at most 7 minutes (steps and limits below; 16 cores, one H200):
#   preflight  20 s  records GPU, driver, torch, nvcc, compute-sanitizer into env.txt;
#                    stops (exit 2) where torch cannot be imported, is not a CUDA
#                    build, is older than 2.6 or sees no GPU
#   build     120 s  the extension in place, for the visible GPU only, all cores
#   tests     100 s  every CUDA test case and the property tests -> tests.xml (junit)
#   sanitizer  70 s  compute-sanitizer memcheck and initcheck of a CUDA smoke run,
#                    this project's kernels only -> sanitizer.log; SKIP when the
#                    sanitizer is missing or the device refuses it (probed first on
#                    a tiny program); racecheck is left out: no kernel here uses
#                    shared memory
#   latency    45 s  a short latency table (no torch.compile contender) ->
#                    latency-cuda.json, rewritten after every case
#   experts    60 s  the expert-adapter sweep: a Mixtral block with 8, 64 and 128
#                    experts, bf16, training step per contender (ours, PEFT's
#                    target_parameters LoRA, the frozen block) and the kernels
#                    it launches -> moe-cuda.json
# Limits add up to 415 s; a step past its limit is stopped and recorded as such.
# Every step appends its verdict (PASS, FAIL, SKIP) to summary.txt as it ends;
# gpu_check.log is the whole console. At most 8 files under $OUT (env.txt,
# summary.txt, gpu_check.log, tests.xml, sanitizer.log, latency-cuda.json,
# latency-cuda.png, moe-cuda.json), none in subfolders.
# GPU_CHECK_STEPS picks steps to rerun (e.g. "tests latency"; build is
# incremental); GPU_CHECK_REHEARSE=1 lets the preflight go on without a GPU, to
# rehearse the steps that need none (the sanitizer's probe and SKIP logic).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu-check-results}
PYTHON=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-build tests sanitizer latency experts}
mkdir -p "$OUT"
cd "$REPO"
: > "$OUT/summary.txt"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

record() {  # record STEP VERDICT SECONDS [NOTE]: one line of summary.txt, written now
    local line
    line=$(printf '%-10s %-5s %4ss  %s' "$1" "$2" "$3" "${4:-}")
    echo "$line" >> "$OUT/summary.txt"
    echo "=== $line"
}
limited() {  # limited SECONDS COMMAND...: SIGINT at the limit (pytest still writes its XML), KILL 10 s later
    local limit=$1
    shift
    timeout -s INT -k 10 "$limit" "$@"
}
verdict_of() {  # verdict_of EXIT_STATUS LIMIT: "PASS" or "FAIL <why>"
    case $1 in
        0) echo PASS ;;
        124 | 130 | 137) echo "FAIL stopped at its ${2}s limit" ;;
        *) echo "FAIL exit status $1" ;;
    esac
}
run_step() {  # run_step NAME LIMIT COMMAND...
    local name=$1 limit=$2 start=$SECONDS rc verdict note
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $*"
    limited "$limit" "$@"
    rc=$?
    verdict=$(verdict_of $rc "$limit")
    [ "$verdict" = PASS ] && note="" || note=${verdict#FAIL }
    record "$name" "${verdict%% *}" $((SECONDS - start)) "$note"
    return $rc
}
finish() {  # finish [EXIT_STATUS]: the summary; exit 1 if a step failed
    echo
    echo "=== gpu_check summary ($OUT/summary.txt)"
    cat "$OUT/summary.txt"
    if [ -n "${1:-}" ]; then exit "$1"; fi
    if grep -q '^\S* *FAIL ' "$OUT/summary.txt"; then exit 1; fi
    exit 0
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

cuda_home() {  # as setup.py: $CUDA_HOME, else the toolkit of nvcc on PATH (which may be a wrapper script)
    local nvcc home
    if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; return; fi
    nvcc=$(command -v nvcc) || { echo /usr/local/cuda; return; }
    home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    [ -e "$home/include/cuda_runtime.h" ] || home=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 \
        | sed -n 's/^#\$ TOP=//p' | head -1)
    echo "${home:-/usr/local/cuda}"
}

# --- preflight -------------------------------------------------------------
start=$SECONDS
CUDA_HOME=$(cuda_home)
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 \
            | sed 's/^/gpu: /'
    else
        echo "gpu: nvidia-smi not found"
    fi
    echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -1) ($CUDA_HOME)"
} > "$OUT/env.txt"
PREFLIGHT=$(cat <<'EOF'
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"STOP torch cannot be imported: {e!r}")
print(f"python: {sys.version.split()[0]}  torch: {torch.__version__}  torch cuda: {torch.version.cuda}")
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
# what the test step's skips depend on
print("packages: " + "  ".join(f"{name} {version(name)}" for name in
      ("setuptools", "ninja", "pytest", "hypothesis", "numpy", "transformers", "peft", "safetensors")))
major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if major_minor < (2, 6):
    sys.exit(f"STOP torch {torch.__version__} is older than 2.6, the oldest this package supports")
if torch.version.cuda is None:
    sys.exit(f"STOP torch {torch.__version__} is a CPU-only build")
if not torch.cuda.is_available():
    print("ARCH=")
    sys.exit("STOP torch sees no CUDA device")
major, minor = torch.cuda.get_device_capability(0)
print(f"device: {torch.cuda.get_device_name(0)}  capability: {major}.{minor}  count: {torch.cuda.device_count()}")
print(f"ARCH={major}.{minor}")
EOF
)
info=$(limited 20 "$PYTHON" -c "$PREFLIGHT" 2>&1)
rc=$?
grep -v '^ARCH=' <<< "$info" | grep -v '^STOP ' >> "$OUT/env.txt"
ARCH=$(sed -n 's/^ARCH=//p' <<< "$info")
stop=$(sed -n 's/^STOP //p' <<< "$info")
[ $rc -ne 0 ] && [ -z "$stop" ] && stop="the preflight failed (exit status $rc): $(tail -1 <<< "$info")"
# compute-sanitizer: PATH first, then the CUDA directories.
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "$CUDA_HOME"/compute-sanitizer/compute-sanitizer "$CUDA_HOME"/bin/compute-sanitizer \
        /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$candidate" ] && SANITIZER=$candidate
done
echo "compute-sanitizer: ${SANITIZER:-not found}" >> "$OUT/env.txt"
cat "$OUT/env.txt"
if [ -n "$stop" ] && ! { [ "${GPU_CHECK_REHEARSE:-0}" = 1 ] && [ "$stop" = "torch sees no CUDA device" ]; }; then
    record preflight FAIL $((SECONDS - start)) "$stop: nothing else runs"
    finish 2
fi
record preflight PASS $((SECONDS - start)) "${stop:+rehearsal: $stop}"
ARCH=${ARCH:-9.0}  # a rehearsal builds its probe for sm_90

# --- build -----------------------------------------------------------------
if wants build; then
    # Only the visible GPU's architecture, with PTX for newer ones; all cores.
    TORCH_CUDA_ARCH_LIST="$ARCH+PTX" MAX_JOBS=$(nproc) MOSLORA_BUILD_CUDA=1 \
        run_step build 120 "$PYTHON" setup.py -q build_ext --inplace || finish 1
    "$PYTHON" -c "import moslora_ext; print('build_info:', moslora_ext.build_info())" \
        || { record import FAIL 0 "the built extension does not import: nothing else runs"; finish 1; }
fi

# --- tests -----------------------------------------------------------------
if wants tests; then
    # Test ids with "cuda" in them (the device-parametrised cases, the CUDA-only
    # tests) and the property tests, which draw CUDA cases; the rest runs in CI.
    run_step tests 100 "$PYTHON" -m pytest tests -q -rs -p no:cacheprovider -k "cuda or test_properties" \
        --junitxml="$OUT/tests.xml"
fi

# --- sanitizer -------------------------------------------------------------
SMOKE=$(cat <<'EOF'
import os, torch, moslora_ext
torch.manual_seed(0)
sizes = ((1, 7, 5, 1), (37, 130, 70, 8), (300, 256, 512, 64))[:int(os.environ.get("SMOKE_SIZES", "3"))]
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
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
PROBE=$(cat <<'EOF'
#include <cstdio>
__global__ void probe(int* p) { *p = 1; }
int main() {
    int* p;
    if (cudaMalloc(&p, sizeof(int)) != cudaSuccess) return 2;
    probe<<<1, 1>>>(p);
    return cudaDeviceSynchronize() == cudaSuccess ? 0 : 3;
}
EOF
)
sanitize() {  # sanitize TOOL LIMIT: the smoke run under TOOL, this project's kernels only, into sanitizer.log
    # kns=moslora: our kernels' names hold the namespace; torch's and cuBLAS's own
    # kernels are neither instrumented nor reported, nor are CUDA API return codes.
    echo "--- $1" >> "$OUT/sanitizer.log"
    limited "$2" "$SANITIZER" --tool "$1" --kernel-name kns=moslora --report-api-errors no --error-exitcode 1 \
        "$PYTHON" -c "$SMOKE" >> "$OUT/sanitizer.log" 2>&1
}
if wants sanitizer; then
    start=$SECONDS
    : > "$OUT/sanitizer.log"
    probe_dir=$(mktemp -d)
    if [ -z "$SANITIZER" ]; then
        record sanitizer SKIP 0 "compute-sanitizer not found on PATH nor under $CUDA_HOME"
    elif ! echo "$PROBE" > "$probe_dir/probe.cu" \
            || ! "$CUDA_HOME/bin/nvcc" -arch=sm_${ARCH/./} -o "$probe_dir/probe" "$probe_dir/probe.cu" \
                >> "$OUT/sanitizer.log" 2>&1; then
        record sanitizer FAIL $((SECONDS - start)) "the probe program does not compile (see sanitizer.log)"
    else
        echo "--- probe: $SANITIZER on a one-thread kernel" >> "$OUT/sanitizer.log"
        limited 20 "$SANITIZER" --tool memcheck --error-exitcode 1 "$probe_dir/probe" >> "$OUT/sanitizer.log" 2>&1
        rc=$?
        if grep -qiE "device not supported|error 999|unknown error" "$OUT/sanitizer.log"; then
            record sanitizer SKIP $((SECONDS - start)) "the device refuses compute-sanitizer (see sanitizer.log)"
        elif [ $rc -ne 0 ]; then
            record sanitizer SKIP $((SECONDS - start)) "compute-sanitizer fails on the probe (exit $rc): not our code"
        else
            export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # an access past a tensor's end is not hidden in a cached block
            sanitize memcheck 45
            memcheck=$?
            SMOKE_SIZES=2 sanitize initcheck 25  # initcheck tracks every byte: the two smaller cases
            initcheck=$?
            unset PYTORCH_NO_CUDA_MEMORY_CACHING
            tail -n 30 "$OUT/sanitizer.log"
            if [ $memcheck -eq 0 ] && [ $initcheck -eq 0 ]; then
                record sanitizer PASS $((SECONDS - start)) "memcheck and initcheck: no report on moslora kernels"
            else
                record sanitizer FAIL $((SECONDS - start)) "memcheck $(verdict_of $memcheck 45), initcheck \
$(verdict_of $initcheck 25) (see sanitizer.log)"
            fi
        fi
    fi
    rm -rf "$probe_dir"
fi

# --- latency ---------------------------------------------------------------
if wants latency; then
    # No lora_compiled: its cold torch.compile runs would take most of the step.
    PYTHONPATH="$REPO" run_step latency 45 "$PYTHON" benchmarks/latency.py --device cuda --quick \
        --tokens 2048 8192 --reps 20 --contenders base lora_torch moslora_torch peft_lora ours ours_merged \
        --out "$OUT"
fi

# --- experts ---------------------------------------------------------------
if wants experts; then
    PYTHONPATH="$REPO" run_step experts 60 "$PYTHON" benchmarks/latency.py --device cuda --moe-only \
        --tokens 4096 --ranks 16 --reps 10 --moe-experts 8 64 128 --out "$OUT"
fi

finish
