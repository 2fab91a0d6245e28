"""The prepared GPU check: one command that fits a short lease on one H100 or H200 (8 minutes after the machine has
started, compile, autotuning and imports included) and leaves each result in the output folder as soon as it exists.

    bash benchmarks/run_gpu.sh quick               # on the GPU machine ($OUT: the device runner's output folder)
    python benchmarks/gpu_check.py --smoke --out DIR   # on a CPU: tiny shapes, proves the check runs end to end

Stages, in order, each a subprocess with a time limit taken from what is left of ``--budget``:

1. ``env``: GPU name and versions (``meta.json``), and an import check: loading an adapter and generating needs
   none of trl, datasets, gguf, math-verify, matplotlib or lm_eval (the GPU machine lacks most of them);
2. ``tests``: the ``gpu`` and ``kernels`` tests of the decode path (CATS kernel against its reference on odd shapes in
   bf16/fp16/fp32 at batch 1 to 8, merged decode against the reference, FastDecoder against generate on CUDA);
3. ``ff``: one FF block of Llama-3.1-8B in bf16 at batch 1 and 8, density 0.5, r = 256: dense, GRIFFIN merged,
   Caprese(GRIFFIN), CATS, Caprese(CATS), with time, GB/s on its own bytes and the fraction of copy bandwidth
   (``ff.csv``, verdicts in the summary);
4. ``e2e``: Llama-3.1-8B with random bf16 weights, a 2048-token prompt and 256 new tokens: FastDecoder dense,
   Caprese(CATS 0.5, all layers), Caprese(GRIFFIN 0.5, first half), then transformers' own generate with a static,
   compiled cache; TTFT (and its ratio to dense: the calibration's share), TTNT, byte floors, memory held beyond the
   model, peak memory and a verdict per target (``e2e/``).

``summary.md`` is rewritten after every stage; ``check.log`` holds every stage's output. At most 8 files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout that is not pip-installed, as on the GPU machine
    sys.path.insert(0, str(ROOT))

EXTRAS = ("trl", "datasets", "gguf", "math_verify", "matplotlib", "lm_eval")
IMPORT_CHECK = f"""
import sys
import caprese_peft, caprese_peft.kernels, caprese_peft.fast_decode, caprese_peft.decoding
from caprese_peft import CapreseConfig, FastDecoder
loaded = sorted(set({EXTRAS!r}) & set(sys.modules))
print("imported caprese_peft", caprese_peft.__version__, "from", caprese_peft.__file__)
print("extras imported:", loaded or "none")
sys.exit(1 if loaded else 0)
"""
DECODE_TESTS = ["tests/test_kernels.py", "tests/test_merged_decode.py", "tests/test_fast_decode.py"]
# seconds each stage may take at most on the GPU (a smoke run on a CPU gets the same shares of its budget)
CAPS = {"env": 60, "tests": 110, "ff": 100}


class Check:
    """Runs the stages within the budget, logging to ``check.log`` and rewriting ``summary.md`` after each."""

    def __init__(self, out: Path, budget: float, smoke: bool) -> None:
        self.out, self.budget, self.smoke = out, budget, smoke
        self.start = time.monotonic()
        self.stages: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "check.log"
        self.log.write_text("")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, command: list[str], cap: float | None = None) -> int:
        """Run one stage as a subprocess within ``cap`` and what is left of the budget; returns its exit code."""
        limit = self.left() if cap is None else min(cap, self.left())
        entry = {"stage": name, "command": " ".join(command), "limit_s": round(limit)}
        if limit < 5:
            entry.update(status="skipped: no time left", seconds=0)
            self.stages.append(entry)
            self.summarize()
            return 124
        began = time.monotonic()
        with self.log.open("a") as log:
            log.write(f"\n=== {name}: {entry['command']} (limit {limit:.0f} s)\n")
            log.flush()
            process = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            try:
                output, _ = process.communicate(timeout=limit)
                code = process.returncode
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)  # the whole group: pytest's and torch.compile's workers too
                output, _ = process.communicate()
                code = 124
            log.write(output or "")
            print(output or "", end="", flush=True)
        tail = [line for line in (output or "").splitlines() if line.strip()][-1:] or [""]
        status = "timed out" if code == 124 else "ok" if code == 0 else f"exit {code}"
        entry.update(status=status, seconds=round(time.monotonic() - began, 1), last_line=tail[0][:300])
        self.stages.append(entry)
        self.summarize()
        return code

    def summarize(self) -> Path:
        """``summary.md``: the metadata, each stage's status, the FF verdicts and the end-to-end tables."""
        lines = ["# GPU check", ""]
        meta_file = self.out / "meta.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            lines += [
                f"{meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, transformers {meta['transformers']}, "
                f"triton {meta['triton']}, peft {meta.get('peft')}; commit {meta['commit']}; {meta['date']}.",
                "",
            ]
        lines += ["| stage | status | seconds | limit s | last line |", "|---|---|---|---|---|"]
        for s in self.stages:
            lines.append(
                f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s.get('last_line', '')} |"
            )
        ff = self.out / "ff.csv"
        if ff.is_file():
            lines += ["", "## One FF block", "", *ff_table(ff)]
        for table in sorted((self.out / "e2e").glob("e2e_*.md")):
            lines += ["", table.read_text().replace("# End-to-end decode benchmark", "## End to end")]
        path = self.out / "summary.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def ff_table(path: Path) -> list[str]:
    """The FF benchmark's rows as a markdown table, and its verdicts."""
    import csv

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_ff_kernels import verdicts

    with path.open() as f:
        rows = list(csv.DictReader(f))
    lines = [
        "| model | batch | density | variant | ms | GB/s | of copy | vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['density']} | {r['variant']} | {float(r['ms_median']):.4f} | "
            f"{r['gb_per_s']} | {r['fraction_of_copy_bw']} | {r['speedup_vs_dense']}x |"
        )
    typed = [
        {**r, "batch": int(r["batch"]), "density": float(r["density"]), "speedup_vs_dense": float(r["speedup_vs_dense"]),
         "fraction_of_copy_bw": float(r["fraction_of_copy_bw"])}
        for r in rows
    ]  # fmt: skip
    return [*lines, "", *verdicts(typed)]


def write_meta(out: Path) -> None:
    """``meta.json``: device, versions and commit."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import run_metadata

    meta = run_metadata("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        meta["peft"] = None
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks/results/quick"))
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all stages (default: 7 min 50 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU: proves the check runs")
    args = parser.parse_args(argv)

    check = Check(args.out, args.budget, args.smoke)
    caps = {k: v * args.budget / 470.0 for k, v in CAPS.items()} if args.smoke else CAPS
    python = sys.executable
    if check.run("env", [python, "-c", IMPORT_CHECK], caps["env"]) not in (0, 1):
        print("caprese_peft does not import here: see check.log", file=sys.stderr)
    write_meta(args.out)
    check.summarize()

    markers = "(gpu or kernels) and not slow" if args.smoke else "gpu or kernels"
    check.run(
        "tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", markers, *DECODE_TESTS], caps["tests"]
    )

    ff = [python, "benchmarks/bench_ff_kernels.py", "--output", str(args.out / "ff.csv")]
    ff += ["--smoke"] if args.smoke else ["--models", "llama-3.1-8b", "--batches", "1", "8", "--densities", "0.5"]
    check.run("ff", [*ff, "--rank", "256"] if not args.smoke else ff, caps["ff"])

    e2e = [python, "benchmarks/bench_e2e.py", "--output-dir", str(args.out / "e2e")]
    e2e += ["--variants", "dense", "caprese-cats", "caprese-griffin", "hf-dense"]
    e2e += ["--smoke"] if args.smoke else ["--models", "llama-3.1-8b", "--generate", "256", "--prompt", "2048"]
    check.run("e2e", e2e)
    print(f"\n{check.summarize().read_text()}")
    return 0 if all(s["status"] == "ok" for s in check.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
