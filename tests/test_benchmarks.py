"""The benchmark scripts run end to end on tiny shapes (they must not rot)."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    latency = load_script("latency")
    # Every contender is first checked to compute the same function as the others.
    latency.main(["--small", "--device", "cpu", "--shapes", "attn 4096x4096", "--tokens", "64", "--ranks", "4",
                  "--reps", "2", "--warmup", "1", "--out", str(tmp_path)])
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
    assert (tmp_path / "latency-cpu.png").stat().st_size > 0
