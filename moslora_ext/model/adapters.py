"""Adapters on whole models: inject by name, count, switch between named adapters.

    model = moslora_ext.add_adapters(model, ["q_proj", "v_proj"], r=16, lora_alpha=32)
    ...train...
    moslora_ext.save_adapter(model, "my-adapter")          # see moslora_ext.formats.native
    plain = moslora_ext.merge_and_unload(model)            # see moslora_ext.model.merging

A model holds adapters by name (``adapter_name=``, "default" when not given)
and one of them is active (``set_adapter``, ``disable_adapters``,
``delete_adapter``, ``list_adapters``). Every layer type (see
``moslora_ext.layers.dispatch``) goes through the same functions. Merging
lives in ``moslora_ext.model.merging``, saving and loading in
``moslora_ext.formats`` (this library's format and transformers checkpoints
in ``moslora_ext.formats.native``, PEFT's in ``moslora_ext.formats.peft_lora``).
"""

import contextlib
import warnings
from dataclasses import asdict

from ..layers.base import DEFAULT_ADAPTER, AdapterConfig, AdapterLayer, check_adapter_name, class_path
from ..layers.dispatch import adapter_class, check_adaptable, refusal_reason
from ..layers.experts import Experts, expert_parameters
from .checkpoint_names import renaming_hook
from .mixed_batch import take_adapter_names
from .targets import (
    adapter_targets,
    candidate_modules,
    example_name,
    group_targets,
    inside_any,
    is_all_linear,
    left_out_of_all_linear,
    matching_names,
    parameter_targets,
)

FORMAT = "moslora_ext"
# Marks a module of modules_to_save (trained in full and saved with the adapter). An attribute
# on the module itself, so that it follows the module through deepcopy and into submodels.
MODULE_TO_SAVE = "_moslora_ext_module_to_save"
# The key under which a transformers model's config records its adapters (see record_adapters).
CONFIG_RECORD = "moslora_ext"


def add_adapters(model, target_modules=None, r=AdapterConfig.r, lora_alpha=AdapterConfig.lora_alpha,
                 lora_dropout=AdapterConfig.lora_dropout, mixer_init=AdapterConfig.mixer_init,
                 train_mixer=AdapterConfig.train_mixer, use_rslora=AdapterConfig.use_rslora, modules_to_save=None,
                 autocast_adapter_dtype=AdapterConfig.autocast_adapter_dtype, adapter_name=DEFAULT_ADAPTER,
                 target_parameters=None, braid_subspaces=AdapterConfig.braid_subspaces):
    """Put a MoSLoRA adapter named ``adapter_name`` on every module of
    ``model`` that ``target_modules`` selects (see ``matching_names``) and
    freeze every other parameter. Linear layers, GPT-2's ``Conv1D``,
    convolutions, embeddings and quantized linear layers (bitsandbytes
    4-bit/8-bit, torchao; ``QuantizedLinear``) are replaced by adapted layers
    (the kinds of ``moslora_ext.layers.dispatch``) that share their weights and
    take their training mode; layers adapted already get one more adapter.

    The first adapter of a model is active. A later one (another
    ``adapter_name``) is inactive, and frozen, until ``set_adapter(model,
    adapter_name)``, as in PEFT. ``modules_to_save``, as in PEFT, is a list
    of module names (matched as a ``target_modules`` list, e.g.
    ``["classifier"]``) that are trained in full and saved with the adapter;
    "all-linear" leaves their linear layers out of the targets.
    ``autocast_adapter_dtype`` (default True, as PEFT) keeps adapters on
    float16/bfloat16 layers in float32 (see ``moslora_ext.Linear``).
    ``braid_subspaces``: the number k of subspaces of ``mixer_init="braid"``
    (default 2; k must divide r), see ``moslora_ext.Linear``.

    ``target_parameters``, as in PEFT, is a list of parameter names (matched
    as a ``target_modules`` list, e.g. ``["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"]``) of fused 3-D expert parameters of
    transformers' mixture-of-experts models, which get per-expert adapters
    (``moslora_ext.layers.experts``); other parameters are refused by name.
    ``"all-linear"`` selects them too, and the routers, and warns, naming
    them, about the parameters PEFT's "all-linear" may adapt but this library
    leaves out (routers that are ``nn.Linear`` subclasses with a forward of
    their own).

    Returns ``model`` (changed in place). Raises ValueError, listing the
    model's adaptable layers, if nothing matches, and TypeError if a selected
    module cannot take an adapter (an unsupported type, one refused by
    ``check_adaptable``), ValueError for bad settings (see ``AdapterConfig``)
    or a bad ``adapter_name`` (see ``check_adapter_name``), or one that the
    selected layers hold already; on any error the model is left untouched.
    """
    config = AdapterConfig(r, lora_alpha, lora_dropout, mixer_init, train_mixer, use_rslora, autocast_adapter_dtype,
                           braid_subspaces)
    check_adapter_name(adapter_name)
    refuse_peft_model(model)
    to_save = _modules_to_save(model, modules_to_save)
    if not target_modules and not target_parameters:
        raise ValueError("add_adapters needs target_modules or target_parameters")
    names = _module_targets(model, target_modules, to_save) if target_modules else []
    if target_parameters:
        names += [name for name in parameter_targets(model, target_parameters) if name not in names]
    wrap_targets(model, {name: config for name in names}, adapter_name, to_save)
    return model


def _modules_to_save(model, modules_to_save):
    """The names that ``modules_to_save`` selects; ValueError if it selects none."""
    if not modules_to_save:
        return []
    to_save = matching_names(model, modules_to_save)
    if not to_save:
        raise ValueError(f"modules_to_save {modules_to_save!r} matches no module of the model")
    return to_save


def _module_targets(model, target_modules, to_save):
    """The names that ``target_modules`` selects: "all-linear" leaves out the modules to save and warns about
    the parameters it leaves out (see ``left_out_of_all_linear``); ValueError if it selects none."""
    names = matching_names(model, target_modules)
    if is_all_linear(target_modules):
        names = [name for name in names if not inside_any(name, to_save)]
        left_out = left_out_of_all_linear(model)
        if left_out:
            warnings.warn(f"all-linear leaves out {len(left_out)} parameters that cannot take a MoSLoRA adapter: "
                          f"{left_out} (routers that are nn.Linear subclasses: their forward returns routing "
                          "scores; 3-D parameters: not in a transformers experts module)", stacklevel=3)
    if not names:
        _refuse_no_match(model, target_modules)
    return names


def _refuse_no_match(model, target_modules):
    """ValueError for ``target_modules`` that selects nothing, naming the layers that can take adapters."""
    modules = {name: m for name, m in candidate_modules(model) if refusal_reason(m) is None}
    available = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if adapter_class(m) is not Experts})
    parameters = sorted({p for m in modules.values() if adapter_class(m) is Experts for p in expert_parameters(m)})
    how = ""
    if isinstance(target_modules, str) and not is_all_linear(target_modules):
        how = (" (a single string is a regular expression that must match a module's full name, such as "
               f"{example_name(model)!r}; pass a list, [{target_modules!r}], to match names by their end)")
    raise ValueError(f"target_modules {target_modules!r} matches no module of the model{how}; the layers that "
                     f"can take adapters are named {available}"
                     + (f", and the fused expert parameters (target_parameters) {parameters}" if parameters else ""))


def wrap_targets(model, configs, adapter_name=DEFAULT_ADAPTER, modules_to_save=()):
    """Give the named modules an adapter ``adapter_name`` (adapted layers
    replace the others), mark ``modules_to_save`` and freeze everything but
    the active adapters and the modules to save. Names of fused expert
    parameters (``<experts>.<parameter>``) give their experts module an
    adapter on those parameters. Every adapter is built before anything
    changes, so a failure leaves the model as it was."""
    check_adapter_name(adapter_name)
    if "" in configs:
        raise ValueError("the model itself cannot take an adapter; target its layers")
    to_save = [*saved_modules(model), *modules_to_save]
    configs = group_targets(dict(model.named_modules()), configs)
    modules = {name: model.get_submodule(name) for name in configs}
    adapted = list(adapted_layers(model))
    for name, module in modules.items():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            raise ValueError(f"{name} already has a MoSLoRA adapter named {adapter_name!r}; pass another "
                             "adapter_name, or delete_adapter(model, name) first")
        inside = next((a for a in adapted if name.startswith(a + ".")), None)
        if inside:
            raise ValueError(f"{name} is inside the adapted layer {inside}; adapt {inside} itself")
        check_adaptable(module, name)
        holder = inside_any(name, to_save)
        if holder:
            raise ValueError(f"{name} is in {holder}, a module of modules_to_save (trained in full); "
                             "it cannot also take an adapter")
    for name in modules_to_save:
        if any(inside_any(layer, [name]) for layer in adapted_layers(model)):
            raise ValueError(f"module to save {name} holds adapted layers; it cannot be trained in full")
    built = {name: _build_adapter(module, configs[name]) for name, module in modules.items()}
    active = active_adapter(model) or adapter_name
    for name, module in modules.items():
        if isinstance(module, AdapterLayer):
            module.attach_adapter(adapter_name, built[name])
        else:
            layer = adapter_class(module).wrap(module, adapter_name, built[name])
            layer.set_adapter(active)
            set_submodule(model, name, layer)
    # Freeze all but the adapters, which keep their own flags (active or not, a frozen mixer
    # stays frozen), and the modules to save, which are trained in full.
    adapter_parameters = {id(p) for layer in adapted_layers(model).values() for p in layer.adapters.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in adapter_parameters:
            parameter.requires_grad_(False)
    for name in to_save:
        module = model.get_submodule(name)
        setattr(module, MODULE_TO_SAVE, True)
        module.requires_grad_(True)
    take_adapter_names(model)
    record_adapters(model)


def _build_adapter(module, config):
    # An experts module's adapter is built on the module (its fused parameters), the others' on the weight.
    cls = adapter_class(module)
    return cls.build_adapter(module if cls is Experts else module.weight, config)


def layer_settings(model, adapter_name):
    """{target name: settings} of the layers holding ``adapter_name`` (a
    layer, or each adapted parameter of an experts layer)."""
    return {target: asdict(adapter.config) for name, layer in layers_holding(model, adapter_name).items()
            for target, adapter in adapter_targets(name, layer, adapter_name).items()}


_RENAMING_HOOK = "_moslora_ext_renaming_hook"  # the handle of a model's checkpoint_names.renaming_hook


def record_adapters(model):
    """Keep the settings of every adapter in a transformers model's config,
    which ``save_pretrained`` (and so the HF Trainer) writes to config.json
    beside the full state dict with its adapter tensors: ``load_adapter``
    restores an adapter from such a checkpoint. It also counts the merged
    layers ("merged_layers", kept up to date by layer-level ``merge()`` and
    ``unmerge()`` too, through the record each layer holds): the weights of
    a checkpoint saved with merged layers hold their adapter already, and
    ``load_adapter`` refuses to add it a second time. A model whose
    checkpoints transformers saves under other names gets the
    ``load_state_dict`` pre-hook that reads them under its own
    (``checkpoint_names.renaming_hook``), as a Trainer resuming needs."""
    from .._version import __version__

    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string"):  # not a transformers PretrainedConfig
        return
    layers = adapted_layers(model).values()
    if not layers:
        if hasattr(config, CONFIG_RECORD):
            delattr(config, CONFIG_RECORD)
        return
    record = {"format": FORMAT, "version": __version__,
              "adapters": {name: layer_settings(model, name) for name in list_adapters(model)},
              "modules_to_save": list(saved_modules(model)),
              "merged_layers": sum(layer.merged for layer in layers)}
    setattr(config, CONFIG_RECORD, record)
    for layer in layers:
        layer._config_record = record
    if _RENAMING_HOOK not in model.__dict__:  # once per model: a Trainer resuming loads renamed keys
        hook = renaming_hook(model)
        model.__dict__[_RENAMING_HOOK] = hook and model.register_load_state_dict_pre_hook(hook)


def set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def adapted_layers(model):
    """{name: layer} of every adapted layer in ``model`` (``moslora_ext.Linear``,
    ``TransposedLinear``, ``Conv``, ``Embedding``: ``AdapterLayer`` subclasses)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def saved_modules(model):
    """{name: module} of the modules of ``model`` that are trained in full and
    saved with the adapter (``modules_to_save``)."""
    return {name: m for name, m in model.named_modules() if getattr(m, MODULE_TO_SAVE, False)}


def require_adapters(model):
    refuse_peft_model(model)
    layers = adapted_layers(model)
    if layers:
        return layers
    raise ValueError("the model has no MoSLoRA adapters (add them with moslora_ext.add_adapters)")


def refuse_peft_model(model):
    """ValueError, naming the PeftModel's methods, if the adapters of
    ``model`` are PEFT's layers (the PEFT route's included), which the model
    functions of this library do not handle."""
    if not adapted_layers(model) and any(_is_peft_layer(m) for m in model.modules()):
        raise ValueError(f"the model's adapters are PEFT's layers ({class_path(model)}, e.g. from get_peft_model with "
                         "MoSLoRAConfig), which moslora_ext's model functions do not handle: use the PeftModel's own "
                         "methods (save_pretrained, load_adapter, merge_and_unload, set_adapter...)")


def _is_peft_layer(module):
    # By class name, so that no peft import is needed: PEFT's layers and the PEFT route's subclasses of them.
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.") for c in type(module).__mro__)


def trainable_parameters(model):
    """(trainable, total) parameter counts of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- named adapters ---------------------------------------------------------------------------


def list_adapters(model):
    """{adapter name: [names of the layers holding it]}, in the order the
    adapters were added (PEFT keeps the names in ``peft_config``)."""
    refuse_peft_model(model)
    found = {}
    for name, layer in adapted_layers(model).items():
        for adapter_name in layer.adapters:
            found.setdefault(adapter_name, []).append(name)
    return found


def active_adapter(model):
    """The name of the model's active adapter, or None if it has no adapters."""
    refuse_peft_model(model)
    return next((layer.active_adapter for layer in adapted_layers(model).values()), None)


def layers_holding(model, adapter_name):
    """{name: layer} of the layers holding the adapter ``adapter_name``;
    ValueError, listing the model's adapters, if there are none."""
    layers = {name: layer for name, layer in require_adapters(model).items() if adapter_name in layer.adapters}
    if not layers:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; it has {list(list_adapters(model))}")
    return layers


def set_adapter(model, adapter_name):
    """Make ``adapter_name`` the active adapter of every adapted layer (as
    PEFT's ``set_adapter``): forward uses it alone, only its parameters
    require grad, and merges fold it. Copies no weight: each layer holds all
    its adapters' tensors, and the parameter objects stay the same (an
    optimizer may hold them all). Layers without an adapter of that name
    compute their base outputs. Refused (RuntimeError, nothing changed) while
    adapters are merged: unmerge_adapters first. Returns ``model``."""
    layers_holding(model, adapter_name)  # refuses an unknown name
    layers = adapted_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"set_adapter needs unmerged adapters, but {len(merged)} layers are merged (such as "
                           f"{merged[0]}); call unmerge_adapters(model) first")
    for layer in layers.values():
        layer.set_adapter(adapter_name)
    record_adapters(model)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """A context manager under which ``model`` computes its base outputs
    exactly, every adapted layer running its base module's forward alone (as
    PEFT's ``disable_adapter``; TRL's DPO and KTO trainers get their reference
    model this way). Refused (RuntimeError) while adapters are merged, since
    unmerging is exact only up to rounding."""
    layers = require_adapters(model).values()
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_adapters needs unmerged adapters; call unmerge_adapters(model) first")
    previous = [(layer, layer.disabled) for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, disabled in previous:
            layer.disabled = disabled


def delete_adapter(model, adapter_name):
    """Remove the adapter ``adapter_name`` from every layer; a layer left
    without adapters is replaced by its base module (weights as they are).
    If it was the active adapter, the first remaining one becomes active.
    Refused (RuntimeError, nothing changed) while it is merged. Returns
    ``model``."""
    layers = layers_holding(model, adapter_name)
    merged = [name for name, layer in layers.items() if layer.merged and layer.active_adapter == adapter_name]
    if merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged into {len(merged)} layers (such as {merged[0]}); "
                           "call unmerge_adapters(model) first")
    was_active = active_adapter(model) == adapter_name
    for name, layer in layers.items():
        layer.delete_adapter(adapter_name)
        if not layer.adapters:
            set_submodule(model, name, layer.unload())
    remaining = list(list_adapters(model))
    if was_active and remaining:
        set_adapter(model, remaining[0])
    record_adapters(model)
    return model
