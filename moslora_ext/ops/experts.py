"""The expert-adapter operators: typed wrappers over
``torch.ops.moslora_ext.experts_forward`` / ``experts_backward`` (csrc/expert_ops.cpp),
their fake kernels and autograd, and the in-place merge into a fused expert
parameter.

A fused expert parameter stacks E experts' weights, (E, out, in) (Mixtral,
Qwen3-MoE, OLMoE, DeepSeek-V3) or (E, in, out) (GPT-OSS, ``is_transposed``).
Its adapter has one A_e (r, in), M_e (r, r) and B_e (out, r) per expert,
stacked as lora_A (E, r, in), lora_mixer (E, r, r), lora_B (E, out, r).
"""

import torch

from .common import autocast_dtype, autocast_to, cast_floating, new_dropout_seed, refuse_double_backward
from .checks import check_expert_adapter, check_expert_rows, check_offsets, raise_typed_errors
from .linear import merge_

_C_OPS = torch.ops.moslora_ext


def add_experts_moslora(base_out, x, offsets, lora_A, mixer, lora_B, scale, dropout_p=0.0):
    """``base_out`` plus, on the rows of each expert e, ``scale * dropout(x_e) A_e^T M_e^T B_e^T``.

    Args:
        base_out: (S, out) the experts' base output on the routed rows.
        x: (S, in) the routed rows, sorted by expert (as transformers' grouped_mm path sorts them).
        offsets: (E,) integer cumulative row counts per expert (grouped_mm's ``offs``).
        lora_A (E, r, in), mixer (E, r, r), lora_B (E, out, r): the expert adapter.
        scale, dropout_p: as ``moslora_ext.ops.moslora_linear``.

    Differentiable in x (the adapter's part; base_out's gradient passes
    through), lora_A, mixer and lora_B. One pass over all experts: grouped
    GEMMs over the routed rows and batched GEMMs for the mixer steps, with
    no host read of the offsets on a GPU; the dropout mask is regenerated in
    backward (nothing S x in is saved). Adapter matrices of another floating
    dtype (fp32 adapters on a bf16 model) are cast to x's.
    """
    if (dtype := autocast_dtype(x.device.type)) is not None:
        x, base_out = autocast_to(x, dtype), autocast_to(base_out, dtype)
    if x.is_floating_point():
        lora_A, mixer, lora_B = (cast_floating(t, x.dtype) for t in (lora_A, mixer, lora_B))
    seed = new_dropout_seed() if dropout_p > 0 else None
    y, _ = _C_OPS.experts_forward(base_out, x, offsets, lora_A, mixer, lora_B, float(scale), float(dropout_p), seed)
    return y


def expert_matrices(weight, transposed):
    """The (out, in) matrix views of each expert of a fused ``weight``."""
    return [w.t() if transposed else w for w in weight.unbind(0)]


def merge_experts_(weight, lora_A, mixer, lora_B, scale, transposed=False):
    """``weight[e] += scale * (B_e M_e) A_e`` in place for every expert (on
    ``weight[e].t()`` when ``transposed``); a negative scale unmerges. Each
    expert goes through ``moslora_ext.ops.merge_`` (fp32 row blocks for a
    half-precision weight, no weight-sized temporary)."""
    if weight.dim() != 3 or lora_A.shape[0] != weight.shape[0]:
        raise ValueError(f"merge_experts_ needs a 3-D fused weight with one adapter per expert, got weight "
                         f"{tuple(weight.shape)} and lora_A {tuple(lora_A.shape)}")
    for e, matrix in enumerate(expert_matrices(weight, transposed)):
        merge_(matrix, lora_A[e], mixer[e], lora_B[e], scale)


# --- fake kernels ------------------------------------------------------------------------------


# Each fake runs the checks of its C++ op (ops/checks.py), with its exception types: the expert op's
# shapes, then the dtypes, devices, scale and dropout it checks as the dense op does.


@torch.library.register_fake("moslora_ext::experts_forward")
def _experts_forward_fake(base_out, x, offsets, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed):
    check_expert_adapter(x, lora_A, mixer, lora_B)
    rows, k, r = x.shape[0], lora_B.shape[1], lora_A.shape[1]
    torch._check_value(base_out.dim() == 2 and base_out.shape[0] == rows and base_out.shape[1] == k,
                       lambda: f"moslora_ext: base_out must have shape (rows, out_features) = ({rows}, {k}), got "
                       f"{list(base_out.shape)}")
    check_offsets(offsets, x, lora_A.shape[0])
    check_expert_rows(x, {"base_out": base_out}, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed)
    return torch.empty_like(base_out, memory_format=torch.contiguous_format), x.new_empty((rows, r))


@torch.library.register_fake("moslora_ext::experts_backward")
def _experts_backward_fake(grad_out, x, offsets, lora_A, mixer, lora_B, u, scale, dropout_p, dropout_seed,
                           output_mask):
    check_expert_adapter(x, lora_A, mixer, lora_B)
    rows, k, r = x.shape[0], lora_B.shape[1], lora_A.shape[1]
    torch._check_value(grad_out.dim() == 2 and grad_out.shape[0] == rows and grad_out.shape[1] == k,
                       lambda: f"moslora_ext: grad_out must have shape ({rows}, {k}), got {list(grad_out.shape)}")
    torch._check_value(u.dim() == 2 and u.shape[0] == rows and u.shape[1] == r, lambda: "moslora_ext: u must "
                       f"have shape ({rows}, {r}) as returned by experts_forward, got {list(u.shape)}")
    check_offsets(offsets, x, lora_A.shape[0])
    check_expert_rows(x, {"grad_out": grad_out, "u": u}, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed)
    return tuple(t.new_empty(t.shape) if needed else None for t, needed in zip((x, lora_A, mixer, lora_B), output_mask))


raise_typed_errors("experts_forward", _experts_forward_fake)
raise_typed_errors("experts_backward", _experts_backward_fake)


# --- autograd ----------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    base_out, x, offsets, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, offsets, lora_A, mixer, lora_B, u, dropout_seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _backward(ctx, grad_y, grad_u):
    refuse_double_backward()
    x, offsets, lora_A, mixer, lora_B, u, dropout_seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_A, grad_mixer, grad_B = _C_OPS.experts_backward(
        grad_y.contiguous(), x, offsets, lora_A, mixer, lora_B, u, ctx.scale, ctx.dropout_p, dropout_seed,
        [needs[1], needs[3], needs[4], needs[5]])
    return grad_y if needs[0] else None, grad_x, None, grad_A, grad_mixer, grad_B, None, None, None


torch.library.register_autograd("moslora_ext::experts_forward", _backward, setup_context=_setup_context)
