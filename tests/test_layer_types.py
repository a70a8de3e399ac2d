"""Adapters on GPT-2's Conv1D, nn.Conv1d/2d/3d and nn.Embedding: each layer against a plain-PyTorch
reference (forward, backward, gradcheck, merge in place, unmerge, unload), and a small conv net with every
layer type through the model-level functions and PEFT's own adapters."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import moslora_ext
from moslora_ext.layers.dispatch import adapter_class
from reference import conv_reference, embedding_reference, transposed_linear_reference


def gpt2_conv1d():
    transformers_utils = pytest.importorskip("transformers.pytorch_utils")
    return transformers_utils.Conv1D(6, 5)  # 5 -> 6, weight stored (5, 6)


# kind -> (base module, input of a generator)
CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), lambda g: torch.randn(2, 3, 7, generator=g)),
    "conv2d": (lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
               lambda g: torch.randn(2, 3, 5, 4, generator=g)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), lambda g: torch.randn(1, 2, 3, 4, 4, generator=g)),
    "embedding": (lambda: nn.Embedding(11, 6, padding_idx=0), lambda g: torch.randint(0, 11, (3, 4), generator=g)),
    "gpt2_conv1d": (gpt2_conv1d, lambda g: torch.randn(2, 3, 5, generator=g)),
}


def adapted(kind, dtype=torch.float64, **settings):
    """The base module of ``kind``, its adapted layer (random, nonzero adapter) and an input."""
    torch.manual_seed(0)
    make_module, make_input = CASES[kind]
    module = make_module().to(dtype)
    layer = adapter_class(module).from_module(module, **{"r": 3, "lora_alpha": 6, **settings})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_mixer, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    x = make_input(g)
    return module, layer, x.to(dtype) if x.is_floating_point() else x


def reference(layer, x, lora_A, mixer, lora_B, keep_mask=None):
    weight = layer.weight.detach().to(lora_A.dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(lora_A.dtype)
    if isinstance(layer, moslora_ext.Conv):
        return conv_reference(x, weight, bias, lora_A, mixer, lora_B, layer.scale, layer.stride, layer.padding,
                              layer.dilation, keep_mask, layer.lora_dropout)
    if isinstance(layer, moslora_ext.Embedding):
        return embedding_reference(x, weight, lora_A, mixer, lora_B, layer.scale, padding_idx=0)
    return transposed_linear_reference(x, weight, bias, lora_A, mixer, lora_B, layer.scale)


def reference_delta(layer):
    """s * B M A in the weight's layout, in plain PyTorch."""
    A, M, B = (t.detach() for t in (layer.lora_A, layer.lora_mixer, layer.lora_B))
    if isinstance(layer, moslora_ext.Conv):
        return layer.scale * torch.einsum("or,rs,si...->oi...", B.flatten(1), M, A)
    return layer.scale * (B @ M @ A).t()  # Embedding and Conv1D store W as (in, out)


@pytest.mark.parametrize("kind", CASES)
def test_forward_and_backward_match_the_reference(kind):
    _, layer, x = adapted(kind)
    x = x.requires_grad_(x.is_floating_point())
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(x.is_floating_point())
    ref = [t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_mixer, layer.lora_B)]
    expected = reference(layer, ref_x, *ref)
    torch.testing.assert_close(y, expected)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expected.backward(grad_y)
    for got, want in zip((layer.lora_A.grad, layer.lora_mixer.grad, layer.lora_B.grad), (t.grad for t in ref)):
        torch.testing.assert_close(got, want)
    if x.is_floating_point():
        torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("kind", CASES)
def test_gradcheck(kind):
    _, layer, x = adapted(kind)
    prefix = f"adapters.{layer.active_adapter}."
    names = [prefix + t for t in ("lora_A", "lora_mixer", "lora_B")]
    tensors = [getattr(layer, t).detach().clone().requires_grad_(True) for t in ("lora_A", "lora_mixer", "lora_B")]
    if x.is_floating_point():
        def f(x, *adapter):
            return functional_call(layer, dict(zip(names, adapter)), (x,))
        inputs = (x.requires_grad_(True), *tensors)
    else:
        x = x.clamp(min=1)  # the padding row gets no gradient (as in nn.Embedding), so gradcheck avoids it
        def f(*adapter):
            return functional_call(layer, dict(zip(names, adapter)), (x,))
        inputs = tuple(tensors)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("kind", CASES)
def test_merge_writes_into_the_weight_storage_and_unmerge_restores_it(kind):
    module, layer, x = adapted(kind)
    with torch.no_grad():
        unmerged = layer(x)
    original = layer.weight.detach().clone()
    storage = layer.weight.data_ptr()
    torch.testing.assert_close(layer.delta_weight(), reference_delta(layer))
    layer.merge()
    assert layer.weight is module.weight and layer.weight.data_ptr() == storage
    torch.testing.assert_close(layer.weight, original + reference_delta(layer))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unmerged)
        plain = layer.unload()
        assert type(plain) is type(module) and plain.weight is module.weight
        assert torch.equal(plain(x), layer(x))  # merged: the base module's own forward
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-12)


def test_conv_dropout_applies_to_the_adapter_input_only():
    _, layer, x = adapted("conv2d", lora_dropout=0.4)
    torch.manual_seed(7)
    y = layer.train()(x)
    torch.manual_seed(7)  # the same draw as the layer's F.dropout
    keep = nn.functional.dropout(torch.ones_like(x), 0.4) != 0
    expected = reference(layer, x, layer.lora_A.detach(), layer.lora_mixer.detach(), layer.lora_B.detach(), keep)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("kind", CASES)
def test_compiles_again_for_another_dropout(kind):
    # A second compile of the same code with another lora_dropout gets it as a symbolic float:
    # the layers must not hand `p > 0` (then a SymBool) to an argument that takes a bool.
    torch._dynamo.reset()
    for dropout in (0.0, 0.25):
        _, layer, x = adapted(kind, lora_dropout=dropout)
        # aot_eager: Dynamo's tracing and AOTAutograd's, without code generation (fast)
        torch.compile(layer.train(), fullgraph=True, backend="aot_eager")(x).float().sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(layer.eval(), fullgraph=True, backend="aot_eager")(x), layer(x))


@pytest.mark.parametrize("kind", ["conv2d", "embedding"])
def test_half_precision_bases_get_float32_adapters_and_keep_their_dtype(kind):
    _, layer, x = adapted(kind, dtype=torch.bfloat16)
    assert {layer.lora_A.dtype, layer.lora_mixer.dtype, layer.lora_B.dtype} == {torch.float32}
    y = layer(x)
    assert y.dtype == torch.bfloat16
    double_x = x.double() if x.is_floating_point() else x
    expected = reference(layer, double_x, *(t.detach().double() for t in (layer.lora_A, layer.lora_mixer,
                                                                         layer.lora_B)))
    torch.testing.assert_close(y.double(), expected.to(layer.weight.dtype).double(), rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


# --- every layer type through the model-level functions -------------------------------------------


class ConvNet(nn.Module):
    """An embedding, a Conv1d, a Conv2d and a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv1 = nn.Conv1d(4, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.head = nn.Linear(3 * 3 * 4, 2)

    def forward(self, ids):
        h = torch.relu(self.conv1(self.embed(ids).transpose(1, 2)))  # (batch, 6, 8)
        h = torch.relu(self.conv2(h.unsqueeze(1)))  # (batch, 3, 3, 4)
        return self.head(h.flatten(1))


TARGETS = ["embed", "conv1", "conv2", "head"]


def conv_net(seed=0):
    torch.manual_seed(seed)
    return ConvNet()


def ids(seed=0):
    return torch.randint(0, 10, (5, 8), generator=torch.Generator().manual_seed(seed))


def test_every_layer_type_trains_saves_loads_merges_and_unloads(tmp_path):
    model = moslora_ext.add_adapters(conv_net(), TARGETS, r=2, lora_alpha=4)
    assert {name: type(layer) for name, layer in moslora_ext.adapted_layers(model).items()} == {
        "embed": moslora_ext.Embedding, "conv1": moslora_ext.Conv, "conv2": moslora_ext.Conv,
        "head": moslora_ext.Linear}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(3):
        loss = model(ids(step)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) or layer is model.embed
               for layer in moslora_ext.adapted_layers(model).values())
    model.eval()
    x = ids(9)
    with torch.no_grad():
        expected = model(x)
    moslora_ext.save_adapter(model, tmp_path)
    fresh = moslora_ext.load_adapter(conv_net().eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)
        moslora_ext.merge_adapters(fresh)
        torch.testing.assert_close(fresh(x), expected)
        moslora_ext.unmerge_adapters(fresh)
        moslora_ext.merge_and_unload(fresh)
        torch.testing.assert_close(fresh(x), expected)
    assert [type(fresh.get_submodule(n)) for n in TARGETS] == [nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Linear]


def test_peft_adapters_on_convolutions_and_embeddings_give_peft_outputs_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(conv_net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    with torch.no_grad():  # PEFT starts lora_B (lora_embedding_A for embeddings) at zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.normal_(std=0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    x = ids(3)
    with torch.no_grad():
        expected = peft_model.eval()(x)
        ours = moslora_ext.load_peft_adapter(conv_net().eval(), tmp_path / "peft")
        torch.testing.assert_close(ours(x), expected)

    # ... and ours (with trained mixers) exported for PEFT, which reproduces our outputs.
    model = moslora_ext.add_adapters(conv_net(), TARGETS, r=2, lora_alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    moslora_ext.save_peft_adapter(model, tmp_path / "ours")
    with torch.no_grad():
        reloaded = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours").eval()
        torch.testing.assert_close(reloaded(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_diffusers_unet_with_adapters_on_attention_and_convolutions(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

    def tiny_unet():
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
            norm_num_groups=4)

    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    timestep = torch.tensor([10, 500])

    def run(unet):
        return unet(sample, timestep, encoder_hidden_states=text).sample

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    unet = moslora_ext.add_adapters(tiny_unet(), targets, r=2, lora_alpha=4)
    kinds = {type(layer) for layer in moslora_ext.adapted_layers(unet).values()}
    assert kinds == {moslora_ext.Linear, moslora_ext.Conv}
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = run(unet).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moslora_ext.save_adapter(unet.eval(), tmp_path)
    reloaded = moslora_ext.load_adapter(tiny_unet().eval(), tmp_path)
    with torch.no_grad():
        expected = run(unet)
        assert not torch.allclose(expected, run(tiny_unet().eval()))
        torch.testing.assert_close(run(reloaded), expected)
        moslora_ext.merge_and_unload(reloaded)
        torch.testing.assert_close(run(reloaded), expected, rtol=1e-4, atol=1e-5)
