"""Saving and loading adapters: this library's folders (``save_adapter``,
``load_adapter``, which also reads transformers checkpoints, see
``moslora_ext.formats.transformers``). What every format shares lives
beside it: all-or-nothing writing and checked reading in
``moslora_ext.formats.files``, the all-or-nothing load in
``moslora_ext.formats.loading``; PEFT's format is in
``moslora_ext.formats.peft_lora``.

    moslora_ext.save_adapter(model, "my-adapter")          # adapter tensors + JSON config
    moslora_ext.load_adapter(fresh_model, "my-adapter")    # adds the adapters and loads them
"""

import dataclasses
import os
import re

from ..layers.base import DEFAULT_ADAPTER, AdapterConfig, check_adapter_name
from ..model.adapters import FORMAT, layers_holding, refuse_peft_model, saved_modules
from ..model.targets import matching_names
from ..peft import folder as peft_folder
from ..peft.folder import FUNCTIONAL_PEFT_TYPE, MOSLORA_PEFT_TYPE, RECORD_FIELD
from .files import CONFIG_NAME, WEIGHTS_NAME, check_folder, read_json, read_tensors, write_folder
from .loading import (
    ADAPTER_TENSORS,
    adapter_targets_of,
    folder_settings,
    load_all_or_nothing,
    names_list,
    unmerged_adapters,
)
from .peft_lora import (
    FROM_PEFT_NAMES,
    PEFT_PREFIX,
    load_peft_adapter,
    module_tensors,
    most_common,
    pattern_settings,
    saved_module_tensors,
    split_targets,
    target_modules_of,
)
from .peft_lora import folder_config as peft_folder_config
from .transformers import read_transformers_checkpoint


# The settings of an adapter that one MoSLoRAConfig holds once for all its layers (r and lora_alpha have
# rank_pattern and alpha_pattern).
SHARED_SETTINGS = ("lora_dropout", "use_rslora", "mixer_init", "train_mixer", "braid_subspaces")


def adapter_state_dict(model, adapter_name=DEFAULT_ADAPTER):
    """The tensors ``save_adapter`` saves, keyed as the PEFT route saves
    them: ``base_model.model.<layer>.lora_A.weight``, ``.lora_mixer.weight``
    and ``.lora_B.weight`` (``lora_embedding_A`` / ``lora_embedding_B`` for
    embeddings); for a fused expert parameter ``<experts>.<parameter>``,
    whose tensors are stacked per expert, ``base_model.model.<experts>.
    <parameter>.lora_A`` etc. in this library's layout; and the state of
    every module to save, ``base_model.model.<module>.<name>``."""
    layers = layers_holding(model, adapter_name)
    tensors = {}
    for target, adapter in adapter_targets_of(model, adapter_name, layers).items():
        if target in layers:
            tensors.update(module_tensors(target, layers[target], adapter, with_mixer=True))
        else:
            tensors.update({f"{PEFT_PREFIX}{target}.{t}": getattr(adapter, t) for t in ADAPTER_TENSORS})
    return tensors | saved_module_tensors(model)


def not_for_peft(model, adapters, experts, as_parameters, modules):
    """Why no one ``MoSLoRAConfig`` computes the adapters {target: Adapter}
    as they are (a list of reasons, empty when one does), given their layers
    as ``split_targets`` splits them and the ``modules`` that target_modules
    must select."""
    reasons = [f"{name} holds adapters on fused expert parameters" for name in experts]
    reasons += [f"{name} is a router or a layer that PEFT remaps to experts (a target_parameters adapter)"
                for name in as_parameters]
    for setting in SHARED_SETTINGS:
        values = {getattr(adapter.config, setting) for adapter in adapters.values()}
        if len(values) > 1:
            reasons.append(f"the layers differ in {setting} ({sorted(values)}), which a MoSLoRAConfig holds once")
    if modules and set(matching_names(model, target_modules_of(model, modules))) != set(modules):
        reasons.append("no target_modules selects exactly the adapted layers")
    return reasons


def folder_config(model, layers, adapters):
    """What ``save_adapter`` writes to adapter_config.json: a MoSLoRAConfig's
    fields (peft_type "MOSLORA", or ``FUNCTIONAL_PEFT_TYPE`` where no
    MoSLoRAConfig computes the adapters as they are, see ``save_adapter``),
    and in its ``RECORD_FIELD`` record each layer's settings, the modules
    to save, this library's format and the reasons it is not a MOSLORA
    folder, if any."""
    experts, linear, as_parameters = split_targets(model, layers)
    modules = {name: layer for name, layer in linear.items() if name not in as_parameters}
    reasons = not_for_peft(model, adapters, experts, as_parameters, modules)
    shared = {s: most_common(getattr(a.config, s) for a in adapters.values()) for s in SHARED_SETTINGS}
    record = {**peft_folder.record(), "format": FORMAT, "layers": {t: dataclasses.asdict(a.config)
                                                                  for t, a in adapters.items()},
              "modules_to_save": list(saved_modules(model)), "not_for_peft": reasons}
    return {"peft_type": FUNCTIONAL_PEFT_TYPE if reasons else MOSLORA_PEFT_TYPE,
            **peft_folder_config(model, layers, modules), **shared, **pattern_settings(adapters),
            "target_parameters": None, RECORD_FIELD: record}


def save_adapter(model, path, adapter_name=DEFAULT_ADAPTER):
    """Save the adapter ``adapter_name`` of ``model`` (one adapter per
    folder, as PEFT) to the folder ``path`` in the PEFT route's format, which
    ``PeftModel.from_pretrained`` (after ``import moslora_ext``) and
    ``load_adapter`` both read: ``adapter_model.safetensors`` (see
    ``adapter_state_dict``) and ``adapter_config.json``, a MoSLoRAConfig
    (peft_type "MOSLORA"; r and lora_alpha as their most common values with
    ``rank_pattern`` / ``alpha_pattern`` for the layers that differ) whose
    record field (``moslora_ext.peft.folder.RECORD_FIELD``) also keeps each
    layer's own settings (autocast_adapter_dtype included) and the modules
    to save, which ``load_adapter`` restores exactly.

    A folder that PEFT would load computing something else is never written
    as a MOSLORA folder: where no one MoSLoRAConfig holds the adapter as it
    is (adapters on fused expert parameters or routers, whose layout on the
    PEFT route differs; layers that differ in lora_dropout, use_rslora,
    mixer_init, train_mixer or braid_subspaces; adapted layers that no
    target_modules selects exactly), the folder is the same but says
    ``"peft_type": FUNCTIONAL_PEFT_TYPE``, which PEFT's loaders refuse naming
    ``load_adapter``, and its record lists the reasons. Only the adapter is
    saved, not the base: an adapter of a quantized base loads in PEFT onto
    the same quantized base (torchao bases, which the PEFT route refuses,
    with load_adapter only). autocast_adapter_dtype is not a config field in
    PEFT: pass it to ``PeftModel.from_pretrained``. Refuses a merged model,
    whose adapters are also in the base weights."""
    layers = unmerged_adapters(model, "save_adapter", adapter_name)
    adapters = adapter_targets_of(model, adapter_name, layers)
    write_folder(path, adapter_state_dict(model, adapter_name), folder_config(model, layers, adapters))


def load_adapter(model, path, adapter_name=DEFAULT_ADAPTER, replace=False):
    """Load into ``model`` as ``adapter_name`` an adapter saved by
    ``save_adapter`` (also by its older versions, whose adapter_config.json
    says ``"format": "moslora_ext"`` and whose tensors are keyed
    ``<layer>.lora_A`` etc.), a MoSLoRA adapter saved by the PEFT route
    (``save_pretrained`` of a PeftModel with a ``MoSLoRAConfig``: read as
    ``load_peft_adapter`` reads it), or the adapter ``adapter_name`` of a
    transformers
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
    check_folder(path)
    check_adapter_name(adapter_name)
    refuse_peft_model(model)
    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        config, tensors = read_transformers_checkpoint(path, adapter_name)
        return _load_saved(model, path, config, tensors, adapter_name, replace)
    config = read_json(os.path.join(path, CONFIG_NAME))
    record = config.get(RECORD_FIELD)
    if isinstance(record, dict) and record.get("format") == FORMAT:  # save_adapter's folder
        tensors = read_tensors(os.path.join(path, WEIGHTS_NAME))
        return _load_saved(model, path, record, peft_keyed(tensors, record.get("layers")), adapter_name, replace)
    if config.get("format") == FORMAT:  # a folder of save_adapter before it wrote the PEFT route's format
        return _load_saved(model, path, config, None, adapter_name, replace)
    if config.get("peft_type") == MOSLORA_PEFT_TYPE:  # the PEFT route's folder
        return load_peft_adapter(model, path, adapter_name, replace)
    raise ValueError(f"{path} is not a moslora_ext adapter (format {config.get('format')!r}, peft_type "
                     f"{config.get('peft_type')!r}); for PEFT LoRA or released MoSLoRA checkpoints use "
                     "load_peft_adapter")


def peft_keyed(tensors, layers):
    """The tensors of a ``save_adapter`` folder under this library's names: ``<layer>.lora_A`` etc. for the
    adapter tensors of the layers ``layers``, the modules' state without PEFT's prefix."""
    pattern = re.compile(rf"(.+)\.({'|'.join(FROM_PEFT_NAMES)})(?:\.weight)?")
    renamed = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = pattern.fullmatch(name)
        if match and isinstance(layers, dict) and match.group(1) in layers:
            name = f"{match.group(1)}.{FROM_PEFT_NAMES[match.group(2)]}"
        renamed[name] = tensor
    return renamed


def _load_saved(model, path, config, tensors, adapter_name, replace):
    """Load the adapter whose per-layer settings and modules to save ``config`` holds (``"layers"``,
    ``"modules_to_save"``), with the ``tensors`` under this library's names (None: read them from the folder
    once the settings are checked)."""
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
        settings[name] = folder_settings(path, f"layer {name}", **layer_config)
    modules_to_save = names_list(path, config.get("modules_to_save", []))
    if tensors is None:
        tensors = read_tensors(os.path.join(path, WEIGHTS_NAME))
    load_all_or_nothing(model, settings, tensors, str(path), modules_to_save, adapter_name, replace)
    return model
