"""``MoSLoRAConfig``: a ``peft.LoraConfig`` with the mixer's settings, its checks, and the LoRA settings it
refuses (by name, with why). Importing it refuses a peft outside the supported range."""

import dataclasses
from dataclasses import dataclass, field

from .compat import SUPPORTED_PEFT, unsupported_peft_reason

if (_reason := unsupported_peft_reason()) is not None:
    raise ImportError(_reason)

import peft  # noqa: E402
from peft import LoraConfig  # noqa: E402

from . import folder as peft_folder  # noqa: E402
from ..layers.base import MIXER_INITS, AdapterConfig  # noqa: E402


class PeftTypeName(str):
    """A peft_type outside PEFT's closed ``PeftType`` enum that behaves as its
    members do: it compares, hashes and is saved (adapter_config.json) as the
    plain string, has their ``.value``, and prints as ``PeftType.<NAME>``
    (PEFT's status reports parse that), so that PEFT and transformers code
    reading ``config.peft_type.value`` works or refuses with its own message."""

    @property
    def value(self):
        return str.__str__(self)

    def __str__(self):
        return f"PeftType.{self.value}"

    def __reduce__(self):  # copies and pickles stay PeftTypeNames
        return type(self), (self.value,)


PEFT_TYPE = PeftTypeName(peft_folder.MOSLORA_PEFT_TYPE)


# LoraConfig fields that keep their PEFT meaning on MoSLoRA layers.
KEPT_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "trainable_token_indices", "runtime_config",
    "target_parameters",  # MoE expert stacks: moslora_ext.peft.param_wrapper
    "megatron_core", "qalora_group_size",  # read only with megatron_config and use_qalora, both refused
}


# LoraConfig fields refused when set, with the reason. PEFT's LoRA variants replace the forward
# and merge that the mixer needs; the data-driven initialisations assume a mixer-free B A.
_VARIANT = "a PEFT LoRA variant, which replaces the forward and merge that MoSLoRA's mixer needs"


_INIT = "an initialisation of A and B from the base weight or data that assumes plain LoRA (no mixer)"


REFUSED_FIELDS = {
    "use_dora": "DoRA with a mixer is not implemented",
    "velora_config": _VARIANT, "alora_invocation_tokens": _VARIANT, "monteclora_config": _VARIANT,
    "use_bdlora": _VARIANT, "arrow_config": _VARIANT, "kasa_config": _VARIANT,
    "use_qalora": "QALoRA's pooled adapter input is not implemented with a mixer",
    "lora_bias": "the fused ops have no bias on B",
    "loftq_config": _INIT, "eva_config": _INIT, "corda_config": _INIT, "lora_ga_config": _INIT,
    "megatron_config": "Megatron's parallel linear layers are not supported",
    "layer_replication": "replicated layers sharing one base are not supported",
    "ensure_weight_tying": "tied embedding/output adapters would need a transposed mixer",
}


INIT_LORA_WEIGHTS = (True, False, "gaussian")


@dataclass
class MoSLoRAConfig(LoraConfig):
    """A ``peft.LoraConfig`` for MoSLoRA adapters, ``y = W0 x + s * B M A dropout(x)``,
    for ``get_peft_model``, ``PeftModel.from_pretrained``, TRL's trainers (``peft_config=``).

    Adds ``mixer_init`` ("kaiming", the default, as the released MoSLoRA code;
    "orthogonal"; "identity"; "braid"), ``braid_subspaces`` (the number k of
    subspaces of "braid", default 2, dividing r and every rank of
    ``rank_pattern``; see ``moslora_ext.Linear``) and ``train_mixer``
    (False freezes the mixer: "identity" + False is PEFT LoRA). The fields in
    ``KEPT_FIELDS`` keep their PEFT meaning (``target_modules`` with
    "all-linear", ``rank_pattern``, ``modules_to_save``, ``init_lora_weights``
    True/False/"gaussian", ...; ``fan_in_fan_out`` follows the layer type, as
    PEFT corrects it); those in ``REFUSED_FIELDS`` raise ValueError, with the
    reason, when set. Checked on creation and again when a model gets the
    adapter (TRL may change the config in between).
    """

    mixer_init: str = field(default="kaiming", metadata={"help": f"How the r x r mixer starts: one of {MIXER_INITS}"})
    train_mixer: bool = field(default=True, metadata={"help": "Whether the mixer trains (False: frozen)"})
    braid_subspaces: int = field(default=2, metadata={"help": "The number k of subspaces of mixer_init='braid' (k "
                                                               "divides every rank)"})
    # Saved in adapter_config.json (and by diffusers in a LoRA file's metadata) for a reader without moslora_ext:
    # what to install (always this version's record, peft_folder.record). Its name sorts first, so that PEFT's
    # LoraConfig(**config), which diffusers calls without moslora_ext, raises a TypeError naming it.
    MOSLORA_adapter_import_moslora_ext_before_loading: dict = field(
        default=None, metadata={"help": "What to install and import to read this adapter (set on creation)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.MOSLORA_adapter_import_moslora_ext_before_loading = peft_folder.record()
        self.check()

    def save_pretrained(self, save_directory, **kwargs):
        """PEFT's save, then the model card's section on loading (``moslora_ext.peft.folder``)."""
        super().save_pretrained(save_directory, **kwargs)
        peft_folder.write_card_section(save_directory)

    def check(self):
        """Raise ValueError, naming the field and why, for a setting MoSLoRA does not support (TypeError for
        custom layer classes)."""
        if self.init_lora_weights not in INIT_LORA_WEIGHTS:
            raise ValueError(f"MoSLoRAConfig: init_lora_weights={self.init_lora_weights!r} is not supported: it is "
                             f"{_INIT}; use one of {INIT_LORA_WEIGHTS}")
        defaults = LoraConfig()
        for name, reason in REFUSED_FIELDS.items():
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"MoSLoRAConfig: {name}={getattr(self, name)!r} is not supported: {reason}")
        self._check_adapter_settings()
        if self._custom_modules:  # set without _register_custom_module
            self._register_custom_module(self._custom_modules)

    def _check_adapter_settings(self):
        """r, lora_alpha, lora_dropout, mixer_init, braid_subspaces, train_mixer,
        use_rslora and the values of rank_pattern and alpha_pattern (each rank
        with mixer_init and braid_subspaces), by the functional API's checks
        (``AdapterConfig``: the same ValueErrors), normalised as there (numpy
        numbers become Python numbers)."""
        def checked(where, **settings):
            try:
                return AdapterConfig(**settings)
            except ValueError as error:
                raise ValueError(f"MoSLoRAConfig: {where}{error}") from None

        mixer = {"mixer_init": self.mixer_init, "braid_subspaces": self.braid_subspaces}
        adapter = checked("", r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          train_mixer=self.train_mixer, use_rslora=self.use_rslora, **mixer)
        for name in ("r", "lora_alpha", "lora_dropout", "train_mixer", "use_rslora", "braid_subspaces"):
            setattr(self, name, getattr(adapter, name))
        for pattern, setting, others in (("rank_pattern", "r", mixer), ("alpha_pattern", "lora_alpha", {})):
            values = getattr(self, pattern)
            for key, value in values.items():
                values[key] = getattr(checked(f"{pattern}[{key!r}]: ", **{setting: value}, **others), setting)

    def _register_custom_module(self, mapping):
        raise TypeError(f"MoSLoRAConfig._register_custom_module({mapping!r}) is not supported: MoSLoRA layers are "
                        "moslora_ext's (a custom LoRA layer would have no mixer); use peft.LoraConfig for custom "
                        "layers")


_unknown = {f.name for f in dataclasses.fields(LoraConfig)} - KEPT_FIELDS - REFUSED_FIELDS.keys()


def refuse_other_config(config, adapter_name):
    """TypeError, naming it, for an adapter config other than a ``MoSLoRAConfig`` on MoSLoRA layers."""
    if not isinstance(config, MoSLoRAConfig):
        raise TypeError(f"adapter {adapter_name!r} is a {type(config).__name__}, but the model holds MoSLoRA "
                        "adapters: stock PEFT LoRA and MoSLoRA adapters in one model are not supported (a MoSLoRA "
                        "layer would give it a mixer, a stock LoRA layer would drop a MoSLoRA adapter's mixer); use "
                        "a MoSLoRAConfig (mixer_init='identity', train_mixer=False computes PEFT LoRA) or another "
                        "copy of the base model")


if _unknown:  # a LoraConfig field this module does not know could change what the layers compute
    raise ImportError(f"moslora_ext does not know the LoraConfig fields {sorted(_unknown)} of peft "
                      f"{peft.__version__}; it supports peft {SUPPORTED_PEFT}")
