"""Model-level API: add_adapters, counting, merge/unmerge/unload, save/load, PEFT and released-MoSLoRA checkpoints."""

import json
import os

import pytest
import torch
from torch import nn

import moslora_ext
from moslora_ext.peft.folder import RECORD_FIELD


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.v_proj(self.q_proj(self.norm(x))).tanh()
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyModel(nn.Module):
    def __init__(self, width=16, depth=2):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyModel()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            for t in (layer.lora_A, layer.lora_B):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            if layer.lora_mixer.requires_grad:
                layer.lora_mixer.copy_(torch.randn(layer.lora_mixer.shape, generator=g))
    return model


def state_snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_state(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, t in state.items():
        assert torch.equal(t, snapshot[name]), name


def test_add_adapters_by_suffix_shares_weights_and_freezes_the_rest():
    model = tiny_model()
    q_weight = model.layers[0].q_proj.weight
    moslora_ext.add_adapters(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    adapted = moslora_ext.adapted_layers(model)
    assert sorted(adapted) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert model.layers[0].q_proj.weight is q_weight
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.adapters.default.{t}" for layer in adapted
                         for t in ("lora_A", "lora_mixer", "lora_B")}
    assert all(layer.r == 4 and layer.scale == 2.0 for layer in adapted.values())


def test_add_adapters_by_regex_and_frozen_mixer():
    model = moslora_ext.add_adapters(tiny_model(), r"layers\.1\.(up|down)", r=2, mixer_init="identity",
                                     train_mixer=False)
    assert sorted(moslora_ext.adapted_layers(model)) == ["layers.1.down", "layers.1.up"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.1.{layer}.adapters.default.{t}" for layer in ("up", "down") for t in ("lora_A", "lora_B")}


def test_fresh_adapters_leave_the_output_unchanged():
    model = tiny_model()
    x = torch.randn(5, 4)
    before = model(x)
    moslora_ext.add_adapters(model, ["q_proj", "up", "down"])
    torch.testing.assert_close(model(x), before)


def test_new_layers_take_the_training_mode_of_the_layers_they_replace(tmp_path):
    # A model loaded for inference (eval mode, as from_pretrained returns it) must stay deterministic.
    peft = pytest.importorskip("peft")
    source = randomize_adapters(moslora_ext.add_adapters(tiny_model(), ["q_proj", "up"], r=4, lora_dropout=0.5))
    moslora_ext.save_adapter(source, tmp_path / "ours")
    peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["up"])
                        ).save_pretrained(tmp_path / "peft")
    x = torch.randn(8, 4)
    for load in (lambda m: moslora_ext.add_adapters(m, ["q_proj"], lora_dropout=0.5),
                 lambda m: moslora_ext.load_adapter(m, tmp_path / "ours"),
                 lambda m: moslora_ext.load_peft_adapter(m, tmp_path / "peft")):
        model = randomize_adapters(load(tiny_model().eval()))
        assert not any(layer.training for layer in moslora_ext.adapted_layers(model).values())
        assert torch.equal(model(x), model(x))
        model = load(tiny_model().train())
        assert all(layer.training for layer in moslora_ext.adapted_layers(model).values())


def test_trainable_parameters():
    model = moslora_ext.add_adapters(tiny_model(), ["q_proj"], r=4)
    total = sum(p.numel() for p in tiny_model().parameters()) + 2 * (4 * 16 + 4 * 4 + 16 * 4)
    assert moslora_ext.trainable_parameters(model) == (2 * (4 * 16 + 4 * 4 + 16 * 4), total)


def test_training_changes_only_the_adapters():
    model = moslora_ext.add_adapters(tiny_model(), ["q_proj", "v_proj", "up", "down"], r=4, lora_dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x, target = torch.randn(64, 4), torch.randn(64, 3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_merge_unmerge_and_merge_and_unload_keep_the_function():
    model = randomize_adapters(moslora_ext.add_adapters(tiny_model(), ["q_proj", "v_proj", "down"], r=4))
    model.eval()
    x = torch.randn(7, 4)
    expected = model(x)
    moslora_ext.merge_adapters(model)
    assert all(layer.merged for layer in moslora_ext.adapted_layers(model).values())
    torch.testing.assert_close(model(x), expected)
    moslora_ext.unmerge_adapters(model)
    torch.testing.assert_close(model(x), expected)
    moslora_ext.merge_and_unload(model)
    assert not moslora_ext.adapted_layers(model)
    assert all(type(m).__module__.startswith("torch.") for m in model.modules() if m is not model
               and not isinstance(m, (Block, nn.ModuleList)))
    assert not any("lora" in key for key in model.state_dict())
    torch.testing.assert_close(model(x), expected)


def test_safe_merge_failure_leaves_every_layer_unmerged():
    model = moslora_ext.add_adapters(tiny_model(), ["q_proj"], r=2)
    last = model.layers[1].q_proj
    with torch.no_grad():
        last.lora_B.fill_(float("inf"))
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="inf or NaN"):
        moslora_ext.merge_adapters(model, safe=True)
    assert not any(layer.merged for layer in moslora_ext.adapted_layers(model).values())
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, snapshot[name], equal_nan=True)


def test_save_and_load_roundtrip_into_a_fresh_model(tmp_path):
    model = randomize_adapters(moslora_ext.add_adapters(tiny_model(), ["q_proj", "up"], r=4, lora_alpha=4,
                                                        mixer_init="orthogonal", use_rslora=True))
    moslora_ext.save_adapter(model, tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config[RECORD_FIELD]["layers"]["layers.0.q_proj"] == {"r": 4, "lora_alpha": 4, "lora_dropout": 0.0,
                                                   "mixer_init": "orthogonal", "train_mixer": True,
                                                   "use_rslora": True, "autocast_adapter_dtype": True,
                                                   "braid_subspaces": 2}
    # Only the adapter tensors are saved: 4 layers x (A, M, B).
    from safetensors.torch import load_file
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 12

    fresh = moslora_ext.load_adapter(tiny_model(), tmp_path)
    x = torch.randn(6, 4)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    assert moslora_ext.trainable_parameters(fresh) == moslora_ext.trainable_parameters(model)


def test_braid_of_k_subspaces_is_saved_and_loaded_and_older_folders_load_with_two(tmp_path):
    model = moslora_ext.add_adapters(tiny_model(), ["q_proj"], r=8, mixer_init="braid", braid_subspaces=4)
    braid = torch.kron(torch.ones(4, 4), torch.eye(2))
    assert all(torch.equal(layer.lora_mixer, braid) for layer in moslora_ext.adapted_layers(model).values())
    moslora_ext.save_adapter(randomize_adapters(model), tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert {settings["braid_subspaces"] for settings in config[RECORD_FIELD]["layers"].values()} == {4}
    x = torch.randn(6, 4)
    loaded = moslora_ext.load_adapter(tiny_model(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert {layer.active.config.braid_subspaces for layer in moslora_ext.adapted_layers(loaded).values()} == {4}
    # A folder written before braid_subspaces existed: the braid of two subspaces, as it was then.
    for settings in config[RECORD_FIELD]["layers"].values():
        del settings["braid_subspaces"]
    config_file.write_text(json.dumps(config))
    older = moslora_ext.load_adapter(tiny_model(), tmp_path).eval()
    assert {layer.active.config.braid_subspaces for layer in moslora_ext.adapted_layers(older).values()} == {2}
    torch.testing.assert_close(older(x), model(x))


def test_load_into_a_model_that_already_has_the_same_adapters(tmp_path):
    model = randomize_adapters(moslora_ext.add_adapters(tiny_model(), ["v_proj"], r=2))
    moslora_ext.save_adapter(model, tmp_path)
    other = moslora_ext.add_adapters(tiny_model(), ["v_proj"], r=2)
    moslora_ext.load_adapter(other, tmp_path, replace=True)
    for name, t in moslora_ext.formats.native.adapter_state_dict(model).items():
        assert torch.equal(moslora_ext.formats.native.adapter_state_dict(other)[name], t)


def test_load_into_adapters_with_other_training_settings_keeps_them(tmp_path):
    # lora_dropout, mixer_init and train_mixer do not change what the tensors compute.
    model = randomize_adapters(moslora_ext.add_adapters(tiny_model(), ["v_proj"], r=2, lora_dropout=0.1,
                                                        mixer_init="orthogonal"))
    moslora_ext.save_adapter(model, tmp_path)
    other = moslora_ext.add_adapters(tiny_model(), ["v_proj"], r=2, mixer_init="identity", train_mixer=False)
    moslora_ext.load_adapter(other, tmp_path, replace=True)
    assert all(layer.lora_dropout == 0.0 and layer.mixer_init == "identity" and not layer.lora_mixer.requires_grad
               for layer in moslora_ext.adapted_layers(other).values())
    x = torch.randn(5, 4)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))

    other_alpha = moslora_ext.add_adapters(tiny_model(), ["v_proj"], r=2, lora_alpha=4)
    snapshot = state_snapshot(other_alpha)
    with pytest.raises(ValueError, match=r"\['lora_alpha'\] must match"):
        moslora_ext.load_adapter(other_alpha, tmp_path, replace=True)
    assert_same_state(other_alpha, snapshot)


def test_failed_loads_leave_the_model_untouched(tmp_path):
    source = randomize_adapters(moslora_ext.add_adapters(tiny_model(), ["q_proj", "up"], r=4))
    moslora_ext.save_adapter(source, tmp_path)

    wrong_rank = moslora_ext.add_adapters(tiny_model(), ["q_proj", "up"], r=8)
    snapshot = state_snapshot(wrong_rank)
    with pytest.raises(ValueError, match="r=8"):
        moslora_ext.load_adapter(wrong_rank, tmp_path, replace=True)
    assert_same_state(wrong_rank, snapshot)

    wider = TinyModel(width=24)  # every layer has other shapes; the first checked fails
    snapshot = state_snapshot(wider)
    with pytest.raises(ValueError, match="has shape"):
        moslora_ext.load_adapter(wider, tmp_path)
    assert_same_state(wider, snapshot)
    assert not moslora_ext.adapted_layers(wider)

    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop("base_model.model.layers.1.up.lora_B.weight")
    tensors["base_model.model.layers.1.up.lora_C"] = torch.zeros(1)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_model()
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.up.lora_B'\], unexpected keys "
                                         r"\['layers.1.up.lora_C'\]"):
        moslora_ext.load_adapter(model, tmp_path)
    assert_same_state(model, snapshot)


def test_add_adapters_misuse_names_what_is_wrong():
    model = tiny_model()
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match=r"matches no module.*'q_proj'"):
        moslora_ext.add_adapters(model, ["qkv"])
    with pytest.raises(TypeError, match="LayerNorm"):
        moslora_ext.add_adapters(model, ["q_proj", "norm"])
    with pytest.raises(ValueError, match="r \\(the adapter rank\\)"):
        moslora_ext.add_adapters(model, ["q_proj"], r=0)
    assert_same_state(model, snapshot)
    assert not moslora_ext.adapted_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    moslora_ext.add_adapters(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has a MoSLoRA adapter named 'default'; pass another adapter_name"):
        moslora_ext.add_adapters(model, ["q_proj"])
    with pytest.raises(ValueError, match="no MoSLoRA adapters"):
        moslora_ext.save_adapter(tiny_model(), "unused")


def test_modules_to_save_are_trained_in_full_saved_and_restored(tmp_path):
    model = moslora_ext.add_adapters(tiny_model(), "all-linear", r=2, modules_to_save=["head"])
    assert "head" not in moslora_ext.adapted_layers(model) and len(moslora_ext.adapted_layers(model)) == 9
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    head_before = model.head.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 4)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model.head.weight, head_before)
    moslora_ext.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["head"]

    fresh = moslora_ext.load_adapter(tiny_model(), tmp_path)
    assert list(moslora_ext.saved_modules(fresh)) == ["head"] and fresh.head.weight.requires_grad
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))

    # A module is either adapted or trained in full.
    model = tiny_model()
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="layers.0.up is in layers.0, a module of modules_to_save"):
        moslora_ext.add_adapters(model, ["up"], modules_to_save=["layers.0"])
    assert_same_state(model, snapshot)
    assert all(p.requires_grad for p in model.parameters()) and not moslora_ext.saved_modules(model)


class PlainLinearSubclass(nn.Linear):
    """Like Falcon's FalconLinear: an nn.Linear subclass whose forward is the plain linear map."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_linear_subclasses_take_adapters_unless_known_to_compute_something_else():
    model = tiny_model()
    model.layers[1].q_proj = PlainLinearSubclass(16, 16)
    randomize_adapters(moslora_ext.add_adapters(model, ["q_proj"], r=4))
    x = torch.randn(5, 4)
    expected = model(x)
    moslora_ext.merge_and_unload(model)
    torch.testing.assert_close(model(x), expected)

    # nn.MultiheadAttention never calls its out_proj's forward; a QAT Linear fake-quantizes its weight.
    qat_linear = torch.ao.nn.qat.Linear(16, 16, qconfig=torch.ao.quantization.get_default_qat_qconfig())
    for model, target, reason in ((nn.TransformerEncoderLayer(16, 2), "out_proj", "MultiheadAttention reads"),
                                  (nn.Sequential(nn.Linear(16, 16), qat_linear), "1", "fake-quantizes")):
        snapshot = state_snapshot(model)
        with pytest.raises(TypeError, match=reason):
            moslora_ext.add_adapters(model, [target])
        assert_same_state(model, snapshot)


# --- checkpoints of other libraries -----------------------------------------------------------


def test_peft_lora_adapter_gives_what_peft_gives(tmp_path):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    x = torch.randn(9, 4)
    expected = peft_model(x)

    model = moslora_ext.load_peft_adapter(tiny_model(), tmp_path).eval()
    adapted = moslora_ext.adapted_layers(model)
    assert sorted(adapted) == ["layers.0.q_proj", "layers.0.up", "layers.1.q_proj", "layers.1.up"]
    assert all(torch.equal(layer.lora_mixer, torch.eye(4)) and not layer.lora_mixer.requires_grad
               for layer in adapted.values())
    torch.testing.assert_close(model(x), expected)


def test_released_moslora_checkpoint_gives_the_released_formula(tmp_path):
    # The released code (a PEFT fork) saves torch state dicts with lora_A / lora_AB / lora_B Linear weights.
    r, alpha, width = 4, 16, 16
    g = torch.Generator().manual_seed(3)
    targets = ["layers.0.v_proj", "layers.1.v_proj"]
    state = {}
    for name in targets:
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(r, width, generator=g)
        state[f"{prefix}.lora_AB.weight"] = torch.randn(r, r, generator=g)
        state[f"{prefix}.lora_B.weight"] = torch.randn(width, r, generator=g)
    torch.save(state, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "target_modules": ["v_proj"],
         "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}))

    reference = tiny_model()
    for name in targets:  # the released formula: base(x) + lora_B(lora_AB(lora_A(x))) * alpha / r
        base = reference.get_submodule(name)
        prefix = f"base_model.model.{name}"
        A, M, B = (state[f"{prefix}.{t}.weight"] for t in ("lora_A", "lora_AB", "lora_B"))
        base.forward = (lambda b, A, M, B: lambda x: nn.functional.linear(x, b.weight, b.bias)
                        + ((x @ A.t()) @ M.t()) @ B.t() * (alpha / r))(base, A, M, B)
    model = moslora_ext.load_peft_adapter(tiny_model(), tmp_path).eval()
    assert all(layer.lora_mixer.requires_grad and layer.lora_dropout == 0.05
               for layer in moslora_ext.adapted_layers(model).values())
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), reference(x))


def test_save_peft_adapter_with_some_layers_and_a_module_to_save(tmp_path):
    # Only layers.1's q_proj and up are adapted: target_modules must name them in full for PEFT.
    peft = pytest.importorskip("peft")
    model = moslora_ext.add_adapters(tiny_model(), r"layers\.1\.(q_proj|up)", r=4, modules_to_save=["head"])
    randomize_adapters(model)
    with torch.no_grad():
        model.head.weight.normal_()
    moslora_ext.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["layers.1.q_proj", "layers.1.up"] and config["modules_to_save"] == ["head"]
    peft_model = peft.PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    x = torch.randn(6, 4)
    assert (peft_model(x) - model.eval()(x)).abs().max() <= 1e-5

    # Another rank goes in PEFT's rank_pattern; another lora_dropout cannot be written.
    moslora_ext.add_adapters(model, ["down"], r=2)
    randomize_adapters(model)
    moslora_ext.save_peft_adapter(model, tmp_path / "ranks")
    peft_model = peft.PeftModel.from_pretrained(tiny_model(), tmp_path / "ranks").eval()
    torch.testing.assert_close(peft_model(x), model.eval()(x), atol=1e-5, rtol=1e-5)  # outputs of size ~300
    moslora_ext.add_adapters(model, ["layers.0.up"], r=4, lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"one lora_dropout for all layers, but the adapted layers have \[0.0, 0.1\]"):
        moslora_ext.save_peft_adapter(model, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def test_peft_settings_we_do_not_support_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):  # a ValueError, as MoSLoRAConfig(use_dora=True)
        moslora_ext.load_peft_adapter(tiny_model(), tmp_path)


def test_a_layer_that_fails_to_wrap_leaves_the_others_trainable():
    model = tiny_model()
    # The second layer (odd rank for a braid mixer) fails after the first was built.
    with pytest.raises(ValueError, match="braid"):
        moslora_ext.model.adapters.wrap_targets(model, {"layers.0.q_proj": moslora_ext.AdapterConfig(r=2, mixer_init="braid"),
                                           "layers.1.q_proj": moslora_ext.AdapterConfig(r=3, mixer_init="braid")})
    assert all(p.requires_grad for p in model.parameters())
    assert not moslora_ext.adapted_layers(model)


# --- named adapters ---------------------------------------------------------------------------


def two_adapter_model(tmp_path):
    """A model with adapters "a" (q_proj, up; r=2) and "b" (q_proj, down; r=4), each also saved alone."""
    model = randomize_adapters(moslora_ext.add_adapters(tiny_model(), ["q_proj", "up"], r=2, adapter_name="a"))
    moslora_ext.add_adapters(model, ["q_proj", "down"], r=4, lora_alpha=4, adapter_name="b")
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            if "b" in layer.adapters:
                layer.adapters["b"].lora_B.normal_()
    for name in ("a", "b"):
        moslora_ext.save_adapter(model, tmp_path / name, adapter_name=name)
    return model.eval()


def alone(tmp_path, name):
    """A fresh model holding only the adapter saved as ``name``."""
    return moslora_ext.load_adapter(tiny_model().eval(), tmp_path / name)


def test_named_adapters_switch_without_copying_and_each_computes_as_alone(tmp_path):
    model = two_adapter_model(tmp_path)
    assert moslora_ext.list_adapters(model) == {"a": ["layers.0.q_proj", "layers.0.up", "layers.1.q_proj",
                                                      "layers.1.up"],
                                                "b": ["layers.0.q_proj", "layers.0.down", "layers.1.q_proj",
                                                      "layers.1.down"]}
    # The first adapter stays active; the second is frozen until chosen.
    assert moslora_ext.active_adapter(model) == "a"
    parameters = dict(model.named_parameters())
    weights = {name: (p.data_ptr(), p.detach().clone()) for name, p in parameters.items() if "lora_" not in name}
    x = torch.randn(6, 4)
    for name in ("a", "b", "a"):
        moslora_ext.set_adapter(model, name)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            n for n in parameters if f".adapters.{name}." in n}
        assert model.layers[0].q_proj.lora_A is model.layers[0].q_proj.adapters[name].lora_A
        torch.testing.assert_close(model(x), alone(tmp_path, name)(x))
    # The same parameter objects and keys throughout, and no base weight touched.
    assert dict(model.named_parameters()) == parameters
    assert all(p.data_ptr() == weights[n][0] and torch.equal(p, weights[n][1])
               for n, p in model.named_parameters() if n in weights)


def test_training_one_adapter_then_another_mid_run(tmp_path):
    model = two_adapter_model(tmp_path).train()
    # The optimizer holds both adapters, as a user switching adapters may have it.
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-2)
    x = torch.randn(16, 4)
    for name in ("a", "b", "a"):
        moslora_ext.set_adapter(model, name)
        other = "b" if name == "a" else "a"
        before = {n: p.detach().clone() for n, p in model.named_parameters() if f".adapters.{other}." in n}
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            optimizer.step()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    for name in ("a", "b"):
        moslora_ext.set_adapter(model, name)
        moslora_ext.save_adapter(model, tmp_path / f"trained-{name}", adapter_name=name)
        torch.testing.assert_close(model(x), alone(tmp_path, f"trained-{name}")(x))


def test_disable_adapters_gives_the_base_outputs_bit_for_bit(tmp_path):
    model = two_adapter_model(tmp_path)
    x = torch.randn(6, 4)
    with_adapter = model(x)
    with moslora_ext.disable_adapters(model):
        assert torch.equal(model(x), tiny_model().eval()(x))
    assert torch.equal(model(x), with_adapter)


def test_merge_folds_the_active_adapter_and_switching_waits_for_unmerge(tmp_path):
    model = two_adapter_model(tmp_path)
    moslora_ext.set_adapter(model, "b")
    x = torch.randn(6, 4)
    moslora_ext.merge_adapters(model)
    torch.testing.assert_close(model(x), alone(tmp_path, "b")(x))
    snapshot = state_snapshot(model)
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        moslora_ext.set_adapter(model, "a")
    assert_same_state(model, snapshot)
    moslora_ext.unmerge_adapters(model)
    torch.testing.assert_close(model.layers[0].down.weight, tiny_model().layers[0].down.weight)
    moslora_ext.set_adapter(model, "a")
    moslora_ext.merge_and_unload(model)
    assert not moslora_ext.adapted_layers(model)
    torch.testing.assert_close(model(x), alone(tmp_path, "a")(x))


def test_delete_adapter_puts_back_base_layers_it_leaves_empty(tmp_path):
    model = two_adapter_model(tmp_path)
    x = torch.randn(6, 4)
    moslora_ext.delete_adapter(model, "a")  # the active one: "b" takes over
    assert moslora_ext.list_adapters(model) == {"b": ["layers.0.q_proj", "layers.0.down", "layers.1.q_proj",
                                                      "layers.1.down"]}
    assert moslora_ext.active_adapter(model) == "b" and type(model.layers[0].up) is nn.Linear
    assert not any(".adapters.a." in key for key in model.state_dict())
    torch.testing.assert_close(model(x), alone(tmp_path, "b")(x))


def test_loading_under_a_name_in_use_needs_replace(tmp_path):
    model = two_adapter_model(tmp_path)
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="adapter named 'a' already; pass replace=True"):
        moslora_ext.load_adapter(model, tmp_path / "b", adapter_name="a")
    assert_same_state(model, snapshot)
    # A new name loads beside the others, inactive; replace=True loads over a name in use.
    moslora_ext.load_adapter(model, tmp_path / "b", adapter_name="c")
    assert list(moslora_ext.list_adapters(model)) == ["a", "b", "c"] and moslora_ext.active_adapter(model) == "a"
    q_proj_A = model.layers[0].q_proj.adapters["b"].lora_A
    moslora_ext.load_adapter(model, tmp_path / "b", adapter_name="b", replace=True)
    assert model.layers[0].q_proj.adapters["b"].lora_A is q_proj_A
    moslora_ext.set_adapter(model, "c")
    x = torch.randn(6, 4)
    torch.testing.assert_close(model(x), alone(tmp_path, "b")(x))
