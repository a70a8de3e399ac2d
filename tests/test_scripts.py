"""The benchmark and example scripts run end to end on tiny settings (they must not rot)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the plots are skipped without it


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    latency = load_script("latency")
    # Every contender is first checked to compute the same function as the others.
    # lora_compiled is left out: torch.compile's compilation would take most of the suite's minute.
    others = [name for name in latency.CONTENDERS if name != "lora_compiled"]
    latency.main(["--small", "--device", "cpu", "--shapes", "attn 4096x4096", "--tokens", "64", "--ranks", "4",
                  "--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--contenders", *others])
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
    # Operators per forward and backward with dropout, recorded at N/4 and N (one row block of the CPU
    # path here, so the counts are equal; on CUDA they are equal at any N).
    launches = case["launches_dropout"]
    assert launches["tokens"] == [16, 64]
    at_quarter, at_n = launches["ours"]
    assert at_quarter == at_n and min(at_n) > 0
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "latency-cpu.png").stat().st_size > 0


def test_tiny_llama_example_trains_saves_reloads_and_merges(tmp_path):
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, str(REPO / "examples" / "finetune_tiny_llama.py"), "--steps", "3",
                             "--batch-size", "2", "--length", "32", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reloaded adapter gives the same logits: True" in result.stdout
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_quality_study_runs_and_reports(tmp_path, capsys):
    quality = load_script("quality")
    rows = quality.main(["--pretrain-steps", "3", "--steps", "2", "--eval-every", "1", "--seeds", "2", "--no-sweep",
                         "--batch", "2", "--methods", "lora", "moslora_kaiming", "--out", str(tmp_path)])
    assert "moslora_kaiming" in capsys.readouterr().out
    assert rows["lora"]["seeds"] == 2 and rows["moslora_kaiming"]["trainable_parameters"] > \
        rows["lora"]["trainable_parameters"]
    report = json.loads((tmp_path / "quality.json").read_text())
    assert len(report["runs"]["lora"]["curves"][0]) == 3  # step 0, 1 and 2
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "quality.png").stat().st_size > 0


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
