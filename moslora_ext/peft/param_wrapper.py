"""MoSLoRA on bare parameters through PEFT (``MoSLoRAConfig(target_parameters=...)``):
PEFT's ``lora.ParamWrapper`` with one r x r mixer per expert.

PEFT's ParamWrapper adapts one parameter (a fused (E, out, in) or (E, in, out)
expert stack, or a 2-D weight) and calls the base module's own forward with
that parameter parametrised as W + ΔW; its layout is that of
``moslora_ext.formats.peft_lora_experts`` (lora_A (E·r, in), lora_B (out, r·E)). The
mixers are ``lora_mixer.weight`` (E, r, r), one per expert, as in
``moslora_ext.Experts``: ΔW_e = s · B_e M_e A_e.

Why ΔW per forward and not the fused ``moslora_ext.ops.experts.add_experts_moslora``: the
fused op adds the adapter on each expert's routed rows, which exist only
inside the experts module's forward (routing, sorting, grouped GEMMs). A
ParamWrapper sees the module's inputs, not those rows, and nested wrappers
(``gate_up_proj`` inside ``down_proj``) each own one parameter, so the fused
op would mean replacing transformers' forward from inside one wrapper. The
route therefore computes as PEFT does (W + s·(B M) A folded into one
``baddbmm`` per forward); ``moslora_ext.add_adapters(target_parameters=...)``
is the fused path.
"""

from .layers import MoSLoRALayer  # first: its config import refuses an unsupported peft before peft is imported

import torch  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from peft.utils import ALLOWED_COMPUTE_DTYPES  # noqa: E402
from torch import nn  # noqa: E402

from ..layers.base import init_mixer_  # noqa: E402
from ..layers.expert_layout import stacked_from_peft  # noqa: E402


class ExpertMixers(nn.Module):
    """The mixers of one adapter on one parameter: ``weight`` (E, r, r), M_e = weight[e] ((r, r) on a 2-D parameter)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


class ParamWrapper(MoSLoRALayer, lora_layer.ParamWrapper):
    """PEFT's LoRA ``ParamWrapper`` with MoSLoRA adapters: a mixer per expert
    (``lora_mixer[adapter].weight`` (E, r, r); (r, r) on a 2-D parameter), frozen for ``train_mixer=False``.
    PEFT's own refusals apply (lora_dropout, fan_in_fan_out, mixed batches).
    Named as PEFT's class because PEFT recognises nested wrappers by class name."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return None  # the mixer is folded into the factors below; ParamWrapper takes no variant

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        lora_A = self.lora_A[adapter_name].weight  # already on the parameter's device and dtype
        mixers = [init_mixer_(torch.empty(r, r, device=lora_A.device, dtype=lora_A.dtype), config.mixer_init,
                              config.braid_subspaces) for _ in range(self.num_experts)]
        # a 2-D parameter (a router's weight) has one (r, r) mixer, as a linear layer's
        self.lora_mixer[adapter_name] = ExpertMixers(torch.stack(mixers) if self._param_ndim == 3 else mixers[0])
        self.record_train_mixer(adapter_name, config.train_mixer)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def expert_factors(self, adapter):
        """(A (E, r, in), B M (E, out, r)) of ``adapter``, in the adapter's dtype."""
        lora_A, lora_B = stacked_from_peft(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.num_experts)
        r = lora_A.shape[1]
        mixer = self.lora_mixer[adapter].weight.reshape(self.num_experts, r, r)
        return lora_A, lora_B @ mixer.to(lora_B.dtype)

    def _lhs_rhs(self, adapter):
        lora_A, mixed_B = self.expert_factors(adapter)
        if self._param_ndim == 3 and not self._did_swap_in_out_features:  # stored (E, in, out)
            return lora_A.transpose(-2, -1), mixed_B.transpose(-2, -1)
        return mixed_B, lora_A

    def get_delta_factors(self, adapter_name):
        """``(lhs, rhs, scaling)`` with ΔW = scaling · lhs @ rhs in the parameter's layout (PEFT's fold)."""
        lhs, rhs = self._lhs_rhs(adapter_name)
        dtype = self.get_param().dtype
        return lhs.to(dtype), rhs.to(dtype), self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name, *args, **kwargs):
        """ΔW of ``adapter_name`` in the parameter's shape (its dtype where PEFT computes in it)."""
        lhs, rhs = self._lhs_rhs(adapter_name)
        delta = (lhs @ rhs) * self.scaling[adapter_name]
        param = self.get_param()
        delta = delta.reshape(param.shape)  # a 2-D parameter is one "expert"
        # low-precision parameters (float8) take the sum in higher precision, as PEFT's _low_prec_add
        return delta.to(param.device, param.dtype if param.dtype in ALLOWED_COMPUTE_DTYPES else delta.dtype)
