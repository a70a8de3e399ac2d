"""moslora_ext.Linear: initialisation, forward/backward against the reference,
merge/unmerge, dropout behaviour, torch.compile (misuse: test_errors.py)."""

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import moslora_ext
from reference import assert_close_to_reference, braid_reference, moslora_reference


def randomize_adapter(layer, seed=0):
    """Give the layer a nonzero adapter (a fresh one has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_mixer, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[-1]))
    return layer


def reference_output(layer, x, keep_mask=None):
    params = {name: getattr(layer, attr).detach().double() for name, attr in (
        ("weight", "weight"), ("lora_A", "lora_A"), ("mixer", "lora_mixer"), ("lora_B", "lora_B"))}
    bias = None if layer.bias is None else layer.bias.detach().double()
    return moslora_reference(x.double(), bias=bias, scale=layer.scale, keep_mask=keep_mask,
                             p=layer.lora_dropout, **params)


# --- construction and initialisation ---------------------------------------------------------


def test_fresh_layer_equals_base_layer_and_freezes_it(device):
    torch.manual_seed(0)
    layer = moslora_ext.Linear(64, 32, r=8, device=device)
    x = torch.randn(4, 10, 64, device=device)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "adapters.default.lora_A", "adapters.default.lora_mixer", "adapters.default.lora_B"]
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound


@pytest.mark.parametrize("r", [1, 2, 8, 16])
def test_mixer_inits(r):
    torch.manual_seed(0)
    eye = torch.eye(r)
    identity = moslora_ext.Linear(16, 8, r=r, mixer_init="identity").lora_mixer
    assert torch.equal(identity, eye)
    kaiming = moslora_ext.Linear(16, 8, r=r, mixer_init="kaiming").lora_mixer
    assert kaiming.abs().max() <= 1 / math.sqrt(r) and not torch.equal(kaiming, eye)
    orthogonal = moslora_ext.Linear(16, 8, r=r, mixer_init="orthogonal").lora_mixer.detach()
    torch.testing.assert_close(orthogonal @ orthogonal.t(), eye)
    if r % 2 == 0:
        braid = moslora_ext.Linear(16, 8, r=r, mixer_init="braid").lora_mixer
        half = torch.eye(r // 2)
        assert torch.equal(braid, torch.cat([torch.cat([half, half], 1)] * 2, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mixer_init", ["kaiming", "orthogonal", "identity", "braid"])
def test_every_mixer_init_in_every_dtype(dtype, mixer_init):
    layer = moslora_ext.Linear(16, 8, r=4, mixer_init=mixer_init, dtype=dtype, autocast_adapter_dtype=False)
    assert layer.lora_mixer.dtype == dtype and torch.isfinite(layer.lora_mixer).all()
    assert torch.linalg.matrix_rank(layer.lora_mixer.double()) >= 2


@pytest.mark.parametrize("k", [1, 2, 4])
def test_braid_of_k_subspaces_mixes_the_sums_of_k_branches(device, k):
    layer = moslora_ext.Linear(16, 8, r=8, mixer_init="braid", braid_subspaces=k, dtype=torch.float64, device=device)
    with torch.no_grad():  # A and B drawn, the mixer as initialised
        layer.lora_A.normal_(), layer.lora_B.normal_()
    assert torch.equal(layer.lora_mixer, torch.kron(torch.ones(k, k), torch.eye(8 // k)).to(layer.lora_mixer))
    x = torch.randn(5, 16, dtype=torch.float64, device=device)
    expected = braid_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale, k)
    torch.testing.assert_close(layer(x), expected)


def test_scale_and_rslora():
    assert moslora_ext.Linear(8, 8, r=4, lora_alpha=16).scale == 4.0
    assert moslora_ext.Linear(8, 8, r=4, lora_alpha=16, use_rslora=True).scale == 8.0


def test_from_linear_shares_weight_and_bias(device):
    base = nn.Linear(12, 6, device=device)
    layer = moslora_ext.Linear.from_linear(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad
    assert layer.lora_A.device == base.weight.device
    with torch.no_grad():
        base.weight.add_(1.0)
    assert torch.equal(layer.weight, base.weight)


def test_from_linear_keeps_dtype():
    layer = moslora_ext.Linear.from_linear(nn.Linear(12, 6, bias=False, dtype=torch.float64), r=2)
    assert layer.lora_A.dtype == layer.lora_mixer.dtype == layer.lora_B.dtype == torch.float64
    assert layer.bias is None


# --- forward and backward ---------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 2, 3), ()])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_reference(device, lead, bias):
    torch.manual_seed(0)
    layer = randomize_adapter(moslora_ext.Linear(20, 12, r=4, bias=bias, device=device, dtype=torch.float64))
    x = torch.randn(*lead, 20, dtype=torch.float64, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, 12)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_params = [p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_mixer, layer.lora_B)]
    expected = moslora_reference(x_ref, layer.weight, layer.bias, *ref_params, scale=layer.scale)
    assert_close_to_reference(y, expected, torch.float64)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expected.backward(grad_y)
    for got, want in zip([x.grad, layer.lora_A.grad, layer.lora_mixer.grad, layer.lora_B.grad],
                         [x_ref.grad, *(p.grad for p in ref_params)]):
        assert_close_to_reference(got, want, torch.float64)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_output_may_be_changed_in_place_as_nn_linear_output(device, lora_dropout):
    # y += residual on a layer's output is common in models; it must keep the gradients right.
    layer = randomize_adapter(moslora_ext.Linear(20, 12, r=4, lora_dropout=lora_dropout, device=device,
                                                 dtype=torch.float64))
    x = torch.randn(2, 3, 20, dtype=torch.float64, device=device, requires_grad=True)
    residual = torch.randn(2, 3, 12, dtype=torch.float64, device=device)
    grads = []
    for in_place in (False, True):
        torch.manual_seed(1)  # the same dropout mask both times
        y = layer(x)
        assert not y._is_view()
        if in_place:
            y.mul_(2).add_(residual)
        else:
            y = y * 2 + residual
        y.square().sum().backward()
        grads.append([t.grad.clone() for t in (x, layer.lora_A, layer.lora_mixer, layer.lora_B)])
        for t in (x, layer.lora_A, layer.lora_mixer, layer.lora_B):
            t.grad = None
    for out_of_place, in_place in zip(*grads):
        torch.testing.assert_close(in_place, out_of_place)
    assert not moslora_ext.ops.dropout(x.detach(), 0.5, torch.tensor([1]))._is_view()


def test_identity_frozen_mixer_is_lora(device):
    torch.manual_seed(0)
    layer = moslora_ext.Linear(16, 8, r=4, lora_alpha=8, mixer_init="identity", train_mixer=False,
                               device=device, dtype=torch.float64)
    randomize_adapter(layer)
    with torch.no_grad():
        layer.lora_mixer.copy_(torch.eye(4))
    x = torch.randn(3, 16, dtype=torch.float64, device=device)
    lora = nn.functional.linear(x, layer.weight, layer.bias) + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert_close_to_reference(layer(x), lora.detach(), torch.float64)
    layer(x).sum().backward()
    assert layer.lora_mixer.grad is None and layer.lora_A.grad is not None


def test_training_the_base_weight_still_gets_its_gradient():
    torch.manual_seed(0)
    layer = randomize_adapter(moslora_ext.Linear(10, 6, r=2, dtype=torch.float64))
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 10, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    moslora_reference(x, weight, bias, layer.lora_A.detach(), layer.lora_mixer.detach(), layer.lora_B.detach(),
                      layer.scale).pow(2).sum().backward()
    assert_close_to_reference(layer.weight.grad, weight.grad, torch.float64)
    assert_close_to_reference(layer.bias.grad, bias.grad, torch.float64)


def test_bfloat16_layer(device):
    torch.manual_seed(0)
    layer = randomize_adapter(moslora_ext.Linear(64, 32, r=8, device=device, dtype=torch.bfloat16))
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    assert_close_to_reference(layer(x), reference_output(layer, x), torch.bfloat16)


def test_autocast_casts_to_the_autocast_dtype(device):
    torch.manual_seed(0)
    layer = randomize_adapter(moslora_ext.Linear(32, 16, r=4, device=device))
    x = torch.randn(3, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close_to_reference(y, reference_output(layer, x.bfloat16()), torch.bfloat16)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_autocast_does_not_hide_an_integer_input():
    layer = moslora_ext.Linear(16, 8, r=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(3, 16, dtype=torch.int64))


# --- adapter dtype on half-precision bases ---------------------------------------------------


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_gets_float32_adapter_computed_in_the_base_dtype(device, base_dtype):
    torch.manual_seed(0)
    layer = randomize_adapter(moslora_ext.Linear(64, 32, r=8, lora_dropout=0.0, device=device, dtype=base_dtype))
    assert layer.weight.dtype == base_dtype
    assert {p.dtype for p in (layer.lora_A, layer.lora_mixer, layer.lora_B)} == {torch.float32}
    x = torch.randn(4, 64, device=device, dtype=base_dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == base_dtype
    # Reference: the adapter rounded to the base dtype (what the fused op computes with), then fp64.
    adapter = [t.detach().to(base_dtype).double().requires_grad_() for t in
               (layer.lora_A, layer.lora_mixer, layer.lora_B)]
    expected = moslora_reference(x.detach().double(), layer.weight.double(), layer.bias.double(), *adapter,
                                 scale=layer.scale)
    assert_close_to_reference(y, expected, base_dtype)
    grad = torch.randn_like(expected)
    y.backward(grad.to(base_dtype))
    expected.backward(grad)
    for param, reference in zip((layer.lora_A, layer.lora_mixer, layer.lora_B), adapter):
        assert param.grad.dtype == torch.float32
        assert_close_to_reference(param.grad, reference.grad, base_dtype)
    assert x.grad.dtype == base_dtype


def test_float32_adapter_keeps_updates_that_bfloat16_would_round_away():
    """The reason for float32 adapters: a small optimizer step on a bf16 value is lost."""
    kept = moslora_ext.Linear(16, 8, r=2, dtype=torch.bfloat16)
    rounded = moslora_ext.Linear(16, 8, r=2, dtype=torch.bfloat16, autocast_adapter_dtype=False)
    assert rounded.lora_A.dtype == torch.bfloat16
    for layer in (kept, rounded):
        with torch.no_grad():
            layer.lora_B.fill_(1.0)
            layer.lora_B.add_(1e-3)  # below bf16's resolution at 1.0 (2^-7)
    assert torch.all(kept.lora_B > 1.0) and torch.all(rounded.lora_B == 1.0)


@pytest.mark.parametrize("under_autocast", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_merge_computes_in_the_weight_precision(device, weight_dtype, under_autocast):
    """The float32 adapter of a bf16 weight merges in fp32 and rounds once; a bf16
    autocast around merge/unmerge changes nothing (fp32 stays fp32-exact)."""
    torch.manual_seed(0)
    layer = randomize_adapter(moslora_ext.Linear(48, 24, r=8, device=device, dtype=weight_dtype))
    original = layer.weight.detach().double()
    expected = original + layer.scale * (layer.lora_B.double() @ layer.lora_mixer.double()) @ layer.lora_A.double()
    context = torch.autocast(device, dtype=torch.bfloat16) if under_autocast else contextlib.nullcontext()
    with context:
        layer.merge()
    assert layer.weight.dtype == weight_dtype
    assert_close_to_reference(layer.weight, expected, weight_dtype)
    with context:
        layer.unmerge()
    assert_close_to_reference(layer.weight, original, weight_dtype)


# --- merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge_roundtrip(device, dtype):
    torch.manual_seed(0)
    layer = randomize_adapter(moslora_ext.Linear(48, 24, r=8, device=device, dtype=dtype))
    x = torch.randn(5, 48, device=device, dtype=dtype)
    unmerged = layer(x)
    original = layer.weight.detach().clone()
    delta = layer.delta_weight()
    layer.merge()
    assert layer.merged
    assert_close_to_reference(layer.weight, (original + delta).double(), dtype)
    assert_close_to_reference(layer(x), unmerged.double(), dtype)
    layer.unmerge()
    assert not layer.merged
    assert_close_to_reference(layer.weight, original.double(), dtype)
    assert_close_to_reference(layer(x), unmerged.double(), dtype)


def test_delta_weight_matches_formula():
    layer = randomize_adapter(moslora_ext.Linear(10, 6, r=3, lora_alpha=6, dtype=torch.float64))
    expected = 2.0 * layer.lora_B.detach() @ layer.lora_mixer.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    layer = randomize_adapter(moslora_ext.Linear(10, 6, r=2))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="inf or NaN"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, weight) and not layer.merged
    with torch.no_grad():
        layer.lora_B[0, 0] = 1.0
    layer.merge(safe=True)
    assert layer.merged


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_same_seed_same_result_and_successive_calls_differ(device):
    layer = randomize_adapter(moslora_ext.Linear(32, 16, r=4, lora_dropout=0.5, device=device))
    x = torch.randn(8, 32, device=device)
    torch.manual_seed(7)
    first = layer(x)
    second = layer(x)
    torch.manual_seed(7)
    again = layer(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_dropout_matches_reference_with_its_mask(device):
    layer = randomize_adapter(moslora_ext.Linear(32, 16, r=4, lora_dropout=0.3, device=device, dtype=torch.float64))
    x = torch.randn(2, 8, 32, device=device, dtype=torch.float64)
    torch.manual_seed(11)
    seed = moslora_ext.ops.new_dropout_seed()
    torch.manual_seed(11)
    y = layer(x)
    mask = moslora_ext.ops.dropout_mask(x.shape, 0.3, seed, device=device)
    assert_close_to_reference(y, reference_output(layer, x, keep_mask=mask), torch.float64)


def test_eval_disables_dropout(device):
    layer = randomize_adapter(moslora_ext.Linear(32, 16, r=4, lora_dropout=0.5, device=device, dtype=torch.float64))
    layer.eval()
    x = torch.randn(6, 32, device=device, dtype=torch.float64)
    assert_close_to_reference(layer(x), reference_output(layer, x), torch.float64)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_saves_x_itself_and_nothing_else_of_its_size(lora_dropout):
    layer = randomize_adapter(moslora_ext.Linear(64, 32, r=4, lora_dropout=lora_dropout))
    x = torch.randn(50, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    input_sized = [t for t in saved if t.numel() >= x.numel()]
    assert len(input_sized) == 1 and input_sized[0].data_ptr() == x.data_ptr()
    # x, the weight and adapter matrices (no copies), U (N x r) and the one-element dropout seed.
    parameters = layer.weight, layer.lora_A, layer.lora_mixer, layer.lora_B
    allowed = x.numel() + sum(p.numel() for p in parameters) + 50 * layer.r + 1
    assert sum(t.numel() for t in saved) <= allowed
    y.sum().backward()


# --- torch.compile, checkpoint, export --------------------------------------------------------


def small_model(device, lora_dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(
        moslora_ext.Linear(32, 48, r=4, lora_dropout=lora_dropout), nn.GELU(),
        moslora_ext.Linear(48, 16, r=8, mixer_init="orthogonal", lora_dropout=lora_dropout),
    ).to(device)
    for layer in (model[0], model[2]):
        randomize_adapter(layer)
    return model


def test_compile_fullgraph_matches_eager(device):
    model = small_model(device)
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)

    def run(module):
        for p in module.parameters():
            p.grad = None
        x.grad = None
        y = module(x)
        y.pow(2).sum().backward()
        return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for got, want in zip(run(compiled), run(model)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_trains_with_dropout(device):
    model = small_model(device, lora_dropout=0.1)
    compiled = torch.compile(model, fullgraph=True)
    compiled(torch.randn(2, 5, 32, device=device)).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_checkpoint_regenerates_the_same_dropout_mask(device):
    model = small_model(device, lora_dropout=0.3)
    x = torch.randn(3, 32, device=device, requires_grad=True)

    def grads(use_checkpoint):
        model.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        y.pow(2).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for with_checkpoint, without in zip(grads(True), grads(False)):
        assert torch.equal(with_checkpoint, without)


def test_export_matches_eager():
    model = small_model("cpu").eval()
    x = torch.randn(4, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


# --- refusals with state to keep, and the import check -----------------------------------------


def test_from_linear_refusal_leaves_the_base_layer_untouched():
    base = nn.Linear(16, 8)
    with pytest.raises(ValueError, match="braid_subspaces .*dividing the rank r, got braid_subspaces=2, r=3"):
        moslora_ext.Linear.from_linear(base, r=3, mixer_init="braid")
    with pytest.raises(ValueError, match="braid_subspaces .*dividing the rank r, got braid_subspaces=3, r=8"):
        moslora_ext.Linear.from_linear(base, r=8, mixer_init="braid", braid_subspaces=3)
    assert base.weight.requires_grad and base.bias.requires_grad
    with pytest.raises(TypeError, match="from_linear's argument is a torch.nn.Conv1d, not a torch.nn.Linear"):
        moslora_ext.Linear.from_linear(nn.Conv1d(4, 4, 1))


def test_import_under_a_torch_older_than_the_target_names_the_range():
    code = "import torch; torch.__version__ = '2.10.0'; import moslora_ext"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__))
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "needs torch >= 2.11" in result.stderr
    assert "torch 2.10.0 is installed; upgrade torch" in result.stderr


def test_import_under_a_later_torch_than_the_build_loads():
    """The extension is on the stable ABI: a torch newer than the one it was compiled against runs it."""
    code = ("import torch; torch.__version__ = '99.0.0'; import moslora_ext; "
            "print(moslora_ext.ops.moslora_linear(*[torch.ones(2, 2)] * 2, None, torch.ones(1, 2), torch.ones(1, 1), "
            "torch.ones(2, 1), 1.0).tolist())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[4.0, 4.0], [4.0, 4.0]]"
