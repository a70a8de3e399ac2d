"""PEFT's layout of LoRA on fused expert parameters (``LoraConfig(target_parameters=...)``,
PEFT's ``lora.ParamWrapper``), read and written by ``moslora_ext.formats.peft_lora``.

PEFT wraps each targeted parameter of a module in one ``ParamWrapper``,
nesting them in the parameters' registration order (the last one outermost),
so the keys of the experts module ``m`` are ``m.lora_A.weight`` for its last
adapted parameter (``down_proj``), ``m.base_layer.lora_A.weight`` for the one
before (``gate_up_proj``), and so on. Per parameter of E experts and rank r:

- ``lora_A.weight`` (E·r, in): expert e's A_e (r, in) is rows e·r … e·r + r - 1;
- ``lora_B.weight`` (out, r·E): expert e's B_e (out, r) is columns e, E + e, …
  (the expert index runs fastest, ``reshape(out, r, E)``), ΔW_e = s·B_e A_e.

That is the layout of PEFT ≥ 0.19.1 (huggingface/peft#3165), which reads
"in" and "out" of an (E, out, in) parameter (Mixtral, Qwen3-MoE, OLMoE,
DeepSeek-V3) as ``nn.Linear`` does. Earlier PEFT read every 3-D parameter as
(E, in, out): its lora_A was (E·r, out) and lora_B (in, r·E), with
ΔW_e = (B_e A_e)ᵀ. Both layouts are read (told apart by their shapes, or by
the config's ``peft_version`` where the shapes are square); the current one
is written. (E, in, out) parameters (GPT-OSS, ``is_transposed``) have the
same layout in both.
"""

import re

from ..layers.expert_layout import folded_B, peft_from_stacked, stacked_from_peft
from ..layers.experts import Experts, expert_parameters, is_fused_experts
from ..model.targets import names_match

CURRENT_LAYOUT_SINCE = (0, 19, 1)  # the first PEFT release with the current layout
# The leaf names that PEFT's conversion of transformers-v4 MoE configs
# (peft.utils.transformers_weight_conversion) remaps, in target_modules, to the
# routed experts' fused parameters on model types that transformers converts.
PEFT_REMAPPED_LEAF_NAMES = ("gate", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")


def targeted(name, target_parameters):
    """Whether PEFT's ``target_parameters`` select the parameter ``name``."""
    return any(names_match(name, t) for t in target_parameters or ())


def pattern_key(modules, name, target_parameters):
    """The name PEFT matches rank_pattern / alpha_pattern against for our
    target ``name``: ``<module>.<parameter>`` for a parameter PEFT wraps
    (``target_parameters``: fused expert parameters, router weights), the
    module's name for a ``target_modules`` layer."""
    if name not in modules:  # <experts>.<parameter>
        return name
    return f"{name}.weight" if targeted(f"{name}.weight", target_parameters) else name


def pattern_value(patterns, key, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key) for ``key``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def patterns(values, default):
    """PEFT's pattern dict {anchored PEFT key: value} for the targets {PEFT key: value} whose value is not
    ``default``. PEFT matches a pattern at the end of a module's name (``(.*\.)?(pattern)$``), so an unanchored
    ``b`` would also give its value to ``a.b``: ``^`` keeps each value on its own target."""
    return {"^" + re.escape(key): value for key, value in values.items() if value != default}


def nesting_prefix(name, parameter, adapted):
    """The key prefix of ``parameter``'s ParamWrapper on the module ``name``
    whose adapted parameters are ``adapted`` (in registration order)."""
    return name + ".base_layer" * (len(adapted) - 1 - adapted.index(parameter))


def peft_tensors(key_prefix, name, adapter, module):
    """PEFT's keys and tensors of the ``ExpertsAdapter`` ``adapter`` of the experts layer ``module`` named ``name``."""
    adapted = [p for p in expert_parameters(module) if p in adapter]  # PEFT's nesting order
    tensors = {}
    for parameter in adapted:
        prefix = key_prefix + nesting_prefix(name, parameter, adapted)
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = to_peft(adapter[parameter])
    return tensors


def resolve_key_module(modules, name, target_parameters, source):
    """Our target name for the module part ``name`` of a PEFT key: a module
    (a router's, for its ``weight``), or ``<experts>.<parameter>`` for a
    nested ParamWrapper on an experts module. Refuses nestings on other modules."""
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name.removesuffix(".base_layer"), depth + 1
    module = modules.get(name)
    if module is not None and (isinstance(module, Experts) or is_fused_experts(module)):
        wrapped = [p for p in expert_parameters(module) if targeted(f"{name}.{p}", target_parameters)]
        if depth >= len(wrapped):
            raise ValueError(f"{source}: a key of {name}{'.base_layer' * depth} names the ParamWrapper at depth "
                             f"{depth}, but target_parameters select only {wrapped} of {name}")
        return f"{name}.{wrapped[len(wrapped) - 1 - depth]}"
    if depth:
        raise ValueError(f"{source}: {name}{'.base_layer' * depth} is a nested PEFT ParamWrapper on {name}, which is "
                         "not a transformers experts module with fused parameters")
    return name


def to_peft(adapter):
    """(lora_A.weight, lora_B.weight) in PEFT's current layout for an expert
    adapter with stacked factors, the mixer folded into B (B_e M_e, computed
    in fp32 and rounded once to B's dtype)."""
    return peft_from_stacked(adapter.lora_A, folded_B(adapter.lora_B, adapter.lora_mixer))


def _older_than_current(peft_version):
    numbers = tuple(int(part) for part in re.findall(r"\d+", peft_version or "")[:3])
    return bool(numbers) and numbers < CURRENT_LAYOUT_SINCE


def from_peft(lora_A, lora_B, shapes, transposed, peft_version, source, target):
    """(A (E, r, in), B (E, out, r)) of PEFT's lora_A.weight and
    lora_B.weight for a target with factor ``shapes`` (see
    ``Experts.factor_shapes_of``), in either of PEFT's layouts."""
    count, r, in_features = shapes["lora_A"]
    out_features = shapes["lora_B"][1]
    got = (tuple(lora_A.shape), tuple(lora_B.shape))
    current = ((count * r, in_features), (out_features, r * count))
    earlier = ((count * r, out_features), (in_features, r * count))
    old_layout = not transposed and got == earlier and (got != current or _older_than_current(peft_version))
    if got != current and not old_layout:
        raise ValueError(f"{source}: {target} has lora_A {got[0]} and lora_B {got[1]}, but {count} experts of rank "
                         f"{r} on (out, in) = ({out_features}, {in_features}) need {current[0]} and {current[1]}")
    if old_layout:
        return (lora_B.reshape(in_features, r, count).permute(2, 1, 0).contiguous(),
                lora_A.reshape(count, r, out_features).transpose(1, 2).contiguous())
    return tuple(t.contiguous() for t in stacked_from_peft(lora_A, lora_B, count))


def remapped_by_peft(model, name):
    """Whether PEFT, loading an adapter for ``model``, would remap a
    target_modules entry for the linear layer ``name`` to routed-expert
    parameters (DeepSeek-V3's dense MLP and shared experts are named like
    the experts of the v4 checkpoints that PEFT converts)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or name.rsplit(".", 1)[-1] not in PEFT_REMAPPED_LEAF_NAMES:
        return False
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return get_checkpoint_conversion_mapping(model_type) is not None
