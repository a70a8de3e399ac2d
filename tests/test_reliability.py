"""Long runs, threads and determinism: memory that stops growing, correct
results from concurrent callers, bitwise-identical reruns."""

import hashlib
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import moslora_ext
from reference import assert_close_to_reference, moslora_reference


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_stops_growing_over_thousands_of_calls():
    torch.manual_seed(0)
    layer = moslora_ext.Linear(256, 256, r=8, lora_dropout=0.1)
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB: a leaked copy per call would show at once

    def cycles(n):
        for _ in range(n):
            layer(x).sum().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer.merge()
            layer.unmerge()

    cycles(300)  # warm up the allocator and the autograd machinery
    before = resident_bytes()
    cycles(3000)
    growth = resident_bytes() - before
    assert growth < 16 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 3000 cycles"


def test_threads_sharing_one_layer_in_inference_get_correct_results():
    torch.manual_seed(0)
    layer = moslora_ext.Linear(64, 48, r=8, dtype=torch.float64).eval()
    torch.nn.init.normal_(layer.lora_B)
    inputs = [torch.randn(32, 64, dtype=torch.float64) for _ in range(16)]
    expected = [moslora_reference(x, layer.weight, layer.bias, layer.lora_A.detach(), layer.lora_mixer.detach(),
                                  layer.lora_B.detach(), layer.scale) for x in inputs]

    def work(i):
        with torch.no_grad():
            return [layer(inputs[i]) for _ in range(50)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(len(inputs))))
    for outputs, want in zip(results, expected):
        for y in outputs:
            assert_close_to_reference(y, want, torch.float64)


def forward_backward_digest(device="cpu"):
    """A hash of y and every gradient of one seeded forward+backward with dropout."""
    torch.manual_seed(123)
    layer = moslora_ext.Linear(96, 80, r=16, lora_dropout=0.2, device=device)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 50, 96, device=device, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    digest = hashlib.sha256()
    for t in (y, x.grad, layer.lora_A.grad, layer.lora_mixer.grad, layer.lora_B.grad):
        digest.update(t.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


DIGEST_SCRIPT = ("import sys; sys.path.insert(0, {tests!r}); import test_reliability as t; "
                 "print(t.forward_backward_digest())")


def test_cpu_results_are_bitwise_identical_across_runs():
    in_process = {forward_backward_digest() for _ in range(3)}
    assert len(in_process) == 1
    tests_dir = str(pathlib.Path(__file__).parent)
    fresh = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT.format(tests=tests_dir)], capture_output=True,
                           text=True, cwd=tests_dir, check=True).stdout.strip()
    assert fresh == in_process.pop()


def test_cuda_mixer_gradient_is_deterministic():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    # Many rows: the mixer gradient is a sum over many per-chunk partials.
    torch.manual_seed(0)
    layer = moslora_ext.Linear(256, 256, r=32, device="cuda")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(200_000, 256, device="cuda")
    grads = []
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        grads.append(layer.lora_mixer.grad.clone())
    assert all(torch.equal(g, grads[0]) for g in grads)
    assert len({forward_backward_digest("cuda") for _ in range(3)}) == 1
