"""MoSLoRA adapters on the weights of mixture-of-experts routers.

A router (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``, DeepSeek-V3's
``DeepseekV3TopkRouter``, GPT-OSS's ``GptOssTopKRouter`` …) is not an
``nn.Linear``: its forward computes ``x Wᵀ`` and then routing scores
(softmax, top-k, bias corrections). Its adapter therefore acts on the weight
itself, as PEFT's ``target_parameters`` LoRA does (``gate.weight``): forward
runs the router's own forward with W + s·B M A in place of W (a tiny E×H
matrix), so whatever the router computes from its weight, it computes from
the adapted one. ``lora_dropout`` cannot act on an input here and is not
applied (PEFT refuses dropout there). Merging adds s·B M A into W in place.
"""

import warnings

import torch
from torch import nn

from .base import AdapterLayer, class_path


def is_router(module):
    """Whether ``module`` is a transformers MoE router holding a 2-D weight
    (not an ``nn.Linear``: those routers are refused, see
    ``moslora_ext.layers.linear.NOT_PLAIN_LINEAR``)."""
    weight = getattr(module, "weight", None)
    return (not isinstance(module, (nn.Linear, AdapterLayer)) and "Router" in type(module).__name__
            and isinstance(weight, nn.Parameter) and weight.dim() == 2)


class RouterWeight(AdapterLayer):
    """A router with MoSLoRA adapters on its weight (see the module docstring).
    Holds the router's parameters and buffers under their own names; ``unload()``
    gives the router back."""

    takes_mixed_batches = False

    @classmethod
    def refusal_reason(cls, module):
        if not isinstance(module, RouterWeight) and not is_router(module):
            return f"is a {class_path(module)}, not a mixture-of-experts router with a 2-D weight"
        return super().refusal_reason(module)

    @staticmethod
    def _as_matrix(weight):
        return weight

    @classmethod
    def build_adapter(cls, weight, config):
        if config.lora_dropout:
            warnings.warn(f"lora_dropout={config.lora_dropout} does not apply to router adapters, which act on the "
                          "router's weight (PEFT refuses dropout there)", stacklevel=4)
        return super().build_adapter(weight, config)

    def _hold_base(self, module):
        self.__dict__["base_router"] = module  # its forward, unregistered: the parameters are held here
        for name, parameter in module.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in module.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)

    def _keep_base_settings(self, module):
        self.out_features, self.in_features = module.weight.shape

    def forward(self, *args, **kwargs):
        adapter = self.applied_adapter()
        if adapter is None:
            return self.base_router(*args, **kwargs)
        delta = adapter.config.scale * (adapter.lora_B @ (adapter.lora_mixer @ adapter.lora_A))
        weight = self.weight + delta.to(self.weight.dtype)
        return torch.func.functional_call(self.base_router, {"weight": weight}, args, kwargs)

    def unload(self):
        """The router itself (on this weight, merged or not), in this layer's training mode."""
        return self.base_router.train(self.training)
