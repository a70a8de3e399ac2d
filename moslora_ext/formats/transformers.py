"""Adapters saved inside a transformers checkpoint (``model.save_pretrained`` of a model with adapters):
the config's record of them and their tensors among the model's."""

import os

from ..model.adapters import CONFIG_RECORD, FORMAT
from ..model.checkpoint_names import checkpoint_renamings, model_key
from ..model.targets import inside_any
from .files import CONFIG_NAME, read_json, reading
from .loading import ADAPTER_TENSORS


def read_transformers_checkpoint(path, adapter_name):
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
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map object")
        files = {key: os.path.join(path, file) for key, file in weight_map.items()}
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        single = os.path.join(path, "model.safetensors")
        with reading(single), safe_open(single, "pt") as f:
            files = dict.fromkeys(f.keys(), single)
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index.json "
                                "(save with safe_serialization, the default)")
    config = read_json(model_config)
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
    wanted |= {key: key for key in renamed.values() if inside_any(key, record["modules_to_save"])}
    tensors = {}
    for file in sorted({files[key] for key in files if renamed[key] in wanted}):
        with reading(file), safe_open(file, "pt") as f:
            tensors.update({wanted[renamed[key]]: f.get_tensor(key) for key in f.keys() if renamed[key] in wanted})
    return {"format": FORMAT, "layers": layers, "modules_to_save": record["modules_to_save"]}, tensors
