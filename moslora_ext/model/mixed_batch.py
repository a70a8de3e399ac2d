"""Mixed-adapter batches on whole models, as PEFT's ``adapter_names``:

    out = model(input_ids, adapter_names=["math", "code", "__base__"])   # one adapter name per batch row
    tokens = model.generate(input_ids, adapter_names=["math", "code", "__base__"])
    hidden = model.model(input_ids, adapter_names=[...])                 # a module holding adapted layers

``add_adapters`` (and every load that adds adapters) gives the model, and
each of its modules that holds adapted layers and whose forward takes
``**kwargs`` (the others refuse ``adapter_names`` with a TypeError), a forward pre-hook that takes
``adapter_names`` out of the call's keyword arguments, so that the module's
own forward never sees it, checks it against the module's adapters, and sets
it as the names of the call in progress; each adapted layer that the call
runs reads them (``names_of_call``), until the module's forward hook ends
the call. ``model.generate`` does the same for the length of the generation,
with each name repeated for the rows that beam search or
``num_return_sequences`` make of its row.

The names of a call are kept by ``moslora_ext.layers.mixed_rows`` (per thread and asyncio task).
"""

import inspect

from ..layers.base import AdapterLayer
from ..layers.mixed_rows import begin_call, check_names, end_call

HOOKED = "_moslora_ext_takes_adapter_names"  # marks a module that has the hooks


def take_adapter_names(model):
    """Let ``model(..., adapter_names=[...])``, the same call on any of its
    modules that hold adapted layers, and ``model.generate(...,
    adapter_names=[...])`` run mixed-adapter batches (see the module
    docstring); called by ``add_adapters`` after each change of the model's
    adapted layers (modules hooked already are left as they are)."""
    holders = {""}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            parts = name.split(".")
            holders.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for name in sorted(holders):
        module = model.get_submodule(name)
        # A forward without **kwargs refuses adapter_names itself (TypeError): no hooks, which cost every call.
        if getattr(module, HOOKED, False) or (module is not model and not _takes_keywords(module)):
            continue
        module.register_forward_pre_hook(_before_forward, with_kwargs=True)
        module.register_forward_hook(_after_forward, always_call=True)
        if module is model and callable(getattr(type(model), "generate", None)):
            # An object on the instance that holds the model: deepcopy and pickle carry it along.
            model.generate = _Generate(model)
        setattr(module, HOOKED, True)


def _takes_keywords(module):
    """Whether ``module``'s forward takes arbitrary keyword arguments, where adapter_names would pass unseen."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: hook it, to be safe
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _enter(module, adapter_names, owner, expand_rows=False):
    """Check ``adapter_names`` against the adapted layers of ``module``, then
    make them the names of the call in progress, until ``end_call(owner)``."""
    layers = [m for m in module.modules() if isinstance(m, AdapterLayer)]
    check_names(adapter_names, {name for layer in layers for name in layer.adapters}, "the model")
    unsupported = sorted({type(layer).__name__ for layer in layers if not layer.takes_mixed_batches})
    if unsupported:
        # ValueError, as PEFT's own refusal of mixed batches on layers without them (lora.ParamWrapper)
        raise ValueError(f"adapter_names (mixed-adapter batches) is not supported on {unsupported} layers "
                         "(adapters on expert parameters and routers); run each adapter in its own batch")
    if module.training and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
        raise RuntimeError("adapter_names with gradient checkpointing in training mode: the recomputed forward "
                           "would not see the names; call model.eval() or disable gradient checkpointing")
    begin_call(owner, adapter_names, expand_rows)


def _before_forward(module, args, kwargs):
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is not None:
        _enter(module, adapter_names, module)
    return args, kwargs


def _after_forward(module, args, output):
    # always_call: it runs whether forward returned or raised, so no names outlive their call.
    end_call(module)


class _Generate:
    """The model's own ``generate``, with each batch row's adapter named in ``adapter_names``."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, adapter_names=None, **kwargs):
        model = self.model
        if adapter_names is None:
            return type(model).generate(model, *args, **kwargs)
        _enter(model, adapter_names, self, expand_rows=True)
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            end_call(self)
