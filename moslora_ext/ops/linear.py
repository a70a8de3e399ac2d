"""The moslora_ext operators: typed wrappers over ``torch.ops.moslora_ext.*``,
each with its fake (shape-only) kernel beside it, and their autograd.

The operators themselves are defined in C++ (csrc/ops.cpp) with CPU and CUDA
kernels; the fake kernels make them traceable by ``torch.compile`` and
``torch.export``.
"""

import math

import torch

from .common import (
    autocast_dtype,
    autocast_to,
    cast_floating,
    new_dropout_seed,
    refuse_double_backward,
    refuse_grad_transforms,
)
from .checks import (
    check_adapter,
    check_dropout,
    check_layer_args,
    check_same_dtype_device,
    check_scale,
    dtype_name,
    opmath_dtype,
    raise_typed_errors,
)

_C_OPS = torch.ops.moslora_ext


def moslora_linear(x, weight, bias, lora_A, mixer, lora_B, scale, dropout_p=0.0):
    """MoSLoRA linear map ``y = x W^T + b + scale * dropout(x) A^T M^T B^T``.

    Args:
        x: input of shape (..., in_features).
        weight: frozen base weight (out_features, in_features).
        bias: base bias (out_features,) or None.
        lora_A: (r, in_features); mixer: (r, r); lora_B: (out_features, r).
        scale: the adapter scale (lora_alpha / r, or lora_alpha / sqrt(r)).
        dropout_p: dropout probability on the adapter input, in [0, 1).

    Differentiable in x, the three adapter matrices and (unfused) weight and
    bias. The dropout mask is drawn from torch's default generator, so
    ``torch.manual_seed`` reproduces it; backward regenerates it rather than
    storing a dropped copy of x. Under autocast the float32/16 operands are cast
    to the autocast dtype, as for ``torch.nn.functional.linear``. Adapter
    matrices of another floating dtype than x (fp32 adapters on a bf16 model)
    are cast to x's dtype; their gradients arrive in their own dtype.
    """
    return _forward(x, weight, bias, lora_A, mixer, lora_B, scale, dropout_p, None)


def add_moslora(base_out, x, lora_A, mixer, lora_B, scale, dropout_p=0.0):
    """``base_out + scale * dropout(x) A^T M^T B^T``: the adapter on top of a
    base output computed by the caller (a quantized layer's own kernel).

    Args:
        base_out: the base module's output (..., out_features), of x's dtype.
        x, lora_A, mixer, lora_B, scale, dropout_p: as ``moslora_linear``.

    The same fused op as ``moslora_linear`` without its base GEMM: the
    adapter GEMM accumulates into ``base_out`` (a new tensor is returned),
    the dropout mask is regenerated in backward (nothing N x in_features is
    saved), the gradient of x is the adapter's part (autograd adds the base
    module's), and ``base_out``'s gradient passes through. Autocast and
    adapter dtypes as ``moslora_linear``.
    """
    return _forward(x, None, None, lora_A, mixer, lora_B, scale, dropout_p, base_out)


def _forward(x, weight, bias, lora_A, mixer, lora_B, scale, dropout_p, base_out):
    if not torch.compiler.is_compiling():
        refuse_grad_transforms(x, weight, bias, lora_A, mixer, lora_B, base_out)
    if (dtype := autocast_dtype(x.device.type)) is not None:
        x, weight, bias, lora_A, mixer, lora_B, base_out = (
            autocast_to(t, dtype) for t in (x, weight, bias, lora_A, mixer, lora_B, base_out))
    if x.is_floating_point():  # the small adapter matrices follow x, never the other way round
        lora_A, mixer, lora_B = (cast_floating(t, x.dtype) for t in (lora_A, mixer, lora_B))
    seed = new_dropout_seed() if dropout_p > 0 else None
    y, _ = _C_OPS.forward(x, weight, bias, lora_A, mixer, lora_B, float(scale), float(dropout_p), seed, base_out)
    return y


def merge_(weight, lora_A, mixer, lora_B, scale):
    """``weight += scale * (lora_B @ mixer) @ lora_A`` in place; a negative scale unmerges.

    Half-precision weights are updated in fp32 a block of rows at a time, so
    no (out_features, in_features) temporary is allocated. The adapter may be
    of another floating dtype than the weight (fp32 on a bf16 base); it is read
    in the accumulation precision. Autocast does not apply: the result is
    computed in the weight's own precision (fp32 for fp16/bf16) under any
    autocast context.
    """
    with torch.no_grad():
        _C_OPS.merge_(weight, lora_A, mixer, lora_B, float(scale))


def dropout(x, p, seed):
    """The adapter-input dropout: x (flattened to rows) masked by the
    counter-based mask of (seed, row, column), kept elements scaled by 1/(1-p)."""
    return _C_OPS.dropout(x, float(p), seed)


def dropout_mask(shape, p, seed, device="cpu"):
    """The boolean keep-mask that ``moslora_linear`` with this seed applies to
    an input of ``shape`` (True = kept). For tests and debugging."""
    ones = torch.ones(shape, device=device)
    return dropout(ones, p, seed) != 0


# ---------------------------------------------------------------------------
# Fake kernels: output shapes and the checks needed to compute them.
# ---------------------------------------------------------------------------


# Each fake runs the checks of its C++ op (ops/checks.py), with its exception types.


@torch.library.register_fake("moslora_ext::forward")
def _forward_fake(x, weight, bias, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed, base_out=None):
    torch._check_value((weight is None) != (base_out is None), lambda: "moslora_ext: forward needs either weight "
                       "(the base output computed here) or base_out (computed by the caller), not both nor neither")
    torch._check_value(bias is None or base_out is None,
                       lambda: "moslora_ext: with base_out the bias belongs in base_out; pass bias=None")
    check_layer_args(x, weight, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed)
    k = lora_B.shape[0]
    y = x.new_empty((*x.shape[:-1], k))
    if bias is not None:
        check_same_dtype_device(x, "x", bias, "bias")
        torch._check_value(bias.dim() == 1 and bias.shape[0] == k, lambda: "moslora_ext: bias must have shape "
                           f"(out_features,) = ({k},), got {list(bias.shape)}")
    if base_out is not None:
        check_same_dtype_device(x, "x", base_out, "base_out")
        torch._check_value(base_out.shape == y.shape, lambda: "moslora_ext: base_out must have the output's shape "
                           f"{list(y.shape)}, got {list(base_out.shape)}")
    u = x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]))
    return y, u


@torch.library.register_fake("moslora_ext::backward")
def _backward_fake(grad_out, x, weight, lora_A, mixer, lora_B, u, scale, dropout_p, dropout_seed, output_mask):
    check_layer_args(x, weight, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed)
    check_same_dtype_device(x, "x", grad_out, "grad_out")
    check_same_dtype_device(x, "x", u, "u")
    y_sizes = [*x.shape[:-1], lora_B.shape[0]]
    n, r = math.prod(x.shape[:-1]), lora_A.shape[0]
    torch._check_value(list(grad_out.shape) == y_sizes, lambda: "moslora_ext: grad_out must have the output's "
                       f"shape {y_sizes}, got {list(grad_out.shape)}")
    torch._check_value(u.dim() == 2 and u.shape[0] == n and u.shape[1] == r, lambda: "moslora_ext: u must have "
                       f"shape ({n}, {r}) as returned by forward, got {list(u.shape)}")
    shapes = (x.shape, lora_A.shape, mixer.shape, lora_B.shape)
    return tuple(x.new_empty(shape) if needed else None for shape, needed in zip(shapes, output_mask))


@torch.library.register_fake("moslora_ext::merge_")
def _merge_fake(weight, lora_A, mixer, lora_B, scale):
    check_adapter(weight, "weight", weight, lora_A, mixer, lora_B, adapter_dtype_free=True)
    check_scale(scale, opmath_dtype(weight.dtype))


@torch.library.register_fake("moslora_ext::dropout")
def _dropout_fake(x, p, seed):
    torch._check_type(x.is_floating_point(), lambda: "moslora_ext: dropout needs a floating point x, got "
                      f"{dtype_name(x.dtype)}")
    torch._check_value(x.dim() >= 1, lambda: "moslora_ext: dropout needs x with at least one dimension")
    check_dropout(p, seed, x)
    # As the op: p = 0 is x.clone() (x's strides where dense), else a new contiguous tensor.
    return torch.empty_like(x) if p == 0 else x.new_empty(x.shape)


for _name, _fake in (("forward", _forward_fake), ("backward", _backward_fake), ("merge_", _merge_fake),
                     ("dropout", _dropout_fake)):
    raise_typed_errors(_name, _fake)


# ---------------------------------------------------------------------------
# Autograd of forward: the fused backward op for x and the adapter; plain
# PyTorch for the base weight and bias in the rare case they are trained.
# ---------------------------------------------------------------------------


def _forward_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed, base_out = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, weight, lora_A, mixer, lora_B, u, dropout_seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _forward_backward(ctx, grad_y, grad_u):
    refuse_double_backward()
    x, weight, lora_A, mixer, lora_B, u, dropout_seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[3], needs[4], needs[5]]
    grad_x, grad_A, grad_mixer, grad_B = _C_OPS.backward(
        grad_y, x, weight, lora_A, mixer, lora_B, u, ctx.scale, ctx.dropout_p, dropout_seed, output_mask
    )
    grad_weight = grad_bias = None
    if needs[1] or needs[2]:
        grad_y2 = grad_y.reshape(-1, lora_B.shape[0])
        if needs[1]:
            grad_weight = grad_y2.t() @ x.reshape(-1, weight.shape[1])
        if needs[2]:
            grad_bias = grad_y2.sum(0)
    grad_base_out = grad_y if len(needs) > 9 and needs[9] else None  # base_out may be left to its default
    return grad_x, grad_weight, grad_bias, grad_A, grad_mixer, grad_B, None, None, None, grad_base_out


torch.library.register_autograd("moslora_ext::forward", _forward_backward, setup_context=_forward_setup_context)
