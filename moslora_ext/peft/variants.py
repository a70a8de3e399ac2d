"""The variants: what a MoSLoRA adapter adds to PEFT's LoRA layers (a ``LoraVariant`` per layer kind:
its mixer, forward on moslora_ext's ops and merges)."""

from .config import PEFT_TYPE  # noqa: F401  (first: it refuses an unsupported peft before peft is imported)

import torch  # noqa: E402
from peft.tuners.lora.layer import LoraVariant  # noqa: E402
from torch import nn  # noqa: E402

from .. import ops  # noqa: E402
from ..layers.base import init_mixer_  # noqa: E402
from ..layers.conv import CONV_FUNCTIONS, Conv  # noqa: E402
from ..layers.embedding import Embedding  # noqa: E402
from ..layers.linear import Linear, TransposedLinear  # noqa: E402


class MixerVariant(LoraVariant):
    """MoSLoRA on a PEFT LoRA layer: its ``lora_A``/``lora_B`` (or
    ``lora_embedding_A``/``_B``) plus ``lora_mixer[adapter]``, an
    ``nn.Linear(r, r, bias=False)`` whose weight is M. ``layer_class`` is the
    moslora_ext layer whose update this layer's is (its ``add_update_``)."""

    layer_class = Linear

    def supports_lora_conversion(self):
        return True  # s B M A = s (B M) A is a rank-r LoRA update

    @staticmethod
    def init(module, adapter_name, config, **kwargs):
        lora_A, _, _ = MixerVariant.factors(module, adapter_name, with_mixer=False)
        r = module.r[adapter_name]
        mixer = nn.Linear(r, r, bias=False, device="meta")  # no default draw: init_mixer_ alone uses the RNG
        mixer.weight = nn.Parameter(init_mixer_(torch.empty(r, r, device=lora_A.device, dtype=lora_A.dtype),
                                                config.mixer_init, config.braid_subspaces))
        module.lora_mixer[adapter_name] = mixer
        module.record_train_mixer(adapter_name, config.train_mixer)

    @staticmethod
    def factors(module, adapter_name, with_mixer=True):
        """(A, M, B) of the adapter, as tensors."""
        if adapter_name in module.lora_A:
            lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        else:
            lora_A, lora_B = module.lora_embedding_A[adapter_name], module.lora_embedding_B[adapter_name]
        return lora_A, module.lora_mixer[adapter_name].weight if with_mixer else None, lora_B

    @classmethod
    def _add(cls, module, adapter_name, weight, sign):
        layer_class = TransposedLinear if getattr(module, "fan_in_fan_out", False) else cls.layer_class
        layer_class.add_update_(weight, *cls.factors(module, adapter_name), sign * module.scaling[adapter_name])
        return weight

    @classmethod
    def merge_safe(cls, module, active_adapter, orig_weight):
        return cls._add(module, active_adapter, orig_weight.detach().clone(), 1)

    @classmethod
    def merge_unsafe(cls, module, active_adapter, orig_weight):
        cls._add(module, active_adapter, orig_weight.data, 1)

    @classmethod
    def unmerge(cls, module, active_adapter, orig_weight):
        return cls._add(module, active_adapter, orig_weight.data, -1)

    @staticmethod
    def dropout_p(module, adapter_name):
        dropout = module.lora_dropout[adapter_name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    @classmethod
    def forward(cls, module, active_adapter, x, result, **kwargs):
        lora_A, mixer, lora_B = cls.factors(module, active_adapter)
        # x may arrive in the adapter's dtype (PEFT's mixed batches cast it); the op computes in the base's.
        return ops.add_moslora(result, x.to(result.dtype), lora_A, mixer, lora_B, module.scaling[active_adapter],
                               cls.dropout_p(module, active_adapter))


class QuantizedVariant(MixerVariant):
    """On bitsandbytes bases PEFT quantizes again what ``merge_safe`` and
    ``unmerge`` return: the update is added in the adapter's precision
    (float32), as PEFT's LoRA adds its float32 update to the dequantized weight."""

    @classmethod
    def _added(cls, module, adapter_name, weight, sign):
        dtype = torch.promote_types(weight.dtype, cls.factors(module, adapter_name)[0].dtype)
        return cls._add(module, adapter_name, weight.detach().to(dtype, copy=True), sign)

    @classmethod
    def merge_safe(cls, module, active_adapter, orig_weight):
        return cls._added(module, active_adapter, orig_weight, 1)

    @classmethod
    def unmerge(cls, module, active_adapter, orig_weight):
        return cls._added(module, active_adapter, orig_weight, -1)


class EmbeddingVariant(MixerVariant):
    layer_class = Embedding

    @classmethod
    def forward(cls, module, active_adapter, x, result, **kwargs):
        lora_A, mixer, lora_B = cls.factors(module, active_adapter)
        after_A = module._embed(x, lora_A.t(), input_fn=module.input_fns.get(active_adapter),
                                output_fn=module.output_fns.get(active_adapter))
        update = Embedding.update_of_rows(after_A, mixer, lora_B, module.scaling[active_adapter])
        embed_scale = module._get_embed_scale()  # scaled embeddings (Gemma) scale the adapter's part too
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        return result + update.to(result.dtype)


class ConvVariant(MixerVariant):
    layer_class = Conv

    @classmethod
    def forward(cls, module, active_adapter, x, result, **kwargs):
        lora_A, mixer, lora_B = cls.factors(module, active_adapter)
        conv = module.lora_A[active_adapter]  # PEFT's A: the base's kernel, stride and padding
        return result + Conv.update(CONV_FUNCTIONS[len(conv.kernel_size)], x.to(result.dtype), lora_A, mixer, lora_B,
                                    module.scaling[active_adapter], cls.dropout_p(module, active_adapter),
                                    conv.stride, conv.padding, conv.dilation)
