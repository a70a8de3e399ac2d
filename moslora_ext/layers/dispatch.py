"""The registry of base modules that take adapters: which kind of base module goes to which adapter class.

Both doors read it: ``moslora_ext.add_adapters`` (``adapter_class``, ``refusal_reason``, what "all-linear"
selects) and the PEFT route (``moslora_ext.peft``, whose layer classes are keyed by ``BaseKind.key``).
Supporting a new base module type takes one ``BaseKind`` given to ``register_base_kind`` (or
``registered_base_kind`` for a while) and one ``AdapterLayer`` subclass; on the PEFT route, also a
``peft_layer`` factory in the entry (the built-in kinds have theirs in ``moslora_ext.peft.layers``).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from .base import AdapterLayer, class_path, qualified_class_names
from .conv import Conv
from .embedding import Embedding
from .experts import Experts, is_fused_experts
from .linear import BNB_4BIT, BNB_8BIT, GPT2_CONV1D, TORCHAO_TENSOR, Linear, TransposedLinear
from .quantized import QuantizedLinear
from .routers import RouterWeight, is_router


def class_name(cls):
    """"package.module.Class" of ``cls``, a class or such a name already."""
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class BaseKind:
    """One kind of base module that takes adapters: an entry of the registry.

    ``key``: the entry's name ("linear", "gpt2-conv1d"...), by which the PEFT route keys its layer classes.
    ``name``: how messages name the kind. ``adapter_class``: the ``AdapterLayer`` subclass that wraps it,
    whose ``refusal_reason`` may still refuse a module of this kind.
    ``classes``: the module classes of this kind, as classes or qualified class names (so that optional
    libraries need no import); their subclasses are this kind too unless a nearer class is registered.
    ``weight_classes``: the same for the class of the module's weight, looked up before the module's own
    (a torchao-quantized weight makes an ``nn.Linear`` a quantized layer).
    ``predicate``: for kinds without a common class (transformers' experts modules and routers), a
    function of the module, tried before any class.
    ``is_linear``: whether "all-linear" selects modules of this kind.
    ``peft_layer``: the PEFT route's factory ``(target, adapter_name, config, **kwargs) -> layer`` for this
    kind; None for the built-in kinds (``moslora_ext.peft.layers`` has theirs) and for kinds the route refuses.
    """

    key: str
    name: str
    adapter_class: type
    classes: tuple = ()
    weight_classes: tuple = ()
    predicate: Callable | None = None
    is_linear: bool = False
    peft_layer: Callable | None = None

    def class_names(self):
        return [class_name(c) for c in self.classes]

    def weight_class_names(self):
        return [class_name(c) for c in self.weight_classes]


_REGISTRY = {}  # key -> BaseKind, in registration order (the order of messages and of predicates)


def register_base_kind(kind):
    """Add ``kind`` (a ``BaseKind``) to the registry; ValueError if its key or one of its classes is taken,
    or if it names no class and no predicate. Returns ``kind``."""
    if not isinstance(kind, BaseKind) or not issubclass(kind.adapter_class, AdapterLayer):
        raise TypeError(f"register_base_kind takes a BaseKind whose adapter_class is an AdapterLayer, got {kind!r}")
    if kind.key in _REGISTRY:
        raise ValueError(f"a base kind {kind.key!r} is registered already")
    if not (kind.classes or kind.weight_classes or kind.predicate):
        raise ValueError(f"base kind {kind.key!r} names no class, weight class or predicate")
    taken = {(weight, name) for other in _REGISTRY.values()
             for weight, names in ((False, other.class_names()), (True, other.weight_class_names())) for name in names}
    clash = [n for n in kind.class_names() if (False, n) in taken] + [
        n for n in kind.weight_class_names() if (True, n) in taken]
    if clash:
        raise ValueError(f"base kind {kind.key!r}: {clash} belong to a registered kind already")
    _REGISTRY[kind.key] = kind
    return kind


def unregister_base_kind(key):
    """Remove the kind ``key`` from the registry (KeyError if there is none) and return it."""
    return _REGISTRY.pop(key)


@contextlib.contextmanager
def registered_base_kind(kind):
    """A context manager under which ``kind`` is registered (``register_base_kind``), removed again on exit."""
    register_base_kind(kind)
    try:
        yield kind
    finally:
        unregister_base_kind(kind.key)


def base_kinds():
    """The registered ``BaseKind`` entries, in registration order."""
    return list(_REGISTRY.values())


def supported_kinds(kinds=None):
    """The names of ``kinds`` (every registered kind by default) for messages, "a, b and c"."""
    names = [kind.name for kind in (base_kinds() if kinds is None else kinds)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _by_class(names, field):
    """The kind whose ``field`` (``class_names`` or ``weight_class_names``) holds the nearest of ``names``."""
    index = {name: kind for kind in _REGISTRY.values() for name in getattr(kind, field)()}
    return next((index[name] for name in names if name in index), None)


def base_kind(module):
    """The registered ``BaseKind`` of ``module``, or None: for an adapted layer, the kind its class wraps."""
    kinds = base_kinds()
    if isinstance(module, AdapterLayer):
        return (next((k for k in kinds if type(module) is k.adapter_class), None)
                or next((k for k in kinds if isinstance(module, k.adapter_class)), None))
    found = next((k for k in kinds if k.predicate is not None and k.predicate(module)), None)
    return (found or _by_class(qualified_class_names(getattr(module, "weight", None)), "weight_class_names")
            or _by_class(qualified_class_names(module), "class_names"))


def adapter_class(module):
    """The adapter class for ``module`` (its own class for an adapted layer), or None."""
    if isinstance(module, AdapterLayer):
        return type(module)
    kind = base_kind(module)
    return kind.adapter_class if kind is not None else None


def refusal_reason(module):
    """Why ``module`` cannot take an adapter, or None if it can."""
    if isinstance(module, AdapterLayer):
        return None
    cls = adapter_class(module)
    if cls is None:
        return f"is a {class_path(module)}; adapters go on {supported_kinds()}"
    return cls.refusal_reason(module)


def check_adaptable(module, name="the module"):
    """Raise TypeError, naming ``name`` and saying why, if ``module`` cannot
    take an adapter: it must be of a registered kind (``base_kinds``)
    and pass its adapter class's checks: a linear layer whose forward is the
    linear map (not one of ``moslora_ext.layers.linear.NOT_PLAIN_LINEAR``), a
    quantized layer that is quantized already (``QuantizedLinear``), a
    convolution with groups=1 and zero padding, an embedding without a
    forward of its own, an initialized weight."""
    reason = refusal_reason(module)
    if reason:
        raise TypeError(f"{name} {reason}")


for _kind in (
    BaseKind("linear", "torch.nn.Linear", Linear, ("torch.nn.modules.linear.Linear",), is_linear=True),
    BaseKind("gpt2-conv1d", f"GPT-2's Conv1D ({GPT2_CONV1D})", TransposedLinear, (GPT2_CONV1D,), is_linear=True),
    BaseKind("conv1d", "torch.nn.Conv1d", Conv, ("torch.nn.modules.conv.Conv1d",)),
    BaseKind("conv2d", "torch.nn.Conv2d", Conv, ("torch.nn.modules.conv.Conv2d",)),
    BaseKind("conv3d", "torch.nn.Conv3d", Conv, ("torch.nn.modules.conv.Conv3d",)),
    BaseKind("embedding", "torch.nn.Embedding", Embedding, ("torch.nn.modules.sparse.Embedding",)),
    BaseKind("bnb-4bit", "bitsandbytes' Linear4bit", QuantizedLinear, (BNB_4BIT,), is_linear=True),
    BaseKind("bnb-8bit", "bitsandbytes' Linear8bitLt", QuantizedLinear, (BNB_8BIT,), is_linear=True),
    BaseKind("torchao", "torch.nn.Linear layers with a torchao-quantized weight", QuantizedLinear,
             weight_classes=(TORCHAO_TENSOR,), is_linear=True),
    # transformers' experts modules and routers have no common base class; "all-linear" selects the
    # experts' fused parameters (not the module) and the routers, as PEFT's does.
    BaseKind("experts", "transformers' fused experts modules", Experts, predicate=is_fused_experts),
    BaseKind("router", "transformers' mixture-of-experts routers", RouterWeight, predicate=is_router,
             is_linear=True),
):
    register_base_kind(_kind)
del _kind
