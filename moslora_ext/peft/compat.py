"""Which peft the PEFT route (``moslora_ext.MoSLoRAConfig``) works with, and
its registration with PEFT when peft is imported.

Kept apart from the tuner (``moslora_ext.peft.tuner``) so that ``import moslora_ext`` can ask without
importing the route: another peft, or one that fails to import, disables the
route only, never the functional API, which does not use peft. The version is
read from the installed package's metadata, so that ``import moslora_ext``
imports no peft at all (peft imports transformers, bitsandbytes and torchao:
seconds, and their messages); the route registers itself with PEFT once peft is
imported (``register_with_peft``).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED_PEFT = ">=0.21,<0.22"  # what the tuner's hooks are written and tested against (pyproject's bound)


def installed_peft_version():
    """The installed peft's version, or None if peft is not installed."""
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None


def supported_peft_installed():
    """Whether the installed peft's version (from its metadata: peft is not imported) is one the route supports."""
    version = installed_peft_version()
    return version is not None and _supported(version)


def unsupported_peft_reason():
    """None when the PEFT route can be used; else why not, and what to install."""
    version = installed_peft_version()
    if version is None:
        return f"moslora_ext's PEFT integration needs peft: pip install 'peft{SUPPORTED_PEFT}'"
    if not _supported(version):
        return _another_version(version)
    try:
        import peft
    except Exception as exc:  # whatever breaks it (another transformers...), it disables the route only
        return (f"moslora_ext's PEFT integration needs peft{SUPPORTED_PEFT}: peft {version} is installed but "
                f"`import peft` fails ({type(exc).__name__}: {exc}); moslora_ext's own API works without it")
    imported = getattr(peft, "__version__", None)  # a checkout ahead on sys.path may shadow the installed one
    if imported != version and not _supported(imported):
        return _another_version(f"{imported} (imported from {getattr(peft, '__file__', None)})")
    return None


def _supported(version):
    try:
        release = Version(Version(version).base_version)
    except (TypeError, InvalidVersion):
        return False
    return release in SpecifierSet(SUPPORTED_PEFT)


def _another_version(version):
    return (f"moslora_ext's PEFT integration supports peft {SUPPORTED_PEFT}, but peft {version} is installed "
            "(PEFT's hooks that the route relies on differ: moslora_ext's README, Supported versions): install "
            f"`peft{SUPPORTED_PEFT}` to use MoSLoRAConfig; moslora_ext's own API (add_adapters, save_adapter...) "
            "works without it")


def register_with_peft():
    """Register the PEFT route (peft_type "MOSLORA") with PEFT: now if peft is imported, else as soon as
    peft is (an import hook), so that ``PeftModel.from_pretrained`` and transformers read MoSLoRA folders
    after ``import moslora_ext`` whichever is imported first. Warns, at once, of an installed peft
    outside the supported range, which the route does not work with."""
    version = installed_peft_version()
    if version is None:
        return
    if not _supported(version):
        warnings.warn(_another_version(version), stacklevel=3)
    else:
        after_import("peft", _register)


def _register():
    """Import the tuner (``moslora_ext.peft.tuner``), which registers the route; a peft it cannot work with
    only warns."""
    try:
        importlib.import_module("moslora_ext.peft.tuner")
    except ImportError as exc:
        warnings.warn(str(exc), stacklevel=2)


def after_import(name, then):
    """Call ``then()`` once module ``name`` is imported: now if it is, else right after its import (an
    import hook, one per module name), so that ``import moslora_ext`` imports neither peft nor diffusers."""
    if sys.modules.get(name) is not None:
        then()
    elif not any(isinstance(finder, _AfterImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds module ``name`` as the other finders do, then calls ``then()`` once the module has run.
    It stays until the module is imported (a mere lookup, such as transformers' ``is_peft_available()``, is
    no import), then removes itself and hands the module its own loader back."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        index = sys.meta_path.index(self)
        del sys.meta_path[index]  # the other finders find peft's spec
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(index, self)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """The module's loader, then the finder's ``then()``."""

    def __init__(self, loader, finder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.finder.then()
