"""``moslora_ext.QuantizedLinear``: MoSLoRA adapters on quantized linear layers (QLoRA).

The base output comes from the base module itself (its own dequantising
kernel) and the fused adapter op adds ``s * B M A dropout(x)`` to it
(``ops.add_moslora``): no dequantised copy of the weight is kept between
calls, and dropout saves nothing of x's size. Supported bases: bitsandbytes
``Linear4bit`` (nf4, fp4), ``Linear8bitLt`` and ``nn.Linear`` layers whose
weight is a torchao quantized tensor.
"""

import warnings

import torch
from torch import nn

from .base import AdapterLayer, class_path
from .linear import Linear, quantized_kind


class QuantizedLinear(Linear):
    """A quantized linear layer (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``,
    or an ``nn.Linear`` with a torchao quantized weight) with MoSLoRA adapters:

        y = base(x) + scale * B M A dropout(x)

    ``base`` is the quantized module itself, held as ``base_layer`` (its
    state-dict keys gain that prefix, as in PEFT); ``weight`` and ``bias``
    are its own. The adapters are as ``moslora_ext.Linear``'s, in float32 by
    default (``autocast_adapter_dtype``), cast per call to x's dtype.

    Merging rounds: ``merge()`` / ``unmerge()`` are refused unless called
    with ``requantize=True``, which folds the adapter into the dequantised
    weight, quantizes it again and warns with the rounding error (bitsandbytes
    bases). ``dequantized_linear()`` gives an exact plain ``nn.Linear``
    instead (what ``merge_and_unload`` does by default).
    """

    takes_quantized = True

    @classmethod
    def refusal_reason(cls, module):
        """None for a quantized base that is quantized already (bitsandbytes
        quantizes on the move to its device) and keeps a quantized weight."""
        kind = quantized_kind(module)
        name = class_path(module)
        if kind is None:
            return (f"is a {name}, not a bitsandbytes Linear4bit or Linear8bitLt nor a torch.nn.Linear with a "
                    "torchao quantized weight")
        if kind == "4bit" and not getattr(module.weight, "bnb_quantized", False):
            return f"is a {name} whose weight is not quantized yet; move it to its device first"
        if kind == "8bit" and module.state.has_fp16_weights:
            return f"is a {name} with has_fp16_weights=True: its weight is a float weight, trained in full"
        return super().refusal_reason(module)  # nn.Linear's rules (NOT_PLAIN_LINEAR)

    @classmethod
    def matrix_shape(cls, weight):
        # A 4-bit weight is stored packed; its quant_state knows the (out, in) shape.
        return tuple(weight.quant_state.shape if hasattr(weight, "quant_state") else weight.shape)

    @staticmethod
    def base_dtype(weight):
        # The dtype the weight was quantized from (4-bit, torchao); an 8-bit weight does not keep it.
        if hasattr(weight, "quant_state"):
            return weight.quant_state.dtype
        return weight.dtype if weight.is_floating_point() else torch.float32

    def _hold_base(self, module):
        self.base_layer = module  # its forward, quantization state and state-dict entries

    @property
    def weight(self):
        """The base's quantized weight."""
        return self.base_layer.weight

    @property
    def bias(self):
        """The base's bias (or None)."""
        return self.base_layer.bias

    def _keep_base_settings(self, module):
        super()._keep_base_settings(module)
        self.kind = quantized_kind(module)

    @property
    def dense_shape(self):
        return torch.Size((self.out_features, self.in_features))

    def base_forward(self, x):
        return self.base_layer(x)

    # The base's own kernel first, then the adapters on top (ops.add_moslora), alone or mixed.
    adapter_forward = AdapterLayer.adapter_forward
    grouped_forward = AdapterLayer.grouped_forward

    # --- dequantise, requantise ------------------------------------------------------------------

    @property
    def compute_dtype(self):
        """The dtype the base computes in: bitsandbytes 4-bit's compute_dtype
        (else the dtype it was quantized from), an 8-bit base's bias dtype
        (float32 without a bias), a torchao weight's dtype."""
        if self.kind == "4bit":
            return self.base_layer.compute_dtype or self.weight.quant_state.dtype
        if self.kind == "8bit":
            return self.bias.dtype if self.bias is not None else torch.float32
        return self.weight.dtype

    def dequantized_weight(self):
        """The base weight dequantised to float32 (out_features, in_features), a new tensor."""
        weight = self.weight
        with torch.no_grad():
            if self.kind == "4bit":
                import bitsandbytes.functional as bnbf

                if getattr(weight.quant_state, "packing_format_for_cpu", False):
                    # Repacked by an inference forward on CPU: back to the standard layout first, as
                    # bitsandbytes' own state_dict does (the next such forward repacks it).
                    weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                        weight.data, weight.quant_state)
                    self.base_layer.quant_state = weight.quant_state
                return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
            if self.kind == "8bit":
                # After the first forward, bitsandbytes keeps the row scales on the layer's state.
                scales = weight.SCB if weight.SCB is not None else self.base_layer.state.SCB
                return weight.data.float() * (scales.float().view(-1, 1) / 127)
            return weight.dequantize().float()

    def _requantize(self, merged):
        """Quantize ``merged`` (float32) into the base weight, in place, as the base
        was quantized; returns the largest rounding error |requantised - merged|."""
        import bitsandbytes.functional as bnbf

        weight = self.weight
        if self.kind == "4bit":
            old = weight.quant_state
            data, state = bnbf.quantize_4bit(merged.to(old.dtype), blocksize=weight.blocksize,
                                             compress_statistics=weight.compress_statistics,
                                             quant_type=weight.quant_type, quant_storage=weight.quant_storage)
            weight.data, weight.quant_state, self.base_layer.quant_state = data, state, state
        else:
            data, scales, _ = bnbf.int8_vectorwise_quant(merged.to(torch.float16))
            weight.data, weight.CB, weight.SCB = data, data, scales
            self.base_layer.state.reset_grads()  # the next forward takes the new CB and SCB
        return (self.dequantized_weight() - merged).abs().max().item()

    def dequantized_linear(self, dtype=None):
        """A plain ``nn.Linear`` in ``dtype`` (default ``compute_dtype``) on the
        dequantised weight, with the active adapter added unless it is
        disabled, absent or merged already (exact up to that dtype, no
        requantisation), in this layer's training mode."""
        weight = self.dequantized_weight()
        if not (self.merged or self.disabled) and self.active_adapter in self.adapters:
            self._merge_into(weight, self.active, self.scale)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype or self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False).train(self.training)

    # --- merging: lossy, so only on request --------------------------------------------------------

    def _refuse_unless(self, requantize, action):
        if not requantize:
            raise RuntimeError(
                f"{action}() on a quantized layer ({type(self.base_layer).__name__}) rounds the weight: pass "
                f"requantize=True to {action} and quantize again (lossy, with a warning of the rounding error), "
                "or use merge_and_unload(model) to get a plain nn.Linear with the adapter added exactly")
        self.check_requantizable()

    def check_requantizable(self):
        """NotImplementedError unless the weight can be quantized again (bitsandbytes)."""
        if self.kind == "torchao":
            raise NotImplementedError("requantizing a torchao weight needs its quantization config; use "
                                      "merge_and_unload(model) (dequantize) instead")

    def check_merge(self, safe=False, requantize=False):
        """Merging into the quantized weight is allowed only with
        ``requantize=True`` (dequantise, add, quantize again; ``merge`` warns
        with the rounding error). ``safe`` as ``AdapterLayer.merge``."""
        self._refuse_unless(requantize, "merge")
        super().check_merge(safe)

    def _merged_weight(self, adapter, scale):
        merged = self.dequantized_weight()
        self._merge_into(merged, adapter, scale)
        return merged

    def unmerge(self, requantize=False):
        """Take the adapter back out, requantising again (so not exact): only
        with ``requantize=True``."""
        self._refuse_unless(requantize, "unmerge")
        super().unmerge()

    def _add_to_weight(self, adapter, scale):
        before = self.dequantized_weight()
        merged = self._merged_weight(adapter, scale)
        update = (merged - before).abs().max().item()
        error = self._requantize(merged)
        warnings.warn(f"requantized the merged weight of a {type(self.base_layer).__name__} ({self.kind}): "
                      f"rounding error up to {error:.3g} per weight entry, against an adapter update of up to "
                      f"{update:.3g}; the layer's outputs differ from the unmerged layer's accordingly",
                      stacklevel=3)

    def unload(self):
        """The quantized base module (with the adapter requantized into it if merged)."""
        return self.base_layer.train(self.training)

