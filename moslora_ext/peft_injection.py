"""All-or-nothing adapter injection for the PEFT route's tuner (``MoSLoRAModel``).

PEFT replaces target modules one by one, so a refusal found only at some module
(a layer type MoSLoRA does not support, ``lora_dropout`` on a ``target_parameters``
wrapper) would leave the model part adapted. ``AllOrNothingInjection`` records
each replacement and, when ``inject_adapter`` fails (``get_peft_model``,
``add_adapter``), puts the original modules back and removes the new adapter
from layers that already existed, then re-raises.
"""

from peft.tuners.lora.layer import LoraLayer


class AllOrNothingInjection:
    """A mixin for a PEFT ``LoraModel``: ``inject_adapter`` changes the model
    completely or not at all."""

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        self.__dict__["_replacements"] = []  # (parent, child name, original child), in order
        try:
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            self._undo_injection(model, adapter_name)
            raise
        finally:
            self.__dict__.pop("_replacements", None)

    def _replace_module(self, parent, child_name, new_module, child):
        replacements = self.__dict__.get("_replacements")
        if replacements is not None:
            replacements.append((parent, child_name, child))
        super()._replace_module(parent, child_name, new_module, child)

    def _undo_injection(self, model, adapter_name):
        # Newest first, so that a wrapper of a wrapper (two target_parameters of one
        # module) unwinds back to the original module.
        for parent, child_name, child in reversed(self.__dict__["_replacements"]):
            setattr(parent, child_name, child)
        for module in model.modules():  # layers that existed before and got the adapter added
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                module.delete_adapter(adapter_name)
