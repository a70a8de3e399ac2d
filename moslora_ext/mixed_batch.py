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

The names of a call live in a ``contextvars.ContextVar``, not on the shared
modules: each thread (and asyncio task) sees only its own calls' names, and
Dynamo guards a compiled graph on the value it read, so a model compiled on
plain calls recompiles for a mixed one rather than reusing the plain graph.
"""

import contextvars
import inspect
import threading
from typing import NamedTuple

import torch

BASE_ROWS = "__base__"  # in adapter_names, the rows that get the base model alone, as in PEFT
HOOKED = "_moslora_ext_takes_adapter_names"  # marks a module that has the hooks


class _Call(NamedTuple):
    """The adapter names of a call in progress, and what to restore when it ends."""

    owner: object  # the module whose forward (or the _Generate whose generation) set them
    names: tuple  # one per batch row
    expand_rows: bool  # whether a layer's batch may be a multiple of len(names) (generate's beams)
    outer: "_Call | None"  # the call this one runs inside


# Per thread and per asyncio task, read by every adapted layer's forward (see the module docstring).
_CALL = contextvars.ContextVar("moslora_ext_adapter_names", default=None)
# Mixed calls in progress in all threads: while none is, plain calls never read _CALL, which Dynamo
# before torch 2.14 cannot trace (a plain forward compiles as one graph there too).
_active_calls = 0
_ACTIVE_CALLS_LOCK = threading.Lock()


def _check_names(adapter_names, known, holder):
    """TypeError unless ``adapter_names`` is a list of strings; ValueError
    for names neither in ``known`` nor "__base__"."""
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per batch row, got {adapter_names!r}")
    unknown = sorted(set(adapter_names) - set(known) - {BASE_ROWS})
    if unknown:
        raise ValueError(f"adapter_names has {unknown}, but {holder} has the adapters {sorted(known)} "
                         f"(and {BASE_ROWS!r} for the base alone)")


def row_groups(layer, x, adapter_names):
    """[(adapter, row indices)] of the adapters of ``layer`` that
    ``adapter_names`` (one per row of x's first dimension) uses, after
    checking them for ``AdapterLayer.mixed_batch_forward``."""
    kind = type(layer).__name__
    _check_names(adapter_names, layer.adapters, f"this {kind}")
    if x.dim() < 2 or x.shape[0] != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} names, one per batch row, but this {kind}'s input "
                         f"has shape {tuple(x.shape)}, whose first dimension must be the batch")
    if layer.merged:
        raise RuntimeError(f"adapter_names needs unmerged adapters, but this {kind} has adapter "
                           f"{layer.active_adapter!r} merged; call unmerge_adapters(model) first")
    rows = {}
    for i, name in enumerate(adapter_names):
        if name != BASE_ROWS:
            rows.setdefault(name, []).append(i)
    if layer.training:
        with_dropout = sorted(name for name in rows if layer.adapters[name].config.lora_dropout > 0)
        if with_dropout:
            raise RuntimeError(f"adapter_names in training mode: adapters {with_dropout} have lora_dropout > 0, "
                               "whose masks would depend on the batch; call model.eval() first")
    return [(layer.adapters[name], torch.tensor(indices, device=x.device)) for name, indices in rows.items()]


def names_of_call(layer, x):
    """The names that the call in progress gives ``layer`` for its input
    ``x`` (None outside a mixed-adapter call): "__base__" for the adapters
    it lacks, each name repeated for generate's extra rows."""
    if not _active_calls:
        return None
    call = _CALL.get()
    if call is None:
        return None
    names = [name if name in layer.adapters else BASE_ROWS for name in call.names]
    rows = x.shape[0] if x.dim() else len(names)
    if call.expand_rows and rows != len(names) and rows % len(names) == 0:
        names = [name for name in names for _ in range(rows // len(names))]
    return names


def take_adapter_names(model):
    """Let ``model(..., adapter_names=[...])``, the same call on any of its
    modules that hold adapted layers, and ``model.generate(...,
    adapter_names=[...])`` run mixed-adapter batches (see the module
    docstring); called by ``add_adapters`` after each change of the model's
    adapted layers (modules hooked already are left as they are)."""
    from .layer import AdapterLayer  # here: layer.py imports this module

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
    make them the names of the call in progress, until ``_leave(owner)``."""
    from .layer import AdapterLayer  # here: layer.py imports this module

    layers = [m for m in module.modules() if isinstance(m, AdapterLayer)]
    _check_names(adapter_names, {name for layer in layers for name in layer.adapters}, "the model")
    unsupported = sorted({type(layer).__name__ for layer in layers if not layer.takes_mixed_batches})
    if unsupported:
        raise NotImplementedError(f"adapter_names (mixed-adapter batches) is not supported on {unsupported} layers "
                                  "(adapters on expert parameters and routers); run each adapter in its own batch")
    if module.training and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
        raise RuntimeError("adapter_names with gradient checkpointing in training mode: the recomputed forward "
                           "would not see the names; call model.eval() or disable gradient checkpointing")
    global _active_calls
    _CALL.set(_Call(owner, tuple(adapter_names), expand_rows, _CALL.get()))
    with _ACTIVE_CALLS_LOCK:
        _active_calls += 1


def _leave(owner):
    """End the call that ``owner`` began, if it began one (its checks may have refused the names)."""
    global _active_calls
    if not _active_calls:
        return
    call = _CALL.get()
    if call is not None and call.owner is owner:
        _CALL.set(call.outer)
        with _ACTIVE_CALLS_LOCK:
            _active_calls -= 1


def _before_forward(module, args, kwargs):
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is not None:
        _enter(module, adapter_names, module)
    return args, kwargs


def _after_forward(module, args, output):
    # always_call: it runs whether forward returned or raised, so no names outlive their call.
    _leave(module)


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
            _leave(self)
