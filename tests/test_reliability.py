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
from moslora_ext.peft.folder import RECORD_FIELD
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


# --- saves to one folder from several processes --------------------------------------------------------

SAVE_ROUNDS = 12


def save_in_rounds(writer, root, barrier, errors):
    """Writer ``writer``'s process: save its adapter (lora_alpha and lora_B of its own) to each round's folder,
    all writers at once."""
    try:
        torch.manual_seed(writer)
        model = moslora_ext.add_adapters(torch.nn.Sequential(torch.nn.Linear(256, 256)), ["0"], r=32,
                                         lora_alpha=8 * (writer + 1))
        with torch.no_grad():
            model[0].lora_B.fill_(writer + 1)
        for i in range(SAVE_ROUNDS):
            barrier.wait(timeout=60)
            moslora_ext.save_adapter(model, root / f"round{i}")
    except BaseException as exc:
        errors.put(f"writer {writer}: {type(exc).__name__}: {exc}")
        barrier.abort()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks writer processes")
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "over-an-adapter"])
def test_processes_saving_to_one_folder_at_once_leave_one_writers_complete_adapter(existing, tmp_path):
    import json
    import multiprocessing

    from safetensors.torch import load_file

    if existing:  # an adapter there already, which every writer overwrites
        first = moslora_ext.add_adapters(torch.nn.Sequential(torch.nn.Linear(256, 256)), ["0"], r=32)
        for i in range(SAVE_ROUNDS):
            moslora_ext.save_adapter(first, tmp_path / f"round{i}")
    context = multiprocessing.get_context("fork")
    writers, barrier, errors = 3, context.Barrier(3), context.Queue()
    processes = [context.Process(target=save_in_rounds, args=(w, tmp_path, barrier, errors)) for w in range(writers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not failures and all(p.exitcode == 0 for p in processes), failures
    for i in range(SAVE_ROUNDS):
        folder = tmp_path / f"round{i}"
        alpha = json.loads((folder / "adapter_config.json").read_text())[RECORD_FIELD]["layers"]["0"]["lora_alpha"]
        writer = int(load_file(folder / "adapter_model.safetensors")["base_model.model.0.lora_B.weight"][0, 0]) - 1
        assert alpha == 8 * (writer + 1), f"round {i}: writer {writer}'s tensors with another writer's config"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"round{i}" for i in sorted(range(SAVE_ROUNDS), key=str)]


def test_save_adapter_writes_a_folder_whose_name_has_the_most_characters_a_name_may_have(tmp_path):
    model = moslora_ext.add_adapters(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], r=2)
    torch.nn.init.normal_(model[0].lora_B)
    folder = tmp_path / ("a" * 255)
    moslora_ext.save_adapter(model, folder)
    moslora_ext.save_adapter(model, folder)  # over the saved one
    fresh = moslora_ext.load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), folder)
    fresh[0].load_state_dict(model[0].state_dict())  # the base weights, which the adapter does not hold
    assert torch.equal(fresh[0].lora_B, model[0].lora_B) and torch.equal(fresh[0].lora_mixer, model[0].lora_mixer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_save_adapter_to_a_dangling_link_names_the_link_and_writes_nothing(tmp_path):
    model = moslora_ext.add_adapters(torch.nn.Sequential(torch.nn.Linear(8, 8)), ["0"], r=2)
    link = tmp_path / "adapter"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"{link} is a symbolic link to {tmp_path / 'missing'}, which does "
                                                 "not exist"):
        moslora_ext.save_adapter(model, link)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and link.is_symlink()
