"""What a user sees when the package cannot load (an unbuilt source tree, a
build for another torch: each case imports a copy of the package's Python
files in a fresh interpreter), what importing it costs and needs, what its
folders tell PEFT, and what the build records."""

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import torch

import moslora_ext
from conftest import require_peft_route, run_python

PACKAGE = Path(moslora_ext.__file__).parent
SOURCE = Path(__file__).resolve().parent.parent  # the repository (the installed package has no pyproject.toml)


def import_copy(tmp_path, build_config=None):
    """Import a copy of the package's .py files, its wings included (no compiled extension), from tmp_path;
    returns stderr."""
    copy = tmp_path / "moslora_ext"
    shutil.copytree(PACKAGE, copy, ignore=lambda folder, names: [
        name for name in names if name in ("_build_config.py", "__pycache__") or not (
            name.endswith(".py") or (Path(folder) / name).is_dir())])
    if build_config is not None:
        (copy / "_build_config.py").write_text(build_config)
    result = subprocess.run([sys.executable, "-c", "import moslora_ext"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode != 0
    return result.stderr


def test_unbuilt_source_tree_says_what_to_do_without_a_chained_circular_import_error(tmp_path):
    stderr = import_copy(tmp_path)
    assert "circular import" not in stderr and "During handling" not in stderr
    try:
        metadata.distribution("moslora_ext")
        installed = True
    except metadata.PackageNotFoundError:
        installed = False
    if installed:  # the source tree hides the installed package: say so, not "install it"
        assert "hides the installed package" in stderr and "python -m pytest" in stderr
    else:
        assert "is not built: install it with `pip install --no-build-isolation .`" in stderr
    assert str(tmp_path / "moslora_ext") in stderr


def test_build_targeting_a_later_torch_is_refused_naming_the_range(tmp_path):
    stderr = import_copy(tmp_path, "TORCH_VERSION = '99.0.1'\nTORCH_TARGET_VERSION = '99.0'\nWITH_CUDA = False\n"
                                   "CUDA_ARCHS = None\nCUDA_VERSION = None\nNVCC_VERSION = None\n")
    assert "needs torch >= 99.0" in stderr and f"but torch {torch.__version__} is installed" in stderr


def _undefined_dynamic_symbols(path):
    result = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", path], capture_output=True, text=True,
                            check=True)
    return [line.split(None, 1)[-1] for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
@pytest.mark.parametrize("module", ["moslora_ext._C", "moslora_ext._testing"])
def test_the_extensions_import_no_cpp_symbol_of_libtorch(module):
    """On the stable ABI: the compiled modules call libtorch through its C shim only. A C++ symbol of
    torch, at::, c10:: or caffe2:: among their undefined symbols would tie them to one torch release."""
    import importlib

    path = importlib.import_module(module).__file__
    assert path.endswith(".abi3.so"), path  # Python's limited API: one build for every CPython >= 3.10
    undefined = _undefined_dynamic_symbols(path)
    assert any(name.startswith("aoti_torch_") or name.startswith("torch_") for name in undefined)
    tied = [name for name in undefined if re.match(r"(torch|at|c10|caffe2|pybind11)::", name)]
    assert not tied, tied


# --- the PEFT route under another peft, a broken one, or none ---------------------------------------


def fake_peft(path, version, init):
    """A peft package whose ``__init__.py`` is ``init``, in ``path``, and its distribution's
    metadata of ``version`` (none for None: a source tree, ahead of the installed peft)."""
    (path / "peft").mkdir()
    (path / "peft" / "__init__.py").write_text(init)
    if version is not None:
        info = path / f"peft-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: peft\nVersion: {version}\n")
    return path


USES_THE_FUNCTIONAL_API = ("import warnings; warnings.simplefilter('always')\nimport sys, torch, moslora_ext\n"
                           "m = moslora_ext.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), ['0'])\n"
                           "print(len(moslora_ext.adapted_layers(m)))\n"
                           "for name in ('MoSLoRAConfig', 'moslora_ext.peft.tuner'):\n"
                           "    try:\n        moslora_ext.MoSLoRAConfig if name == 'MoSLoRAConfig' else "
                           "__import__(name)\n    except ImportError as e:\n        print(name, e)\n")


# warns: whether a warning says it too (at import for another version, read from metadata; when the route is
# first asked for a shadowing one; a broken peft shows itself when imported).
@pytest.mark.parametrize("version, init, expected, warns", [
    ("0.16.0", "raise ImportError('never imported')", "supports peft >=0.21,<0.22, but peft 0.16.0 is installed",
     True),
    ("0.21.9", "raise AttributeError('broken')", "peft 0.21.9 is installed but `import peft` fails "
                                                  "(AttributeError: broken)", False),
    (None, "__version__ = '0.16.0'", "but peft 0.16.0 (imported from ", True)])
def test_another_or_a_broken_peft_disables_only_the_peft_route_naming_the_range(version, init, expected, warns,
                                                                                 tmp_path):
    if version is None:  # a checkout of another peft ahead of the installed one, which must be in the range
        require_peft_route()
    result = run_python(USES_THE_FUNCTIONAL_API, [fake_peft(tmp_path, version, init)])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "1", result.stdout
    assert (expected in result.stderr) == warns
    assert lines[1].startswith("MoSLoRAConfig ") and expected in lines[1]
    assert lines[2].startswith("moslora_ext.peft.tuner ") and expected in lines[2]


def test_the_peft_route_is_offered_exactly_where_peft_has_the_tuner_hooks_it_needs():
    """The route saves through the tuner's _get_adapter_state_dict and checks loads in its
    _remap_adapter_state_dict_for_load; peft 0.20 has neither (README, Supported versions), so the
    supported range must leave it out. CI runs this under peft 0.20.0 as well."""
    pytest.importorskip("peft")
    from peft.tuners.tuners_utils import BaseTuner

    from moslora_ext.peft.compat import unsupported_peft_reason

    hooks = all(hasattr(BaseTuner, hook) for hook in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load"))
    assert (unsupported_peft_reason() is None) == hooks, unsupported_peft_reason()


def test_the_functional_api_works_without_peft():
    hide_peft = ("import importlib.metadata as md, sys\nsys.modules['peft'] = None\nversion = md.version\n"
                 "def hidden(name):\n    if name == 'peft':\n        raise md.PackageNotFoundError(name)\n"
                 "    return version(name)\nmd.version = hidden\n")
    result = run_python(hide_peft + USES_THE_FUNCTIONAL_API)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "1" and "needs peft: pip install 'peft>=0.21,<0.22'" in lines[1], result.stdout
    assert "UserWarning" not in result.stderr  # peft is not installed: nothing to warn of




# --- what importing the package costs, and what it needs ------------------------------------------------------------


def test_every_third_party_module_the_package_imports_is_a_declared_dependency():
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((SOURCE / "pyproject.toml").read_text())
    declared = {Requirement(r).name.lower() for r in pyproject["project"]["dependencies"]}
    # ...and what those require in turn (torch brings sympy, triton...), without their extras.
    allowed, todo = set(declared), list(declared)
    while todo:
        for r in metadata.requires(todo.pop()) or []:
            requirement = Requirement(r)
            name = requirement.name.lower()
            if "extra" not in str(requirement.marker or "") and name not in allowed:
                allowed.add(name)
                todo.append(name)
    # torch._dynamo (which torch.compiler.assume_constant_result imports) pulls in what torch's compiler may
    # use where it is installed (colorama): torch's imports, not the package's, so they are in the baseline.
    result = run_python("import sys; import torch, torch._dynamo; before = set(sys.modules); import moslora_ext; "
                        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    assert result.returncode == 0, result.stderr[-2000:]
    distributions = metadata.packages_distributions()
    imported = {d.lower() for m in result.stdout.split() if m not in sys.stdlib_module_names
                for d in distributions.get(m, [])}
    assert imported - {"moslora_ext", "moslora-ext"} <= allowed, f"undeclared: {imported - allowed}"


def test_import_is_light_and_the_peft_route_registers_whichever_is_imported_first(tmp_path):
    pytest.importorskip("peft")
    require_peft_route()
    import torch
    from peft import get_peft_model

    torch.manual_seed(0)
    base, x = torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.randn(3, 8)
    model = get_peft_model(base, moslora_ext.MoSLoRAConfig(r=2, target_modules=["0"]))
    torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight)
    model.save_pretrained(tmp_path / "route")
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "expected.pt")
    load = ("torch.manual_seed(0); base = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
            f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
            f"model = peft.PeftModel.from_pretrained(base, {str(tmp_path / 'route')!r})\n"
            "assert torch.equal(model(expected['x']), expected['y'])\n")
    heavy = ("peft", "transformers", "bitsandbytes", "torchao")
    moslora_first = ("import sys, torch, moslora_ext\n"
                     f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))\n"
                     "import peft\n" + load)
    result = run_python(moslora_first)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
    # A lookup of peft before its import (transformers' is_peft_available(), which from_pretrained asks) is no import.
    looked_up_first = ("import importlib.util, torch, moslora_ext, transformers\n"
                       "assert transformers.utils.is_peft_available() and importlib.util.find_spec('peft')\n"
                       "import peft\n" + load)
    result = run_python(looked_up_first)
    assert result.returncode == 0, result.stderr[-2000:]
    peft_first = "import torch, peft\nfrom peft import PeftModel\nimport moslora_ext\n" + load
    result = run_python(peft_first)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_route_folder_tells_a_process_without_moslora_ext_what_to_install(tmp_path):
    pytest.importorskip("peft")
    require_peft_route()
    import json

    import torch
    from peft import get_peft_model

    from moslora_ext.peft.folder import INSTALL, RECORD_FIELD

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                           moslora_ext.MoSLoRAConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    without = ("import torch, peft\n"
               f"try:\n    peft.PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(8, 8)), {str(tmp_path)!r})\n"
               "except KeyError as e:\n    print('refused', e)\n")
    result = run_python(without)
    assert result.stdout.strip() == "refused 'MOSLORA'", result.stdout + result.stderr[-2000:]
    card = (tmp_path / "README.md").read_text()
    record = json.loads((tmp_path / "adapter_config.json").read_text())[RECORD_FIELD]
    for text in (card, record["note"]):
        assert "import moslora_ext" in text and INSTALL in text
    assert record["install"] == INSTALL and card.count("## Loading this MoSLoRA adapter") == 1
    model.save_pretrained(tmp_path)  # again, over the card: one section
    assert (tmp_path / "README.md").read_text().count("## Loading this MoSLoRA adapter") == 1


def test_peft_given_a_save_adapter_folder_names_load_adapter(tmp_path):
    pytest.importorskip("peft")
    import torch
    from peft import PeftConfig, PeftModel

    from moslora_ext.peft.compat import supported_peft_installed

    # Layers that differ in use_rslora, which one MoSLoRAConfig holds once: not a folder for PEFT.
    model = moslora_ext.add_adapters(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), ["0"], r=2)
    moslora_ext.add_adapters(model, ["1"], r=2, use_rslora=True)
    moslora_ext.save_adapter(model, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    # Under a peft outside the range the route registers no refusal: PEFT's KeyError names the folder's peft_type.
    refusal = ((ValueError, r"written by moslora_ext\.save_adapter .* load it with moslora_ext\.load_adapter\(model, "
                r"path\)") if supported_peft_installed() else (KeyError, r"load with moslora_ext\.load_adapter"))
    for load in (lambda: PeftModel.from_pretrained(base, tmp_path), lambda: PeftConfig.from_pretrained(tmp_path)):
        with pytest.raises(refusal[0], match=refusal[1]):
            load()
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items()) and base[1].weight.requires_grad
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    moslora_ext.load_adapter(base, tmp_path)  # which still reads it


def test_setup_records_the_nvcc_that_compiles_the_kernels_beside_torchs_cuda(tmp_path):
    """setup.py run in a copy of the tree (only to write _build_config.py: `setup.py --version` builds nothing)."""
    import re

    import torch

    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if torch.version.cuda is None or not nvcc.exists():
        pytest.skip("needs a CUDA build of torch and nvcc")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(SOURCE / name, tmp_path)
    (tmp_path / "moslora_ext").mkdir()
    env = dict(os.environ, MOSLORA_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0", CUDA_HOME=str(nvcc.parent.parent))
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = {}
    exec((tmp_path / "moslora_ext" / "_build_config.py").read_text(), recorded)
    release = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                               text=True).stdout).group(1)
    assert (recorded["CUDA_VERSION"], recorded["NVCC_VERSION"]) == (torch.version.cuda, release)


def test_build_info_reports_torchs_cuda_and_the_nvcc_that_compiled_the_kernels():
    info = moslora_ext.build_info()
    assert {"cuda_version", "nvcc_version"} <= info.keys()
    assert info["torch_target_version"] == "2.11" and info["torch_runtime_version"] == torch.__version__
    if not info["with_cuda"]:
        assert info["cuda_version"] is None and info["nvcc_version"] is None


def test_the_supported_peft_range_is_written_once():
    """pyproject.toml's peft bounds are the route's SUPPORTED_PEFT, so that the two cannot drift apart."""
    from moslora_ext.peft.compat import SUPPORTED_PEFT

    with open(SOURCE / "pyproject.toml") as f:
        pyproject = f.read()
    bounds = set(re.findall(r'"peft([<>=!~][^"]*)"', pyproject))
    assert bounds == {SUPPORTED_PEFT}, bounds


def test_every_subpackage_is_installed():
    """A regular install (not an editable one) ships what setuptools finds: every folder of the package with an
    __init__.py must be among them, or `import moslora_ext` fails after `pip install .`."""
    import tomllib

    from setuptools import find_packages

    include = tomllib.loads((SOURCE / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(SOURCE, include=include["include"]))
    folders = {".".join(p.parent.relative_to(SOURCE).parts) for p in (SOURCE / "moslora_ext").rglob("__init__.py")}
    assert folders and folders <= found, f"not installed: {sorted(folders - found)}"
