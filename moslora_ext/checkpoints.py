"""Saving and loading adapters: this library's folders and transformers
checkpoints, and what every format shares (all-or-nothing writing, checked
reading, the all-or-nothing load); PEFT's format is in
``moslora_ext.peft_checkpoints``.

    moslora_ext.save_adapter(model, "my-adapter")          # adapter tensors + JSON config
    moslora_ext.load_adapter(fresh_model, "my-adapter")    # adds the adapters and loads them
"""

import contextlib
import dataclasses
import json
import os
import shutil
import uuid

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

from .adapters import (
    CONFIG_RECORD,
    FORMAT,
    _inside_any,
    _layer_settings,
    _layers_holding,
    _refuse_peft_model,
    _require_adapters,
    _wrap,
    list_adapters,
    saved_modules,
)
from .checkpoint_names import checkpoint_renamings, model_key
from .dispatch import adapter_class, check_adaptable
from .experts import Experts, adapter_targets, split_target
from .layer import DEFAULT_ADAPTER, AdapterConfig, AdapterLayer, check_adapter_name
from .peft_folder import FUNCTIONAL_PEFT_TYPE

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TENSORS = ("lora_A", "lora_mixer", "lora_B")
# The settings that decide what an adapter's tensors compute. The others (lora_dropout,
# mixer_init, train_mixer, autocast_adapter_dtype) only shape training: loading over an
# existing adapter keeps its own.
WEIGHT_SETTINGS = ("r", "lora_alpha", "use_rslora")
BASE_WEIGHT = ".base_layer.weight"  # an adapted layer's base weight, as PEFT's save_embedding_layers writes it


def _adapter_config(model, adapter_name):
    """What ``save_adapter`` writes to adapter_config.json: the settings of
    each layer's adapter ``adapter_name``, the names of the modules to save,
    this library's version and a ``peft_type`` that PEFT's loaders refuse by
    name."""
    from . import __version__

    # peft_type: PEFT's loaders, given this folder, name load_adapter (moslora_ext.peft_folder).
    return {"format": FORMAT, "peft_type": FUNCTIONAL_PEFT_TYPE, "version": __version__,
            "layers": _layer_settings(model, adapter_name),
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

    The config is encoded and the path checked before anything is written (a
    setting JSON cannot hold, or a path that is a file or a dangling link, is
    refused with nothing on disk). Both files are written under temporary
    names, flushed to disk, then renamed into place: a new folder is written
    whole under a temporary name and renamed, so it appears complete or not
    at all; in an existing folder the previous adapter stays whole until both
    new files are complete, and only a crash between the two renames could
    pair the new tensors with the old config. Saves to one folder from several
    processes or threads take turns (``_folder_lock``): the folder ends with
    the last writer's complete adapter.
    """
    from safetensors.torch import save_file

    try:
        text = json.dumps(config, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the adapter settings cannot be written as JSON ({exc}); nothing was written") from exc
    path = os.path.abspath(os.fspath(path))
    _check_target(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    with _folder_lock(parent, name):
        _check_target(path)  # again: another process may have changed it while this one waited
        new_folder = not os.path.exists(path)
        work = os.path.join(parent if new_folder else path, _hidden_name(name, f".tmp-{uuid.uuid4().hex}"))
        os.mkdir(work)
        try:
            save_file(_unshared(tensors), os.path.join(work, WEIGHTS_NAME))
            with open(os.path.join(work, CONFIG_NAME), "w") as f:
                f.write(text)
            for file in (WEIGHTS_NAME, CONFIG_NAME):
                _fsync(os.path.join(work, file))
            if new_folder:
                os.rename(work, path)
            else:
                for file in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(os.path.join(work, file), os.path.join(path, file))
                os.rmdir(work)
            _fsync(parent if new_folder else path)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def _check_target(path):
    """Refuse, naming ``path``, a save target that is a file or a link to nothing."""
    if os.path.islink(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: create "
                                "that folder, or remove the link; nothing was written")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder; nothing was written")


def _hidden_name(name, suffix):
    """A hidden file name beside or inside the folder ``name``: its first characters, then ``suffix``, so
    that it stays within the 255 characters a file name may have whatever the folder's name."""
    return f".{name[:100]}{suffix}"


@contextlib.contextmanager
def _folder_lock(parent, name):
    """Hold an exclusive lock on saving to the folder ``name`` in ``parent``: a lock file beside it, locked
    with flock (released by the system if the process dies) and removed on release. A writer that waited
    on a lock file removed meanwhile locks the new one instead. (Without fcntl, as on Windows, no lock.)"""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    lock = os.path.join(parent, _hidden_name(name, ".lock"))
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except PermissionError as exc:
            raise PermissionError(f"cannot create the lock file {lock} that saves to {os.path.join(parent, name)} "
                                  f"take turns on ({exc.strerror}): make {parent} writable; nothing was written"
                                  ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:  # removed by the writer that held it
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)  # before unlocking: a writer that locks it afterwards sees it gone and retries
        os.close(fd)


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
    _refuse_peft_model(model)
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
    config = _read_json(model_config)
    record = config.get(CONFIG_RECORD)
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
    # transformers saves some models under their checkpoint names (Mixtral's mlp as block_sparse_moe): the adapter
    # tensors too, so each saved key is read under the model's own name.
    renamings = checkpoint_renamings(config.get("model_type"))
    renamed = {key: model_key(key, renamings) for key in files}
    wanted |= {key: key for key in renamed.values() if _inside_any(key, record["modules_to_save"])}
    tensors = {}
    for file in sorted({files[key] for key in files if renamed[key] in wanted}):
        with _reading(file), safe_open(file, "pt") as f:
            tensors.update({wanted[renamed[key]]: f.get_tensor(key) for key in f.keys() if renamed[key] in wanted})
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
