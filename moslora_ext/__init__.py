"""moslora_ext: MoSLoRA (LoRA with a learnable r x r mixer) as fused PyTorch ops.

    y = W0 x + b + s * B M A dropout(x)

``moslora_ext.Linear`` is the layer (on the fused ops; ``TransposedLinear`` for
GPT-2's Conv1D, ``Conv`` and ``Embedding`` in plain PyTorch, ``Experts`` for the
fused experts of mixture-of-experts models, all ``AdapterLayer``s
holding named adapters); ``moslora_ext.ops`` has the functional ops;
``add_adapters``, ``set_adapter``, ``disable_adapters`` (``moslora_ext.model.adapters``),
``merge_and_unload`` (``moslora_ext.model.merging``), ``save_adapter``, ``load_adapter``
(``moslora_ext.formats.native``), ``save_peft_adapter``, ``load_peft_adapter``
(``moslora_ext.formats.peft_lora``) and their helpers work on whole models; ``MoSLoRAConfig``
(``moslora_ext.peft.config``, when a supported peft is installed) is MoSLoRA
inside PEFT's ``get_peft_model`` / ``PeftModel``; ``build_info()`` says what the installed
extension was built with.
"""

import glob
import os
from importlib import metadata

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _not_built_error():
    """The ImportError for a package folder that holds no built extension."""
    try:
        metadata.distribution("moslora_ext")
    except metadata.PackageNotFoundError:
        return ImportError(
            f"moslora_ext in {_PACKAGE_DIR} is not built: install it with `pip install --no-build-isolation .` "
            "(see README.md, Install)"
        )
    return ImportError(
        f"moslora_ext was imported from {_PACKAGE_DIR}, a source tree with no compiled extension, which hides "
        "the installed package: run from another directory (from the repository root, `pytest` rather than "
        "`python -m pytest`), or build in place with `pip install --no-build-isolation -e .`"
    )


# `from None`: the chained "cannot import name" error says less than ours.
try:
    from . import _build_config
except ImportError:
    raise _not_built_error() from None

# One build serves every torch from its stable-ABI target version on (csrc/ is on LibTorch's stable ABI).
# A folder without that record (a build by an older setup.py) has no extension that loads: see below.
_TORCH_TARGET = getattr(_build_config, "TORCH_TARGET_VERSION", "0.0")
if tuple(int(part) for part in torch.__version__.split(".")[:2]) < tuple(int(p) for p in _TORCH_TARGET.split(".")):
    raise ImportError(
        f"moslora_ext needs torch >= {_build_config.TORCH_TARGET_VERSION} (its extension is built on LibTorch's "
        f"stable ABI of torch {_build_config.TORCH_TARGET_VERSION}, and runs on that torch and every later one) "
        f"but torch {torch.__version__} is installed; upgrade torch"
    )

try:
    from . import _C  # noqa: F401  (registers the torch.ops.moslora_ext operators)
except ImportError as exc:
    if not glob.glob(os.path.join(_PACKAGE_DIR, "_C.*")):
        raise _not_built_error() from None
    raise ImportError(f"moslora_ext's compiled extension failed to load ({exc}); rebuild it with "
                      "`pip install --no-build-isolation .` from the moslora_ext source tree") from exc

from . import ops  # noqa: E402
from ._version import __version__  # noqa: E402
from .model.adapters import (  # noqa: E402
    active_adapter,
    adapted_layers,
    add_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    saved_modules,
    set_adapter,
    trainable_parameters,
)
from .formats.native import load_adapter, save_adapter  # noqa: E402
from .formats.peft_lora import load_peft_adapter, save_peft_adapter  # noqa: E402
from .layers.conv import Conv  # noqa: E402
from .layers.dispatch import check_adaptable  # noqa: E402
from .layers.embedding import Embedding  # noqa: E402
from .layers.experts import Experts  # noqa: E402
from .layers.base import AdapterConfig, AdapterLayer  # noqa: E402
from .layers.linear import Linear, TransposedLinear  # noqa: E402
from .model.merging import merge_adapters, merge_and_unload, unmerge_adapters  # noqa: E402
from .peft.compat import (  # noqa: E402
    after_import,
    register_with_peft,
    supported_peft_installed,
    unsupported_peft_reason,
)
from .layers.quantized import QuantizedLinear  # noqa: E402

# The PEFT route (moslora_ext.MoSLoRAConfig) registers itself with PEFT when peft is imported (at once if it is
# already), so that importing moslora_ext does not import peft; the functional API works without peft, and
# under another peft or a broken one (which only warns).
register_with_peft()


def _register_with_diffusers():
    from .peft.diffusers import register_with_diffusers

    register_with_diffusers()


# diffusers' LoRA loads build a MoSLoRAConfig from MoSLoRA files once diffusers' PEFT helpers are imported
# (moslora_ext.peft.diffusers), which `import moslora_ext` does not import.
after_import("diffusers.utils.peft_utils", _register_with_diffusers)


def build_info():
    """What the installed extension was built with.

    Returns a dict with ``torch_version`` (the torch it was compiled against),
    ``torch_target_version`` (the oldest torch it runs on: the stable ABI it
    targets), ``torch_runtime_version`` (the torch it runs on now),
    ``with_cuda`` (whether the CUDA kernels were compiled), ``cuda_archs``
    (the TORCH_CUDA_ARCH_LIST used, or None), ``cuda_version`` (the CUDA of the
    torch it was compiled against) and ``nvcc_version`` (the CUDA release of
    the nvcc that compiled the kernels, which may be older; None without them).
    """
    return {
        "version": __version__,
        "torch_version": _build_config.TORCH_VERSION,
        "torch_target_version": _build_config.TORCH_TARGET_VERSION,
        "torch_runtime_version": torch.__version__,
        "with_cuda": _build_config.WITH_CUDA,
        "cuda_archs": _build_config.CUDA_ARCHS,
        "cuda_version": _build_config.CUDA_VERSION,
        "nvcc_version": _build_config.NVCC_VERSION,
    }


__all__ = [
    "Linear", "TransposedLinear", "QuantizedLinear", "Conv", "Embedding", "Experts", "AdapterLayer", "AdapterConfig",
    "check_adaptable", "ops",
    "build_info", "__version__",
    "add_adapters", "adapted_layers", "trainable_parameters", "merge_adapters", "unmerge_adapters",
    "merge_and_unload", "save_adapter", "load_adapter", "load_peft_adapter", "save_peft_adapter", "saved_modules",
    "set_adapter", "active_adapter", "list_adapters", "disable_adapters", "delete_adapter",
] + (["MoSLoRAConfig", "MoSLoRAModel"] if supported_peft_installed() else [])  # imported on use (__getattr__)


def __getattr__(name):
    """``MoSLoRAConfig`` and ``MoSLoRAModel``, the PEFT route, imported (with peft) on first use."""
    if name in ("MoSLoRAConfig", "MoSLoRAModel"):
        reason = unsupported_peft_reason()
        if reason is not None:
            raise ImportError(f"moslora_ext.{name}: {reason}")
        from .peft.config import MoSLoRAConfig
        from .peft.tuner import MoSLoRAModel

        globals().update(MoSLoRAConfig=MoSLoRAConfig, MoSLoRAModel=MoSLoRAModel)  # found directly from now on
        return globals()[name]
    raise AttributeError(f"module 'moslora_ext' has no attribute {name!r}")
