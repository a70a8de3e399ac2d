"""Saving and loading adapters: this library's folders and transformers
checkpoints, and what every format shares (all-or-nothing writing, checked
reading, the all-or-nothing load); PEFT's format is in
``moslora_ext.formats.peft_lora``.

    moslora_ext.save_adapter(model, "my-adapter")          # adapter tensors + JSON config
    moslora_ext.load_adapter(fresh_model, "my-adapter")    # adds the adapters and loads them
"""

import dataclasses
import os

from ..layers.base import DEFAULT_ADAPTER, AdapterConfig, check_adapter_name
from ..model.adapters import FORMAT, layer_settings, refuse_peft_model, saved_modules
from ..peft.folder import FUNCTIONAL_PEFT_TYPE
from .files import CONFIG_NAME, WEIGHTS_NAME, check_folder, read_json, read_tensors, write_folder
from .loading import (
    ADAPTER_TENSORS,
    adapter_targets_of,
    folder_settings,
    load_all_or_nothing,
    module_state,
    names_list,
    unmerged_adapters,
)
from .transformers import read_transformers_checkpoint


def _adapter_config(model, adapter_name):
    """What ``save_adapter`` writes to adapter_config.json: the settings of
    each layer's adapter ``adapter_name``, the names of the modules to save,
    this library's version and a ``peft_type`` that PEFT's loaders refuse by
    name."""
    from .._version import __version__

    # peft_type: PEFT's loaders, given this folder, name load_adapter (moslora_ext.peft_folder).
    return {"format": FORMAT, "peft_type": FUNCTIONAL_PEFT_TYPE, "version": __version__,
            "layers": layer_settings(model, adapter_name),
            "modules_to_save": list(saved_modules(model))}


def adapter_state_dict(model, adapter_name=DEFAULT_ADAPTER):
    """The tensors ``save_adapter`` saves: those of each layer's adapter
    ``adapter_name``, keyed ``"<layer>.lora_A"``, ``"<layer>.lora_mixer"``,
    ``"<layer>.lora_B"`` (``<layer>`` is ``<experts>.<parameter>`` for a
    fused expert parameter, whose tensors are stacked per expert), and the
    state of every module to save, keyed as in ``model.state_dict()``."""
    tensors = {f"{target}.{t}": getattr(adapter, t) for target, adapter in adapter_targets_of(model, adapter_name).items()
               for t in ADAPTER_TENSORS}
    return tensors | module_state(saved_modules(model))


def save_adapter(model, path, adapter_name=DEFAULT_ADAPTER):
    """Save the adapter ``adapter_name`` of ``model`` (one adapter per
    folder, as PEFT) to the folder ``path``: ``adapter_model.safetensors``
    (its tensors, keyed ``<layer>.lora_A`` etc.) and ``adapter_config.json``
    (each layer's settings, the names of the modules to save and this
    library's version). Refuses a merged model, whose adapters are also in
    the base weights."""
    unmerged_adapters(model, "save_adapter", adapter_name)
    write_folder(path, adapter_state_dict(model, adapter_name), _adapter_config(model, adapter_name))


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
    check_folder(path)
    check_adapter_name(adapter_name)
    refuse_peft_model(model)
    if os.path.exists(os.path.join(path, CONFIG_NAME)):
        config = read_json(os.path.join(path, CONFIG_NAME))
        tensors = None  # read once the config is checked
    else:
        config, tensors = read_transformers_checkpoint(path, adapter_name)
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
        settings[name] = folder_settings(path, f"layer {name}", **layer_config)
    modules_to_save = names_list(path, config.get("modules_to_save", []))
    if tensors is None:
        tensors = read_tensors(os.path.join(path, WEIGHTS_NAME))
    load_all_or_nothing(model, settings, tensors, str(path), modules_to_save, adapter_name, replace)
    return model


