"""The argument checks of the fake kernels (shape-only; also the ops' Meta kernels), dense and expert
alike: those of csrc/linear_ops.cpp and csrc/expert_ops.cpp, with the exception types the C++ raises for the
same misuse (TORCH_CHECK_VALUE: ValueError, TORCH_CHECK_TYPE: TypeError) and messages that one regular
expression matches in both (dtypes as ATen names them, Float and Long; shapes as [3, 40]).

The fakes are also the Meta kernels: a meta tensor among real CPU arguments dispatches there, so every
argument's device is checked, or the real arguments would get an uninitialised result.
"""

import math

import torch

# ATen's names of the scalar types (c10::toString), which the C++ messages print.
_ATEN_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def dtype_name(dtype):
    return _ATEN_NAMES.get(dtype, str(dtype))


def _sizes(t):
    return list(t.shape)


def _is_number(value):
    # Under torch.compile a float may be symbolic; its checks are then left to the op itself.
    return isinstance(value, (int, float))


def check_floating(t, name):
    torch._check_type(t.is_floating_point(), lambda: f"moslora_ext: {name} must be a floating point tensor, "
                      f"got dtype {dtype_name(t.dtype)}")


def check_device(ref, ref_name, t, name):
    torch._check_value(t.device == ref.device, lambda: f"moslora_ext: {name} is on {t.device} but {ref_name} is on "
                       f"{ref.device}")


def check_same_dtype_device(ref, ref_name, t, name):
    """``t`` shares the dtype (TypeError) and device (ValueError) of ``ref``."""
    torch._check_type(t.dtype == ref.dtype, lambda: f"moslora_ext: {name} has dtype {dtype_name(t.dtype)} but "
                      f"{ref_name} has dtype {dtype_name(ref.dtype)}; cast them so they match")
    check_device(ref, ref_name, t, name)


def check_adapter(ref, ref_name, weight, lora_A, mixer, lora_B, adapter_dtype_free=False):
    """weight (k, d) or None, lora_A (r, d), mixer (r, r), lora_B (k, r) against each other; ``ref`` (x, or
    the weight for merge) sets their device, and their dtype too unless ``adapter_dtype_free``."""
    check_floating(ref, ref_name)
    for t, name in ((lora_A, "lora_A"), (mixer, "mixer"), (lora_B, "lora_B")):
        if adapter_dtype_free:
            check_floating(t, name)
            check_device(ref, ref_name, t, name)
        else:
            check_same_dtype_device(ref, ref_name, t, name)
    torch._check_value(lora_A.dim() == 2 and lora_B.dim() == 2, lambda: "moslora_ext: lora_A and lora_B must be "
                       f"2-D, got {_sizes(lora_A)} and {_sizes(lora_B)}")
    if weight is not None:
        check_same_dtype_device(ref, ref_name, weight, "weight")
        torch._check_value(weight.dim() == 2, lambda: "moslora_ext: weight must be 2-D (out_features, in_features), "
                           f"got shape {_sizes(weight)}")
        torch._check_value(lora_A.shape[1] == weight.shape[1], lambda: "moslora_ext: lora_A must have shape "
                           f"(r, in_features) with in_features = {weight.shape[1]} (weight has shape "
                           f"{_sizes(weight)}), got {_sizes(lora_A)}")
    k = weight.shape[0] if weight is not None else lora_B.shape[0]
    r = lora_A.shape[0]
    torch._check_value(r >= 1, lambda: f"moslora_ext: the rank r must be >= 1, lora_A has shape {_sizes(lora_A)}")
    torch._check_value(mixer.dim() == 2 and mixer.shape[0] == r and mixer.shape[1] == r,
                       lambda: f"moslora_ext: mixer must have shape (r, r) = ({r}, {r}) to match lora_A "
                       f"{_sizes(lora_A)}, got {_sizes(mixer)}")
    torch._check_value(lora_B.shape[0] == k and lora_B.shape[1] == r,
                       lambda: f"moslora_ext: lora_B must have shape (out_features, r) = ({k}, {r}) to match "
                       f"{'' if weight is None else f'weight {_sizes(weight)} and '}lora_A {_sizes(lora_A)}, "
                       f"got {_sizes(lora_B)}")


def check_input(x, lora_A):
    d = lora_A.shape[1]
    torch._check_value(x.dim() >= 1 and x.shape[-1] == d, lambda: f"moslora_ext: x must have in_features = {d} "
                       f"in its last dimension (lora_A has shape {_sizes(lora_A)}), got x of shape {_sizes(x)}")


def check_seed(seed):
    torch._check_value(seed.numel() == 1 and seed.dtype == torch.int64 and seed.device.type == "cpu",
                       lambda: "moslora_ext: dropout_seed must be a one-element int64 CPU tensor, got dtype "
                       f"{dtype_name(seed.dtype)}, shape {_sizes(seed)} on {seed.device}")


def check_dropout(p, seed, x):
    """The dropout probability and its seed, which the op reads only where p > 0; a meta seed beside
    real arguments is refused whatever p (the call came here, to the Meta kernel, because of it)."""
    if seed is not None and seed.device.type == "meta" and x.device.type != "meta":
        check_seed(seed)
    if not _is_number(p):
        return
    torch._check_value(0.0 <= p < 1.0, lambda: f"moslora_ext: dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return
    torch._check_value(seed is not None, lambda: f"moslora_ext: dropout_p = {p} > 0 needs a dropout_seed tensor")
    check_seed(seed)


def opmath_dtype(dtype):
    """The dtype an op on ``dtype`` computes in (at::toOpMathType): fp32 for the half-precision types."""
    return dtype if dtype == torch.float64 or not dtype.is_floating_point else torch.float32


def check_scale(scale, compute_dtype):
    if not _is_number(scale):
        return
    torch._check_value(math.isfinite(scale), lambda: f"moslora_ext: scale must be finite, got {scale}")
    largest = torch.finfo(torch.float64 if compute_dtype == torch.float64 else torch.float32).max
    torch._check_value(abs(scale) <= largest, lambda: f"moslora_ext: scale = {scale} overflows "
                       f"{dtype_name(compute_dtype)}, the dtype this op computes in")


def check_layer_args(x, weight, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed):
    """The checks the dense forward and backward share."""
    check_adapter(x, "x", weight, lora_A, mixer, lora_B)
    check_input(x, lora_A)
    check_scale(scale, opmath_dtype(x.dtype))
    check_dropout(dropout_p, dropout_seed, x)


# --- the expert ops ------------------------------------------------------------------------------


def check_expert_adapter(x, lora_A, mixer, lora_B):
    """lora_A (E, r, d), mixer (E, r, r), lora_B (E, k, r) against x (S, d)."""
    torch._check_value(x.dim() == 2, lambda: f"moslora_ext: x must be 2-D (rows, in_features), got shape {_sizes(x)}")
    torch._check_value(lora_A.dim() == 3 and mixer.dim() == 3 and lora_B.dim() == 3,
                       lambda: "moslora_ext: lora_A, mixer and lora_B must be 3-D (experts, ...), got "
                       f"{_sizes(lora_A)}, {_sizes(mixer)} and {_sizes(lora_B)}")
    e, r = lora_A.shape[0], lora_A.shape[1]
    torch._check_value(lora_A.shape[2] == x.shape[1], lambda: "moslora_ext: lora_A must have shape (experts, r, "
                       f"in_features) with in_features = {x.shape[1]} (x has shape {_sizes(x)}), got "
                       f"{_sizes(lora_A)}")
    torch._check_value(mixer.shape[0] == e and mixer.shape[1] == r and mixer.shape[2] == r,
                       lambda: f"moslora_ext: mixer must have shape (experts, r, r) = ({e}, {r}, {r}), got "
                       f"{_sizes(mixer)}")
    torch._check_value(lora_B.shape[0] == e and lora_B.shape[2] == r, lambda: "moslora_ext: lora_B must have shape "
                       f"(experts, out_features, r) with experts = {e} and r = {r}, got {_sizes(lora_B)}")


def check_offsets(offsets, x, experts):
    """Their metadata; their values (non-decreasing, ending at x's rows) only the op can read, and it
    reads them only on the CPU. The op moves them to x's device; a meta one beside real arguments is
    refused."""
    torch._check_value(offsets.dim() == 1 and offsets.shape[0] == experts and not offsets.is_floating_point(),
                       lambda: "moslora_ext: offsets must be a 1-D integer tensor with one entry per expert "
                       f"({experts}), got dtype {dtype_name(offsets.dtype)} and shape {_sizes(offsets)}")
    if offsets.device.type == "meta":
        check_device(x, "x", offsets, "offsets")


def check_expert_rows(x, tensors, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed):
    """What the expert op checks as the dense op does: dtypes and devices of x, the adapter and
    ``tensors`` ({name: tensor} of x's dtype and device), the scale and the dropout, its seed first."""
    if dropout_seed is not None:
        check_seed(dropout_seed)
    check_floating(x, "x")
    for t, name in ((lora_A, "lora_A"), (mixer, "mixer"), (lora_B, "lora_B")):
        check_same_dtype_device(x, "x", t, name)
    check_scale(scale, opmath_dtype(x.dtype))
    check_dropout(dropout_p, dropout_seed, x)
    for name, t in tensors.items():
        check_same_dtype_device(x, "x", t, name)


# --- the C++ kernels' errors ---------------------------------------------------------------------


def raise_typed_errors(op_name, fake):
    """Gives the eager kernels of ``moslora_ext::<op_name>`` the exception types of ``fake``'s checks.

    The C++ kernels are built on LibTorch's stable ABI, whose exceptions reach Python as ValueError
    (std::invalid_argument) or RuntimeError: nothing there maps to TypeError. So a dtype misuse
    comes out of C++ as a RuntimeError, and this kernel (on ADInplaceOrView, in front of the CPU and
    CUDA kernels; nothing on success) re-runs the op's fake kernel on the same arguments, whose checks
    raise the same message with its type. Under torch.inference_mode, which skips ADInplaceOrView,
    the RuntimeError stays.

    The kernel also runs the C++ kernel below autograd (at::AutoDispatchBelowADInplaceOrView, which
    the stable ABI lacks): the ATen calls inside are the op's own work, and their out= variants refuse
    operands that require grad where grad mode is on (the backward ops called directly, as opcheck does).
    """
    op = getattr(torch.ops.moslora_ext, op_name).default
    after = torch._C._after_ADInplaceOrView_keyset

    def kernel(keyset, *args):
        try:
            with torch._C._AutoDispatchBelowADInplaceOrView():
                return op.redispatch(keyset & after, *args)
        except RuntimeError:
            fake(*args)  # raises the TypeError or ValueError of the same check, if a check failed
            raise

    _LIBRARY.impl(op_name, kernel, "ADInplaceOrView", with_keyset=True)


_LIBRARY = torch.library.Library("moslora_ext", "IMPL")
