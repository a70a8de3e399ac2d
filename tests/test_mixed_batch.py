"""Mixed-adapter batches (``adapter_names=``, one adapter per batch row), against each row run alone and PEFT."""

import contextlib
import copy
import threading

import pytest
import torch
from torch import nn

import moslora_ext

transformers = pytest.importorskip("transformers")

NAMES = ["a", "b", "c"]
ROWS = ["b", "__base__", "a", "b", "c", "a"]  # every adapter, repeated and interleaved, and the base
# A row in a batch and the same row alone differ by float32 rounding even for a plain nn.Linear: MKL's
# GEMM blocks (and so rounds) by the number of rows. A few ulps of outputs of size ~1, no more.
AS_ALONE = {"rtol": 1e-6, "atol": 1e-6}


def with_adapters(layer):
    """``layer`` (holding "a") with "b" and "c" too, every factor drawn (trained-looking, mixers not identity)."""
    for name in NAMES[1:]:
        layer.add_adapter(name, moslora_ext.AdapterConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.normal_(std=0.3)
    return layer.eval()


def gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(24, 16)


def bnb_nf4():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")  # CPU: out % 32 == 0
    layer.load_state_dict(nn.Linear(64, 32).state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to the device


LAYERS = {
    "quantized_nf4": (bnb_nf4, (6, 5, 64)),
    "linear": (lambda: nn.Linear(16, 24), (6, 5, 16)),
    "linear_no_bias": (lambda: nn.Linear(16, 24, bias=False), (6, 5, 16)),
    "conv1d_gpt2": (gpt2_conv1d, (6, 5, 16)),
    "embedding": (lambda: nn.Embedding(40, 24, padding_idx=0), (6, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 8, 3, padding=1), (6, 3, 7, 7)),
}


def layer_and_input(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    base = make()
    layer = with_adapters(moslora_ext.layers.dispatch.adapter_class(base).from_module(base, "a", r=4, lora_alpha=8))
    x = torch.randint(0, 40, shape) if kind == "embedding" else torch.randn(shape)
    return layer, x


def each_row_alone(layer, x, adapter_names):
    """Row i of x through ``layer`` with adapter ``adapter_names[i]`` active (the base alone for "__base__")."""
    outputs = []
    for row, name in zip(x, adapter_names):
        if name == "__base__":
            outputs.append(layer.base_forward(row[None]))
        else:
            layer.set_adapter(name)
            outputs.append(layer(row[None]))
    return torch.cat(outputs)


@pytest.mark.parametrize("kind", LAYERS)
def test_each_row_is_what_it_is_alone(kind):
    layer, x = layer_and_input(kind)
    with torch.no_grad():
        mixed = layer(x, adapter_names=ROWS)
        torch.testing.assert_close(mixed, each_row_alone(layer, x, ROWS), **AS_ALONE)
        assert not torch.equal(mixed[0], layer.base_forward(x[:1])[0])  # the adapters do change the rows


def test_the_base_runs_once_and_each_adapter_once():
    layer, x = layer_and_input("linear")
    with torch.no_grad(), torch.profiler.profile() as profile:
        layer(x, adapter_names=ROWS)
    counts = {event.key: event.count for event in profile.key_averages()}
    assert counts["moslora_ext::forward"] == len(NAMES)  # one fused adapter op per adapter, on its rows ...
    # ... each projecting them down once (its up-projection is an addmm through LibTorch's stable C shim,
    # which calls the kernel without the dispatcher, so the profiler does not see it) ...
    assert counts["aten::mm"] == len(NAMES)
    assert counts["aten::addmm_"] == 1  # ... and the base GEMM once, into them


def test_mixed_batch_under_autocast_matches_each_row_alone():
    layer, x = layer_and_input("linear")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = layer(x, adapter_names=ROWS)
        assert mixed.dtype == torch.bfloat16
        torch.testing.assert_close(mixed, each_row_alone(layer, x, ROWS), rtol=1e-2, atol=1e-2)  # bf16 ulps


@pytest.mark.parametrize("kind", LAYERS)
def test_mixed_batch_under_autocast_on_bfloat16_inputs(kind):
    # Inside a model under autocast, a layer's input is bfloat16 already while its weight is float32.
    layer, x = layer_and_input(kind)
    x = x.bfloat16() if x.is_floating_point() else x
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x, adapter_names=ROWS), each_row_alone(layer, x, ROWS), rtol=1e-2, atol=1e-2)


def test_training_without_dropout_gives_each_rows_gradients():
    layer, x = layer_and_input("linear")
    layer.train()
    layer.adapters["a"].set_trainable(True)
    layer(x, adapter_names=ROWS).square().sum().backward()
    mixed_grad = layer.adapters["a"].lora_A.grad.clone()
    layer.adapters["a"].lora_A.grad = None
    layer.set_adapter("a")
    rows = [i for i, name in enumerate(ROWS) if name == "a"]
    layer(x[rows]).square().sum().backward()
    torch.testing.assert_close(mixed_grad, layer.adapters["a"].lora_A.grad)


def test_layer_refusals():
    layer, x = layer_and_input("linear")
    with pytest.raises(ValueError, match=r"\['d'\].*adapters \['a', 'b', 'c'\]"):
        layer(x, adapter_names=["a", "d", "a", "a", "a", "a"])
    with pytest.raises(ValueError, match="has 2 names, one per batch row, but this Linear's input has shape"):
        layer(x, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="a list of adapter names"):
        layer(x, adapter_names="a")
    layer.train()
    layer.adapters["b"].config.lora_dropout = 0.1
    with pytest.raises(RuntimeError, match=r"training mode: adapters \['b'\] have lora_dropout"):
        layer(x, adapter_names=ROWS)
    layer(x, adapter_names=["a"] * 6)  # adapters without dropout may train in a mixed batch
    layer.eval().merge()
    with pytest.raises(RuntimeError, match="needs unmerged adapters.*'a' merged"):
        layer(x, adapter_names=ROWS)


# --- whole models -------------------------------------------------------------------------------

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def llama_with_adapters():
    model = tiny_llama()
    for name in NAMES:
        moslora_ext.add_adapters(model, TARGETS, r=4, lora_alpha=8, adapter_name=name)
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            for p in layer.adapters.parameters():
                p.normal_(std=0.2)
    return model.eval()


def ids(rows, seed=0):
    return torch.randint(0, 64, (rows, 8), generator=torch.Generator().manual_seed(seed))


def rows_alone(model, input_ids, adapter_names, run):
    """``run(model, row)`` for each row with its adapter set (the adapters disabled for "__base__")."""
    outputs = []
    for row, name in zip(input_ids, adapter_names):
        if name == "__base__":
            with moslora_ext.disable_adapters(model):
                outputs.append(run(model, row[None]))
        else:
            outputs.append(run(moslora_ext.set_adapter(model, name), row[None]))
    return torch.cat(outputs)


def logits(model, input_ids, **kwargs):
    return model(input_ids=input_ids, **kwargs).logits


def test_llama_mixed_batch_logits_equal_each_row_alone():
    model, input_ids = llama_with_adapters(), ids(len(ROWS))
    with torch.no_grad():
        mixed = logits(model, input_ids, adapter_names=ROWS)
        torch.testing.assert_close(mixed, rows_alone(model, input_ids, ROWS, logits), **AS_ALONE)
        assert (mixed[0] - logits(moslora_ext.set_adapter(model, "a"), input_ids[:1])[0]).abs().max() > 0.1


def test_llama_mixed_batch_under_autocast_matches_each_row_alone():
    model, rows = llama_with_adapters(), ["a", "b", "__base__"]
    input_ids = ids(len(rows))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = logits(model, input_ids, adapter_names=rows)
        alone = rows_alone(model, input_ids, rows, logits)
    torch.testing.assert_close(mixed, alone, rtol=2e-2, atol=2e-2)  # bf16 ulps
    assert (alone[0] - alone[1]).abs().max() > 0.1


@pytest.mark.parametrize("search", [{}, {"num_beams": 2, "num_return_sequences": 2}])
def test_llama_generate_with_adapter_names_gives_each_rows_tokens(search):
    model, input_ids = llama_with_adapters(), ids(len(ROWS), seed=1)

    def generate(model, input_ids, **kwargs):
        return model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **search, **kwargs)

    with torch.no_grad():
        assert torch.equal(generate(model, input_ids, adapter_names=ROWS), rows_alone(model, input_ids, ROWS, generate))


def test_copies_and_pickled_models_generate_with_adapter_names(tmp_path):
    model, input_ids = llama_with_adapters(), ids(3, seed=4)
    torch.save(model, tmp_path / "model.pt")
    copies = [copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)]
    with torch.no_grad():
        expected = model.generate(input_ids, max_new_tokens=3, do_sample=False, adapter_names=ROWS[:3])
        for other in copies:
            assert other.generate.model is other
            assert torch.equal(other.generate(input_ids, max_new_tokens=3, do_sample=False,
                                              adapter_names=ROWS[:3]), expected)


def test_a_layer_without_one_of_the_adapters_gives_those_rows_its_base():
    model = llama_with_adapters()
    moslora_ext.add_adapters(model, ["model.layers.0.self_attn.q_proj"], r=4, adapter_name="only_q0")
    q0 = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q0.adapters["only_q0"].lora_B.normal_()
        input_ids = ids(2)
        mixed = logits(model, input_ids, adapter_names=["only_q0", "a"])
        torch.testing.assert_close(mixed, rows_alone(model, input_ids, ["only_q0", "a"], logits),
                                   **AS_ALONE)


def test_threads_each_get_their_own_names():
    # One thread runs mixed batches while another runs plain calls on the same model: neither sees
    # the other's names (README, "Threads": forwards may run concurrently).
    model, input_ids = llama_with_adapters(), ids(2)
    calls = {"mixed": {"adapter_names": ["b", "b"]}, "plain": {}}
    with torch.no_grad():
        expected = {kind: logits(model, input_ids, **kwargs) for kind, kwargs in calls.items()}
    start, right = threading.Barrier(len(calls)), {kind: 0 for kind in calls}

    def loop(kind):
        start.wait()
        with torch.no_grad():
            for _ in range(40):
                right[kind] += torch.allclose(logits(model, input_ids, **calls[kind]), expected[kind], **AS_ALONE)

    threads = [threading.Thread(target=loop, args=(kind,)) for kind in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert right == {"mixed": 40, "plain": 40}  # (a call that raised counts as wrong)
    assert (expected["mixed"] - expected["plain"]).abs().max() > 0.1  # the two calls do differ


def test_compiled_model_gives_each_row_its_adapter():
    model, input_ids = llama_with_adapters(), ids(2)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        calls = [{}, {"adapter_names": ["b", "a"]}, {"adapter_names": ["a", "__base__"]}, {}]
        for kwargs in calls:  # a plain call first: its graph must not serve the mixed ones
            expected = logits(model, input_ids, **kwargs)
            torch.testing.assert_close(logits(compiled, input_ids, **kwargs), expected, **AS_ALONE)
        mixed = logits(compiled, input_ids, adapter_names=["b", "a"])
        torch.testing.assert_close(mixed, rows_alone(model, input_ids, ["b", "a"], logits), **AS_ALONE)


def test_a_submodule_call_takes_adapter_names():
    model, input_ids = llama_with_adapters(), ids(3)
    rows = ["b", "__base__", "a"]

    def hidden(model, input_ids, **kwargs):
        return model.model(input_ids=input_ids, **kwargs).last_hidden_state

    with torch.no_grad():
        mixed = hidden(model, input_ids, adapter_names=rows)
        torch.testing.assert_close(mixed, rows_alone(model, input_ids, rows, hidden), **AS_ALONE)
        layer = model.model.layers[1]
        hidden_in = torch.randn(3, 8, 32)
        position = model.model.rotary_emb(hidden_in, torch.arange(8)[None])
        mixed = layer(hidden_in, position_embeddings=position, adapter_names=rows)
        for i, name in enumerate(rows):
            with moslora_ext.disable_adapters(model) if name == "__base__" else contextlib.nullcontext():
                moslora_ext.set_adapter(model, "a" if name == "__base__" else name)
                alone = layer(hidden_in[i:i + 1], position_embeddings=position)
            torch.testing.assert_close(mixed[i:i + 1], alone, **AS_ALONE)
        with pytest.raises(ValueError, match=r"\['typo'\], but"):
            hidden(model, input_ids, adapter_names=["a", "typo", "b"])


def test_model_refusals():
    model, input_ids = llama_with_adapters(), ids(2)
    with pytest.raises(ValueError, match=r"\['typo'\], but the model has the adapters \['a', 'b', 'c'\]"):
        model(input_ids=input_ids, adapter_names=["a", "typo"])
    moslora_ext.merge_adapters(model)
    with pytest.raises(RuntimeError, match="needs unmerged adapters"):
        model(input_ids=input_ids, adapter_names=["a", "b"])
    moslora_ext.unmerge_adapters(model)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(input_ids=input_ids, adapter_names=["a", "b"])
    model.eval()
    # After refusals, no hook is left behind: a plain call computes the active adapter.
    with torch.no_grad():
        assert torch.equal(logits(model, input_ids), logits(model, input_ids, adapter_names=["a", "a"]))


# --- against PEFT's own mixed batch ---------------------------------------------------------------

PEFT_ROWS = ["x", "__base__", "y", "x"]


def peft_with_two_adapters(peft, make_model, targets, fan_in_fan_out=False):
    config = {"r": 4, "lora_alpha": 8, "target_modules": targets, "fan_in_fan_out": fan_in_fan_out}
    peft_model = peft.get_peft_model(make_model(), peft.LoraConfig(**config), adapter_name="x")
    peft_model.add_adapter("y", peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    return peft_model.eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                                                n_head=4)).eval()


MODELS = {"llama": (tiny_llama, TARGETS, False), "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "wte"], True)}


@pytest.mark.parametrize("model_kind", MODELS)
def test_peft_adapters_loaded_here_give_peft_mixed_batch(model_kind, tmp_path):
    peft = pytest.importorskip("peft")
    make_model, targets, fan_in_fan_out = MODELS[model_kind]
    peft_model = peft_with_two_adapters(peft, make_model, targets, fan_in_fan_out)
    # In tmp_path / "x" and / "y"; the embedding's base weight (which PEFT may save beside it) is the model's.
    peft_model.save_pretrained(tmp_path, save_embedding_layers=False)
    ours = make_model()
    moslora_ext.load_peft_adapter(ours, tmp_path / "x", adapter_name="x")
    moslora_ext.load_peft_adapter(ours, tmp_path / "y", adapter_name="y")
    input_ids = ids(len(PEFT_ROWS), seed=2)
    with torch.no_grad():
        expected = logits(peft_model, input_ids, adapter_names=PEFT_ROWS)
        torch.testing.assert_close(logits(ours, input_ids, adapter_names=PEFT_ROWS), expected, rtol=1e-5, atol=1e-5)


def test_our_adapters_exported_to_peft_give_our_mixed_batch(tmp_path):
    peft = pytest.importorskip("peft")
    ours = llama_with_adapters()
    for name in ("a", "b"):
        moslora_ext.save_peft_adapter(ours, tmp_path / name, adapter_name=name)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    rows, input_ids = ["b", "a", "__base__"], ids(3, seed=3)
    with torch.no_grad():
        expected = logits(peft_model.eval(), input_ids, adapter_names=rows)
        torch.testing.assert_close(logits(ours, input_ids, adapter_names=rows), expected, rtol=1e-5, atol=1e-5)
