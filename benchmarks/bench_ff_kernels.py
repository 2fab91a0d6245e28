"""Decode-time cost of one FF block: dense cuBLAS vs CATS vs Caprese(CATS) vs GRIFFIN vs Caprese(GRIFFIN).

For the FF shapes of Llama-3.1-8B (D=4096, F=14336) and Qwen2.5-14B (D=5120, F=13824) with random bf16
weights, at batch 1/4/8 (one token per sequence) and densities 0.3-0.7, prints for each variant the median
time (``triton.testing.do_bench``, which flushes L2 between runs), the bandwidth achieved on the bytes the
variant must read, and that bandwidth as a fraction of a measured device-to-device copy. Writes one CSV to
``benchmarks/results/`` with the GPU name, torch, transformers and triton versions and the git commit.

    python benchmarks/bench_ff_kernels.py [--rank 256] [--batches 1 4 8] [--densities 0.3 0.5 0.7]
    python benchmarks/bench_ff_kernels.py --smoke   # tiny shapes on a CPU (Triton interpreter): proves it runs

Variants: ``dense`` the unmodified block; ``cats_torch`` ``cats_merged_ff`` (reads every weight, as the
torch decode branch does); ``cats_triton`` the op with no low-rank neurons (plain CATS); ``caprese_triton``
the op with the rank-r correction appended as always-active neurons; ``griffin_merged`` and
``caprese_griffin`` GRIFFIN's per-sequence pruned weights (r = 0 and r) as ``FastDecoder`` runs them
(``griffin_fused_ff``: two batched cuBLAS GEMVs). A Triton variant must read the whole gate matrix plus the up
and down rows of every neuron that at least one sequence of the batch keeps; a GRIFFIN variant reads its
``3k + 2r`` rows once per sequence.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    # the interpreter must be chosen before anything imports triton, and caprese_peft's imports do
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import RESULTS, copy_bandwidth_gbps, run_metadata, slug, time_ms  # noqa: E402
from caprese_peft.sparse_ff import cats_merged_ff, griffin_fused_ff, griffin_merged_weights  # noqa: E402

MODELS = {"llama-3.1-8b": (4096, 14336), "qwen2.5-14b": (5120, 13824)}  # (hidden D, intermediate F)
SMOKE_MODEL = {"smoke": (64, 176)}
BF16_BYTES = 2
# the op accumulates in fp32, cats_merged_ff in bf16; beyond this the kernel is wrong, not imprecise
MAX_RELATIVE_ERROR = 2e-2
# the GPU check's targets for one Llama-3.1-8B FF block at batch 1, density 0.5 (bf16, r = 256)
TARGETS = {  # variant: (minimum speedup vs dense, minimum fraction of copy bandwidth on its own bytes)
    "caprese_triton": (1.35, 0.8),
    "caprese_griffin": (1.8, None),
}


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target of the GPU check, met or not, from the rows at batch 1 and density 0.5."""
    lines = []
    for row in rows:
        if row["batch"] != 1 or row["density"] != 0.5 or row["variant"] not in TARGETS:
            continue
        speedup, fraction = TARGETS[row["variant"]]
        checks = [("speedup vs dense", row["speedup_vs_dense"], speedup)]
        if fraction is not None:
            checks.append(("fraction of copy bandwidth", row["fraction_of_copy_bw"], fraction))
        for what, value, target in checks:
            met = "met" if value >= target else "NOT met"
            lines.append(f"- {met}: {row['model']} {row['variant']} {what} = {value:.3f} (target >= {target})")
    return lines


def thresholds_for_density(gate_abs: torch.Tensor, density: float) -> torch.Tensor:
    """Per row of ``|act(x Wg^T)| (B, F)``, the value a ``density`` fraction of neurons exceeds; ``(B,)`` fp32."""
    return torch.quantile(gate_abs.float(), 1.0 - density, dim=-1)


def dense_ff(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """The unmodified gated MLP block, three cuBLAS GEMVs."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def cats_torch(x: torch.Tensor, threshold: torch.Tensor, weights) -> torch.Tensor:
    """``cats_merged_ff`` on one token per sequence: ``(B, D) -> (B, 1, D)``."""
    return cats_merged_ff(x[:, None], *weights.reference_args(), threshold.view(-1, 1, 1), F.silu)


def griffin_weights(gate_w, up_w, down_w, left, right, batch: int, density: float, seed: int):
    """``(gate_up (B, 2k + r, D), down (B, D, k + r), k)``: each sequence keeps its own random ``k`` neurons."""
    ff = gate_w.shape[0]
    k = max(1, round(density * ff))
    gen = torch.Generator().manual_seed(seed)
    keep_idx = torch.stack([torch.randperm(ff, generator=gen)[:k].sort().values for _ in range(batch)])
    merged = griffin_merged_weights(gate_w, up_w, down_w, left, right, keep_idx.to(gate_w.device))
    return torch.cat([merged.gate, merged.up], dim=1), merged.down, k


def bench_model(model: str, shape: tuple[int, int], args, meta: dict, copy_gbps: float, device: str) -> list[dict]:
    """Rows of the CSV for one FF shape; raises RuntimeError if the op disagrees with its reference."""
    from caprese_peft.kernels import cats_ff, prepare_cats_weights
    from caprese_peft.kernels.problems import ff_problem

    hidden, ff = shape
    rank = args.rank
    x_all, (gate_w, up_w, down_w, left, right) = ff_problem(
        max(args.batches), hidden, ff, rank, dtype=torch.bfloat16, device=device
    )
    caprese_w = prepare_cats_weights(gate_w, up_w, down_w, left, right)
    cats_w = prepare_cats_weights(gate_w, up_w, down_w, left[:, :0], right[:0])  # r = 0: CATS alone
    matrix_bytes = ff * hidden * BF16_BYTES
    timer = partial(time_ms, device=device, reps=args.reps)
    rows = []
    for batch in args.batches:
        x = x_all[:batch]
        io_bytes = 2 * batch * hidden * BF16_BYTES
        dense_ms = timer(partial(dense_ff, x, gate_w, up_w, down_w))
        gate_abs = F.silu(F.linear(x, gate_w)).float().abs()  # (B, F)
        for density in args.densities:
            threshold = thresholds_for_density(gate_abs, density)  # (B,)
            union = int((gate_abs > threshold[:, None]).any(dim=0).sum())  # neurons whose rows the op reads
            reference = cats_torch(x, threshold, caprese_w)[:, 0].float()
            got = cats_ff(x, caprese_w, threshold, "silu", use_kernels=True).float()
            error = ((got - reference).norm() / reference.norm()).item()
            if error > MAX_RELATIVE_ERROR:
                raise RuntimeError(
                    f"the Triton op disagrees with cats_merged_ff ({model}, B={batch}, density={density}): relative "
                    f"error {error:.3g} > {MAX_RELATIVE_ERROR}; not timing a wrong kernel."
                )
            griffin = griffin_weights(gate_w, up_w, down_w, left[:, :0], right[:0], batch, density, seed=batch)
            caprese_griffin = griffin_weights(gate_w, up_w, down_w, left, right, batch, density, seed=batch)
            k = griffin[2]
            xs = x[:, None]  # (B, 1, D)
            variants = {  # name: (call, bytes of weights it must read, rank)
                "dense": (None, 3 * matrix_bytes, 0),
                "cats_torch": (partial(cats_torch, x, threshold, caprese_w), 3 * matrix_bytes + 2 * hidden * rank * BF16_BYTES, rank),
                "cats_triton": (partial(cats_ff, x, cats_w, threshold, "silu", use_kernels=True), matrix_bytes + 2 * union * hidden * BF16_BYTES, 0),
                "caprese_triton": (partial(cats_ff, x, caprese_w, threshold, "silu", use_kernels=True), matrix_bytes + 2 * (union + rank) * hidden * BF16_BYTES, rank),
                "griffin_merged": (partial(griffin_fused_ff, xs, *griffin[:2], k, F.silu), batch * 3 * k * hidden * BF16_BYTES, 0),
                "caprese_griffin": (partial(griffin_fused_ff, xs, *caprese_griffin[:2], k, F.silu), batch * (3 * k + 2 * rank) * hidden * BF16_BYTES, rank),
            }  # fmt: skip
            for variant, (fn, weight_bytes, variant_rank) in variants.items():
                ms, ms_p20, ms_p80 = dense_ms if fn is None else timer(fn)
                nbytes = weight_bytes + io_bytes
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(
                    {
                        **meta,
                        "model": model,
                        "hidden": hidden,
                        "intermediate": ff,
                        "rank": variant_rank,
                        "batch": batch,
                        "density": density,
                        "union_density": round(union / ff, 4),
                        "variant": variant,
                        "ms_median": round(ms, 5),
                        "ms_p20": round(ms_p20, 5),
                        "ms_p80": round(ms_p80, 5),
                        "bytes_read": nbytes,
                        "gb_per_s": round(gbps, 1),
                        "copy_gb_per_s": round(copy_gbps, 1),
                        "fraction_of_copy_bw": round(gbps / copy_gbps, 3),
                        "speedup_vs_dense": round(dense_ms[0] / ms, 3),
                        "op_rel_error_vs_reference": round(error, 5),
                    }
                )
                print(
                    f"{model:<14}{batch:>3}{density:>6.2f}{union / ff:>7.2f}  {variant:<16}{ms:>9.4f}"
                    f"{gbps:>8.0f}{gbps / copy_gbps:>9.2f}{dense_ms[0] / ms:>9.2f}x"
                )
            del griffin, caprese_griffin
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--rank", type=int, default=256, help="rank r of the low-rank correction (config default)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per variant on a CPU (CUDA: do_bench)")
    parser.add_argument("--output", type=Path, default=None, help="CSV path (default: benchmarks/results/...)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on a CPU under the Triton interpreter: checks the script"
    )
    args = parser.parse_args(argv)

    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        models = SMOKE_MODEL
        args.batches, args.densities, args.rank, args.reps = [1, 2], [0.5], 8, 1
    else:
        if not torch.cuda.is_available():
            print(
                "bench_ff_kernels.py times CUDA kernels, but torch.cuda.is_available() is False on this machine "
                f"(torch {torch.__version__}). Run it on a machine with an NVIDIA GPU, or pass --smoke to check the "
                "script on a CPU.",
                file=sys.stderr,
            )
            return 2
        device, models = "cuda", {name: MODELS[name] for name in args.models}
    try:
        import caprese_peft.kernels  # noqa: F401
    except ImportError as error:
        print(f"bench_ff_kernels.py needs triton and the kernels package: {error}", file=sys.stderr)
        return 2
    from caprese_peft.kernels import INTERPRET, MAX_BATCH

    if device == "cpu" and not INTERPRET:
        print(
            "--smoke on a CPU runs the kernels in Triton's interpreter, but triton was imported before "
            "TRITON_INTERPRET=1 could be set; run the script as `TRITON_INTERPRET=1 python benchmarks/...`.",
            file=sys.stderr,
        )
        return 2
    if any(not 1 <= b <= MAX_BATCH for b in args.batches):
        parser.error(f"--batches must lie in 1..{MAX_BATCH} (one decode token per sequence), got {args.batches}")
    if any(not 0.0 < d <= 1.0 for d in args.densities) or args.rank < 1:
        parser.error(f"--densities must lie in (0, 1] and --rank be >= 1, got {args.densities} and {args.rank}")

    torch.manual_seed(0)
    meta = run_metadata(device)
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}")
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    print("the first Triton call of each shape and batch autotunes; that takes a while\n")
    print(
        f"{'model':<14}{'B':>3}{'dens':>6}{'union':>7}  {'variant':<16}{'ms':>9}{'GB/s':>8}{'of copy':>9}{'vs dense':>10}"
    )

    rows = []
    for model, shape in models.items():
        try:
            rows += bench_model(model, shape, args, meta, copy_gbps, device)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        if device == "cuda":
            torch.cuda.empty_cache()

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "smoke" if args.smoke else slug(meta["device"])
    output = args.output or RESULTS / f"ff_kernels_{name}_{time.strftime('%Y%m%d-%H%M%S')}.csv"
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {output}")
    print("\n".join(verdicts(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
