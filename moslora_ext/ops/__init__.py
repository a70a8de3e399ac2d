"""The moslora_ext operators (``torch.ops.moslora_ext.*``, defined in csrc/) as typed Python functions,
with their fake kernels and autograd: the dense ops (``linear``) and the expert ops (``experts``).
The lowest wing: it imports torch and nothing else of the package."""

from .common import autocast_dtype, new_dropout_seed, refuse_double_backward
from .experts import add_experts_moslora, expert_matrices, merge_experts_
from .linear import add_moslora, dropout, dropout_mask, merge_, moslora_linear

__all__ = [
    "moslora_linear", "add_moslora", "merge_", "dropout", "dropout_mask", "autocast_dtype", "new_dropout_seed",
    "refuse_double_backward", "add_experts_moslora", "merge_experts_", "expert_matrices",
]
