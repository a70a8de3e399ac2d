"""Adapters on quantized bases (bitsandbytes 4-bit/8-bit, torchao) against plain-PyTorch
references built on the base module's own output, and against PEFT's QLoRA layers."""


import pytest
import torch
from torch import nn

import moslora_ext
from moslora_ext import ops
from reference import adapter_reference, assert_close_to_reference

bnb = pytest.importorskip("bitsandbytes")

D, K = 64, 96  # bitsandbytes' CPU inference path needs out_features divisible by 32
KINDS = ["nf4", "fp4", "int8", "torchao"]


def quantized_linear(kind, bias=True, compute_dtype=torch.float32, seed=0):
    """A quantized layer of each supported kind, quantized from one random nn.Linear."""
    torch.manual_seed(seed)
    plain = nn.Linear(D, K, bias=bias)
    if kind == "torchao":
        quantization = pytest.importorskip("torchao.quantization")
        quantization.quantize_(plain, quantization.Int8WeightOnlyConfig())
        return plain
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(D, K, bias=bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(D, K, bias=bias, compute_dtype=compute_dtype, quant_type=kind)
    layer.load_state_dict(plain.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to the device


def adapted(kind, lora_dropout=0.0, **settings):
    layer = moslora_ext.QuantizedLinear.from_module(quantized_linear(kind, **settings), r=4, lora_alpha=8,
                                                    lora_dropout=lora_dropout)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained-looking adapter
    return layer


def params(layer):
    return [layer.lora_A, layer.lora_mixer, layer.lora_B]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_and_gradients_match_base_plus_reference_adapter(kind, dropout_p):
    """y = base(x) + s B M A dropout(x), with the base module's own output and backward."""
    layer = adapted(kind, dropout_p)
    assert type(layer.weight) is not nn.Parameter  # a quantized weight: the base computes its own output
    x = torch.randn(2, 5, D)
    torch.manual_seed(7)
    seed = ops.new_dropout_seed()
    mask = ops.dropout_mask(x.shape, dropout_p, seed) if dropout_p else None

    def run(function):
        x_in = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = function(x_in)
        y.square().sum().backward()
        grads = [x_in.grad] + [p.grad.clone() for p in params(layer)]
        for p in params(layer):
            p.grad = None
        return [y] + grads

    actual = run(layer)
    expected = run(lambda x_in: layer.base_layer(x_in) + adapter_reference(
        x_in, layer.lora_A, layer.lora_mixer, layer.lora_B, layer.scale, mask, dropout_p))
    for got, want in zip(actual, expected):
        assert_close_to_reference(got, want.detach(), torch.float32)


def saved_bytes(function, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function(x)
    return total


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dropout_saves_nothing_of_the_input_size(kind):
    """Dropout regenerates its mask in backward: the layer saves what it saves without
    dropout plus the seed, where a dropped copy of x would add N x in_features."""
    x = torch.randn(64, D, requires_grad=True)
    without = saved_bytes(adapted(kind, 0.0).train(), x)
    with_dropout = saved_bytes(adapted(kind, 0.3).train(), x)
    assert with_dropout - without <= 8 < x.numel() * x.element_size()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bf16_compute_keeps_float32_adapters_and_gradients(kind):
    layer = adapted(kind, compute_dtype=torch.bfloat16) if kind == "nf4" else adapted(kind)
    assert all(p.dtype == torch.float32 for p in params(layer))
    x = torch.randn(3, D, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in params(layer))
    expected = layer.base_layer(x).float() + adapter_reference(
        x.float(), *(p.detach() for p in params(layer)), layer.scale)
    assert_close_to_reference(y, expected, torch.bfloat16)


def toy_model(kind):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", quantized_linear(kind, seed=1))
    model.add_module("act", nn.ReLU())
    model.add_module("down", nn.Linear(K, D))
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_model_level_functions_on_quantized_layers(kind, tmp_path):
    """all-linear, save/load into a fresh quantized model, named adapters, unload."""
    model = moslora_ext.add_adapters(toy_model(kind), "all-linear", r=4, lora_alpha=8)
    assert isinstance(model.up, moslora_ext.QuantizedLinear) and isinstance(model.down, moslora_ext.Linear)
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(model).values():
            layer.lora_B.normal_()
    x = torch.randn(3, D)
    y = model(x)
    moslora_ext.save_adapter(model, tmp_path / "a")
    fresh = moslora_ext.load_adapter(toy_model(kind), tmp_path / "a")
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    with moslora_ext.disable_adapters(model):
        base = model(x)
    moslora_ext.add_adapters(model, ["up"], r=2, adapter_name="other")
    moslora_ext.set_adapter(model, "other")
    torch.testing.assert_close(model(x), base)  # a fresh adapter (B = 0) changes nothing
    moslora_ext.delete_adapter(model, "default")
    moslora_ext.delete_adapter(model, "other")
    assert type(model.up).__name__ == type(toy_model(kind).up).__name__


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_dequantizes_into_an_exact_plain_linear(kind):
    layer = adapted(kind)
    model = nn.Sequential(layer)
    x = torch.randn(4, D)
    expected = x @ (layer.dequantized_weight() + layer.scale * layer.lora_B @ layer.lora_mixer @ layer.lora_A).t()
    expected = expected.detach() + layer.bias.detach()
    moslora_ext.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and not model[0].weight.requires_grad
    torch.testing.assert_close(model[0](x), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_inside_disable_adapters_is_refused_not_adapter_free():
    layer = adapted("nf4")  # a nonzero B: dropping the adapter would change the weights
    model = nn.Sequential(layer)
    with moslora_ext.disable_adapters(model), pytest.raises(RuntimeError, match="adapters are disabled"):
        moslora_ext.merge_and_unload(model)
    assert model[0] is layer and not layer.merged


def test_dequantize_uses_the_compute_dtype():
    model = nn.Sequential(adapted("nf4", compute_dtype=torch.bfloat16))
    moslora_ext.merge_and_unload(model)
    assert model[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_requantizing_merge_warns_with_its_rounding_error(kind):
    layer = adapted(kind).eval()
    x = torch.randn(4, D)
    unmerged = layer(x).detach()
    exact = layer.dequantized_weight() + layer.delta_weight().detach()
    with pytest.warns(UserWarning, match="rounding error up to") as record:
        layer.merge(requantize=True)
    error = float(str(record[0].message).split("rounding error up to ")[1].split(" ")[0])
    assert 0 < error == pytest.approx((layer.dequantized_weight() - exact).abs().max().item(), rel=1e-2)
    merged = layer(x).detach()
    bound = error * x.abs().sum(1, keepdim=True) + 1e-2  # each output moves by at most error * |x|_1 (+ bf16)
    assert ((merged - unmerged).abs() <= bound).all()
    model = moslora_ext.merge_and_unload(nn.Sequential(adapted(kind)), quantized="requantize")
    assert type(model[0]) is type(layer.base_layer)
    with pytest.warns(UserWarning, match="rounding error"):
        layer.unmerge(requantize=True)
    assert not layer.merged


def test_requantize_refused_for_torchao():
    layer = adapted("torchao")
    with pytest.raises(NotImplementedError, match="torchao"):
        layer.merge(requantize=True)
    assert not layer.merged


tf = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A tiny Llama saved once for the tests that load it quantized."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny_llama")
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_4bit(folder):
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    return tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16,
                                                   device_map="cpu")


def test_qlora_recipe_trains_saves_and_reloads(tmp_path, tiny_llama_folder):
    """4-bit nf4 base, bf16 compute, fp32 adapters, gradient checkpointing, a few AdamW steps."""
    folder = tiny_llama_folder
    model = load_4bit(folder)
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name of gradient_checkpointing_enable
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    model = moslora_ext.add_adapters(model, "all-linear", r=8, lora_alpha=16, lora_dropout=0.1)
    layers = moslora_ext.adapted_layers(model)
    assert len(layers) == 14 and all(isinstance(m, moslora_ext.QuantizedLinear) for m in layers.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 3 * 14 and all(p.dtype == torch.float32 for p in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    moslora_ext.save_adapter(model, tmp_path / "adapter")
    fresh = moslora_ext.load_adapter(load_4bit(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, logits, rtol=0, atol=0)


peft = pytest.importorskip("peft")


def test_identity_mixer_equals_peft_qlora_layer_and_loads_its_adapter(tmp_path, tiny_llama_folder):
    """PEFT's QLoRA model on the same 4-bit base: logits, adapter gradients and its
    saved adapter, loaded by load_peft_adapter, agree to bf16's tolerance."""
    folder = tiny_llama_folder
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(load_4bit(folder), config)
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = moslora_ext.load_peft_adapter(load_4bit(folder), tmp_path / "peft")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    their_logits, our_logits = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(our_logits.float(), their_logits.float(), rtol=2e-2, atol=2e-2)
    their_logits.float().square().mean().backward()
    our_logits.float().square().mean().backward()
    their_grads = {name.removeprefix("base_model.model.").replace(".default", ""): p.grad
                   for name, p in theirs.named_parameters() if p.grad is not None}
    for name, layer in moslora_ext.adapted_layers(ours).items():
        assert not layer.lora_mixer.requires_grad
        for t in ("lora_A", "lora_B"):
            want = their_grads[f"{name}.{t}.weight"]
            got = getattr(layer, t).grad
            torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


def test_save_peft_adapter_of_a_quantized_model_gives_peft_our_logits(tmp_path, tiny_llama_folder):
    """A trained mixer folded into B on a 4-bit model: PEFT's QLoRA model reproduces our logits."""
    folder = tiny_llama_folder
    ours = moslora_ext.add_adapters(load_4bit(folder), ["q_proj", "up_proj"], r=4, lora_alpha=8).eval()
    with torch.no_grad():
        for layer in moslora_ext.adapted_layers(ours).values():
            layer.lora_B.normal_(std=0.1)
    moslora_ext.save_peft_adapter(ours, tmp_path / "exported")
    theirs = peft.PeftModel.from_pretrained(load_4bit(folder), tmp_path / "exported").eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits.float(), ours(input_ids=ids).logits.float(),
                                   rtol=2e-2, atol=2e-2)
