"""Would ordering each layer's neurons by how often the prompt activates them make CATS's decode rows cluster?

CATS reads the up and down rows of the neurons active for each token, scattered: ``caprese_cpu::gated_ff`` reads
scattered rows slower than runs of adjacent ones (benchmarks/griffin_rows.py). Renumbering a layer's neurons (the
rows of gate and up, the columns of down) changes nothing it computes; ordered by how often the prompt's tokens
activate each neuron, a token's active neurons might fall in longer runs. This decodes ``--new-tokens`` greedy
tokens of SmolLM2-135M-Instruct on GSM8K dev prompts, records each layer's FF input, takes the CATS 0.5 threshold
from the prompt (the median of |act(x Wg^T)| over its tokens), and for the decode tokens reports the mean run of
adjacent active neurons in the model's order and in prompt-frequency order, and times the op on each layout
(all layers in rotation, rounds interleaved, medians), with every neuron kept (dense) as the yardstick.

    python benchmarks/cats_order.py [--prompts 3] [--new-tokens 48]

Output: benchmarks/results/cats_order.json (CPU model, threads, versions, commit) and a table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import caprese_peft  # noqa: E402
from benchmarks.common import RESULTS, cpu_run_metadata, write_result  # noqa: E402
from caprese_peft.data import chat_inputs, load_problems, user_message  # noqa: E402
from caprese_peft.kernels import prepare_cats_weights  # noqa: E402
from caprese_peft.kernels.cpu_ff import load_extension  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
RANK = 64


def mean_run(active: torch.Tensor) -> float:
    """Mean length of the runs of adjacent True in each row of ``active (T, F)``, averaged over rows."""
    runs = []
    for row in active:
        index = row.nonzero()[:, 0]
        runs.append(index.numel() / max(1, 1 + int((index.diff() > 1).sum())))
    return statistics.mean(runs)


def feed_forward_inputs(model, tokenizer, question: str, new_tokens: int) -> tuple[int, list[torch.Tensor]]:
    """The prompt length and each layer's FF inputs ``(P + new, D)`` for a greedy generation."""
    captured: dict[int, list[torch.Tensor]] = {}

    def hook(index):
        return lambda module, args: captured.setdefault(index, []).append(args[0].detach()[0])

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    inputs, _ = chat_inputs(tokenizer, [user_message(question)], "cpu")
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs["input_ids"].shape[1], [torch.cat(captured[i]) for i in range(len(model.model.layers))]


def time_variants(variants: dict, decode: list, thresholds: list, rounds: int) -> dict[str, float]:
    """Median us per layer and token of the op on each variant's weights, all layers in rotation, rounds
    interleaved (the first warms up)."""
    times = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(rounds + 1):
            for name, (weights, thresholded) in variants.items():
                start = time.perf_counter()
                for t in range(decode[0].shape[0]):
                    for w, x, threshold in zip(weights, decode, thresholds):
                        cut = threshold if thresholded else None
                        torch.ops.caprese_cpu.gated_ff(x[t : t + 1], *w, cut, None, "silu")
                times[name].append((time.perf_counter() - start) / decode[0].shape[0] / len(decode))
    return {name: statistics.median(t[1:]) * 1e6 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--output", type=Path, default=RESULTS / "cats_order.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not load_extension():
        sys.exit("The C++ CPU ops could not be built; see the warning above.")
    model, tokenizer = caprese_peft.load_smollm2()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for problem in load_problems(args.data, split="dev", limit=args.prompts):
        prompt_len, inputs = feed_forward_inputs(model, tokenizer, problem["question"], args.new_tokens)
        layouts = {"model order": [], "prompt-frequency order": []}
        runs = {name: [] for name in layouts}
        decode, thresholds = [], []
        for layer, x in zip(model.model.layers, inputs):
            mlp = layer.mlp
            gate, up, down = (getattr(mlp, p).weight.detach() for p in ("gate_proj", "up_proj", "down_proj"))
            magnitude = F.silu(x[:prompt_len] @ gate.T).abs()  # (P, F)
            threshold = magnitude.flatten().median()
            order = torch.argsort(-(magnitude > threshold).float().mean(0), stable=True)
            left = torch.randn(gate.shape[1], RANK, generator=gen) * 0.02
            right = torch.randn(RANK, gate.shape[1], generator=gen) * 0.02
            layouts["model order"].append(prepare_cats_weights(gate, up, down, left, right).op_args())
            permuted = (gate[order].contiguous(), up[order].contiguous(), down[:, order].contiguous())
            layouts["prompt-frequency order"].append(prepare_cats_weights(*permuted, left, right).op_args())
            active = F.silu(x[prompt_len:] @ gate.T).abs() > threshold  # (T, F)
            runs["model order"].append(mean_run(active))
            runs["prompt-frequency order"].append(mean_run(active[:, order]))
            decode.append(x[prompt_len:])
            thresholds.append(threshold.reshape(1))
        variants = {  # name: (the layout's weights, whether the op thresholds)
            "model order": (layouts["model order"], True),
            "prompt-frequency order": (layouts["prompt-frequency order"], True),
            "dense": (layouts["model order"], False),
        }
        times = time_variants(variants, decode, thresholds, args.rounds)
        tokens = decode[0].shape[0]
        for name in variants:
            us = times[name]
            row = {
                "prompt_tokens": prompt_len,
                "decode_tokens": tokens,
                "layout": name,
                "us_per_layer": round(us, 1),
                "mean_run": None if name == "dense" else round(statistics.mean(runs[name]), 2),
            }
            rows.append(row)
            print(row, flush=True)
    summary = {}
    for name in ("model order", "prompt-frequency order", "dense"):
        mine = [r for r in rows if r["layout"] == name]
        summary[name] = {
            "us_per_layer": round(statistics.mean(r["us_per_layer"] for r in mine), 1),
            "mean_run": None if name == "dense" else round(statistics.mean(r["mean_run"] for r in mine), 2),
        }
    print(summary)
    result = {
        **cpu_run_metadata(args),
        "summary": summary,
        "rows": rows,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
