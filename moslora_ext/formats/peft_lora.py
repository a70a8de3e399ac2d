"""PEFT's LoRA format: ``save_peft_adapter`` writes a standard PEFT LoRA adapter
(the mixer folded into B) for PEFT and serving engines; ``load_peft_adapter``
reads PEFT's LoRA adapters, this library's PEFT-route (MoSLoRAConfig) folders
and the released MoSLoRA code's checkpoints. Both share the checks and the
all-or-nothing writing and loading of ``moslora_ext.formats.files`` and
``moslora_ext.formats.loading``."""

import dataclasses
import os
import re
import warnings

import torch

from ..layers.base import DEFAULT_ADAPTER, check_adapter_name, class_path
from ..layers.dispatch import adapter_class
from ..layers.expert_layout import folded_B
from ..layers.experts import Experts
from ..layers.linear import Linear
from ..layers.routers import RouterWeight
from ..model.adapters import FORMAT, refuse_peft_model, saved_modules
from ..model.targets import inside_any, matching_names, split_target
from ..peft.folder import MOSLORA_PEFT_TYPE, RECORD_FIELD, RELEASED_MIXER_NAME
from . import engines
from . import peft_lora_experts as peft_experts
from .files import CONFIG_NAME, WEIGHTS_NAME, check_folder, read_json, read_tensors, write_folder
from .loading import (
    BASE_WEIGHT,
    adapter_targets_of,
    factor_shapes,
    folder_settings,
    load_all_or_nothing,
    module_state,
    names_list,
    unmerged_adapters,
)

PEFT_PREFIX = "base_model.model."  # what PEFT's PeftModel puts before the base model's names
# PEFT's tensor names (and the released MoSLoRA code's lora_AB, the mixer) -> ours.
FROM_PEFT_NAMES = {"lora_A": "lora_A", "lora_embedding_A": "lora_A", RELEASED_MIXER_NAME: "lora_mixer",
                   "lora_mixer": "lora_mixer",  # moslora_ext.MoSLoRAConfig's folders
                   "lora_B": "lora_B", "lora_embedding_B": "lora_B"}


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
    ``ParamWrapper`` layout, see ``moslora_ext.formats.peft_lora_experts``; and linear
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
    entries (anchored full names) for the targets that differ. Refuses a
    merged model.

    ``engine="vllm"`` also refuses (ValueError, naming each setting, nothing
    written) an adapter that vLLM would not load: see ``moslora_ext.formats.engines``.
    Serve it with ``max_lora_rank`` at least r, one of 1, 8, 16, 32, ...
    (``moslora_ext.formats.engines.vllm_max_lora_rank(r)``).
    """
    layers = unmerged_adapters(model, "save_peft_adapter", adapter_name)
    adapters = adapter_targets_of(model, adapter_name, layers)
    shared = _shared_settings(adapters)
    experts, linear, as_parameters = split_targets(model, layers)
    target_parameters = [f"{name}.weight" for name in as_parameters]
    modules = {name: layer for name, layer in linear.items() if name not in as_parameters}
    tensors = {}
    with torch.no_grad():
        for name, layer in linear.items():
            tensors.update(module_tensors(name, layer, adapters[name], with_mixer=False))
        for name, layer in experts.items():
            tensors.update(peft_experts.peft_tensors(PEFT_PREFIX, name, layer.adapters[adapter_name], layer))
            target_parameters += [f"{name}.{parameter}" for parameter in layer.adapters[adapter_name]]
    if target_parameters and shared["lora_dropout"]:
        _warn_no_dropout(shared)
    tensors.update(saved_module_tensors(model))
    config = {"peft_type": "LORA", **folder_config(model, layers, modules), **shared,
              "target_parameters": sorted(target_parameters) or None,
              **pattern_settings(adapters, lambda t: f"{t}.weight" if t in as_parameters else t)}
    if engine is not None:
        reasons = engines.refusals(engine, config, layers)
        if reasons:
            raise ValueError(f"{engine} would not load this adapter: {'; '.join(reasons)}")
    write_folder(path, tensors, config)


def _warn_no_dropout(shared):
    """PEFT's target_parameters wrapper refuses dropout: lora_dropout is written as 0, with a warning."""
    warnings.warn(f"save_peft_adapter writes lora_dropout 0 (the adapters were trained with "
                  f"{shared['lora_dropout']}): PEFT's target_parameters wrapper refuses dropout; it changes no "
                  "output, only further training with PEFT", stacklevel=3)
    shared["lora_dropout"] = 0.0


def _shared_settings(adapters):
    """The settings a PEFT LoRA adapter holds once (``PEFT_SHARED_SETTINGS``) of the adapters {target: Adapter};
    ValueError if they differ in one."""
    shared = {}
    for setting in PEFT_SHARED_SETTINGS:
        values = {getattr(adapter.config, setting) for adapter in adapters.values()}
        if len(values) > 1:
            raise ValueError(f"a PEFT LoRA adapter has one {setting} for all layers, but the adapted layers "
                             f"have {sorted(values)}")
        shared[setting] = values.pop()
    return shared


def split_targets(model, layers):
    """The adapted layers {name: layer} as PEFT holds them: (experts layers, the other layers, the names of
    those of them that PEFT adapts as 2-D ``target_parameters``: routers, and linear layers that PEFT would
    remap to routed experts)."""
    experts = {name: layer for name, layer in layers.items() if isinstance(layer, Experts)}
    linear = {name: layer for name, layer in layers.items() if name not in experts}
    as_parameters = [name for name, layer in linear.items()
                     if isinstance(layer, RouterWeight) or peft_experts.remapped_by_peft(model, name)]
    return experts, linear, as_parameters


def target_modules_of(model, modules):
    """PEFT's target_modules for the adapted modules ``modules``: the last names where these select exactly
    them, else their full names ([] rather than None when there are none: for None PEFT puts in its
    default targets)."""
    target_modules = sorted({name.rsplit(".", 1)[-1] for name in modules})
    if modules and set(matching_names(model, target_modules)) != set(modules):
        target_modules = sorted(modules)  # the names' ends select other modules too: full names
    return target_modules


def module_tensors(name, layer, adapter, with_mixer):
    """PEFT's keys and tensors of the adapter ``adapter`` of the layer ``name``: lora_A, lora_B and, with
    ``with_mixer``, the mixer as the PEFT route saves it (``lora_mixer.weight``); without, the mixer folded
    into B (``B M``, computed in fp32, rounded once to B's dtype)."""
    peft_names, B = layer.peft_names, adapter.lora_B
    tensors = {f"{PEFT_PREFIX}{name}.{peft_names['lora_A']}": adapter.lora_A}
    if with_mixer:
        tensors[f"{PEFT_PREFIX}{name}.lora_mixer.weight"] = adapter.lora_mixer
    else:
        B = folded_B(B.flatten(1), adapter.lora_mixer).view_as(B)
    tensors[f"{PEFT_PREFIX}{name}.{peft_names['lora_B']}"] = B
    return tensors


def saved_module_tensors(model):
    """The state of the modules to save, keyed as PEFT writes it."""
    return {PEFT_PREFIX + key: t for key, t in module_state(saved_modules(model)).items()}


def pattern_settings(adapters, key_of=str):
    """r and lora_alpha of the adapters {target: Adapter}: their most common values, and ``rank_pattern`` /
    ``alpha_pattern`` entries (anchored PEFT keys, ``key_of(target)``) for the targets that differ."""
    config = {}
    for setting, pattern in PEFT_PATTERN_SETTINGS.items():
        values = {key_of(t): getattr(a.config, setting) for t, a in adapters.items()}
        config[setting] = most_common(values.values())
        config[pattern] = peft_experts.patterns(values, config[setting])
    return config


def most_common(values):
    """The most common of ``values`` (the smallest of the most common)."""
    values = list(values)
    return max(sorted(set(values)), key=values.count)


def folder_config(model, layers, modules):
    """What a PEFT adapter_config.json says of the model and its adapted ``modules`` beside the adapter's
    settings."""
    base_model = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return {"task_type": None, "base_model_name_or_path": base_model,
            "target_modules": target_modules_of(model, modules),
            "modules_to_save": list(saved_modules(model)) or None,
            "bias": "none", "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
            "use_dora": False, "init_lora_weights": True, "inference_mode": True}


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
    ``moslora_ext.formats.peft_lora_experts``); ``rank_pattern`` and ``alpha_pattern``
    are applied as PEFT applies them. Router weights adapted through
    ``target_parameters`` (``mlp.gate.weight``) go to router adapters
    (``moslora_ext.layers.routers``). A LoRA adapter gets
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
    "MOSLORA", ``lora_mixer`` tensors), whose mixer_init (and braid_subspaces) and train_mixer are kept; a
    layer without its ``lora_mixer`` there is refused (ValueError, naming it).
    """
    check_folder(path)
    check_adapter_name(adapter_name)
    refuse_peft_model(model)
    peft_config, weights = _peft_folder(path)
    # Settings the config leaves out take PEFT's LoraConfig defaults, as PEFT's own loading does.
    shared = folder_settings(path, "the adapter", r=peft_config.get("r", 8), lora_alpha=peft_config.get("lora_alpha", 8),
                       lora_dropout=peft_config.get("lora_dropout", 0.0),
                       use_rslora=peft_config.get("use_rslora", False), autocast_adapter_dtype=autocast_adapter_dtype)
    modules_to_save = names_list(path, peft_config.get("modules_to_save"))
    by_layer, tensors, to_save, base_weights = _sorted_keys(model, weights, modules_to_save)
    modules = dict(model.named_modules())
    target_parameters = peft_config.get("target_parameters")
    settings = {}
    for key_module, parts in by_layer.items():
        name = peft_experts.resolve_key_module(modules, key_module, target_parameters, str(path))
        settings[name] = _layer_settings(modules, name, parts, peft_config, shared, path, weights)
        tensors.update(_layer_tensors(modules, name, parts, settings[name].r, peft_config, path))
    if not settings:
        raise ValueError(f"{weights} holds no adapter tensors")
    load_all_or_nothing(model, settings, tensors, str(path), sorted(to_save), adapter_name, replace, base_weights)
    return model


def _peft_folder(path):
    """(adapter_config.json, the weights file) of a PEFT folder, refusing what this library does not read."""
    peft_config = read_json(os.path.join(path, CONFIG_NAME))
    record = peft_config.get(RECORD_FIELD)
    if FORMAT in (peft_config.get("format"), isinstance(record, dict) and record.get("format")):
        raise ValueError(f"{path} is a moslora_ext adapter folder (written by save_adapter), not a PEFT one; "
                         "load it with moslora_ext.load_adapter")
    unsupported = {key: peft_config[key] for key in ("use_dora",) if peft_config.get(key)}
    if peft_config.get("bias", "none") != "none":
        unsupported["bias"] = peft_config["bias"]
    if unsupported:
        raise ValueError(f"{path}: PEFT settings not supported by moslora_ext: {unsupported}")
    files = [os.path.join(path, name) for name in (WEIGHTS_NAME, "adapter_model.bin")]
    weights = next((f for f in files if os.path.exists(f)), None)
    if weights is None:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor adapter_model.bin")
    return peft_config, weights


def _sorted_keys(model, weights, modules_to_save):
    """The tensors of the file ``weights`` sorted: ({layer: {our tensor name: tensor}}, {key: tensor} of the
    modules to save, their names, {layer: base weight})."""
    key_pattern = re.compile(rf"(.+)\.({'|'.join(FROM_PEFT_NAMES)})(?:\.default)?(?:\.weight)?")
    save_candidates = matching_names(model, modules_to_save) if modules_to_save else []
    by_layer, tensors, to_save, base_weights = {}, {}, set(), {}
    for key, tensor in read_tensors(weights).items():
        name = key.removeprefix(PEFT_PREFIX)
        match = key_pattern.fullmatch(name)
        module_to_save = inside_any(name, save_candidates)
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
    return by_layer, tensors, to_save, base_weights


def _layer_settings(modules, name, parts, peft_config, shared, path, weights):
    """The settings of the layer ``name`` from the config (``rank_pattern``, ``alpha_pattern``; a mixer's
    settings where it has one, else an identity, frozen mixer)."""
    target_parameters = peft_config.get("target_parameters")
    key = peft_experts.pattern_key(modules, name, target_parameters)
    if key != name and adapter_class(modules[name]) not in (Linear, RouterWeight):
        raise ValueError(f"{path}: target_parameters adapts {key}, the weight of a {class_path(modules[name])}; "
                         "load_peft_adapter reads the target_parameters adapters of fused expert parameters, "
                         "router weights and nn.Linear weights (PEFT's wrapper of another module's weight "
                         "adapts the stored tensor as a matrix, which this library's layer of that module does "
                         "not do)")
    r = peft_experts.pattern_value(peft_config.get("rank_pattern"), key, shared.r)
    alpha = peft_experts.pattern_value(peft_config.get("alpha_pattern"), key, shared.lora_alpha)
    has_mixer = "lora_mixer" in parts
    if not has_mixer and peft_config.get("peft_type") == MOSLORA_PEFT_TYPE:
        raise ValueError(f"{weights}: layer {name} has no lora_mixer tensor, but a MOSLORA folder (a "
                         "MoSLoRAConfig adapter's save_pretrained) holds one for every layer: the file is "
                         "incomplete or corrupt")
    # A trained mixer: a MoSLoRAConfig folder says how it started and whether it trains.
    mixer = ({"mixer_init": peft_config.get("mixer_init", "kaiming"), "train_mixer": peft_config.get("train_mixer",
             True), "braid_subspaces": peft_config.get("braid_subspaces", 2)} if has_mixer
             else {"mixer_init": "identity", "train_mixer": False})
    return folder_settings(path, f"layer {name}", **{
        **dataclasses.asdict(shared), "r": r, "lora_alpha": alpha,
        **mixer})


def _layer_tensors(modules, name, parts, r, peft_config, path):
    """The tensors {"<layer>.lora_A": ...} of the layer ``name`` from its PEFT tensors ``parts`` (PEFT's
    ParamWrapper layout turned into this library's; an identity mixer where there is none)."""
    module_name, parameter = split_target(modules, name)
    if parameter is not None and "lora_A" in parts and "lora_B" in parts:  # PEFT's ParamWrapper layout
        shapes = factor_shapes(modules[module_name], parameter, r)
        parts["lora_A"], parts["lora_B"] = peft_experts.from_peft(
            parts["lora_A"], parts["lora_B"], shapes, modules[module_name].is_transposed,
            peft_config.get("peft_version"), str(path), name)
        parts.setdefault("lora_mixer", torch.eye(r).expand(shapes["lora_mixer"]))
    parts.setdefault("lora_mixer", torch.eye(r))
    return {f"{name}.{t}": tensor for t, tensor in parts.items()}
