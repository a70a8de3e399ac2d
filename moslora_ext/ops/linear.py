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


# The fakes are also the ops' Meta kernels: a meta tensor among real CPU
# arguments dispatches here, so every argument's device is checked, or the
# real x would get an uninitialised result.
def _check_device(x, t, name):
    torch._check(t.device == x.device, lambda: f"moslora_ext: {name} is on {t.device} but x is on {x.device}")


def _check_like(x, t, name):
    torch._check(t.dtype == x.dtype, lambda: f"moslora_ext: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
    _check_device(x, t, name)


def _check_seed(seed):
    torch._check(seed is None or seed.device.type == "cpu",
                 lambda: f"moslora_ext: dropout_seed must be a one-element int64 CPU tensor, got one on {seed.device}")


def _check_shapes(x, weight, lora_A, mixer, lora_B, adapter_dtype_free=False):
    # weight None: adapter-only mode, in_features from lora_A and out_features from lora_B.
    if weight is not None:
        _check_like(x, weight, "weight")
    for t, name in ((lora_A, "lora_A"), (mixer, "mixer"), (lora_B, "lora_B")):
        if adapter_dtype_free:
            torch._check(t.is_floating_point(), lambda: f"moslora_ext: {name} must be a floating point tensor")
            torch._check(t.device == x.device, lambda: f"moslora_ext: {name} is on {t.device} but x is on {x.device}")
        else:
            _check_like(x, t, name)
    torch._check(lora_A.dim() == 2 and lora_B.dim() == 2, lambda: "moslora_ext: lora_A and lora_B must be 2-D, "
                 f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    r, d = lora_A.shape
    k = lora_B.shape[0]
    if weight is not None:
        torch._check(tuple(weight.shape) == (k, d), lambda: f"moslora_ext: weight has shape {tuple(weight.shape)} "
                     f"but lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} need {(k, d)}")
    torch._check(
        x.dim() >= 1 and x.shape[-1] == d,
        lambda: f"moslora_ext: x must have in_features = {d} in its last dimension, got {tuple(x.shape)}",
    )
    torch._check(r >= 1, lambda: f"moslora_ext: the rank r must be >= 1, lora_A has shape {tuple(lora_A.shape)}")
    torch._check(
        tuple(mixer.shape) == (r, r) and tuple(lora_B.shape) == (k, r),
        lambda: f"moslora_ext: inconsistent adapter shapes lora_A "
        f"{tuple(lora_A.shape)}, mixer {tuple(mixer.shape)}, lora_B {tuple(lora_B.shape)}",
    )


@torch.library.register_fake("moslora_ext::forward")
def _forward_fake(x, weight, bias, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed, base_out=None):
    torch._check((weight is None) != (base_out is None),
                 lambda: "moslora_ext: forward needs either weight or base_out, not both nor neither")
    _check_shapes(x, weight, lora_A, mixer, lora_B)
    if bias is not None:
        _check_device(x, bias, "bias")
    _check_seed(dropout_seed)
    y = x.new_empty((*x.shape[:-1], lora_B.shape[0]))
    if base_out is not None:
        _check_like(x, base_out, "base_out")
        torch._check(base_out.shape == y.shape, lambda: f"moslora_ext: base_out must have the output's shape "
                     f"{tuple(y.shape)}, got {tuple(base_out.shape)}")
    u = x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]))
    return y, u


@torch.library.register_fake("moslora_ext::backward")
def _backward_fake(grad_out, x, weight, lora_A, mixer, lora_B, u, scale, dropout_p, dropout_seed, output_mask):
    _check_shapes(x, weight, lora_A, mixer, lora_B)
    _check_like(x, grad_out, "grad_out")
    _check_like(x, u, "u")
    _check_seed(dropout_seed)
    shapes = (x.shape, lora_A.shape, mixer.shape, lora_B.shape)
    return tuple(x.new_empty(shape) if needed else None for shape, needed in zip(shapes, output_mask))


@torch.library.register_fake("moslora_ext::merge_")
def _merge_fake(weight, lora_A, mixer, lora_B, scale):
    _check_shapes(weight, weight, lora_A, mixer, lora_B, adapter_dtype_free=True)


@torch.library.register_fake("moslora_ext::dropout")
def _dropout_fake(x, p, seed):
    _check_seed(seed)
    # As the op: p = 0 is x.clone() (x's strides where dense), else a new contiguous tensor.
    return torch.empty_like(x) if p == 0 else x.new_empty(x.shape)


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
