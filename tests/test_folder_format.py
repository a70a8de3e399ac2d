"""One folder format for save_adapter and the PEFT route: folders of older save_adapter still load, a
save_adapter folder opens in PEFT, and a route folder loads with load_adapter, all with the same outputs."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moslora_ext

DATA = os.path.join(os.path.dirname(__file__), "data")
OLD_FOLDER = os.path.join(DATA, "old_save_adapter_folder")


def base_model():  # as tests/data/make_old_save_adapter_folder.py builds it
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3))


def old_reference():
    """The output of the saved model, computed here in plain PyTorch from the folder's tensors and settings."""
    saved = load_file(os.path.join(DATA, "old_save_adapter_reference.safetensors"))
    tensors = load_file(os.path.join(OLD_FOLDER, "adapter_model.safetensors"))
    with open(os.path.join(OLD_FOLDER, "adapter_config.json")) as f:
        layers = json.load(f)["layers"]
    h = saved["x"]
    for name in ("0", "2"):
        weight, bias = saved[f"base.{name}.weight"], saved[f"base.{name}.bias"]
        scale = layers[name]["lora_alpha"] / layers[name]["r"]
        A, M, B = (tensors[f"{name}.{t}"] for t in ("lora_A", "lora_mixer", "lora_B"))
        h = torch.tanh(F.linear(h, weight, bias) + scale * F.linear(F.linear(F.linear(h, A), M), B))
    return saved, F.linear(h, tensors["4.weight"], tensors["4.bias"])


def test_a_folder_of_the_old_save_adapter_loads_with_the_same_outputs():
    saved, expected = old_reference()
    torch.testing.assert_close(expected, saved["y"], rtol=0, atol=1e-6)
    model = base_model()
    model.load_state_dict({k.removeprefix("base."): v for k, v in saved.items() if k.startswith("base.")})
    moslora_ext.load_adapter(model, OLD_FOLDER)
    torch.testing.assert_close(model.eval()(saved["x"]), expected, rtol=0, atol=1e-6)
    settings = {name: layer.active.config for name, layer in moslora_ext.adapted_layers(model).items()}
    assert {(c.r, c.lora_alpha, c.lora_dropout, c.mixer_init) for c in settings.values()} == {(2, 3, 0.1, "orthogonal")}


# --- one format for save_adapter and the PEFT route ---------------------------------------------

def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def drawn(model, seed=1):
    """Draw every trainable tensor (B starts at zero), so that the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def logits(model, seed=0):
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def route():
    from conftest import require_peft_route

    require_peft_route()
    return pytest.importorskip("peft")


@pytest.mark.parametrize("settings", [{}, {"use_rslora": True, "mixer_init": "braid", "braid_subspaces": 4}])
def test_a_save_adapter_folder_opens_in_peft_with_the_same_outputs(tmp_path, settings):
    peft = route()
    model = moslora_ext.add_adapters(tiny_llama(), ["q_proj", "v_proj", "down_proj", "embed_tokens"], r=8,
                                     lora_alpha=12, modules_to_save=["lm_head"],
                                     **({"mixer_init": "orthogonal"} | settings))
    drawn(model).eval()
    moslora_ext.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOSLORA"
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
    # and back: the same folder with load_adapter
    assert torch.equal(logits(moslora_ext.load_adapter(tiny_llama(), tmp_path).eval()), logits(model))


def test_per_layer_ranks_and_alphas_go_to_peft_as_patterns(tmp_path):
    peft = route()
    routed = drawn(peft.get_peft_model(tiny_llama(), moslora_ext.MoSLoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], mixer_init="orthogonal",
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}))).eval()
    routed.save_pretrained(tmp_path / "route")
    model = moslora_ext.load_adapter(tiny_llama(), tmp_path / "route").eval()
    ranks = {name: (layer.active.config.r, layer.active.config.lora_alpha)
             for name, layer in moslora_ext.adapted_layers(model).items()}
    assert ranks["model.layers.1.self_attn.q_proj"] == (2, 8) and ranks["model.layers.0.self_attn.v_proj"] == (4, 3)
    moslora_ext.save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert torch.equal(logits(loaded), logits(routed))


def test_a_route_folder_loads_with_load_adapter_with_the_same_outputs(tmp_path):
    peft = route()
    routed = drawn(peft.get_peft_model(tiny_llama(), moslora_ext.MoSLoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"], mixer_init="orthogonal",
        lora_dropout=0.1, train_mixer=False))).eval()
    routed.save_pretrained(tmp_path)
    model = moslora_ext.load_adapter(tiny_llama(), tmp_path).eval()
    assert torch.equal(logits(model), logits(routed))
    configs = [layer.active.config for layer in moslora_ext.adapted_layers(model).values()]
    assert {(c.r, c.lora_alpha, c.lora_dropout, c.mixer_init, c.train_mixer) for c in configs} == {
        (4, 8, 0.1, "orthogonal", False)}


def test_settings_no_moslora_config_holds_are_kept_and_peft_refuses_the_folder_by_name(tmp_path):
    peft = route()
    model = moslora_ext.add_adapters(tiny_llama(), ["q_proj"], r=4, lora_dropout=0.1)
    adapter = model.model.layers[1].self_attn.q_proj.active  # layers that differ in use_rslora
    adapter.config = dataclasses.replace(adapter.config, use_rslora=True)
    drawn(model).eval()
    moslora_ext.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == moslora_ext.peft.folder.FUNCTIONAL_PEFT_TYPE
    with pytest.raises(ValueError, match=r"differ in use_rslora.*moslora_ext\.load_adapter"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = moslora_ext.load_adapter(tiny_llama(), tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
    assert [layer.active.config.use_rslora for layer in moslora_ext.adapted_layers(loaded).values()] == [False, True]


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.b = torch.nn.Linear(4, 4)


class _Nested(torch.nn.Module):
    """Modules "a.b" and "b": a pattern for "b" that PEFT matches at the end of a name would catch "a.b" too."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _Inner(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.c(self.b(self.a.b(x)))


@pytest.mark.parametrize("save", ["save_adapter", "save_peft_adapter"])
def test_a_per_layer_alpha_stays_on_its_own_layer_through_peft(tmp_path, save):
    from peft import PeftModel

    torch.manual_seed(0)
    weights = _Nested().state_dict()

    def fresh():
        model = _Nested()
        model.load_state_dict(weights)
        return model

    model = moslora_ext.add_adapters(fresh(), ["a.b", "c"], r=2, lora_alpha=16, mixer_init="identity",
                                     train_mixer=False)
    moslora_ext.add_adapters(model, "b", r=2, lora_alpha=32, mixer_init="identity", train_mixer=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    x = torch.randn(3, 4)
    getattr(moslora_ext, save)(model, tmp_path)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(PeftModel.from_pretrained(fresh(), tmp_path)(x), expected, atol=1e-5)
        load = moslora_ext.load_adapter if save == "save_adapter" else moslora_ext.load_peft_adapter
        assert torch.allclose(load(fresh(), tmp_path)(x), expected, atol=1e-5)
