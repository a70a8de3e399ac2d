"""``moslora_ext.Linear``: a frozen linear layer with a MoSLoRA adapter."""

import math

import torch
from torch import nn

from . import ops

MIXER_INITS = ("kaiming", "orthogonal", "identity", "braid")


def adapter_dtype(base_dtype, autocast_adapter_dtype=True):
    """The dtype of adapter parameters on a base of ``base_dtype``: float32 for
    a float16/bfloat16 base when ``autocast_adapter_dtype``, else the base's."""
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


def init_mixer_(mixer, mixer_init):
    """Initialise an (r, r) mixer in place.

    "kaiming": Kaiming-uniform with a = sqrt(5), as the released MoSLoRA code;
    "orthogonal": a random orthogonal matrix; "identity": vanilla LoRA;
    "braid": the two-subspace butterfly [[I, I], [I, I]] (even r only).
    """
    r = mixer.shape[0]
    with torch.no_grad():
        if mixer_init == "kaiming":
            nn.init.kaiming_uniform_(mixer, a=math.sqrt(5))
        elif mixer_init == "orthogonal":
            # QR has no fp16/bf16 kernels: draw in (at least) fp32, then cast.
            dtype = torch.promote_types(mixer.dtype, torch.float32)
            mixer.copy_(nn.init.orthogonal_(torch.empty(r, r, dtype=dtype, device=mixer.device)))
        elif mixer_init == "identity":
            mixer.copy_(torch.eye(r))
        elif mixer_init == "braid":
            if r % 2:
                raise ValueError(f"mixer_init='braid' needs an even rank r, got r={r}")
            mixer.copy_(torch.eye(r // 2).repeat(2, 2))
        else:
            raise ValueError(f"mixer_init must be one of {MIXER_INITS}, got {mixer_init!r}")
    return mixer


_QUANTIZED = "its weight is quantized and its forward dequantizes it"

# nn.Linear subclasses whose forward is not x W^T + b of their own weight and bias (or whose
# parent never calls their forward), by qualified class name so that nothing needs importing;
# their subclasses are refused too. Every other nn.Linear subclass (Falcon's FalconLinear,
# say) is taken to compute the plain linear map, as PEFT does.
NOT_PLAIN_LINEAR = {
    "torch.nn.modules.linear.NonDynamicallyQuantizableLinear":
        "nn.MultiheadAttention reads this out_proj's weight directly and never calls its forward",
    "torch.ao.nn.qat.modules.linear.Linear": "its forward fake-quantizes the weight",
    "bitsandbytes.nn.modules.Linear8bitLt": _QUANTIZED,
    "bitsandbytes.nn.modules.Linear4bit": _QUANTIZED,
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


def refusal_reason(module):
    """Why ``module`` cannot take an adapter, or None if it can: it must be a
    ``torch.nn.Linear`` or a subclass whose forward is the linear map of its
    weight and bias, i.e. any subclass not listed in ``NOT_PLAIN_LINEAR``."""
    kind = type(module).__name__
    if not isinstance(module, nn.Linear):
        return f"is a {kind}, not a torch.nn.Linear; adapters go on linear layers only"
    for cls in type(module).__mro__:
        reason = NOT_PLAIN_LINEAR.get(f"{cls.__module__}.{cls.__qualname__}")
        if reason:
            return f"is a {kind}, a torch.nn.Linear subclass that cannot take an adapter: {reason}"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return f"is a {kind} whose weight is not initialized yet; run a forward pass first"
    return None


def check_adaptable(module, name="the module"):
    """Raise TypeError, naming ``name`` and saying why, if ``module`` cannot
    take an adapter (see ``refusal_reason``)."""
    reason = refusal_reason(module)
    if reason:
        raise TypeError(f"{name} {reason}")


class Linear(nn.Module):
    """A linear layer with a frozen base and a trainable MoSLoRA adapter.

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
            "identity" (vanilla LoRA) or "braid" (butterfly of two
            subspaces, even r).
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
    takes it out again.
    """

    def __init__(
        self,
        in_features,
        out_features,
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias=True,
        mixer_init="kaiming",
        train_mixer=True,
        use_rslora=False,
        autocast_adapter_dtype=True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self._init_from_base(base.weight, base.bias, r, lora_alpha, lora_dropout, mixer_init, train_mixer, use_rslora,
                             autocast_adapter_dtype)

    @classmethod
    def from_linear(cls, linear, r=8, lora_alpha=16, lora_dropout=0.0, mixer_init="kaiming", train_mixer=True,
                    use_rslora=False, autocast_adapter_dtype=True):
        """Wrap an existing ``nn.Linear``: its weight and bias Parameters are
        shared (not copied) and frozen; the adapter is created on their
        device, in their dtype (float32 for a half-precision base, see
        ``autocast_adapter_dtype``), and the layer takes ``linear``'s training
        mode (so dropout stays off in a model that is in eval mode). Subclasses
        of ``nn.Linear`` are accepted unless their forward is known to be more
        than the linear map (see ``check_adaptable``)."""
        check_adaptable(linear, "from_linear's argument")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from_base(linear.weight, linear.bias, r, lora_alpha, lora_dropout, mixer_init, train_mixer,
                              use_rslora, autocast_adapter_dtype)
        return layer.train(linear.training)

    def _init_from_base(self, weight, bias, r, lora_alpha, lora_dropout, mixer_init, train_mixer, use_rslora,
                        autocast_adapter_dtype):
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r (the adapter rank) must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype, autocast_adapter_dtype)}
        # Built first: it validates mixer_init before anything is changed.
        mixer = init_mixer_(torch.empty(r, r, **factory), mixer_init)
        self.out_features, self.in_features = weight.shape
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.mixer_init = mixer_init
        self.use_rslora = use_rslora
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.scale = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.merged = False
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_mixer = nn.Parameter(mixer, requires_grad=train_mixer)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        dropout_p = self.lora_dropout if self.training else 0.0
        return ops.moslora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_mixer, self.lora_B, self.scale, dropout_p
        )

    def delta_weight(self):
        """The adapter as a weight update, ``scale * B M A`` (out, in)."""
        with torch.no_grad():
            return self.scale * (self.lora_B @ self.lora_mixer) @ self.lora_A

    def merge(self, safe=False):
        """Fold the adapter into ``weight`` in place; forward is then the base layer alone.

        With ``safe=True`` the merged weight is computed in a copy first and
        the merge is refused (ValueError, weight untouched) if it has
        non-finite values; this costs one weight-sized temporary.
        """
        if self.merged:
            raise RuntimeError("this moslora_ext.Linear is already merged; call unmerge() first")
        if safe:
            with torch.no_grad():
                merged = self.weight.clone()
                ops.merge_(merged, self.lora_A, self.lora_mixer, self.lora_B, self.scale)
                if not torch.isfinite(merged).all():
                    raise ValueError("safe merge refused: the merged weight would contain inf or NaN "
                                     "(the weight is left unchanged)")
                self.weight.copy_(merged)
        else:
            ops.merge_(self.weight, self.lora_A, self.lora_mixer, self.lora_B, self.scale)
        self.merged = True

    def unmerge(self):
        """Take the adapter back out of ``weight`` (exact up to rounding)."""
        if not self.merged:
            raise RuntimeError("this moslora_ext.Linear is not merged; nothing to unmerge")
        ops.merge_(self.weight, self.lora_A, self.lora_mixer, self.lora_B, -self.scale)
        self.merged = False

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"mixer_init={self.mixer_init!r}, train_mixer={self.lora_mixer.requires_grad}, "
                f"merged={self.merged}")
