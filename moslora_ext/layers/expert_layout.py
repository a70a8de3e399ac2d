"""PEFT's layout of an adapter on fused expert parameters (``target_parameters``), one place for both doors:
``lora_A.weight`` (E·r, in) and ``lora_B.weight`` (out, r·E), expert e's rank block of B at columns
e, e + E, ... (PEFT >= 0.18), against this library's stacked factors A (E, r, in) and B (E, out, r); and the
mixer folded into B (``B M``), computed in fp32 and rounded once, as the folders without a mixer hold it."""

import torch


def stacked_from_peft(weight_A, weight_B, count):
    """(A (E, r, in), B (E, out, r)) of PEFT's ``lora_A.weight`` and ``lora_B.weight`` for ``count`` experts
    (views where the layout allows)."""
    return (weight_A.reshape(count, -1, weight_A.shape[-1]),
            weight_B.reshape(weight_B.shape[0], -1, count).permute(2, 0, 1))


def peft_from_stacked(lora_A, lora_B):
    """PEFT's (``lora_A.weight`` (E·r, in), ``lora_B.weight`` (out, r·E)) of stacked factors."""
    count, r, in_features = lora_A.shape
    return lora_A.reshape(count * r, in_features), lora_B.permute(1, 2, 0).reshape(lora_B.shape[1], r * count)


def folded_B(lora_B, mixer):
    """``lora_B @ mixer`` (per expert for stacked factors), computed in fp32 and rounded once to B's dtype."""
    with torch.no_grad():
        return (lora_B.float() @ mixer.float()).to(lora_B.dtype)
