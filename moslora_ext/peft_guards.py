"""Guards of the PEFT route's tuner (``MoSLoRAModel``) where PEFT's own machinery
would silently change what an adapter computes, or leave a model changed by a
refused call:

- stock PEFT LoRA and MoSLoRA in one model: refused, before anything changes
  (a stock LoRA layer would take a MoSLoRA adapter without its mixer; a MoSLoRA
  layer cannot compute a stock LoRA config's adapter);
- the forward hooks of mixed-adapter batches (``adapter_names=``): PEFT removes
  them only when the call succeeds, so that after a failed call every later one
  would run with that call's adapter names;
- loading adapter weights (``PeftModel.from_pretrained``, ``load_adapter``,
  ``set_peft_model_state_dict``): PEFT only warns about a missing ``lora_mixer``
  (keeping a freshly drawn one) and copies part of a file before it finds a tensor
  of the wrong shape; the file is checked first, and a refused load leaves the
  model as it was before the load, the layers that the load put in included.
"""

import sys
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from .peft_injection import _Snapshot

# PEFT's loads: an adapter injected inside one of them is part of that load.
_PEFT_LOADS = (PeftModel.from_pretrained.__func__.__code__, PeftModel.load_adapter.__code__)
# A module's hook dicts that a forward adds to, and the per-hook dicts kept beside them (same keys).
_HOOK_DICTS = {"_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
               "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")}


def refuse_other_config(config, adapter_name):
    """TypeError, naming it, for an adapter config other than a ``MoSLoRAConfig`` on MoSLoRA layers."""
    from .peft_method import MoSLoRAConfig

    if not isinstance(config, MoSLoRAConfig):
        raise TypeError(f"adapter {adapter_name!r} is a {type(config).__name__}, but the model holds MoSLoRA "
                        "adapters: stock PEFT LoRA and MoSLoRA adapters in one model are not supported (a MoSLoRA "
                        "layer would give it a mixer, a stock LoRA layer would drop a MoSLoRA adapter's mixer); use "
                        "a MoSLoRAConfig (mixer_init='identity', train_mixer=False computes PEFT LoRA) or another "
                        "copy of the base model")


def refuse_stock_lora_layers(model):
    """TypeError, naming them, if ``model`` holds stock PEFT LoRA layers (a MoSLoRA adapter on one would lose
    its mixer)."""
    from .peft_method import MoSLoRALayer

    stock = [name for name, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, MoSLoRALayer)]
    if stock:
        raise TypeError(f"the model holds stock PEFT LoRA layers ({', '.join(stock[:3])}"
                        f"{', ...' if len(stock) > 3 else ''}): stock PEFT LoRA and MoSLoRA adapters in one model are "
                        "not supported (a stock LoRA layer would take a MoSLoRA adapter without its mixer); unload "
                        "them first (merge_and_unload / unload), or use another copy of the base model")


class MoSLoRAConfigs(dict):
    """The tuner's ``peft_config`` ({adapter name: config}), which PEFT also sets as
    the model's ``peft_config``. A stock PEFT tuner given the model registers its
    config there before it changes anything: a config other than a
    ``MoSLoRAConfig`` is refused there (and by the MoSLoRA layers)."""

    def __setitem__(self, adapter_name, config):
        refuse_other_config(config, adapter_name)
        super().__setitem__(adapter_name, config)

    def update(self, *args, **kwargs):
        for adapter_name, config in dict(*args, **kwargs).items():
            self[adapter_name] = config


class TunerGuards:
    """A mixin for the PEFT route's tuner: the guards described in this module."""

    def __init__(self, model, *args, **kwargs):
        refuse_stock_lora_layers(model)
        super().__init__(model, *args, **kwargs)

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        if not isinstance(self.peft_config, MoSLoRAConfigs):  # before PEFT shares it with the model
            self.peft_config = MoSLoRAConfigs(self.peft_config)
        load = _enclosing_peft_load()
        before = _Snapshot([self, *model.modules()]) if load is not None else None
        result = super().inject_adapter(model, adapter_name, *args, **kwargs)
        if load is not None:  # kept until the load checks the weights (_remap_adapter_state_dict_for_load)
            self.__dict__.setdefault("_injected_by_load", {})[adapter_name] = (load, before)
        return result

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is None and kwargs.get("alora_offsets") is None:
            with super()._enable_peft_forward_hooks(*args, **kwargs):  # adds no hook
                yield
            return
        before = _hook_keys(self)
        try:
            with super()._enable_peft_forward_hooks(*args, **kwargs):
                yield
        except BaseException:  # PEFT removes its hooks only after a call that succeeded
            _remove_hooks_added(self, before)
            raise

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        injected = (tuner.__dict__.get("_injected_by_load", {}).pop(adapter_name, None)
                    if isinstance(tuner, TunerGuards) else None)
        problems = load_problems(model, adapter_name, state_dict)
        if problems:
            if injected is not None and _on_stack(injected[0]):  # the layers this load put in go too
                injected[1].restore()
                tuner.peft_config.pop(adapter_name, None)
            raise ValueError(f"the MoSLoRA adapter {adapter_name!r} cannot be loaded (the model is left as it was "
                             f"before the load): "
                             f"{'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''} (a MoSLoRA adapter "
                             "needs each layer's lora_A, lora_B and lora_mixer, in the model's shapes: the file is "
                             "incomplete, corrupt, or saved from another model or with other settings)")
        return state_dict


def adapter_tensors(model, adapter_name):
    """{state-dict key: tensor} of the MoSLoRA layers' tensors of ``adapter_name`` in ``model``, under the keys
    of ``model.state_dict()``, which PEFT's load uses."""
    from .peft_method import MoSLoRALayer

    ours = set()
    for module in model.modules():
        if isinstance(module, MoSLoRALayer):
            for part in module.adapter_layer_names:
                store = getattr(module, part, None)
                if store is not None and adapter_name in store:
                    value = store[adapter_name]  # a module (lora_A, lora_mixer...) or a ParameterDict's tensor
                    ours.update(map(id, [value] if isinstance(value, torch.Tensor) else value.parameters()))
    return {key: tensor for key, tensor in model.state_dict(keep_vars=True).items() if id(tensor) in ours}


def load_problems(model, adapter_name, state_dict):
    """What keeps ``state_dict`` (keys as the model's) from being a complete MoSLoRA adapter ``adapter_name``
    of ``model``: each missing tensor and each tensor of another shape, named."""
    problems = []
    for key, tensor in adapter_tensors(model, adapter_name).items():
        loaded = state_dict.get(key)
        if loaded is None:
            problems.append(f"{key} is missing")
        elif loaded.shape != tensor.shape:
            problems.append(f"{key} has shape {tuple(loaded.shape)} in the file, {tuple(tensor.shape)} in the model")
    return problems


def _enclosing_peft_load():
    """The frame of the PEFT load (``PeftModel.from_pretrained`` / ``load_adapter``) this call runs in, or None.
    PEFT tells the tuner neither where a load starts nor where it ends: an injection inside one of these
    calls is that load's, if the check of its weights runs inside the same call (``_on_stack``)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code not in _PEFT_LOADS:
        frame = frame.f_back
    return frame


def _on_stack(target):
    frame = sys._getframe(1)
    while frame is not None and frame is not target:
        frame = frame.f_back
    return frame is not None


def _hook_keys(model):
    return {(id(module), name): set(getattr(module, name)) for module in model.modules() for name in _HOOK_DICTS}


def _remove_hooks_added(model, before):
    for module in model.modules():
        for name, companions in _HOOK_DICTS.items():
            hooks = getattr(module, name)
            for key in set(hooks) - before.get((id(module), name), set()):
                del hooks[key]
                for companion in companions:
                    getattr(module, companion).pop(key, None)
