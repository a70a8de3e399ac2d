"""Misuse and edge inputs.

Every misuse case goes through the public API or a raw operator and must raise
the stated exception type with a message that names what is wrong, leaving
every weight and adapter tensor exactly as it was. The edge inputs at the end
are unusual but valid and must match the plain-PyTorch reference.
"""

import importlib.util
import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import moslora_ext
from moslora_ext import ops
from moslora_ext.peft.folder import RECORD_FIELD
from reference import assert_close_to_reference, make_adapter, moslora_reference

OPS = torch.ops.moslora_ext
K, D, R = 24, 40, 4
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def linear_4bit(quantized=True):
    """A bitsandbytes nf4 layer, quantized (by the move to its device) unless told otherwise."""
    import bitsandbytes

    layer = bitsandbytes.nn.Linear4bit(D, K, quant_type="nf4")
    return layer.to("cpu") if quantized else layer


class World:
    """Everything a misuse case may touch: a layer, a raw adapter, a small
    model with adapters, and a saved adapter of that model."""

    def __init__(self, tmp_path):
        torch.manual_seed(0)
        self.layer = moslora_ext.Linear(D, K, r=R)
        nn.init.normal_(self.layer.lora_B)
        self.raw = make_adapter(K, D, R)
        self.x = torch.randn(3, D)
        self.model = nn.Sequential(nn.Linear(D, K), nn.ReLU(), nn.Linear(K, 8))
        moslora_ext.add_adapters(self.model, ["0", "2"], r=R)
        self.saved = tmp_path / "adapter"
        moslora_ext.save_adapter(self.model, self.saved)
        self.tmp_path = tmp_path
        # Modules of supported types that cannot take an adapter.
        self.refused = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2),
                                     nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), ScaledEmbedding(10, 4))
        self.quantized = nn.Sequential(linear_4bit(), nn.ReLU(), nn.Linear(K, 8)) if HAS_BNB else nn.Sequential()
        if HAS_BNB:
            moslora_ext.add_adapters(self.quantized, "all-linear", r=R)
        # A model without adapters, every parameter trainable: a refused add_adapters must leave it so.
        self.fresh = nn.Sequential(nn.Linear(D, K), nn.ReLU(), nn.Linear(K, 8))
        # A plain layer before a 4-bit one: a refused merge of the second must not touch the first.
        self.plain_then_4bit = nn.Sequential(nn.Linear(D, D), linear_4bit()) if HAS_BNB else nn.Sequential()
        if HAS_BNB:
            moslora_ext.add_adapters(self.plain_then_4bit, "all-linear", r=R)
            nn.init.normal_(self.plain_then_4bit[0].lora_B)

    def modules(self):
        return {"layer": self.layer, "model": self.model, "refused": self.refused, "quantized": self.quantized,
                "fresh": self.fresh, "plain_then_4bit": self.plain_then_4bit}

    def tensors(self):
        found = {f"raw.{k}": v for k, v in self.raw.items() if v is not None}
        for name, module in self.modules().items():
            found.update({k: v for k, v in module.state_dict(prefix=f"{name}.").items() if isinstance(v, torch.Tensor)})
        return found

    def requires_grad(self):
        return {f"{name}.{p_name}": p.requires_grad for name, module in self.modules().items()
                for p_name, p in module.named_parameters()}

    def files(self):
        """{path: bytes} of every file under the test's folder."""
        return {path: path.read_bytes() for path in sorted(self.tmp_path.rglob("*")) if path.is_file()}

    def saved_copy(self, config=lambda c: c, weights=lambda b: b, text=None):
        """Make ``self.edited``, a copy of the saved adapter folder with its config changed by ``config``
        (a function of the parsed JSON returning the new JSON) or replaced by ``text``, and its weights
        file by ``weights`` (a function of its bytes)."""
        self.edited = self.tmp_path / "edited"
        self.edited.mkdir()
        if text is None:
            text = json.dumps(config(json.loads((self.saved / "adapter_config.json").read_text())))
        (self.edited / "adapter_config.json").write_text(text)
        data = (self.saved / "adapter_model.safetensors").read_bytes()
        (self.edited / "adapter_model.safetensors").write_bytes(weights(data))

    def edit_layer(self, **layer_settings):
        """``saved_copy`` with ``layer_settings`` written over those of layer "0"."""
        def change(config):
            config[RECORD_FIELD]["layers"]["0"].update(layer_settings)
            return config
        self.saved_copy(config=change)

    def inf_in_last_adapted_layer(self):
        with torch.no_grad():
            nn.init.normal_(self.model[0].lora_B)
            self.model[2].lora_B[0, 0] = float("inf")

    def load_fresh(self, folder, loader=moslora_ext.load_adapter):
        return loader(nn.Sequential(nn.Linear(D, K), nn.ReLU(), nn.Linear(K, 8)), folder)

    def load_edited(self):
        return self.load_fresh(self.edited)

    def merged_with_a_second_adapter(self):
        moslora_ext.add_adapters(self.model, ["0"], r=2, adapter_name="other")
        moslora_ext.merge_adapters(self.model)

    def merge_while_disabled(self):
        with moslora_ext.disable_adapters(self.model):
            moslora_ext.merge_adapters(self.model)

    def raw_forward(self, **changes):
        a = {**self.raw, "x": self.x, "scale": 0.5, "dropout_p": 0.0, "dropout_seed": None, **changes}
        return OPS.forward(a["x"], a["weight"], a["bias"], a["lora_A"], a["mixer"], a["lora_B"], a["scale"],
                           a["dropout_p"], a["dropout_seed"], a.get("base_out"))

    def raw_backward(self, grad_out=None, u=None):
        a = self.raw
        y, u_saved = self.raw_forward()
        grad_out = torch.ones_like(y) if grad_out is None else grad_out
        return OPS.backward(grad_out, self.x, a["weight"], a["lora_A"], a["mixer"], a["lora_B"],
                            u_saved if u is None else u, 0.5, 0.0, None, [True] * 4)

    def inf_adapter_layer(self):
        with torch.no_grad():
            self.layer.lora_B[0, 0] = float("inf")

    def peft_checkpoint(self, **config):
        self.peft = self.tmp_path / "peft"
        self.peft.mkdir()
        (self.peft / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 8, **config}))


class ScaledEmbedding(nn.Embedding):
    """Like the scaled word embeddings of some transformers models: a forward of its own."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


@dataclass
class Misuse:
    id: str
    act: Callable[[World], object]
    error: type
    message: str  # a regular expression the message must match
    setup: Callable[[World], object] = lambda w: None  # the legitimate steps before the misuse


def moslora_folder_without_a_mixer(world):
    """A MOSLORA folder (PeftModel.save_pretrained of a MoSLoRAConfig adapter) for world.fresh whose layer "0"
    lost its lora_mixer tensor."""
    from safetensors.torch import save_file

    world.peft_checkpoint(peft_type="MOSLORA", target_modules=["0", "2"])
    tensors = {f"base_model.model.{name}.{part}.weight": torch.randn(shape)
               for name, (fan_in, fan_out) in {"0": (D, K), "2": (K, 8)}.items()
               for part, shape in (("lora_A", (R, fan_in)), ("lora_B", (fan_out, R)))}
    tensors["base_model.model.2.lora_mixer.weight"] = torch.eye(R)
    save_file(tensors, world.peft / "adapter_model.safetensors")


def wider_model_with_adapters(r):
    model = nn.Sequential(nn.Linear(D, K), nn.ReLU(), nn.Linear(K, 8))
    return moslora_ext.add_adapters(model, ["0", "2"], r=r)


def raw_experts(**changes):
    """``experts_forward`` of two experts (rows [0, 2) and [2, 6)) with ``changes`` to its arguments."""
    a = {"base_out": torch.zeros(6, K), "x": torch.randn(6, D), "offsets": torch.tensor([2, 6]),
         "lora_A": torch.randn(2, R, D), "mixer": torch.randn(2, R, R),
         "lora_B": torch.randn(2, K, R), "scale": 0.5, "dropout_p": 0.0, "dropout_seed": None, **changes}
    return OPS.experts_forward(*a.values())


def raw_experts_backward(grad_out=None, u=None):
    y, u_saved = raw_experts()
    return OPS.experts_backward(torch.ones_like(y) if grad_out is None else grad_out, torch.randn(6, D),
                                torch.tensor([2, 6]), torch.randn(2, R, D),
                                torch.randn(2, R, R), torch.randn(2, K, R),
                                u_saved if u is None else u, 0.5, 0.0, None, [True] * 4)


MISUSES = [
    # moslora_ext.Linear
    Misuse("wrong in_features", lambda w: w.layer(torch.randn(3, D - 1)), ValueError,
           rf"in_features = {D}.*got x of shape \[3, {D - 1}\]"),
    Misuse("half x, float weight", lambda w: w.layer(w.x.half()), TypeError,
           "weight has dtype Float but x has dtype Half"),
    Misuse("integer x", lambda w: w.layer(torch.ones(3, D, dtype=torch.int64)), TypeError,
           "x must be a floating point tensor, got dtype Long"),
    Misuse("x on another device", lambda w: w.layer(torch.randn(3, D, device="meta")), ValueError,
           "lora_A is on cpu but x is on meta"),
    Misuse("r = 0", lambda w: moslora_ext.Linear(D, K, r=0), ValueError, r"r \(the adapter rank\).*got 0"),
    Misuse("negative r", lambda w: moslora_ext.Linear(D, K, r=-3), ValueError, r"r \(the adapter rank\).*got -3"),
    Misuse("fractional r", lambda w: moslora_ext.Linear(D, K, r=2.5), ValueError, "positive integer, got 2.5"),
    Misuse("dropout 1", lambda w: moslora_ext.Linear(D, K, lora_dropout=1.0), ValueError,
           r"lora_dropout must be in \[0, 1\), got 1.0"),
    Misuse("negative dropout", lambda w: moslora_ext.Linear(D, K, lora_dropout=-0.1), ValueError,
           r"lora_dropout must be in \[0, 1\), got -0.1"),
    Misuse("braid with odd r", lambda w: moslora_ext.Linear(D, K, r=3, mixer_init="braid"), ValueError,
           "braid_subspaces .*dividing the rank r, got braid_subspaces=2, r=3"),
    Misuse("braid of k not dividing r", lambda w: moslora_ext.add_adapters(w.fresh, ["0"], r=8, mixer_init="braid",
                                                                          braid_subspaces=3), ValueError,
           "braid_subspaces .*dividing the rank r, got braid_subspaces=3, r=8"),
    Misuse("braid of 0 subspaces", lambda w: moslora_ext.Linear(D, K, r=8, mixer_init="braid", braid_subspaces=0),
           ValueError, "braid_subspaces=0, r=8"),
    Misuse("braid of 2.0 subspaces", lambda w: moslora_ext.Linear(D, K, r=8, mixer_init="braid",
                                                                  braid_subspaces=2.0), ValueError,
           "positive integer dividing the rank r, got braid_subspaces=2.0"),
    Misuse("braid_subspaces without braid", lambda w: moslora_ext.add_adapters(w.fresh, ["0"], r=8,
                                                                              braid_subspaces=4), ValueError,
           "braid_subspaces=4 .*mixer_init is 'kaiming': leave braid_subspaces out or set mixer_init='braid'"),
    Misuse("unknown mixer_init", lambda w: moslora_ext.Linear(D, K, mixer_init="random"), ValueError,
           "mixer_init must be one of .*'random'"),
    Misuse("from_linear of a Conv1d", lambda w: moslora_ext.Linear.from_linear(nn.Conv1d(4, 4, 1)), TypeError,
           "from_linear's argument is a torch.nn.Conv1d, not a torch.nn.Linear"),
    Misuse("merge twice", lambda w: w.layer.merge(), RuntimeError, "already merged", setup=lambda w: w.layer.merge()),
    Misuse("unmerge when not merged", lambda w: w.layer.unmerge(), RuntimeError, "not merged"),
    Misuse("safe merge to inf", lambda w: w.layer.merge(safe=True), ValueError, "inf or NaN.*left unchanged",
           setup=World.inf_adapter_layer),
    # raw operators
    Misuse("lora_A of another in_features", lambda w: w.raw_forward(lora_A=torch.randn(R, D + 1)), ValueError,
           rf"lora_A must have shape \(r, in_features\) with in_features = {D}"),
    Misuse("mixer not square", lambda w: w.raw_forward(mixer=torch.randn(R, R - 1)), ValueError,
           rf"mixer must have shape \(r, r\) = \({R}, {R}\).*got \[{R}, {R - 1}\]"),
    Misuse("lora_B of another rank", lambda w: w.raw_forward(lora_B=torch.randn(K, R + 1)), ValueError,
           rf"lora_B must have shape \(out_features, r\) = \({K}, {R}\)"),
    Misuse("raw r = 0", lambda w: w.raw_forward(lora_A=torch.randn(0, D), mixer=torch.randn(0, 0),
                                                lora_B=torch.randn(K, 0)), ValueError, "r must be >= 1"),
    Misuse("bias of another size", lambda w: w.raw_forward(bias=torch.randn(K + 1)), ValueError,
           rf"bias must have shape \(out_features,\) = \({K},\)"),
    Misuse("double adapter, float weight", lambda w: w.raw_forward(lora_A=w.raw["lora_A"].double()), TypeError,
           "lora_A has dtype Double"),
    Misuse("raw dropout 1", lambda w: w.raw_forward(dropout_p=1.0), ValueError,
           r"dropout probability must be in \[0, 1\), got 1"),
    Misuse("raw negative dropout", lambda w: w.raw_forward(dropout_p=-0.5), ValueError,
           r"dropout probability must be in \[0, 1\)"),
    Misuse("dropout without a seed", lambda w: w.raw_forward(dropout_p=0.1), ValueError, "needs a dropout_seed"),
    Misuse("float dropout seed", lambda w: w.raw_forward(dropout_p=0.1, dropout_seed=torch.tensor([1.0])),
           ValueError, "one-element int64 CPU tensor"),
    Misuse("NaN scale", lambda w: w.raw_forward(scale=float("nan")), ValueError, "scale must be finite"),
    Misuse("backward with a wrong u", lambda w: w.raw_backward(u=torch.zeros(2, R)), ValueError,
           rf"u must have shape \(3, {R}\)"),
    Misuse("backward with a wrong grad", lambda w: w.raw_backward(grad_out=torch.ones(3, K + 1)), ValueError,
           rf"grad_out must have the output's shape \[3, {K}\]"),
    Misuse("merge_ with an integer adapter",
           lambda w: ops.merge_(w.raw["weight"], w.raw["lora_A"].long(), w.raw["mixer"], w.raw["lora_B"], 1.0),
           TypeError, "lora_A must be a floating point tensor, got dtype Long"),
    Misuse("merge_ with a transposed B",
           lambda w: ops.merge_(w.raw["weight"], w.raw["lora_A"], w.raw["mixer"], w.raw["lora_B"].t(), 1.0),
           ValueError, r"lora_B must have shape \(out_features, r\)"),
    Misuse("weight and base_out", lambda w: w.raw_forward(bias=None, base_out=torch.zeros(3, K)), ValueError,
           "either weight .* or base_out .*, not both nor neither"),
    Misuse("neither weight nor base_out", lambda w: w.raw_forward(weight=None, bias=None), ValueError,
           "either weight .* or base_out"),
    Misuse("bias with base_out", lambda w: w.raw_forward(weight=None, base_out=torch.zeros(3, K)), ValueError,
           "with base_out the bias belongs in base_out"),
    Misuse("base_out of another shape", lambda w: w.raw_forward(weight=None, bias=None, base_out=torch.zeros(3, K + 1)),
           ValueError, rf"base_out must have the output's shape \[3, {K}\]"),
    Misuse("base_out of another dtype", lambda w: w.raw_forward(weight=None, bias=None,
                                                                 base_out=torch.zeros(3, K, dtype=torch.float64)),
           TypeError, "base_out has dtype Double but x has dtype Float"),
    Misuse("dropout op with p = 1", lambda w: ops.dropout(w.x, 1.0, torch.tensor([1])), ValueError,
           r"dropout probability must be in \[0, 1\)"),
    # raw expert operators (two experts of rows [0, 2) and [2, 6))
    Misuse("experts: lora_A of another in_features", lambda w: raw_experts(lora_A=torch.randn(2, R, D + 1)),
           ValueError, rf"lora_A must have shape \(experts, r, in_features\) with in_features = {D}"),
    Misuse("experts: base_out of another shape", lambda w: raw_experts(base_out=torch.zeros(6, K + 1)), ValueError,
           rf"base_out must have shape \(rows, out_features\) = \(6, {K}\)"),
    Misuse("experts: float offsets", lambda w: raw_experts(offsets=torch.tensor([2.0, 6.0])), ValueError,
           r"offsets must be a 1-D integer tensor with one entry per expert \(2\), got dtype Float"),
    Misuse("experts: double mixer", lambda w: raw_experts(mixer=torch.randn(2, R, R, dtype=torch.float64)),
           TypeError, "mixer has dtype Double but x has dtype Float"),
    Misuse("experts: double base_out", lambda w: raw_experts(base_out=torch.zeros(6, K, dtype=torch.float64)),
           TypeError, "base_out has dtype Double but x has dtype Float"),
    Misuse("experts: integer x", lambda w: raw_experts(x=torch.ones(6, D, dtype=torch.int64)), TypeError,
           "x must be a floating point tensor, got dtype Long"),
    Misuse("experts: lora_B on another device", lambda w: raw_experts(lora_B=torch.randn(2, K, R, device="meta")),
           ValueError, "lora_B is on meta but x is on cpu"),
    Misuse("experts: offsets on another device", lambda w: raw_experts(offsets=torch.tensor([2, 6]).to("meta")),
           ValueError, "offsets is on meta but x is on cpu"),
    Misuse("experts: dropout without a seed", lambda w: raw_experts(dropout_p=0.1), ValueError,
           "needs a dropout_seed"),
    Misuse("experts: float dropout seed", lambda w: raw_experts(dropout_p=0.1, dropout_seed=torch.tensor([1.0])),
           ValueError, "one-element int64 CPU tensor"),
    Misuse("experts: NaN scale", lambda w: raw_experts(scale=float("nan")), ValueError, "scale must be finite"),
    Misuse("experts backward with a wrong u", lambda w: raw_experts_backward(u=torch.zeros(5, R)), ValueError,
           rf"u must have shape \(6, {R}\) as returned by experts_forward"),
    Misuse("experts backward with a double grad", lambda w: raw_experts_backward(
        grad_out=torch.ones(6, K, dtype=torch.float64)), TypeError, "grad_out has dtype Double but x has dtype Float"),
    # whole models
    Misuse("targets that match nothing", lambda w: moslora_ext.add_adapters(w.model, ["q_proj"]), ValueError,
           "matches no module"),
    Misuse("a target that is not a Linear", lambda w: moslora_ext.add_adapters(w.model, ["1"]), TypeError,
           "1 is a torch.nn.ReLU"),
    Misuse("adapters added twice", lambda w: moslora_ext.add_adapters(w.model, ["0"]), ValueError,
           "already has a MoSLoRA adapter named 'default'; pass another adapter_name, or delete_adapter"),
    Misuse("load over an adapter of another rank", lambda w: moslora_ext.load_adapter(
        wider_model_with_adapters(8), w.saved, replace=True), ValueError,
           "has adapter settings .*r=8.* but the checkpoint has .*r=4"),
    Misuse("load an adapter into other shapes",
           lambda w: moslora_ext.load_adapter(nn.Sequential(nn.Linear(D + 1, K), nn.ReLU(), nn.Linear(K, 8)),
                                              w.saved), ValueError, rf"0.lora_A has shape \({R}, {D}\).*needs"),
    Misuse("load an adapter into a model that lacks its layers",
           lambda w: moslora_ext.load_adapter(nn.Sequential(nn.Linear(D, K)), w.saved), ValueError,
           r"no module named \['2'\]"),
    Misuse("load under an adapter name in use", lambda w: moslora_ext.load_adapter(w.model, w.saved), ValueError,
           "adapter named 'default' already; pass replace=True"),
    Misuse("a grouped convolution", lambda w: moslora_ext.add_adapters(w.refused, ["0"]), TypeError,
           "0 is a torch.nn.Conv2d with groups=2"),
    Misuse("a convolution with reflect padding", lambda w: moslora_ext.add_adapters(w.refused, ["1"]), TypeError,
           "1 is a torch.nn.Conv1d with padding_mode='reflect'"),
    Misuse("an embedding with a forward of its own", lambda w: moslora_ext.add_adapters(w.refused, ["2"]),
           TypeError, "2 is a test_errors.ScaledEmbedding, an nn.Embedding subclass with a forward of its own"),
    Misuse("Conv.from_module of a Linear", lambda w: moslora_ext.Conv.from_module(nn.Linear(4, 4)), TypeError,
           "is a torch.nn.Linear, not a torch.nn.Conv1d, Conv2d or Conv3d"),
    Misuse("set an adapter that does not exist", lambda w: moslora_ext.set_adapter(w.model, "nope"), ValueError,
           r"no adapter named 'nope'; it has \['default'\]"),
    Misuse("switch adapters while merged", lambda w: moslora_ext.set_adapter(w.model, "other"), RuntimeError,
           "set_adapter needs unmerged adapters.*unmerge_adapters", setup=World.merged_with_a_second_adapter),
    Misuse("disable merged adapters", lambda w: moslora_ext.disable_adapters(w.model).__enter__(), RuntimeError,
           "disable_adapters needs unmerged adapters", setup=World.merged_with_a_second_adapter),
    Misuse("merge disabled adapters", World.merge_while_disabled, RuntimeError, "adapters are disabled"),
    Misuse("delete an adapter that does not exist", lambda w: moslora_ext.delete_adapter(w.model, "nope"),
           ValueError, "no adapter named 'nope'"),
    Misuse("delete a merged adapter", lambda w: moslora_ext.delete_adapter(w.model, "default"), RuntimeError,
           "adapter 'default' is merged into 2 layers", setup=World.merged_with_a_second_adapter),
    Misuse("merge_and_unload with an unknown mode", lambda w: moslora_ext.merge_and_unload(w.model, quantized="round"),
           ValueError, "quantized must be one of .*'round'"),
    Misuse("QuantizedLinear.from_module of a plain Linear",
           lambda w: moslora_ext.QuantizedLinear.from_module(nn.Linear(4, 4)), TypeError,
           "is a torch.nn.Linear, not a bitsandbytes Linear4bit or Linear8bitLt"),
    Misuse("save over a file", lambda w: moslora_ext.save_adapter(w.model, w.saved / "adapter_config.json"),
           NotADirectoryError, "exists and is not a folder"),
    Misuse("load from a path that does not exist", lambda w: w.load_fresh(w.tmp_path / "nope"), FileNotFoundError,
           "does not exist; .*does not fetch Hugging Face Hub ids"),
    Misuse("load a PEFT adapter from a path that does not exist",
           lambda w: w.load_fresh(w.tmp_path / "nope", moslora_ext.load_peft_adapter), FileNotFoundError,
           "does not exist; .*does not fetch Hugging Face Hub ids"),
    Misuse("load_peft_adapter of a moslora_ext folder", lambda w: w.load_fresh(w.saved, moslora_ext.load_peft_adapter),
           ValueError, "is a moslora_ext adapter folder .*load it with moslora_ext.load_adapter"),
    Misuse("a config whose lora_alpha is a string", World.load_edited, ValueError,
           "edited: bad adapter settings for layer 0: lora_alpha must be a finite real number, got '4'",
           setup=lambda w: w.edit_layer(lora_alpha="4")),
    Misuse("a config whose lora_alpha is NaN", World.load_edited, ValueError,
           "lora_alpha must be a finite real number, got nan", setup=lambda w: w.edit_layer(lora_alpha=float("nan"))),
    Misuse("a config whose use_rslora is a string", World.load_edited, ValueError,
           "use_rslora must be True or False, got 'false'", setup=lambda w: w.edit_layer(use_rslora="false")),
    Misuse("a config whose r is a string", World.load_edited, ValueError,
           r"r \(the adapter rank\) must be a positive integer, got '2'", setup=lambda w: w.edit_layer(r="2")),
    Misuse("a config whose braid_subspaces does not divide r", World.load_edited, ValueError,
           "bad adapter settings for layer 0: .*got braid_subspaces=3",
           setup=lambda w: w.edit_layer(mixer_init="braid", braid_subspaces=3)),
    Misuse("a config without layers", World.load_edited, ValueError, r"has no adapted layers \('layers' is \{\}\)",
           setup=lambda w: w.saved_copy(config=lambda c: {**c, RECORD_FIELD: {**c[RECORD_FIELD], "layers": {}}})),
    Misuse("a config that lacks layers", World.load_edited, ValueError, "has no adapted layers",
           setup=lambda w: w.saved_copy(config=lambda c: {RECORD_FIELD: {"format": c[RECORD_FIELD]["format"]}})),
    Misuse("a config that is a list", World.load_edited, ValueError,
           "adapter_config.json must hold a JSON object, got a list",
           setup=lambda w: w.saved_copy(config=lambda c: [c])),
    Misuse("a config that is not JSON", World.load_edited, ValueError, "edited.adapter_config.json is not valid JSON",
           setup=lambda w: w.saved_copy(text='{"format": "moslora_ext", "layers": {')),
    Misuse("modules_to_save as one string", World.load_edited, ValueError,
           "modules_to_save must be a list of module names, got 'head'",
           setup=lambda w: w.saved_copy(config=lambda c: {**c, RECORD_FIELD: {**c[RECORD_FIELD], "modules_to_save": "head"}})),
    Misuse("a truncated weights file", World.load_edited, ValueError,
           "adapter_model.safetensors cannot be read .*truncated, empty or not a tensor file",
           setup=lambda w: w.saved_copy(weights=lambda b: b[: len(b) // 2])),
    Misuse("an empty weights file", World.load_edited, ValueError, "adapter_model.safetensors cannot be read",
           setup=lambda w: w.saved_copy(weights=lambda b: b"")),
    Misuse("a corrupt weights file", World.load_edited, ValueError, "adapter_model.safetensors cannot be read",
           setup=lambda w: w.saved_copy(weights=lambda b: b"\xff" * len(b))),
    Misuse("from_linear of an adapted layer", lambda w: moslora_ext.Linear.from_linear(w.layer), TypeError,
           "Linear.from_linear's argument is a moslora_ext.layers.linear.Linear, not a torch.nn.Linear"),
    Misuse("a single-string target that matches no full name", lambda w: moslora_ext.add_adapters(w.fresh, "0x"),
           ValueError, r"a single string is a regular expression that must match a module's full name.*\['0x'\]"),
    Misuse("all-linear on a model that is itself a Linear",
           lambda w: moslora_ext.add_adapters(w.fresh[0], "all-linear"), ValueError, "matches no module"),
    Misuse("a safe merge refused by a later layer", lambda w: moslora_ext.merge_adapters(w.model, safe=True),
           ValueError, "inf or NaN", setup=World.inf_in_last_adapted_layer),
    Misuse("load a PEFT checkpoint with DoRA", lambda w: moslora_ext.load_peft_adapter(w.model, w.peft),
           ValueError, "use_dora", setup=lambda w: w.peft_checkpoint(use_dora=True)),
    Misuse("load a PEFT checkpoint without weights", lambda w: moslora_ext.load_peft_adapter(w.model, w.peft),
           FileNotFoundError, "neither adapter_model.safetensors", setup=World.peft_checkpoint),
    Misuse("load a MOSLORA folder with a layer's mixer missing",
           lambda w: moslora_ext.load_peft_adapter(w.fresh, w.peft),
           ValueError, "layer 0 has no lora_mixer tensor, but a MOSLORA folder", setup=moslora_folder_without_a_mixer),
]


if HAS_BNB:
    MISUSES += [
        Misuse("merge a quantized layer", lambda w: moslora_ext.merge_adapters(w.quantized), RuntimeError,
               r"merge\(\) on a quantized layer \(Linear4bit\) rounds the weight: pass requantize=True"),
        Misuse("merge a plain layer and then a quantized one", lambda w: moslora_ext.merge_adapters(w.plain_then_4bit),
               RuntimeError, r"merge\(\) on a quantized layer"),
        Misuse("unmerge a quantized layer", lambda w: w.quantized[0].unmerge(), RuntimeError,
               r"unmerge\(\) on a quantized layer"),
        Misuse("Linear.from_linear of a 4-bit layer", lambda w: moslora_ext.Linear.from_linear(linear_4bit()),
               TypeError,
               "is a bitsandbytes.nn.modules.Linear4bit with a quantized weight; moslora_ext.QuantizedLinear takes it"),
        Misuse("a 4-bit layer not quantized yet", lambda w: moslora_ext.add_adapters(
            nn.Sequential(linear_4bit(quantized=False)), ["0"]), TypeError,
               "0 is a bitsandbytes.nn.modules.Linear4bit whose weight is not quantized yet; "
               "move it to its device first"),
    ]


BAD_ADAPTER_NAMES = ["", "a.b", "..", "training", "keys", "forward", "__base__", 1, None]
BAD_SETTINGS = [{"lora_alpha": "16"}, {"lora_alpha": float("nan")}, {"lora_alpha": float("inf")},
                {"lora_dropout": "0.1"}, {"r": "2"}, {"r": True}, {"use_rslora": "false"}, {"train_mixer": 1},
                {"mixer_init": 3}]
MISUSES += [Misuse(f"adapter_name={name!r}", lambda w, name=name: moslora_ext.add_adapters(
    w.fresh, ["0", "2"], adapter_name=name), ValueError, "adapter_name") for name in BAD_ADAPTER_NAMES]
MISUSES += [Misuse(f"adapter_name={name!r} at load", lambda w, name=name: moslora_ext.load_adapter(
    w.fresh, w.saved, adapter_name=name), ValueError, "adapter_name") for name in BAD_ADAPTER_NAMES]
MISUSES += [Misuse(f"setting {settings}", lambda w, s=settings: moslora_ext.add_adapters(w.fresh, ["0", "2"], **s),
                   ValueError, rf"{next(iter(settings))}( \(the adapter rank\))? must be") for settings in BAD_SETTINGS]
MISUSES += [Misuse(f"Linear({settings})", lambda w, s=settings: moslora_ext.Linear(D, K, **s), ValueError,
                   rf"{next(iter(settings))}( \(the adapter rank\))? must be") for settings in BAD_SETTINGS]



def peft_route_injection(world, settings=None, adapter_name="default"):
    """``get_peft_model`` of ``world.fresh`` with a MoSLoRAConfig whose ``settings`` were set after its
    creation (as TRL may), so that the check when the model gets the adapter is the one that refuses."""
    from peft import get_peft_model

    config = moslora_ext.MoSLoRAConfig(target_modules=["0", "2"], r=R)
    for name, value in (settings or {}).items():
        setattr(config, name, value)
    get_peft_model(world.fresh, config, adapter_name=adapter_name)


if importlib.util.find_spec("peft") is not None and moslora_ext.peft.compat.unsupported_peft_reason() is None:
    # The PEFT route refuses what the functional API refuses, with the same error types.
    MISUSES += [Misuse(f"PEFT route setting {settings}", lambda w, s=settings: peft_route_injection(w, s),
                       ValueError, rf"MoSLoRAConfig: {next(iter(settings))}( \(the adapter rank\))? must be")
                for settings in BAD_SETTINGS]
    MISUSES += [Misuse(f"PEFT route adapter_name={name!r}", lambda w, name=name: peft_route_injection(
        w, adapter_name=name), ValueError, "adapter_name") for name in BAD_ADAPTER_NAMES if isinstance(name, str)]


def equal_including_nan(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("case", MISUSES, ids=[case.id for case in MISUSES])
def test_misuse_raises_a_clear_error_and_changes_nothing(case, tmp_path):
    world = World(tmp_path)
    case.setup(world)
    before = {name: t.detach().clone() for name, t in world.tensors().items()}
    requires_grad, files = world.requires_grad(), world.files()
    with pytest.raises(case.error, match=case.message):
        case.act(world)
    after = world.tensors()
    assert after.keys() == before.keys()
    changed = [name for name in before if not equal_including_nan(after[name], before[name])]
    assert not changed, f"{case.id} changed {changed}"
    assert world.requires_grad() == requires_grad
    assert world.files() == files, f"{case.id} changed the files on disk"


def test_the_misuse_table_is_large_enough():
    assert len(MISUSES) >= 100


def _ids(first, last):
    ids = [case.id for case in MISUSES]
    return ids[ids.index(first): ids.index(last) + 1]


# The misuses that reach an operator: one exception type eagerly (the C++ kernel), with fake tensors (the fake
# kernel, which is also the Meta kernel) and under torch.compile (the fake kernel, run while Dynamo traces).
OP_MISUSE_IDS = {*_ids("wrong in_features", "x on another device"),
                 *_ids("lora_A of another in_features", "experts backward with a double grad")}
OP_MISUSES = [case for case in MISUSES if case.id in OP_MISUSE_IDS]


@pytest.mark.parametrize("mode", ["eager", "fake", "compiled"])
@pytest.mark.parametrize("case", OP_MISUSES, ids=[case.id for case in OP_MISUSES])
def test_an_op_misuse_raises_one_type_eager_on_fake_tensors_and_compiled(case, mode, tmp_path):
    world = World(tmp_path)
    case.setup(world)
    if mode == "compiled":
        torch._dynamo.reset()
        compiled = torch.compile(lambda: case.act(world), backend="aot_eager", fullgraph=True)
        with pytest.raises(torch._dynamo.exc.TorchDynamoException, match=case.message) as caught:
            compiled()
        # Dynamo reports whatever a fake kernel raises as an error of its own (a TorchRuntimeError, or under
        # merge_'s no_grad an Unsupported) that names the error's type.
        assert f"got {case.error.__name__}(" in str(caught.value)
        return
    with FakeTensorMode(allow_non_fake_inputs=True) if mode == "fake" else nullcontext():
        with pytest.raises(case.error, match=case.message) as caught:
            case.act(world)
    assert caught.type is case.error


# --- edge inputs that must work ---------------------------------------------------------------


def check_forward_backward(x, adapter, device):
    """Forward and backward (x and the adapter) against the float64 reference."""
    dtype = x.dtype
    params = {k: None if v is None else v.detach().clone().requires_grad_(k in ("lora_A", "mixer", "lora_B"))
              for k, v in adapter.items()}
    x = x.detach().requires_grad_(True)
    y = ops.moslora_linear(x, params["weight"], params["bias"], params["lora_A"], params["mixer"], params["lora_B"],
                           0.7)
    grad_y = torch.randn(y.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    y.backward(grad_y)

    ref_x = x.detach().double().requires_grad_(True)
    ref = {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for k, v in params.items()}
    expected = moslora_reference(ref_x, **ref, scale=0.7)
    expected.backward(grad_y.double())
    assert_close_to_reference(y, expected, dtype)
    assert_close_to_reference(x.grad, ref_x.grad, dtype)
    for name in ("lora_A", "mixer", "lora_B"):
        assert_close_to_reference(params[name].grad, ref[name].grad, dtype)


def test_transposed_input(device):
    adapter = make_adapter(K, D, R, torch.float64, device)
    x = torch.randn(D, 9, dtype=torch.float64, device=device).t()
    assert not x.is_contiguous()
    check_forward_backward(x, adapter, device)


def test_strided_input(device):
    adapter = make_adapter(K, D, R, torch.float64, device)
    x = torch.randn(5, 4, 2 * D, dtype=torch.float64, device=device)[:, ::2, ::2]  # every other row and column
    check_forward_backward(x, adapter, device)


@pytest.mark.parametrize("lead", [(0,), (0, 3), (3, 0, 2)])
def test_empty_batch(device, lead):
    adapter = make_adapter(K, D, R, torch.float32, device)
    x = torch.zeros(*lead, D, device=device, requires_grad=True)
    y, u = OPS.forward(x, adapter["weight"], adapter["bias"], adapter["lora_A"], adapter["mixer"],
                       adapter["lora_B"], 0.7, 0.0, None)
    assert y.shape == (*lead, K) and u.shape == (0, R)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_four_dimensional_input(device):
    check_forward_backward(torch.randn(2, 3, 4, D, dtype=torch.float64, device=device),
                           make_adapter(K, D, R, torch.float64, device), device)


def test_many_rows_few_features(device):
    check_forward_backward(torch.randn(100_000, 3, device=device), make_adapter(2, 3, 2, device=device), device)


def test_rank_larger_than_the_features(device):
    check_forward_backward(torch.randn(6, 4, dtype=torch.float64, device=device),
                           make_adapter(5, 4, 16, torch.float64, device), device)
