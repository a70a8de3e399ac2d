"""``save_peft_adapter(..., engine="vllm")``: what vLLM would not load is refused before anything is written.

What vLLM really does with these adapters is checked by tools/serving_check.py (README, Serving);
these are the refusals, on tiny models.
"""

import json
import os

import pytest
import torch
from torch import nn

import moslora_ext
from moslora_ext.formats import engines

transformers = pytest.importorskip("transformers")


def tiny_llama(model_class=None, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, **overrides)
    return (model_class or transformers.LlamaForCausalLM)(config)


def test_an_adapter_vllm_serves_is_written_as_without_the_check(tmp_path):
    model = moslora_ext.add_adapters(tiny_llama(), ["q_proj", "down_proj", "embed_tokens", "lm_head"], r=4)
    moslora_ext.save_peft_adapter(model, tmp_path / "checked", engine="vllm")
    moslora_ext.save_peft_adapter(model, tmp_path / "plain")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "checked" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


@pytest.mark.parametrize("r, max_lora_rank", [(1, 1), (4, 8), (8, 8), (9, 16), (300, 320), (512, 512), (513, None)])
def test_the_max_lora_rank_that_serves_a_rank(r, max_lora_rank):
    assert engines.vllm_max_lora_rank(r) == max_lora_rank


def assert_refused(model, tmp_path, match):
    with pytest.raises(ValueError, match=match):
        moslora_ext.save_peft_adapter(model, tmp_path / "adapter", engine="vllm")
    assert not os.path.exists(tmp_path / "adapter")  # nothing written


def test_a_rank_above_512_is_refused(tmp_path):
    model = moslora_ext.add_adapters(tiny_llama(), ["q_proj"], r=513)
    assert_refused(model, tmp_path, r"vllm would not load this adapter: r=513: vLLM serves ranks up to 512")


def test_modules_to_save_other_than_a_classification_head_are_refused(tmp_path):
    model = moslora_ext.add_adapters(tiny_llama(), ["q_proj"], r=4, modules_to_save=["lm_head"])
    assert_refused(model, tmp_path, r"modules_to_save=\['lm_head'\]: vLLM takes at most one, a classification head")
    classifier = tiny_llama(transformers.LlamaForSequenceClassification, num_labels=2, pad_token_id=0)
    moslora_ext.add_adapters(classifier, ["q_proj"], r=4, modules_to_save=["score"])
    moslora_ext.save_peft_adapter(classifier, tmp_path / "classifier", engine="vllm")
    config = json.loads((tmp_path / "classifier" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]


def test_adapters_on_convolutions_are_refused(tmp_path):
    model = moslora_ext.add_adapters(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), ["0"], r=2)
    assert_refused(model, tmp_path, r"adapters on convolutions \(0\): vLLM's LoRA takes linear and embedding")


def test_an_unknown_engine_is_refused(tmp_path):
    model = moslora_ext.add_adapters(tiny_llama(), ["q_proj"], r=4)
    with pytest.raises(ValueError, match=r"engine must be one of \('vllm',\)"):
        moslora_ext.save_peft_adapter(model, tmp_path / "adapter", engine="sglang")
    assert not os.path.exists(tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_adapters_on_fused_experts_are_refused_and_dense_ones_of_the_same_model_export(tmp_path, kind):
    from test_experts import tiny

    experts = moslora_ext.add_adapters(tiny(kind), ["q_proj"], r=2,
                                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert_refused(experts, tmp_path, r"adapters on fused MoE expert parameters \(model\.layers\.0\.mlp\.experts, "
                   r".*\): vLLM reads expert LoRA deltas transposed relative to PEFT's target_parameters layout")
    moslora_ext.save_peft_adapter(experts, tmp_path / "for-peft")  # no engine: PEFT reads that layout
    dense = moslora_ext.add_adapters(tiny(kind), ["q_proj", "o_proj"], r=2)
    moslora_ext.save_peft_adapter(dense, tmp_path / "dense", engine="vllm")
    assert sorted(os.listdir(tmp_path / "dense")) == ["adapter_config.json", "adapter_model.safetensors"]
