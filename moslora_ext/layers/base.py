"""What every adapted layer shares: named adapters, the active one, merge/unmerge, disabling.

An adapted layer keeps its base module's ``weight`` and ``bias`` Parameters
(shared, frozen, under the base module's state-dict keys) and holds its
MoSLoRA adapters by name in ``adapters`` (state-dict keys
``adapters.<name>.lora_A``, ``.lora_mixer``, ``.lora_B``). One adapter is
active: ``lora_A``, ``r``, ``scale``... are the active adapter's, forward
computes with it alone, and ``merge()`` folds it into the weight. Each layer
type (``Linear``, ``TransposedLinear``, ``Conv``, ``Embedding``) says how its
base computes and how its adapter factors are shaped; the bookkeeping lives
here, once.
"""

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy
import torch
from torch import nn

from .. import ops
from .mixed_rows import BASE_MODEL_NAME, names_of_call, row_groups

MIXER_INITS = ("kaiming", "orthogonal", "identity", "braid")
DEFAULT_ADAPTER = "default"  # the adapter name when none is given, as in PEFT
# Names a ModuleDict cannot hold as keys: its own attributes ("training", "keys", "forward"...).
_MODULE_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name):
    """ValueError unless ``name`` can name an adapter: a non-empty string
    without "." (it separates the parts of state-dict keys), neither
    ``BASE_MODEL_NAME`` nor an attribute of ``nn.ModuleDict``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if "." in name:
        raise ValueError(f"adapter_name must not contain '.' (it separates the parts of state-dict keys), "
                         f"got {name!r}")
    if name == BASE_MODEL_NAME or name in _MODULE_DICT_ATTRIBUTES:
        raise ValueError(f"adapter_name {name!r} is reserved (the base model's name in mixed-adapter batches, or "
                         "an attribute of the torch.nn.ModuleDict that holds the adapters); choose another name")
    return name


def class_path(obj):
    """The class of ``obj`` as its users import it: ``torch.nn.Linear`` for
    torch's modules, else ``package.module.Class`` (``peft.tuners.lora.layer.Linear``)."""
    cls = type(obj)
    if cls.__module__.startswith("torch.nn.modules."):
        return f"torch.nn.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def adapter_dtype(base_dtype, autocast_adapter_dtype=True):
    """The dtype of adapter parameters on a base of ``base_dtype``: float32 for
    a float16/bfloat16 base when ``autocast_adapter_dtype``, else the base's."""
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


def init_mixer_(mixer, mixer_init, braid_subspaces=2):
    """Initialise an (r, r) mixer in place.

    "kaiming": Kaiming-uniform with a = sqrt(5), as the released MoSLoRA code;
    "orthogonal": a random orthogonal matrix; "identity": vanilla LoRA;
    "braid": the braid of k = ``braid_subspaces`` subspaces, ones(k, k) ⊗ I_{r/k}
    (k dividing r): s B M A = s (B_1+...+B_k)(A_1+...+A_k), the sums of the
    k rank-r/k branches mixed; k = 2 is the butterfly [[I, I], [I, I]].
    """
    r = mixer.shape[0]
    with torch.no_grad():
        if mixer_init == "kaiming":
            nn.init.kaiming_uniform_(mixer, a=math.sqrt(5))
        elif mixer_init == "orthogonal":
            # QR has no fp16/bf16 kernels: draw in (at least) fp32, then cast.
            dtype = torch.promote_types(mixer.dtype, torch.float32)
            mixer.copy_(nn.init.orthogonal_(torch.empty(r, r, dtype=dtype, device=mixer.device)))
        elif mixer_init == "identity":
            mixer.copy_(torch.eye(r))
        elif mixer_init == "braid":
            _check_braid(r, braid_subspaces)
            mixer.copy_(torch.eye(r // braid_subspaces).repeat(braid_subspaces, braid_subspaces))
        else:
            raise ValueError(f"mixer_init must be one of {MIXER_INITS}, got {mixer_init!r}")
    return mixer


def _check_braid(r, braid_subspaces):
    """ValueError unless ``braid_subspaces`` (k) is a positive integer dividing the rank ``r``."""
    k = braid_subspaces
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 or r % k:
        raise ValueError(f"mixer_init='braid' needs braid_subspaces (the number of subspaces k) to be a positive "
                         f"integer dividing the rank r, got braid_subspaces={k!r}, r={r}")


def refuse_non_finite(merged):
    """The refusal of a safe merge whose result ``merged`` holds inf or NaN."""
    if not torch.isfinite(merged).all():
        raise ValueError("safe merge refused: the merged weight would contain inf or NaN "
                         "(the weight is left unchanged)")


def qualified_class_names(module):
    """"package.module.Class" of the class of ``module`` (any object) and of its base classes, nearest first."""
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(module).__mro__]


def _flag(name, value):
    """A setting that must be a bool (numpy's included); "false" and 0 are refused, not guessed."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@dataclass
class AdapterConfig:
    """The settings of one adapter (the keyword arguments of ``moslora_ext.Linear``).

    Checked and normalised where they enter (ValueError naming the setting):
    ``r`` a positive integer, ``lora_alpha`` a finite real number,
    ``lora_dropout`` a real number in [0, 1), ``mixer_init`` one of
    ``MIXER_INITS``, the flags bools, ``braid_subspaces`` (the k of
    ``init_mixer_``'s braid) a positive integer dividing r, and not other
    than its default 2 unless ``mixer_init`` is "braid". numpy numbers are
    accepted and become Python numbers, so the settings always fit in JSON;
    strings such as ``"16"`` or ``"false"`` are refused.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    mixer_init: str = "kaiming"
    train_mixer: bool = True
    use_rslora: bool = False
    autocast_adapter_dtype: bool = True
    braid_subspaces: int = 2

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise ValueError(f"r (the adapter rank) must be a positive integer, got {self.r!r}")
        self.r = int(self.r)
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"lora_alpha must be a finite real number, got {alpha!r}")
        self.lora_alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {p!r}")
        self.lora_dropout = float(p)
        if not isinstance(self.mixer_init, str) or self.mixer_init not in MIXER_INITS:
            raise ValueError(f"mixer_init must be one of {MIXER_INITS}, got {self.mixer_init!r}")
        for flag in ("train_mixer", "use_rslora", "autocast_adapter_dtype"):
            setattr(self, flag, _flag(flag, getattr(self, flag)))
        k = self.braid_subspaces
        if self.mixer_init == "braid":
            _check_braid(self.r, k)
        elif isinstance(k, bool) or not isinstance(k, numbers.Integral) or k != 2:
            raise ValueError(f"braid_subspaces={k!r} is the number of subspaces of mixer_init='braid', but mixer_init "
                             f"is {self.mixer_init!r}: leave braid_subspaces out or set mixer_init='braid'")
        self.braid_subspaces = int(k)

    @property
    def scale(self):
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


class Adapter(nn.Module):
    """One named adapter of a layer: ``lora_A``, ``lora_mixer`` (r x r),
    ``lora_B`` and its settings ``config``."""

    def __init__(self, config, lora_A, lora_mixer, lora_B):
        super().__init__()
        self.config = config
        self.lora_A = nn.Parameter(lora_A)
        self.lora_mixer = nn.Parameter(lora_mixer)
        self.lora_B = nn.Parameter(lora_B)

    def set_trainable(self, trainable):
        """Only the active adapter trains; its mixer only with ``train_mixer``."""
        self.lora_A.requires_grad_(trainable)
        self.lora_B.requires_grad_(trainable)
        self.lora_mixer.requires_grad_(trainable and self.config.train_mixer)

    def extra_repr(self):
        c = self.config
        braid = f", braid_subspaces={c.braid_subspaces}" if c.mixer_init == "braid" else ""
        return (f"r={c.r}, lora_alpha={c.lora_alpha}, lora_dropout={c.lora_dropout}, mixer_init={c.mixer_init!r}"
                f"{braid}, train_mixer={c.train_mixer}, use_rslora={c.use_rslora}")


def _of_active(attribute, doc):
    return property(lambda self: getattr(self.active, attribute), doc=doc)


def _of_active_config(setting, doc):
    return property(lambda self: getattr(self.active.config, setting), doc=doc)


class AdapterLayer(nn.Module):
    """A frozen base module with named MoSLoRA adapters (see the module docstring).

    Subclasses define ``base_forward(x)`` (the base module's forward, exactly),
    ``add_adapter_output(base_out, x, adapter)`` (``base_out`` plus the
    adapter's output; ``adapter_forward`` where a fused op does both),
    ``refusal_reason(module)``,
    ``_as_matrix(weight)`` (the weight as an (out, in) matrix view, for merging),
    ``_keep_base_settings(module)`` and ``_empty_base()`` (the base module
    type, for ``unload``); ``factor_shapes`` and ``init_factors_`` where the
    linear defaults do not fit.
    """

    # Whether forward takes adapter_names (mixed-adapter batches, see moslora_ext.model.mixed_batch).
    takes_mixed_batches = True
    # Whether the base weight is stored (in, out), PEFT's fan_in_fan_out.
    fan_in_fan_out = False
    # The names PEFT gives A and B in its checkpoints.
    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    lora_A = _of_active("lora_A", "The active adapter's A (r, ...).")
    lora_mixer = _of_active("lora_mixer", "The active adapter's mixer M (r, r).")
    lora_B = _of_active("lora_B", "The active adapter's B (out, r, ...).")
    r = _of_active_config("r", "The active adapter's rank.")
    lora_alpha = _of_active_config("lora_alpha", "The active adapter's lora_alpha.")
    lora_dropout = _of_active_config("lora_dropout", "The active adapter's dropout on its input.")
    mixer_init = _of_active_config("mixer_init", "How the active adapter's mixer was initialised.")
    use_rslora = _of_active_config("use_rslora", "Whether the active adapter's scale is lora_alpha / sqrt(r).")
    autocast_adapter_dtype = _of_active_config("autocast_adapter_dtype", "See moslora_ext.Linear.")
    scale = _of_active_config("scale", "The active adapter's scale s.")

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module, adapter_name=DEFAULT_ADAPTER, _caller="from_module", **settings):
        """Wrap ``module``: its weight and bias Parameters are shared (not
        copied) and frozen, and it gets one adapter, ``adapter_name``, with
        ``settings`` (the fields of ``AdapterConfig``), created on the
        weight's device in its dtype (float32 on a half-precision base, see
        ``autocast_adapter_dtype``). The layer takes ``module``'s training
        mode. TypeError (and ``module`` untouched) if ``module`` cannot take
        this kind of adapter, ValueError for bad settings."""
        reason = cls.refusal_reason(module)
        if reason:
            raise TypeError(f"{cls.__name__}.{_caller}'s argument {reason}")
        check_adapter_name(adapter_name)
        return cls.wrap(module, adapter_name, cls.build_adapter(module.weight, AdapterConfig(**settings)))

    @classmethod
    def wrap(cls, module, adapter_name, adapter):
        """The layer of ``module`` (checked by ``refusal_reason``) holding
        ``adapter`` (from ``build_adapter``) as ``adapter_name``, active.
        Cannot fail: all checks come before."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._adopt(module, adapter_name, adapter)
        return layer

    def _adopt(self, module, adapter_name, adapter):
        module.weight.requires_grad_(False)
        if getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(False)
        self._hold_base(module)
        self._keep_base_settings(module)
        self.adapters = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.merged = False  # whether the active adapter is folded into the weight
        self.disabled = False  # whether forward computes the base alone (moslora_ext.disable_adapters)
        self.attach_adapter(adapter_name, adapter)
        self.train(module.training)

    def _hold_base(self, module):
        # The base's Parameters themselves, under the base module's state-dict keys.
        self.weight = module.weight
        self.bias = getattr(module, "bias", None)

    @classmethod
    def refusal_reason(cls, module):
        """Why ``module`` cannot take this kind of adapter, or None."""
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            return f"is a {class_path(module)} whose weight is not initialized yet; run a forward pass first"
        return None

    @classmethod
    def matrix_shape(cls, weight):
        """(out_features, in_features) of the map this ``weight`` stores."""
        return tuple(cls._as_matrix(weight).shape)

    @classmethod
    def factor_shapes(cls, weight, r):
        """The shapes of A, M and B on a base of this ``weight``."""
        out_features, in_features = cls.matrix_shape(weight)
        return {"lora_A": (r, in_features), "lora_mixer": (r, r), "lora_B": (out_features, r)}

    @staticmethod
    def base_dtype(weight):
        """The floating dtype the base computes in, which sets the adapter's dtype."""
        return weight.dtype

    @staticmethod
    def init_factors_(lora_A, lora_B):
        """A Kaiming-uniform (a = sqrt(5)), B zero: a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.zeros_(lora_B)

    @classmethod
    def build_adapter(cls, weight, config):
        """A new ``Adapter`` with ``config`` for a base of this ``weight``,
        attached to nothing yet (``config`` is checked by ``AdapterConfig``)."""
        dtype = adapter_dtype(cls.base_dtype(weight), config.autocast_adapter_dtype)
        factory = {"device": weight.device, "dtype": dtype}
        shapes = cls.factor_shapes(weight, config.r)
        mixer = init_mixer_(torch.empty(shapes["lora_mixer"], **factory), config.mixer_init, config.braid_subspaces)
        lora_A, lora_B = torch.empty(shapes["lora_A"], **factory), torch.empty(shapes["lora_B"], **factory)
        cls.init_factors_(lora_A, lora_B)
        return Adapter(config, lora_A, mixer, lora_B)

    # --- named adapters ----------------------------------------------------------------------

    @property
    def active(self):
        """The active ``Adapter``."""
        if self.active_adapter not in self.adapters:
            raise AttributeError(f"this {type(self).__name__} has no adapter named {self.active_adapter!r} (the "
                                 f"active adapter); it has {list(self.adapters)}")
        return self.adapters[self.active_adapter]

    def attach_adapter(self, name, adapter):
        """Hold ``adapter`` (from ``build_adapter``) as ``name`` (see
        ``check_adapter_name``); it trains only while active."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"this {type(self).__name__} already has an adapter named {name!r}")
        self.adapters[name] = adapter
        adapter.set_trainable(name == self.active_adapter)

    def add_adapter(self, name, config):
        """Add an adapter ``name`` with ``config`` (an AdapterConfig); it is
        inactive (and frozen) unless ``name`` is the active adapter's name."""
        self.attach_adapter(name, self.build_adapter(self.weight, config))

    def set_adapter(self, name):
        """Make ``name`` the active adapter (copies no weight): only its
        parameters require grad. A layer without an adapter of that name
        computes its base output. Refused while merged."""
        if self.merged:
            raise RuntimeError(f"this {type(self).__name__} has adapter {self.active_adapter!r} merged; "
                               "unmerge() before set_adapter")
        self.active_adapter = name
        for adapter_name, adapter in self.adapters.items():
            adapter.set_trainable(adapter_name == name)

    def delete_adapter(self, name):
        """Remove the adapter ``name``. Refused for the merged active adapter."""
        if self.merged and name == self.active_adapter:
            raise RuntimeError(f"adapter {name!r} is merged into this {type(self).__name__}; unmerge() first")
        del self.adapters[name]

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x, adapter_names=None):
        """The base output plus the active adapter's; with ``adapter_names``
        (one adapter name per row of x's first dimension), each row's own
        adapter's (see ``mixed_batch_forward``): given here, or by a mixed call
        of a model holding this layer (``moslora_ext.model.mixed_batch``)."""
        if adapter_names is None:
            adapter_names = names_of_call(self, x)
        if adapter_names is not None:
            return self.mixed_batch_forward(x, adapter_names)
        adapter = self.applied_adapter()
        return self.base_forward(x) if adapter is None else self.adapter_forward(x, adapter)

    def applied_adapter(self):
        """The adapter that forward adds (the active one), or None where the
        layer computes its base output alone: merged, disabled, or without
        an adapter of the active name. Warns when a merged adapter is trained."""
        if self.disabled or self.active_adapter not in self.adapters:
            return None
        adapter = self.adapters[self.active_adapter]
        if not self.merged:
            return adapter
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in adapter.parameters()):
            warnings.warn(f"adapter {self.active_adapter!r} is merged into this {type(self).__name__}'s weight, so "
                          "training gives its parameters no gradient (and a loss with nothing to train raises "
                          "'element 0 of tensors does not require grad'): unmerge before training", stacklevel=3)
        return None

    def adapter_forward(self, x, adapter):
        """The base output plus ``adapter``'s."""
        return self.add_adapter_output(self.base_forward(x), x, adapter)

    def mixed_batch_forward(self, x, adapter_names):
        """A mixed-adapter batch, as PEFT's ``adapter_names``: row i of x (its
        first dimension) gets the adapter ``adapter_names[i]``, or the base
        alone for "__base__". The base runs once on the whole batch and each
        adapter once on its rows (gathered by index), so row i is what this
        layer computes for it alone with that adapter active (up to float32
        rounding, which depends on the number of rows in GEMMs). Refused for
        unknown names, a names list that does not match x's rows, a merged
        layer, and in training mode for adapters with dropout (whose masks
        would depend on the batch). Disabled adapters (``disable_adapters``)
        give the base output."""
        groups = row_groups(self, x, adapter_names)
        if self.disabled or not groups:
            return self.base_forward(x)
        return self.grouped_forward(x, groups)

    def grouped_forward(self, x, groups):
        """The base output of the whole batch, then each adapter's added on
        its rows: [(adapter, row indices)] from ``mixed_rows.row_groups``."""
        return self._add_outputs_by_rows(self.base_forward(x), x, groups)

    def _add_outputs_by_rows(self, out, x, groups):
        # In place: out is a fresh tensor, and no op saves its output for backward. Indexing
        # (index, index_put_) rather than index_select / index_copy_: several times faster on CPU.
        for adapter, rows in groups:
            out[rows] = self.add_adapter_output(out[rows], x[rows], adapter)
        return out

    # --- merging -----------------------------------------------------------------------------

    @classmethod
    def add_update_(cls, weight, lora_A, mixer, lora_B, scale):
        """``weight += scale * B M A`` in place, on matrix views of the weight
        (``_as_matrix``), A and B: every layer type's update, also on the
        PEFT route's layers (``moslora_ext.peft.variants``)."""
        ops.merge_(cls._as_matrix(weight), lora_A.flatten(1), mixer, lora_B.flatten(1), scale)

    def _merge_into(self, weight, adapter, scale):
        self.add_update_(weight, adapter.lora_A, adapter.lora_mixer, adapter.lora_B, scale)

    @property
    def dense_shape(self):
        """The shape of the base weight as a dense tensor (the stored one's, unless quantized)."""
        return self.weight.shape

    def delta_weight(self):
        """The active adapter as an update of ``weight`` (its shape and layout,
        the adapter's dtype): ``s * B M A`` for a linear layer."""
        adapter = self.active
        delta = torch.zeros(self.dense_shape, dtype=adapter.lora_A.dtype, device=self.weight.device)
        self._merge_into(delta, adapter, adapter.config.scale)
        return delta

    def check_merge(self, safe=False, requantize=False):
        """Raise what ``merge(safe, requantize)`` would raise, changing nothing
        (the model-level merges check every layer before they merge any)."""
        adapter = self.active
        if self.merged:
            raise RuntimeError(f"this moslora_ext.{type(self).__name__} is already merged; call unmerge() first")
        if self.disabled:
            raise RuntimeError("the adapters are disabled (inside moslora_ext.disable_adapters); nothing to merge")
        if safe:
            refuse_non_finite(self._merged_weight(adapter, adapter.config.scale))

    def _merged_weight(self, adapter, scale):
        """A dense copy of the weight with ``scale * B M A`` added."""
        with torch.no_grad():
            merged = self.weight.clone()
            self._merge_into(merged, adapter, scale)
        return merged

    def merge(self, safe=False, requantize=False):
        """Fold the active adapter into ``weight`` in place; forward is then the base alone.

        With ``safe=True`` the merged weight is computed in a copy first and
        the merge is refused (ValueError, weight untouched) if it has
        non-finite values; this costs one weight-sized temporary.
        ``requantize`` allows merging into a quantized weight (see
        ``QuantizedLinear``); other layers ignore it.
        """
        self.check_merge(safe, requantize)
        self._add_to_weight(self.active, self.active.config.scale)
        self._set_merged(True)

    def _add_to_weight(self, adapter, scale):
        # The in-place update of merge and unmerge.
        self._merge_into(self.weight, adapter, scale)

    def unmerge(self, requantize=False):
        """Take the active adapter back out of ``weight`` (exact up to
        rounding). ``requantize`` as in ``merge``."""
        if not self.merged:
            raise RuntimeError(f"this moslora_ext.{type(self).__name__} is not merged; nothing to unmerge")
        self._add_to_weight(self.active, -self.active.config.scale)
        self._set_merged(False)

    def _set_merged(self, merged):
        # A transformers model's config records how many of its layers are merged (see
        # moslora_ext.model.adapters.record_adapters), so that a checkpoint saved after a layer-level merge()
        # is not loaded as if its weights held no adapter.
        self.merged = merged
        record = self.__dict__.get("_config_record")
        if record is not None:
            record["merged_layers"] = max(0, record.get("merged_layers", 0) + (1 if merged else -1))

    def unload(self):
        """The base module alone (its type, on this layer's weight and bias,
        merged or not), in this layer's training mode."""
        with torch.device("meta"):
            plain = self._empty_base()
        plain.weight = self.weight
        if self.bias is not None:
            plain.bias = self.bias
        return plain.train(self.training)

    def extra_repr(self):
        return f"active_adapter={self.active_adapter!r}, merged={self.merged}"
