"""What a user sees when the package cannot load: an unbuilt source tree, a
build for another torch. Each case imports a copy of the package's Python
files in a fresh interpreter."""

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import moslora_ext
from conftest import run_python

PACKAGE = Path(moslora_ext.__file__).parent


def import_copy(tmp_path, build_config=None):
    """Import a copy of the package's .py files (no compiled extension) from tmp_path; returns stderr."""
    copy = tmp_path / "moslora_ext"
    copy.mkdir()
    for source in PACKAGE.glob("*.py"):
        if source.name != "_build_config.py":
            shutil.copy(source, copy)
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


def test_build_for_another_torch_gives_a_rebuild_command_that_leaves_torch_alone(tmp_path):
    stderr = import_copy(tmp_path, "TORCH_VERSION = '0.0.1'\nWITH_CUDA = False\nCUDA_ARCHS = None\n"
                                   "CUDA_VERSION = None\n")
    assert "built against torch 0.0.1" in stderr
    assert "`pip install --no-build-isolation .`" in stderr and "--force-reinstall" not in stderr


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
                           "for name in ('MoSLoRAConfig', 'moslora_ext.peft_method'):\n"
                           "    try:\n        moslora_ext.MoSLoRAConfig if name == 'MoSLoRAConfig' else "
                           "__import__(name)\n    except ImportError as e:\n        print(name, e)\n")


@pytest.mark.parametrize("version, init, expected", [
    ("0.16.0", "raise ImportError('never imported')", "supports peft >=0.21,<0.22, but peft 0.16.0 is installed"),
    ("0.21.9", "raise AttributeError('broken')", "peft 0.21.9 is installed but `import peft` fails "
                                                  "(AttributeError: broken)"),
    (None, "__version__ = '0.16.0'", "but peft 0.16.0 (imported from ")])
def test_another_or_a_broken_peft_disables_only_the_peft_route_naming_the_range(version, init, expected, tmp_path):
    result = run_python(USES_THE_FUNCTIONAL_API, [fake_peft(tmp_path, version, init)])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "1", result.stdout
    assert expected in result.stderr  # the warning at import
    assert lines[1].startswith("MoSLoRAConfig ") and expected in lines[1]
    assert lines[2].startswith("moslora_ext.peft_method ") and expected in lines[2]


def test_the_functional_api_works_without_peft():
    hide_peft = ("import importlib.metadata as md, sys\nsys.modules['peft'] = None\nversion = md.version\n"
                 "def hidden(name):\n    if name == 'peft':\n        raise md.PackageNotFoundError(name)\n"
                 "    return version(name)\nmd.version = hidden\n")
    result = run_python(hide_peft + USES_THE_FUNCTIONAL_API)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "1" and "needs peft: pip install 'peft>=0.21,<0.22'" in lines[1], result.stdout
    assert "UserWarning" not in result.stderr  # peft is not installed: nothing to warn of


