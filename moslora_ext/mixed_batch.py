"""Mixed-adapter batches on whole models, as PEFT's ``adapter_names``:

    out = model(input_ids, adapter_names=["math", "code", "__base__"])   # one adapter name per batch row
    tokens = model.generate(input_ids, adapter_names=["math", "code", "__base__"])

``add_adapters`` (and every load that adds adapters) gives the model a
forward pre-hook that takes ``adapter_names`` out of the call's keyword
arguments, so that the model's own forward never sees it, checks it against
the model's adapters, and hands each adapted layer its names for the length
of that call (``AdapterLayer.mixed_batch_forward``); ``model.generate``
does the same for the length of the generation, with each name repeated
for the rows that beam search or ``num_return_sequences`` make of its row.
"""

import functools

import torch

BASE_ROWS = "__base__"  # in adapter_names, the rows that get the base model alone, as in PEFT
# Marks a model that has the hooks; the handles of one call's layer hooks live beside it.
HOOKED = "_moslora_ext_takes_adapter_names"
LAYER_HOOKS = "_moslora_ext_adapter_names_hooks"


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


def take_adapter_names(model):
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(...,
    adapter_names=[...])`` run mixed-adapter batches (see the module
    docstring); called once per model, by ``add_adapters``."""
    if getattr(model, HOOKED, False):
        return
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        # An object on the instance that holds the model: deepcopy and pickle carry it along.
        model.generate = _Generate(model)
    setattr(model, HOOKED, True)


def _hand_to_layers(model, adapter_names, expand_rows=False):
    """Check ``adapter_names`` against ``model`` and give each adapted layer
    its names (a forward pre-hook); returns the hooks' handles. With
    ``expand_rows``, a layer whose batch is k times as long (generate's
    beams and return sequences) gets each name k times, as generate
    repeats each row."""
    from .layer import AdapterLayer  # here: layer.py imports this module

    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    _check_names(adapter_names, {name for layer in layers for name in layer.adapters}, "the model")
    unsupported = sorted({type(layer).__name__ for layer in layers if not layer.takes_mixed_batches})
    if unsupported:
        raise NotImplementedError(f"adapter_names (mixed-adapter batches) is not supported on {unsupported} layers "
                                  "(adapters on expert parameters and routers); run each adapter in its own batch")
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise RuntimeError("adapter_names with gradient checkpointing in training mode: the recomputed forward "
                           "would not see the names; call model.eval() or disable gradient checkpointing")
    handles = []
    for layer in layers:
        # A layer without one of the model's adapters computes its base output for those rows.
        names = [name if name in layer.adapters else BASE_ROWS for name in adapter_names]
        hook = functools.partial(_give_names, names=names, expand_rows=expand_rows)
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _give_names(layer, args, kwargs, names, expand_rows):
    rows = args[0].shape[0] if args and args[0].dim() else len(names)
    if expand_rows and rows != len(names) and rows % len(names) == 0:
        names = [name for name in names for _ in range(rows // len(names))]
    return args, {**kwargs, "adapter_names": names}


def _before_forward(model, args, kwargs):
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is not None:
        setattr(model, LAYER_HOOKS, _hand_to_layers(model, adapter_names))
    return args, kwargs


def _after_forward(model, args, output):
    for handle in getattr(model, LAYER_HOOKS, ()):
        handle.remove()
    setattr(model, LAYER_HOOKS, [])


class _Generate:
    """The model's own ``generate``, with each batch row's adapter named in ``adapter_names``."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, adapter_names=None, **kwargs):
        model = self.model
        if adapter_names is None:
            return type(model).generate(model, *args, **kwargs)
        handles = _hand_to_layers(model, adapter_names, expand_rows=True)
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
