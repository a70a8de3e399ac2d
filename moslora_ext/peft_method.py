"""MoSLoRA inside PEFT: ``MoSLoRAConfig`` for ``get_peft_model``, ``PeftModel``, TRL and the HF Trainer.

    model = get_peft_model(model, moslora_ext.MoSLoRAConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.save_pretrained("out")
    PeftModel.from_pretrained(base, "out")          # after `import moslora_ext`

PEFT's ``PeftType`` is a closed enum, so MoSLoRA registers itself in PEFT's
mapping dicts under the string ``"MOSLORA"`` (PEFT accepts string peft types):
``MoSLoRAModel`` is PEFT's ``LoraModel`` whose layers are PEFT's LoRA layer
classes with one ``LoraVariant`` each. The variant adds an r x r
``lora_mixer`` per adapter (saved, trained, deleted with the adapter by PEFT's
own machinery) and computes with moslora_ext's code: the fused adapter-only op
``ops.add_moslora`` for linear layers (memory-lean dropout, adapter matrices
cast to x's dtype, never x), ``Embedding.update_of_rows``, ``Conv.update``
and ``AdapterLayer.add_update_`` for merging. A saved folder says
``"peft_type": "MOSLORA"``: stock PEFT (moslora_ext not imported) refuses it
instead of loading it as plain LoRA without the mixer.
"""

import dataclasses
from dataclasses import dataclass, field

from .peft_support import SUPPORTED_PEFT, unsupported_peft_reason

if (_reason := unsupported_peft_reason()) is not None:
    raise ImportError(_reason)

import peft  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners import lora  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from peft.tuners.lora.layer import LoraLayer, LoraVariant  # noqa: E402
from peft.tuners.lora.variants import _register_frozen_peft_weight  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from torch import nn  # noqa: E402

from . import ops, peft_folder  # noqa: E402
from .conv import CONV_FUNCTIONS, Conv  # noqa: E402
from .embedding import Embedding  # noqa: E402
from .layer import MIXER_INITS, AdapterConfig, check_adapter_name, init_mixer_  # noqa: E402
from .linear import Linear, TransposedLinear, not_plain_linear_reason, quantized_kind  # noqa: E402
from .merging import untie_weights  # noqa: E402
from .peft_guards import TunerGuards, guard_transformers_load_adapter, refuse_other_config  # noqa: E402
from .peft_injection import AllOrNothingInjection  # noqa: E402


class PeftTypeName(str):
    """A peft_type outside PEFT's closed ``PeftType`` enum that behaves as its
    members do: it compares, hashes and is saved (adapter_config.json) as the
    plain string, has their ``.value``, and prints as ``PeftType.<NAME>``
    (PEFT's status reports parse that), so that PEFT and transformers code
    reading ``config.peft_type.value`` works or refuses with its own message."""

    @property
    def value(self):
        return str.__str__(self)

    def __str__(self):
        return f"PeftType.{self.value}"

    def __reduce__(self):  # copies and pickles stay PeftTypeNames
        return type(self), (self.value,)


PEFT_TYPE = PeftTypeName(peft_folder.MOSLORA_PEFT_TYPE)

# LoraConfig fields that keep their PEFT meaning on MoSLoRA layers.
KEPT_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "trainable_token_indices", "runtime_config",
    "target_parameters",  # MoE expert stacks: moslora_ext.peft_param_wrapper
    "megatron_core", "qalora_group_size",  # read only with megatron_config and use_qalora, both refused
}
# LoraConfig fields refused when set, with the reason. PEFT's LoRA variants replace the forward
# and merge that the mixer needs; the data-driven initialisations assume a mixer-free B A.
_VARIANT = "a PEFT LoRA variant, which replaces the forward and merge that MoSLoRA's mixer needs"
_INIT = "an initialisation of A and B from the base weight or data that assumes plain LoRA (no mixer)"
REFUSED_FIELDS = {
    "use_dora": "DoRA with a mixer is not implemented",
    "velora_config": _VARIANT, "alora_invocation_tokens": _VARIANT, "monteclora_config": _VARIANT,
    "use_bdlora": _VARIANT, "arrow_config": _VARIANT, "kasa_config": _VARIANT,
    "use_qalora": "QALoRA's pooled adapter input is not implemented with a mixer",
    "lora_bias": "the fused ops have no bias on B",
    "loftq_config": _INIT, "eva_config": _INIT, "corda_config": _INIT, "lora_ga_config": _INIT,
    "megatron_config": "Megatron's parallel linear layers are not supported",
    "layer_replication": "replicated layers sharing one base are not supported",
    "ensure_weight_tying": "tied embedding/output adapters would need a transposed mixer",
}
INIT_LORA_WEIGHTS = (True, False, "gaussian")


@dataclass
class MoSLoRAConfig(LoraConfig):
    """A ``peft.LoraConfig`` for MoSLoRA adapters, ``y = W0 x + s * B M A dropout(x)``,
    for ``get_peft_model``, ``PeftModel.from_pretrained``, TRL's trainers (``peft_config=``).

    Adds ``mixer_init`` ("kaiming", the default, as the released MoSLoRA code;
    "orthogonal"; "identity"; "braid"), ``braid_subspaces`` (the number k of
    subspaces of "braid", default 2, dividing r and every rank of
    ``rank_pattern``; see ``moslora_ext.Linear``) and ``train_mixer``
    (False freezes the mixer: "identity" + False is PEFT LoRA). The fields in
    ``KEPT_FIELDS`` keep their PEFT meaning (``target_modules`` with
    "all-linear", ``rank_pattern``, ``modules_to_save``, ``init_lora_weights``
    True/False/"gaussian", ...; ``fan_in_fan_out`` follows the layer type, as
    PEFT corrects it); those in ``REFUSED_FIELDS`` raise ValueError, with the
    reason, when set. Checked on creation and again when a model gets the
    adapter (TRL may change the config in between).
    """

    mixer_init: str = field(default="kaiming", metadata={"help": f"How the r x r mixer starts: one of {MIXER_INITS}"})
    train_mixer: bool = field(default=True, metadata={"help": "Whether the mixer trains (False: frozen)"})
    braid_subspaces: int = field(default=2, metadata={"help": "The number k of subspaces of mixer_init='braid' (k "
                                                               "divides every rank)"})
    # Saved in adapter_config.json (and by diffusers in a LoRA file's metadata) for a reader without moslora_ext:
    # what to install (always this version's record, peft_folder.record). Its name sorts first, so that PEFT's
    # LoraConfig(**config), which diffusers calls without moslora_ext, raises a TypeError naming it.
    MOSLORA_adapter_import_moslora_ext_before_loading: dict = field(
        default=None, metadata={"help": "What to install and import to read this adapter (set on creation)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.MOSLORA_adapter_import_moslora_ext_before_loading = peft_folder.record()
        self.check()

    def save_pretrained(self, save_directory, **kwargs):
        """PEFT's save, then the model card's section on loading (``moslora_ext.peft_folder``)."""
        super().save_pretrained(save_directory, **kwargs)
        peft_folder.write_card_section(save_directory)

    def check(self):
        """Raise ValueError, naming the field and why, for a setting MoSLoRA does not support (TypeError for
        custom layer classes)."""
        if self.init_lora_weights not in INIT_LORA_WEIGHTS:
            raise ValueError(f"MoSLoRAConfig: init_lora_weights={self.init_lora_weights!r} is not supported: it is "
                             f"{_INIT}; use one of {INIT_LORA_WEIGHTS}")
        defaults = LoraConfig()
        for name, reason in REFUSED_FIELDS.items():
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"MoSLoRAConfig: {name}={getattr(self, name)!r} is not supported: {reason}")
        self._check_adapter_settings()
        if self._custom_modules:  # set without _register_custom_module
            self._register_custom_module(self._custom_modules)

    def _check_adapter_settings(self):
        """r, lora_alpha, lora_dropout, mixer_init, braid_subspaces, train_mixer,
        use_rslora and the values of rank_pattern and alpha_pattern (each rank
        with mixer_init and braid_subspaces), by the functional API's checks
        (``AdapterConfig``: the same ValueErrors), normalised as there (numpy
        numbers become Python numbers)."""
        def checked(where, **settings):
            try:
                return AdapterConfig(**settings)
            except ValueError as error:
                raise ValueError(f"MoSLoRAConfig: {where}{error}") from None

        mixer = {"mixer_init": self.mixer_init, "braid_subspaces": self.braid_subspaces}
        adapter = checked("", r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          train_mixer=self.train_mixer, use_rslora=self.use_rslora, **mixer)
        for name in ("r", "lora_alpha", "lora_dropout", "train_mixer", "use_rslora", "braid_subspaces"):
            setattr(self, name, getattr(adapter, name))
        for pattern, setting, others in (("rank_pattern", "r", mixer), ("alpha_pattern", "lora_alpha", {})):
            values = getattr(self, pattern)
            for key, value in values.items():
                values[key] = getattr(checked(f"{pattern}[{key!r}]: ", **{setting: value}, **others), setting)

    def _register_custom_module(self, mapping):
        raise TypeError(f"MoSLoRAConfig._register_custom_module({mapping!r}) is not supported: MoSLoRA layers are "
                        "moslora_ext's (a custom LoRA layer would have no mixer); use peft.LoraConfig for custom "
                        "layers")


_unknown = {f.name for f in dataclasses.fields(LoraConfig)} - KEPT_FIELDS - REFUSED_FIELDS.keys()
if _unknown:  # a LoraConfig field this module does not know could change what the layers compute
    raise ImportError(f"moslora_ext does not know the LoraConfig fields {sorted(_unknown)} of peft "
                      f"{peft.__version__}; it supports peft {SUPPORTED_PEFT}")


# --- the variants: what a MoSLoRA adapter adds to PEFT's LoRA layers ----------------------------


class MixerVariant(LoraVariant):
    """MoSLoRA on a PEFT LoRA layer: its ``lora_A``/``lora_B`` (or
    ``lora_embedding_A``/``_B``) plus ``lora_mixer[adapter]``, an
    ``nn.Linear(r, r, bias=False)`` whose weight is M. ``layer_class`` is the
    moslora_ext layer whose update this layer's is (its ``add_update_``)."""

    layer_class = Linear

    def supports_lora_conversion(self):
        return True  # s B M A = s (B M) A is a rank-r LoRA update

    @staticmethod
    def init(module, adapter_name, config, **kwargs):
        lora_A, _, _ = MixerVariant.factors(module, adapter_name, with_mixer=False)
        r = module.r[adapter_name]
        mixer = nn.Linear(r, r, bias=False, device="meta")  # no default draw: init_mixer_ alone uses the RNG
        mixer.weight = nn.Parameter(init_mixer_(torch.empty(r, r, device=lora_A.device, dtype=lora_A.dtype),
                                                config.mixer_init, config.braid_subspaces))
        module.lora_mixer[adapter_name] = mixer
        module.record_train_mixer(adapter_name, config.train_mixer)

    @staticmethod
    def factors(module, adapter_name, with_mixer=True):
        """(A, M, B) of the adapter, as tensors."""
        if adapter_name in module.lora_A:
            lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        else:
            lora_A, lora_B = module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
        return lora_A, module.lora_mixer[adapter_name].weight if with_mixer else None, lora_B

    @classmethod
    def _add(cls, module, adapter_name, weight, sign):
        layer_class = TransposedLinear if getattr(module, "fan_in_fan_out", False) else cls.layer_class
        layer_class.add_update_(weight, *cls.factors(module, adapter_name), sign * module.scaling[adapter_name])
        return weight

    @classmethod
    def merge_safe(cls, module, active_adapter, orig_weight):
        return cls._add(module, active_adapter, orig_weight.detach().clone(), 1)

    @classmethod
    def merge_unsafe(cls, module, active_adapter, orig_weight):
        cls._add(module, active_adapter, orig_weight.data, 1)

    @classmethod
    def unmerge(cls, module, active_adapter, orig_weight):
        return cls._add(module, active_adapter, orig_weight.data, -1)

    @staticmethod
    def dropout_p(module, adapter_name):
        dropout = module.lora_dropout[adapter_name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    @classmethod
    def forward(cls, module, active_adapter, x, result, **kwargs):
        lora_A, mixer, lora_B = cls.factors(module, active_adapter)
        # x may arrive in the adapter's dtype (PEFT's mixed batches cast it); the op computes in the base's.
        return ops.add_moslora(result, x.to(result.dtype), lora_A, mixer, lora_B, module.scaling[active_adapter],
                               cls.dropout_p(module, active_adapter))


class QuantizedVariant(MixerVariant):
    """On bitsandbytes bases PEFT quantizes again what ``merge_safe`` and
    ``unmerge`` return: the update is added in the adapter's precision
    (float32), as PEFT's LoRA adds its float32 update to the dequantized weight."""

    @classmethod
    def _added(cls, module, adapter_name, weight, sign):
        dtype = torch.promote_types(weight.dtype, cls.factors(module, adapter_name)[0].dtype)
        return cls._add(module, adapter_name, weight.detach().to(dtype, copy=True), sign)

    @classmethod
    def merge_safe(cls, module, active_adapter, orig_weight):
        return cls._added(module, active_adapter, orig_weight, 1)

    @classmethod
    def unmerge(cls, module, active_adapter, orig_weight):
        return cls._added(module, active_adapter, orig_weight, -1)


class EmbeddingVariant(MixerVariant):
    layer_class = Embedding

    @classmethod
    def forward(cls, module, active_adapter, x, result, **kwargs):
        lora_A, mixer, lora_B = cls.factors(module, active_adapter)
        after_A = module._embed(x, lora_A.t(), input_fn=module.input_fns.get(active_adapter),
                                output_fn=module.output_fns.get(active_adapter))
        update = Embedding.update_of_rows(after_A, mixer, lora_B, module.scaling[active_adapter])
        embed_scale = module._get_embed_scale()  # scaled embeddings (Gemma) scale the adapter's part too
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        return result + update.to(result.dtype)


class ConvVariant(MixerVariant):
    layer_class = Conv

    @classmethod
    def forward(cls, module, active_adapter, x, result, **kwargs):
        lora_A, mixer, lora_B = cls.factors(module, active_adapter)
        conv = module.lora_A[active_adapter]  # PEFT's A: the base's kernel, stride and padding
        return result + Conv.update(CONV_FUNCTIONS[len(conv.kernel_size)], x.to(result.dtype), lora_A, mixer, lora_B,
                                    module.scaling[active_adapter], cls.dropout_p(module, active_adapter),
                                    conv.stride, conv.padding, conv.dilation)


# --- the layers: PEFT's LoRA layer classes with the mixer variant ------------------------------


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
    layer = MoSLoRALinear(target, adapter_name, config=config, **kwargs)
    layer.fan_in_fan_out = False  # as PEFT corrects fan_in_fan_out per layer type
    return layer


def _conv1d_gpt2(target, adapter_name, config, **kwargs):
    layer = MoSLoRALinear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)
    layer.fan_in_fan_out = True  # Conv1D stores its weight (in, out)
    return layer


def _conv(layer_class):
    def create(target, adapter_name, config, **kwargs):
        base = _base_of(target)
        if base.groups != 1 or any(d != 1 for d in base.dilation):
            raise TypeError(f"MoSLoRA adapters on the PEFT route need convolutions with groups=1 and dilation 1 "
                            f"(PEFT's A has no dilation), got {base}; moslora_ext.add_adapters takes dilated ones")
        return layer_class(target, adapter_name, config=config, **kwargs)
    return create


def _base_of(target):
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def layer_factories():
    """Base module type -> the function that makes its MoSLoRA layer, in the
    order PEFT's dispatchers use (bitsandbytes layers before ``nn.Linear``)."""
    from transformers.pytorch_utils import Conv1D

    factories = _bnb_factories()
    factories.update({nn.Embedding: MoSLoRAEmbedding, nn.Conv1d: _conv(MoSLoRAConv1d),
                      nn.Conv2d: _conv(MoSLoRAConv2d), nn.Conv3d: _conv(MoSLoRAConv3d), Conv1D: _conv1d_gpt2,
                      nn.Linear: _linear})
    return factories


_BNB = {}  # the bitsandbytes layer factories, made on first use (PEFT imports bitsandbytes lazily too)


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
        return layer_class(target, adapter_name, config=config, **kwargs | base_settings(_base_of(target)))
    return create


def _bnb_factories():
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    if is_bnb_available() and not _BNB:
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as peft_bnb

        _BNB[bnb.nn.Linear8bitLt] = _quantized_factory(peft_bnb.Linear8bitLt, lambda base: {
            "has_fp16_weights": base.state.has_fp16_weights, "threshold": base.state.threshold, "index": base.index})
        if is_bnb_4bit_available():
            _BNB[bnb.nn.Linear4bit] = _quantized_factory(peft_bnb.Linear4bit, lambda base: {
                "compute_dtype": base.compute_dtype, "compress_statistics": base.weight.compress_statistics,
                "quant_type": base.weight.quant_type})
    return dict(_BNB)


# --- the tuner ---------------------------------------------------------------------------------


class MoSLoRAModel(TunerGuards, AllOrNothingInjection, lora.LoraModel):
    """PEFT's ``LoraModel`` with MoSLoRA layers: the tuner of peft_type "MOSLORA".
    A refused adapter leaves the model as it was (``AllOrNothingInjection``); see
    ``peft_guards`` for stock LoRA in the same model, mixed-batch hooks and loads."""

    def _check_new_adapter_config(self, config):
        if not isinstance(config, MoSLoRAConfig):
            raise TypeError(f"a MoSLoRA model takes MoSLoRAConfig adapters, got a {type(config).__name__}")
        config.check()  # again: TRL and others may change a config after its creation
        super()._check_new_adapter_config(config)

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if kwargs.get("parameter_name") is not None:  # target_parameters: PEFT's ParamWrapper with mixers
            from .peft_param_wrapper import ParamWrapper  # it builds on this module's MoSLoRALayer

            return ParamWrapper(target, adapter_name, config=lora_config, **kwargs)
        base = _base_of(target)
        factory = next((f for t, f in layer_factories().items() if isinstance(base, t)), None)
        if factory is None:  # never fall back to a plain LoRA layer: it would silently drop the mixer
            raise TypeError(f"MoSLoRA adapters on the PEFT route go on torch.nn.Linear, GPT-2's Conv1D, "
                            f"torch.nn.Embedding, Conv1d/2d/3d and bitsandbytes Linear8bitLt/Linear4bit layers; "
                            f"target {type(base).__name__} is none of them")
        if isinstance(base, nn.Linear) and (reason := not_plain_linear_reason(base)):
            raise TypeError(f"MoSLoRA adapters cannot go on {type(base).__name__} layers ({reason}); leave them out "
                            "of target_modules (exclude_modules)")
        if isinstance(base, nn.Linear) and quantized_kind(base) == "torchao":
            raise TypeError("torchao-quantized linear layers are not supported on the PEFT route (merging would "
                            "write into the quantized weight); use moslora_ext.add_adapters")
        return factory(target, adapter_name, config=lora_config, **kwargs)

    # --- checked before anything changes: names and targets, safe merges, tied weights -------------

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        check_adapter_name(adapter_name)  # "__base__" means the base model in mixed batches
        _refuse_unmatched_target_parameters(model, self.peft_config[adapter_name].target_parameters)
        return super().inject_adapter(model, adapter_name, *args, **kwargs)

    def merge_adapter(self, adapter_names=None, safe_merge=False):
        self._prepare_merge(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._prepare_merge(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def _prepare_merge(self, adapter_names, safe_merge):
        """What PEFT's layer-by-layer merge lacks: with ``safe_merge``, every
        layer's merged weight is computed first and a non-finite one refused
        before any layer changes (as ``moslora_ext.merge_adapters``); then a
        base weight that other modules share (GPT-2's tied ``wte`` and
        ``lm_head``) is untied (``moslora_ext.merging.untie_weights``)."""
        layers = {name: (layer, adapters) for name, layer in self.model.named_modules()
                  if isinstance(layer, MoSLoRALayer) and (adapters := _adapters_to_merge(layer, adapter_names))}
        if safe_merge:
            for name, (layer, adapters) in layers.items():
                if not torch.isfinite(_merged_weight(layer, adapters)).all():
                    raise ValueError(f"NaNs detected in the merged weights of {name}: merging {adapters} would "
                                     "give inf or NaN; safe merge refused, no layer was changed")
        untie_weights(self.model, {f"{name}.base_layer": layer.base_layer for name, (layer, _) in layers.items()
                                   if isinstance(getattr(layer.base_layer, "weight", None), nn.Parameter)
                                   and quantized_kind(layer.base_layer) is None})

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError("add_weighted_adapter combines LoRA factors without their mixers; it is not "
                                  "supported for MoSLoRA adapters")


def _refuse_unmatched_target_parameters(model, target_parameters):
    """ValueError for an entry of ``target_parameters`` that matches no
    parameter as PEFT matches them (the name, or its end after a "."; the
    names without the ``base_layer`` of layers adapted already), which PEFT
    would ignore."""
    names = {f"{name}.{parameter}".replace(".base_layer", "") for name, module in model.named_modules()
             for parameter in [*dict(module.named_parameters(recurse=False)),
                               *getattr(module, "parametrizations", {})]}
    unmatched = [t for t in target_parameters or () if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"MoSLoRAConfig: target_parameters {unmatched} match no parameter of the model")


def _adapters_to_merge(layer, adapter_names):
    """The adapters that ``layer.merge(adapter_names=...)`` merges, in order."""
    held = layer._all_available_adapter_names()
    return [a for a in (adapter_names or layer.active_adapters) if a in held and a not in layer.merged_adapters]


def _merged_weight(layer, adapters):
    """A copy of the weight that ``layer.merge(safe_merge=True)`` would write, computed as that merge does."""
    from peft.utils.integrations import dequantize_module_weight

    if hasattr(layer, "get_param"):  # a target_parameters wrapper: its delta in the parameter's shape
        weight = layer.get_param().detach()
        return weight + sum(layer.get_delta_weight(a).to(weight.dtype) for a in adapters)
    weight = dequantize_module_weight(layer.get_base_layer()).detach().clone()
    for adapter in adapters:
        variant = layer.lora_variant.get(adapter)
        weight = (variant.merge_safe(layer, adapter, weight) if variant is not None
                  else weight + layer.get_delta_weight(adapter).to(weight.dtype))
    return weight


PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MoSLoRAConfig
PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MoSLoRAModel
PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = MoSLoRAModel.prefix
guard_transformers_load_adapter()  # transformers' model.load_adapter loads MoSLoRA files as PEFT's loads do
# save_adapter's folders: PEFT's loaders refuse them naming moslora_ext.load_adapter.
PEFT_TYPE_TO_CONFIG_MAPPING[peft_folder.FUNCTIONAL_PEFT_TYPE] = peft_folder.FunctionalFolderConfig
