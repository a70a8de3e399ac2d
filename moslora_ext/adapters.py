"""Adapters on whole models: inject by name, count, switch between named adapters.

    model = moslora_ext.add_adapters(model, ["q_proj", "v_proj"], r=16, lora_alpha=32)
    ...train...
    moslora_ext.save_adapter(model, "my-adapter")          # see moslora_ext.checkpoints
    plain = moslora_ext.merge_and_unload(model)            # see moslora_ext.merging

A model holds adapters by name (``adapter_name=``, "default" when not given)
and one of them is active (``set_adapter``, ``disable_adapters``,
``delete_adapter``, ``list_adapters``). Every layer type (see
``moslora_ext.dispatch``) goes through the same functions. Merging lives in
``moslora_ext.merging``, saving and loading (this library's format, PEFT's,
transformers checkpoints) in ``moslora_ext.checkpoints``.
"""

import contextlib
import re
from dataclasses import asdict

from .dispatch import adapter_class, check_adaptable, refusal_reason
from .layer import DEFAULT_ADAPTER, AdapterConfig, AdapterLayer
from .mixed_batch import take_adapter_names

FORMAT = "moslora_ext"
ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output head
# Marks a module of modules_to_save (trained in full and saved with the adapter). An attribute
# on the module itself, so that it follows the module through deepcopy and into submodels.
MODULE_TO_SAVE = "_moslora_ext_module_to_save"
# The key under which a transformers model's config records its adapters (see _record).
CONFIG_RECORD = "moslora_ext"


def matching_names(model, target_modules):
    """Names of the modules of ``model`` that ``target_modules`` selects.

    A list (or tuple/set) of strings selects a module whose name equals one of
    them or ends with ``"." + it`` (``"q_proj"`` selects
    ``model.layers.0.self_attn.q_proj``); a single string is a regular
    expression that must match the whole name (as in PEFT). ``"all-linear"``
    selects, as in PEFT, every linear layer (``nn.Linear`` and GPT-2's
    ``Conv1D``) that can take an adapter (see ``check_adaptable``) except the
    output head, the module that ``model.get_output_embeddings()`` returns
    on a transformers model.
    """
    if _is_all_linear(target_modules):
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        return [name for name, module in model.named_modules()
                if module is not head and getattr(adapter_class(module), "is_linear", False)
                and refusal_reason(module) is None]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return [name for name, _ in model.named_modules()
            if name and any(name == t or name.endswith("." + t) for t in targets)]


def _is_all_linear(target_modules):
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def add_adapters(model, target_modules, r=8, lora_alpha=16, lora_dropout=0.0, mixer_init="kaiming",
                 train_mixer=True, use_rslora=False, modules_to_save=None, autocast_adapter_dtype=True,
                 adapter_name=DEFAULT_ADAPTER):
    """Put a MoSLoRA adapter named ``adapter_name`` on every module of
    ``model`` that ``target_modules`` selects (see ``matching_names``) and
    freeze every other parameter. Linear layers, GPT-2's ``Conv1D``,
    convolutions, embeddings and quantized linear layers (bitsandbytes
    4-bit/8-bit, torchao; ``QuantizedLinear``) are replaced by adapted layers
    (``moslora_ext.dispatch.ADAPTER_CLASSES``) that share their weights and
    take their training mode; layers adapted already get one more adapter.

    The first adapter of a model is active. A later one (another
    ``adapter_name``) is inactive, and frozen, until ``set_adapter(model,
    adapter_name)``, as in PEFT. ``modules_to_save``, as in PEFT, is a list
    of module names (matched as a ``target_modules`` list, e.g.
    ``["classifier"]``) that are trained in full and saved with the adapter;
    "all-linear" leaves their linear layers out of the targets.
    ``autocast_adapter_dtype`` (default True, as PEFT) keeps adapters on
    float16/bfloat16 layers in float32 (see ``moslora_ext.Linear``).

    Returns ``model`` (changed in place). Raises ValueError, listing the
    model's adaptable layers, if nothing matches, and TypeError if a selected
    module cannot take an adapter (an unsupported type, one refused by
    ``check_adaptable``, or one that has an adapter named ``adapter_name``
    already); on any error the model is left untouched.
    """
    config = AdapterConfig(r, lora_alpha, lora_dropout, mixer_init, train_mixer, use_rslora, autocast_adapter_dtype)
    to_save = []
    if modules_to_save:
        to_save = matching_names(model, modules_to_save)
        if not to_save:
            raise ValueError(f"modules_to_save {modules_to_save!r} matches no module of the model")
    names = matching_names(model, target_modules)
    if _is_all_linear(target_modules):
        names = [name for name in names if not _inside_any(name, to_save)]
    if not names:
        available = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                            if name and adapter_class(m)})
        raise ValueError(f"target_modules {target_modules!r} matches no module of the model; "
                         f"the layers that can take adapters are named {available}")
    _wrap(model, {name: config for name in names}, adapter_name, to_save)
    return model


def _inside_any(name, module_names):
    """The first of ``module_names`` that is the module ``name`` or holds it, or None."""
    return next((m for m in module_names if name == m or name.startswith(m + ".")), None)


def _wrap(model, configs, adapter_name=DEFAULT_ADAPTER, modules_to_save=()):
    """Give the named modules an adapter ``adapter_name`` (adapted layers
    replace the others), mark ``modules_to_save`` and freeze everything but
    the active adapters and the modules to save. Every adapter is built
    before anything changes, so a failure leaves the model as it was."""
    to_save = [*saved_modules(model), *modules_to_save]
    modules = {name: model.get_submodule(name) for name in configs}
    for name, module in modules.items():
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            raise TypeError(f"{name} already has a MoSLoRA adapter named {adapter_name!r}")
        check_adaptable(module, name)
        holder = _inside_any(name, to_save)
        if holder:
            raise ValueError(f"{name} is in {holder}, a module of modules_to_save (trained in full); "
                             "it cannot also take an adapter")
    for name in modules_to_save:
        if any(_inside_any(layer, [name]) for layer in adapted_layers(model)):
            raise ValueError(f"module to save {name} holds adapted layers; it cannot be trained in full")
    built = {name: adapter_class(module).build_adapter(module.weight, configs[name])
             for name, module in modules.items()}
    active = active_adapter(model) or adapter_name
    for name, module in modules.items():
        if isinstance(module, AdapterLayer):
            module.attach_adapter(adapter_name, built[name])
        else:
            layer = adapter_class(module).wrap(module, adapter_name, built[name])
            layer.set_adapter(active)
            _set_submodule(model, name, layer)
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
    _record(model)


def _layer_settings(model, adapter_name):
    """{layer name: settings} of the layers holding ``adapter_name``."""
    return {name: asdict(layer.adapters[adapter_name].config)
            for name, layer in _layers_holding(model, adapter_name).items()}


def _record(model):
    """Keep the settings of every adapter in a transformers model's config,
    which ``save_pretrained`` (and so the HF Trainer) writes to config.json
    beside the full state dict with its adapter tensors: ``load_adapter``
    restores an adapter from such a checkpoint. A merged model's weights
    already hold its adapter, so it records none."""
    from . import __version__

    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string"):  # not a transformers PretrainedConfig
        return
    layers = adapted_layers(model).values()
    if layers and not any(layer.merged for layer in layers):
        setattr(config, CONFIG_RECORD, {
            "format": FORMAT, "version": __version__,
            "adapters": {name: _layer_settings(model, name) for name in list_adapters(model)},
            "modules_to_save": list(saved_modules(model))})
    elif hasattr(config, CONFIG_RECORD):
        delattr(config, CONFIG_RECORD)


def _set_submodule(model, name, module):
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


def _require_adapters(model):
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no MoSLoRA adapters (add them with moslora_ext.add_adapters)")
    return layers


def trainable_parameters(model):
    """(trainable, total) parameter counts of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- named adapters ---------------------------------------------------------------------------


def list_adapters(model):
    """{adapter name: [names of the layers holding it]}, in the order the
    adapters were added (PEFT keeps the names in ``peft_config``)."""
    found = {}
    for name, layer in adapted_layers(model).items():
        for adapter_name in layer.adapters:
            found.setdefault(adapter_name, []).append(name)
    return found


def active_adapter(model):
    """The name of the model's active adapter, or None if it has no adapters."""
    return next((layer.active_adapter for layer in adapted_layers(model).values()), None)


def _layers_holding(model, adapter_name):
    """{name: layer} of the layers holding the adapter ``adapter_name``;
    ValueError, listing the model's adapters, if there are none."""
    layers = {name: layer for name, layer in _require_adapters(model).items() if adapter_name in layer.adapters}
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
    _layers_holding(model, adapter_name)  # refuses an unknown name
    layers = adapted_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"set_adapter needs unmerged adapters, but {len(merged)} layers are merged (such as "
                           f"{merged[0]}); call unmerge_adapters(model) first")
    for layer in layers.values():
        layer.set_adapter(adapter_name)
    _record(model)
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """A context manager under which ``model`` computes its base outputs
    exactly, every adapted layer running its base module's forward alone (as
    PEFT's ``disable_adapter``; TRL's DPO and KTO trainers get their reference
    model this way). Refused (RuntimeError) while adapters are merged, since
    unmerging is exact only up to rounding."""
    layers = _require_adapters(model).values()
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
    layers = _layers_holding(model, adapter_name)
    merged = [name for name, layer in layers.items() if layer.merged and layer.active_adapter == adapter_name]
    if merged:
        raise RuntimeError(f"adapter {adapter_name!r} is merged into {len(merged)} layers (such as {merged[0]}); "
                           "call unmerge_adapters(model) first")
    was_active = active_adapter(model) == adapter_name
    for name, layer in layers.items():
        layer.delete_adapter(adapter_name)
        if not layer.adapters:
            _set_submodule(model, name, layer.unload())
    remaining = list(list_adapters(model))
    if was_active and remaining:
        set_adapter(model, remaining[0])
    _record(model)
    return model
