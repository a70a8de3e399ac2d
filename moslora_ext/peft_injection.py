"""All-or-nothing adapter injection for the PEFT route's tuner (``MoSLoRAModel``).

PEFT replaces target modules one by one, and adds the new adapter to layers that
hold others, so a refusal found only at some module (a layer type MoSLoRA does not
support, ``lora_dropout`` on a ``target_parameters`` wrapper, a bad
``modules_to_save``) would leave the model part adapted. ``AllOrNothingInjection``
takes a snapshot of the model's structure before ``inject_adapter`` and, when it
fails (``get_peft_model``, ``add_adapter``), restores it, then re-raises.
"""

from peft.tuners.tuners_utils import BaseTunerLayer


class AllOrNothingInjection:
    """A mixin for a PEFT ``LoraModel``: ``inject_adapter`` changes the model
    completely or not at all."""

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        snapshot = _Snapshot(self, model)
        try:
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            snapshot.restore(adapter_name)
            raise


class _Snapshot:
    """What ``inject_adapter`` changes: every module's children (new wrappers
    replace them; an existing layer's ``lora_A``... ModuleDicts gain entries),
    every parameter's ``requires_grad``, the tuner's lists of targeted names,
    and, in existing layers, the new adapter's settings (``r``, ``scaling``...,
    plain dicts that ``delete_adapter`` clears)."""

    def __init__(self, tuner, model):
        self.tuner, self.model = tuner, model
        self.children = [(module, dict(module._modules)) for module in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.targeted = {name: list(getattr(tuner, name))
                         for name in ("targeted_module_names", "targeted_parameter_names") if hasattr(tuner, name)}

    def restore(self, adapter_name):
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for module in self.model.modules():  # layers that existed before and got (part of) the adapter
            if isinstance(module, BaseTunerLayer) and adapter_name in module._all_available_adapter_names():
                module.delete_adapter(adapter_name)
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)
        for name, names in self.targeted.items():
            getattr(self.tuner, name)[:] = names
