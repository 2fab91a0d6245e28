"""Decode-time cost of one FF block on the CPU: each variant against dense, in one process, interleaved.

For the FF shapes of SmolLM2-135M (D=576, F=1536), Qwen2.5-0.5B (D=896, F=4864) and Llama-3.2-1B (D=2048,
F=8192), random weights of many layers are held and each call takes the next layer's (a rotation of at least
``--rotation-gib`` of dense weights, default 1 GiB), so no variant is flattered by a cache
holding its weights (a 1 GiB rotation is 101 SmolLM2 layers, 6 of Llama-3.2-1B). Every timed round runs one variant once over all layers of the rotation; rounds of all
variants are interleaved and repeated, and the median per call is reported with the bytes the variant must
read, GB/s and the fraction of the machine's read bandwidth (a sum over ``--bandwidth-mib`` MiB, measured in
the same run). Other processes on the machine make the numbers noisy: before each round the script waits (up
to a few seconds) for the CPUs to be otherwise idle, and records how busy they were.

    python benchmarks/bench_cpu.py                                   # 2 threads, fp32, batch 1 and 4
    python benchmarks/bench_cpu.py --dtypes float32 bfloat16 --batches 1 4 8 --rank 64
    python benchmarks/bench_cpu.py --smoke                           # tiny shapes: proves it runs

Variants (``r`` low-rank neurons where named ``caprese``):
``dense_torch``       F.linear on gate|up fused, then down, as ``fast_decode.lean.DenseFF`` runs it (eager);
``dense_compiled``    the same under ``torch.compile`` (inductor) where ``--compile`` is given;
``dense_op``          ``caprese_cpu::gated_ff`` with every neuron kept (one pass: gate, up, down^T rows; the lean
                      step on a CPU), each neuron's up and down rows side by side (``CatsFFWeights.pair``);
``dense_linear_op``   ``caprese_cpu::linear`` for gate|up and for down (two GEMVs, the torch layout);
``griffin_merged``    Caprese(GRIFFIN) on per-sequence pruned copies (``griffin_fused_ff``, the lean step on a GPU);
``griffin_union_op``  Caprese(GRIFFIN) through ``caprese_cpu::gated_ff`` with each sequence's keep mask: the rows of
                      the union of the sequences' neurons, read in place (the lean step on a CPU);
``cats_torch``        Caprese(CATS) ``cats_merged_ff``: every neuron computed, then masked (the torch reference);
``cats_gather``       Caprese(CATS) in torch reading active rows only: index_select, then GEMVs on the copies;
``cats_op``           Caprese(CATS) through ``caprese_cpu::gated_ff`` with the threshold (the lean step on a CPU);
``*_op_separate``     ``dense_op``, ``griffin_union_op`` and ``cats_op`` on up and down rows held apart
                      (``prepare_cats_weights(..., interleave=False)``: ``W1`` in place, ``W2^T`` copied).
Every ``*_op`` variant calls ``torch.ops.caprese_cpu.gated_ff`` itself, as the compiled lean step does: through
the eager wrappers (``cats_ff_cpu``, ``griffin_ff_cpu``) a call on this machine took 30-40 us more at batch 4, of
which their checks account for 6 us.
CATS thresholds keep half the neurons of each sequence; GRIFFIN sequences each keep a random half of the
neurons, with ``--griffin-overlap`` of them shared by all sequences (prompts of one batch select similar
neurons). At batch > 1 the sparse ops read the union, reported as ``union``.

Output: benchmarks/results/bench_cpu.json (rows, with CPU model, threads, versions, commit, the bandwidth and
how busy the machine was) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_model, run_metadata  # noqa: E402
from caprese_peft.kernels import prepare_cats_weights  # noqa: E402
from caprese_peft.kernels.cpu_ff import isa, load_extension, prepare_dense_weights  # noqa: E402
from caprese_peft.sparse_ff import cats_merged_ff, griffin_fused_ff, griffin_merged_weights, keep_indices  # noqa: E402

SHAPES = {  # name: (hidden, intermediate, layers)
    "SmolLM2-135M": (576, 1536, 30),
    "Qwen2.5-0.5B": (896, 4864, 24),
    "Llama-3.2-1B": (2048, 8192, 16),
}
SMOKE_SHAPES = {"smoke": (72, 200, 3)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- the machine ----


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _own_ticks() -> int:
    parts = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime + stime


def others_load(window: float = 0.2) -> float:
    """CPUs' worth of work done by other processes during ``window`` seconds (0 = idle machine)."""
    try:
        busy0, total0 = _cpu_ticks()
        own0 = _own_ticks()
        time.sleep(window)
        busy1, total1 = _cpu_ticks()
        own1 = _own_ticks()
    except (OSError, IndexError, ValueError):
        return 0.0
    n_cpus = os.cpu_count() or 1
    total = max(total1 - total0, 1)
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / total * n_cpus


def wait_quiet(max_wait: float, limit: float = 0.25) -> float:
    """Wait up to ``max_wait`` s for other processes to use under ``limit`` CPUs; returns the last load seen."""
    deadline = time.perf_counter() + max_wait
    load = others_load()
    while load > limit and time.perf_counter() < deadline:
        time.sleep(0.5)
        load = others_load()
    return load


def read_bandwidth_gbps(mib: int, reps: int = 7) -> float:
    """GB/s of ``torch.sum`` over ``mib`` MiB of fp32: the machine's read bandwidth.

    The best of ``reps``: other processes only ever lower it, and this is the ceiling the variants are held to.
    """
    data = torch.rand(mib * 2**20 // 4)
    data.sum()
    times = []
    for _ in range(reps):
        wait_quiet(1.0)
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.nbytes / min(times) / 1e9


# ---- problems ----


def cats_thresholds(x: torch.Tensor, gate: torch.Tensor, density: float) -> torch.Tensor:
    """Per sequence, the threshold that keeps ``density`` of the neurons (as CATS calibrates it)."""
    act = F.silu(x.float() @ gate.float().T).abs()  # (B, F)
    k = max(1, round(density * gate.shape[0]))
    return act.topk(k, dim=-1).values[:, -1] - 1e-12  # keep the top k


def griffin_keep(batch: int, ff: int, density: float, overlap: float, gen: torch.Generator) -> torch.Tensor:
    """``(B, F)`` bool, ``round(density F)`` per row: ``overlap`` of them common to all rows, the rest random."""
    kept = round(density * ff)
    shared = round(overlap * kept)
    order = torch.randperm(ff, generator=gen)
    common, rest = order[:shared], order[shared:]
    keep = torch.zeros(batch, ff, dtype=torch.bool)
    for row in keep:
        row[common] = True
        row[rest[torch.randperm(len(rest), generator=gen)[: kept - shared]]] = True
    return keep


class Layer:
    """One layer's weights in every layout the variants need."""

    def __init__(self, hidden: int, ff: int, rank: int, dtype: torch.dtype, gen: torch.Generator) -> None:
        def randn(*shape: int, scale: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) * scale).to(dtype)

        gate, up = randn(ff, hidden, scale=hidden**-0.5), randn(ff, hidden, scale=hidden**-0.5)
        down = randn(hidden, ff, scale=ff**-0.5)
        self.left, self.right = randn(hidden, rank, scale=hidden**-0.5), randn(rank, hidden, scale=0.1)
        self.gate_up = torch.cat([gate, up])  # (2F, D): DenseFF's fused weight
        self.down = down  # (D, F)
        self.cats = prepare_cats_weights(gate, up, down, self.left, self.right)  # neuron-major, + r
        self.dense = prepare_dense_weights(gate, up, down)  # the same without the r
        self.cats_separate = prepare_cats_weights(gate, up, down, self.left, self.right, interleave=False)
        self.dense_separate = prepare_cats_weights(gate, up, down, self.left[:, :0], self.right[:0], interleave=False)
        self.ff = ff
        self.keep = None
        self.griffin_merged = None

    def load_griffin(self, keep: torch.Tensor) -> None:
        self.keep = keep
        self.keep_mask = keep.to(torch.uint8)  # as the op takes it
        args = (self.cats.gate, self.cats.up, self.down, self.left, self.right)
        merged = griffin_merged_weights(*args, keep_indices(keep))
        self.griffin_merged = (torch.cat([merged.gate, merged.up], dim=1).contiguous(), merged.down.contiguous())


def variants(layers: list[Layer], x: torch.Tensor, thresholds: torch.Tensor, compile_: bool) -> dict[str, Callable]:
    """Each variant as a function running one call per layer of the rotation."""
    ff = layers[0].ff
    k = round(0.5 * ff)
    ops = torch.ops.caprese_cpu

    def dense_step(h, gate_up, down):
        gate, up = F.linear(h, gate_up).split(ff, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    def run(fn):
        def go():
            for layer in layers:
                fn(layer)

        return go

    def cats_gather(layer: Layer):
        w = layer.cats
        g = F.silu(x @ w.gate.T)  # (B, F)
        keep = g.abs() > thresholds[:, None]
        idx = keep.any(0).nonzero()[:, 0]
        h = (x @ w.up.index_select(0, idx).T) * (g * keep)[:, idx]
        return h @ w.down_t.index_select(0, idx) + (x @ w.low_up.T) @ w.low_down

    out = {
        "dense_torch": run(lambda layer: dense_step(x, layer.gate_up, layer.down)),
        "dense_op": run(lambda layer: ops.gated_ff(x, *layer.dense.op_args(), None, None, "silu")),
        "dense_linear_op": run(lambda layer: _dense_linear_op(x, layer, ff)),
        "griffin_merged": run(
            lambda layer: griffin_fused_ff(x[:, None], layer.griffin_merged[0], layer.griffin_merged[1], k, F.silu)
        ),
        "griffin_union_op": run(lambda layer: ops.gated_ff(x, *layer.cats.op_args(), None, layer.keep_mask, "silu")),
        "cats_torch": run(
            lambda layer: cats_merged_ff(x[:, None], *layer.cats.reference_args(), thresholds.view(-1, 1, 1), F.silu)
        ),
        "cats_gather": run(cats_gather),
        "cats_op": run(lambda layer: ops.gated_ff(x, *layer.cats.op_args(), thresholds, None, "silu")),
        "dense_op_separate": run(lambda layer: ops.gated_ff(x, *layer.dense_separate.op_args(), None, None, "silu")),
        "griffin_union_op_separate": run(
            lambda layer: ops.gated_ff(x, *layer.cats_separate.op_args(), None, layer.keep_mask, "silu")
        ),
        "cats_op_separate": run(
            lambda layer: ops.gated_ff(x, *layer.cats_separate.op_args(), thresholds, None, "silu")
        ),
    }
    if compile_:
        compiled = torch.compile(dense_step, fullgraph=True, dynamic=False)
        out["dense_compiled"] = run(lambda layer: compiled(x, layer.gate_up, layer.down))
    return out


def _dense_linear_op(x: torch.Tensor, layer: Layer, ff: int) -> torch.Tensor:
    ops = torch.ops.caprese_cpu
    gate, up = ops.linear(x, layer.gate_up).split(ff, dim=-1)
    return ops.linear(F.silu(gate) * up, layer.down)


def bytes_read(name: str, layer: Layer, union_cats: float, batch: int) -> int:
    """Weight bytes one call of variant ``name`` must read (the floor of its memory traffic)."""
    w = layer.cats
    item = w.gate.element_size()
    hidden, ff, rank = w.gate.shape[1], layer.ff, w.rank
    dense = 3 * ff * hidden * item
    if name.startswith("dense"):
        return dense
    if name == "griffin_merged":
        return sum(t.nbytes for t in layer.griffin_merged)
    if name.startswith("griffin_union_op"):
        union = int(layer.keep.any(0).sum())
        return 3 * union * hidden * item + 2 * rank * hidden * item
    if name == "cats_torch":
        return dense + 2 * rank * hidden * item
    # cats_op and cats_gather: every gate row, then up and down rows of the union of active neurons and the r
    return ff * hidden * item + round(2 * (union_cats * ff + rank) * hidden * item)


def measure(fns: dict[str, Callable], rounds: int, max_wait: float) -> tuple[dict[str, float], list[float]]:
    """Median seconds per round of each variant, rounds interleaved in a fresh random order; loads seen."""
    for fn in fns.values():
        fn()  # warm-up: first-use builds, compiles, allocator
    times: dict[str, list[float]] = {name: [] for name in fns}
    loads = []
    order = list(fns)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            loads.append(wait_quiet(max_wait))
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rotation-gib", type=float, default=1.0)
    parser.add_argument("--bandwidth-mib", type=int, default=512)
    parser.add_argument("--griffin-overlap", type=float, default=0.7)
    parser.add_argument("--max-wait", type=float, default=5.0, help="seconds to wait for an idle machine per round")
    parser.add_argument("--compile", action="store_true", help="also time dense_compiled (inductor)")
    parser.add_argument("--variants", nargs="*", default=None, help="only these variants (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few rounds: proves the script runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not load_extension():
        sys.exit("The C++ CPU ops could not be built; see the warning above.")
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    if args.smoke:
        args.rounds, args.rotation_gib, args.bandwidth_mib, args.max_wait = 2, 0.001, 16, 0.0
    gen = torch.Generator().manual_seed(0)
    random.seed(0)
    bandwidths = [read_bandwidth_gbps(args.bandwidth_mib)]
    rows, all_loads = [], []
    for shape, (hidden, ff, _) in shapes.items():  # the rotation is sized in bytes, not by the layer count
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            layer_bytes = 3 * hidden * ff * dtype.itemsize
            # enough layers for --rotation-gib of dense weights (twice the L3 this VM reports at the default)
            n_rot = max(4, math.ceil(args.rotation_gib * 2**30 / layer_bytes))
            layers = [Layer(hidden, ff, args.rank, dtype, gen) for _ in range(n_rot)]
            for batch in args.batches:
                x = torch.randn(batch, hidden, generator=gen).to(dtype)
                thresholds = cats_thresholds(x, layers[0].cats.gate, 0.5)
                union_cats = float(
                    (F.silu(x.float() @ layers[0].cats.gate.float().T).abs() > thresholds[:, None])
                    .any(0)
                    .float()
                    .mean()
                )
                keep = griffin_keep(batch, ff, 0.5, args.griffin_overlap, gen)
                for layer in layers:
                    layer.load_griffin(keep)
                fns = variants(layers, x, thresholds, args.compile)
                if args.variants:
                    fns = {k: v for k, v in fns.items() if k in args.variants or k == "dense_torch"}
                with torch.no_grad():
                    seconds, loads = measure(fns, args.rounds, args.max_wait)
                all_loads += loads
                bandwidths.append(read_bandwidth_gbps(args.bandwidth_mib))
                bw = max(bandwidths)
                dense_us = seconds["dense_torch"][0] / n_rot * 1e6
                for name, (s, s_min) in seconds.items():
                    us = s / n_rot * 1e6
                    nbytes = bytes_read(name, layers[0], union_cats, batch)
                    row = {
                        "shape": shape,
                        "hidden": hidden,
                        "ff": ff,
                        "rank": args.rank,
                        "dtype": dtype_name,
                        "batch": batch,
                        "variant": name,
                        "us": round(us, 1),
                        "us_min": round(s_min / n_rot * 1e6, 1),
                        "speedup_vs_dense_torch": round(dense_us / us, 2),
                        "mb_read": round(nbytes / 1e6, 2),
                        "gbps": round(nbytes / (us * 1e-6) / 1e9, 1),
                        "gbps_best": round(nbytes / (s_min / n_rot) / 1e9, 1),
                        "fraction_of_bandwidth": round(nbytes / (us * 1e-6) / 1e9 / bw, 2),
                        "union_cats": round(union_cats, 3) if name.startswith("cats") else None,
                        "union_griffin": round(int(layers[0].keep.any(0).sum()) / ff, 3)
                        if name.startswith("griffin")
                        else None,
                        "layers_in_rotation": n_rot,
                    }
                    rows.append(row)
                    print(
                        f"{shape:13s} {dtype_name:8s} B={batch} {name:17s} {row['us']:9.1f} us  "
                        f"x{row['speedup_vs_dense_torch']:<5} {row['mb_read']:7.2f} MB {row['gbps']:6.1f} GB/s "
                        f"({row['fraction_of_bandwidth']:.2f} of {bw:.1f})",
                        flush=True,
                    )
            del layers
    result = {
        **run_metadata("cpu"),
        "cpu_model": cpu_model(),
        "isa": isa(),
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbps": [round(b, 1) for b in bandwidths],
        "read_bandwidth_mib": args.bandwidth_mib,
        "others_load_cpus": {
            "median": round(statistics.median(all_loads), 2),
            "max": round(max(all_loads), 2),
            "share_of_rounds_above_0.25": round(sum(v > 0.25 for v in all_loads) / len(all_loads), 2),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"read bandwidth {[round(b, 1) for b in bandwidths]} GB/s; others' load {result['others_load_cpus']}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
