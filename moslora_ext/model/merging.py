"""Merging the active adapter into the base weights, and back out; merge_and_unload.

Every model-level merge checks every layer before it changes any, so a
refused merge leaves every weight bit-identical. A base weight that other
modules share (tied word embeddings: GPT-2's ``lm_head`` is ``wte``) is
untied, with a warning, before an adapter is merged into it.
"""

import warnings
from collections import Counter

import torch
from torch import nn

from .adapters import (
    MODULE_TO_SAVE,
    record_adapters,
    require_adapters,
    set_submodule,
    adapted_layers,
    saved_modules,
)
from ..layers.quantized import QuantizedLinear


def _active_layers(model):
    """{name: layer} of the adapted layers that hold the active adapter (the others compute their base)."""
    return {name: layer for name, layer in require_adapters(model).items() if layer.active_adapter in layer.adapters}


def merge_adapters(model, safe=False, requantize=False):
    """Merge the active adapter into the base weights (see
    ``AdapterLayer.merge``). Every layer is checked first (with
    ``safe=True``, its merged weight is computed in a copy and refused if it
    holds inf or NaN): a refused merge changes no weight. Quantized layers
    are refused unless ``requantize=True`` (lossy, see
    ``QuantizedLinear.merge``). Tied weights are untied first (see the
    module docstring). Returns ``model``."""
    layers = _active_layers(model)
    for layer in layers.values():
        layer.check_merge(safe=safe, requantize=requantize)
    _untie(model, layers)
    merged = []
    try:
        for layer in layers.values():
            layer.merge(requantize=requantize)  # checked above: only an unforeseen error can stop it
            merged.append(layer)
    except Exception:
        for layer in merged:
            layer.unmerge(requantize=requantize)
        raise
    finally:
        record_adapters(model)
    return model


def _untie(model, layers):
    """Untie the base weights of the layers {name: layer} (see ``untie_weights``)."""
    untie_weights(model, {name: layer for name, layer in layers.items()
                          if getattr(layer, "weight", None) is not None  # expert layers: fused, never tied
                          and not isinstance(layer, QuantizedLinear)})


def untie_weights(model, holders, stacklevel=4):
    """Give each module of ``holders`` ({name in model: module}) whose
    ``weight`` another module of ``model`` also holds a copy of its own
    (frozen as before, same dtype and device), with a warning, and tell a
    transformers config that its word embeddings are no longer tied: a merge
    into a shared weight would change the other modules too. Also used by
    the PEFT route's merges."""
    owners = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    for name, holder in holders.items():
        weight = holder.weight
        others = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if not others:
            continue
        warnings.warn(f"{name}.weight is tied to {others}: merging into it would change them too, so {name} gets "
                      "a copy of the weight of its own (the model's tie_word_embeddings is set to False)",
                      stacklevel=stacklevel)
        holder.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        config = getattr(model, "config", None)
        for part in (config, getattr(config, "get_text_config", lambda: None)()):
            if part is not None and getattr(part, "tie_word_embeddings", False):
                part.tie_word_embeddings = False


def unmerge_adapters(model, requantize=False):
    """Take the active adapter back out of the base weights (``requantize``
    as in ``merge_adapters``)."""
    layers = list(_active_layers(model).values())
    not_merged = [layer for layer in layers if not layer.merged]
    if not_merged:
        raise RuntimeError(f"{len(not_merged)} of {len(layers)} adapted layers are not merged; nothing was changed")
    for layer in layers:
        layer.unmerge(requantize=requantize)
    record_adapters(model)
    return model


QUANTIZED_MERGES = ("dequantize", "requantize")


def merge_and_unload(model, quantized="dequantize", dtype=None):
    """Fold the active adapter into the base weights and put the base modules
    back (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv2d``...; the other
    adapters are dropped): the result has no trace of moslora_ext (modules
    to save stay as trained). Returns ``model``.

    ``quantized`` says what becomes of quantized layers (``QuantizedLinear``):
    "dequantize" (default) puts a plain ``nn.Linear`` in their place,
    holding the dequantised weight plus the adapter (exact up to its dtype);
    "requantize" folds the adapter into the quantized weight and keeps the
    quantized module, as PEFT does, with a warning that states the rounding
    error (bitsandbytes bases only). The dequantised layers are in ``dtype``;
    by default, that of the model's other floating-point parameters (a
    bitsandbytes layer returns its input's dtype, so a 4-bit layer in a
    float32 model becomes a float32 ``nn.Linear``), or the layer's compute
    dtype in a model with none. Tied weights are untied first (see the
    module docstring).
    """
    if quantized not in QUANTIZED_MERGES:
        raise ValueError(f"quantized must be one of {QUANTIZED_MERGES}, got {quantized!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    requantize = quantized == "requantize"
    layers = _active_layers(model)
    for layer in layers.values():  # refusals first, so that a refused call changes nothing
        if layer.disabled:  # a dequantized layer would otherwise leave its adapter out, silently
            raise RuntimeError("the adapters are disabled (inside moslora_ext.disable_adapters); "
                               "call merge_and_unload outside that block")
        if isinstance(layer, QuantizedLinear) and requantize and not layer.merged:
            layer.check_requantizable()
    dequantized_dtype = dtype or _dtype_of_the_rest(model)
    to_merge = {name: layer for name, layer in layers.items()
                if not layer.merged and (requantize or not isinstance(layer, QuantizedLinear))}
    _untie(model, to_merge)
    for layer in to_merge.values():
        layer.merge(requantize=requantize)
    for module in saved_modules(model).values():
        delattr(module, MODULE_TO_SAVE)
    for name, layer in adapted_layers(model).items():
        dequantize = isinstance(layer, QuantizedLinear) and not requantize
        set_submodule(model, name, layer.dequantized_linear(dequantized_dtype) if dequantize else layer.unload())
    record_adapters(model)
    return model


def _dtype_of_the_rest(model):
    """The floating dtype most of the model's parameters outside its quantized
    layers and adapters have (by element count), or None if there are none."""
    skip = {id(p) for layer in adapted_layers(model).values()
            for p in (layer.parameters() if isinstance(layer, QuantizedLinear) else layer.adapters.parameters())}
    counts = Counter()
    for parameter in model.parameters():
        if id(parameter) not in skip and parameter.is_floating_point():
            counts[parameter.dtype] += parameter.numel()
    return counts.most_common(1)[0][0] if counts else None
