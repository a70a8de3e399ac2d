"""Check that the column-group kernels keep their 16-byte stores in the sm_90 SASS.

    python tools/check_sass.py [--cuobjdump PATH] [FILE]

FILE is the built extension (default: moslora_ext/_C*.so of the source tree)
or any file cuobjdump reads (a .cubin, a .o). dropout_kernel and
dropout_pair_kernel store groups of 8 elements through uint4 words
(csrc/dropout_math.h, store_group); when the compiler merges that branch with
the scalar one, the kernel stores 2- and 4-byte pieces instead and nothing
else notices. Each instantiation must hold at least one STG.E.128 per 16
bytes of each group it stores (dropout_kernel one group, dropout_pair_kernel
two: the dropped x and dX): 1 per group for bf16/fp16, 2 for fp32, 4 for
fp64. Exit status 1 if any falls short or no sm_90 code is found.

cuobjdump: --cuobjdump, else on PATH, else in $CUDA_HOME/bin, else from the
nvidia-cuda-cuobjdump wheel (pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm: the toolkit's nvcc packages here lack it).
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"dropout_kernel": 1, "dropout_pair_kernel": 2}  # kernel: groups stored per thread and row
# Itanium-mangled scalar_t, the first template argument of each kernel.
SCALARS = {"N3c108BFloat16E": ("bfloat16", 2), "N3c104HalfE": ("float16", 2), "f": ("float32", 4),
           "d": ("float64", 8)}
GROUP = 8  # kDropoutColsPerCall
FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)


def find_cuobjdump(given):
    if given:
        return given
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "*", "bin", "cuobjdump")))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    sys.exit("check_sass: cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def store_counts(sass):
    """{(kernel, dtype name): (STG.E.128 count, bytes stored per row)} for each function of the SASS text."""
    counts = {}
    starts = list(FUNCTION.finditer(sass))
    for i, match in enumerate(starts):
        body = sass[match.end():starts[i + 1].start() if i + 1 < len(starts) else len(sass)]
        name = match.group(1)
        for kernel in KERNELS:
            marker = f"{len(kernel)}{kernel}I"
            if marker not in name:
                continue
            rest = name.split(marker, 1)[1]
            for mangled, (dtype, size) in SCALARS.items():
                if rest.startswith(mangled):
                    counts[(kernel, dtype)] = (len(re.findall(r"\bSTG\.E\.128\b", body)),
                                               KERNELS[kernel] * GROUP * size)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?")
    parser.add_argument("--cuobjdump")
    args = parser.parse_args(argv)
    path = args.file or next(iter(sorted(glob.glob(os.path.join(ROOT, "moslora_ext", "_C*.so")))), None)
    if path is None:
        sys.exit("check_sass: no built extension in moslora_ext/; build it or name the file")
    result = subprocess.run([find_cuobjdump(args.cuobjdump), "-sass", "-arch", "sm_90", path],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"check_sass: cuobjdump failed on {path}: {result.stderr.strip()}")
    counts = store_counts(result.stdout)
    expected = {(kernel, dtype) for kernel in KERNELS for dtype, _ in SCALARS.values()}
    failures = [f"{kernel} {dtype}: no sm_90 code found" for kernel, dtype in sorted(expected - set(counts))]
    for (kernel, dtype), (found, row_bytes) in sorted(counts.items()):
        needed = row_bytes // 16
        verdict = "ok" if found >= needed else "TOO FEW"
        print(f"{kernel:19} {dtype:9} STG.E.128: {found} (needs {needed}) {verdict}")
        if found < needed:
            failures.append(f"{kernel} {dtype}: {found} STG.E.128, needs {needed}")
    if failures:
        print("check_sass: the 16-byte stores are lost:\n  " + "\n  ".join(failures))
        return 1
    print(f"check_sass: 16-byte stores present in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
