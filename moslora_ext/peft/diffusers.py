"""MoSLoRA adapters in diffusers, which attaches LoRA through PEFT.

``unet.add_adapter(moslora_ext.MoSLoRAConfig(...))``, ``get_peft_model_state_dict``,
``save_lora_adapter`` / ``save_lora_weights``, ``set_adapters``, ``fuse_lora``,
``disable_lora`` and ``unload_lora_weights`` work through the PEFT route as
they do for LoRA. Loading is where diffusers needs help: it builds a plain
``LoraConfig`` from the file's adapter metadata (or from its keys), which would
drop the mixer. Once diffusers' ``peft_utils`` is imported (``after_import``:
``import moslora_ext`` imports no diffusers), ``register_with_diffusers`` makes
that step build a ``MoSLoRAConfig`` from MoSLoRA metadata, and for the released
MoSLoRA code's SDXL files (``lora_AB`` mixers, no metadata), and refuse a file
with ``lora_mixer`` tensors but no metadata (its lora_alpha and mixer settings
are unknown).

The released code (its ``train_dreambooth_lora_sdxl.py --lora_use_mixer``)
trains ``LoraConfig(r=rank, lora_alpha=rank, lora_use_mixer=True)`` in its PEFT
fork and saves ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``
with ``save_lora_weights``: keys ``unet.<layer>.lora.down.weight`` (A),
``lora.up.weight`` (B) and ``lora.downB.weight`` (the mixer ``lora_AB``: diffusers
renames its ``lora_A`` prefix), no alphas, no metadata. diffusers turns these back
into ``lora_A`` / ``lora_AB`` / ``lora_B`` and its config of such a file is the
released one (r from the shapes, lora_alpha = r, so scale 1); the mixer is added
to it here, and the route's loader reads ``lora_AB`` as the mixer
(``moslora_ext.peft.folder.with_route_mixer_names``).
"""

import dataclasses
import sys

from .folder import MOSLORA_PEFT_TYPE, RELEASED_MIXER_NAME, with_route_mixer_names

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
    ``MoSLoRAConfig`` from MoSLoRA metadata and for the released code's ``lora_AB`` mixers, and refuses
    ``lora_mixer`` tensors without metadata."""

    def _create_lora_config(state_dict, network_alphas, metadata, *args, **kwargs):
        if metadata is not None and metadata.get("peft_type") == MOSLORA_PEFT_TYPE:
            return _moslora_config(metadata)
        if any(f".{RELEASED_MIXER_NAME}." in key for key in state_dict):
            with_route_mixer_names(state_dict)  # refuses a layer with two mixers before the model changes
            # diffusers' LoRA settings of A and B are the released code's; its mixer (kaiming, trained) is added
            lora = create_lora_config(state_dict, network_alphas, metadata, *args, **kwargs)
            return _moslora_config({f.name: getattr(lora, f.name) for f in dataclasses.fields(lora)
                                    if f.name != "peft_type"})
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


def _moslora_config(settings):
    """``MoSLoRAConfig(**settings)``, imported only for MoSLoRA files: it refuses an unsupported peft, under
    which diffusers' plain LoRA loads must still work."""
    from .config import MoSLoRAConfig

    return MoSLoRAConfig(**settings)
