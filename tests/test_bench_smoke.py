"""The GPU benchmark scripts run end to end on tiny shapes (``--smoke``), and stop clearly without a GPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script must choose the interpreter itself
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env, timeout=300
    )


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_benchmark_smoke(tmp_path):
    output = tmp_path / "ff.csv"
    done = run_script("bench_ff_kernels.py", "--smoke", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    with output.open() as f:
        rows = list(csv.DictReader(f))
    variants = {row["variant"] for row in rows}
    assert variants == {"dense", "cats_torch", "cats_triton", "caprese_triton", "griffin_merged", "caprese_griffin"}
    assert {row["batch"] for row in rows} == {"1", "2"}
    assert all(float(row["ms_median"]) > 0 and row["commit"] and row["torch"] for row in rows)


def test_end_to_end_benchmark_smoke(tmp_path):
    done = run_script("bench_e2e.py", "--smoke", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("e2e_*.json")
    report = json.loads(result.read_text())
    assert set(report["variants"]) == {"hf-dense", "dense", "griffin", "caprese-griffin", "cats", "caprese-cats"}
    for variant in report["variants"].values():
        assert variant["ttft_ms"] > 0 and set(variant["settings"]) == {"4", "8"}
        assert variant["floor_ms"] > 0 and variant["settings"]["8"]["ttnt_ms"] > 0
    ours = {name: v for name, v in report["variants"].items() if name != "hf-dense"}  # transformers' generate
    assert all(v["extra_bytes"] > 0 for v in ours.values())
    weights = {name: v["weight_bytes"] for name, v in ours.items()}
    assert weights["griffin"] < weights["caprese-griffin"] < weights["dense"]
    assert weights["cats"] < weights["caprese-cats"] < weights["dense"]
    for key in ("device", "torch", "transformers", "triton", "commit"):
        assert key in report
    assert "| caprese-cats |" in next(tmp_path.glob("e2e_*.md")).read_text()

    summary = load("bench_e2e").summarize(tmp_path)
    assert "### 16 + 8" in summary.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("name", ["bench_e2e", "bench_ff_kernels"])
def test_without_a_gpu_the_scripts_say_so(name, capsys):
    assert load(name).main([]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_the_prepared_gpu_check_smoke(tmp_path):
    """The check a lent GPU runs first, on tiny shapes: every stage, its outputs, within the runner's file limits."""
    done = run_script("gpu_check.py", "--smoke", "--out", str(tmp_path), "--budget", "400")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 2 for p in files)  # what $OUT brings back
    assert {"summary.md", "meta.json", "check.log", "ff.csv"} <= {p.name for p in files}
    summary = (tmp_path / "summary.md").read_text()
    for stage in ("env", "tests", "ff", "e2e"):
        assert f"| {stage} | ok |" in summary
    assert "extras imported: none" in summary  # generation needs none of trl, datasets, gguf, ...
    assert "| caprese-cats |" in summary and "| hf-dense |" in summary and "caprese_triton" in summary
    assert "met: " in summary  # a verdict line per target
    assert json.loads((tmp_path / "meta.json").read_text())["commit"]


def test_cpu_decode_pairs_each_variant_s_blocks_with_dense_s_of_the_same_round():
    """``cpu_decode.summarize``: the speed-up of medians, and the quartiles of the per-round ratios, each round's
    dense block over the variant's; a slow round slows both and leaves its ratio alone."""
    rows = [
        {"mode": "dense", "batch": 1, "form": "f", "ttnt_ms": 20.0, "x_floor": 1.3, "block_ms": [20, 40, 20, 20, 40]},
        {"mode": "cats", "batch": 1, "form": "f", "ttnt_ms": 16.0, "x_floor": 1.3, "block_ms": [16, 32, 16, 20, 32]},
    ]
    timing = {1: {"dense": 100.0, "cats": 100.0}}
    summary = load("cpu_decode").summarize(rows, [1], timing, timing, tokens=10)
    cats = summary["best"]["cats batch 1"]
    assert cats["round_speed_ups"][1] == 1.25  # the median of 1.25, 1.25, 1.25, 1, 1.25
    assert cats["round_speed_ups"][0] < 1.25 and "per round 1.250x" in summary["lines"][1]
