"""Which peft the PEFT route (``moslora_ext.MoSLoRAConfig``) works with.

Kept apart from ``peft_method`` so that ``import moslora_ext`` can ask without
importing the route: another peft disables the route only, never the
functional API, which does not use peft.
"""

from packaging.version import Version

SUPPORTED_PEFT = ">=0.21,<0.22"  # what peft_method's hooks are written and tested against (pyproject's bound)
_SUPPORTED_RANGE = (Version("0.21"), Version("0.22"))


def unsupported_peft_reason():
    """None when the PEFT route can be used; else why not, and what to install."""
    try:
        import peft
    except ModuleNotFoundError as exc:
        if exc.name != "peft":
            raise
        return f"moslora_ext's PEFT integration needs peft: pip install 'peft{SUPPORTED_PEFT}'"
    if _SUPPORTED_RANGE[0] <= Version(Version(peft.__version__).base_version) < _SUPPORTED_RANGE[1]:
        return None
    return (f"moslora_ext's PEFT integration supports peft {SUPPORTED_PEFT}, but peft {peft.__version__} is "
            f"installed (its LoRA variant and custom-layer hooks differ): install `peft{SUPPORTED_PEFT}` to use "
            "MoSLoRAConfig; moslora_ext's own API (add_adapters, save_adapter...) works without it")
