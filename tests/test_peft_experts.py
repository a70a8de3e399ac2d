"""MoSLoRA on MoE expert parameters through the PEFT route: ``MoSLoRAConfig(target_parameters=...)``
on PEFT's ParamWrapper, against PEFT LoRA itself, our own ``add_adapters`` and the HF Trainer."""

import pytest
import torch

import moslora_ext
from conftest import require_peft_route

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
require_peft_route()

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_experts import add_all_linear, ids, tiny  # noqa: E402
from test_peft_route import (  # noqa: E402
    assert_full_state_unchanged,
    assert_unchanged,
    copy_lora_factors,
    full_state,
    saved_with,
    structure_and_values,
    trained_looking,
)
from test_peft_workflows import TRAINING, sft_trainer, training_set_loss  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SETTINGS = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "target_parameters": EXPERTS}


def moslora_experts(kind, **settings):
    return get_peft_model(tiny(kind), moslora_ext.MoSLoRAConfig(**SETTINGS | settings))


def mixers(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_mixer" in n}


def loss_and_grads(model):
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_identity_frozen_mixer_gives_peft_lora_logits_and_gradients(kind):
    theirs = trained_looking(get_peft_model(tiny(kind), LoraConfig(**SETTINGS)))
    ours = moslora_experts(kind, mixer_init="identity", train_mixer=False)
    copy_lora_factors(theirs, ours)
    expert_mixers = {n: p for n, p in ours.named_parameters() if "experts.lora_mixer" in n}
    assert expert_mixers and all(p.shape == (4, 2, 2) and not p.requires_grad for p in expert_mixers.values())
    loss, grads = loss_and_grads(ours)
    want_loss, want_grads = loss_and_grads(theirs)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys() and any("experts" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-5)


def test_per_expert_mixers_give_add_adapters_logits_and_merge(tmp_path):
    """ΔW_e = s B_e M_e A_e per expert, the same as moslora_ext's own Experts layer with the same tensors;
    a router's weight (2-D) has one (r, r) mixer, as moslora_ext's RouterWeight."""
    model = trained_looking(moslora_experts("mixtral", target_modules=[], mixer_init="orthogonal",
                                            target_parameters=EXPERTS + ["mlp.gate.weight"])).eval()
    assert model.base_model.model.model.layers[0].mlp.gate.lora_mixer["default"].weight.shape == (2, 2)
    model.save_pretrained(tmp_path / "route")
    # our own API reads the saved folder: PEFT's ParamWrapper keys plus lora_mixer (E, r, r)
    ours = moslora_ext.load_peft_adapter(tiny("mixtral"), tmp_path / "route").eval()
    layer = moslora_ext.adapted_layers(ours)["model.layers.0.mlp.experts"]
    wrapper = model.base_model.model.model.layers[0].mlp.experts  # down_proj's wrapper, around gate_up_proj's
    adapter = layer.adapters["default"]["down_proj"]
    lora_A, mixed_B = wrapper.expert_factors("default")
    torch.testing.assert_close(adapter.lora_B @ adapter.lora_mixer, mixed_B, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(adapter.lora_A, lora_A, atol=0, rtol=0)
    expected = model(ids()).logits
    torch.testing.assert_close(ours(ids()).logits, expected, atol=1e-5, rtol=1e-5)
    # a per-expert reference built from the base model and the saved tensors
    reference = tiny("mixtral")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_mixer" in name:
                parent = name.removeprefix("base_model.model.").split(".lora_mixer")[0]
                module = model.base_model.model.get_submodule(parent)
                param = reference.get_submodule(parent.replace(".base_layer", "")).get_parameter(module.parameter_name)
                lora_A, mixed_B = module.expert_factors("default")
                param += (module.scaling["default"] * mixed_B @ lora_A).reshape(param.shape)
    torch.testing.assert_close(reference.eval()(ids()).logits, expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_reload_trainable_and_the_refusals_by_name(tmp_path):
    model = trained_looking(moslora_experts("mixtral")).eval()
    expected = model(ids()).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny("mixtral"), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "experts.lora_mixer" in n)
    torch.testing.assert_close(reloaded.eval()(ids()).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        moslora_experts("mixtral", lora_dropout=0.1)
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model(ids(), adapter_names=["default"] * 2)


def train_with_trainer(model, path):
    rows = torch.cat([ids(seed) for seed in range(4)])
    args = transformers.TrainingArguments(output_dir=str(path), **TRAINING | {"logging_steps": 1})
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=[{"input_ids": row, "labels": row} for row in rows])
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def expert_adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n and p.requires_grad}


@pytest.mark.parametrize("route", ["add_adapters", "peft"])
def test_trainer_trains_expert_adapters_and_checkpoints_reload(route, tmp_path):
    if route == "peft":
        model = moslora_experts("mixtral", target_modules="all-linear", mixer_init="orthogonal")
    else:
        model = add_all_linear(tiny("mixtral"), mixer_init="orthogonal")
    model.train()
    before = expert_adapter_tensors(model)
    assert before
    losses = train_with_trainer(model, tmp_path)
    assert losses[-1] < losses[0]
    after = expert_adapter_tensors(model)
    assert all(not torch.equal(after[n], before[n]) for n in before)
    model.eval()
    expected = model(ids()).logits
    if route == "peft":
        reloaded = PeftModel.from_pretrained(tiny("mixtral"), tmp_path / "checkpoint-4")
    else:
        reloaded = moslora_ext.load_adapter(tiny("mixtral"), tmp_path / "checkpoint-4")
    torch.testing.assert_close(reloaded.eval()(ids()).logits, expected, atol=0, rtol=0)


def test_trl_sft_trainer_trains_expert_adapters_through_target_parameters(tmp_path):
    peft_config = moslora_ext.MoSLoRAConfig(**SETTINGS | {"mixer_init": "orthogonal"})
    trainer = sft_trainer(tiny("mixtral").train(), peft_config, tmp_path)
    model = trainer.model
    before, loss_before = expert_adapter_tensors(model), training_set_loss(trainer)
    assert any("experts.lora_mixer" in n for n in before)
    trainer.train()
    assert training_set_loss(trainer) < loss_before
    after = expert_adapter_tensors(model)
    assert all(not torch.equal(after[n], before[n]) for n in before)
    model.eval()
    reloaded = PeftModel.from_pretrained(tiny("mixtral"), tmp_path / "checkpoint-4").eval()
    torch.testing.assert_close(reloaded(ids()).logits, model(ids()).logits, atol=0, rtol=0)


def test_a_refusal_part_way_through_injection_leaves_the_model_as_it_was():
    # PEFT adapts q_proj before it reaches the experts, whose ParamWrapper refuses lora_dropout.
    model = tiny("mixtral")
    before = structure_and_values(model)
    with pytest.raises(ValueError, match="does not work with lora_dropout"):
        get_peft_model(model, moslora_ext.MoSLoRAConfig(**SETTINGS | {"lora_dropout": 0.1}))
    assert_unchanged(model, before)
    # the same for a second adapter on a PeftModel: its existing layers lose nothing and gain nothing
    peft_model = moslora_experts("mixtral")
    before = structure_and_values(peft_model)
    with pytest.raises(ValueError, match="does not work with lora_dropout"):
        peft_model.add_adapter("second", moslora_ext.MoSLoRAConfig(**SETTINGS | {"lora_dropout": 0.1}))
    assert_unchanged(peft_model, before)
    assert list(peft_model.peft_config) == ["default"]
    peft_model.add_adapter("second", moslora_ext.MoSLoRAConfig(**SETTINGS))  # still takes a good one


def test_the_refused_mixed_batch_leaves_no_hooks_behind():
    model = trained_looking(moslora_experts("mixtral")).eval()
    expected = model(ids()).logits
    before = full_state(model)
    with pytest.raises(ValueError, match="mixed adapter batches"):  # PEFT's ParamWrapper refuses them
        model(ids(), adapter_names=["default"] * 2)
    assert_full_state_unchanged(model, before)
    torch.testing.assert_close(model(ids()).logits, expected, atol=0, rtol=0)


def test_a_folder_without_an_expert_mixer_is_refused_by_both_loaders(tmp_path):
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_mixer.weight"  # gate_up_proj's (E, r, r)
    folder = saved_with(tmp_path, trained_looking(moslora_experts("mixtral", mixer_init="orthogonal")),
                        lambda tensors: tensors.pop(key))
    base = tiny("mixtral")
    before = full_state(base)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.base_layer\.lora_mixer\.default\.weight is "
                                         "missing"):
        PeftModel.from_pretrained(base, folder)
    assert_full_state_unchanged(base, before)
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.experts\.gate_up_proj has no lora_mixer"):
        moslora_ext.load_peft_adapter(base, folder)
    assert_full_state_unchanged(base, before)
