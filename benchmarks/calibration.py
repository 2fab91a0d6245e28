"""What calibrating a backbone on the prompt costs, and what sampling the CATS threshold changes, on SmolLM2.

Prefill (time to first token) of the dense model, CATS 0.5 and GRIFFIN 0.5 on every layer, at prompt lengths 100,
500 and 2000 tokens, batch 1: each variant timed in turn, repeatedly, in one process (medians), with the CATS
threshold sampled (the default) and exact (``threshold_sample=None``, how it was computed before). Then, on GSM8K
dev prompts: how far the sampled threshold of each layer lies from the exact one, which share of each prompt's
gate values it keeps, and whether greedy CATS decoding gives the same tokens with either threshold.

    python benchmarks/calibration.py [--threads 2] [--problems 32] [--new-tokens 64]

Output: benchmarks/results/calibration.json (with CPU, threads, versions and commit) and a summary on stdout.
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
from benchmarks.common import RESULTS, run_metadata  # noqa: E402
from caprese_peft import CapreseConfig  # noqa: E402
from caprese_peft.backbones.cats import cats_thresholds  # noqa: E402
from caprese_peft.data import chat_inputs, load_problems, user_message  # noqa: E402
from caprese_peft.layer import caprese_layers  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
DENSITY = 0.5


def set_sample(model, sample: int | None) -> None:
    for layer in caprese_layers(model):
        layer.caprese_backbone["default"].threshold_sample = sample


@torch.no_grad()
def prefill_times(base, lengths: list[int], repeats: int) -> dict:
    """Median prefill ms per variant and prompt length; the variants take turns, so drift hits all alike."""
    variants = {"dense": None, "cats": "cats", "cats-exact": "cats", "griffin": "griffin"}
    # one wrapper at a time holds the blocks: each variant is wrapped around the same base in its turn
    results = {}
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, 49000, (1, length), generator=generator)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, backbone in variants.items():
                if backbone is None:
                    model = base
                else:
                    model = get_peft_model(base, CapreseConfig(backbone=backbone, density=DENSITY, r=64)).eval()
                    if name == "cats-exact":
                        set_sample(model, None)
                model(input_ids=ids, logits_to_keep=1)  # warm-up
                start = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                times[name].append((time.perf_counter() - start) * 1e3)
                if backbone is not None:
                    model.unload()
        dense = statistics.median(times["dense"])
        results[str(length)] = {
            name: {"ms": round(statistics.median(t), 2), "vs_dense": round(statistics.median(t) / dense - 1, 4)}
            for name, t in times.items()
        }
        print(
            f"prompt {length:>5}: "
            + "  ".join(f"{n} {r['ms']:.0f} ms ({r['vs_dense']:+.1%})" for n, r in results[str(length)].items()),
            flush=True,
        )
    return results


@torch.no_grad()
def threshold_error(model, tokenizer, prompts: list) -> dict:
    """Per layer and prompt, the sampled threshold against the exact one, and the share of values each keeps."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.base_layer.act_fn.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
        for layer in caprese_layers(model)
    ]
    relative, kept_sampled, kept_exact = [], [], []
    try:
        for prompt in prompts:
            captured.clear()
            inputs, _ = chat_inputs(tokenizer, [prompt], "cpu")
            with model.disable_adapter():
                model(**inputs, logits_to_keep=1)
            for gate in captured:  # (1, P, F): the gate activations of one layer
                mask = torch.ones(gate.shape[:2], dtype=torch.bool)
                sampled = cats_thresholds(gate, mask, DENSITY).item()
                exact = cats_thresholds(gate, mask, DENSITY, sample=None).item()
                relative.append(abs(sampled - exact) / exact)
                kept_sampled.append((gate.abs() > sampled).float().mean().item())
                kept_exact.append((gate.abs() > exact).float().mean().item())
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "thresholds": len(relative),
        "relative_difference_median": statistics.median(relative),
        "relative_difference_max": max(relative),
        "kept_share_sampled_mean": statistics.fmean(kept_sampled),
        "kept_share_sampled_abs_error_max": max(abs(k - DENSITY) for k in kept_sampled),
        "kept_share_exact_mean": statistics.fmean(kept_exact),
    }


@torch.no_grad()
def token_agreement(model, tokenizer, prompts: list, new_tokens: int) -> dict:
    """Greedy CATS tokens with the sampled and the exact threshold: identical responses and agreement lengths."""
    outputs = {}
    for name, sample in (("sampled", caprese_peft.backbones.cats.THRESHOLD_SAMPLE), ("exact", None)):
        set_sample(model, sample)
        rows = []
        for prompt in prompts:  # one at a time: batching moves CATS tokens by itself (benchmarks/cats_rounding.py)
            inputs, pad = chat_inputs(tokenizer, [prompt], "cpu")
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            rows.append(out[0, inputs["input_ids"].shape[1] :].tolist())
        outputs[name] = rows
    set_sample(model, caprese_peft.backbones.cats.THRESHOLD_SAMPLE)
    agreement = []
    for a, b in zip(outputs["sampled"], outputs["exact"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreement.append(n)
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "identical_responses": sum(a == b for a, b in zip(outputs["sampled"], outputs["exact"])),
        "agreement_length_mean": statistics.fmean(agreement),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS / "calibration.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = caprese_peft.load_smollm2()
    report = {**run_metadata("cpu"), "threads": args.threads, "density": DENSITY}
    report["threshold_sample"] = caprese_peft.backbones.cats.THRESHOLD_SAMPLE
    report["prefill"] = prefill_times(base, args.lengths, args.repeats)

    prompts = [user_message(p["question"]) for p in load_problems(args.data, split="dev", limit=args.problems)]
    model = get_peft_model(base, CapreseConfig(backbone="cats", density=DENSITY, r=64)).eval()
    report["threshold"] = threshold_error(model, tokenizer, prompts)
    print(json.dumps(report["threshold"], indent=1), flush=True)
    report["tokens"] = token_agreement(model, tokenizer, prompts, args.new_tokens)
    print(json.dumps(report["tokens"], indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
