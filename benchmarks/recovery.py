"""Measured recovery on SmolLM2-135M-Instruct (CPU): one lever per row, the same data and seed, on- and off-policy.

One command regenerates the ablation table of docs/recovery.md (results are cached in --out under keys that name
their settings, so an interrupted run resumes and a changed setting reruns only what depends on it; --fresh
starts over):

    python benchmarks/recovery.py

Data: the original model answers GSM8K train problems (distillation data) and dev problems, and responds to general
prompts. Every row is scored by
- math KL: mean per-token KL(dense || model), teacher-forced on the dense model's own dev answers (on-policy);
- language KL: the same on its responses to the general prompts (on-policy);
- solutions KL: on the dev problems' reference solutions, written by people (off-policy math);
- prose KL: on passages of library documentation, written by people (off-policy prose, benchmarks/data);
- greedy agreement length with the dense model on the dev prompts;
- the share of the backbone's gap to dense that the row removes, on-policy (math) and off-policy (solutions);
- parameters the adapter adds, weight bytes a generated token reads (fp32) against the dense model's, and the
  seconds its own steps took (training; evaluation not counted).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import caprese_peft  # noqa: E402
from caprese_peft import CapreseConfig, parameter_report  # noqa: E402
from caprese_peft.data import (  # noqa: E402
    CapreseDataCollator,
    greedy_generations,
    load_problems,
    load_prompt_completion,
    prepare_dataset,
    user_message,
)
from caprese_peft.distill import CapreseTrainer, CapreseTrainingArguments  # noqa: E402
from caprese_peft.distill.closed_form import collect_moments, set_closed_form  # noqa: E402
from caprese_peft.distill.synth import synthesize  # noqa: E402
from caprese_peft.eval.compare import continuation_kl  # noqa: E402
from caprese_peft.eval.metrics import agreement_lengths  # noqa: E402

GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
GENERAL = ROOT / "benchmarks" / "data" / "general_prompts.jsonl"
PROSE = ROOT / "benchmarks" / "data" / "prose.jsonl"
BACKBONES = {
    "cats": ("CATS 0.5, all layers", {"backbone": "cats", "density": 0.5, "half": False}),
    "griffin": ("GRIFFIN 0.5, first half", {"backbone": "griffin", "density": 0.5, "half": True}),
}
# one lever per row: (backbone, lever, stand-in bits, closed-form rank or None, end-to-end loss or None[, density]);
# a density names another than the backbone's, its gap is still measured against the backbone's own
ROWS = [
    ("cats", "backbone alone", None, None, None),
    ("cats", "layer-wise (closed form, equation 7)", None, "r", None),
    ("cats", "+ end-to-end, hidden-state MSE (equation 8)", None, "r", "mse"),
    ("cats", "+ end-to-end, next-token KL", None, "r", "kl"),
    ("cats", "layer-wise at r=576 (the best linear map)", None, 576, None),
    ("cats", "int4 stand-in of dropped neurons", 4, None, None),
    ("cats", "int4 stand-in + layer-wise", 4, "r", None),
    ("cats", "int4 stand-in + layer-wise + end-to-end MSE", 4, "r", "mse"),
    ("cats", "density 0.57 + layer-wise (the bytes of the int4 stand-in)", None, "r", None, 0.57),
    ("griffin", "backbone alone", None, None, None),
    ("griffin", "layer-wise (closed form, equation 7)", None, "r", None),
    ("griffin", "+ end-to-end, hidden-state MSE (equation 8)", None, "r", "mse"),
    ("griffin", "int4 stand-in + layer-wise", 4, "r", None),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return "unknown"


class Cache:
    """Results by key in one JSON file, so a rerun skips what is done; keys name the settings they depend on."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        self.data = {} if fresh or not path.is_file() else json.loads(path.read_text())
        self.used: dict[str, None] = {}  # the keys this invocation reports, computed now or earlier

    def get(self, key: str, compute):
        self.used[key] = None
        if key not in self.data:
            start = time.perf_counter()
            result = compute()
            self.data[key] = dict(result or {})
            self.data[key]["seconds"] = round(time.perf_counter() - start, 1)
            self.path.write_text(json.dumps(self.data, indent=2))
            log(f"{key}: { {k: v for k, v in self.data[key].items() if k != 'ids'} }")
        return self.data[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "recovery.md")
    parser.add_argument("--train", type=int, default=192, help="GSM8K train problems for synthetic data")
    parser.add_argument("--dev", type=int, default=32, help="GSM8K dev problems for KL and agreement")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--rank", type=int, default=64, help="r of the rows that do not name another")
    parser.add_argument("--e2e-epochs", type=float, default=1)
    parser.add_argument("--e2e-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    parser.add_argument("--rows", nargs="*", type=int, help="only these rows of the table (indices)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results and adapters")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cache = Cache(args.out / "results.json", args.fresh)

    base, tokenizer = caprese_peft.load_smollm2()
    base.requires_grad_(False)
    synth_options = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    train_problems = load_problems(GSM8K, split="train", limit=args.train)
    dev_problems = load_problems(GSM8K, split="dev", limit=args.dev)
    general = load_problems(GENERAL, split="all")

    def make_data() -> dict:
        synthesize(base, tokenizer, train_problems, args.out / "synth_train.jsonl", **synth_options)
        synthesize(base, tokenizer, dev_problems, args.out / "synth_dev.jsonl", **synth_options)
        synthesize(base, tokenizer, general, args.out / "synth_general.jsonl", instruction=None, **synth_options)
        return {}

    if args.fresh:
        for name in ("synth_train.jsonl", "synth_dev.jsonl", "synth_general.jsonl"):
            (args.out / name).unlink(missing_ok=True)
    synth_seconds = cache.get(
        f"synthetic data [{args.train} train, {args.dev} dev, {args.max_new_tokens} tokens]", make_data
    )["seconds"]
    train = load_prompt_completion(args.out / "synth_train.jsonl", tokenizer=tokenizer)
    sets = {
        "math": load_prompt_completion(args.out / "synth_dev.jsonl", tokenizer=tokenizer),
        "language": load_prompt_completion(args.out / "synth_general.jsonl", tokenizer=tokenizer),
        "solutions": prepare_dataset(
            [
                {"prompt": user_message(p["question"]), "completion": [{"role": "assistant", "content": p["answer"]}]}
                for p in dev_problems
            ],
            tokenizer=tokenizer,
        ),
        "prose": load_prompt_completion(PROSE, tokenizer=tokenizer),
    }
    dev_prompts = [user_message(p["question"]) for p in dev_problems]
    teachers: dict[str, dict] = {name: {} for name in sets}  # the dense logits, computed once per set

    def generate(model, dense: bool = False) -> list[list[int]]:
        runs = greedy_generations(
            model, tokenizer, dev_prompts, dense=dense, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
        )
        return [ids for _, ids in runs]

    dense_ids = cache.get(f"dense greedy [{args.dev} dev]", lambda: {"ids": generate(base)})["ids"]
    dense_bytes = sum(p.numel() for p in base.parameters()) * 4

    def evaluate(model) -> dict:
        scores = {
            f"{name}_kl": continuation_kl(model, data, teacher_cache=teachers[name], progress=False)["kl"]
            for name, data in sets.items()
        }
        lengths = agreement_lengths(dense_ids, generate(model))
        report = parameter_report(model)
        return {
            **scores,
            "agreement": sum(lengths) / len(lengths),
            "added_params": report.adapter,
            "bytes_vs_dense": report.bytes_per_token(4) / dense_bytes,
        }

    rows = []
    for index, (key, lever, bits, rank, loss, *density) in enumerate(ROWS):
        if args.rows is not None and index not in args.rows:
            continue
        label, spec = BACKBONES[key]
        if density:
            spec = {**spec, "density": density[0]}
        rank = args.rank if rank == "r" else rank
        settings = f"{key}{f' density {density[0]:g}' if density else ''} stand-in {bits} rank {rank} e2e {loss}"
        if loss:
            settings += f" [lr {args.e2e_lr:g}, {args.e2e_epochs:g} epochs, {len(train)} records]"
        model, seconds = build(base, tokenizer, train, spec, bits, rank, loss, args, cache)
        scores = cache.get(
            f"scores {settings} [{args.dev} dev, {args.max_new_tokens} tokens]", lambda model=model: evaluate(model)
        )
        rows.append(
            {
                "backbone": label,
                "lever": lever,
                "trained": rank is not None,  # untrained rows keep R = 0: their L, R add nothing and can be left out
                **{k: v for k, v in scores.items() if k != "seconds"},
                **(
                    {}
                    if rank is not None
                    else {
                        "added_params": 0,
                        "bytes_vs_dense": scores["bytes_vs_dense"] - scores["added_params"] * 4 / dense_bytes,
                    }
                ),
                "seconds": seconds,
            }
        )
        del model
    total = sum(cache.data[key]["seconds"] for key in cache.used)  # each step once, shared or not
    write_report(args, rows, synth_seconds, total, len(train), {k: len(v) for k, v in sets.items()})
    log(f"done: {total / 60:.1f} min of steps -> {args.docs}")


def build(base, tokenizer, train, spec: dict, bits, rank, loss, args, cache: Cache):
    """The row's model and the seconds its own steps took (closed form, end to end), trained or from disk."""
    from peft import PeftModel, get_peft_model

    layers = list(range(base.config.num_hidden_layers // 2)) if spec["half"] else None
    config = CapreseConfig(
        backbone=spec["backbone"], density=spec["density"], r=rank or args.rank, layers_to_transform=layers,
        stand_in_bits=bits,
    )  # fmt: skip
    model = get_peft_model(copy.deepcopy(base), config)
    seconds = 0.0
    if rank is None:
        return model, seconds
    name = f"{spec['backbone']}-d{spec['density']:g}-bits{bits}"
    moments_path = args.out / f"{name}-moments.pt"

    def moments() -> dict:
        loader = torch.utils.data.DataLoader(
            train, batch_size=8, collate_fn=CapreseDataCollator.from_tokenizer(tokenizer)
        )
        torch.save(collect_moments(model, loader), moments_path)
        return {}

    key = f"moments {name} [{len(train)} records]"
    if args.fresh or not moments_path.is_file():
        cache.data.pop(key, None)
    seconds += cache.get(key, moments)["seconds"]
    set_closed_form(model, torch.load(moments_path, weights_only=False))
    if loss is None:
        return model, seconds
    folder = args.out / f"{name}-r{rank}-e2e-{loss}"
    tag = f"lr {args.e2e_lr:g}, {args.e2e_epochs:g} epochs, {len(train)} records"
    stamp = folder / "recovery-settings.txt"
    key = f"train {folder.name} [{tag}]"
    if args.fresh or not stamp.is_file() or stamp.read_text() != tag:
        cache.data.pop(key, None)

        def train_e2e() -> dict:
            for parameter in (p for n, p in model.named_parameters() if "caprese_" in n):
                parameter.requires_grad_(True)
            arguments = CapreseTrainingArguments(
                output_dir=str(args.out / "trainer"), stage="e2e", loss=loss, learning_rate=args.e2e_lr,
                num_train_epochs=args.e2e_epochs, per_device_train_batch_size=8, logging_steps=10, save_strategy="no",
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            )  # fmt: skip
            CapreseTrainer(model=model, args=arguments, train_dataset=train, processing_class=tokenizer).train()
            model.save_pretrained(folder)
            stamp.write_text(tag)
            return {}

        seconds += cache.get(key, train_e2e)["seconds"]
        return model, seconds
    seconds += cache.get(key, lambda: None)["seconds"]  # trained earlier: counted at the time it took then
    return PeftModel.from_pretrained(copy.deepcopy(base), folder), seconds


def write_report(args, rows: list[dict], synth_seconds: float, total: float, n_train: int, sizes: dict) -> None:
    gaps = {}
    for row in rows:
        if row["lever"].startswith("backbone alone"):
            gaps[row["backbone"]] = row
    lines = [
        "# Measured recovery on SmolLM2-135M-Instruct",
        "",
        f"Regenerate with `{' '.join(['python', 'benchmarks/recovery.py', *sys.argv[1:]])}`: its steps took "
        f"{total / 60:.1f} min in all on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
        f"(model loading not counted), of which {synth_seconds / 60:.1f} min synthetic data (commit {git_commit()}; "
        "per-step times in benchmarks/results/recovery/results.json).",
        "",
        f"Data: {n_train} GSM8K train problems answered by the model itself ({args.max_new_tokens} new tokens at most, "
        f"greedy) to distill on. Scored on {sizes['math']} GSM8K dev problems (math KL: the model's own answers; "
        f"solutions KL: their reference solutions, written by people; greedy agreement), {sizes['language']} general "
        f"prompts (language KL: the model's own responses) and {sizes['prose']} passages of library documentation "
        "(prose KL: written by people). Rank r="
        f"{args.rank} where a row names no other; layer-wise: the closed-form solution of equation 7; end-to-end: "
        f"{args.e2e_epochs:g} epoch{'' if args.e2e_epochs == 1 else 's'} at {args.e2e_lr:g}, batch 8, from the layer-wise factors. A stand-in computes the "
        "neurons the backbone drops from copies of their weights quantized row by row (CapreseConfig.stand_in_bits). "
        "Gap removed: 1 - KL / KL of the backbone alone; added params: the trained L and R (untrained rows keep R = 0, so their L and R are left out, of the bytes too). Bytes: weight bytes a generated token reads (fp32 weights, the "
        "stand-in at its bits) against the dense model's; time: the steps the row needs (moments, training), "
        "shared steps counted in each row that needs them; the total above counts each once, evaluation included.",
        "",
        "| backbone | lever | math KL | language KL | solutions KL | prose KL | agreement | gap removed (math) "
        "| gap removed (solutions) | added params | bytes / token vs dense | math gap removed per 1% of dense's bytes "
        "| time s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        backbone = gaps.get(row["backbone"])
        removed = {
            name: f"{1 - row[f'{name}_kl'] / backbone[f'{name}_kl']:.1%}" if backbone else "-"
            for name in ("math", "solutions")
        }
        per_byte = "-"
        if backbone and row is not backbone:  # the lever's extra bytes over the backbone alone, in % of dense's
            extra = 100 * (row["bytes_vs_dense"] - backbone["bytes_vs_dense"])
            per_byte = f"{(1 - row['math_kl'] / backbone['math_kl']) / extra:.1%}" if extra > 0 else "-"
        lines.append(
            f"| {row['backbone']} | {row['lever']} | {row['math_kl']:.4f} | {row['language_kl']:.4f} "
            f"| {row['solutions_kl']:.4f} | {row['prose_kl']:.4f} | {row['agreement']:.1f} | {removed['math']} "
            f"| {removed['solutions']} | {row['added_params']:,} | {row['bytes_vs_dense']:.3f} | {per_byte} "
            f"| {row['seconds']:.0f} |"
        )
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text("\n".join(lines) + "\n")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
