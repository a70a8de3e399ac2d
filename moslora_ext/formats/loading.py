"""The all-or-nothing load that every reader ends in (this library's folders, transformers checkpoints,
PEFT LoRA folders): settings and tensors checked against the model first, then adapters added and filled."""

import torch

from ..layers.base import DEFAULT_ADAPTER, AdapterConfig, AdapterLayer
from ..layers.dispatch import adapter_class, check_adaptable
from ..layers.experts import Experts
from ..model.adapters import layers_holding, list_adapters, require_adapters, wrap_targets
from ..model.targets import adapter_targets, split_target


ADAPTER_TENSORS = ("lora_A", "lora_mixer", "lora_B")


# The settings that decide what an adapter's tensors compute. The others (lora_dropout,
# mixer_init, train_mixer, autocast_adapter_dtype) only shape training: loading over an
# existing adapter keeps its own.
WEIGHT_SETTINGS = ("r", "lora_alpha", "use_rslora")


BASE_WEIGHT = ".base_layer.weight"  # an adapted layer's base weight, as PEFT's save_embedding_layers writes it


def adapter_targets_of(model, adapter_name, layers=None):
    """{target name: Adapter} of the adapter ``adapter_name`` (see ``moslora_ext.model.targets.adapter_targets``)."""
    layers = layers_holding(model, adapter_name) if layers is None else layers
    return {target: adapter for name, layer in layers.items()
            for target, adapter in adapter_targets(name, layer, adapter_name).items()}


def module_state(modules):
    """The state of the modules {name: module}, keyed as in the model's ``state_dict()``."""
    return {f"{name}.{key}": t for name, module in modules.items() for key, t in module.state_dict().items()}


def unmerged_adapters(model, caller, adapter_name):
    """The layers holding ``adapter_name``, refusing a model with merged adapters."""
    if any(layer.merged for layer in require_adapters(model).values()):
        raise RuntimeError(f"{caller} needs unmerged adapters; call unmerge_adapters(model) first")
    return layers_holding(model, adapter_name)


def folder_settings(path, what, **values):
    """``AdapterConfig(**values)``, its refusal naming the file and what the settings are of."""
    try:
        return AdapterConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad adapter settings for {what}: {exc}") from None


def names_list(path, names):
    """``modules_to_save`` as read from a config: None or a list of module names."""
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: modules_to_save must be a list of module names, got {names!r}")
    return names


def load_all_or_nothing(model, settings, tensors, source, modules_to_save=(), adapter_name=DEFAULT_ADAPTER,
                        replace=False, base_weights=None):
    """Check everything, then give the layers that lack it the adapter
    ``adapter_name``, mark the modules to save and copy the tensors in (and
    ``base_weights``, {layer: its saved base weight}, into those layers)."""
    base_weights = base_weights or {}
    to_add, saved_state = load_plan(model, settings, tensors, source, modules_to_save, adapter_name, replace,
                                    base_weights)
    if to_add or modules_to_save:
        wrap_targets(model, to_add, adapter_name, modules_to_save)
    adapters = adapter_targets_of(model, adapter_name)
    with torch.no_grad():
        for name in settings:
            adapter = adapters[name]
            for t in ADAPTER_TENSORS:
                getattr(adapter, t).copy_(tensors[f"{name}.{t}"])
        for key, t in saved_state.items():
            t.copy_(tensors[key])
        for name, weight in base_weights.items():
            model.get_submodule(name).weight.copy_(weight)


def load_plan(model, settings, tensors, source, modules_to_save, adapter_name, replace, base_weights):
    """What ``load_all_or_nothing`` does, checked and changing nothing: ({target: settings} of the adapters
    to add, {key: tensor} of the state of the modules to save); ValueError for anything that does not fit."""
    modules = dict(model.named_modules())
    # Each target is a module, or a fused expert parameter <experts>.<parameter> (parameter not None).
    targets = {name: split_target(modules, name) for name in settings}
    missing_layers = [name for name in [*settings, *modules_to_save] if targets.get(name, (name,))[0] not in modules]
    if missing_layers:
        raise ValueError(f"{source}: the model has no module named {missing_layers}")
    if adapter_name in list_adapters(model) and not replace:
        raise ValueError(f"{source}: the model has an adapter named {adapter_name!r} already; pass replace=True to "
                         "load over it, or another adapter_name")
    saved_state = module_state({name: modules[name] for name in modules_to_save})
    expected = {f"{name}.{t}" for name in settings for t in ADAPTER_TENSORS} | saved_state.keys()
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    to_add = {name: config for name, config in settings.items()
              if _check_target(modules, targets[name], name, config, tensors, source, adapter_name)}
    for key, t in saved_state.items():
        if tensors[key].shape != t.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"but the model's has {tuple(t.shape)}")
    for name, weight in base_weights.items():
        if name not in settings or name not in modules:
            raise ValueError(f"{source}: {name}{BASE_WEIGHT} is the base weight of a layer without adapter tensors")
        if weight.shape != modules[name].weight.shape:
            raise ValueError(f"{source}: {name}{BASE_WEIGHT} has shape {tuple(weight.shape)}, but layer {name}'s "
                             f"weight has shape {tuple(modules[name].weight.shape)}")
    return to_add, saved_state


def _check_target(modules, target, name, config, tensors, source, adapter_name):
    """Check the target ``name`` ((module name, parameter or None)) against the settings ``config`` and its
    tensors; True if it needs the adapter added, False if it holds it (to be loaded over)."""
    module_name, parameter = target
    module = modules[module_name]
    add = not (isinstance(module, AdapterLayer) and adapter_name in module.adapters)
    if add:
        check_adaptable(module, f"{source}: layer {name}")
    else:
        existing = module.adapters[adapter_name]
        if parameter is not None and parameter not in existing:
            raise ValueError(f"{source}: layer {module_name} has an adapter {adapter_name!r} without "
                             f"{parameter}; load the checkpoint as another adapter_name")
        existing = (existing[parameter] if parameter is not None else existing).config
        differing = [s for s in WEIGHT_SETTINGS if getattr(existing, s) != getattr(config, s)]
        if differing:
            raise ValueError(f"{source}: layer {name} has adapter settings {existing} "
                             f"but the checkpoint has {config}; {differing} must match")
        if module.merged and module.active_adapter == adapter_name:
            raise RuntimeError(f"layer {name} is merged; unmerge it before loading an adapter into it")
    for t, shape in factor_shapes(module, parameter, config.r).items():
        got = tuple(tensors[f"{name}.{t}"].shape)
        if got != shape:
            weight = getattr(module, parameter or "weight")
            raise ValueError(f"{source}: {name}.{t} has shape {got}, but layer {name} "
                             f"(weight {tuple(weight.shape)}, r={config.r}) needs {shape}")
    return add


def factor_shapes(module, parameter, r):
    """The shapes of A, M and B of a rank-r adapter on ``module`` or on its fused expert ``parameter``."""
    if parameter is not None:
        return Experts.factor_shapes_of(module, parameter, r)
    return adapter_class(module).factor_shapes(module.weight, r)
