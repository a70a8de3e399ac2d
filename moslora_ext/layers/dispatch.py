"""Which adapter class takes which base module: one mapping (PEFT's dispatchers)."""

from .conv import Conv
from .embedding import Embedding
from .experts import Experts, is_fused_experts
from .base import AdapterLayer, class_path, qualified_class_names
from .linear import BNB_4BIT, BNB_8BIT, GPT2_CONV1D, TORCHAO_TENSOR, Linear, TransposedLinear
from .quantized import QuantizedLinear
from .routers import RouterWeight, is_router

# Base module type -> adapter class, by qualified class name so that nothing needs importing.
# A subclass goes to its nearest listed base class, whose adapter class may still refuse it.
# The class of the module's weight is looked up first: a torchao-quantized weight makes an
# nn.Linear a quantized layer.
ADAPTER_CLASSES = {
    TORCHAO_TENSOR: QuantizedLinear,  # a weight class
    BNB_4BIT: QuantizedLinear,
    BNB_8BIT: QuantizedLinear,
    "torch.nn.modules.linear.Linear": Linear,
    GPT2_CONV1D: TransposedLinear,  # GPT-2's linear layer, weight stored (in, out)
    "torch.nn.modules.conv.Conv1d": Conv,
    "torch.nn.modules.conv.Conv2d": Conv,
    "torch.nn.modules.conv.Conv3d": Conv,
    "torch.nn.modules.sparse.Embedding": Embedding,
}
SUPPORTED = ("torch.nn.Linear, GPT-2's Conv1D (transformers.pytorch_utils.Conv1D), torch.nn.Conv1d, Conv2d, "
             "Conv3d, torch.nn.Embedding, bitsandbytes' Linear4bit and Linear8bitLt and torch.nn.Linear layers "
             "with a torchao-quantized weight")


def adapter_class(module):
    """The adapter class for ``module`` (its own class for an adapted layer), or None."""
    if isinstance(module, AdapterLayer):
        return type(module)
    if is_fused_experts(module):  # transformers' experts modules have no common base class
        return Experts
    if is_router(module):  # nor do their routers
        return RouterWeight
    names = qualified_class_names(getattr(module, "weight", None)) + qualified_class_names(module)
    return next((ADAPTER_CLASSES[name] for name in names if name in ADAPTER_CLASSES), None)


def refusal_reason(module):
    """Why ``module`` cannot take an adapter, or None if it can."""
    if isinstance(module, AdapterLayer):
        return None
    cls = adapter_class(module)
    if cls is None:
        return f"is a {class_path(module)}; adapters go on {SUPPORTED}"
    return cls.refusal_reason(module)


def check_adaptable(module, name="the module"):
    """Raise TypeError, naming ``name`` and saying why, if ``module`` cannot
    take an adapter: it must be one of the supported types (``SUPPORTED``)
    and pass its adapter class's checks: a linear layer whose forward is the
    linear map (not one of ``moslora_ext.linear.NOT_PLAIN_LINEAR``), a
    quantized layer that is quantized already (``QuantizedLinear``), a
    convolution with groups=1 and zero padding, an embedding without a
    forward of its own, an initialized weight."""
    reason = refusal_reason(module)
    if reason:
        raise TypeError(f"{name} {reason}")
