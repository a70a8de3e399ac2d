"""Which peft the PEFT route (``moslora_ext.MoSLoRAConfig``) works with.

Kept apart from ``peft_method`` so that ``import moslora_ext`` can ask without
importing the route: another peft, or one that fails to import, disables the
route only, never the functional API, which does not use peft. The version is
read from the installed package's metadata, so that another peft is not imported
at all.
"""

from importlib import metadata

from packaging.version import InvalidVersion, Version

SUPPORTED_PEFT = ">=0.21,<0.22"  # what peft_method's hooks are written and tested against (pyproject's bound)
_SUPPORTED_RANGE = (Version("0.21"), Version("0.22"))


def installed_peft_version():
    """The installed peft's version, or None if peft is not installed."""
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None


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
    return _SUPPORTED_RANGE[0] <= release < _SUPPORTED_RANGE[1]


def _another_version(version):
    return (f"moslora_ext's PEFT integration supports peft {SUPPORTED_PEFT}, but peft {version} is installed "
            f"(its LoRA variant and custom-layer hooks differ): install `peft{SUPPORTED_PEFT}` to use "
            "MoSLoRAConfig; moslora_ext's own API (add_adapters, save_adapter...) works without it")
