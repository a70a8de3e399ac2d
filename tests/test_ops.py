"""The raw operators against the plain-PyTorch reference, gradcheck and opcheck."""

import os

import pytest
import torch

import moslora_ext
from moslora_ext import ops
from reference import adapter_reference, assert_close_to_reference, make_adapter, moslora_reference

OPS = torch.ops.moslora_ext
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
RANKS = [1, 2, 8, 16, 64]
SHAPES = [(7,), (3, 5)]  # leading dims: 2-D and 3-D inputs
K, D = 24, 40


def adapter_args(adapter, scale=0.7, dropout_p=0.0, seed=None):
    a = adapter
    return (a["weight"], a["bias"], a["lora_A"], a["mixer"], a["lora_B"], scale, dropout_p, seed)


def as_float64(adapter):
    return {name: None if t is None else t.detach().double() for name, t in adapter.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", RANKS)
def test_forward_matches_reference(device, dtype, lead, bias, r):
    adapter = make_adapter(K, D, r, dtype, device, bias)
    x = torch.randn(*lead, D, dtype=torch.float64).to(dtype=dtype, device=device)
    y, u = OPS.forward(x, *adapter_args(adapter))
    assert y.shape == (*lead, K) and y.dtype == dtype
    assert u.shape == (x.numel() // D, r)
    expected = moslora_reference(x.double(), **as_float64(adapter), scale=0.7)
    assert_close_to_reference(y, expected, dtype)
    assert_close_to_reference(u, x.double().reshape(-1, D) @ adapter["lora_A"].double().t(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_backward_matches_reference(device, dtype, lead, bias, r, x_requires_grad):
    adapter = make_adapter(K, D, r, dtype, device, bias)
    x = torch.randn(*lead, D, dtype=torch.float64).to(dtype=dtype, device=device)
    grad_y = torch.randn(*lead, K, dtype=torch.float64).to(dtype=dtype, device=device)
    trained = ["lora_A", "mixer", "lora_B"]

    def grads(inputs, x_in, function):
        x_in = x_in.clone().requires_grad_(x_requires_grad)
        for name in trained:
            inputs[name] = inputs[name].clone().requires_grad_(True)
        (function(x_in, inputs) * grad_y.to(x_in.dtype)).sum().backward()
        return ([x_in.grad] if x_requires_grad else []) + [inputs[name].grad for name in trained]

    actual = grads(dict(adapter), x, lambda x_in, a: OPS.forward(x_in, *adapter_args(a))[0])
    expected = grads(as_float64(adapter), x.double(), lambda x_in, a: moslora_reference(x_in, **a, scale=0.7))
    for got, want in zip(actual, expected):
        assert got.dtype == dtype
        assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(dropout_p, bias):
    adapter = make_adapter(5, 6, 3, torch.float64, "cpu", bias)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    seed = torch.tensor([1234])
    inputs = [x, adapter["weight"], adapter["bias"], adapter["lora_A"], adapter["mixer"], adapter["lora_B"]]
    inputs = [None if t is None else t.clone().requires_grad_(True) for t in inputs]

    def function(x, weight, bias, lora_A, mixer, lora_B):
        return OPS.forward(x, weight, bias, lora_A, mixer, lora_B, 0.9, dropout_p, seed)[0]

    assert torch.autograd.gradcheck(function, inputs)


def assert_dropout_matches_reference(x, adapter, p, seed):
    """Forward and every gradient equal the reference with the mask of `seed`."""
    trained = ("lora_A", "mixer", "lora_B")

    def run(function, inputs):
        x_in = x.clone().requires_grad_(True)
        inputs = {**inputs, **{name: inputs[name].clone().requires_grad_(True) for name in trained}}
        y = function(x_in, inputs)
        y.backward(grad_y)
        return [y, x_in.grad] + [inputs[name].grad for name in trained]

    mask = ops.dropout_mask(x.shape, p, seed, device=x.device)
    assert 0 < mask.sum() < mask.numel()
    grad_y = torch.randn(*x.shape[:-1], adapter["weight"].shape[0], dtype=x.dtype, device=x.device)
    actual = run(lambda x_in, a: OPS.forward(x_in, *adapter_args(a, dropout_p=p, seed=seed))[0], adapter)
    expected = run(lambda x_in, a: moslora_reference(x_in, **a, scale=0.7, keep_mask=mask, p=p), adapter)
    for got, want in zip(actual, expected):
        assert_close_to_reference(got, want, x.dtype)


def test_dropout_forward_backward_match_reference_with_same_mask(device):
    adapter = make_adapter(K, D, 8, torch.float64, device)
    x = torch.randn(4, 6, D, dtype=torch.float64, device=device)
    assert_dropout_matches_reference(x, adapter, 0.3, torch.tensor([99]))


def adapter_only_args(adapter, base_out, dropout_p=0.0, seed=None):
    """forward's arguments in adapter-only mode: no weight nor bias, the base output given."""
    a = adapter
    return (None, None, a["lora_A"], a["mixer"], a["lora_B"], 0.7, dropout_p, seed, base_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_adapter_only_forward_backward_match_reference(device, dtype, dropout_p):
    """base_out + s B M A dropout(x): forward, and the gradients of x (the adapter's
    part alone), base_out (passed through), A, M and B, with the same mask."""
    adapter = make_adapter(K, D, 8, dtype, device)
    x = torch.randn(3, 5, D, dtype=torch.float64).to(dtype=dtype, device=device)
    base_out = torch.randn(3, 5, K, dtype=torch.float64).to(dtype=dtype, device=device)
    grad_y = torch.randn(3, 5, K, dtype=torch.float64).to(dtype=dtype, device=device)
    seed = torch.tensor([17])
    mask = ops.dropout_mask(x.shape, dropout_p, seed, device=device) if dropout_p else None
    trained = ("lora_A", "mixer", "lora_B")

    def run(function, inputs, x_in, base_in):
        x_in, base_in = x_in.clone().requires_grad_(True), base_in.clone().requires_grad_(True)
        inputs = {**inputs, **{name: inputs[name].clone().requires_grad_(True) for name in trained}}
        y = function(x_in, base_in, inputs)
        y.backward(grad_y.to(y.dtype))
        return [y, x_in.grad, base_in.grad] + [inputs[name].grad for name in trained]

    actual = run(lambda x_in, base_in, a: OPS.forward(x_in, *adapter_only_args(a, base_in, dropout_p, seed))[0],
                 adapter, x, base_out)
    expected = run(lambda x_in, base_in, a: base_in + adapter_reference(
        x_in, a["lora_A"], a["mixer"], a["lora_B"], 0.7, mask, dropout_p), as_float64(adapter), x.double(),
        base_out.double())
    for got, want in zip(actual, expected):
        assert got.dtype == dtype
        assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_adapter_only_gradcheck_float64(dropout_p):
    adapter = make_adapter(5, 6, 3, torch.float64, "cpu")
    inputs = [torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64),
              adapter["lora_A"], adapter["mixer"], adapter["lora_B"]]
    inputs = [t.clone().requires_grad_(True) for t in inputs]

    def function(x, base_out, lora_A, mixer, lora_B):
        return OPS.forward(x, None, None, lora_A, mixer, lora_B, 0.9, dropout_p, torch.tensor([4321]), base_out)[0]

    assert torch.autograd.gradcheck(function, inputs)


def randn(*shape, device, contiguous=True, requires_grad=False):
    """A standard normal tensor, or (contiguous=False) a view of one with its
    last two dimensions transposed: the non-contiguous case of the opchecks."""
    if contiguous:
        t = torch.randn(*shape, device=device)
    else:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], device=device).transpose(-1, -2)
    return t.requires_grad_(requires_grad)


LAYOUTS = pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])


@LAYOUTS
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_adapter_only(device, dropout_p, contiguous):
    a = make_adapter(K, D, 4, torch.float32, device)
    for name in ("lora_A", "mixer", "lora_B"):
        a[name].requires_grad_(True)
    seed = torch.tensor([3])
    x = randn(3, 5, D, device=device, contiguous=contiguous, requires_grad=True)
    base_out = randn(3, 5, K, device=device, contiguous=contiguous, requires_grad=True)
    torch.library.opcheck(OPS.forward, (x, *adapter_only_args(a, base_out, dropout_p, seed)))
    _, u = OPS.forward(x, *adapter_only_args(a, base_out, dropout_p, seed))
    args = (randn(3, 5, K, device=device, contiguous=contiguous), x.detach(), None, a["lora_A"].detach(),
            a["mixer"].detach(), a["lora_B"].detach(), u, 0.7, dropout_p, seed, [True, True, True, True])
    torch.library.opcheck(OPS.backward, args)


def test_dropout_op_masks_and_scales(device):
    x = torch.randn(64, 33, device=device)
    seed = torch.tensor([5])
    out = ops.dropout(x, 0.4, seed)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.6)
    torch.testing.assert_close(ops.dropout(x, 0.4, seed), out, rtol=0, atol=0)
    assert not torch.equal(ops.dropout(x, 0.4, torch.tensor([6])), out)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_dropout_mask_statistics(p):
    """The mask is Bernoulli(1 - p), the same in every row and column, with
    neighbours (same Philox word, next row, next seed) uncorrelated. Every
    bound is 6 standard deviations: a correct mask fails with probability
    below 1e-8, a biased or patterned one cannot pass."""
    rows = cols = 1024
    dropped = (~ops.dropout_mask((rows, cols), p, torch.tensor([31337]))).double()
    sd = (p * (1 - p)) ** 0.5
    assert abs(dropped.mean().item() - p) < 6 * sd / (rows * cols) ** 0.5
    for per_line, n in ((dropped.mean(0), rows), (dropped.mean(1), cols)):
        assert (per_line - p).abs().max().item() < 6 * sd / n**0.5

    def correlation(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a @ b / (a.norm() * b.norm())).item()

    bound = 6 / (rows * cols / 2) ** 0.5
    assert abs(correlation(dropped[:, 0::2], dropped[:, 1::2])) < bound  # columns sharing a Philox word
    assert abs(correlation(dropped[0::2], dropped[1::2])) < bound  # neighbouring rows
    other_seed = (~ops.dropout_mask((rows, cols), p, torch.tensor([31338]))).double()
    assert abs(correlation(dropped, other_seed)) < 6 / (rows * cols) ** 0.5
    x = torch.randn(rows, 64)
    out = ops.dropout(x, p, torch.tensor([7]))
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)


def test_dropout_mask_is_the_same_on_cpu_and_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    seed = torch.tensor([2024])
    cpu = ops.dropout_mask((300, 77), 0.1, seed, device="cpu")
    cuda = ops.dropout_mask((300, 77), 0.1, seed, device="cuda")
    assert torch.equal(cpu, cuda.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_merge_matches_reference(device, dtype):
    adapter = make_adapter(K, D, 8, dtype, device)
    weight = adapter["weight"].clone()
    ops.merge_(weight, adapter["lora_A"], adapter["mixer"], adapter["lora_B"], 0.5)
    a = as_float64(adapter)
    expected = a["weight"] + 0.5 * a["lora_B"] @ a["mixer"] @ a["lora_A"]
    assert_close_to_reference(weight, expected, dtype)
    ops.merge_(weight, adapter["lora_A"], adapter["mixer"], adapter["lora_B"], -0.5)
    assert_close_to_reference(weight, a["weight"], dtype)


@LAYOUTS
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_forward(device, bias, dropout_p, contiguous):
    adapter = make_adapter(K, D, 4, torch.float32, device, bias)
    for name in ("lora_A", "mixer", "lora_B"):
        adapter[name].requires_grad_(True)
    x = randn(3, 5, D, device=device, contiguous=contiguous, requires_grad=True)
    torch.library.opcheck(OPS.forward, (x, *adapter_args(adapter, dropout_p=dropout_p, seed=torch.tensor([3]))))


@pytest.mark.parametrize("output_mask", [[True, True, True, True], [False, True, False, True],
                                         [True, False, False, False]])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@LAYOUTS
def test_opcheck_backward(device, output_mask, dropout_p, contiguous):
    a = make_adapter(K, D, 4, torch.float32, device)
    seed = torch.tensor([3])
    x = randn(3, 5, D, device=device, contiguous=contiguous)
    _, u = OPS.forward(x, *adapter_args(a, dropout_p=dropout_p, seed=seed))
    grad_y = randn(3, 5, K, device=device, contiguous=contiguous)
    args = (grad_y, x, a["weight"], a["lora_A"], a["mixer"], a["lora_B"], u, 0.7, dropout_p, seed, output_mask)
    torch.library.opcheck(OPS.backward, args)
    grads = OPS.backward(*args)
    assert [g is not None for g in grads] == output_mask


def test_backward_op_takes_operands_that_require_grad(device):
    """Called directly with grad mode on, as opcheck calls it: the ATen out= calls inside the kernel
    refused operands that require grad (the op's own work, not a graph to record)."""
    a = make_adapter(K, D, 4, torch.float64, device)
    leaves = {name: a[name].requires_grad_() for name in ("weight", "lora_A", "mixer", "lora_B")}
    x = torch.randn(3, 5, D, dtype=torch.float64, device=device, requires_grad=True)
    grad_y = torch.randn(3, 5, K, dtype=torch.float64, device=device)
    _, u = OPS.forward(x, *adapter_args({**a, "bias": None}))
    got = OPS.backward(grad_y, x, leaves["weight"], leaves["lora_A"], leaves["mixer"], leaves["lora_B"], u, 0.7,
                       0.0, None, [True, True, True, True])
    y = moslora_reference(x, **{**leaves, "bias": None}, scale=0.7)
    want = torch.autograd.grad(y, [x, leaves["lora_A"], leaves["mixer"], leaves["lora_B"]], grad_y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@LAYOUTS
def test_opcheck_merge(device, contiguous):
    a = make_adapter(K, D, 4, torch.float32, device)
    weight = randn(K, D, device=device, contiguous=contiguous)
    torch.library.opcheck(OPS.merge_, (weight, a["lora_A"], a["mixer"], a["lora_B"], 0.3))


@LAYOUTS
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_dropout(device, contiguous, p):
    """The fake kernel's strides are the op's: for p > 0 a contiguous result
    whatever x's layout, for p = 0 x's clone."""
    torch.library.opcheck(OPS.dropout, (randn(2, 6, D, device=device, contiguous=contiguous), p,
                                        torch.tensor([1])))


def meta_among_cpu_arguments():
    """Op calls with one meta tensor among CPU arguments, by the argument's name."""
    a = make_adapter(K, D, 4, torch.float32, "cpu")
    x, seed, meta = torch.randn(3, D), torch.tensor([1]), torch.device("meta")
    y, u = OPS.forward(x, *adapter_args(a))
    grad_y = torch.randn_like(y)

    def backward(grad, u_in, p, seed_in):
        return lambda: OPS.backward(grad, x, a["weight"], a["lora_A"], a["mixer"], a["lora_B"], u_in, 0.7, p,
                                    seed_in, [True] * 4)

    return {
        "bias": lambda: OPS.forward(x, *adapter_args({**a, "bias": a["bias"].to(meta)})),
        "dropout_seed": lambda: OPS.forward(x, *adapter_args(a, dropout_p=0.1, seed=seed.to(meta))),
        "base_out": lambda: OPS.forward(x, *adapter_only_args(a, y.to(meta))),
        "backward grad_out": backward(grad_y.to(meta), u, 0.0, None),
        "backward u": backward(grad_y, u.to(meta), 0.0, None),
        "backward dropout_seed": backward(grad_y, u, 0.1, seed.to(meta)),
        "dropout op seed": lambda: OPS.dropout(x, 0.1, seed.to(meta)),
    }


@pytest.mark.parametrize("name", list(meta_among_cpu_arguments()))
def test_meta_tensor_among_cpu_arguments_is_refused(name):
    """A meta tensor sends the call to the fake (Meta) kernel; with real CPU
    x it must refuse, as F.linear does, not return uninitialised memory; as
    the C++ op refuses arguments on two devices, with a ValueError."""
    with pytest.raises(ValueError, match=r"is on meta but x is on cpu|CPU tensor, got .* on meta"):
        meta_among_cpu_arguments()[name]()


def test_scale_that_overflows_the_compute_dtype_is_refused():
    """1e40 is finite as a double but inf in float32, the precision fp32 and
    bf16 layers compute in: refused, where float64 computes with it."""
    a = make_adapter(K, D, 4, torch.float32, "cpu")
    x = torch.randn(3, D)
    with pytest.raises(ValueError, match=r"scale = 1e\+40 overflows Float"):
        OPS.forward(x, *adapter_args(a, scale=1e40))
    a64 = as_float64(a)
    y, _ = OPS.forward(x.double(), *adapter_args(a64, scale=1e40))
    assert_close_to_reference(y, moslora_reference(x.double(), **a64, scale=1e40), torch.float64)
    weight = a["weight"].clone()
    with pytest.raises(ValueError, match="overflows Float"):
        ops.merge_(weight, a["lora_A"], a["mixer"], a["lora_B"], -1e40)
    assert torch.equal(weight, a["weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safe_merge_with_an_overflowing_scale_raises_value_error(dtype):
    layer = moslora_ext.Linear(D, K, r=4, lora_alpha=1e40, dtype=dtype)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="overflows Float"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, before) and not layer.merged


def test_double_backward_is_refused():
    layer = moslora_ext.Linear(D, K, r=4)
    x = torch.randn(3, D, requires_grad=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_differentiating_func_transforms_are_refused(transform):
    layer = moslora_ext.Linear(D, K, r=4)
    function = getattr(torch.func, transform)(lambda x: layer(x).sum())
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        function(torch.randn(3, D))


def test_cuda_build_required_by_ci():
    """CI sets MOSLORA_REQUIRE_CUDA_BUILD=1: there, a build without the CUDA kernels fails."""
    info = moslora_ext.build_info()
    assert info["torch_runtime_version"] == torch.__version__
    if info["with_cuda"]:
        assert info["cuda_archs"]
    else:
        assert info["cuda_archs"] is None
    if torch.cuda.is_available() or os.environ.get("MOSLORA_REQUIRE_CUDA_BUILD") == "1":
        assert info["with_cuda"], \
            "the CUDA kernels were not compiled (MOSLORA_REQUIRE_CUDA_BUILD=1 or a GPU is visible)"


def test_row_blocked_dropout_matches_reference(device):
    """Wide inputs are processed in tiles of 2^20 / d rows (64 here) on a CPU,
    of 16 MiB (128 rows here) on CUDA: dropout forward and backward must
    stitch the tiles with the right mask rows."""
    adapter = make_adapter(150, 2**14, 2, torch.float64, device)
    x = torch.randn(150, 2**14, dtype=torch.float64, device=device)
    assert_dropout_matches_reference(x, adapter, 0.2, torch.tensor([8]))


def test_row_blocked_half_precision_merge_matches_reference(device):
    """fp16/bf16 merge adds in fp32 a block of 2^20 / d rows (64 here) at a time."""
    a = make_adapter(150, 2**14, 2, torch.bfloat16, device)
    weight = a["weight"].clone()
    ops.merge_(weight, a["lora_A"], a["mixer"], a["lora_B"], 0.5)
    a64 = as_float64(a)
    expected = a64["weight"] + 0.5 * a64["lora_B"] @ a64["mixer"] @ a64["lora_A"]
    assert_close_to_reference(weight, expected, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_lora_A_gradient_accumulates_in_float32(device, dtype):
    """dA = dU^T dropout(X) sums over all N rows: it must be rounded to
    fp16/bf16 once, at the end, not after every block of rows. The inputs
    make every product exact (dU is a column of G, p = 0.5 scales by 2) and
    positive, so a correctly accumulated result is the float64 sum rounded
    once: within half an ulp (2^-9 relative for bf16, 2^-12 for fp16, with a
    little room for the fp32 sum). 8192 x 2048 spans 16 tiles of the 2^20
    elements a CPU works on, and 2 of the 16 MiB a GPU works on."""
    n, d, k, r, p = 8192, 2048, 8, 4, 0.5
    g = torch.Generator().manual_seed(0)
    x = (1 + torch.rand(n, d, generator=g)).to(dtype).to(device)
    grad_y = torch.zeros(n, k, dtype=dtype, device=device)
    grad_y[:, :r] = (1 + torch.rand(n, r, generator=g)).to(dtype)
    lora_B = torch.zeros(k, r, dtype=dtype, device=device)
    lora_B[:r] = torch.eye(r, dtype=dtype)
    eye = torch.eye(r, dtype=dtype, device=device)
    weight = torch.zeros(k, d, dtype=dtype, device=device)
    lora_A = torch.zeros(r, d, dtype=dtype, device=device)
    seed = torch.tensor([11])
    u = torch.zeros(n, r, dtype=dtype, device=device)
    _, dA, _, _ = OPS.backward(grad_y, x, weight, lora_A, eye, lora_B, u, 1.0, p, seed,
                               [False, True, False, False])
    mask = ops.dropout_mask((n, d), p, seed, device=device)
    expected = grad_y[:, :r].double().t() @ (x.double() * mask / (1 - p))
    half_ulp = torch.finfo(dtype).eps / 2
    torch.testing.assert_close(dA.double(), expected, rtol=1.05 * half_ulp, atol=0)


# (rows, in_features): odd sizes, a partial column group, one long row, more
# rows than a block of the grid's y.
BODY_CASES = [(1, 1), (5, 7), (37, 130), (300, 64), (700, 19), (3, 1029)]


BODY_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", BODY_DTYPES)
@pytest.mark.parametrize("n, d", BODY_CASES)
def test_cuda_kernel_bodies_on_host_match_reference(n, d, dtype):
    """The CUDA dropout kernels' bodies (the dropout op's, and backward's pass
    that drops a tile of x and dX in place from one mask draw), run on the
    host over the grids and blocks of their launches, against the reference;
    the tile starts at a mask row other than 0, as every tile but the first."""
    from moslora_ext._testing import cuda_bodies_on_host as bodies
    g = torch.Generator().manual_seed(n * d)
    x, dx = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2))
    p, seed, first_row = 0.3, 77, 5
    keep = ops.dropout_mask((first_row + n, d), p, torch.tensor([seed])).double() / (1 - p)
    dropped, dx_dropped = bodies.dropout_pair(x.to(dtype), dx.to(dtype), p, seed, first_row)
    assert_close_to_reference(bodies.dropout(x.to(dtype), p, seed), x * keep[:n], dtype)
    assert_close_to_reference(dropped, x * keep[first_row:], dtype)
    assert_close_to_reference(dx_dropped, dx.to(dtype).double() * keep[first_row:], dtype)


def test_test_hooks_are_not_in_the_production_extension():
    """The host runs of the CUDA bodies live in moslora_ext._testing, a module
    of their own: the extension the package loads carries none of them."""
    import moslora_ext._C
    import moslora_ext._testing
    assert not hasattr(moslora_ext._C, "cuda_bodies_on_host")
    assert hasattr(moslora_ext._testing, "cuda_bodies_on_host")


# (rows, r): one row chunk of the mixer backward, several, a partial last one.
MIXER_CASES = [(1, 1), (5, 3), (64, 16), (300, 8), (700, 33)]


@pytest.mark.parametrize("dtype", BODY_DTYPES)
@pytest.mark.parametrize("n, r", MIXER_CASES)
def test_cuda_mixer_bodies_on_host_match_reference(n, r, dtype):
    """The CUDA mixer kernels' bodies over their launches: V = U M^T, and
    dU = dV M with dM = dV^T U reduced over the row chunks."""
    from moslora_ext._testing import cuda_bodies_on_host as bodies
    g = torch.Generator().manual_seed(n * r)
    u, dv, mixer = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((n, r), (n, r), (r, r)))
    du, dmixer = bodies.mixer_backward(dv.to(dtype), u.to(dtype), mixer.to(dtype))
    assert_close_to_reference(bodies.mixer_forward(u.to(dtype), mixer.to(dtype)), u @ mixer.t(), dtype)
    assert_close_to_reference(du, dv @ mixer, dtype)
    assert_close_to_reference(dmixer, dv.t() @ u, dtype)


# (rows, in_features, r) up to 2^31 elements of x: one long row, one column,
# LLaMA-sized layers, more rows than the grid's y (65535) holds, rows wider
# than a tile, r up to 64.
LAUNCH_SHAPES = [(1, 1, 1), (3, 1029, 64), (2**31, 1, 1), (1, 2**31, 16), (2**19, 4096, 16), (2**18 + 3, 8192, 64),
                 (2**16 * 5 + 1, 7, 3), (8192, 4096, 8), (5, 2**23 + 1, 16)]
MAX_GRID = (2**31 - 1, 65535, 65535)


@pytest.mark.parametrize("n, d, r", LAUNCH_SHAPES)
def test_cuda_launches_fit_the_limits_and_cover_the_work(n, d, r):
    """Every kernel's grid and block as its launcher computes them: within
    CUDA's limits, and every column group, row and chunk owned by a thread or
    block, with no block left without work; the tiles of the products under
    dropout at most 16 MiB (or one row) and at least one row."""
    from moslora_ext._testing import cuda_bodies_on_host as bodies
    launches = bodies.launches(n, d, r)
    chunks, tile_rows = launches.pop("mixer_chunks"), launches.pop("tile_rows")
    for name, (grid, block) in launches.items():
        assert 1 <= block <= 1024 and block % 32 == 0, name
        assert all(1 <= g <= limit for g, limit in zip(grid, MAX_GRID)), (name, grid)
    for size, rows in zip((2, 8), tile_rows):
        assert rows >= 1 and (rows == 1 or rows * d * size <= 2**24) and (rows + 1) * d * size > 2**24
    groups = -(-d // 8)
    for name, rows in (("dropout_kernel", n), ("dropout_pair_kernel, 16-bit tile", min(n, tile_rows[0])),
                       ("dropout_pair_kernel, 64-bit tile", min(n, tile_rows[1]))):
        (gx, gy, gz), block = launches[name]  # x: column groups, y: grid-strided rows
        assert (gx - 1) * block < groups <= gx * block and gy <= rows and gz == 1
    for name, work in (("mixer_forward_kernel", n * r), ("reduce_partials_kernel", r * r)):
        (gx, _, _), block = launches[name]  # grid-stride: no idle block
        assert (gx - 1) * block < work
    (gx, _, _), _ = launches["mixer_backward_kernel"]
    count, rows = chunks
    assert gx == count <= 1024 and (count - 1) * rows < n <= count * rows


def test_cuda_graph_capture_is_checked_on_the_device_of_x():
    """Capture on cuda:1 while cuda:0 is current: the op, whose guard makes
    x's device current, must see the capture on x's stream and refuse."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    layer = moslora_ext.Linear(16, 8, r=4, lora_dropout=0.1, device="cuda:1")
    x = torch.randn(4, 16, device="cuda:1")
    layer(x)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.device(1), torch.cuda.graph(torch.cuda.CUDAGraph()):
            with torch.cuda.device(0):
                layer(x)


def test_dropout_refuses_cuda_graph_capture():
    """The seed is read on the host: a captured graph would replay one mask,
    so capture with dropout on fails with a clear error; without dropout it
    captures and replays the layer's output."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    layer = moslora_ext.Linear(16, 8, r=4, lora_dropout=0.1, device="cuda")
    x = torch.randn(4, 16, device="cuda")
    layer(x)  # first calls outside the capture
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            layer(x)
    layer.eval()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.testing.assert_close(y, layer(x))
