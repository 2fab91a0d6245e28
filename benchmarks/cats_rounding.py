"""How far greedy CATS decoding moves under rounding alone: batch of N against batch of 1, generate against FastDecoder.

CATS keeps a gate activation only when its magnitude exceeds a threshold; a rounding difference next to the
threshold flips a neuron, and flips cascade through later layers and tokens. This measures, per prompt, the
largest logit difference and the first step where the greedy token differs, for
- ``generate`` on a batch of N prompts against ``generate`` on each prompt alone;
- ``generate`` against ``FastDecoder`` on the same batch;
and the dense model's ``generate`` against ``FastDecoder`` as the rounding floor. SmolLM2-135M-Instruct, a fresh
Caprese(CATS 0.5) adapter (R = 0: the backbone alone), GSM8K dev prompts.

    python benchmarks/cats_rounding.py --prompts 16 --new-tokens 48

Output: benchmarks/results/cats_rounding.json (with CPU, versions and commit) and a line per prompt on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def generate_logits(model, inputs: dict, pad: int, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` logits ``(B, new_tokens, V)`` fp32."""
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return torch.stack(out.logits, 1).float()


def fast_logits(model, mode: str, inputs: dict, new_tokens: int) -> torch.Tensor:
    """The same greedy logits from ``FastDecoder``, feeding back its own argmax (EOS suppressed as generate does)."""
    ids = inputs["input_ids"]
    decoder = FastDecoder(model, mode=mode, max_seq_len=ids.shape[1] + new_tokens)
    logits = [decoder.prefill(ids, inputs["attention_mask"])]
    for _ in range(new_tokens - 1):
        logits.append(decoder.decode_one_token(suppress_eos(logits[-1], model).argmax(-1)))
    return torch.stack(logits, 1)


def suppress_eos(logits: torch.Tensor, model) -> torch.Tensor:
    eos = model.generation_config.eos_token_id
    out = logits.clone()
    out[:, [eos] if isinstance(eos, int) else list(eos)] = float("-inf")
    return out


def compare(a: torch.Tensor, b: torch.Tensor, model) -> dict:
    """First step where the greedy tokens differ (None: never) and the largest logit difference before it."""
    ta, tb = suppress_eos(a, model).argmax(-1), suppress_eos(b, model).argmax(-1)
    differ = (ta != tb).nonzero()
    first = int(differ[0]) if len(differ) else None
    upto = first if first is not None else len(a)
    return {"first_difference": first, "max_logit_diff": float((a[:upto] - b[:upto]).abs().max()) if upto else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--output", type=Path, default=RESULTS / "cats_rounding.json")
    args = parser.parse_args()

    base, tokenizer = caprese_peft.load_smollm2()
    model = get_peft_model(base, CapreseConfig(backbone="cats", density=0.5, r=64)).eval()
    messages = [user_message(p["question"]) for p in load_problems(args.data, split="dev", limit=args.prompts)]
    inputs, pad = chat_inputs(tokenizer, messages, model.device)
    rows = []
    with torch.no_grad():
        batched = generate_logits(model, inputs, pad, args.new_tokens)
        fast = fast_logits(model, "caprese", inputs, args.new_tokens)
        with model.disable_adapter():
            dense = generate_logits(model, inputs, pad, args.new_tokens)
        dense_fast = fast_logits(model, "dense", inputs, args.new_tokens)
        for index, message in enumerate(messages):
            alone = generate_logits(model, chat_inputs(tokenizer, [message], model.device)[0], pad, args.new_tokens)[0]
            row = {
                "prompt": index,
                "cats_batch_vs_alone": compare(batched[index], alone, model),
                "cats_generate_vs_fast": compare(batched[index], fast[index], model),
                "dense_generate_vs_fast": compare(dense[index], dense_fast[index], model),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {**run_metadata("cpu"), "threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    args.output.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
