"""What a saved folder tells PEFT and transformers, and their users, about moslora_ext.

A PEFT-route folder (``"peft_type": "MOSLORA"``) opened without ``import
moslora_ext`` makes PEFT raise ``KeyError: 'MOSLORA'``: its model card
(README.md) and adapter_config.json (the ``RECORD_FIELD`` record) therefore say
what to install and import. A ``save_adapter`` folder (the functional API's
format) is a route folder too (``moslora_ext.formats.native.save_adapter``), unless no one MoSLoRAConfig
computes its adapter as it is: then it says ``"peft_type": FUNCTIONAL_PEFT_TYPE`` (as all its folders did
before), which the PEFT route registers as a config that refuses to load, naming ``moslora_ext.load_adapter``
and the reasons its record lists.
"""

import json
import os
import re

MOSLORA_PEFT_TYPE = "MOSLORA"  # the peft_type of MoSLoRAConfig's folders (PEFT route)
RECORD_FIELD = "MOSLORA_adapter_import_moslora_ext_before_loading"  # MoSLoRAConfig's field of that name
# The mixer's tensor name in the released MoSLoRA code's files (a PEFT fork: lora_AB = nn.Linear(r, r), whose
# weight is M in B M A); the route's files name it lora_mixer.
RELEASED_MIXER_NAME = "lora_AB"
INSTALL = 'pip install --no-build-isolation "moslora_ext[peft]"'
NOTE = (f"This adapter is MoSLoRA (LoRA with an r x r mixer, peft_type MOSLORA), written by moslora_ext's PEFT "
        f"route. PEFT and transformers read it only after `import moslora_ext` (without it they raise "
        f"KeyError: 'MOSLORA'): install moslora_ext ({INSTALL}), then `import moslora_ext` before "
        f"PeftModel.from_pretrained or from_pretrained.")
CARD_HEADING = "## Loading this MoSLoRA adapter"
CARD_SECTION = f"""{CARD_HEADING}

{NOTE}

```python
import moslora_ext  # registers peft_type MOSLORA with PEFT
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```
"""
# The peft_type of save_adapter's folders: a name that says where it comes from even in PEFT's KeyError.
FUNCTIONAL_PEFT_TYPE = "moslora_ext.save_adapter (load with moslora_ext.load_adapter)"


def record():
    """The ``RECORD_FIELD`` entry of a route folder's adapter_config.json: what a reader must install."""
    from .._version import __version__

    return {"note": NOTE, "install": INSTALL, "version": __version__}


def with_route_mixer_names(state_dict):
    """``state_dict`` ({PEFT key: tensor}) with the released MoSLoRA code's mixer keys (``<layer>.lora_AB.weight``)
    named as the route names them (``<layer>.lora_mixer.weight``); ValueError for a layer that has both."""
    renamed = {re.sub(rf"\.{RELEASED_MIXER_NAME}(?=\.)", ".lora_mixer", key): key for key in state_dict}
    if len(renamed) < len(state_dict):
        both = sorted(set(state_dict) - set(renamed.values()))
        raise ValueError(f"the adapter's state dict holds both {RELEASED_MIXER_NAME} and lora_mixer tensors of a "
                         f"layer (such as {both[0]}): one mixer per layer, keep one of the two")
    return {new: state_dict[old] for new, old in renamed.items()}


def write_card_section(folder):
    """Add the section on loading to the folder's README.md (PEFT's model card), or write one with it."""
    card = os.path.join(folder, "README.md")
    text = ""
    if os.path.exists(card):
        with open(card) as f:
            text = f.read()
    if CARD_HEADING not in text:
        with open(card, "w") as f:
            f.write(f"{text.rstrip()}\n\n{CARD_SECTION}" if text else CARD_SECTION)


class FunctionalFolderConfig:
    """Stands for ``FUNCTIONAL_PEFT_TYPE`` in PEFT's config mapping: PEFT's loaders (``PeftModel.from_pretrained``,
    transformers' ``load_adapter``) that open a ``save_adapter`` folder get a ValueError naming
    ``moslora_ext.load_adapter`` instead of ``KeyError: 'peft_type'``."""

    def __init__(self, **kwargs):
        raise ValueError(self._refusal("this folder"))

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        raise ValueError(cls._refusal(path, _reasons(path)))

    @staticmethod
    def _refusal(path, reasons=()):
        why = f" ({'; '.join(reasons)})" if reasons else ""
        return (f"{path} was written by moslora_ext.save_adapter as an adapter that no MoSLoRAConfig holds as it "
                f"is{why}: load it with moslora_ext.load_adapter(model, path); to use it with PEFT, load it so and "
                "save it with moslora_ext.save_peft_adapter (a PEFT LoRA adapter), or train with "
                "moslora_ext.MoSLoRAConfig")


def _reasons(path):
    """The reasons a local save_adapter folder's record gives why it is no MOSLORA folder (none if unreadable)."""
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            reasons = json.load(f)[RECORD_FIELD]["not_for_peft"]
    except (OSError, TypeError, KeyError, ValueError):
        return []
    return [r for r in reasons if isinstance(r, str)] if isinstance(reasons, list) else []

