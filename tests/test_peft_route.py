"""MoSLoRA inside PEFT (moslora_ext.MoSLoRAConfig): against PEFT itself and moslora_ext's own layers."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import moslora_ext
from conftest import require_peft_route, run_python
from reference import assert_close_to_reference, braid_reference

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
require_peft_route()
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from moslora_ext.peft.config import REFUSED_FIELDS  # noqa: E402
from moslora_ext.peft.layers import MoSLoRALinear  # noqa: E402

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def tiny_llama(seed=0, hidden_size=32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                      num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def batch(seed=0, rows=4):
    return torch.randint(0, 64, (rows, 12), generator=torch.Generator().manual_seed(seed))


def moslora(model, **settings):
    settings = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS} | settings
    return get_peft_model(model, moslora_ext.MoSLoRAConfig(**settings))


def trained_looking(model, seed=1):
    """Draw every adapter tensor (B starts at zero), so that the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# --- point 1: the config ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED_FIELDS))
def test_refused_lora_settings_are_named_with_their_reason(name):
    value = {"use_dora": True, "use_qalora": True, "lora_bias": True, "ensure_weight_tying": True,
             "alora_invocation_tokens": [1], "loftq_config": {"loftq_bits": 4},
             "layer_replication": [(0, 1)], "use_bdlora": {}}.get(name, object())
    with pytest.raises(ValueError, match=rf"{name}=.* is not supported: "):
        config = moslora_ext.MoSLoRAConfig(target_modules=["q_proj"])
        setattr(config, name, value)  # as TRL may do after creation: checked again when the model gets it
        get_peft_model(tiny_llama(), config)


@pytest.mark.parametrize("init", ["pissa", "olora", "eva", "orthogonal", "mica"])
def test_data_driven_initialisations_are_refused(init):
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is not supported"):
        moslora_ext.MoSLoRAConfig(init_lora_weights=init)


def test_mixer_settings_are_checked():
    with pytest.raises(ValueError, match="mixer_init must be one of"):
        moslora_ext.MoSLoRAConfig(mixer_init="random")
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]: .*braid_subspaces=2, r=3"):
        moslora_ext.MoSLoRAConfig(r=4, mixer_init="braid", rank_pattern={"q_proj": 3})
    with pytest.raises(ValueError, match="braid_subspaces .*dividing the rank r, got braid_subspaces=3, r=8"):
        moslora_ext.MoSLoRAConfig(r=8, mixer_init="braid", braid_subspaces=3)
    with pytest.raises(ValueError, match="braid_subspaces=4 .*but mixer_init is 'orthogonal'"):
        moslora_ext.MoSLoRAConfig(r=8, mixer_init="orthogonal", braid_subspaces=4)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        moslora(tiny_llama()).add_adapter("plain", LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_init_lora_weights_keeps_its_peft_meaning(init):
    targets = ["q_proj", "v_proj"]
    ours = moslora(tiny_llama(), mixer_init="identity", init_lora_weights=init, target_modules=targets)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     init_lora_weights=init))
    # The same draws from the same seed, layer after layer: an identity mixer draws nothing.
    theirs_factors = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    ours_factors = {n: p for n, p in ours.named_parameters() if "lora_" in n and "lora_mixer" not in n}
    assert ours_factors.keys() == theirs_factors.keys() and len(ours_factors) == 8
    for name, p in ours_factors.items():
        torch.testing.assert_close(p, theirs_factors[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("settings", [
    {"target_modules": "all-linear", "exclude_modules": ["o_proj"], "rank_pattern": {"q_proj": 2},
     "alpha_pattern": {"v_proj": 3}, "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj", "v_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers",
     "rank_pattern": {"q_proj": 2}},
])
def test_selection_settings_select_what_peft_selects(settings):
    ours = get_peft_model(tiny_llama(), moslora_ext.MoSLoRAConfig(r=4, lora_alpha=8, **settings))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **settings))
    ours_layers = {n: (m.r, m.scaling) for n, m in ours.named_modules() if isinstance(m, MoSLoRALinear)}
    theirs_layers = {n: (m.r, m.scaling) for n, m in theirs.named_modules() if type(m).__name__ == "Linear"
                     and hasattr(m, "lora_A")}
    assert ours_layers == theirs_layers and len(ours_layers) >= 3
    assert ours.base_model.model.model.layers[1].self_attn.q_proj.lora_mixer["default"].weight.shape == (2, 2)
    assert ({n for n, p in ours.named_parameters() if p.requires_grad} - {n for n, p in theirs.named_parameters()
            if p.requires_grad}) == {f"{n}.lora_mixer.default.weight" for n in ours_layers}


# --- point 4: equivalences ----------------------------------------------------------------------


def copy_lora_factors(source, target):
    """Copy PEFT LoRA's A and B (and their embedding forms) into the same-named tensors of ``target``."""
    theirs = dict(source.named_parameters())
    with torch.no_grad():
        for name, p in target.named_parameters():
            if "lora_" in name and "lora_mixer" not in name:
                p.copy_(theirs[name])


@pytest.mark.parametrize("make_model, targets", [(tiny_llama, LLAMA_TARGETS),
                                                 (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"])])
def test_identity_frozen_mixer_gives_peft_lora_outputs_and_gradients(make_model, targets):
    theirs = trained_looking(get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=targets)))
    ours = moslora(make_model(), mixer_init="identity", train_mixer=False, target_modules=targets)
    copy_lora_factors(theirs, ours)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_mixer" in n)
    ids = batch()
    for model in (theirs, ours):
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-6)
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_scales_in_half_precision_give_peft_lora_outputs_and_gradients(device, dtype):
    """rsLoRA with r=4, lora_alpha=128 (s = 64) on a half-precision base and an
    input feature near the dtype's largest value / 20: U = A x (about max / 40)
    fits, s·U does not; y and the gradients do. PEFT LoRA applies s after B, so
    it is finite; the fused op applies it as a GEMM's alpha, so it must be too
    (it folded s into the mixer step: fp16 gave inf)."""
    big = torch.finfo(dtype).max / 20
    settings = dict(r=4, lora_alpha=128, use_rslora=True, target_modules=["0"])
    linear = torch.nn.Linear(64, 32, device=device, dtype=dtype)
    base = lambda: torch.nn.Sequential(copy.deepcopy(linear))  # noqa: E731
    theirs = get_peft_model(base(), LoraConfig(**settings))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn_like(p) * 0.1).select(1, 0).fill_(0.5)  # U ≈ x[:, 0] / 2
            elif "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.01)
    route = get_peft_model(base(), moslora_ext.MoSLoRAConfig(mixer_init="identity", train_mixer=False, **settings))
    copy_lora_factors(theirs, route)
    layer = theirs.base_model.model[0]
    own = moslora_ext.Linear.from_linear(base()[0], r=4, lora_alpha=128, use_rslora=True, mixer_init="identity",
                                         train_mixer=False)
    with torch.no_grad():
        own.lora_A.copy_(layer.lora_A["default"].weight), own.lora_B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(4, 64, device=device, dtype=dtype)
    x[:, 0] = big
    grad = torch.randn(4, 32, device=device) * 1e-3  # dB = s·Gᵀ U: within the dtype's range

    def run(model):
        x_in = x.clone().requires_grad_()
        y = model(x_in)
        (y.float() * grad).sum().backward()
        adapter = [p.grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
        return [y.detach(), x_in.grad, *adapter]

    expected = run(theirs)
    assert all(t.isfinite().all() for t in expected) and expected[0].abs().max() > 1000
    for model in (route, own):
        for got, want in zip(run(model), expected, strict=True):
            assert got.isfinite().all()
            assert_close_to_reference(got, want.double(), dtype)


def test_peft_route_layer_gives_add_adapters_outputs_with_dropout():
    ours = trained_looking(moslora(tiny_llama(), lora_dropout=0.25))
    functional = moslora_ext.add_adapters(tiny_llama(), LLAMA_TARGETS, r=4, lora_alpha=8, lora_dropout=0.25)
    with torch.no_grad():
        for name, layer in moslora_ext.adapted_layers(functional).items():
            peft_layer = ours.base_model.model.get_submodule(name)
            A, M, B = peft_layer.variant_class.factors(peft_layer, "default")
            for t, source in (("lora_A", A), ("lora_mixer", M), ("lora_B", B)):
                getattr(layer, t).copy_(source)
    ours.train(), functional.train()
    ids = batch()
    outputs = []
    for model in (ours, functional):
        torch.manual_seed(3)  # the same dropout seeds, drawn layer by layer in the same order
        outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
    ours.eval()
    assert not torch.allclose(logits(ours, ids), outputs[0])  # dropout was on


def test_dropout_does_not_save_a_dropped_copy_of_the_input():
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256))
    model = get_peft_model(layer, moslora_ext.MoSLoRAConfig(r=4, target_modules=["0"], lora_dropout=0.5))
    x = torch.randn(64, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(x)
    assert sum(n for n in saved if n == x.numel()) <= x.numel()  # x itself (for the base's weight grad), no copy


# --- point 2: the PEFT model API ----------------------------------------------------------------


def test_half_precision_base_gets_float32_adapters_as_peft_does():
    model = moslora(tiny_llama().to(torch.bfloat16), target_modules=["q_proj", "v_proj"])
    theirs = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {
        p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    ids = batch()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("train_mixer", [True, False])
def test_float32_cast_keeps_the_mixer_a_trained_parameter_as_a_and_b(train_mixer):
    """PEFT's cast of a half-precision model's new adapter to float32 (``cast_adapter_dtype``; since peft 0.21.2
    it replaces the parameters with new ones): the mixer ends as A and B do, in float32 with its requires_grad
    (frozen for train_mixer=False), and the parameters an optimizer takes from the model are the ones the
    forward uses; adding a second adapter casts that one only, so the optimizer's parameters stay the model's."""
    model = trained_looking(moslora(tiny_llama().to(torch.bfloat16), train_mixer=train_mixer))
    layers = [m for m in model.modules() if isinstance(m, moslora_ext.peft.layers.MoSLoRALayer)]
    factors = [layer.variant_class.factors(layer, "default") for layer in layers]
    assert len(layers) == 7
    for lora_A, mixer, lora_B in factors:
        assert lora_A.dtype == mixer.dtype == lora_B.dtype == torch.float32
        assert lora_A.requires_grad and lora_B.requires_grad and mixer.requires_grad == train_mixer
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.add_adapter("other", moslora_ext.MoSLoRAConfig(r=4, target_modules=LLAMA_TARGETS))
    assert [layer.variant_class.factors(layer, "default") for layer in layers] == factors  # the same objects
    before = [[t.detach().clone() for t in f] for f in factors]
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for (lora_A, mixer, lora_B), old in zip(factors, before, strict=True):
        for tensor, was, trains in zip((lora_A, mixer, lora_B), old, (True, train_mixer, True), strict=True):
            assert (id(tensor) in in_optimizer) == trains
            assert (tensor.grad is not None and bool(tensor.grad.abs().sum() > 0)) == trains  # the forward used it
            assert (not torch.equal(tensor, was)) == trains  # and the step changed it


def test_trainable_token_indices_keep_their_peft_meaning(tmp_path):
    model = moslora(tiny_llama(), target_modules=["q_proj"], trainable_token_indices=[3, 5])
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    token_grads = [p.grad for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(token_grads) == 1 and token_grads[0].shape == (2, 32)
    trained_looking(model)
    with torch.no_grad():  # trained-looking token rows too
        next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n).normal_()
    model.eval().save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_mixed_adapters_gives_each_rows_own_generation(num_beams):
    model = trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"]), seed=1).eval()
    model.add_adapter("other", moslora_ext.MoSLoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    trained_looking(model, seed=2)
    ids = batch(rows=2)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "num_beams": num_beams}
    mixed = model.generate(input_ids=ids, adapter_names=["other", "default"], **settings)
    for row, name in enumerate(["other", "default"]):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[row], model.generate(input_ids=ids[row:row + 1], **settings)[0])


def test_merge_unmerge_and_unload_keep_the_outputs():
    model = trained_looking(moslora(tiny_llama(), mixer_init="orthogonal")).eval()
    ids = batch()
    adapted, base = logits(model, ids), logits(tiny_llama().eval(), ids)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.get_delta_weight("default"),
                               layer.scaling["default"] * layer.lora_B["default"].weight
                               @ layer.lora_mixer["default"].weight @ layer.lora_A["default"].weight)
    with pytest.raises(ValueError, match="NaNs detected"):
        with torch.no_grad():
            layer.lora_mixer["default"].weight[0, 0] = float("inf")
        model.merge_adapter(safe_merge=True)
    with torch.no_grad():
        layer.lora_mixer["default"].weight[0, 0] = 0.0
    adapted = logits(model, ids)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any("lora_" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)
    unloaded = trained_looking(moslora(tiny_llama())).unload()
    torch.testing.assert_close(logits(unloaded.eval(), ids), base, rtol=0, atol=0)


def test_gpt2_conv1d_merge_writes_the_transposed_weight():
    model = trained_looking(moslora(tiny_gpt2(), target_modules=["c_attn", "c_fc"])).eval()
    ids = batch()
    adapted = logits(model, ids)
    torch.testing.assert_close(logits(model.merge_and_unload(), ids), adapted, rtol=1e-5, atol=1e-5)


def test_named_adapters_set_delete_and_mixed_batches():
    model = trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"]), seed=1).eval()
    model.add_adapter("other", moslora_ext.MoSLoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    trained_looking(model, seed=2)
    ids = batch()
    model.set_adapter("other")
    other = logits(model, ids)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".other." in n}
    model.set_adapter("default")
    default = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    names = ["default", "other", "__base__", "other"]
    mixed = logits(model, ids, adapter_names=names)
    for row, expected in enumerate((default, other, base, other)):
        torch.testing.assert_close(mixed[row], expected[row], rtol=1e-5, atol=1e-5)
    model.delete_adapter("other")
    assert not any(".other" in n for n in model.state_dict())
    torch.testing.assert_close(logits(model, ids), default, rtol=0, atol=0)


def test_mixed_batches_with_adapted_embeddings_are_refused():
    model = moslora(tiny_llama(), target_modules=["embed_tokens"]).eval()
    with pytest.raises(ValueError, match="mixed-adapter batches .* not supported on MoSLoRA embedding"):
        model(input_ids=batch(), adapter_names=["default"] * 4)


def test_unsupported_target_types_are_refused_never_plain_lora():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention is none of them"):
        get_peft_model(model, moslora_ext.MoSLoRAConfig(target_modules=["0"]))
    dilated = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, dilation=2))
    with pytest.raises(TypeError, match="groups=1 and dilation 1"):
        get_peft_model(dilated, moslora_ext.MoSLoRAConfig(target_modules=["0"]))


def test_conv_layers_give_moslora_ext_conv_outputs_and_merge():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1))
    model = trained_looking(get_peft_model(conv, moslora_ext.MoSLoRAConfig(r=4, target_modules=["0"])))
    layer = model.base_model.model[0]
    A, M, B = layer.variant_class.factors(layer, "default")
    own = moslora_ext.Conv.from_module(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), r=4, lora_alpha=8)
    with torch.no_grad():
        own.weight.copy_(layer.base_layer.weight), own.bias.copy_(layer.base_layer.bias)
        own.lora_A.copy_(A), own.lora_mixer.copy_(M), own.lora_B.copy_(B)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), own(x), rtol=0, atol=1e-6)
        expected = own(x)
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-5)


# --- point 3: saving and loading ----------------------------------------------------------------


def test_save_pretrained_round_trip_and_stock_peft_refuses(tmp_path):
    model = trained_looking(moslora(tiny_llama(), mixer_init="orthogonal", lora_dropout=0.1)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOSLORA" and config["mixer_init"] == "orthogonal"
    ids = batch()
    expected = logits(model, ids)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert isinstance(reloaded.peft_config["default"], moslora_ext.MoSLoRAConfig)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    functional = moslora_ext.load_peft_adapter(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(functional, ids), expected, rtol=0, atol=1e-6)
    stock = run_python(  # moslora_ext not imported: stock PEFT must refuse, not load plain LoRA
        "import torch, transformers, peft\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, "
        "num_attention_heads=4, num_key_value_heads=2)\n"
        f"peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(config), {str(tmp_path)!r})")
    assert stock.returncode != 0 and "MOSLORA" in stock.stderr, stock.stderr[-2000:]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_braid_of_k_subspaces_mixes_the_sums_of_k_branches_and_is_saved(tmp_path, k):
    model = moslora(tiny_llama().double(), r=8, mixer_init="braid", braid_subspaces=k, target_modules=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_mixer["default"].weight, torch.kron(torch.ones(k, k), torch.eye(8 // k)).double())
    with torch.no_grad():  # A and B drawn (B starts at zero), the mixer as initialised
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.normal_(std=0.2)
    model.eval()
    x = torch.randn(5, 32, dtype=torch.float64)
    expected = braid_reference(x, layer.base_layer.weight, None, layer.lora_A["default"].weight,
                               layer.lora_B["default"].weight, layer.scaling["default"], k)
    torch.testing.assert_close(layer(x), expected)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    assert json.loads(config_file.read_text())["braid_subspaces"] == k
    ids = batch()
    reloaded = PeftModel.from_pretrained(tiny_llama().double(), tmp_path).eval()
    assert reloaded.peft_config["default"].braid_subspaces == k
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    functional = moslora_ext.load_peft_adapter(tiny_llama(), tmp_path)
    assert functional.model.layers[0].self_attn.q_proj.active.config.braid_subspaces == k
    # A folder written before braid_subspaces existed: the braid of two subspaces, as it was then.
    config = json.loads(config_file.read_text())
    del config["braid_subspaces"]
    config_file.write_text(json.dumps(config))
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"].braid_subspaces == 2


def test_frozen_mixers_stay_frozen_through_reloading(tmp_path):
    model = moslora(tiny_llama(), train_mixer=False, target_modules=["q_proj"])
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable and not any("lora_mixer" in n for n in trainable)
    reloaded.load_adapter(tmp_path, adapter_name="second", is_trainable=True)
    reloaded.set_adapter("second")
    assert not any("lora_mixer" in n for n, p in reloaded.named_parameters() if p.requires_grad)


def test_load_adapter_adds_a_second_adapter_from_a_folder(tmp_path):
    first = trained_looking(moslora(tiny_llama()), seed=5).eval()
    first.save_pretrained(tmp_path / "first")
    ids = batch()
    model = trained_looking(moslora(tiny_llama()), seed=6).eval()
    model.load_adapter(tmp_path / "first", adapter_name="first")
    model.set_adapter("first")
    torch.testing.assert_close(logits(model, ids), logits(first, ids), rtol=0, atol=0)


@pytest.mark.parametrize("config_class", [LoraConfig, moslora_ext.MoSLoRAConfig])
def test_rank_and_alpha_patterns_load_through_both_routes(tmp_path, config_class):
    config = config_class(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2},
                          alpha_pattern={"layers.1.self_attn.v_proj": 5})
    model = trained_looking(get_peft_model(tiny_llama(), config)).eval()
    model.save_pretrained(tmp_path)
    ids = batch()
    expected = logits(model, ids)
    functional = moslora_ext.load_peft_adapter(tiny_llama(), tmp_path).eval()
    layers = moslora_ext.adapted_layers(functional)
    assert layers["model.layers.0.self_attn.q_proj"].r == 2
    assert layers["model.layers.1.self_attn.v_proj"].lora_alpha == 5
    assert layers["model.layers.0.self_attn.v_proj"].lora_alpha == 8
    torch.testing.assert_close(logits(functional, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), ids), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("config_class", [LoraConfig, moslora_ext.MoSLoRAConfig])
def test_saved_embedding_base_weights_are_restored_by_load_peft_adapter(tmp_path, config_class):
    model = trained_looking(get_peft_model(tiny_llama(), config_class(r=4, target_modules=["embed_tokens", "q_proj"])))
    with torch.no_grad():  # a resized or retrained vocabulary, which save_embedding_layers exists for
        model.base_model.model.model.embed_tokens.base_layer.weight.add_(1.0)
    model.eval().save_pretrained(tmp_path)  # save_embedding_layers="auto": embed_tokens.base_layer.weight too
    from safetensors.torch import load_file
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ids = batch()
    functional = moslora_ext.load_peft_adapter(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(functional, ids), logits(model, ids), rtol=0, atol=1e-5)
    wrong_size = transformers.LlamaForCausalLM(tiny_llama().config.__class__(**{**tiny_llama().config.to_dict(),
                                                                                "vocab_size": 65}))
    with pytest.raises(ValueError, match="embed_tokens.* has shape"):
        moslora_ext.load_peft_adapter(wrong_size, tmp_path)


@pytest.mark.parametrize("which", ["PeftModel", "its base model", "stock PEFT LoRA"])
def test_model_functions_name_the_peft_methods_for_a_peft_model(tmp_path, which):
    if which == "stock PEFT LoRA":
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    else:
        model = moslora(tiny_llama())
    model = model.get_base_model() if which == "its base model" else model
    moslora_ext.save_adapter(moslora_ext.add_adapters(tiny_llama(), ["k_proj"]), tmp_path / "ours")
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["k_proj"])).save_pretrained(tmp_path / "peft")
    before = structure_and_values(model)
    calls = {"save_adapter": lambda: moslora_ext.save_adapter(model, tmp_path / "a"),
             "save_peft_adapter": lambda: moslora_ext.save_peft_adapter(model, tmp_path / "b"),
             "merge_adapters": lambda: moslora_ext.merge_adapters(model),
             "set_adapter": lambda: moslora_ext.set_adapter(model, "default"),
             "disable_adapters": lambda: moslora_ext.disable_adapters(model).__enter__(),
             "list_adapters": lambda: moslora_ext.list_adapters(model),
             "active_adapter": lambda: moslora_ext.active_adapter(model),
             "add_adapters": lambda: moslora_ext.add_adapters(model, ["k_proj"]),
             "load_adapter": lambda: moslora_ext.load_adapter(model, tmp_path / "ours"),
             "load_peft_adapter": lambda: moslora_ext.load_peft_adapter(model, tmp_path / "peft")}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"PEFT's layers \(.*use the PeftModel's own methods \(save_pretrained"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "peft"]
    assert_unchanged(model, before)


def structure_and_values(model):
    """Every module's class (and, for a PEFT layer or wrapper, the adapters it knows of: its
    factors, its settings such as ``r``, a modules_to_save wrapper's set), every parameter's value
    and requires_grad flag."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    def known_adapters(m):
        if isinstance(m, BaseTunerLayer):
            return m._all_available_adapter_names()
        return sorted(m._adapters) if isinstance(m, AuxiliaryTrainingWrapper) else None

    return ({name: (type(m), known_adapters(m)) for name, m in model.named_modules()},
            {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()})


def assert_unchanged(model, state):
    modules, parameters = structure_and_values(model)
    assert modules == state[0]
    assert parameters.keys() == state[1].keys()
    for name, (value, requires_grad) in parameters.items():
        assert torch.equal(value, state[1][name][0]) and requires_grad == state[1][name][1], name


def test_an_unsupported_layer_part_way_through_injection_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = structure_and_values(model)  # q_proj is adapted before PEFT reaches the first RMSNorm
    with pytest.raises(TypeError, match="MoSLoRA adapters on the PEFT route go on torch.nn.Linear"):
        moslora(model, target_modules=["q_proj", "input_layernorm"])
    assert_unchanged(model, before)


def test_a_refused_add_adapter_leaves_a_loaded_peft_model_as_it_was(tmp_path):
    # Loaded for inference (nothing trainable), with an embedding adapter, whose factors PEFT keeps apart
    # (lora_embedding_A), and a base weight made trainable by hand that the refused adapter targets.
    trained_looking(moslora(tiny_llama())).save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    model.base_model.model.model.layers[0].self_attn.k_proj.weight.requires_grad_(True)
    before, logits = structure_and_values(model), model(batch()).logits
    with pytest.raises(TypeError, match="MoSLoRA adapters on the PEFT route go on torch.nn.Linear"):
        model.add_adapter("second", moslora_ext.MoSLoRAConfig(
            r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "k_proj", "input_layernorm"]))
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(batch()).logits, logits, atol=0, rtol=0)


def test_a_refusal_after_a_wrapper_took_the_adapter_leaves_it_as_it_was(tmp_path):
    # PEFT adds "b" to the existing modules_to_save wrapper, then refuses trainable tokens on it.
    model = moslora(tiny_llama(), target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    before = structure_and_values(model)
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        model.add_adapter("b", moslora_ext.MoSLoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=[
            "embed_tokens"], trainable_token_indices={"embed_tokens": [1, 2]}))
    assert_unchanged(model, before)
    model.add_adapter("b", moslora_ext.MoSLoRAConfig(r=2, target_modules=["q_proj"]))  # the name is free again
    model.set_adapter("b")
    model(batch())
    model.save_pretrained(tmp_path)


def test_a_refused_injection_of_an_existing_name_keeps_that_adapter():
    # peft.inject_adapter_in_model does not check names: the refused call must not delete the first adapter.
    model = peft.inject_adapter_in_model(moslora_ext.MoSLoRAConfig(r=2, target_modules=["q_proj"]), tiny_llama())
    trained_looking(model)
    before, logits = structure_and_values(model), model(batch()).logits
    with pytest.raises(TypeError, match="MoSLoRA adapters on the PEFT route go on torch.nn.Linear"):
        peft.inject_adapter_in_model(moslora_ext.MoSLoRAConfig(r=2, target_modules=["q_proj", "input_layernorm"]),
                                     model)
    assert_unchanged(model, before)
    torch.testing.assert_close(model(batch()).logits, logits, atol=0, rtol=0)


def test_a_refusal_after_the_layers_are_in_leaves_the_model_as_it_was():
    # PEFT checks modules_to_save after it has put its LoRA layers and the first ModulesToSaveWrapper in.
    model = tiny_llama()
    before = structure_and_values(model)
    with pytest.raises(ValueError, match="ModulesToSaveWrapper"):
        moslora(model, target_modules=["q_proj"], modules_to_save=["embed_tokens", "default"])
    assert_unchanged(model, before)


# --- settings checked where they enter, as the functional API checks them ------------------------

BAD_SETTINGS = [({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout"),
                ({"use_rslora": "false"}, "use_rslora"), ({"r": 2.5}, "r"),
                ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
                ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern")]


@pytest.mark.parametrize("bad, setting", BAD_SETTINGS, ids=[s for _, s in BAD_SETTINGS])
def test_bad_settings_are_refused_where_they_enter_as_by_the_functional_api(bad, setting):
    with pytest.raises(ValueError, match=rf"MoSLoRAConfig: {setting}\b"):
        moslora_ext.MoSLoRAConfig(target_modules=["q_proj"], **bad)
    config = moslora_ext.MoSLoRAConfig(target_modules=["q_proj"])
    for name, value in bad.items():  # as TRL may do after creation: checked again at injection
        setattr(config, name, value)
    model = tiny_llama()
    before = structure_and_values(model)
    with pytest.raises(ValueError, match=rf"MoSLoRAConfig: {setting}\b"):
        get_peft_model(model, config)
    assert_unchanged(model, before)
    if "pattern" not in setting:  # the functional API refuses the same value with the same error type
        with pytest.raises(ValueError, match=rf"^{setting}\b"):
            moslora_ext.add_adapters(tiny_llama(), ["q_proj"], **bad)


def test_the_reserved_adapter_name_is_refused_as_by_the_functional_api():
    model = tiny_llama()
    before = structure_and_values(model)
    with pytest.raises(ValueError, match="adapter_name '__base__' is reserved"):
        get_peft_model(model, moslora_ext.MoSLoRAConfig(target_modules=["q_proj"]), adapter_name="__base__")
    assert_unchanged(model, before)
    peft_model = moslora(tiny_llama(), target_modules=["q_proj"])
    before = structure_and_values(peft_model)
    with pytest.raises(ValueError, match="adapter_name '__base__' is reserved"):
        peft_model.add_adapter("__base__", moslora_ext.MoSLoRAConfig(target_modules=["v_proj"]))
    assert_unchanged(peft_model, before)
    assert list(peft_model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="adapter_name '__base__' is reserved"):
        moslora_ext.add_adapters(tiny_llama(), ["q_proj"], adapter_name="__base__")


def test_a_target_parameter_that_matches_nothing_is_refused_as_by_the_functional_api():
    model = tiny_llama()
    before = structure_and_values(model)
    with pytest.raises(ValueError, match=r"target_parameters \['experts.gate_up_proj'\] match no parameter"):
        moslora(model, target_modules=["q_proj"], target_parameters=["self_attn.v_proj.weight",
                                                                     "experts.gate_up_proj"])
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="match no parameter"):
        moslora_ext.add_adapters(tiny_llama(), ["q_proj"], target_parameters=["experts.gate_up_proj"])


def test_an_out_proj_of_multihead_attention_is_refused_by_name_as_by_the_functional_api():
    # nn.MultiheadAttention reads out_proj's weight and never calls its forward: an adapter there does nothing.
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    before = structure_and_values(model)
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear .*never calls its forward"):
        get_peft_model(model, moslora_ext.MoSLoRAConfig(target_modules=["out_proj"]))
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="never calls its forward"):
        moslora_ext.add_adapters(model, ["0.out_proj"])


def test_custom_lora_layers_are_refused_by_name():
    config = moslora_ext.MoSLoRAConfig(target_modules=["q_proj"])
    with pytest.raises(TypeError, match="_register_custom_module.* is not supported"):
        config._register_custom_module({torch.nn.Linear: MoSLoRALinear})
    config._custom_modules = {torch.nn.Linear: MoSLoRALinear}  # set by hand: refused at injection
    model = tiny_llama()
    before = structure_and_values(model)
    with pytest.raises(TypeError, match="_register_custom_module.* is not supported"):
        get_peft_model(model, config)
    assert_unchanged(model, before)


# --- PEFT's own paths: requires_grad, hot-swapping, peft_type.value ------------------------------


def test_a_frozen_mixer_stays_frozen_whatever_peft_path_sets_requires_grad(tmp_path):
    model = moslora(tiny_llama(), train_mixer=False, target_modules=["q_proj"])
    model.save_pretrained(tmp_path)
    model.set_requires_grad("default")
    model.load_adapter(tmp_path, adapter_name="second", is_trainable=True)  # new and inactive
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".second." in n} and {n for n in trainable if ".default." in n}
    assert not [n for n in trainable if "lora_mixer" in n]


def test_preparing_a_compiled_hotswap_is_refused_before_it_changes_anything():
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    model = trained_looking(moslora(tiny_llama())).eval()
    before, expected = structure_and_values(model), logits(model, batch())
    with pytest.raises(NotImplementedError, match="prepare_model_for_compiled_hotswap .* not supported for MoSLoRA"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert_unchanged(model, before)
    assert all(type(s) is float for m in model.modules() if isinstance(m, MoSLoRALinear) for s in m.scaling.values())
    torch.testing.assert_close(logits(model, batch()), expected, rtol=0, atol=0)


def test_peft_type_has_a_value_for_peft_and_transformers(tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    model = trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"])).eval()
    config = model.peft_config["default"]
    assert config.peft_type == "MOSLORA" and config.peft_type.value == "MOSLORA"
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MOSLORA"
    assert model.get_model_status().peft_types == {"default": "MOSLORA"}
    before = structure_and_values(model)
    with pytest.raises(ValueError, match="Hotswapping only supports LORA but MOSLORA was passed"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default", torch_device="cpu")
    assert_unchanged(model, before)
    base = tiny_llama()
    before = structure_and_values(base)
    with pytest.raises(ValueError, match="'MOSLORA' is not compatible with the `PeftMixedModel`"):
        get_peft_model(base, moslora_ext.MoSLoRAConfig(target_modules=["q_proj"]), mixed=True)
    assert_unchanged(base, before)
    loaded = tiny_llama()
    loaded.load_adapter(str(tmp_path))  # transformers' adapter method
    torch.testing.assert_close(logits(loaded.eval(), batch()), logits(model, batch()), rtol=0, atol=0)


# --- merges: checked on every layer first, tied weights, inference mode ---------------------------


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
def test_a_refused_safe_merge_changes_no_layer(merge):
    model = trained_looking(moslora(tiny_llama())).eval()
    with torch.no_grad():  # the last adapted layer refuses, after the others could merge
        model.base_model.model.model.layers[1].mlp.down_proj.lora_mixer["default"].weight[0, 0] = float("nan")
    before = structure_and_values(model)
    with pytest.raises(ValueError, match=r"NaNs detected in the merged weights of .*layers\.1\.mlp\.down_proj"):
        getattr(model, merge)(safe_merge=True)
    modules, parameters = structure_and_values(model)
    assert modules == before[0] and parameters.keys() == before[1].keys()
    for name, (value, requires_grad) in parameters.items():
        assert torch.equal(value.nan_to_num(), before[1][name][0].nan_to_num()), name
    assert not any(m.merged for m in model.modules() if isinstance(m, MoSLoRALinear))


@pytest.mark.parametrize("target", ["wte", "lm_head"])
@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
def test_merging_into_a_tied_weight_unties_it_first(tmp_path, target, merge):
    model = trained_looking(moslora(tiny_gpt2(), target_modules=[target])).eval()
    assert model.base_model.model.lm_head.weight is model.base_model.model.transformer.wte.weight
    ids = batch()
    adapted = logits(model, ids)
    with model.disable_adapter():
        assert (adapted - logits(model, ids)).abs().max() > 0.1  # the adapter changes the outputs
    with pytest.warns(UserWarning, match="is tied to .*gets a copy of the weight of its own"):
        merged = getattr(model, merge)()
    merged = model if merged is None else merged
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)
    if merge == "merge_adapter":
        model.unmerge_adapter()
        torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
    else:  # the untied model saves and reloads as it computes
        assert merged.config.tie_word_embeddings is False
        merged.save_pretrained(tmp_path)
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(logits(reloaded, ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("safe_merge", [True, False])
def test_merging_beside_trainable_tokens_keeps_them_tied_and_exact(safe_merge):
    # PEFT's trainable tokens merge into a tied embedding correctly: only MoSLoRA layers are checked and untied.
    model = trained_looking(moslora(tiny_gpt2(), target_modules=["c_attn"], trainable_token_indices=[1, 2])).eval()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n).normal_()
    ids = batch()
    adapted = logits(model, ids)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    assert merged.lm_head.weight is merged.transformer.wte.weight
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unmerge_inside", [True, False])
def test_a_safe_merge_under_inference_mode_leaves_the_model_trainable(unmerge_inside):
    ids = batch()

    def gradients(model):
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    model = trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"]))
    with torch.inference_mode():
        model.merge_adapter(safe_merge=True)
        if unmerge_inside:
            model.unmerge_adapter()
    if not unmerge_inside:
        model.unmerge_adapter()
    expected = gradients(trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"])))
    got = gradients(model)
    assert got.keys() == expected.keys() and len(got) == 12
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


# --- issue 27: stock LoRA beside MoSLoRA, mixed-batch hooks, incomplete or mismatched files ------


HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def full_state(model):
    """``structure_and_values`` plus the full state dict (buffers too), the adapter configs the model
    knows of (a PeftModel's or the ``peft_config`` PEFT puts on a model) and every module's hooks."""
    return (structure_and_values(model), {k: v.detach().clone() for k, v in model.state_dict().items()},
            dict(getattr(model, "peft_config", None) or {}),
            {name: {d: list(getattr(m, d).items()) for d in HOOK_DICTS} for name, m in model.named_modules()})


def assert_full_state_unchanged(model, before):
    assert_unchanged(model, before[0])
    state = model.state_dict()
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], v) for k, v in before[1].items())
    assert dict(getattr(model, "peft_config", None) or {}) == before[2]
    assert {name: {d: list(getattr(m, d).items()) for d in HOOK_DICTS}
            for name, m in model.named_modules()} == before[3]


def two_adapters(target_modules=("q_proj", "v_proj")):
    model = trained_looking(moslora(tiny_llama(), target_modules=list(target_modules)), seed=1).eval()
    model.add_adapter("other", moslora_ext.MoSLoRAConfig(r=2, lora_alpha=4, target_modules=list(target_modules)))
    return trained_looking(model, seed=2)


@pytest.mark.parametrize("case", ["MoSLoRA embedding refusal", "PEFT's length check", "fails later (labels)"])
def test_a_failed_mixed_batch_call_leaves_no_hooks_behind(case):
    targets = ("q_proj", "embed_tokens") if case == "MoSLoRA embedding refusal" else ("q_proj", "v_proj")
    model = two_adapters(targets)
    ids = batch()
    # the base's and each adapter's logits, before any call with adapter_names
    with model.disable_adapter():
        base = logits(model, ids)
    expected = logits(model, ids)
    model.set_adapter("other")
    other = logits(model, ids)
    model.set_adapter("default")
    assert not torch.allclose(other, expected, atol=1e-3)
    before = full_state(model)
    names = {"MoSLoRA embedding refusal": ["other"] * 4, "PEFT's length check": ["other"] * 3,
             "fails later (labels)": ["other"] * 4}[case]
    error = {"MoSLoRA embedding refusal": "not supported on MoSLoRA embedding",
             "PEFT's length check": "Length of `adapter_names` should be the same",
             "fails later (labels)": "size|shape|Expected input batch_size"}[case]
    with pytest.raises((ValueError, RuntimeError, IndexError), match=error):
        model(input_ids=ids, adapter_names=names, labels=ids[:1] if case == "fails later (labels)" else None)
    assert_full_state_unchanged(model, before)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    if case != "MoSLoRA embedding refusal":  # a good mixed call still gives each row its adapter
        mixed = logits(model, ids, adapter_names=["other", "default", "__base__", "other"])
        for row, want in enumerate((other, expected, base, other)):
            torch.testing.assert_close(mixed[row], want[row], rtol=1e-5, atol=1e-5)


def test_a_failed_mixed_batch_call_removes_its_own_hooks_only():
    # a hook that another caller (another thread) registers while the call runs is not the call's to remove
    model = two_adapters()
    layers = model.base_model.model.model.layers
    before = full_state(model)
    others = []

    def other_callers_hook(module, args):
        others.append(module)

    def meanwhile(module, args):  # runs in the failing call, before the layer that refuses it
        if not others:
            others.append(layers[1].self_attn.q_proj.register_forward_pre_hook(other_callers_hook))

    during = layers[0].register_forward_pre_hook(meanwhile)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(input_ids=batch(), adapter_names=["other"] * 3)
    during.remove()
    logits(model, batch())
    assert others[1:] == [layers[1].self_attn.q_proj]  # the other caller's hook is still there and runs
    others[0].remove()
    assert_full_state_unchanged(model, before)


def test_stock_lora_on_moslora_layers_is_refused_before_anything_changes(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj", "q_proj"])).save_pretrained(tmp_path)
    model = trained_looking(peft.inject_adapter_in_model(moslora_ext.MoSLoRAConfig(r=2, target_modules=["q_proj"]),
                                                         tiny_llama()))
    before = full_state(model)
    # k_proj (a plain Linear) comes before q_proj in PEFT's walk of the model: it must not get a LoRA layer either
    calls = {"inject_adapter_in_model": lambda: peft.inject_adapter_in_model(
                 LoraConfig(r=2, target_modules=["k_proj", "q_proj"]), model, adapter_name="lora"),
             "get_peft_model": lambda: get_peft_model(model, LoraConfig(r=2, target_modules=["k_proj", "q_proj"]),
                                                      adapter_name="lora"),
             "from_pretrained": lambda: PeftModel.from_pretrained(model, tmp_path, adapter_name="lora")}
    for call in calls.values():
        with pytest.raises(TypeError, match="'lora' is a LoraConfig, but the model holds MoSLoRA adapters"):
            call()
        assert_full_state_unchanged(model, before)


def test_a_moslora_layer_refuses_a_stock_lora_config_before_it_changes():
    # the model's peft_config taken away: the layer itself refuses, before it adds lora_A/lora_B
    model = peft.inject_adapter_in_model(moslora_ext.MoSLoRAConfig(r=2, target_modules=["q_proj"]), tiny_llama())
    del model.peft_config
    layer = model.model.layers[0].self_attn.q_proj
    before = full_state(layer)
    with pytest.raises(TypeError, match="'lora' is a LoraConfig, but the model holds MoSLoRA adapters"):
        layer.update_layer("lora", 2, lora_alpha=4, config=LoraConfig(r=2))
    assert_full_state_unchanged(layer, before)


def test_moslora_onto_stock_lora_layers_is_refused_before_anything_changes(tmp_path):
    trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    model = peft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny_llama())
    before = full_state(model)
    config = moslora_ext.MoSLoRAConfig(r=2, target_modules=["q_proj", "v_proj"])
    calls = {"from_pretrained": lambda: PeftModel.from_pretrained(model, tmp_path),
             "get_peft_model": lambda: get_peft_model(model, config),
             "inject_adapter_in_model": lambda: peft.inject_adapter_in_model(config, model, adapter_name="m")}
    for call in calls.values():
        with pytest.raises(TypeError, match=r"holds stock PEFT LoRA layers \(model.layers.0.self_attn.q_proj"):
            call()
        assert_full_state_unchanged(model, before)


def saved_with(tmp_path, model, edit):
    """``model`` saved by save_pretrained into ``tmp_path``, its tensors then changed by ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    return tmp_path


MIXER = "base_model.model.model.layers.1.self_attn.q_proj.lora_mixer.weight"


def faulty_folder(path, fault):
    """A saved q_proj/v_proj adapter whose layer-1 q_proj mixer is then missing, or 3 x 3 instead of 4 x 4."""
    def edit(tensors):
        if fault == "missing mixer":
            del tensors[MIXER]
        else:
            tensors[MIXER] = torch.eye(3)
    return saved_with(path, trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"])), edit)


@pytest.mark.parametrize("fault, error", [
    ("missing mixer", r"layers\.1\.self_attn\.q_proj\.lora_mixer\.\w+\.weight is missing"),
    ("wrong-shape mixer", r"q_proj\.lora_mixer\.\w+\.weight has shape \(3, 3\) in the file, \(4, 4\) in the model"),
])
def test_an_incomplete_or_mismatched_folder_is_refused_and_the_model_left_as_it_was(tmp_path, fault, error):
    folder = faulty_folder(tmp_path / "bad", fault)
    base = tiny_llama()
    before = full_state(base)
    with pytest.raises(ValueError, match=error):  # PEFT alone: a warning and a random mixer / a half-done load
        PeftModel.from_pretrained(base, folder)
    assert_full_state_unchanged(base, before)
    # a second adapter of a PeftModel, and an existing adapter loaded again
    model = trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"]))
    before = full_state(model)
    with pytest.raises(ValueError, match=error):
        model.load_adapter(folder, adapter_name="second", is_trainable=True)
    assert_full_state_unchanged(model, before)
    with pytest.raises(ValueError, match=error):
        model.load_adapter(folder, adapter_name="default")
    assert_full_state_unchanged(model, before)
    if fault == "missing mixer":  # our own loader gave that layer an identity frozen mixer
        before = full_state(base)
        with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj has no lora_mixer tensor, but a MOSLORA"):
            moslora_ext.load_peft_adapter(base, folder)
        assert_full_state_unchanged(base, before)


def attributes_and_modes(model):
    """What a transformers adapter load sets besides the state: the model's attributes (``peft_config``,
    ``_hf_peft_config_loaded``) and every module's train/eval mode."""
    return set(vars(model)), getattr(model, "_hf_peft_config_loaded", False), [m.training for m in model.modules()]


@pytest.mark.parametrize("fault, error", [
    ("missing mixer", r"layers\.1\.self_attn\.q_proj\.lora_mixer\.\w+\.weight is missing"),
    ("wrong-shape mixer", r"q_proj\.lora_mixer\.\w+\.weight has shape \(3, 3\) in the file, \(4, 4\) in the model"),
])
def test_transformers_load_adapter_refuses_an_incomplete_or_mismatched_folder_by_name(tmp_path, fault, error):
    # transformers alone: a missing mixer stays freshly drawn (only its load report says so); a wrong shape
    # raises a size-mismatch RuntimeError (or, with ignore_mismatched_sizes, keeps a drawn mixer) with the
    # MoSLoRA layers and peft_config left on the model
    folder = faulty_folder(tmp_path / "bad", fault)
    good = tmp_path / "good"
    trained_looking(moslora(tiny_llama(), target_modules=["q_proj"]), seed=3).save_pretrained(good)
    base = tiny_llama()
    loaded = tiny_llama()
    loaded.load_adapter(str(good), adapter_name="first", is_trainable=True)
    for model, settings in ((base, {}), (base, {"ignore_mismatched_sizes": True}), (loaded, {"is_trainable": True})):
        before, attributes = full_state(model), attributes_and_modes(model)
        with pytest.raises(ValueError, match=error):
            model.load_adapter(str(folder), adapter_name="second", **settings)
        assert_full_state_unchanged(model, before)
        assert attributes_and_modes(model) == attributes
    # the adapter loaded first still computes what it did, and the refused model takes a good folder as PEFT does
    want = logits(PeftModel.from_pretrained(tiny_llama(), good), batch())
    torch.testing.assert_close(logits(loaded, batch()), want, rtol=0, atol=0)
    info = base.load_adapter(str(good))
    assert not info.missing_keys and not info.mismatched_keys and "_load_pretrained_model" not in vars(base)
    assert isinstance(base.peft_config["default"], moslora_ext.MoSLoRAConfig) and base._hf_peft_config_loaded
    torch.testing.assert_close(logits(base, batch()), want, rtol=0, atol=0)
