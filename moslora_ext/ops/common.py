"""What the dense and expert op wrappers share: autocast, dtype following, dropout seeds, and the
refusals of what the fused autograd cannot do."""

import torch


@torch.compiler.assume_constant_result
def autocast_available(device_type):
    # A constant for Dynamo: torch 2.11 cannot trace torch.amp.is_autocast_available
    # ("Attempted to call function marked as skipped"), and is_autocast_enabled
    # raises for device types without autocast (meta).
    return torch.amp.is_autocast_available(device_type)


def autocast_dtype(device_type):
    """The dtype autocast computes in on ``device_type``, or None where it is off."""
    if autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def refuse_grad_transforms(*tensors):
    # torch.func.grad/jvp/jacrev wrap their inputs; the op's autograd is a
    # plain backward formula, which those transforms cannot run.
    if any(t is not None and torch._C._functorch.is_gradtrackingtensor(t) for t in tensors):
        raise NotImplementedError("moslora_ext: torch.func transforms that differentiate (grad, jvp, jacrev, "
                                  "vjp, hessian) are not supported; use torch.autograd.grad or .backward()")


def autocast_to(t, dtype):
    # As autocast itself: float64 and non-floating tensors are left alone.
    if t is None or t.dtype == torch.float64:
        return t
    return cast_floating(t, dtype)


def cast_floating(t, dtype):
    # Non-floating tensors are left for the op's own dtype check to refuse.
    return t.to(dtype) if t.is_floating_point() else t


def new_dropout_seed():
    """A fresh dropout seed (one-element int64 CPU tensor) from torch's default generator."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def refuse_double_backward():
    """Raises NotImplementedError inside a backward run with create_graph=True:
    the fused backward ops have no derivative, so their gradients would be
    constants to a second backward (silently zero gradients)."""
    if torch.is_grad_enabled():
        raise NotImplementedError("moslora_ext: double backward (create_graph=True, higher-order gradients) "
                                  "is not supported; take first-order gradients (create_graph=False)")
