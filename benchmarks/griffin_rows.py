"""How fast ``caprese_cpu::gated_ff`` reads GRIFFIN's kept rows in place, by how they cluster: batch 1, SmolLM2 shape.

GRIFFIN keeps half the neurons of a block, scattered: the op reads each kept neuron's gate, up and down rows where
they lie. This keeps half the neurons in runs of 1, 2, 3, 8 and 32 adjacent ones (rank 64 low-rank rows too) and
times the op against every neuron kept (dense), 60 layers of random weights in rotation (640 MB: no cache holds
them), rounds interleaved, medians. A run of 3 is what one contiguous (gate, up, down) record per neuron would
give; the gap between runs of 1 and dense is what reading in place costs over reading everything. ``packed`` is
FastDecoder's layout: the runs-of-1 half's rows gathered into contiguous buffers (``GriffinFF.pack``), all kept.

    python benchmarks/griffin_rows.py [--threads 2] [--rounds 7]

Output: benchmarks/results/griffin_rows.json (CPU model, threads, versions, commit) and a table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_run_metadata, write_result  # noqa: E402
from caprese_peft.kernels import prepare_cats_weights  # noqa: E402
from caprese_peft.kernels.cpu_ff import load_extension  # noqa: E402

HIDDEN, FF, RANK = 576, 1536, 64


def keep_in_runs(run: int, seed: int) -> torch.Tensor:
    """``(1, FF)`` uint8: half the neurons kept, in runs of ``run`` adjacent ones at random places."""
    blocks = FF // run
    chosen = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))[: blocks // 2]
    keep = torch.zeros(blocks, run, dtype=torch.uint8)
    keep[chosen] = 1
    return keep.reshape(1, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--output", type=Path, default=RESULTS / "griffin_rows.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not load_extension():
        sys.exit("The C++ CPU ops could not be built; see the warning above.")
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(args.layers):
        gate, up, down = (torch.randn(*shape, generator=gen) * 0.05 for shape in ((FF, HIDDEN),) * 2 + ((HIDDEN, FF),))
        left, right = torch.randn(HIDDEN, RANK, generator=gen) * 0.05, torch.randn(RANK, HIDDEN, generator=gen) * 0.05
        layers.append(prepare_cats_weights(gate, up, down, left, right).op_args())
    x = torch.randn(1, HIDDEN, generator=gen)
    masks = {f"runs of {run}": keep_in_runs(run, seed=run) for run in (1, 2, 3, 8, 32)}
    masks["dense"] = None
    # FastDecoder's layout: the scattered half's rows gathered in neuron order (GriffinFF.pack), all kept
    scattered = masks["runs of 1"][0].nonzero()[:, 0]
    packed_layers = [
        (gate[scattered], up[scattered], low_up, down_t[scattered], low_down)
        for gate, up, low_up, down_t, low_down in layers
    ]
    masks["packed"] = torch.ones(1, scattered.numel(), dtype=torch.uint8)
    times = {name: [] for name in masks}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, keep in masks.items():
                start = time.perf_counter()
                for weights in packed_layers if name == "packed" else layers:
                    torch.ops.caprese_cpu.gated_ff(x, *weights, None, keep, "silu")
                times[name].append((time.perf_counter() - start) / args.layers)
    rows = []
    for name, keep in masks.items():
        us = statistics.median(times[name][1:]) * 1e6
        kept = FF if keep is None else int(keep.sum())
        weight_bytes = 4 * (3 * HIDDEN * kept + 2 * RANK * HIDDEN)
        rows.append(
            {
                "keep": name,
                "us": round(us, 1),
                "mb": round(weight_bytes / 1e6, 2),
                "gb_per_s": round(weight_bytes / us / 1e3, 1),
            }
        )
        print(f"{name:<11} {us:7.1f} us  {weight_bytes / 1e6:5.2f} MB  {weight_bytes / us / 1e3:5.1f} GB/s")
    result = {
        **cpu_run_metadata(args),
        "rows": rows,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
