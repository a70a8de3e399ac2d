"""Build of the moslora_ext extensions: moslora_ext._C, and moslora_ext._testing
(the tests' hooks, csrc/testing.cpp: kept out of _C, header-only, CPU-only).

The CPU kernels are always built. The CUDA kernels are added whenever nvcc
and a CUDA build of torch are present, with or without a GPU; set
MOSLORA_BUILD_CUDA=0 or 1 to force them off or on. MOSLORA_SANITIZE (e.g.
"address,undefined") builds the C++ sources with those sanitizers, for
tools/sanitize.sh. What was built is recorded in moslora_ext/_build_config.py,
which the package checks on import.

Both modules are built on LibTorch's stable ABI (torch/csrc/stable, the
header-only torch/headeronly) with TORCH_TARGET_VERSION = torch 2.11, and on
Python's limited API: one abi3 wheel serves every torch from 2.11 on (of the
same CUDA major version, for a CUDA build) and every CPython from 3.10 on.
"""

import glob
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
FALLBACK_CUDA_ARCHS = "8.0;9.0+PTX"  # if neither torch nor nvcc can say which to build
# The oldest torch whose stable ABI the extension targets, and the oldest CPython
# of the limited API (requires-python in pyproject.toml).
TORCH_TARGET_VERSION = (2, 11)
PY_LIMITED_API = "0x030A0000"


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH if set, else the toolkit holding nvcc on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
        # nvcc on PATH may be a wrapper script: ask nvcc itself where it lives.
        dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True)
        for line in (dryrun.stdout + dryrun.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.realpath(line.split("=", 1)[1].strip())
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
_cuda_home = find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def want_cuda():
    """Whether to compile the CUDA kernels (never asks for a GPU)."""
    possible = torch.version.cuda is not None and _cuda_home is not None
    flag = os.environ.get("MOSLORA_BUILD_CUDA", "")
    if flag == "0":
        return False
    if flag == "1":
        if not possible:
            raise RuntimeError(
                "MOSLORA_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch {torch.__version__} is {'a CUDA' if torch.version.cuda else 'a CPU-only'} build "
                f"and nvcc was {'found at ' + _cuda_home if _cuda_home else 'not found'}"
            )
        return True
    if flag:
        raise RuntimeError(f"MOSLORA_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return possible


def with_ptx(archs):
    """"a;b;c" with PTX for the newest, so that later GPUs can JIT-compile it (as torch does)."""
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def nvcc_archs():
    """The compute capabilities this nvcc compiles for, e.g. {"75", "80", ...}."""
    result = subprocess.run([os.path.join(_cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                            capture_output=True, text=True)
    return {line.strip().removeprefix("compute_") for line in result.stdout.splitlines() if line.strip()}


def cuda_arch_list():
    """The TORCH_CUDA_ARCH_LIST to build, which is also what build_info() reports.

    TORCH_CUDA_ARCH_LIST if set; else the visible GPUs (capped at the newest
    that torch supports, the newest with PTX, as torch's own default); else
    every architecture torch itself was built for that this nvcc supports.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    torch_archs = sorted({arch.removeprefix("sm_") for arch in torch.cuda.get_arch_list()
                          if arch.startswith("sm_") and arch.removeprefix("sm_").isdigit()}, key=int)
    if torch.cuda.is_available():
        newest = max((int(a) // 10, int(a) % 10) for a in torch_archs) if torch_archs else (99, 9)
        caps = sorted({min(torch.cuda.get_device_capability(i), newest) for i in range(torch.cuda.device_count())})
        archs = with_ptx([f"{major}.{minor}" for major, minor in caps])
    else:
        available = nvcc_archs()
        buildable = [a for a in torch_archs if a in available]
        archs = with_ptx([f"{a[:-1]}.{a[-1]}" for a in buildable]) if buildable else FALLBACK_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # so the build compiles exactly what is recorded
    return archs


def nvcc_version():
    """The CUDA release of the nvcc that compiles the kernels, e.g. "13.0": torch's own may differ."""
    result = subprocess.run([os.path.join(_cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+\.\d+)", result.stdout)
    return match.group(1) if match else None


def cuda_wheel_include_dirs():
    """Headers (cuBLAS, ...) that the nvidia-* pip wheels ship outside the toolkit."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
    dirs = []
    for root in sorted(roots):
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return dirs


def stable_abi_macros():
    """The macros of a build on the stable ABI and the limited API."""
    major, minor = TORCH_TARGET_VERSION
    return [("TORCH_TARGET_VERSION", f"0x{major:02x}{minor:02x}000000000000"), ("Py_LIMITED_API", PY_LIMITED_API)]


def write_build_config(with_cuda, archs):
    path = os.path.join(ROOT, "moslora_ext", "_build_config.py")
    with open(path, "w") as f:
        f.write(
            "# Written by setup.py: what moslora_ext._C was built with.\n"
            f"TORCH_VERSION = {torch.__version__!r}  # the torch it was compiled against\n"
            f"TORCH_TARGET_VERSION = {'.'.join(map(str, TORCH_TARGET_VERSION))!r}  # the oldest torch it runs on\n"
            f"WITH_CUDA = {with_cuda!r}\n"
            f"CUDA_ARCHS = {archs!r}\n"
            f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}  # torch's\n"
            f"NVCC_VERSION = {nvcc_version() if with_cuda else None!r}  # the nvcc that compiled the kernels\n"
        )


def extensions():
    sources = ["csrc/ops.cpp", "csrc/linear_ops.cpp", "csrc/dropout_matmul.cpp", "csrc/expert_ops.cpp",
               *sorted(glob.glob("csrc/cpu/*.cpp"))]
    extra_compile_args = {"cxx": ["-O3"]}
    extra_link_args = []
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP: without -fopenmp our CPU kernels
        # would run on one thread. libgomp resolves to the copy torch loaded.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    sanitizers = os.environ.get("MOSLORA_SANITIZE")
    if sanitizers:
        flags = [f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        extra_compile_args["cxx"] = [*extra_compile_args["cxx"][1:], "-O1", *flags]
        extra_link_args += flags
    # The tests' hooks run the kernels' bodies (headers only) on the host, in
    # a module of their own: one source, CPU-only whether or not _C has CUDA.
    testing = cpp_extension.CppExtension(
        "moslora_ext._testing", ["csrc/testing.cpp"], extra_compile_args={"cxx": list(extra_compile_args["cxx"])},
        extra_link_args=list(extra_link_args), define_macros=stable_abi_macros(), py_limited_api=True,
    )
    with_cuda = want_cuda()
    if not with_cuda:
        write_build_config(False, None)
        return [cpp_extension.CppExtension(
            "moslora_ext._C", sources, extra_compile_args=extra_compile_args, extra_link_args=extra_link_args,
            define_macros=stable_abi_macros(), py_limited_api=True,
        ), testing]
    archs = cuda_arch_list()
    write_build_config(True, archs)
    extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
    # The toolkit's own headers first, so that the wheels only fill the gaps.
    include_dirs = [os.path.join(_cuda_home, "include"), *cuda_wheel_include_dirs()]
    return [cpp_extension.CUDAExtension(
        "moslora_ext._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        # USE_CUDA: the stable C shim's CUDA functions (the current stream).
        define_macros=[("WITH_CUDA", None), ("USE_CUDA", None), *stable_abi_macros()],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        py_limited_api=True,
    ), testing]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # an abi3 wheel
)
