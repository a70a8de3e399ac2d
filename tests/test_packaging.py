"""What a user sees when the package cannot load: an unbuilt source tree, a
build for another torch. Each case imports a copy of the package's Python
files in a fresh interpreter."""

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import moslora_ext

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
