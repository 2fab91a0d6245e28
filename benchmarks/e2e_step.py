"""Time of one end-to-end distillation step on SmolLM2 (forward and backward, batch 8): the prompts run once without
a graph and both models continue from their KV cache, against one teacher-forced pass over the whole sequences.

    python benchmarks/e2e_step.py [--batch 8] [--steps 5] [--threads 2]

Records are GSM8K train problems answered by the model (written to benchmarks/results/e2e_step/ on first use).
Output: benchmarks/results/e2e_step.json (CPU, threads, versions, commit) and a line per variant on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import caprese_peft  # noqa: E402
from benchmarks.common import RESULTS, run_metadata  # noqa: E402
from caprese_peft import CapreseConfig  # noqa: E402
from caprese_peft.data import CapreseDataCollator, load_problems, load_prompt_completion  # noqa: E402
from caprese_peft.distill import CapreseTrainer, CapreseTrainingArguments  # noqa: E402
from caprese_peft.distill.losses import hidden_state_mse  # noqa: E402
from caprese_peft.distill.synth import synthesize  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "e2e_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import get_peft_model

    base, tokenizer = caprese_peft.load_smollm2()
    records = RESULTS / "e2e_step" / "records.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    problems = load_problems(args.data, split="train", limit=args.batch * args.steps)
    synthesize(base, tokenizer, problems, records, max_new_tokens=160, batch_size=32, progress=False)
    data = load_prompt_completion(records, tokenizer=tokenizer)
    collate = CapreseDataCollator.from_tokenizer(tokenizer)
    batches = [
        collate([data[i] for i in range(s, s + args.batch)]) for s in range(0, len(data) - args.batch + 1, args.batch)
    ]

    model = get_peft_model(copy.deepcopy(base), CapreseConfig(backbone="cats", density=0.5, r=64, init_weights=False))
    trainer = CapreseTrainer(
        model,
        CapreseTrainingArguments(
            output_dir=str(RESULTS / "e2e_step" / "trainer"), stage="e2e", report_to=[], use_cpu=True
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    variants = {"prompt once (now)": trainer._continuation_states, "one pass (before)": trainer._teacher_forced_states}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for batch in [batches[0], *batches]:  # the first batch warms up both
        for name, states in variants.items():
            start = time.perf_counter()
            student, teacher, mask, _ = states(model, model, batch)
            hidden_state_mse(student, teacher, mask).backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad()
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    result = {
        **run_metadata("cpu"),
        "threads": args.threads,
        "batch": args.batch,
        "tokens_per_batch_mean": statistics.fmean(tokens),
        "seconds_per_step": {name: round(statistics.median(t[1:]), 3) for name, t in times.items()},
    }
    for name, seconds in result["seconds_per_step"].items():
        print(f"{name:<20} {seconds:.2f} s/step")
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
