"""The benchmark and example scripts run end to end on tiny settings (they must not rot)."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moslora_ext

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the plots are skipped without it
HAVE_BNB = all(importlib.util.find_spec(name) for name in ("bitsandbytes", "peft"))  # the quantized row


def load_script(name):
    """A benchmark script as a module; its folder goes on sys.path, as when it runs (it imports timing.py)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_runs_only_the_contenders_asked_for(tmp_path, capsys):
    latency = load_script("latency")
    latency.main(["--small", "--device", "cpu", "--shapes", "attn 4096x4096", "--tokens", "16", "--ranks", "2",
                  "--reps", "1", "--warmup", "0", "--out", str(tmp_path), "--contenders", "base", "ours_lora"])
    (case,) = json.loads((tmp_path / "latency-cpu.json").read_text())["cases"]
    assert set(case["inference_s"]) == {"base", "ours_lora"} and not case["merge_s"]
    assert "ours_lora" in capsys.readouterr().out


def test_latency_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    latency = load_script("latency")
    # Every contender is first checked to compute the same function as the others.
    # lora_compiled is left out: torch.compile's compilation would take most of the suite's minute.
    others = [name for name in latency.CONTENDERS if name != "lora_compiled"]
    latency.main(["--small", "--device", "cpu", "--shapes", "attn 4096x4096", "--tokens", "64", "--ranks", "4",
                  "--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--contenders", *others,
                  "--mixed", *(["--quantized", "--quantized-dtype", "bfloat16"] if HAVE_BNB else [])])
    table = capsys.readouterr().out
    assert "ours_merged" in table and "merge: ours" in table
    report = json.loads((tmp_path / "latency-cpu.json").read_text())
    (case,) = report["cases"]
    assert set(case["inference_s"]) >= {"base", "lora_torch", "moslora_torch", "ours", "ours_lora", "ours_merged"}
    assert all(median > 0 for median, _ in case["training_s"].values())
    # With dropout, plain LoRA keeps a dropped copy of x (and its mask); ours keeps only U and the seed.
    n, d, r = 64, 4096 // 32, 4
    assert case["saved_bytes_dropout"]["lora_torch"][1] >= n * d * 4
    assert case["saved_bytes_dropout"]["ours"][1] <= n * r * 4 + 8
    if "ours_peft" in case["saved_bytes_dropout"]:  # the PEFT route's layer saves what ours saves
        assert case["saved_bytes_dropout"]["ours_peft"][1] == case["saved_bytes_dropout"]["ours"][1]
    # Operators per forward and backward with dropout, recorded at N/4 and N (one row block of the CPU
    # path here, so the counts are equal; on CUDA they are equal at any N).
    launches = case["launches_dropout"]
    assert launches["tokens"] == [16, 64]
    at_quarter, at_n = launches["ours"]
    assert at_quarter == at_n and min(at_n) > 0
    (mixed,) = report["mixed"]
    peft = {"peft_mixed"} if importlib.util.find_spec("peft") else set()
    assert set(mixed["inference_s"]) == {"base", "ours_mixed", "ours_4_passes", *peft}
    assert "mixed batch (4 adapters x N/4 rows)" in table
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "latency-cpu.png").stat().st_size > 0
    if HAVE_BNB:  # the quantized row: PEFT's QLoRA layer keeps a dropped (float32) copy of x, ours does not
        (row,) = report["quantized"]
        assert set(row["training_s"]) == {"qbase", "peft_qlora", "ours_qlora"}
        saved = row["saved_bytes_dropout"]
        assert saved["peft_qlora"][1] >= n * d * 4
        # ours: U, the seed and the bf16 casts of the float32 A, M and B (r x d, r x r, d x r here)
        assert saved["ours_qlora"][1] - saved["qbase"][1] <= (n * r + 2 * r * d + r * r) * 2 + 8
        assert "quantized base (nf4, bfloat16)" in table


# example: (the packages it needs, its arguments for a short run, what it prints, the file it saves)
EXAMPLES = {
    "finetune_tiny_llama.py": (["transformers"], ["--steps", "3", "--batch-size", "2", "--length", "32"],
                               ["reloaded adapter gives the same logits: True"], "adapter_model.safetensors"),
    "finetune_tiny_sdxl.py": (["diffusers", "peft"], ["--steps", "3"],
                              ["as a MoSLoRAConfig: same latents: True", "fuse_lora gives the unfused latents: True"],
                              "pytorch_lora_weights.safetensors"),
}


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_trains_saves_reloads_and_merges(tmp_path, example):
    needs, arguments, printed, saved = EXAMPLES[example]
    for package in needs:
        pytest.importorskip(package)
    if "peft" in needs and not moslora_ext.supported_peft_installed():
        pytest.skip(moslora_ext.unsupported_peft_reason())
    result = subprocess.run([sys.executable, str(REPO / "examples" / example), *arguments, "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(line in result.stdout for line in printed), result.stdout
    assert (tmp_path / saved).exists()


TINY_QUALITY_RUN = ["--pretrain-steps", "3", "--steps", "2", "--eval-every", "1", "--seeds", "2", "--batch", "2"]


def test_quality_study_sweeps_every_method_and_reports(tmp_path, capsys):
    pytest.importorskip("sklearn")
    quality = load_script("quality")
    reports = quality.main(TINY_QUALITY_RUN + ["--tasks", "digits", "--other-ranks", "4", "--out", str(tmp_path)])
    assert "moslora_kaiming_rescaled" in capsys.readouterr().out
    report = json.loads((tmp_path / "quality.json").read_text())["tasks"]["digits"]
    assert report["summary"] == json.loads(json.dumps(reports["digits"]["summary"]))
    runs, summary = report["runs"]["8"], report["summary"]["8"]
    assert list(runs) == list(quality.METHODS)
    for method, r in runs.items():
        trains_mixer = quality.trains_mixer(method)
        assert len(r["sweep"]) == 3 + trains_mixer  # the learning rates, then the mixer at 10x the best
        assert r["lr"] in quality.LEARNING_RATES[quality.kind(method)]
        assert r["mixer_lr_multiplier"] in ([1, 10] if trains_mixer else [1])
        assert r["val_loss"][0] == min(r["sweep"].values())
        assert len(r["curves"][0]) == 3  # step 0, 1 and 2
        assert all(0 < loss < 10 for loss in r["test"]["loss"])
        assert all(0 <= accuracy <= 1 for accuracy in r["test"]["accuracy"])
        assert summary[method]["seeds"] == 2 and summary[method]["step_time_vs_lora"] > 0
        assert method == "lora" or 0 < summary[method]["p_vs_lora"] <= 1
    # The head is trained by every method; a trainable mixer adds r * r per adapted layer (q and v of 4 blocks).
    assert runs["moslora_identity"]["trainable"] == runs["lora"]["trainable"] + 8 * 8 * 8
    best = report["best_variant"]
    assert best == min((m for m in runs if quality.trains_mixer(m)), key=lambda m: sum(runs[m]["val_loss"]))
    assert list(report["runs"]["4"]) == ["lora", best]
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "quality.png").stat().st_size > 0


def test_quality_prose_task_reports_bits_per_byte(tmp_path):
    quality = load_script("quality")
    reports = quality.main(TINY_QUALITY_RUN + ["--tasks", "prose", "--methods", "lora", "--no-sweep",
                                               "--other-ranks", "--out", str(tmp_path)])
    row = reports["prose"]["summary"]["8"]["lora"]
    assert row["lr"] == quality.DEFAULT_LR["adapter"]
    assert row["bits_per_byte_mean"] == pytest.approx(row["loss_mean"] / math.log(2))


def test_quality_mixers_and_their_learning_rate():
    pytest.importorskip("sklearn")
    quality = load_script("quality")
    task = quality.Digits()
    pretrained = task.new_model()
    rescaled = quality.prepare(task, pretrained, "moslora_kaiming_rescaled", 8, seed=0)
    kaiming = quality.prepare(task, pretrained, "moslora_kaiming", 8, seed=0)
    for name, layer in moslora_ext.adapted_layers(rescaled).items():
        mixer = layer.lora_mixer.detach()
        assert mixer.norm().item() == pytest.approx(math.sqrt(8))
        drawn = moslora_ext.adapted_layers(kaiming)[name].lora_mixer.detach()
        assert torch.allclose(mixer / mixer.norm(), drawn / drawn.norm())  # the same draw, rescaled
    groups = quality.parameter_groups(rescaled, 1e-2, 10)
    assert [g["lr"] for g in groups] == [1e-2, 1e-1]
    mixers = {id(layer.lora_mixer) for layer in moslora_ext.adapted_layers(rescaled).values()}
    assert {id(p) for p in groups[1]["params"]} == mixers


def test_quality_study_is_deterministic(tmp_path):
    pytest.importorskip("sklearn")
    quality = load_script("quality")
    settings = TINY_QUALITY_RUN + ["--tasks", "digits", "--methods", "moslora_identity", "--other-ranks", "4"]
    first, second = (quality.main(settings + ["--out", str(tmp_path / name)]) for name in ("first", "second"))
    for rank in ("8", "4"):
        for method, run in first["digits"]["runs"][rank].items():
            again = second["digits"]["runs"][rank][method]
            assert run["curves"] == again["curves"] and run["test"] == again["test"]


@pytest.mark.parametrize("a, b", [
    ([0.1, 0.5, 0.3, 0.9, 0.7], [0.2, 0.4, 0.6, 0.8, 1.0]),
    ([1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]),
    ([3.1, 2.7, 5.5], [1.2, 0.4, 2.2, 0.9]),
])
def test_mann_whitney_matches_scipy(a, b):
    stats = pytest.importorskip("scipy.stats")
    u, p = load_script("quality").mann_whitney_u(a, b)
    expected = stats.mannwhitneyu(a, b, alternative="two-sided", method="exact")
    assert u == pytest.approx(expected.statistic)
    assert p == pytest.approx(expected.pvalue)


# benchmarks/gpu_check.sh, rehearsed without a GPU: its syntax, the preflight's
# stops and records, the sanitizer's SKIP when the device refuses it, and that its
# results fit what a device run may send back (at most 8 files, no subfolders).
GPU_CHECK = BENCHMARKS / "gpu_check.sh"
GPU_CHECK_FILES = {"env.txt", "summary.txt", "gpu_check.log", "tests.xml", "sanitizer.log", "latency-cuda.json",
                   "latency-cuda.png", "moe-cuda.json"}


def run_gpu_check(out, **env):
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env}
    result = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=environment, timeout=120)
    files = {p.name for p in out.iterdir()}
    assert files <= GPU_CHECK_FILES and all(p.is_file() for p in out.iterdir())
    return result, (out / "summary.txt").read_text()


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0


def test_gpu_check_preflight_records_and_stops_without_a_device(tmp_path):
    result, summary = run_gpu_check(tmp_path)
    assert result.returncode == 2, result.stdout
    assert summary.splitlines() == [summary.splitlines()[0]]  # nothing ran after the preflight
    assert summary.startswith("preflight  FAIL") and "torch sees no CUDA device: nothing else runs" in summary
    env = (tmp_path / "env.txt").read_text()
    assert f"torch: {torch.__version__}" in env and "compute-sanitizer:" in env and "nvcc:" in env
    assert "gpu_check summary" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_preflight_stops_on_a_torch_that_does_not_import(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('planted')\n")
    out = tmp_path / "out"
    result, summary = run_gpu_check(out, PYTHONPATH=str(broken))
    assert result.returncode == 2
    assert "torch cannot be imported: ImportError('planted')" in summary


def test_gpu_check_sanitizer_refused_by_the_device_is_a_skip(tmp_path):
    """On a gVisor machine compute-sanitizer answers "Device not supported"
    (error 999): that is SKIP, not a FAIL of the code nor a PASS."""
    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("nvcc builds the sanitizer's probe program")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "compute-sanitizer").write_text("#!/bin/sh\necho '========= Error: Device not supported. (error 999)'\n"
                                             "exit 1\n")
    (fake / "compute-sanitizer").chmod(0o755)
    out = tmp_path / "out"
    result, summary = run_gpu_check(out, PATH=f"{fake}:{os.environ['PATH']}", GPU_CHECK_REHEARSE="1",
                                    GPU_CHECK_STEPS="sanitizer")
    assert result.returncode == 0, result.stdout
    lines = summary.splitlines()
    assert lines[0].startswith("preflight  PASS") and len(lines) == 2
    assert lines[1].startswith("sanitizer  SKIP") and "refuses compute-sanitizer" in lines[1]
    assert "Device not supported" in (out / "sanitizer.log").read_text()


def test_moe_sweep_reports_each_number_of_experts_and_gemm_calls_that_do_not_grow_with_it(tmp_path, capsys):
    pytest.importorskip("peft")
    latency = load_script("latency")
    latency.main(["--small", "--device", "cpu", "--tokens", "32", "--ranks", "2", "--reps", "1", "--warmup", "0",
                  "--moe-only", "--moe-experts", "2", "8", "--cpu-clock", "process", "--out", str(tmp_path)])
    timing = sys.modules["timing"]
    clock, timing.cpu_clock = timing.cpu_clock, time.perf_counter  # later benchmark tests time by wall clock
    assert clock is time.process_time  # steps timed by this process's CPU time
    rows = json.loads((tmp_path / "moe-cpu.json").read_text())["moe"]
    assert [row["experts"] for row in rows] == [2, 8] and not (tmp_path / "latency-cpu.json").exists()
    contenders = {"moe_base", "moe_peft", "moe_ours", "moe_ours_mixer"}
    for row in rows:
        assert set(row["training_s"]) == set(row["gemm_calls"]) == contenders
    # Ours: one grouped pass per expert layer, as many outermost GEMM calls for 8 experts as for 2.
    calls = [{name: row["gemm_calls"][name]["outermost"] for name in contenders} for row in rows]
    assert calls[0]["moe_ours"] == calls[1]["moe_ours"] > calls[0]["moe_base"] > 0
    assert "8 experts" in capsys.readouterr().out


def test_latency_benchmark_on_cpu_prints_no_profiler_messages(tmp_path):
    """A CUDA build of torch without a GPU made kineto print ~50 lines that looked like failures."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "latency.py"), "--small", "--device", "cpu",
                             "--shapes", "attn 4096x4096", "--tokens", "16", "--ranks", "2", "--contenders", "ours",
                             "--reps", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"})
    assert result.returncode == 0, result.stderr[-2000:]
    noise = [line for line in result.stderr.splitlines() if "profiler_st" in line or "DeviceCount" in line]
    assert not noise, noise
