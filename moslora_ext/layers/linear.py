"""``moslora_ext.Linear`` (a linear layer with MoSLoRA adapters, on the fused
ops) and ``TransposedLinear`` (the same for GPT-2's ``Conv1D``)."""

import torch
from torch import nn

from .. import ops
from .base import DEFAULT_ADAPTER, AdapterConfig, AdapterLayer, class_path, qualified_class_names

GPT2_CONV1D = "transformers.pytorch_utils.Conv1D"  # by name, so that nothing needs importing
BNB_4BIT = "bitsandbytes.nn.modules.Linear4bit"
BNB_8BIT = "bitsandbytes.nn.modules.Linear8bitLt"
TORCHAO_TENSOR = "torchao.utils.TorchAOBaseTensor"  # the base class of torchao's quantized weights
_QUANTIZED = "its weight is quantized and its forward dequantizes it"

# nn.Linear subclasses whose forward is not x W^T + b of their own weight and bias (or whose
# parent never calls their forward), by qualified class name so that nothing needs importing;
# their subclasses are refused too. Every other nn.Linear subclass (Falcon's FalconLinear,
# say) is taken to compute the plain linear map, as PEFT does. bitsandbytes' quantized layers
# and torchao-quantized weights go to QuantizedLinear instead (their own kinds in layers.dispatch,
# which any registered subclass's kind overrides: the nearest registered class wins).
NOT_PLAIN_LINEAR = {
    "torch.nn.modules.linear.NonDynamicallyQuantizableLinear":
        "nn.MultiheadAttention reads this out_proj's weight directly and never calls its forward",
    "torch.ao.nn.qat.modules.linear.Linear": "its forward fake-quantizes the weight",
    "transformers.integrations.finegrained_fp8.FP8Linear": _QUANTIZED,
    "transformers.integrations.fbgemm_fp8.FbgemmFp8Linear": _QUANTIZED,
    "transformers.integrations.compressed_tensors.CompressedTensorsFP8Linear": _QUANTIZED,
    "transformers.integrations.bitnet.AutoBitLinear": _QUANTIZED,
    "transformers.integrations.metal_quantization.MetalLinear": _QUANTIZED,
    "transformers.integrations.gemma_quant.QuantizedLinear": _QUANTIZED,
    "transformers.models.llama4.modeling_llama4.Llama4Router": "its forward returns routing scores",
    "transformers.models.phimoe.modeling_phimoe.PhimoeTopKRouter": "its forward returns routing scores",
    "transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4GroupedLinear":
        "its forward applies the weight group by group",
    "transformers.models.idefics.modeling_idefics.IdeficsDecoupledLinear":
        "its forward adds output features of a second weight",
    "transformers.models.dory.modeling_dory.DoryLMHead": "its forward rescales the logits",
}


def _compute_dtype(x):
    """The dtype a linear layer computes in on x: autocast's where it applies, else x's."""
    dtype = ops.autocast_dtype(x.device.type)
    return dtype if dtype is not None and x.dtype != torch.float64 else x.dtype


def not_plain_linear_reason(module):
    """Why ``module``, an ``nn.Linear`` subclass in ``NOT_PLAIN_LINEAR``, cannot take an adapter, else None."""
    return next((NOT_PLAIN_LINEAR[name] for name in qualified_class_names(module) if name in NOT_PLAIN_LINEAR), None)


def quantized_kind(module):
    """"4bit" or "8bit" for a bitsandbytes layer, "torchao" for an nn.Linear with a
    torchao-quantized weight (the bases of ``QuantizedLinear``), else None."""
    names = qualified_class_names(module)
    if BNB_4BIT in names:
        return "4bit"
    if BNB_8BIT in names:
        return "8bit"
    if isinstance(module, nn.Linear) and TORCHAO_TENSOR in qualified_class_names(module.weight):
        return "torchao"
    return None


class Linear(AdapterLayer):
    """A linear layer with a frozen base and trainable MoSLoRA adapters.

    ``y = x W^T + b + scale * B M A dropout(x)`` with ``lora_A`` (r, in),
    ``lora_mixer`` M (r, r) and ``lora_B`` (out, r); ``scale = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``lora_B`` starts at zero,
    so a fresh adapter leaves the layer's output unchanged.

    Args:
        in_features, out_features, bias, device, dtype: as ``torch.nn.Linear``.
        r: adapter rank (>= 1).
        lora_alpha: scale numerator.
        lora_dropout: dropout on the adapter input, in [0, 1); active in
            training mode only.
        mixer_init: "kaiming" (default, as released), "orthogonal",
            "identity" (vanilla LoRA) or "braid" (the braid of
            ``braid_subspaces`` = k subspaces: M = ones(k, k) ⊗ I_{r/k}, so
            B M A = (B_1+...+B_k)(A_1+...+A_k) of the k rank-r/k branches).
        braid_subspaces: k of the braid, a divisor of r (default 2, the
            butterfly [[I, I], [I, I]]); only with mixer_init="braid".
        train_mixer: False freezes the mixer (identity + frozen = LoRA).
        use_rslora: rank-stabilised scale lora_alpha / sqrt(r).
        autocast_adapter_dtype: on a float16/bfloat16 base, keep the adapter
            parameters in float32 (the default, as PEFT) so that optimizer
            updates of the small adapter do not underflow; the fused ops
            compute in the base dtype (the r x d, r x r and k x r matrices are
            cast per call, never x) and the gradients arrive in float32.
            False keeps them in the base dtype. Other bases: no effect.

    The base ``weight`` and ``bias`` are frozen (``requires_grad=False``).
    ``merge()`` folds the adapter into ``weight`` for inference, ``unmerge()``
    takes it out again. The layer holds its adapters by name (this one is
    "default"; ``add_adapter``, ``set_adapter``, see ``AdapterLayer``);
    ``lora_A``, ``r``, ``scale``... are the active adapter's, and forward
    runs the fused ops on the active adapter alone.
    """

    takes_quantized = False  # whether the bases of QuantizedLinear are this class's

    def __init__(self, in_features, out_features, r=AdapterConfig.r, lora_alpha=AdapterConfig.lora_alpha,
                 lora_dropout=AdapterConfig.lora_dropout, bias=True, mixer_init=AdapterConfig.mixer_init,
                 train_mixer=AdapterConfig.train_mixer, use_rslora=AdapterConfig.use_rslora,
                 autocast_adapter_dtype=AdapterConfig.autocast_adapter_dtype, device=None, dtype=None,
                 braid_subspaces=AdapterConfig.braid_subspaces):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        config = AdapterConfig(r, lora_alpha, lora_dropout, mixer_init, train_mixer, use_rslora,
                               autocast_adapter_dtype, braid_subspaces)
        self._adopt(base, DEFAULT_ADAPTER, self.build_adapter(base.weight, config))

    @classmethod
    def from_linear(cls, linear, r=AdapterConfig.r, lora_alpha=AdapterConfig.lora_alpha,
                    lora_dropout=AdapterConfig.lora_dropout, mixer_init=AdapterConfig.mixer_init,
                    train_mixer=AdapterConfig.train_mixer, use_rslora=AdapterConfig.use_rslora,
                    autocast_adapter_dtype=AdapterConfig.autocast_adapter_dtype,
                    braid_subspaces=AdapterConfig.braid_subspaces):
        """Wrap an existing ``nn.Linear`` (see ``AdapterLayer.from_module``):
        its weight and bias Parameters are shared (not copied) and frozen; the
        adapter "default" is created on their device, in their dtype (float32
        for a half-precision base, see ``autocast_adapter_dtype``), and the
        layer takes ``linear``'s training mode (so dropout stays off in a
        model that is in eval mode). Subclasses of ``nn.Linear`` are accepted
        unless their forward is known to be more than the linear map (see
        ``moslora_ext.check_adaptable``)."""
        return cls.from_module(linear, _caller="from_linear", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                               mixer_init=mixer_init, train_mixer=train_mixer, use_rslora=use_rslora,
                               autocast_adapter_dtype=autocast_adapter_dtype, braid_subspaces=braid_subspaces)

    @classmethod
    def refusal_reason(cls, module):
        """None for a ``torch.nn.Linear`` or a subclass whose forward is the
        linear map of its weight and bias (any not in ``NOT_PLAIN_LINEAR``)."""
        kind = class_path(module)
        if not isinstance(module, nn.Linear):
            return f"is a {kind}, not a torch.nn.Linear"
        if quantized_kind(module) and not cls.takes_quantized:
            return f"is a {kind} with a quantized weight; moslora_ext.QuantizedLinear takes it"
        reason = not_plain_linear_reason(module)
        if reason:
            return f"is a {kind}, a torch.nn.Linear subclass that cannot take an adapter: {reason}"
        return super().refusal_reason(module)

    def _keep_base_settings(self, module):
        self.out_features, self.in_features = self.matrix_shape(module.weight)

    @staticmethod
    def _as_matrix(weight):
        return weight

    def base_forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)

    def _dropout_p(self, adapter):
        return adapter.config.lora_dropout if self.training else 0.0

    def adapter_forward(self, x, adapter):
        return ops.moslora_linear(x, self._as_matrix(self.weight), self.bias, adapter.lora_A, adapter.lora_mixer,
                                  adapter.lora_B, adapter.config.scale, self._dropout_p(adapter))

    def add_adapter_output(self, base_out, x, adapter):
        return ops.add_moslora(base_out, x, adapter.lora_A, adapter.lora_mixer, adapter.lora_B, adapter.config.scale,
                               self._dropout_p(adapter))

    def grouped_forward(self, x, groups):
        # In the fused op's order, so that each row is bit for bit what it is alone: each adapter's
        # rows start from the bias plus their adapter output, then one base GEMM adds x W^T to all.
        weight = self._as_matrix(self.weight)
        dtype = _compute_dtype(x)
        out_shape = (*x.shape[:-1], self.out_features)
        if self.bias is None:
            out = torch.zeros(out_shape, dtype=dtype, device=x.device)
        else:
            out = self.bias.to(dtype).expand(out_shape).contiguous()
        flat = self._add_outputs_by_rows(out, x, groups).view(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        if ops.autocast_dtype(x.device.type) is not None:
            # Out of place, which autocast casts (x2 may be in its dtype already, the weight not).
            return torch.addmm(flat, x2, weight.t()).view(out_shape)
        return flat.addmm_(x2, weight.t()).view(out_shape)

    def _empty_base(self):
        # A plain nn.Linear, also in place of a subclass such as Falcon's FalconLinear.
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{super().extra_repr()}")


class TransposedLinear(Linear):
    """GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``) with MoSLoRA
    adapters: a linear layer whose weight is stored (in_features,
    out_features), PEFT's ``fan_in_fan_out``. The fused ops run on
    ``weight.t()``, a view (no copy), and ``merge()`` writes into the
    weight's own storage. Without an adapter it computes exactly what
    ``Conv1D`` computes."""

    fan_in_fan_out = True

    @classmethod
    def refusal_reason(cls, module):
        if GPT2_CONV1D not in qualified_class_names(module):
            return f"is a {class_path(module)}, not a {GPT2_CONV1D}"
        return AdapterLayer.refusal_reason(module)

    @staticmethod
    def _as_matrix(weight):
        return weight.t()

    def base_forward(self, x):
        # Conv1D.forward itself, so that a disabled or merged layer gives its outputs bit for bit.
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.out_features)

    def _empty_base(self):
        from transformers.pytorch_utils import Conv1D

        return Conv1D(self.out_features, self.in_features)

