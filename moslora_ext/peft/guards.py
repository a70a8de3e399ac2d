"""Guards of the PEFT route's tuner (``MoSLoRAModel``) where PEFT's own machinery
would silently change what an adapter computes, or leave a model changed by a
refused call:

- stock PEFT LoRA and MoSLoRA in one model: refused, before anything changes
  (a stock LoRA layer would take a MoSLoRA adapter without its mixer; a MoSLoRA
  layer cannot compute a stock LoRA config's adapter);
- the forward hooks of mixed-adapter batches (``adapter_names=``): PEFT removes
  them only when the call succeeds, so that after a failed call every later one
  would run with that call's adapter names; the tuner registers them as PEFT
  does and removes exactly those whatever happens;
- loading adapter weights (``PeftModel.from_pretrained``, ``load_adapter``,
  ``set_peft_model_state_dict``): PEFT only warns about a missing ``lora_mixer``
  (keeping a freshly drawn one) and copies part of a file before it finds a tensor
  of the wrong shape; the file is checked first, and a refused load leaves the
  model as it was before the load, the layers that the load put in included;
- transformers' own ``model.load_adapter(folder)``, which injects the adapter and
  loads its file with transformers' loader (a missing mixer stays freshly drawn, a
  wrong shape raises after the layers are in): a MoSLoRA adapter is refused in the
  same words when its file was incomplete, and a failed load leaves the model as it was.
"""

import functools
import sys
from contextlib import contextmanager

from .config import MoSLoRAConfig, refuse_other_config  # first: it refuses an unsupported peft before peft is imported

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.lora.model import _adapter_names_pre_forward_hook, _get_encoder  # noqa: E402
from peft.utils.other import AuxiliaryTrainingWrapper  # noqa: E402

from .folder import with_route_mixer_names  # noqa: E402
from .injection import Snapshot  # noqa: E402
from .layers import MoSLoRALayer, refuse_stock_lora_layers  # noqa: E402

# PEFT's loads: an adapter injected inside one of them is part of that load.
_PEFT_LOADS = (PeftModel.from_pretrained.__func__.__code__, PeftModel.load_adapter.__code__)


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
        before = Snapshot([self, *model.modules()]) if load is not None else None
        result = super().inject_adapter(model, adapter_name, *args, **kwargs)
        if load is not None:  # kept until the load checks the weights (_remap_adapter_state_dict_for_load)
            self.__dict__.setdefault("_injected_by_load", {})[adapter_name] = (load, before)
        return result

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """PEFT's (0.21.2), removing the hooks it registers whatever happens, and exactly those (a concurrent
        call's stay): PEFT removes them only after a call that succeeded. ``alora_offsets`` are not passed
        on: MoSLoRA adapters have no aLoRA (``alora_invocation_tokens`` is refused), and PEFT's layers ignore
        them for adapters without it."""
        adapter_names = kwargs.get("adapter_names")
        handles = []
        try:
            if adapter_names is not None:
                for module, names in self._adapter_names_targets(adapter_names, kwargs.get("num_beams")):
                    hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _adapter_names_targets(self, adapter_names, num_beams):
        """[(module, the adapter names its forward gets)], with PEFT's checks of ``adapter_names``."""
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        # PEFT's check that each name is some layer's adapter (a typo would otherwise give the base's rows)
        held = set()
        for layer in self.modules():
            if isinstance(layer, LoraLayer):
                held |= layer.lora_A.keys() | layer.lora_embedding_A.keys()
        unexpected = {name for name in adapter_names if name != "__base__"} - held
        if unexpected:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
        hooked = (LoraLayer, AuxiliaryTrainingWrapper)
        if not (isinstance(num_beams, int) and num_beams > 1):
            return [(m, adapter_names) for m in self.modules() if isinstance(m, hooked)]
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        # beam search repeats each row num_beams times, except in an encoder (hooked again: its hooks run last)
        targets = [(m, [n for n in adapter_names for _ in range(num_beams)])
                   for m in self.modules() if isinstance(m, hooked)]
        encoder = _get_encoder(self.model)
        return targets + [(m, adapter_names[:]) for m in (encoder.modules() if encoder is not None else ())
                          if isinstance(m, hooked)]

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        injected = (tuner.__dict__.get("_injected_by_load", {}).pop(adapter_name, None)
                    if isinstance(tuner, TunerGuards) else None)
        problems = load_problems(model, adapter_name, {key: tensor.shape for key, tensor in state_dict.items()})
        if problems:
            if injected is not None and _on_stack(injected[0]):  # the layers this load put in go too
                injected[1].restore()
                tuner.peft_config.pop(adapter_name, None)
            raise _load_refusal(adapter_name, problems)
        return state_dict


def guard_transformers_load_adapter():
    """Wraps transformers' ``PeftAdapterMixin.load_adapter`` (``model.load_adapter(folder)`` on a transformers
    model), which loads the file with transformers' loader, never PEFT's: a MoSLoRA adapter it loads is checked
    against what the loader reports (``load_problems``) and refused by name if a tensor was missing or of another
    shape, and any failed MoSLoRA load leaves the model as it was before it. Other adapters load as before."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # a transformers without adapter methods
        return
    load_adapter = PeftAdapterMixin.load_adapter
    if getattr(load_adapter, "__wrapped__", None) is not None:  # already wrapped (a reloaded moslora_ext)
        return

    @functools.wraps(load_adapter)
    def guarded_load_adapter(self, *args, **kwargs):
        if isinstance(kwargs.get("peft_config"), MoSLoRAConfig) and kwargs.get("adapter_state_dict") is not None:
            # diffusers' text encoders: the released MoSLoRA code's lora_AB mixers (moslora_ext.peft.diffusers)
            kwargs["adapter_state_dict"] = with_route_mixer_names(kwargs["adapter_state_dict"])
        held = set(getattr(self, "peft_config", None) or ())
        before = Snapshot(list(self.modules()))
        reports = []

        def load_weights(*load_args, **load_kwargs):  # keeps the loader's report, also for a load that then raises
            result = type(self)._load_pretrained_model(*load_args, **load_kwargs)
            reports.append(result[0])
            return result

        def new_moslora_adapter():
            """The MoSLoRA adapter this call put in and what its file lacked, as the loader reported; or None."""
            for name, config in (getattr(self, "peft_config", None) or {}).items():
                if name not in held and isinstance(config, MoSLoRAConfig):
                    return name, _reported_problems(self, name, reports[-1]) if reports else []
            return None

        self.__dict__["_load_pretrained_model"] = load_weights  # this model's load only
        try:
            try:
                loading_info = load_adapter(self, *args, **kwargs)
            except BaseException as error:
                if (new := new_moslora_adapter()) is None:
                    raise
                before.restore()
                if new[1]:
                    raise _load_refusal(*new) from error
                raise
            if (new := new_moslora_adapter()) is not None and new[1]:
                before.restore()
                raise _load_refusal(*new)
            return loading_info
        finally:
            self.__dict__.pop("_load_pretrained_model", None)

    PeftAdapterMixin.load_adapter = guarded_load_adapter


def adapter_tensors(model, adapter_name):
    """{state-dict key: tensor} of the MoSLoRA layers' tensors of ``adapter_name`` in ``model``, under the keys
    of ``model.state_dict()``, which PEFT's load uses."""
    ours = set()
    for module in model.modules():
        if isinstance(module, MoSLoRALayer):
            for part in module.adapter_layer_names:
                store = getattr(module, part, None)
                if store is not None and adapter_name in store:
                    value = store[adapter_name]  # a module (lora_A, lora_mixer...) or a ParameterDict's tensor
                    ours.update(map(id, [value] if isinstance(value, torch.Tensor) else value.parameters()))
    return {key: tensor for key, tensor in model.state_dict(keep_vars=True).items() if id(tensor) in ours}


def load_problems(model, adapter_name, shapes):
    """What keeps a file whose tensors have ``shapes`` ({key as the model's: shape}) from being a complete
    MoSLoRA adapter ``adapter_name`` of ``model``: each missing tensor and each tensor of another shape, named."""
    problems = []
    for key, tensor in adapter_tensors(model, adapter_name).items():
        shape = shapes.get(key)
        if shape is None:
            problems.append(f"{key} is missing")
        elif shape != tensor.shape:
            problems.append(f"{key} has shape {tuple(shape)} in the file, {tuple(tensor.shape)} in the model")
    return problems


def _reported_problems(model, adapter_name, loading_info):
    """``load_problems`` from transformers' report of a load (its missing keys, and its mismatched keys with
    their shapes in the file)."""
    shapes = {key: tensor.shape for key, tensor in adapter_tensors(model, adapter_name).items()
              if key not in loading_info.missing_keys}
    shapes.update({key: shape for key, shape, _ in loading_info.mismatched_keys})
    return load_problems(model, adapter_name, shapes)


def _load_refusal(adapter_name, problems):
    return ValueError(f"the MoSLoRA adapter {adapter_name!r} cannot be loaded (the model is left as it was before "
                      f"the load): {'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''} (a MoSLoRA adapter "
                      "needs each layer's lora_A, lora_B and lora_mixer, in the model's shapes: the file is "
                      "incomplete, corrupt, or saved from another model or with other settings)")


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
