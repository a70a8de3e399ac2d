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

from .config import PEFT_TYPE, MoSLoRAConfig  # first: it refuses an unsupported peft before peft is imported

import torch  # noqa: E402
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners import lora  # noqa: E402
from torch import nn  # noqa: E402

from . import folder as peft_folder  # noqa: E402
from ..layers.base import check_adapter_name  # noqa: E402
from ..layers.dispatch import base_kind  # noqa: E402
from ..layers.linear import quantized_kind  # noqa: E402
from ..model.merging import untie_weights  # noqa: E402
from ..model.targets import names_match  # noqa: E402
from .guards import TunerGuards, guard_transformers_load_adapter  # noqa: E402
from .injection import AllOrNothingInjection  # noqa: E402
from .layers import MoSLoRALayer, base_of, layer_factory, route_refusal  # noqa: E402




# --- the variants: what a MoSLoRA adapter adds to PEFT's LoRA layers ----------------------------


# --- the layers: PEFT's LoRA layer classes with the mixer variant ------------------------------


# --- the tuner ---------------------------------------------------------------------------------


class MoSLoRAModel(TunerGuards, AllOrNothingInjection, lora.LoraModel):
    """PEFT's ``LoraModel`` with MoSLoRA layers: the tuner of peft_type "MOSLORA".
    A refused adapter leaves the model as it was (``AllOrNothingInjection``); see
    ``moslora_ext.peft.guards`` for stock LoRA in the same model, mixed-batch hooks and loads."""

    def _check_new_adapter_config(self, config):
        if not isinstance(config, MoSLoRAConfig):
            raise TypeError(f"a MoSLoRA model takes MoSLoRAConfig adapters, got a {type(config).__name__}")
        config.check()  # again: TRL and others may change a config after its creation
        super()._check_new_adapter_config(config)

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if kwargs.get("parameter_name") is not None:  # target_parameters: PEFT's ParamWrapper with mixers
            from .param_wrapper import ParamWrapper  # it builds on this module's MoSLoRALayer

            return ParamWrapper(target, adapter_name, config=lora_config, **kwargs)
        base = base_of(target)
        kind = base_kind(base)  # the registry that add_adapters reads too
        factory = layer_factory(kind)
        if factory is None:  # never fall back to a plain LoRA layer: it would silently drop the mixer
            raise TypeError(route_refusal(base, kind))
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
        ``lm_head``) is untied (``moslora_ext.model.merging.untie_weights``)."""
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

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # The released MoSLoRA code's files (which diffusers' loaders read, moslora_ext.peft.diffusers) name the
        # mixer lora_AB: renamed before PEFT puts the adapter name in, as PEFT asks of renamed keys.
        state_dict = peft_folder.with_route_mixer_names(state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

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
    unmatched = [t for t in target_parameters or () if not any(names_match(n, t) for n in names)]
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
