"""What a Caprese adapter adds to a prefill, on the same weights: the plain model against the same model wrapped.

SmolLM2-135M, batch 1, random prompts of ``--lengths`` tokens. Each round times the plain model, then wraps it with
Caprese(CATS 0.5) and Caprese(GRIFFIN 0.5), each with and without the 4-bit stand-in, in turn (all layers, rank 64;
one warm-up forward, then two timed ones;
GRIFFIN's wrapper also with its adapter disabled) and unwraps it again, so every variant reads the very same weight
memory: copies of a model can differ by a few percent in speed by where their pages lie. Medians over ``--rounds``.

    python benchmarks/prefill_overhead.py [--lengths 100 500 2000] [--rounds 6] [--threads 2]

Output: benchmarks/results/prefill_overhead.json (CPU model, threads, versions, commit) and a line per length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import caprese_peft  # noqa: E402
from benchmarks.common import RESULTS, cpu_run_metadata, write_result  # noqa: E402
from caprese_peft import CapreseConfig  # noqa: E402

VARIANTS = {  # name: adapter options besides density 0.5 and rank 64
    "cats": dict(backbone="cats"),
    "cats-int4": dict(backbone="cats", stand_in_bits=4),
    "griffin": dict(backbone="griffin"),
    "griffin-int4": dict(backbone="griffin", stand_in_bits=4),
}


@torch.no_grad()
def measure(base, length: int, rounds: int) -> dict:
    ids = torch.randint(0, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))

    def timed(model) -> float:
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        return time.perf_counter() - start

    times = {"dense": [], **{name: [] for name in VARIANTS}, "griffin disabled": []}
    timed(base)
    for _ in range(rounds):
        times["dense"].append(timed(base))
        for name, options in VARIANTS.items():
            model = get_peft_model(base, CapreseConfig(density=0.5, r=64, **options)).eval()
            timed(model)  # warm-up
            times[name] += [timed(model), timed(model)]
            if name == "griffin":
                with model.disable_adapter():
                    times["griffin disabled"] += [timed(model), timed(model)]
            model.unload()
            times["dense"].append(timed(base))
    dense = statistics.median(times["dense"])
    return {
        name: {"ms": round(statistics.median(t) * 1e3, 1), "vs_dense": round(statistics.median(t) / dense, 3)}
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "prefill_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = caprese_peft.load_smollm2()
    base.eval()
    results = {}
    for length in args.lengths:
        results[str(length)] = measure(base, length, args.rounds)
        print(
            f"prompt {length:>5}: "
            + "  ".join(f"{k} {v['ms']} ms ({v['vs_dense']:.3f}x)" for k, v in results[str(length)].items()),
            flush=True,
        )
    result = {
        **cpu_run_metadata(args),
        "results": results,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
