"""Adapters on tiny Hugging Face models built from configs (no download)."""

import json

import pytest
import torch

import moslora_ext

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0, model_class=None, **config_overrides):
    """A tiny Llama (a causal LM unless ``model_class`` says otherwise) built from a config."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      **config_overrides)
    return (model_class or transformers.LlamaForCausalLM)(config)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # every Conv1D: attention in and out, MLP in and out


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (4, 16), generator=g)


def adapted_llama(lora_dropout=0.0, use_rslora=False):
    model = moslora_ext.add_adapters(tiny_llama(), TARGETS, r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                     use_rslora=use_rslora)
    with torch.no_grad():  # a trained-looking adapter, so merging has something to fold in
        for layer in moslora_ext.adapted_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    return model


def test_adapters_on_every_projection():
    model = adapted_llama()
    assert len(moslora_ext.adapted_layers(model)) == 2 * len(TARGETS)
    trainable, total = moslora_ext.trainable_parameters(model)
    assert 0 < trainable < total
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())


def train(model, ids, steps):
    """AdamW steps on the language-modelling loss of ``ids``; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_adamw_lowers_the_loss_and_changes_only_the_adapters():
    model = adapted_llama(lora_dropout=0.05)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, batch(), 8)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_merged_logits_equal_unmerged_logits():
    model = adapted_llama().eval()
    ids = batch(1)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        moslora_ext.merge_adapters(model)
        merged = model(input_ids=ids).logits
        moslora_ext.merge_and_unload(model)
        unloaded = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unloaded, unmerged, rtol=1e-4, atol=1e-4)
    assert not moslora_ext.adapted_layers(model)


@pytest.mark.parametrize("merge", ["merge_adapters", "merge_and_unload"])
def test_merging_inside_autocast_gives_the_unmerged_logits(merge):
    model = adapted_llama().eval()
    ids = batch(1)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            getattr(moslora_ext, merge)(model)
        merged = model(input_ids=ids).logits
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)  # fp32 precision, not bf16's


def test_adapters_on_a_bfloat16_model_are_float32_as_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(tiny_llama().bfloat16(), peft.LoraConfig(r=4, target_modules=TARGETS))
    peft_dtypes = {p.dtype for n, p in reference.named_parameters() if "lora_" in n}
    model = moslora_ext.add_adapters(tiny_llama().bfloat16(), TARGETS, r=4)
    ours = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert ours == peft_dtypes == {torch.float32}
    ids = batch()
    output = model(input_ids=ids, labels=ids)
    assert output.logits.dtype == torch.bfloat16  # computed in the base dtype
    output.loss.backward()
    assert {p.grad.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    moslora_ext.save_adapter(model, tmp_path)
    reloaded = moslora_ext.load_adapter(tiny_llama().bfloat16(), tmp_path)
    assert {p.dtype for n, p in reloaded.named_parameters() if "lora_" in n} == {torch.float32}
    kept = moslora_ext.add_adapters(tiny_llama().bfloat16(), TARGETS, r=4, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {torch.bfloat16}


def gradients(model, ids):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks in both runs
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients():
    model = adapted_llama(lora_dropout=0.1).train()
    ids = batch(2)
    plain = gradients(model, ids)
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name of gradient_checkpointing_enable
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    checkpointed = gradients(model, ids)
    assert len(calls) == 2  # forward, then the recomputation in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_torch_compile_matches_eager():
    model = adapted_llama().train()
    ids = batch(3)
    eager = gradients(model, ids)
    model.forward = torch.compile(model.forward)
    compiled = gradients(model, ids)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_on_llama(tmp_path):
    model = adapted_llama().eval()
    moslora_ext.save_adapter(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    adapter_numel = moslora_ext.trainable_parameters(model)[0]
    assert size < adapter_numel * 4 + 16_384  # only the adapter tensors (plus the header)
    fresh = moslora_ext.load_adapter(tiny_llama(), tmp_path).eval()
    ids = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def perturb(peft_model, *name_parts):
    """Draw the PEFT model's parameters whose names hold one of ``name_parts`` (a trained-looking adapter)."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(part in name for part in name_parts):
                p.normal_(std=0.1)


def test_falcon_linear_layers_load_a_peft_adapter_as_peft_computes_it(tmp_path):
    # Falcon's projections are FalconLinear, an nn.Linear subclass with the plain linear map.
    peft = pytest.importorskip("peft")

    def tiny_falcon():
        torch.manual_seed(0)
        config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, new_decoder_architecture=False)
        return transformers.FalconForCausalLM(config).eval()

    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    peft_model = peft.get_peft_model(tiny_falcon(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb(peft_model, "lora_B")
    peft_model.save_pretrained(tmp_path)
    model = moslora_ext.load_peft_adapter(tiny_falcon(), tmp_path)
    assert len(moslora_ext.adapted_layers(model)) == 2 * len(targets)
    ids = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)


# Every projection (GPT-2's are Conv1D layers); lm_head, the output head, is left out.
@pytest.mark.parametrize("make_model, layer_class, count", [(tiny_llama, moslora_ext.Linear, 2 * len(TARGETS)),
                                                            (tiny_gpt2, moslora_ext.TransposedLinear, 2 * 4)])
def test_all_linear_selects_what_peft_selects(make_model, layer_class, count):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules="all-linear"))
    peft_targets = {name for name, m in peft_model.base_model.model.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = moslora_ext.adapted_layers(moslora_ext.add_adapters(make_model(), "all-linear", r=4))
    assert set(layers) == peft_targets and len(peft_targets) == count
    assert all(type(layer) is layer_class for layer in layers.values())


def test_peft_sequence_classification_adapter_restores_its_head(tmp_path):
    # PEFT's SEQ_CLS adapters carry the head (here "score") as modules_to_save tensors.
    peft = pytest.importorskip("peft")

    def tiny_classifier():
        return tiny_llama(model_class=transformers.LlamaForSequenceClassification, num_labels=3,
                          pad_token_id=0).eval()

    peft_model = peft.get_peft_model(tiny_classifier(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                        target_modules="all-linear"))
    perturb(peft_model, "lora_B", "modules_to_save")
    peft_model.save_pretrained(tmp_path)
    model = moslora_ext.load_peft_adapter(tiny_classifier(), tmp_path)
    assert list(moslora_ext.saved_modules(model)) == ["score"] and model.score.weight.requires_grad
    ids = batch(6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)
    ours = moslora_ext.add_adapters(tiny_classifier(), "all-linear", r=4, modules_to_save=["score"])
    assert set(moslora_ext.adapted_layers(ours)) == set(moslora_ext.adapted_layers(model))


def test_save_peft_adapter_is_loaded_by_peft_with_our_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted_llama(lora_dropout=0.05, use_rslora=True)  # with the default (Kaiming) mixer
    moslora_ext.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, True)
    assert config["target_modules"] == sorted(TARGETS)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = batch(7)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        assert (peft_model(input_ids=ids).logits - expected).abs().max() <= 1e-5
        # ... and it is a LoRA adapter that load_peft_adapter reads back to the same function.
        reloaded = moslora_ext.load_peft_adapter(tiny_llama().eval(), tmp_path)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_trainer_checkpoints_restore_the_adapters(tmp_path):
    # Trainer.save_model and its checkpoint-N folders hold the full state dict (lora_* keys included)
    # and config.json, where add_adapters recorded the adapter settings.
    model = moslora_ext.add_adapters(tiny_llama(), TARGETS, r=4, lora_alpha=8, lora_dropout=0.1)
    ids = batch(8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, save_steps=2,
                                          per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=[{"input_ids": row, "labels": row} for row in ids])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    # from_pretrained alone drops the lora_* tensors; load_adapter restores them from the same folder.
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "final")
    moslora_ext.load_adapter(reloaded, tmp_path / "final")
    assert not any(layer.training for layer in moslora_ext.adapted_layers(reloaded).values())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    assert all(layer.lora_dropout == 0.1 for layer in moslora_ext.adapted_layers(reloaded).values())
    moslora_ext.load_adapter(tiny_llama(), tmp_path / "checkpoint-2")

    # Sharded checkpoints are read through their index; a checkpoint without a record is refused.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = moslora_ext.load_adapter(tiny_llama(), tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=ids).logits, expected)
    moslora_ext.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    with pytest.raises(ValueError, match="no moslora_ext adapter record"):
        moslora_ext.load_adapter(tiny_llama(), tmp_path / "merged")


def test_disable_adapters_gives_the_base_logits_bit_for_bit():
    model = adapted_llama().eval()
    ids = batch(9)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with moslora_ext.disable_adapters(model):
            assert torch.equal(model(input_ids=ids).logits, tiny_llama().eval()(input_ids=ids).logits)
        assert torch.equal(model(input_ids=ids).logits, adapted)


def test_checkpoints_of_save_pretrained_restore_each_named_adapter(tmp_path):
    model = adapted_llama()
    moslora_ext.add_adapters(model, ["q_proj", "v_proj"], r=2, lora_alpha=2, adapter_name="other")
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            if "other" in layer.adapters:
                layer.adapters["other"].lora_B.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    ids = batch(10)
    model.eval()
    for name in ("default", "other"):
        moslora_ext.set_adapter(model, name)
        reloaded = moslora_ext.load_adapter(tiny_llama().eval(), tmp_path, adapter_name=name)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --- GPT-2: Conv1D layers, weight stored (in, out) --------------------------------------------


def test_gpt2_trains_saves_reloads_and_merges_in_place(tmp_path):
    model = moslora_ext.add_adapters(tiny_gpt2().train(), GPT2_TARGETS, r=4, lora_alpha=8, lora_dropout=0.1)
    ids = batch(11)
    losses = train(model, ids, 4)
    assert losses[-1] < losses[0]
    moslora_ext.save_adapter(model.eval(), tmp_path)
    reloaded = moslora_ext.load_adapter(tiny_gpt2(), tmp_path)
    c_attn = reloaded.transformer.h[0].attn.c_attn
    storage, original = c_attn.weight.data_ptr(), c_attn.weight.detach().clone()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        moslora_ext.merge_adapters(reloaded)
        assert c_attn.weight.data_ptr() == storage and c_attn.weight.shape == (32, 96)  # (in, out), in place
        torch.testing.assert_close(c_attn.weight, original + c_attn.delta_weight())
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        moslora_ext.merge_and_unload(reloaded)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert type(reloaded.transformer.h[0].attn.c_attn) is transformers.pytorch_utils.Conv1D


def test_gpt2_peft_adapter_with_fan_in_fan_out_gives_peft_logits_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS,
                                                                  fan_in_fan_out=True))
    perturb(peft_model, "lora_B")
    peft_model.save_pretrained(tmp_path / "peft")
    ids = batch(12)
    with torch.no_grad():
        model = moslora_ext.load_peft_adapter(tiny_gpt2(), tmp_path / "peft")
        torch.testing.assert_close(model(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)
        with moslora_ext.disable_adapters(model):
            assert torch.equal(model(input_ids=ids).logits, tiny_gpt2()(input_ids=ids).logits)

        ours = moslora_ext.add_adapters(tiny_gpt2(), GPT2_TARGETS, r=4, lora_alpha=8)
        for layer in moslora_ext.adapted_layers(ours).values():
            layer.lora_B.normal_(std=0.1)
        moslora_ext.save_peft_adapter(ours, tmp_path / "ours")
        config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert config["fan_in_fan_out"] is True
        exported = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
        assert (exported(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5
