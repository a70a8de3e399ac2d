"""Property tests: forward, backward and merge against the plain-PyTorch
reference over random sizes, leading shapes, strides, bias, dropout and dtype."""

import pytest
import torch

from moslora_ext import ops
from reference import assert_close_to_reference, moslora_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FORWARD_BACKWARD_CASES = 1000
MERGE_CASES = 300
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
OPS = torch.ops.moslora_ext


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    d, k, r = draw(st.integers(1, 33)), draw(st.integers(1, 33)), draw(st.integers(1, 20))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    return {
        "lead": lead, "d": d, "k": k, "r": r, "layout": layout,
        "bias": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
        "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.25])),
        "scale": draw(st.floats(-4, 4, allow_nan=False)),
        "seed": draw(st.integers(0, 2**31)),
        "device": draw(st.sampled_from(DEVICES)),
    }


def make_input(shape, layout, dtype, device, g):
    """x of ``shape`` laid out contiguously, with its last two dims transposed, or with stride 2."""
    if layout == "transposed" and len(shape) >= 2:
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=dtype).to(device)
        return x.transpose(-1, -2)
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=dtype).to(device)[..., ::2]
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


@settings(max_examples=FORWARD_BACKWARD_CASES, deadline=None)
@given(problems())
def test_forward_backward_match_reference(p):
    g = torch.Generator().manual_seed(p["seed"])
    dtype, d, k, r, device = p["dtype"], p["d"], p["k"], p["r"], p["device"]

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / max(1, shape[-1]) ** 0.5).to(device, dtype)

    x = make_input((*p["lead"], d), p["layout"], dtype, device, g).requires_grad_(True)
    weight, bias = rand(k, d), rand(k) if p["bias"] else None
    adapter = [rand(r, d).requires_grad_(True), rand(r, r).requires_grad_(True), rand(k, r).requires_grad_(True)]
    seed = torch.tensor([p["seed"]])
    y, _ = OPS.forward(x, weight, bias, *adapter, p["scale"], p["dropout_p"], seed if p["dropout_p"] else None)
    grad_y = torch.randn(y.shape, generator=g, dtype=dtype).to(device)
    y.backward(grad_y)

    mask = ops.dropout_mask(x.shape, p["dropout_p"], seed, device) if p["dropout_p"] else None
    ref_x = x.detach().double().requires_grad_(True)
    ref_adapter = [t.detach().double().requires_grad_(True) for t in adapter]
    expected = moslora_reference(ref_x, weight.double(), None if bias is None else bias.double(), *ref_adapter,
                                 p["scale"], keep_mask=mask, p=p["dropout_p"])
    expected.backward(grad_y.double())
    assert_close_to_reference(y, expected, dtype)
    assert_close_to_reference(x.grad, ref_x.grad, dtype)
    for got, want in zip(adapter, ref_adapter):
        assert_close_to_reference(got.grad, want.grad, dtype)


@settings(max_examples=MERGE_CASES, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 20), st.floats(-4, 4, allow_nan=False),
       st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]), st.integers(0, 2**31))
def test_merge_matches_reference(k, d, r, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight, A, M, B = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((k, d), (r, d), (r, r),
                                                                                            (k, r)))
    merged = weight.to(dtype, copy=True)
    ops.merge_(merged, A.to(dtype), M.to(dtype), B.to(dtype), scale)
    expected = weight.to(dtype).double() + scale * (B.to(dtype).double() @ M.to(dtype).double()) @ A.to(dtype).double()
    assert_close_to_reference(merged, expected, dtype)


def test_enough_generated_cases():
    assert FORWARD_BACKWARD_CASES + MERGE_CASES >= 500
