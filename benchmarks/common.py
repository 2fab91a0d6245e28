"""What the benchmark scripts share: run metadata, a timer, and the measured copy bandwidth.

On CUDA, times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); on a CPU (the
``--smoke`` runs that prove a script works) from ``time.perf_counter``, and mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUANTILES = [0.5, 0.2, 0.8]


def git_commit() -> str:
    """Short commit of the working tree, with ``-dirty`` when it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's for a smoke run."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def run_metadata(device: str) -> dict:
    """Device, library versions and commit, recorded with every result."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_uuid"] = str(getattr(props, "uuid", ""))
    return meta


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_run_metadata(args: argparse.Namespace) -> dict:
    """``run_metadata("cpu")`` with the CPU's model, torch's threads and the script's arguments: the head of every
    CPU benchmark's result."""
    return {
        **run_metadata("cpu"),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }


def slug(text: str) -> str:
    """``text`` as a file-name fragment."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def time_ms(fn: Callable[[], object], device: str, reps: int = 5) -> tuple[float, float, float]:
    """``(median, p20, p80)`` milliseconds of ``fn()``: ``do_bench`` on CUDA, a few wall-clock runs elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, quantiles=QUANTILES))
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def copy_bandwidth_gbps(device: str, gib: float = 1.0) -> float:
    """GB/s of a large copy on ``device``, counting bytes read and written: the practical ceiling of a GEMV."""
    if device != "cuda":
        gib = min(gib, 1 / 16)  # a smoke run only needs a number
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(partial(dst.copy_, src), device)
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def write_result(path: Path, result: dict) -> None:
    """Write a benchmark's result (with ``run_metadata``) as indented JSON, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")
