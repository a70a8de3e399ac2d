"""The adapter names of the mixed-adapter call in progress, as each adapted layer reads them
(``names_of_call``), and the rows of a batch that each adapter gets (``row_groups``).
``moslora_ext.model.mixed_batch`` begins and ends the calls (the model's hooks and ``generate``).

The names of a call live in a ``contextvars.ContextVar``, not on the shared
modules: each thread (and asyncio task) sees only its own calls' names, and
Dynamo guards a compiled graph on the value it read, so a model compiled on
plain calls recompiles for a mixed one rather than reusing the plain graph.
"""

import contextvars
import threading
from typing import NamedTuple

import torch

BASE_MODEL_NAME = "__base__"  # in adapter_names, the rows that get the base model alone, as in PEFT: reserved


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


def check_names(adapter_names, known, holder):
    """TypeError unless ``adapter_names`` is a list of strings; ValueError
    for names neither in ``known`` nor "__base__"."""
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per batch row, got {adapter_names!r}")
    unknown = sorted(set(adapter_names) - set(known) - {BASE_MODEL_NAME})
    if unknown:
        raise ValueError(f"adapter_names has {unknown}, but {holder} has the adapters {sorted(known)} "
                         f"(and {BASE_MODEL_NAME!r} for the base alone)")


def row_groups(layer, x, adapter_names):
    """[(adapter, row indices)] of the adapters of ``layer`` that
    ``adapter_names`` (one per row of x's first dimension) uses, after
    checking them for ``AdapterLayer.mixed_batch_forward``."""
    kind = type(layer).__name__
    check_names(adapter_names, layer.adapters, f"this {kind}")
    if x.dim() < 2 or x.shape[0] != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} names, one per batch row, but this {kind}'s input "
                         f"has shape {tuple(x.shape)}, whose first dimension must be the batch")
    if layer.merged:
        raise RuntimeError(f"adapter_names needs unmerged adapters, but this {kind} has adapter "
                           f"{layer.active_adapter!r} merged; call unmerge_adapters(model) first")
    rows = {}
    for i, name in enumerate(adapter_names):
        if name != BASE_MODEL_NAME:
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
    names = [name if name in layer.adapters else BASE_MODEL_NAME for name in call.names]
    rows = x.shape[0] if x.dim() else len(names)
    if call.expand_rows and rows != len(names) and rows % len(names) == 0:
        names = [name for name in names for _ in range(rows // len(names))]
    return names


def begin_call(owner, adapter_names, expand_rows=False):
    """Make ``adapter_names`` the names of the call in progress, until ``end_call(owner)``."""
    global _active_calls
    _CALL.set(_Call(owner, tuple(adapter_names), expand_rows, _CALL.get()))
    with _ACTIVE_CALLS_LOCK:
        _active_calls += 1


def end_call(owner):
    """End the call that ``owner`` began, if it began one (its checks may have refused the names)."""
    global _active_calls
    if not _active_calls:
        return
    call = _CALL.get()
    if call is not None and call.owner is owner:
        _CALL.set(call.outer)
        with _ACTIVE_CALLS_LOCK:
            _active_calls -= 1
