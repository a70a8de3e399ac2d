#!/usr/bin/env bash
# Build the CPU extension and the tests' hooks (moslora_ext._testing) with
# AddressSanitizer and UndefinedBehaviorSanitizer in a scratch copy of the
# repository and run the CPU test suite against it.
#   bash tools/sanitize.sh [extra pytest arguments]
# Any sanitizer report aborts the test process, so a clean run means no
# out-of-bounds access, use after free or undefined behaviour was hit in the
# C++ kernels. Leak detection is off: the Python interpreter itself is not
# leak-free at exit (tests/test_reliability.py checks our memory instead). pytest
# captures only sys.stderr, so a sanitizer report reaches the terminal.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$REPO/setup.py" "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/LICENSE" "$REPO/csrc" "$REPO/moslora_ext" "$REPO/tests" \
    "$REPO/tools" "$WORK/"
rm -f "$WORK"/moslora_ext/_C.*.so "$WORK"/moslora_ext/_testing.*.so

cd "$WORK"
echo "building the CPU extension with -fsanitize=address,undefined"
MOSLORA_BUILD_CUDA=0 MOSLORA_SANITIZE=address,undefined MAX_JOBS=${MAX_JOBS:-2} \
    "$PYTHON" setup.py -q build_ext --inplace > build.log 2>&1 || { cat build.log; exit 1; }

# A CPU-only build on purpose: the CUDA-build requirement of CI does not apply.
unset MOSLORA_REQUIRE_CUDA_BUILD
# Tests that start Python processes import this build too, not an installed
# copy (or none, where the package is only built in place).
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$PYTHON" -m pytest tests -q -p no:cacheprovider --capture=sys \
    --ignore tests/test_transformers.py --ignore tests/test_distributed.py --ignore tests/test_scripts.py "$@"
echo "sanitizers: clean"
