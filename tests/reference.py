"""Independent plain-PyTorch references for the tests (no moslora_ext code)."""

import torch
import torch.nn.functional as F

# (rtol, atol) for comparing an op in this dtype with a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float16: (5e-3, 1e-2),
}


def moslora_reference(x, weight, bias, lora_A, mixer, lora_B, scale, keep_mask=None, p=0.0):
    """y = x W^T + b + scale * (dropout(x) A^T) M^T B^T in plain PyTorch."""
    return F.linear(x, weight, bias) + adapter_reference(x, lora_A, mixer, lora_B, scale, keep_mask, p)


def adapter_reference(x, lora_A, mixer, lora_B, scale, keep_mask=None, p=0.0):
    """The adapter term alone, scale * (dropout(x) A^T) M^T B^T, in plain PyTorch."""
    dropped = x if keep_mask is None else x * keep_mask / (1 - p)
    return scale * F.linear(F.linear(F.linear(dropped, lora_A), mixer), lora_B)


def braid_reference(x, weight, bias, lora_A, lora_B, scale, k):
    """The braid of k subspaces written out with k separate branches, in float64:
    x W^T + b + s (B_1+...+B_k)(A_1+...+A_k) x, A_i the r/k-row blocks of A, B_i the r/k-column blocks of B."""
    x, weight, lora_A, lora_B = (t.detach().double() for t in (x, weight, lora_A, lora_B))
    sum_A, sum_B = sum(lora_A.chunk(k, dim=0)), sum(lora_B.chunk(k, dim=1))
    bias = None if bias is None else bias.detach().double()
    return F.linear(x, weight, bias) + scale * (x @ sum_A.t()) @ sum_B.t()


def make_adapter(k, d, r, dtype=torch.float32, device="cpu", bias=True, seed=0):
    """Random base and adapter tensors (B and the mixer nonzero, unlike a fresh layer)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    return {
        "weight": rand(k, d) / d**0.5,
        "bias": rand(k) if bias else None,
        "lora_A": rand(r, d) / d**0.5,
        "mixer": rand(r, r) / r**0.5,
        "lora_B": rand(k, r),
    }


def assert_close_to_reference(actual, expected, dtype):
    """Compare with a float64 reference; tolerances scale with the reference's magnitude."""
    rtol, atol = TOLERANCES[dtype]
    magnitude = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol * magnitude)


def conv_reference(x, weight, bias, lora_A, mixer, lora_B, scale, stride, padding, dilation, keep_mask=None, p=0.0):
    """A convolution with base(x) + scale * B(M(A(dropout(x)))): A a convolution with the base's
    geometry into r channels, M and B 1x1 convolutions, in plain PyTorch."""
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    dropped = x if keep_mask is None else x * keep_mask / (1 - p)
    u = conv(dropped, lora_A, None, stride, padding, dilation)
    v = conv(u, mixer.reshape(*mixer.shape, *[1] * (weight.dim() - 2)))
    return conv(x, weight, bias, stride, padding, dilation) + scale * conv(v, lora_B)


def embedding_reference(ids, weight, lora_A, mixer, lora_B, scale, padding_idx=None):
    """PEFT's LoRA embedding with a mixer: W[ids] + scale * A^T[ids] M^T B^T."""
    after_A = F.embedding(ids, lora_A.t(), padding_idx)
    return F.embedding(ids, weight, padding_idx) + scale * (after_A @ mixer.t()) @ lora_B.t()


def transposed_linear_reference(x, weight, bias, lora_A, mixer, lora_B, scale):
    """GPT-2's Conv1D (weight stored (in, out)) with an adapter: x W + b + scale * x A^T M^T B^T."""
    return x @ weight + bias + adapter_reference(x, lora_A, mixer, lora_B, scale)
