"""All-or-nothing adapter injection for the PEFT route's tuner (``MoSLoRAModel``).

PEFT replaces target modules one by one, adds the new adapter to layers and
wrappers (``modules_to_save``) that hold others, and freezes parameters as it
goes, so a refusal found only at some module (a layer type MoSLoRA does not
support, ``lora_dropout`` on a ``target_parameters`` wrapper, a bad
``modules_to_save``) would leave the model part adapted. ``AllOrNothingInjection``
takes a snapshot before ``inject_adapter`` and, when it fails (``get_peft_model``,
``add_adapter``, ``inject_adapter_in_model``), restores it, then re-raises.
"""

import copy


class AllOrNothingInjection:
    """A mixin for a PEFT ``LoraModel``: ``inject_adapter`` changes the model
    completely or not at all."""

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        snapshot = Snapshot([self, *model.modules()])
        try:
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            snapshot.restore()
            raise


class Snapshot:
    """The state of ``modules`` that an injection changes: each module's
    attributes (children, and PEFT's per-adapter bookkeeping: ``r``,
    ``scaling``, a wrapper's ``_adapters``...), the contents of the dicts,
    sets and lists they hold (restored in place, so objects that modules share
    stay shared), and every parameter's ``requires_grad``."""

    def __init__(self, modules):
        self.attributes = [(module, dict(module.__dict__)) for module in modules]
        self.contents = {}
        for _, attributes in self.attributes:
            for value in attributes.values():
                if isinstance(value, (dict, set, list)):
                    self.contents.setdefault(id(value), (value, copy.copy(value)))
        self.requires_grad = {id(p): (p, p.requires_grad) for module in modules
                              for p in module.parameters(recurse=False)}

    def restore(self):
        for module, attributes in self.attributes:
            module.__dict__.clear()
            module.__dict__.update(attributes)
        for value, saved in self.contents.values():
            value.clear()
            if isinstance(value, list):
                value.extend(saved)
            else:
                value.update(saved)
        for parameter, requires_grad in self.requires_grad.values():
            parameter.requires_grad_(requires_grad)
