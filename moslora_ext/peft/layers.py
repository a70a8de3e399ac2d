"""The PEFT route's layers: PEFT's own LoRA layer classes with a MoSLoRA variant each, and their factories,
keyed by the registry's kinds (``moslora_ext.layers.dispatch``)."""

from .config import refuse_other_config  # first: it refuses an unsupported peft before peft is imported

import torch  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from torch import nn  # noqa: E402

from peft.tuners.lora.variants import _register_frozen_peft_weight  # noqa: E402
from ..layers.dispatch import base_kinds, supported_kinds  # noqa: E402
from ..layers.linear import not_plain_linear_reason  # noqa: E402
from .variants import ConvVariant, EmbeddingVariant, MixerVariant, QuantizedVariant  # noqa: E402


class MoSLoRALayer:
    """What the MoSLoRA layers add to PEFT's LoRA layer classes: a
    ``lora_mixer`` per adapter (in ``adapter_layer_names``, so that PEFT
    saves, loads, moves, casts and deletes it with the adapter), the variant
    ``variant_class`` for every adapter, and frozen mixers for
    ``train_mixer=False``. ``x`` is never cast to the adapter's dtype: the
    ops cast the small adapter matrices to x's instead."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_mixer",)
    variant_class = MixerVariant

    def update_layer(self, adapter_name, *args, **kwargs):
        refuse_other_config(kwargs.get("config"), adapter_name)  # a stock LoraConfig, before the layer changes
        if "lora_mixer" not in self._modules:
            self.lora_mixer = nn.ModuleDict()
        if not isinstance(self.scaling, FloatScalings):
            self.scaling = FloatScalings(self.scaling)
        super().update_layer(adapter_name, *args, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        return self.variant_class()

    def _cast_input_dtype(self, x, dtype):
        return x

    def record_train_mixer(self, adapter_name, train_mixer):
        """A frozen mixer (``train_mixer=False``) is recorded as one of PEFT's frozen adapter weights, which
        every PEFT path that sets requires_grad (set_adapter, set_requires_grad,
        load_adapter(is_trainable=True), get_peft_model) freezes again."""
        if not train_mixer:
            _register_frozen_peft_weight(self, adapter_name, "lora_mixer")

    # Merged weights made under torch.inference_mode would be inference tensors, which autograd cannot
    # save for backward once the adapter is unmerged and trained: they are made as normal tensors.
    def merge(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return super().merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return super().unmerge(*args, **kwargs)

    def _delta_shape(self):
        return self.get_base_layer().weight.shape

    def get_delta_weight(self, adapter):
        """The adapter ``adapter`` as an update of the base weight (its layout; the adapter's dtype)."""
        lora_A = self.variant_class.factors(self, adapter)[0]
        delta = torch.zeros(self._delta_shape(), dtype=lora_A.dtype, device=lora_A.device)
        return self.variant_class._add(self, adapter, delta, 1)


class FloatScalings(dict):
    """A MoSLoRA layer's ``scaling`` per adapter, which holds numbers only.
    PEFT's ``prepare_model_for_compiled_hotswap`` starts by making them
    tensors, then pads ``lora_A`` and ``lora_B`` but not the mixer (every
    forward would fail): it is refused here, before it changes anything."""

    def __setitem__(self, adapter_name, scaling):
        if isinstance(scaling, torch.Tensor):
            raise NotImplementedError(
                "peft.utils.hotswap.prepare_model_for_compiled_hotswap (and hot-swapping) is not supported for "
                "MoSLoRA adapters: it pads lora_A and lora_B but not the r x r lora_mixer; load the other adapter "
                "with load_adapter and switch with set_adapter instead")
        super().__setitem__(adapter_name, scaling)


class MoSLoRALinear(MoSLoRALayer, lora_layer.Linear):
    """PEFT's LoRA ``Linear`` (also on GPT-2's ``Conv1D``) with MoSLoRA adapters, on the fused ops."""


class MoSLoRAEmbedding(MoSLoRALayer, lora_layer.Embedding):
    """PEFT's LoRA ``Embedding`` with MoSLoRA adapters."""

    variant_class = EmbeddingVariant

    def _mixed_batch_forward(self, *args, **kwargs):
        raise ValueError("mixed-adapter batches (adapter_names=...) are not supported on MoSLoRA embedding layers; "
                         "run one adapter at a time (set_adapter), or leave the embeddings out of target_modules")


class MoSLoRAConv1d(MoSLoRALayer, lora_layer.Conv1d):
    variant_class = ConvVariant


class MoSLoRAConv2d(MoSLoRALayer, lora_layer.Conv2d):
    variant_class = ConvVariant


class MoSLoRAConv3d(MoSLoRALayer, lora_layer.Conv3d):
    variant_class = ConvVariant


def _linear(target, adapter_name, config, **kwargs):
    base = base_of(target)
    if reason := not_plain_linear_reason(base):
        raise TypeError(f"MoSLoRA adapters cannot go on {type(base).__name__} layers ({reason}); leave them out "
                        "of target_modules (exclude_modules)")
    layer = MoSLoRALinear(target, adapter_name, config=config, **kwargs)
    layer.fan_in_fan_out = False  # as PEFT corrects fan_in_fan_out per layer type
    return layer


def _conv1d_gpt2(target, adapter_name, config, **kwargs):
    layer = MoSLoRALinear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)
    layer.fan_in_fan_out = True  # Conv1D stores its weight (in, out)
    return layer


def _conv(layer_class):
    def create(target, adapter_name, config, **kwargs):
        base = base_of(target)
        if base.groups != 1 or any(d != 1 for d in base.dilation):
            raise TypeError(f"MoSLoRA adapters on the PEFT route need convolutions with groups=1 and dilation 1 "
                            f"(PEFT's A has no dilation), got {base}; moslora_ext.add_adapters takes dilated ones")
        return layer_class(target, adapter_name, config=config, **kwargs)
    return create


def base_of(target):
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


# The PEFT route's layers of the built-in kinds of the registry (moslora_ext.layers.dispatch), by
# BaseKind.key; a registered kind brings its own (BaseKind.peft_layer). The bitsandbytes kinds' are made
# on first use (PEFT imports bitsandbytes lazily too).
PEFT_LAYERS = {"linear": _linear, "gpt2-conv1d": _conv1d_gpt2, "conv1d": _conv(MoSLoRAConv1d),
               "conv2d": _conv(MoSLoRAConv2d), "conv3d": _conv(MoSLoRAConv3d), "embedding": MoSLoRAEmbedding}
# Registered kinds that the PEFT route refuses, with why (the others without a layer: "none of them").
ROUTE_REFUSALS = {"torchao": "torchao-quantized linear layers are not supported on the PEFT route (merging would "
                             "write into the quantized weight); use moslora_ext.add_adapters"}


def layer_factory(kind):
    """The function that makes the MoSLoRA layer of the registered kind ``kind`` (a ``BaseKind``, or None)
    on the PEFT route: ``(target, adapter_name, config, **kwargs) -> layer``; None if the route has none."""
    if kind is None or kind.key in ROUTE_REFUSALS:
        return None
    if kind.peft_layer is not None:
        return kind.peft_layer
    return PEFT_LAYERS.get(kind.key) or _bnb_factories().get(kind.key)


def route_refusal(base, kind):
    """Why the PEFT route takes no adapter on ``base``, whose registered kind is ``kind`` (or None)."""
    if kind is not None and kind.key in ROUTE_REFUSALS:
        return ROUTE_REFUSALS[kind.key]
    taken = supported_kinds([k for k in base_kinds() if layer_factory(k) is not None])
    return f"MoSLoRA adapters on the PEFT route go on {taken}; target {type(base).__name__} is none of them"


_BNB = {}  # the bitsandbytes layer factories by BaseKind.key, made on first use


def _quantized_factory(peft_class, base_settings):
    """The factory of a MoSLoRA layer class over PEFT's bitsandbytes LoRA
    class ``peft_class``; ``base_settings(base)`` are the keyword arguments
    that PEFT's own dispatcher reads from the base layer."""
    layer_class = type(f"MoSLoRA{peft_class.__name__}", (MoSLoRALayer, peft_class), {
        "__doc__": f"PEFT's LoRA ``{peft_class.__name__}`` with MoSLoRA adapters, on the fused adapter op.",
        "__module__": __name__,
        "_delta_shape": lambda self: (self.out_features, self.in_features),  # the weight is stored packed
        "variant_class": QuantizedVariant,
    })

    def create(target, adapter_name, config, **kwargs):
        return layer_class(target, adapter_name, config=config, **kwargs | base_settings(base_of(target)))
    return create


def _bnb_factories():
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    if is_bnb_available() and not _BNB:
        from peft.tuners.lora import bnb as peft_bnb

        _BNB["bnb-8bit"] = _quantized_factory(peft_bnb.Linear8bitLt, lambda base: {
            "has_fp16_weights": base.state.has_fp16_weights, "threshold": base.state.threshold, "index": base.index})
        if is_bnb_4bit_available():
            _BNB["bnb-4bit"] = _quantized_factory(peft_bnb.Linear4bit, lambda base: {
                "compute_dtype": base.compute_dtype, "compress_statistics": base.weight.compress_statistics,
                "quant_type": base.weight.quant_type})
    return _BNB


def refuse_stock_lora_layers(model):
    """TypeError, naming them, if ``model`` holds stock PEFT LoRA layers (a MoSLoRA adapter on one would lose
    its mixer)."""
    stock = [name for name, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, MoSLoRALayer)]
    if stock:
        raise TypeError(f"the model holds stock PEFT LoRA layers ({', '.join(stock[:3])}"
                        f"{', ...' if len(stock) > 3 else ''}): stock PEFT LoRA and MoSLoRA adapters in one model are "
                        "not supported (a stock LoRA layer would take a MoSLoRA adapter without its mixer); unload "
                        "them first (merge_and_unload / unload), or use another copy of the base model")
