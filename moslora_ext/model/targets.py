"""Which modules and parameters of a model get adapters: PEFT's ``target_modules`` (names, regexes,
"all-linear"), ``target_parameters`` (fused expert parameters, routers), and the target names of
adapters on expert parameters (``<experts module>.<parameter>``), for every model."""

import re
from collections.abc import Iterable, Mapping

from torch import nn

from ..layers.base import DEFAULT_ADAPTER, AdapterLayer
from ..layers.dispatch import adapter_class, base_kind, refusal_reason
from ..layers.experts import FUSED_PARAMETERS, Experts, expert_parameters, is_fused_experts
from ..layers.routers import RouterWeight, is_router


def names_match(name, target):
    """Whether ``name`` is the module or parameter ``target`` names, as PEFT matches a list entry: equal to it,
    or ending with ``"." + target``."""
    return name == target or name.endswith("." + target)


def adapter_targets(name, layer, adapter_name=DEFAULT_ADAPTER):
    """{target name: Adapter} of the adapter ``adapter_name`` of the layer
    ``name``: the layer itself, or ``<name>.<parameter>`` for each adapted
    parameter of an ``Experts`` layer."""
    adapter = layer.adapters[adapter_name]
    if isinstance(layer, Experts):
        return {f"{name}.{parameter}": factors for parameter, factors in adapter.items()}
    return {name: adapter}


def split_target(modules, target):
    """(module name, parameter name or None) of a target name: a module of
    ``modules`` ({name: module}), or a fused expert parameter of one."""
    if target in modules:
        return target, None
    module_name, _, parameter = target.rpartition(".")
    module = modules.get(module_name)
    if module is not None and parameter in expert_parameters(module):
        return module_name, parameter
    return target, None


def group_targets(modules, configs):
    """{module name: config} from {target name: config}: a module target
    keeps its config; the fused expert parameters of one module are grouped
    into {parameter: config}, and an experts module named as a module target
    gets an adapter on each of its fused parameters."""
    grouped = {}
    for target, config in configs.items():
        module_name, parameter = split_target(modules, target)
        module = modules.get(module_name)
        if module is not None and (parameter is not None or isinstance(module, Experts) or is_fused_experts(module)):
            parameters = [parameter] if parameter else expert_parameters(module)
            grouped.setdefault(module_name, {}).update(dict.fromkeys(parameters, config))
        else:
            grouped[module_name] = config
    return grouped


def parameter_targets(model, target_parameters):
    """The targets of ``model`` that ``target_parameters`` selects, as PEFT
    matches parameter names: a name equal to an entry or ending with
    ``"." + entry``. A fused expert parameter is its own target
    (``<experts>.<parameter>``), a router's weight its router (which then
    gets a ``RouterWeight``, as PEFT's ParamWrapper on ``gate.weight``).
    ValueError for an entry that matches nothing, TypeError (naming them)
    for matches that are neither."""
    if isinstance(target_parameters, str) or not all(isinstance(t, str) and t for t in target_parameters):
        raise ValueError(f"target_parameters must be a list of parameter names, got {target_parameters!r}")
    names = [name for name, _ in model.named_parameters() if "adapters." not in name]
    selected = {t: [n for n in names if names_match(n, t)] for t in target_parameters}
    unmatched = [t for t, found in selected.items() if not found]
    if unmatched:
        raise ValueError(f"target_parameters {unmatched} match no parameter of the model")
    modules = dict(model.named_modules())
    chosen = sorted({n for found in selected.values() for n in found})
    targets = {n: n if split_target(modules, n)[1] is not None else _router_of(modules, n) for n in chosen}
    refused = [n for n, target in targets.items() if target is None]
    if refused:
        raise TypeError(f"target_parameters selects {refused}, which are neither fused expert parameters nor router "
                        f"weights; moslora_ext adapts the fused 3-D parameters ({', '.join(FUSED_PARAMETERS)}) of "
                        "transformers' experts modules and the weights of their routers through target_parameters, "
                        "and linear layers through target_modules")
    return list(dict.fromkeys(targets.values()))


def _router_of(modules, parameter_name):
    """The name of the router whose weight ``parameter_name`` is, or None."""
    module_name, _, parameter = parameter_name.rpartition(".")
    router = modules.get(module_name)
    return module_name if parameter == "weight" and (is_router(router) or isinstance(router, RouterWeight)) else None


def left_out_of_all_linear(model):
    """The parameters that PEFT's "all-linear" may adapt but this library
    does not: the weights of routers that are ``nn.Linear`` subclasses with a
    forward of their own (refused, see ``moslora_ext.layers.linear.NOT_PLAIN_LINEAR``)
    and 3-D parameters outside a supported experts module."""
    left_out, inside_adapted = [], ()
    for name, module in model.named_modules():  # a module before its children
        if isinstance(module, AdapterLayer):
            inside_adapted += (name + ".",)  # its adapters' own 3-D tensors are not the model's
        if isinstance(module, AdapterLayer) or is_fused_experts(module) or name.startswith(inside_adapted):
            continue
        if "Router" in type(module).__name__ and isinstance(module, nn.Linear) and not is_router(module):
            left_out.append(f"{name}.weight")
        left_out += [f"{name}.{p}" for p, value in module.named_parameters(recurse=False) if value.dim() == 3]
    return left_out


ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output head


def matching_names(model, target_modules):
    """Names of the modules of ``model`` that ``target_modules`` selects.

    A list (or tuple/set) of strings selects a module whose name equals one of
    them or ends with ``"." + it`` (``"q_proj"`` selects
    ``model.layers.0.self_attn.q_proj``); a single string is a regular
    expression that must match the whole name (as in PEFT). ``"all-linear"``
    selects, as in PEFT, every linear layer (``nn.Linear``, GPT-2's
    ``Conv1D``, quantized linear layers: the registered kinds with
    ``is_linear``, see ``moslora_ext.layers.dispatch``) that can take an
    adapter (see ``check_adaptable``) except the output head, the module that ``model.get_output_embeddings()`` returns
    on a transformers model, the routers of mixture-of-experts models (their
    weights, see ``moslora_ext.layers.routers``) and every fused expert parameter of
    transformers' experts modules (``<experts>.gate_up_proj``, ``.down_proj``;
    see ``moslora_ext.layers.experts``), as PEFT's "all-linear" targets them. Never
    the model itself, nor a module inside an adapted layer (its base module,
    its adapters).
    """
    candidates = candidate_modules(model)
    if is_all_linear(target_modules):
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        linear = [name for name, module in candidates
                  if module is not head and counts_as_linear(module) and refusal_reason(module) is None]
        experts = [f"{name}.{parameter}" for name, module in candidates
                   if adapter_class(module) is Experts and refusal_reason(module) is None
                   for parameter in expert_parameters(module)]
        return linear + experts
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [name for name, _ in candidates if pattern.fullmatch(name)]
    iterable = isinstance(target_modules, Iterable) and not isinstance(target_modules, (Mapping, bytes))
    targets = list(target_modules) if iterable else None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    return [name for name, _ in candidates if any(names_match(name, t) for t in targets)]


def counts_as_linear(module):
    """Whether "all-linear" selects ``module``: its registered kind says so (``BaseKind.is_linear``)."""
    kind = base_kind(module)
    return kind is not None and kind.is_linear


def candidate_modules(model):
    """(name, module) of the modules of ``model`` that a target may select:
    not the model itself, nor anything inside an adapted layer."""
    found, adapted = [], []
    for name, module in model.named_modules():
        if name and not inside_any(name, adapted):
            found.append((name, module))
            if isinstance(module, AdapterLayer):
                adapted.append(name)
    return found


def is_all_linear(target_modules):
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def example_name(model):
    """The full name of an adaptable module of ``model``, for messages."""
    return next((name for name, m in candidate_modules(model) if refusal_reason(m) is None), "layers.0.q_proj")


def inside_any(name, module_names):
    """The first of ``module_names`` that is the module ``name`` or holds it, or None."""
    return next((m for m in module_names if name == m or name.startswith(m + ".")), None)
