"""Merging the active adapter into the base weights, and back out; merge_and_unload."""

from .adapters import (
    MODULE_TO_SAVE,
    _record,
    _require_adapters,
    _set_submodule,
    adapted_layers,
    saved_modules,
)
from .quantized import QuantizedLinear


def _active_layers(model):
    """The adapted layers that hold the active adapter (the others compute their base)."""
    return [layer for layer in _require_adapters(model).values() if layer.active_adapter in layer.adapters]


def merge_adapters(model, safe=False, requantize=False):
    """Merge the active adapter into the base weights (see
    ``AdapterLayer.merge``). With ``safe=True`` a refused merge unmerges the
    layers merged before it, so the model is left as it was. Quantized
    layers are refused unless ``requantize=True`` (lossy, see
    ``QuantizedLinear.merge``)."""
    merged = []
    try:
        for layer in _active_layers(model):
            layer.merge(safe=safe, requantize=requantize)
            merged.append(layer)
    except Exception:
        for layer in merged:
            layer.unmerge(requantize=requantize)
        raise
    _record(model)
    return model


def unmerge_adapters(model, requantize=False):
    """Take the active adapter back out of the base weights (``requantize``
    as in ``merge_adapters``)."""
    layers = _active_layers(model)
    not_merged = [layer for layer in layers if not layer.merged]
    if not_merged:
        raise RuntimeError(f"{len(not_merged)} of {len(layers)} adapted layers are not merged; nothing was changed")
    for layer in layers:
        layer.unmerge(requantize=requantize)
    _record(model)
    return model


QUANTIZED_MERGES = ("dequantize", "requantize")


def merge_and_unload(model, quantized="dequantize"):
    """Fold the active adapter into the base weights and put the base modules
    back (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv2d``...; the other
    adapters are dropped): the result has no trace of moslora_ext (modules
    to save stay as trained). Returns ``model``.

    ``quantized`` says what becomes of quantized layers (``QuantizedLinear``):
    "dequantize" (default) puts a plain ``nn.Linear`` in the layer's compute
    dtype in their place, holding the dequantised weight plus the adapter
    (exact up to that dtype); "requantize" folds the adapter into the
    quantized weight and keeps the quantized module, as PEFT does, with a
    warning that states the rounding error (bitsandbytes bases only).
    """
    if quantized not in QUANTIZED_MERGES:
        raise ValueError(f"quantized must be one of {QUANTIZED_MERGES}, got {quantized!r}")
    requantize = quantized == "requantize"
    layers = _active_layers(model)
    for layer in layers:  # refusals first, so that a refused call changes nothing
        if layer.disabled:  # a dequantized layer would otherwise leave its adapter out, silently
            raise RuntimeError("the adapters are disabled (inside moslora_ext.disable_adapters); "
                               "call merge_and_unload outside that block")
        if isinstance(layer, QuantizedLinear) and requantize and not layer.merged:
            layer.check_requantizable()
    for layer in layers:
        if not layer.merged and (requantize or not isinstance(layer, QuantizedLinear)):
            layer.merge(requantize=requantize)
    for module in saved_modules(model).values():
        delattr(module, MODULE_TO_SAVE)
    for name, layer in adapted_layers(model).items():
        dequantize = isinstance(layer, QuantizedLinear) and not requantize
        _set_submodule(model, name, layer.dequantized_linear() if dequantize else layer.unload())
    _record(model)
    return model
