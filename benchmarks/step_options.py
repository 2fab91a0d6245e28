"""What three options of FastDecoder's compiled CPU step are worth: fused attention, no size asserts, a bounded cache.

On a CPU, FastDecoder compiles its step with inductor (``compile="default"``) and (1) writes attention's two products
as broadcast sums that inductor fuses into loops (``Attention.fuse_attention``) instead of batched matmuls, (2) turns
inductor's ``size_asserts`` off, (3) reads the static KV cache only up to the current token (a length marked dynamic,
``LeanDecoder.bounded_attention``) rather than all of it. This builds the step five ways on SmolLM2-135M-Instruct
(without (1) and (2), with each alone, with both; then with all three: the default), decodes a GSM8K dev prompt,
and times blocks of ``--block`` tokens, the five interleaved over ``--rounds`` rounds (medians), with a static cache
of ``--cache`` positions (a fresh prompt halfway, so the cache never fills).

    python benchmarks/step_options.py [--mode dense|cats|griffin] [--cache 160] [--rounds 12] [--block 5]

Output: benchmarks/results/step_options.json (CPU model, threads, versions, commit) and a line per variant.
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
from caprese_peft import CapreseConfig, FastDecoder  # noqa: E402
from caprese_peft.data import chat_inputs, load_problems, user_message  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
VARIANTS = {  # name: (attention as fused sums, inductor's size asserts, the cache read up to the current token)
    "bmm, size asserts, whole cache": (False, True, False),
    "fused attention, size asserts, whole cache": (True, True, False),
    "bmm, no size asserts, whole cache": (False, False, False),
    "fused attention, no size asserts, whole cache": (True, False, False),
    "fused attention, no size asserts, bounded cache (default)": (True, False, True),
}


def build(model, cache: int, fused: bool, asserts: bool, bounded: bool) -> FastDecoder:
    def compile_step(step):
        return torch.compile(step, fullgraph=True, options={"size_asserts": asserts})

    fast = FastDecoder(model, max_seq_len=cache, compile=compile_step)
    fast._build(1, cache)  # the lean step, so that its attention form can be set before anything compiles
    fast.lean.bounded_attention = bounded
    for layer in fast.lean.layers:
        layer.attn.fuse_attention = fused
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--mode", choices=["dense", "cats", "griffin"], default="dense")
    parser.add_argument("--cache", type=int, default=160, help="static cache positions (prompt + new tokens)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "step_options.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = caprese_peft.load_smollm2()
    model = base if args.mode == "dense" else get_peft_model(base, CapreseConfig(backbone=args.mode, r=64))
    model.eval()
    problem = load_problems(args.data, split="dev", limit=1)[0]
    inputs, _ = chat_inputs(tokenizer, [user_message(problem["question"])], "cpu")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if ids.shape[1] + 2 + (args.rounds - args.rounds // 2) * args.block > args.cache:
        sys.exit(f"--cache {args.cache} is too short for a {ids.shape[1]}-token prompt and the timed tokens.")
    decoders = {name: build(model, args.cache, *options) for name, options in VARIANTS.items()}
    tokens, times = {}, {name: [] for name in decoders}
    with torch.no_grad():
        for name, fast in decoders.items():
            tokens[name] = fast.decode_greedy(fast.prefill(ids, mask).argmax(-1))  # warm-up, and the compile
        for round_ in range(args.rounds):
            if round_ == args.rounds // 2:  # a fresh prompt halfway, so the cache never fills
                for name, fast in decoders.items():
                    tokens[name] = fast.decode_greedy(fast.prefill(ids, mask).argmax(-1))
            for name, fast in decoders.items():
                start = time.perf_counter()
                for _ in range(args.block):
                    tokens[name] = fast.decode_greedy(tokens[name])
                times[name].append((time.perf_counter() - start) / args.block)
    rows = []
    for name in decoders:
        row = {
            "variant": name,
            "ms_per_token": round(statistics.median(times[name]) * 1e3, 2),
            "ms_min": round(min(times[name]) * 1e3, 2),
        }
        rows.append(row)
        print(row, flush=True)
    result = {
        **cpu_run_metadata(args),
        "prompt_tokens": ids.shape[1],
        "rows": rows,
    }
    write_result(args.output, result)


if __name__ == "__main__":
    main()
