"""All-or-nothing saves, merges that check before they write, tied weights, the
checkpoint record after layer-level merges, and settings that must be accepted
as meant. The simple refusals are in the misuse table of test_errors.py."""

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import moslora_ext
from moslora_ext.peft.folder import RECORD_FIELD
from moslora_ext.formats import files as checkpoints

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def small_model(seed=0, **settings):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    moslora_ext.add_adapters(model, ["0", "2"], r=2, **settings)
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            layer.lora_B.normal_()
    return model


def fresh(seed=0):
    """The base of ``small_model(seed)``, without adapters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))


def files(folder):
    return {p.relative_to(folder.parent): p.read_bytes() for p in sorted(folder.parent.rglob("*")) if p.is_file()}


def test_numpy_settings_are_accepted_and_saved_as_json_numbers(tmp_path):
    model = small_model(lora_alpha=np.float32(16), lora_dropout=np.float64(0.1))
    moslora_ext.add_adapters(model, ["0"], r=np.int64(3), adapter_name="b")
    moslora_ext.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config[RECORD_FIELD]["layers"]["0"]["lora_alpha"] == 16.0 and type(config[RECORD_FIELD]["layers"]["0"]["lora_alpha"]) is float
    assert model[0].adapters["b"].config.r == 3 and type(model[0].adapters["b"].config.r) is int
    x = torch.randn(4, 12)
    loaded = moslora_ext.load_adapter(fresh(), tmp_path / "a").eval()
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_save_keeps_the_previous_adapter_and_leaves_no_partial_folder(tmp_path, monkeypatch, existing):
    folder = tmp_path / "adapter"
    old = small_model(seed=0)
    if existing:
        moslora_ext.save_adapter(old, folder)
    before = files(folder)

    def disk_full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "fsync", disk_full)  # fails after both files are written
    with pytest.raises(OSError, match="No space left"):
        moslora_ext.save_adapter(small_model(seed=1), folder)
    assert files(folder) == before  # the old adapter whole, or nothing at all; no temporary left
    if existing:
        x = torch.randn(3, 12)
        assert torch.equal(moslora_ext.load_adapter(fresh(), folder).eval()(x), old.eval()(x))


def test_a_save_over_an_adapter_replaces_it_whole(tmp_path):
    folder = tmp_path / "adapter"
    moslora_ext.save_adapter(small_model(seed=0), folder)
    (folder / "README.md").write_text("kept")
    new = small_model(seed=1, lora_alpha=4)
    moslora_ext.save_adapter(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    x = torch.randn(3, 12)
    assert torch.equal(moslora_ext.load_adapter(fresh(seed=1), folder).eval()(x), new.eval()(x))


def test_a_refused_safe_merge_leaves_every_weight_bit_identical():
    model = small_model()
    with torch.no_grad():
        model[2].lora_B[0, 0] = float("inf")  # the second layer refuses, after the first could merge
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="inf or NaN"):
        moslora_ext.merge_adapters(model, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(layer.merged for layer in moslora_ext.adapted_layers(model).values())


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_a_merge_refused_by_a_4bit_layer_leaves_the_plain_layer_before_it_untouched():
    import bitsandbytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), bitsandbytes.nn.Linear4bit(16, 16, quant_type="nf4").to("cpu"))
    moslora_ext.add_adapters(model, "all-linear", r=2)
    nn.init.normal_(model[0].lora_B)
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="requantize=True"):
        moslora_ext.merge_adapters(model)
    assert torch.equal(model[0].weight, before) and not model[0].merged


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_a_second_all_linear_adapter_on_a_4bit_model_goes_on_the_same_layers():
    import bitsandbytes

    model = nn.Sequential(bitsandbytes.nn.Linear4bit(16, 16, quant_type="nf4").to("cpu"), nn.Linear(16, 8))
    moslora_ext.add_adapters(model, "all-linear", r=2)
    moslora_ext.add_adapters(model, "all-linear", r=2, adapter_name="b")
    assert moslora_ext.list_adapters(model) == {"default": ["0", "1"], "b": ["0", "1"]}
    assert not any(isinstance(m, moslora_ext.AdapterLayer) for m in model[0].modules() if m is not model[0])


def test_targets_never_select_the_model_itself_nor_modules_inside_adapted_layers():
    model = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="matches no module"):
        moslora_ext.add_adapters(model, "all-linear")
    assert model.weight.requires_grad and isinstance(model, nn.Linear)
    wrapped = nn.Sequential(nn.Linear(8, 8))
    moslora_ext.add_adapters(wrapped, ["0"])
    assert moslora_ext.model.targets.matching_names(wrapped, ["default"]) == []  # not 0.adapters.default
    assert moslora_ext.model.targets.matching_names(wrapped, ".*") == ["0"]


def test_training_a_merged_layer_says_that_it_is_merged():
    model = small_model().train()
    moslora_ext.merge_adapters(model)
    with pytest.warns(UserWarning, match="is merged into this Linear's weight.*unmerge before training"):
        model(torch.randn(2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(torch.randn(2, 12))  # inference on a merged model is what merging is for: no warning


# --- transformers models ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", ["lm_head", "wte"])
@pytest.mark.parametrize("merge", ["merge_adapters", "merge_and_unload"])
def test_merging_into_a_tied_weight_unties_it_with_a_warning(tmp_path, target, merge):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    moslora_ext.add_adapters(model, [target], r=4)
    with torch.no_grad():
        layer = next(iter(moslora_ext.adapted_layers(model).values()))
        layer.lora_B.normal_(std=0.5)
        expected = model(IDS).logits
    other = model.transformer.wte if target == "lm_head" else model.lm_head
    other_before = other.weight.detach().clone()
    with pytest.warns(UserWarning, match="is tied to .*gets a copy of the weight of its own"):
        getattr(moslora_ext, merge)(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(other.weight, other_before)  # the other end of the tie is as it was
    assert model.config.tie_word_embeddings is False
    if merge == "merge_and_unload":  # the untied model saves and reloads as it computes
        model.save_pretrained(tmp_path / "merged")
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_saved_after_layer_level_merges_is_not_loaded_twice(tmp_path):
    model = tiny_gpt2()
    moslora_ext.add_adapters(model, ["c_attn"], r=4)
    for layer in moslora_ext.adapted_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.5)
        layer.merge()  # the layer-level call, not merge_adapters
    model.save_pretrained(tmp_path / "merged")
    with pytest.raises(ValueError, match="saved with 2 adapted layers merged.*add it twice"):
        moslora_ext.load_adapter(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged"),
                                 tmp_path / "merged")
    for layer in moslora_ext.adapted_layers(model).values():
        layer.unmerge()
    model.save_pretrained(tmp_path / "unmerged")
    reloaded = moslora_ext.load_adapter(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "unmerged"),
                                        tmp_path / "unmerged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits)


def test_tied_modules_to_save_are_saved_and_restored(tmp_path):
    model = tiny_gpt2()
    moslora_ext.add_adapters(model, ["c_attn"], r=4, modules_to_save=["wte", "lm_head"])
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.1)
    moslora_ext.save_adapter(model, tmp_path / "a")
    reloaded = moslora_ext.load_adapter(tiny_gpt2(seed=1), tmp_path / "a").eval()
    assert torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)


def test_a_peft_config_without_lora_alpha_takes_peft_default(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"],
                                                             fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["lora_alpha"]
    config_file.write_text(json.dumps(config))
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft").eval()
    assert theirs.peft_config["default"].lora_alpha == 8
    ours = moslora_ext.load_peft_adapter(tiny_gpt2(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=1e-5)


def test_refusals_name_classes_by_their_import_path():
    with pytest.raises(TypeError, match=r"h\.0\.attn is a transformers\.models\.gpt2\.modeling_gpt2\.GPT2Attention"):
        moslora_ext.add_adapters(tiny_gpt2(), ["attn"])


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_merge_and_unload_of_a_4bit_model_with_float32_rest_runs_in_float32(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "fp32")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=quantization,
                                                              device_map="cpu").eval()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    moslora_ext.add_adapters(model, "all-linear", r=4)
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            layer.lora_B.normal_(std=0.05)
        expected = model(IDS).logits
        moslora_ext.merge_and_unload(model)
        merged = model(IDS).logits  # raised a float/bfloat16 mismatch when the merged layers were bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(merged, expected, atol=0.05, rtol=0.05)  # the 4-bit base computes in bfloat16
