"""Greedy generation throughput of SmolLM2-135M-Instruct on this CPU: ``model.generate`` against ``FastDecoder``.

The evaluation report generates every method's answers; on a CPU that is most of its time. This measures the
two decoders on GSM8K dev prompts for the dense model and Caprese(CATS 0.5) (a fresh adapter: speed does not
depend on the values of L and R), each generating exactly ``--new-tokens`` tokens (EOS ignored), and checks that
both give the same tokens.

    python benchmarks/cpu_generation.py --batch-sizes 32 64 --new-tokens 64

Output: benchmarks/results/cpu_generation.json (with CPU, versions and commit) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
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
from caprese_peft import CapreseConfig, FastDecoder  # noqa: E402
from caprese_peft.data import chat_inputs, load_problems, user_message  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"


def identical_rows(a: torch.Tensor, b: torch.Tensor, eos: int) -> float:
    """Share of rows whose tokens agree up to the first EOS (generate's min_new_tokens forbids EOS, FastDecoder's
    ignore_eos does not, so the two may part there)."""
    same = []
    for row_a, row_b in zip(a, b):
        ends = (row_b == eos).nonzero()
        n = int(ends[0]) if len(ends) else len(row_b)
        same.append(torch.equal(row_a[:n], row_b[:n]))
    return sum(same) / len(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS / "cpu_generation.json")
    args = parser.parse_args()

    base, tokenizer = caprese_peft.load_smollm2()
    model = get_peft_model(base, CapreseConfig(backbone="cats", density=0.5, r=64)).eval()
    problems = load_problems(args.data, split="dev", limit=max(args.batch_sizes))
    prompts = [user_message(p["question"]) for p in problems]
    rows = []
    for batch_size in args.batch_sizes:
        inputs, pad = chat_inputs(tokenizer, prompts[:batch_size], model.device)
        for mode in ("dense", "caprese"):
            fast = FastDecoder(model, mode=mode)
            outputs, seconds = {}, {}
            for decoder in ("generate", "FastDecoder"):
                start = time.perf_counter()
                with torch.no_grad():
                    if decoder == "generate":
                        with model.disable_adapter() if mode == "dense" else torch.no_grad():
                            out = model.generate(
                                **inputs,
                                max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens,
                                do_sample=False,
                                pad_token_id=pad,
                            )
                    else:
                        out = fast.generate(
                            inputs["input_ids"],
                            inputs["attention_mask"],
                            max_new_tokens=args.new_tokens,
                            ignore_eos=True,
                        )
                seconds[decoder] = time.perf_counter() - start
                outputs[decoder] = out[:, inputs["input_ids"].shape[1] :]
            same = identical_rows(outputs["generate"], outputs["FastDecoder"], tokenizer.eos_token_id)
            row = {
                "batch_size": batch_size,
                "mode": mode,
                "prompt_positions": int(inputs["input_ids"].shape[1]),
                "new_tokens": args.new_tokens,
                **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
                **{f"{k}_tokens_per_s": round(batch_size * args.new_tokens / v, 1) for k, v in seconds.items()},
                "speedup": round(seconds["generate"] / seconds["FastDecoder"], 2),
                "identical_rows": same,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {**run_metadata("cpu"), "threads": torch.get_num_threads(), "rows": rows}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
