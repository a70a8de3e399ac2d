"""Saving and loading adapters: this library's folders, PEFT's LoRA and the
released MoSLoRA code's checkpoints, and transformers checkpoints.

    moslora_ext.save_adapter(model, "my-adapter")          # adapter tensors + JSON config
    moslora_ext.load_adapter(fresh_model, "my-adapter")    # adds the adapters and loads them
    moslora_ext.save_peft_adapter(model, "for-vllm")       # a standard PEFT LoRA adapter, mixer folded in
    moslora_ext.load_peft_adapter(model, "peft-adapter")   # PEFT LoRA or released MoSLoRA
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid

import torch

from . import engines, peft_experts
from .adapters import (
    CONFIG_RECORD,
    FORMAT,
    _inside_any,
    _layer_settings,
    _layers_holding,
    _require_adapters,
    _wrap,
    list_adapters,
    matching_names,
    saved_modules,
)
from .dispatch import adapter_class, check_adaptable
from .experts import Experts, adapter_targets, split_target
from .layer import DEFAULT_ADAPTER, AdapterConfig, AdapterLayer, check_adapter_name
from .routers import RouterWeight

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PEFT's PeftModel puts before the base model's names
ADAPTER_TENSORS = ("lora_A", "lora_mixer", "lora_B")
# PEFT's tensor names (and the released MoSLoRA code's lora_AB, the mixer) -> ours.
FROM_PEFT_NAMES = {"lora_A": "lora_A", "lora_embedding_A": "lora_A", "lora_AB": "lora_mixer",
                   "lora_mixer": "lora_mixer",  # moslora_ext.MoSLoRAConfig's folders
                   "lora_B": "lora_B", "lora_embedding_B": "lora_B"}
# The settings that decide what an adapter's tensors compute. The others (lora_dropout,
# mixer_init, train_mixer, autocast_adapter_dtype) only shape training: loading over an
# existing adapter keeps its own.
WEIGHT_SETTINGS = ("r", "lora_alpha", "use_rslora")
BASE_WEIGHT = ".base_layer.weight"  # an adapted layer's base weight, as PEFT's save_embedding_layers writes it


def _adapter_config(model, adapter_name):
    """What ``save_adapter`` writes to adapter_config.json: the settings of
    each layer's adapter ``adapter_name``, the names of the modules to save
    and this library's version."""
    from . import __version__

    return {"format": FORMAT, "version": __version__, "layers": _layer_settings(model, adapter_name),
            "modules_to_save": list(saved_modules(model))}


def adapter_state_dict(model, adapter_name=DEFAULT_ADAPTER):
    """The tensors ``save_adapter`` saves: those of each layer's adapter
    ``adapter_name``, keyed ``"<layer>.lora_A"``, ``"<layer>.lora_mixer"``,
    ``"<layer>.lora_B"`` (``<layer>`` is ``<experts>.<parameter>`` for a
    fused expert parameter, whose tensors are stacked per expert), and the
    state of every module to save, keyed as in ``model.state_dict()``."""
    tensors = {f"{target}.{t}": getattr(adapter, t) for target, adapter in _targets(model, adapter_name).items()
               for t in ADAPTER_TENSORS}
    return tensors | _module_state(saved_modules(model))


def _targets(model, adapter_name, layers=None):
    """{target name: Adapter} of the adapter ``adapter_name`` (see ``moslora_ext.experts.adapter_targets``)."""
    layers = _layers_holding(model, adapter_name) if layers is None else layers
    return {target: adapter for name, layer in layers.items()
            for target, adapter in adapter_targets(name, layer, adapter_name).items()}


def _module_state(modules):
    """The state of the modules {name: module}, keyed as in the model's ``state_dict()``."""
    return {f"{name}.{key}": t for name, module in modules.items() for key, t in module.state_dict().items()}


def _unmerged_adapters(model, caller, adapter_name):
    """The layers holding ``adapter_name``, refusing a model with merged adapters."""
    if any(layer.merged for layer in _require_adapters(model).values()):
        raise RuntimeError(f"{caller} needs unmerged adapters; call unmerge_adapters(model) first")
    return _layers_holding(model, adapter_name)


def _write(path, tensors, config):
    """Write an adapter folder, all or nothing: the tensors and the JSON config.

    The config is encoded before anything is written (a setting JSON cannot
    hold is refused with nothing on disk). Both files are written under
    temporary names, flushed to disk, then renamed into place: a new folder
    is written whole under a temporary name and renamed, so it appears
    complete or not at all; in an existing folder the previous adapter stays
    whole until both new files are complete, and only a crash between the
    two renames could pair the new tensors with the old config.
    """
    from safetensors.torch import save_file

    try:
        text = json.dumps(config, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the adapter settings cannot be written as JSON ({exc}); nothing was written") from exc
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder; nothing was written")
    new_folder = not os.path.exists(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    work = os.path.join(parent if new_folder else path, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    os.mkdir(work)
    try:
        save_file(_unshared(tensors), os.path.join(work, WEIGHTS_NAME))
        with open(os.path.join(work, CONFIG_NAME), "w") as f:
            f.write(text)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(os.path.join(work, name))
        if new_folder:
            os.rename(work, path)
        else:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(os.path.join(work, name), os.path.join(path, name))
            os.rmdir(work)
        _fsync(parent if new_folder else path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _fsync(path):
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unshared(tensors):
    """The tensors, detached and contiguous, each with a storage of its own:
    safetensors refuses tensors that share one (tied embed_tokens and
    lm_head among the modules to save)."""
    storages, out = set(), {}
    for key, t in tensors.items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        out[key] = t.clone() if storage in storages else t.contiguous()
        storages.add(storage)
    return out


def save_adapter(model, path, adapter_name=DEFAULT_ADAPTER):
    """Save the adapter ``adapter_name`` of ``model`` (one adapter per
    folder, as PEFT) to the folder ``path``: ``adapter_model.safetensors``
    (its tensors, keyed ``<layer>.lora_A`` etc.) and ``adapter_config.json``
    (each layer's settings, the names of the modules to save and this
    library's version). Refuses a merged model, whose adapters are also in
    the base weights."""
    _unmerged_adapters(model, "save_adapter", adapter_name)
    _write(path, adapter_state_dict(model, adapter_name), _adapter_config(model, adapter_name))


# Settings that a PEFT LoRA adapter holds once for all its layers.
PEFT_SHARED_SETTINGS = ("lora_dropout", "use_rslora")
# Settings that it holds once, with exceptions by name (rank_pattern, alpha_pattern).
PEFT_PATTERN_SETTINGS = {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}


def save_peft_adapter(model, path, adapter_name=DEFAULT_ADAPTER, engine=None):
    """Save the adapter ``adapter_name`` of ``model`` as a standard PEFT LoRA
    adapter in the folder ``path``, for PEFT's ``PeftModel.from_pretrained``
    and for serving engines that load PEFT LoRA adapters (vLLM, SGLang, TGI,
    LoRAX).

    Since ``s·B M A = s·(B M) A``, each adapter is written as a rank-r LoRA
    adapter with ``lora_A = A`` and ``lora_B = B M`` (computed in fp32,
    rounded once to the adapter's dtype), under PEFT's key names
    (``base_model.model.<layer>.lora_A.weight``, ``lora_embedding_A`` for
    embeddings); the modules to save are written as PEFT writes them.
    ``adapter_config.json`` has ``peft_type`` "LORA", r, lora_alpha,
    lora_dropout, use_rslora, target_modules (the layers' last names where
    these select exactly the adapted layers, else their full names),
    target_parameters (adapted fused expert parameters, written in PEFT's
    ``ParamWrapper`` layout, see ``moslora_ext.peft_experts``; and linear
    layers that PEFT's transformers-v5 MoE conversion would otherwise remap
    to routed experts, such as DeepSeek-V3's dense MLP and shared experts,
    as ``<layer>.weight``; lora_dropout is then written as 0, which PEFT
    requires there), modules_to_save, and ``fan_in_fan_out`` true when it adapts GPT-2
    ``Conv1D`` layers. The mixer is folded in, so the saved adapter is plain
    LoRA: loading it back gives the same outputs with an identity, frozen
    mixer.

    PEFT's LoRA has one lora_dropout and use_rslora per adapter: ValueError
    if the adapted layers differ in one of them. r and lora_alpha are written
    as their most common value, with ``rank_pattern`` / ``alpha_pattern``
    entries (escaped full names) for the targets that differ. Refuses a
    merged model.

    ``engine="vllm"`` also refuses (ValueError, naming each setting, nothing
    written) an adapter that vLLM would not load: see ``moslora_ext.engines``.
    Serve it with ``max_lora_rank`` at least r, one of 1, 8, 16, 32, ...
    (``moslora_ext.engines.vllm_max_lora_rank(r)``).
    """
    layers = _unmerged_adapters(model, "save_peft_adapter", adapter_name)
    adapters = _targets(model, adapter_name, layers)
    shared = {}
    for setting in PEFT_SHARED_SETTINGS:
        values = {getattr(adapter.config, setting) for adapter in adapters.values()}
        if len(values) > 1:
            raise ValueError(f"a PEFT LoRA adapter has one {setting} for all layers, but the adapted layers "
                             f"have {sorted(values)}")
        shared[setting] = values.pop()
    experts = {name: layer for name, layer in layers.items() if isinstance(layer, Experts)}
    linear = {name: layer for name, layer in layers.items() if name not in experts}
    # Routers, and linear layers that PEFT would remap to routed experts, go in as 2-D target_parameters.
    as_parameters = [name for name, layer in linear.items()
                     if isinstance(layer, RouterWeight) or peft_experts.remapped_by_peft(model, name)]
    target_parameters = [f"{name}.weight" for name in as_parameters]
    modules = {name: layer for name, layer in linear.items() if name not in as_parameters}
    last_names = sorted({name.rsplit(".", 1)[-1] for name in modules})
    exact = set(matching_names(model, last_names)) == set(modules)
    tensors = {}
    with torch.no_grad():
        for name, layer in linear.items():
            adapter, peft_names = adapters[name], layer.peft_names
            B = adapter.lora_B
            tensors[f"{PEFT_PREFIX}{name}.{peft_names['lora_A']}"] = adapter.lora_A
            tensors[f"{PEFT_PREFIX}{name}.{peft_names['lora_B']}"] = (
                B.flatten(1).float() @ adapter.lora_mixer.float()).to(B.dtype).view_as(B)
        for name, layer in experts.items():
            tensors.update(peft_experts.peft_tensors(PEFT_PREFIX, name, layer.adapters[adapter_name], layer))
            target_parameters += [f"{name}.{parameter}" for parameter in layer.adapters[adapter_name]]
    if target_parameters:
        shared["lora_dropout"] = 0.0  # PEFT's ParamWrapper refuses dropout; it only shapes training
    tensors.update({PEFT_PREFIX + key: t for key, t in _module_state(saved_modules(model)).items()})
    base_model = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, **shared,
              "target_modules": (last_names if exact else sorted(modules)) or None,
              "target_parameters": sorted(target_parameters) or None,
              "modules_to_save": list(saved_modules(model)) or None,
              "bias": "none", "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
              "use_dora": False, "init_lora_weights": True, "inference_mode": True}
    for setting, pattern in PEFT_PATTERN_SETTINGS.items():  # under PEFT's keys: <layer>.weight for a 2-D parameter
        values = {(f"{t}.weight" if t in as_parameters else t): getattr(a.config, setting) for t, a in adapters.items()}
        config[setting] = max(sorted(set(values.values())), key=list(values.values()).count)
        config[pattern] = peft_experts.patterns(values, config[setting])
    if engine is not None:
        reasons = engines.refusals(engine, config, layers)
        if reasons:
            raise ValueError(f"{engine} would not load this adapter: {'; '.join(reasons)}")
    _write(path, tensors, config)


def load_adapter(model, path, adapter_name=DEFAULT_ADAPTER, replace=False):
    """Load an adapter saved by ``save_adapter`` into ``model`` as
    ``adapter_name``, or the adapter ``adapter_name`` of a transformers
    checkpoint folder written by ``save_pretrained`` (and so by the HF
    Trainer) of a model with adapters: ``model.safetensors`` or its shards
    with ``model.safetensors.index.json``, and ``config.json``, where the
    adapted model's config recorded the adapter settings (lora_alpha cannot
    be read from tensor shapes). Only that adapter's tensors (and the modules
    to save) are read from such a checkpoint.

    Layers named in the checkpoint get an adapter ``adapter_name`` with the
    saved settings (adapted layers replace base ones, see ``add_adapters``;
    the adapter is active if it is the model's first). If the model has an
    adapter of that name already, the load is refused unless ``replace``:
    then the checkpoint's tensors are copied into the existing adapters (the
    parameter objects stay, so an optimizer holding them goes on), which
    must have the same ``WEIGHT_SETTINGS`` (r, lora_alpha, use_rslora) and
    keep their own lora_dropout, mixer_init and train_mixer, which do not
    change what the tensors compute. Every tensor's shape is checked, and
    missing or unexpected keys are reported, before anything changes: a
    failed load leaves the model untouched. Returns ``model``.
    """
    _check_folder(path)
    check_adapter_name(adapter_name)
    if os.path.exists(os.path.join(path, CONFIG_NAME)):
        config = _read_json(os.path.join(path, CONFIG_NAME))
        tensors = None  # read once the config is checked
    else:
        config, tensors = _read_transformers_checkpoint(path, adapter_name)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a moslora_ext adapter (format {config.get('format')!r}); "
                         "for PEFT or released MoSLoRA checkpoints use load_peft_adapter")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: its config has no adapted layers ('layers' is {layers!r}); it is not a complete "
                         "moslora_ext adapter: save the adapter again")
    settings = {}
    for name, layer_config in layers.items():
        if not isinstance(layer_config, dict):
            raise ValueError(f"{path}: the settings of layer {name} must be a JSON object, got {layer_config!r}")
        unknown = set(layer_config) - {f.name for f in dataclasses.fields(AdapterConfig)}
        if unknown:
            raise ValueError(f"{path}: unknown adapter settings {sorted(unknown)} for layer {name}")
        settings[name] = _settings(path, f"layer {name}", **layer_config)
    modules_to_save = _names_list(path, config.get("modules_to_save", []))
    if tensors is None:
        tensors = _read_tensors(os.path.join(path, WEIGHTS_NAME))
    _load(model, settings, tensors, str(path), modules_to_save, adapter_name, replace)
    return model


def _check_folder(path):
    """FileNotFoundError/NotADirectoryError, saying so, unless ``path`` is a local folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; moslora_ext reads adapters from local folders and does not "
                                "fetch Hugging Face Hub ids (download one first, e.g. with "
                                "huggingface_hub.snapshot_download)")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file; pass the adapter's folder")


def _settings(path, what, **values):
    """``AdapterConfig(**values)``, its refusal naming the file and what the settings are of."""
    try:
        return AdapterConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad adapter settings for {what}: {exc}") from None


def _names_list(path, names):
    """``modules_to_save`` as read from a config: None or a list of module names."""
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: modules_to_save must be a list of module names, got {names!r}")
    return names


def _read_json(file):
    """The JSON object in ``file``; ValueError naming the file if it is not one."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist")
    try:
        with open(file) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); the file is damaged: save it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(value).__name__}")
    return value


def _read_transformers_checkpoint(path, adapter_name):
    """The adapter ``adapter_name`` of a transformers checkpoint folder: the
    save_adapter-style config of its record in config.json, and its tensors
    (and those of the modules to save), read alone from ``model.safetensors``
    or its shards and keyed as by ``adapter_state_dict``."""
    from safetensors import safe_open

    model_config = os.path.join(path, "config.json")
    if not os.path.exists(model_config):
        raise FileNotFoundError(f"{path} holds neither {CONFIG_NAME} (an adapter folder) "
                                "nor config.json (a transformers checkpoint)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map object")
        files = {key: os.path.join(path, file) for key, file in weight_map.items()}
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        single = os.path.join(path, "model.safetensors")
        with _reading(single), safe_open(single, "pt") as f:
            files = dict.fromkeys(f.keys(), single)
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index.json "
                                "(save with safe_serialization, the default)")
    record = _read_json(model_config).get(CONFIG_RECORD)
    if record is None:
        lora_keys = [key for key in files if ".lora_" in key]
        raise ValueError(f"{path}: config.json has no moslora_ext adapter record, and {len(lora_keys)} lora_* "
                         "tensors (their lora_alpha cannot be read from shapes). It was saved from a model "
                         "without adapters, from one whose adapters were merged (its weights hold them: use it "
                         "as is), or with an older moslora_ext; load its adapters with save_adapter's folder")
    if not isinstance(record, dict) or not isinstance(record.get("adapters"), dict):
        raise ValueError(f"{model_config}: its {CONFIG_RECORD!r} record is damaged (no 'adapters' object)")
    if record.get("merged_layers"):
        raise ValueError(f"{path} was saved with {record['merged_layers']} adapted layers merged: its weights hold "
                         "their adapter already, and loading it again would add it twice. Use the checkpoint as "
                         "it is, or unmerge before saving")
    if adapter_name not in record["adapters"]:
        raise ValueError(f"{path}: the checkpoint has no adapter named {adapter_name!r}; it has "
                         f"{list(record['adapters'])}")
    layers = record["adapters"][adapter_name]
    # The model's state-dict key of each tensor (AdapterLayer holds its adapters in `adapters`) -> ours.
    # A fused expert parameter's target <experts>.<parameter> is held at <experts>.adapters.<name>.<parameter>.
    wanted = {}
    for name in layers:
        module_name, _, parameter = name.rpartition(".")
        for t in ADAPTER_TENSORS:
            wanted[f"{name}.adapters.{adapter_name}.{t}"] = wanted[
                f"{module_name}.adapters.{adapter_name}.{parameter}.{t}"] = f"{name}.{t}"
    wanted |= {key: key for key in files if _inside_any(key, record["modules_to_save"])}
    tensors = {}
    for file in sorted({files[key] for key in wanted if key in files}):
        with _reading(file), safe_open(file, "pt") as f:
            tensors.update({wanted[key]: f.get_tensor(key) for key in f.keys() if key in wanted})
    return {"format": FORMAT, "layers": layers, "modules_to_save": record["modules_to_save"]}, tensors


def _read_tensors(file):
    """The tensors in a safetensors (or torch) ``file``, read onto the CPU."""
    with _reading(file):
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _reading(file):
    """Turn a failure to read ``file`` (truncated, empty, not in its format) into a ValueError naming it."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist")
    try:
        yield
    except Exception as exc:
        raise ValueError(f"{file} cannot be read ({type(exc).__name__}: {exc}); it is truncated, empty or not a "
                         "tensor file: save it again") from exc


def _load(model, settings, tensors, source, modules_to_save=(), adapter_name=DEFAULT_ADAPTER, replace=False,
          base_weights=None):
    """Check everything, then give the layers that lack it the adapter
    ``adapter_name``, mark the modules to save and copy the tensors in (and
    ``base_weights``, {layer: its saved base weight}, into those layers)."""
    base_weights = base_weights or {}
    modules = dict(model.named_modules())
    # Each target is a module, or a fused expert parameter <experts>.<parameter> (parameter not None).
    targets = {name: split_target(modules, name) for name in settings}
    missing_layers = [name for name in [*settings, *modules_to_save] if targets.get(name, (name,))[0] not in modules]
    if missing_layers:
        raise ValueError(f"{source}: the model has no module named {missing_layers}")
    if adapter_name in list_adapters(model) and not replace:
        raise ValueError(f"{source}: the model has an adapter named {adapter_name!r} already; pass replace=True to "
                         "load over it, or another adapter_name")
    saved_state = _module_state({name: modules[name] for name in modules_to_save})
    expected = {f"{name}.{t}" for name in settings for t in ADAPTER_TENSORS} | saved_state.keys()
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    to_add = {}
    for name, config in settings.items():
        module_name, parameter = targets[name]
        module = modules[module_name]
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
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
        else:
            check_adaptable(module, f"{source}: layer {name}")
            to_add[name] = config
        for t, shape in _factor_shapes(module, parameter, config.r).items():
            got = tuple(tensors[f"{name}.{t}"].shape)
            if got != shape:
                weight = getattr(module, parameter or "weight")
                raise ValueError(f"{source}: {name}.{t} has shape {got}, but layer {name} "
                                 f"(weight {tuple(weight.shape)}, r={config.r}) needs {shape}")
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
    if to_add or modules_to_save:
        _wrap(model, to_add, adapter_name, modules_to_save)
    adapters = _targets(model, adapter_name)
    with torch.no_grad():
        for name in settings:
            adapter = adapters[name]
            for t in ADAPTER_TENSORS:
                getattr(adapter, t).copy_(tensors[f"{name}.{t}"])
        for key, t in saved_state.items():
            t.copy_(tensors[key])
        for name, weight in base_weights.items():
            model.get_submodule(name).weight.copy_(weight)


def _factor_shapes(module, parameter, r):
    """The shapes of A, M and B of a rank-r adapter on ``module`` or on its fused expert ``parameter``."""
    if parameter is not None:
        return Experts.factor_shapes_of(module, parameter, r)
    return adapter_class(module).factor_shapes(module.weight, r)


def load_peft_adapter(model, path, adapter_name=DEFAULT_ADAPTER, replace=False, autocast_adapter_dtype=True):
    """Load a LoRA adapter saved by PEFT, or a MoSLoRA adapter saved by the
    released MoSLoRA code (a PEFT fork), from the folder ``path``
    (``adapter_config.json`` and ``adapter_model.safetensors`` or ``.bin``)
    as the adapter ``adapter_name``.

    Keys ``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight`` (and
    ``lora_AB.weight``, the mixer, for MoSLoRA; ``lora_embedding_A`` /
    ``lora_embedding_B`` for embeddings) are mapped onto ``<layer>`` of
    ``model``: linear layers, GPT-2's ``Conv1D`` (PEFT's
    ``fan_in_fan_out``), convolutions, embeddings, and the fused expert
    parameters of a ``target_parameters`` adapter (PEFT's nested
    ``ParamWrapper`` keys ``<experts>.lora_A.weight``,
    ``<experts>.base_layer.lora_A.weight``, in either of PEFT's layouts, see
    ``moslora_ext.peft_experts``); ``rank_pattern`` and ``alpha_pattern``
    are applied as PEFT applies them. Router weights adapted through
    ``target_parameters`` (``mlp.gate.weight``) go to router adapters
    (``moslora_ext.routers``). A LoRA adapter gets
    an identity, frozen mixer, so the layer computes exactly what PEFT
    computes; a MoSLoRA adapter gets its trained mixer. Tensors of the
    config's ``modules_to_save`` (such as the ``classifier.*`` or
    ``score.*`` of a SEQ_CLS adapter), keyed
    ``base_model.model.<module>.<name>``, are loaded into those modules,
    which are then trained in full as with ``add_adapters(...,
    modules_to_save=...)``. Same all-or-nothing checks, and the same
    ``replace`` rule, as ``load_adapter``. ``autocast_adapter_dtype`` as in
    ``add_adapters`` (and PEFT's ``from_pretrained``): float32 adapters on
    float16/bfloat16 layers.

    Also read: the ``<layer>.base_layer.weight`` that PEFT's ``save_embedding_layers`` ("auto" when embeddings are
    targeted) writes, restored into that layer's base weight as PEFT
    restores it; and folders of ``moslora_ext.MoSLoRAConfig`` (peft_type
    "MOSLORA", ``lora_mixer`` tensors), whose mixer_init and train_mixer are kept.
    """
    _check_folder(path)
    check_adapter_name(adapter_name)
    peft_config = _read_json(os.path.join(path, CONFIG_NAME))
    if peft_config.get("format") == FORMAT:
        raise ValueError(f"{path} is a moslora_ext adapter folder (written by save_adapter), not a PEFT one; "
                         "load it with moslora_ext.load_adapter")
    unsupported = {key: peft_config[key] for key in ("use_dora",) if peft_config.get(key)}
    if peft_config.get("bias", "none") != "none":
        unsupported["bias"] = peft_config["bias"]
    if unsupported:
        raise NotImplementedError(f"{path}: PEFT settings not supported by moslora_ext: {unsupported}")
    files = [os.path.join(path, name) for name in (WEIGHTS_NAME, "adapter_model.bin")]
    weights = next((f for f in files if os.path.exists(f)), None)
    if weights is None:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor adapter_model.bin")
    # Settings the config leaves out take PEFT's LoraConfig defaults, as PEFT's own loading does.
    shared = _settings(path, "the adapter", r=peft_config.get("r", 8), lora_alpha=peft_config.get("lora_alpha", 8),
                       lora_dropout=peft_config.get("lora_dropout", 0.0),
                       use_rslora=peft_config.get("use_rslora", False), autocast_adapter_dtype=autocast_adapter_dtype)
    key_pattern = re.compile(rf"(.+)\.({'|'.join(FROM_PEFT_NAMES)})(?:\.default)?(?:\.weight)?")
    modules_to_save = _names_list(path, peft_config.get("modules_to_save"))
    save_candidates = matching_names(model, modules_to_save) if modules_to_save else []
    by_layer, tensors, to_save, base_weights = {}, {}, set(), {}
    for key, tensor in _read_tensors(weights).items():
        name = key.removeprefix(PEFT_PREFIX)
        match = key_pattern.fullmatch(name)
        module_to_save = _inside_any(name, save_candidates)
        if match:
            by_layer.setdefault(match.group(1), {})[FROM_PEFT_NAMES[match.group(2)]] = tensor
        elif name.endswith(BASE_WEIGHT):
            base_weights[name.removesuffix(BASE_WEIGHT)] = tensor
        elif module_to_save:
            to_save.add(module_to_save)
            tensors[name] = tensor
        else:
            raise ValueError(f"{weights}: unexpected key {key!r} (not a LoRA/MoSLoRA adapter tensor "
                             f"nor one of a module of modules_to_save {modules_to_save})")
    modules = dict(model.named_modules())
    target_parameters = peft_config.get("target_parameters")
    settings = {}
    for key_module, parts in by_layer.items():
        name = peft_experts.resolve_key_module(modules, key_module, target_parameters, str(path))
        keys = (name, f"{name}.weight")
        r = peft_experts.pattern_value(peft_config.get("rank_pattern"), keys, shared.r)
        alpha = peft_experts.pattern_value(peft_config.get("alpha_pattern"), keys, shared.lora_alpha)
        has_mixer = "lora_mixer" in parts
        # A trained mixer: a MoSLoRAConfig folder says how it started and whether it trains.
        mixer = ({"mixer_init": peft_config.get("mixer_init", "kaiming"), "train_mixer": peft_config.get("train_mixer",
                 True)} if has_mixer else {"mixer_init": "identity", "train_mixer": False})
        settings[name] = _settings(path, f"layer {name}", **{
            **dataclasses.asdict(shared), "r": r, "lora_alpha": alpha,
            **mixer})
        r = settings[name].r
        module_name, parameter = split_target(modules, name)
        if parameter is not None and "lora_A" in parts and "lora_B" in parts:  # PEFT's ParamWrapper layout
            shapes = _factor_shapes(modules[module_name], parameter, r)
            parts["lora_A"], parts["lora_B"] = peft_experts.from_peft(
                parts["lora_A"], parts["lora_B"], shapes, modules[module_name].is_transposed,
                peft_config.get("peft_version"), str(path), name)
            parts.setdefault("lora_mixer", torch.eye(r).expand(shapes["lora_mixer"]))
        parts.setdefault("lora_mixer", torch.eye(r))
        tensors.update({f"{name}.{t}": tensor for t, tensor in parts.items()})
    if not settings:
        raise ValueError(f"{weights} holds no adapter tensors")
    _load(model, settings, tensors, str(path), sorted(to_save), adapter_name, replace, base_weights)
    return model
