"""The PEFT route in the workflows built on PEFT: the HF Trainer, TRL's SFTTrainer, QLoRA,
gradient checkpointing, torch.compile; tiny models built from configs (no download)."""

import pytest
import torch

import moslora_ext
from conftest import require_peft_route

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
require_peft_route()
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from test_peft_route import batch, copy_lora_factors, logits, moslora, tiny_llama, trained_looking  # noqa: E402
from test_transformers import train  # noqa: E402

TRAINING = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
            "report_to": [], "use_cpu": True, "disable_tqdm": True}


def mixers(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_mixer" in n}


def test_trainer_checkpoints_reload_to_identical_logits(tmp_path):
    model = moslora(tiny_llama(), lora_dropout=0.1, target_modules="all-linear")
    before = mixers(model)
    ids = batch(rows=8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), **TRAINING)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=[{"input_ids": row, "labels": row} for row in ids])
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in mixers(model).items())
    model.eval()
    expected = logits(model, ids)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-4").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-2", is_trainable=True)


def word_tokenizer():
    """A word-level tokenizer over 60 words, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(60)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def sft_trainer(model, peft_config, path):
    """TRL's SFTTrainer on 16 texts of word_tokenizer's words, with TRAINING's settings."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(f"w{(start + i) % 60}" for i in range(12)) for start in range(16)]
    # bf16=False: TRL's default bf16 has accelerate run the trained model's forward under autocast.
    config = trl.SFTConfig(output_dir=str(path), max_length=16, logging_steps=1, bf16=False, **TRAINING)
    return trl.SFTTrainer(model=model, args=config, peft_config=peft_config,
                          train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=word_tokenizer())


def training_set_loss(trainer):
    """The model's loss (eval mode) on all of the trainer's tokenized texts: logged losses are of
    different batches."""
    rows = torch.tensor([row["input_ids"] for row in trainer.train_dataset])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.model(input_ids=rows, labels=rows).loss.item()
    trainer.model.train()
    return loss


def test_trl_sft_trainer_trains_a_moslora_config_and_saves_a_checkpoint_that_reloads(tmp_path):
    peft_config = moslora_ext.MoSLoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.05,
                                            mixer_init="orthogonal")
    trainer = sft_trainer(tiny_llama(), peft_config, tmp_path)
    model = trainer.model
    assert isinstance(model, PeftModel) and isinstance(model.peft_config["default"], moslora_ext.MoSLoRAConfig)
    before, loss_before = mixers(model), training_set_loss(trainer)
    trainer.train()
    assert training_set_loss(trainer) < loss_before
    assert all(not torch.equal(p, before[n]) for n, p in mixers(model).items())
    model.eval()
    ids = batch()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-4").eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing):
        model = trained_looking(moslora(tiny_llama(), lora_dropout=0.1))
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        torch.manual_seed(0)
        ids = batch()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile_matches_eager():
    model = trained_looking(moslora(tiny_llama(), target_modules=["q_proj", "v_proj"])).eval()
    ids = batch()
    compiled = torch.compile(model, fullgraph=False)
    torch.testing.assert_close(logits(compiled, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden_size=64).save_pretrained(folder)  # bitsandbytes' 4-bit blocks need 64 columns
    return folder


def load_quantized(folder, bits):
    if bits == 4:
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                             dtype=torch.bfloat16, device_map="cpu")


@pytest.mark.parametrize("bits", [4, 8])
def test_identity_mixer_on_bitsandbytes_bases_gives_peft_qlora_outputs(llama_folder, bits):
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = trained_looking(get_peft_model(load_quantized(llama_folder, bits),
                                            LoraConfig(r=4, lora_alpha=8, target_modules=targets))).eval()
    ours = moslora(load_quantized(llama_folder, bits), mixer_init="identity", train_mixer=False,
                   target_modules=targets).eval()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == f"MoSLoRALinear{'4bit' if bits == 4 else '8bitLt'}"
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    copy_lora_factors(theirs, ours)
    ids = batch()
    # Both add the adapter to the same quantized base output; ours computes it in bf16, PEFT in fp32.
    torch.testing.assert_close(logits(ours, ids).float(), logits(theirs, ids).float(), rtol=0.02, atol=0.02)


def test_qlora_recipe_trains_with_prepare_model_for_kbit_training(llama_folder, tmp_path):
    model = peft.prepare_model_for_kbit_training(load_quantized(llama_folder, 4))
    model = moslora(model, target_modules="all-linear", lora_dropout=0.1)
    before = mixers(model)
    ids = batch()
    losses = train(model.train(), ids, steps=5)
    assert losses[-1] < losses[0] - 0.1
    assert all(not torch.equal(p, before[n]) for n, p in mixers(model).items())
    model.eval()
    model.save_pretrained(tmp_path)
    base = peft.prepare_model_for_kbit_training(load_quantized(llama_folder, 4))  # fp32 norms and head, as trained
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_merging_into_bitsandbytes_bases_requantizes_as_peft_does(llama_folder, bits):
    """PEFT dequantizes, adds the update (ours through the variant, in float32 as PEFT's
    LoRA) and quantizes again: with an identity mixer, the merged model is PEFT's."""
    targets = ["q_proj", "v_proj"]
    theirs = trained_looking(get_peft_model(load_quantized(llama_folder, bits),
                                            LoraConfig(r=4, lora_alpha=8, target_modules=targets))).eval()
    ours = moslora(load_quantized(llama_folder, bits), mixer_init="identity", target_modules=targets).eval()
    copy_lora_factors(theirs, ours)
    ids = batch()
    # Both run a forward first: bitsandbytes' CPU path repacks a 4-bit weight on its first call.
    adapted = logits(ours, ids).float()
    logits(theirs, ids)
    merged, theirs_merged = (logits(m.merge_and_unload(), ids).float() for m in (ours, theirs))
    torch.testing.assert_close(merged, theirs_merged, rtol=0, atol=0)
    assert not torch.equal(merged, adapted)  # it did requantize (and round)
