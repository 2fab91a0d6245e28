"""End-to-end decoding of SmolLM2-135M-Instruct on this CPU with FastDecoder: dense against Caprese, each at its best.

For dense, Caprese(CATS 0.5), Caprese(CATS 0.5) with the 4-bit stand-in of dropped neurons (``cats-int4``, forms
with the C++ ops only), Caprese(GRIFFIN 0.5) and the same with its 4-bit stand-in (``griffin-int4``) (all layers; a fresh adapter of ``--rank``: speed does not depend on
the values of L and R) and each batch size, FastDecoders are built in every form:

- ``torch``: the lean step on torch's own ops (MKL's GEMV), eager; ``torch-compiled``: the same under inductor;
- ``ops``: the C++ ops of ``caprese_peft.kernels.cpu_ff`` for every GEMV and FF block, eager; ``ops-compiled``: under
  inductor; ``ff-ops-compiled``: the ops for the FF blocks only; ``ops-cpp-wrapper``: ``ops-compiled`` with
  inductor's ``cpp_wrapper`` (C++ instead of Python between kernels);
- ``ops-blocks``: no compilation, each layer's attention and FF halves one C++ call each (``compile="blocks"``,
  FastDecoder's default on a CPU).

All are prefilled with the same GSM8K dev prompts; decode steps are timed in blocks of
``--block`` tokens, the blocks of every mode and form interleaved over ``--rounds`` rounds (so that a slower spell of
the machine hits every variant alike), each block waiting for an otherwise idle machine (TTNT: the median ms per
token); with ``--interleave step`` a round waits once, then every variant decodes one token in turn, ``--block``
times, so that the variants of a round are timed within a step of each other (on a shared machine whose speed drifts
within seconds, the tighter pairing); the variant that goes first, whose first step wakes the threads, changes from
round to round. Reported with the weight bytes a step reads, GB/s, the bytes floor at the
machine's read bandwidth (the best of sums over 512 MiB measured in the run) and whether the greedy tokens equal
the torch eager step's. Each mode's best form is compared with dense's best form. TTFT: FastDecoder's default form
of every mode prefills the same prompts in ``--ttft-rounds`` interleaved rounds (each prefill waiting for an
otherwise idle machine), the median per mode, so that a slower spell of the machine hits every mode alike; the
decode step right after each of those prefills is timed too (``first_step_ms``: it includes the work FastDecoder
defers past the first token, GRIFFIN's packing of its kept rows). ``generation_speed_up``: dense's time for a whole
``--tokens``-token generation (TTFT, first step, then TTNT per token) over the mode's.

    python benchmarks/cpu_decode.py [--batches 1 4] [--threads 2]

Output: benchmarks/results/cpu_decode.json (CPU model, threads, versions, commit) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
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
from benchmarks.bench_cpu import read_bandwidth_gbps, wait_quiet  # noqa: E402
from benchmarks.common import RESULTS, cpu_model, run_metadata  # noqa: E402
from caprese_peft import CapreseConfig, FastDecoder  # noqa: E402
from caprese_peft.data import chat_inputs, load_problems, user_message  # noqa: E402
from caprese_peft.kernels.cpu_ff import isa, load_extension  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
FORMS = {  # name: (FastDecoder options, the C++ GEMV for attention and the lm_head)
    "torch": (dict(compile="none", use_kernels=False), False),
    "torch-compiled": (dict(compile="default", use_kernels=False), False),
    "ops": (dict(compile="none"), True),
    "ops-compiled": (dict(compile="default"), True),
    # no compilation: two C++ calls per layer (attention_block, ff_block), FastDecoder's default on a CPU
    "ops-blocks": (dict(compile="blocks"), True),
    "ff-ops-compiled": (dict(compile="default"), False),
    # ops-compiled with inductor's C++ wrapper: no Python between the step's kernels, a much longer first compile
    "ops-cpp-wrapper": (
        dict(compile=lambda step: torch.compile(step, fullgraph=True, options={"cpp_wrapper": True})),
        True,
    ),
}
MODES = {  # name: adapter options (None: the base model)
    "dense": None,
    "cats": dict(backbone="cats", density=0.5),
    "cats-int4": dict(backbone="cats", density=0.5, stand_in_bits=4),
    "griffin": dict(backbone="griffin", density=0.5),
    "griffin-int4": dict(backbone="griffin", density=0.5, stand_in_bits=4),
}
OPS_ONLY = {"cats-int4", "griffin-int4"}  # the stand-in's fast path is the C++ op


def build_models(rank: int, modes: list[str]) -> tuple[dict, object]:
    """``{mode: (model, FastDecoder mode)}``: the base model and the Caprese adapters, each on its own copy."""
    base, tokenizer = caprese_peft.load_smollm2()
    models = {"dense": (base.eval(), "dense")}
    for mode in modes:
        if MODES[mode] is not None:
            copy, _ = caprese_peft.load_smollm2()
            models[mode] = (get_peft_model(copy, CapreseConfig(**MODES[mode], r=rank)).eval(), None)
    return models, tokenizer


def decoder(model, mode: str | None, form: str, max_seq_len: int) -> FastDecoder:
    options, cpu_gemv = FORMS[form]
    fast = FastDecoder(model, mode=mode, max_seq_len=max_seq_len, **options)
    fast._build(1, max_seq_len)  # the lean step, so that its GEMV choice can be set before anything compiles
    fast.lean.cpu_gemv = cpu_gemv and fast.cpu_ops
    for layer in fast.lean.layers:
        layer.attn.cpu_gemv = fast.lean.cpu_gemv
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=int, default=6, help="tokens per timed block")
    parser.add_argument(
        "--interleave",
        choices=["block", "step"],
        default="block",
        help="block: each variant decodes its block in turn; step: within a round every variant decodes one token "
        "in turn, --block times (the variants of a round timed within a step of each other)",
    )
    parser.add_argument("--ttft-rounds", type=int, default=15, help="interleaved prefills per mode for TTFT")
    parser.add_argument("--max-wait", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=256, help="generation length of generation_speed_up")
    parser.add_argument("--output", type=Path, default=RESULTS / "cpu_decode.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not load_extension():
        sys.exit("The C++ CPU ops could not be built; see the warning above.")
    models, tokenizer = build_models(args.rank, args.modes)
    problems = load_problems(args.data, split="dev", limit=max(args.batches))
    prompts = [user_message(p["question"]) for p in problems]
    bandwidth = [read_bandwidth_gbps(512)]
    rows, loads = [], []
    steps = 1 + args.rounds * args.block + 2
    first_token, first_step = {}, {}  # batch -> mode -> ms of the interleaved prefills, of the step after each
    for batch in args.batches:
        inputs, _ = chat_inputs(tokenizer, prompts[:batch], "cpu")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        max_seq_len = ids.shape[1] + steps + 1
        modes = ["dense", *(m for m in args.modes if m != "dense")]
        first_token[batch], first_step[batch] = interleaved_ttft(
            models, modes, ids, mask, args.ttft_rounds, args.max_wait, loads
        )
        print(
            json.dumps(
                {
                    "batch": batch,
                    "prompt_tokens": ids.shape[1],
                    "ttft_ms": first_token[batch],
                    "first_step_ms": first_step[batch],
                }
            ),
            flush=True,
        )
        # every (mode, form) built, then timed in interleaved blocks: a slower spell of the machine hits all alike
        variants = [
            (mode, form)
            for mode in args.modes
            for form in args.forms
            if mode not in OPS_ONLY or FORMS[form][0].get("use_kernels", True)
        ]
        decoders = {(m, f): decoder(models[m][0], models[m][1], f, max_seq_len) for m, f in variants}
        tokens, generated, ttft = {}, {v: [] for v in variants}, {v: [] for v in variants}
        times = {v: [] for v in variants}
        with torch.no_grad():
            for variant, fast in decoders.items():
                for _ in range(3):  # TTFT: the median of three prefills, the first also warming up
                    loads.append(wait_quiet(args.max_wait))
                    start = time.perf_counter()
                    tokens[variant] = fast.prefill(ids, mask).argmax(-1)
                    ttft[variant].append(time.perf_counter() - start)
                tokens[variant] = fast.decode_greedy(tokens[variant])  # warm-up, and the compile
                generated[variant].append(tokens[variant])
            for index in range(args.rounds):
                if args.interleave == "step":
                    loads.append(wait_quiet(args.max_wait))
                    spent = dict.fromkeys(decoders, 0.0)
                    # the first step after the wait also wakes the threads: each variant goes first in turn
                    shift, items = index % len(decoders), list(decoders.items())
                    order = items[shift:] + items[:shift]
                    for _ in range(args.block):
                        for variant, fast in order:
                            start = time.perf_counter()
                            tokens[variant] = fast.decode_greedy(tokens[variant]).clone()
                            spent[variant] += time.perf_counter() - start
                            generated[variant].append(tokens[variant])
                    for variant in decoders:
                        times[variant].append(spent[variant] / args.block)
                    continue
                for variant, fast in decoders.items():
                    loads.append(wait_quiet(args.max_wait))
                    start = time.perf_counter()
                    for _ in range(args.block):
                        tokens[variant] = fast.decode_greedy(tokens[variant])
                        generated[variant].append(tokens[variant])
                    tokens[variant] = tokens[variant].clone()
                    times[variant].append((time.perf_counter() - start) / args.block)
        bandwidth.append(read_bandwidth_gbps(512))
        best_bandwidth = max(bandwidth)  # other processes only ever lower a measurement
        for (mode, form), fast in decoders.items():
            first_form = next(f for m, f in variants if m == mode)  # the reference of the mode's token check
            reference = torch.stack(generated[(mode, first_form)], 1)
            ms = statistics.median(times[(mode, form)]) * 1e3
            weight_bytes = fast.lean.weight_bytes()
            floor = weight_bytes / (best_bandwidth * 1e9) * 1e3
            row = {
                "mode": mode,
                "batch": batch,
                "form": form,
                "ttft_ms": round(statistics.median(ttft[(mode, form)]) * 1e3, 1),
                "ttnt_ms": round(ms, 2),
                "ttnt_ms_min": round(min(times[(mode, form)]) * 1e3, 2),
                "block_ms": [round(t * 1e3, 2) for t in times[(mode, form)]],  # ms per token of each block, in order
                "weight_mb": round(weight_bytes / 1e6, 1),
                "gb_per_s": round(weight_bytes / ms / 1e6, 1),
                "floor_ms": round(floor, 2),
                "x_floor": round(ms / floor, 2),
                f"rows_identical_to_{first_form}": torch.stack(generated[(mode, form)], 1)
                .eq(reference)
                .all(1)
                .float()
                .mean()
                .item(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del decoders
    summary = summarize(rows, args.batches, first_token, first_step, args.tokens)
    result = {
        **run_metadata("cpu"),
        "cpu_model": cpu_model(),
        "isa": isa(),
        "threads": torch.get_num_threads(),
        "read_bandwidth_gbps": [round(b, 1) for b in bandwidth],
        "others_load_cpus": {"median": round(statistics.median(loads), 2), "max": round(max(loads), 2)},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(summary["lines"]))
    print(f"-> {args.output}")


def interleaved_ttft(
    models: dict, modes: list[str], ids: torch.Tensor, mask: torch.Tensor, rounds: int, max_wait: float, loads: list
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of FastDecoder's prefill (its default form) per mode, and of the decode step right after it, over
    ``rounds`` rounds that visit every mode in turn: the first round of each mode warms it up (and compiles its step)
    and is not counted."""
    decoders = {mode: FastDecoder(models[mode][0], mode=models[mode][1]) for mode in modes}
    prefill, step = {mode: [] for mode in modes}, {mode: [] for mode in modes}
    with torch.no_grad():
        for fast in decoders.values():
            fast.decode_greedy(fast.prefill(ids, mask, max_new_tokens=2).argmax(-1))
        for _ in range(rounds):
            for mode, fast in decoders.items():
                loads.append(wait_quiet(max_wait))
                start = time.perf_counter()
                tokens = fast.prefill(ids, mask, max_new_tokens=2).argmax(-1)
                middle = time.perf_counter()
                fast.decode_greedy(tokens)
                prefill[mode].append(middle - start)
                step[mode].append(time.perf_counter() - middle)
    median = lambda times: {mode: round(statistics.median(t) * 1e3, 1) for mode, t in times.items()}  # noqa: E731
    return median(prefill), median(step)


def summarize(
    rows: list[dict], batches: list[int], ttft: dict[int, dict[str, float]], first_step: dict, tokens: int
) -> dict:
    """Each mode's best form against dense's best form, per batch size: TTNT, speed-up; TTFT and the first decode
    step from the interleaved prefills of every mode's default form; the speed-up of a whole ``tokens``-token
    generation. ``round_speed_ups``: the quartiles of dense's block over the mode's block of the same round (the two
    timed within a second or two of each other), which a slow spell spanning rounds does not move."""
    best, lines = {}, []
    for batch in batches:
        for mode in MODES:
            candidates = [r for r in rows if r["mode"] == mode and r["batch"] == batch]
            if candidates:
                best[(mode, batch)] = min(candidates, key=lambda r: r["ttnt_ms"])
        dense = best.get(("dense", batch))
        for mode in MODES:
            row = best.get((mode, batch))
            if row is None or dense is None:
                continue
            first, first_dense = ttft[batch][mode], ttft[batch]["dense"]
            step, step_dense = first_step[batch][mode], first_step[batch]["dense"]
            whole = first + step + (tokens - 2) * row["ttnt_ms"]
            whole_dense = first_dense + step_dense + (tokens - 2) * dense["ttnt_ms"]
            row["generation_speed_up"] = round(whole_dense / whole, 3)
            paired = [d / m for d, m in zip(dense["block_ms"], row["block_ms"])]
            row["round_speed_ups"] = [round(q, 3) for q in statistics.quantiles(paired, n=4)]
            lines.append(
                f"batch {batch} {mode:<12} best {row['form']:<16} TTNT {row['ttnt_ms']:6.2f} ms ({row['x_floor']:.2f}x floor)"
                f"  speed-up {dense['ttnt_ms'] / row['ttnt_ms']:.3f}x  TTFT {first:.1f} ms ({first / first_dense:.3f}x dense)"
                f"  first step {step:.1f} ms  {tokens} tokens {whole_dense / whole:.3f}x"
                f"  per round {row['round_speed_ups'][1]:.3f}x ({row['round_speed_ups'][0]:.3f}-{row['round_speed_ups'][2]:.3f})"
            )
    return {
        "best": {f"{m} batch {b}": r for (m, b), r in best.items()},
        "ttft_ms": {f"batch {b}": t for b, t in ttft.items()},
        "first_step_ms": {f"batch {b}": t for b, t in first_step.items()},
        "generation_tokens": tokens,
        "lines": lines,
    }


if __name__ == "__main__":
    main()
