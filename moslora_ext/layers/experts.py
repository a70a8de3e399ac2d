"""MoSLoRA adapters on the fused experts of transformers' mixture-of-experts models.

transformers 5 stores the routed experts of Mixtral, Qwen3-MoE, OLMoE,
DeepSeek-V3, GPT-OSS and others as one experts module (decorated with
``use_experts_implementation``) holding fused 3-D parameters:
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), or (E, in, out) with
``is_transposed`` (GPT-OSS). ``Experts`` replaces such a module (keeping its
parameters under their own state-dict keys) and adapts any of them. Per
expert e of an adapted parameter, ΔW_e = s · B_e M_e A_e, stacked as
``lora_A`` (E, r, in), ``lora_mixer`` (E, r, r) and ``lora_B`` (E, out, r).

Each expert has its own mixer, as its own A_e and B_e: the mixer mixes the
subspaces of one expert's A_e and B_e, whose bases are independent from
expert to expert, so one mixer shared by all experts would mean something
different in each. What the experts of one parameter share is the settings
(r, lora_alpha, so the scale, lora_dropout, the mixer's init) and the dropout
seed of a call (each expert derives its own mask from it). Each adapted
parameter of a module has its own adapter and settings, so ``gate_up_proj``
may have another rank than ``down_proj`` (PEFT's conversion of fused
checkpoints doubles it).

The forward is transformers' grouped experts path (sort the routed
(token, expert) pairs by expert, one grouped GEMM per parameter, the module's
own gate/activation, routing weights, sum over top-k), with the adapter added
per expert on that expert's rows only, through
``moslora_ext.ops.experts.add_experts_moslora``; no expert is unfused into an
``nn.Linear``.
"""

import torch
from torch import nn

from ..ops import experts as expert_ops
from .base import Adapter, AdapterLayer, class_path, refuse_non_finite
from .linear import Linear

# The fused parameters of transformers' experts modules that take adapters.
FUSED_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(module):
    """Whether ``module`` is a transformers experts module with fused 3-D
    expert parameters (``use_experts_implementation`` sets ``has_gate`` and
    ``is_transposed`` on it)."""
    return (not isinstance(module, AdapterLayer) and hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and hasattr(module, "num_experts") and bool(expert_parameters(module)))


def expert_parameters(module):
    """The names of the fused 3-D expert parameters of ``module``, in registration order (PEFT's nesting order)."""
    return [name for name, p in module.named_parameters(recurse=False) if name in FUSED_PARAMETERS and p.dim() == 3]


class ExpertsAdapter(nn.ModuleDict):
    """One named adapter of an ``Experts`` layer: an ``Adapter`` with stacked
    per-expert factors for each adapted parameter, keyed by its name."""

    @property
    def config(self):
        """The settings of the first adapted parameter (each has its own: ``self[name].config``)."""
        return next(iter(self.values())).config

    def set_trainable(self, trainable):
        for adapter in self.values():
            adapter.set_trainable(trainable)


class Experts(AdapterLayer):
    """A transformers experts module with MoSLoRA adapters on its fused 3-D
    parameters (see the module docstring). Holds the base module's
    parameters, buffers and submodules under their own names, so state-dict
    keys stay those of the base model; ``adapters.<name>.<parameter>.lora_A``
    etc. hold the adapters. ``merge()`` adds s·B_e M_e A_e into each expert's
    slice of the fused parameter in place; ``unload()`` gives the base module
    back."""

    takes_mixed_batches = False

    @classmethod
    def refusal_reason(cls, module):
        if isinstance(module, Experts):
            return None
        if not is_fused_experts(module):
            return (f"is a {class_path(module)}, not a transformers experts module with fused 3-D parameters "
                    f"({', '.join(FUSED_PARAMETERS)})")
        if getattr(module, "_is_expert_parallel", False):
            return f"is a {class_path(module)} sharded for expert parallelism, which expert adapters do not support"
        return None

    @staticmethod
    def factor_shapes_of(experts, parameter, r):
        """The shapes of A, M and B of an adapter of rank r on ``experts.<parameter>``."""
        weight = getattr(experts, parameter)
        count, first, second = weight.shape
        out_features, in_features = (second, first) if experts.is_transposed else (first, second)
        return {"lora_A": (count, r, in_features), "lora_mixer": (count, r, r), "lora_B": (count, out_features, r)}

    @classmethod
    def build_adapter(cls, experts, configs):
        """An ``ExpertsAdapter`` for ``experts`` (the base module or an
        ``Experts`` layer) with ``configs`` {parameter name: AdapterConfig}:
        each expert's A, M and B made as ``moslora_ext.Linear`` makes them (A
        Kaiming-uniform over the expert's in_features, as PEFT, B zero)."""
        adapters = {}
        for parameter, config in configs.items():
            weight = getattr(experts, parameter)
            per_expert = [Linear.build_adapter(matrix, config)
                          for matrix in expert_ops.expert_matrices(weight, experts.is_transposed)]
            adapters[parameter] = Adapter(config, *(torch.stack([getattr(a, t).data for a in per_expert])
                                                    for t in ("lora_A", "lora_mixer", "lora_B")))
        return ExpertsAdapter(adapters)

    def add_adapter(self, name, configs):
        """Add an adapter ``name`` with {parameter name: AdapterConfig}."""
        self.attach_adapter(name, self.build_adapter(self, configs))

    def _adopt(self, module, adapter_name, adapter):
        # The base module itself stays reachable (its gate, activation and flags) but unregistered,
        # so that its parameters are held once, under this layer's (and so the base model's) keys.
        self.__dict__["base_experts"] = module
        for name, parameter in module.named_parameters(recurse=False):
            parameter.requires_grad_(False)
            self.register_parameter(name, parameter)
        for name, buffer in module.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
        for name, child in module.named_children():
            self.add_module(name, child)
        self.adapters = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.merged = False
        self.disabled = False
        self.attach_adapter(adapter_name, adapter)
        self.train(module.training)

    @property
    def is_transposed(self):
        """Whether the fused parameters are stored (E, in, out)."""
        return self.base_experts.is_transposed

    def forward(self, hidden_states, top_k_index, top_k_weights):
        adapter = self.applied_adapter()
        if adapter is None:
            return self.base_experts(hidden_states, top_k_index, top_k_weights)
        return self._routed_forward(hidden_states, top_k_index, top_k_weights, adapter)

    def _routed_forward(self, hidden_states, top_k_index, top_k_weights, adapter):
        # transformers' grouped_mm_experts_forward, with the adapter added after each grouped GEMM.
        base = self.base_experts
        top_k, tokens, hidden = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
        expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
        rows = hidden_states[order // top_k]
        # histc, not bincount (whose output shape depends on the data, a graph break), as transformers;
        # histc takes floats on CPU and, with deterministic algorithms, integers on CUDA.
        counts = torch.histc(expert_ids.float() if expert_ids.device.type in ("cpu", "mps") else expert_ids.int(),
                             bins=base.num_experts, min=0, max=base.num_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        first = "gate_up_proj" if base.has_gate else "up_proj"
        out = self._project(first, rows, expert_ids, offsets, adapter)
        out = base._apply_gate(out) if base.has_gate else base.act_fn(out)
        out = self._project("down_proj", out, expert_ids, offsets, adapter)
        if getattr(base, "has_post_expert_norm", False):
            out = base.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out[inverse].view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)

    def _project(self, parameter, rows, expert_ids, offsets, adapter):
        from transformers.integrations.moe import _grouped_linear

        bias = getattr(self, f"{parameter}_bias")[expert_ids] if self.base_experts.has_bias else None
        out = _grouped_linear(rows, getattr(self, parameter), offsets, bias=bias, is_transposed=self.is_transposed)
        if parameter not in adapter:
            return out
        factors, config = adapter[parameter], adapter[parameter].config
        dropout_p = config.lora_dropout if self.training else 0.0
        return expert_ops.add_experts_moslora(out, rows.to(out.dtype), offsets, factors.lora_A, factors.lora_mixer,
                                              factors.lora_B, config.scale, dropout_p)

    def check_merge(self, safe=False, requantize=False):
        # The base checks; with safe=True every adapted parameter's merged copy is checked.
        super().check_merge(safe=False)
        if safe:
            for weight in self._merged_parameters(self.active, 1.0).values():
                refuse_non_finite(weight)

    def _merged_parameters(self, adapter, sign, in_place=False):
        """{parameter name: the fused parameter with each expert's update added
        (``sign`` -1 takes it out)}, into copies unless ``in_place``. Each
        parameter has its own scale, so merge and unmerge pass only a sign."""
        with torch.no_grad():
            targets = {name: getattr(self, name) if in_place else getattr(self, name).clone() for name in adapter}
            for name, weight in targets.items():
                factors = adapter[name]
                expert_ops.merge_experts_(weight, factors.lora_A, factors.lora_mixer, factors.lora_B,
                                          sign * factors.config.scale, self.is_transposed)
        return targets

    def _add_to_weight(self, adapter, scale):
        self._merged_parameters(adapter, 1.0 if scale > 0 else -1.0, in_place=True)

    def delta_weight(self):
        """{parameter name: the active adapter as an update of that fused parameter}."""
        deltas = {}
        for name, factors in self.active.items():
            delta = torch.zeros(getattr(self, name).shape, dtype=factors.lora_A.dtype, device=factors.lora_A.device)
            expert_ops.merge_experts_(delta, factors.lora_A, factors.lora_mixer, factors.lora_B, factors.config.scale,
                                      self.is_transposed)
            deltas[name] = delta
        return deltas

    def unload(self):
        """The base experts module (on these parameters, merged or not), in this layer's training mode."""
        return self.base_experts.train(self.training)

    def extra_repr(self):
        adapted = sorted({name for adapter in self.adapters.values() for name in adapter})
        return f"{type(self.base_experts).__name__}, adapted={adapted}, {super().extra_repr()}"


