"""The registry of base module kinds (moslora_ext.layers.dispatch): a new base type added with one entry and
one adapter class is taken by both doors, add_adapters and the PEFT route, and removed again."""

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from torch import nn

import moslora_ext
from moslora_ext import ops
from moslora_ext.layers.base import AdapterLayer, class_path
from moslora_ext.layers.dispatch import (
    BaseKind,
    adapter_class,
    base_kinds,
    refusal_reason,
    register_base_kind,
    registered_base_kind,
    unregister_base_kind,
)
from moslora_ext.peft.layers import MoSLoRALayer


class ScaledLinear(nn.Module):
    """A toy base type that is no nn.Linear: (x W^T + b) * c."""

    def __init__(self, in_features, out_features, c=0.5):
        super().__init__()
        self.in_features, self.out_features, self.c = in_features, out_features, c
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.c


class AdaptedScaledLinear(AdapterLayer):
    """Its adapter layer: the base's own forward plus s B M A x."""

    takes_mixed_batches = False

    @classmethod
    def refusal_reason(cls, module):
        if not isinstance(module, ScaledLinear):
            return f"is a {class_path(module)}, not a ScaledLinear"
        return super().refusal_reason(module)

    @staticmethod
    def _as_matrix(weight):
        return weight

    def _keep_base_settings(self, module):
        self.out_features, self.in_features = module.weight.shape
        self.c = module.c

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.c

    def add_adapter_output(self, base_out, x, adapter):
        return ops.add_moslora(base_out, x, adapter.lora_A, adapter.lora_mixer, adapter.lora_B, adapter.config.scale)

    def _empty_base(self):
        return ScaledLinear(self.in_features, self.out_features, self.c)


class MoSLoRAScaledLinear(MoSLoRALayer, lora_layer.Linear):
    """Its PEFT route layer: PEFT's LoRA Linear (the base's own forward, then the adapter) with the mixer."""


def scaled_linear_layer(target, adapter_name, config, **kwargs):
    return MoSLoRAScaledLinear(target, adapter_name, config=config, **kwargs)


SCALED = BaseKind("scaled-linear", "ScaledLinear (a test's)", AdaptedScaledLinear, (ScaledLinear,),
                  is_linear=True, peft_layer=scaled_linear_layer)


def model():
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(6, 5), nn.ReLU(), ScaledLinear(5, 4, c=2.0))


def reference(base, x, lora_A, mixer, lora_B, scale):
    """y = base(x) + s B M A x, in plain PyTorch."""
    return base(x) + scale * x @ lora_A.T @ mixer.T @ lora_B.T


def test_add_adapters_takes_a_registered_base_type():
    x = torch.randn(3, 6)
    with registered_base_kind(SCALED):
        m = moslora_ext.add_adapters(model(), target_modules=["0"], r=2, lora_alpha=4)
        layer = m[0]
        assert isinstance(layer, AdaptedScaledLinear)
        adapter = layer.adapters["default"]
        with torch.no_grad():
            adapter.lora_B.normal_()  # a fresh B is zero
        base = ScaledLinear(6, 5)
        base.load_state_dict({"weight": layer.weight, "bias": layer.bias})
        expected = reference(base, x, adapter.lora_A, adapter.lora_mixer, adapter.lora_B, adapter.config.scale)
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(m(x), m[2](F.relu(expected)))
        assert isinstance(moslora_ext.merge_and_unload(m)[0], ScaledLinear)
        # "all-linear" selects the kind, as its entry says
        assert isinstance(moslora_ext.add_adapters(model(), target_modules="all-linear")[2], AdaptedScaledLinear)
    assert "scaled-linear" not in [k.key for k in base_kinds()]
    assert adapter_class(ScaledLinear(2, 2)) is None


@pytest.mark.filterwarnings("ignore:Unsupported layer type")  # PEFT on a base type it does not know
def test_the_peft_route_takes_a_registered_base_type():
    x = torch.randn(3, 6)
    with registered_base_kind(SCALED):
        m = peft.get_peft_model(model(), moslora_ext.MoSLoRAConfig(r=2, lora_alpha=4, target_modules=["0"]))
        layer = m.base_model.model[0]
        assert isinstance(layer, MoSLoRAScaledLinear) and isinstance(layer.base_layer, ScaledLinear)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
        expected = reference(layer.base_layer, x, layer.lora_A["default"].weight, layer.lora_mixer["default"].weight,
                             layer.lora_B["default"].weight, layer.scaling["default"])
        torch.testing.assert_close(layer(x), expected)
    with pytest.raises(TypeError, match="on the PEFT route go on torch.nn.Linear.*ScaledLinear is none of them"):
        peft.get_peft_model(model(), moslora_ext.MoSLoRAConfig(target_modules=["0"]))


def test_both_doors_refuse_an_unregistered_type_naming_the_registrys_kinds():
    with pytest.raises(TypeError, match=r"0 is a .*ScaledLinear; adapters go on torch.nn.Linear, .*Embedding"):
        moslora_ext.add_adapters(model(), target_modules=["0"])
    with registered_base_kind(SCALED):
        assert "ScaledLinear (a test's)" in refusal_reason(nn.LayerNorm(3))
        assert adapter_class(ScaledLinear(3, 3)) is AdaptedScaledLinear
        with pytest.raises(TypeError, match="on the PEFT route go on .*ScaledLinear \\(a test's\\); target LayerNorm"):
            peft.get_peft_model(nn.Sequential(nn.LayerNorm(3)), moslora_ext.MoSLoRAConfig(target_modules=["0"]))
    assert "ScaledLinear" not in refusal_reason(nn.LayerNorm(3))


def test_a_kind_without_a_peft_layer_is_refused_by_the_route_only():
    kind = BaseKind("scaled-linear", "ScaledLinear (a test's)", AdaptedScaledLinear, (ScaledLinear,))
    with registered_base_kind(kind):
        assert isinstance(moslora_ext.add_adapters(model(), target_modules=["0"])[0], AdaptedScaledLinear)
        with pytest.raises(ValueError, match="matches no module"):  # not is_linear: "all-linear" leaves it out
            moslora_ext.add_adapters(model(), target_modules="all-linear")
        with pytest.raises(TypeError, match="ScaledLinear is none of them"):
            peft.get_peft_model(model(), moslora_ext.MoSLoRAConfig(target_modules=["0"]))


def test_registration_is_checked_and_undone():
    register_base_kind(SCALED)
    try:
        with pytest.raises(ValueError, match="registered already"):
            register_base_kind(SCALED)
        clash = BaseKind("other", "other", AdaptedScaledLinear, (f"{ScaledLinear.__module__}.ScaledLinear",))
        with pytest.raises(ValueError, match="belong to a registered kind"):
            register_base_kind(clash)
    finally:
        assert unregister_base_kind("scaled-linear") is SCALED
    with pytest.raises(ValueError, match="names no class"):
        register_base_kind(BaseKind("empty", "empty", AdaptedScaledLinear))
    with pytest.raises(TypeError, match="AdapterLayer"):
        register_base_kind(BaseKind("bad", "bad", nn.Linear, (ScaledLinear,)))
    assert [k.key for k in base_kinds()][:2] == ["linear", "gpt2-conv1d"]
    assert "scaled-linear" not in [k.key for k in base_kinds()]
