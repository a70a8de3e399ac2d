"""MoSLoRA adapters in diffusers, which attaches LoRA through PEFT.

``unet.add_adapter(moslora_ext.MoSLoRAConfig(...))``, ``get_peft_model_state_dict``,
``save_lora_adapter`` / ``save_lora_weights``, ``set_adapters``, ``fuse_lora``,
``disable_lora`` and ``unload_lora_weights`` work through the PEFT route as
they do for LoRA. Loading is where diffusers needs help: it builds a plain
``LoraConfig`` from the file's adapter metadata (or from its keys), which would
drop the mixer. Once diffusers' ``peft_utils`` is imported (``after_import``:
``import moslora_ext`` imports no diffusers), ``register_with_diffusers`` makes
that step build a ``MoSLoRAConfig`` from MoSLoRA metadata, and refuse a file
with mixers but no metadata (its lora_alpha and mixer settings are unknown).
"""

import sys

from .folder import MOSLORA_PEFT_TYPE

PEFT_UTILS = "diffusers.utils.peft_utils"
# The modules that hold diffusers' _create_lora_config under its own name (`from ... import`).
_HOLDERS = (PEFT_UTILS, "diffusers.loaders.peft", "diffusers.loaders.lora_base")


def register_with_diffusers():
    """Make diffusers' LoRA config step read MoSLoRA files, in every module that holds it."""
    create = sys.modules[PEFT_UTILS]._create_lora_config
    if getattr(create, "reads_moslora", False):
        return
    wrapped = _reading_moslora(create)
    for name in _HOLDERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "_create_lora_config", None) is create:
            module._create_lora_config = wrapped


def _reading_moslora(create_lora_config):
    """diffusers' ``_create_lora_config(state_dict, network_alphas, metadata, ...)``, which builds a
    ``MoSLoRAConfig`` from MoSLoRA metadata and refuses mixers without metadata."""

    def _create_lora_config(state_dict, network_alphas, metadata, *args, **kwargs):
        if metadata is not None and metadata.get("peft_type") == MOSLORA_PEFT_TYPE:
            from .config import MoSLoRAConfig

            return MoSLoRAConfig(**metadata)
        if any(".lora_mixer." in key for key in state_dict):
            raise ValueError(
                "this LoRA file holds MoSLoRA mixers (lora_mixer) but no MoSLoRA adapter metadata, so its "
                "lora_alpha and mixer settings are unknown and diffusers would build a plain LoraConfig without "
                "the mixers: save it with unet.save_lora_adapter, or pass "
                "unet_lora_adapter_metadata=unet.peft_config[name].to_dict() to save_lora_weights; or load it "
                "with metadata=<that dict>")
        return create_lora_config(state_dict, network_alphas, metadata, *args, **kwargs)

    _create_lora_config.reads_moslora = True
    return _create_lora_config
