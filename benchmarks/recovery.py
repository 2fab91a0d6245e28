"""Measured recovery on SmolLM2-135M-Instruct (CPU): dense / backbone / layer-wise / end-to-end Caprese.

One command regenerates the table in docs/recovery.md (intermediate results are cached in --out, so an
interrupted run resumes; --fresh starts over):

    python benchmarks/recovery.py

Pipeline: the original model answers GSM8K train problems (synthetic distillation data), dev problems
(teacher continuations for the math KL) and general prompts (for the language KL). For CATS 0.5 on all
layers and GRIFFIN 0.5 on the first half, each method is scored by
- math KL: mean per-token KL(dense || model) on teacher-forced dev continuations;
- language KL: the same on responses to non-math prompts;
- greedy agreement length with the dense model and GSM8K dev accuracy (math-verify) from greedy answers.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import caprese_peft
from caprese_peft import CapreseConfig, parameter_report
from caprese_peft.data import (
    CapreseDataCollator,
    greedy_generations,
    load_problems,
    load_prompt_completion,
    user_message,
)
from caprese_peft.distill import CapreseTrainer, CapreseTrainingArguments
from caprese_peft.distill.closed_form import collect_moments, set_closed_form
from caprese_peft.distill.synth import synthesize
from caprese_peft.eval.compare import continuation_kl, stepwise_continuation_kl
from caprese_peft.eval.metrics import agreement_lengths, check_answer

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / ".." / "shared" / "data" / "gsm8k" / "train.jsonl"
GENERAL = ROOT / "benchmarks" / "data" / "general_prompts.jsonl"
CONFIGS = {
    "CATS 0.5, all layers": {"backbone": "cats", "density": 0.5, "half": False},
    "GRIFFIN 0.5, first half": {"backbone": "griffin", "density": 0.5, "half": True},
}


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
        self.used: list[str] = []  # the keys this invocation reports, computed now or earlier

    def get(self, key: str, compute):
        self.used.append(key)
        if key not in self.data:
            start = time.perf_counter()
            result = compute()
            self.data[key] = dict(result or {})  # training steps return nothing but their time
            self.data[key]["seconds"] = round(time.perf_counter() - start, 1)
            self.path.write_text(json.dumps(self.data, indent=2))
            log(f"{key}: { {k: v for k, v in self.data[key].items() if k != 'ids'} }")
        return self.data[key]

    def reuse(self, key: str) -> None:
        """Count a step whose output (an adapter on disk) is reused, at the time it took when it ran."""
        if key in self.data:
            self.used.append(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "recovery.md")
    parser.add_argument("--train", type=int, default=192, help="GSM8K train problems for synthetic data")
    parser.add_argument("--dev", type=int, default=32, help="GSM8K dev problems for KL, agreement and accuracy")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lw-epochs", type=float, default=1)
    parser.add_argument("--e2e-epochs", type=float, default=3)
    parser.add_argument("--e2e-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    parser.add_argument(
        "--e2e-records", type=int, default=0, help="train end-to-end on only the first N records (0: all)"
    )
    parser.add_argument("--configs", nargs="+", choices=["cats", "griffin"], default=["cats", "griffin"])
    parser.add_argument(
        "--adam-layerwise", action="store_true", help="also train the layer-wise stage with Adam (the paper's way)"
    )
    parser.add_argument(
        "--rank-sweep",
        nargs="*",
        type=int,
        default=[128, 576],
        help="math KL of the closed-form layer-wise fit at these extra ranks, from the same moments (CATS only)",
    )
    parser.add_argument(
        "--reselect-every",
        type=int,
        default=32,
        help="also measure GRIFFIN end-to-end with this reselection interval; 0 skips it",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore cached results and adapters")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    cache = Cache(args.out / "results.json", args.fresh)

    base, tokenizer = caprese_peft.load_smollm2()
    base.requires_grad_(False)
    synth_options = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    if args.fresh:
        for name in ("synth_train.jsonl", "synth_dev.jsonl", "synth_general.jsonl"):
            (args.out / name).unlink(missing_ok=True)

    log("synthetic data: train problems, dev continuations, general responses")
    train_problems = load_problems(GSM8K, split="train", limit=args.train)
    dev_problems = load_problems(GSM8K, split="dev", limit=args.dev)
    general = load_problems(GENERAL, split="all")

    def make_data() -> dict:
        synthesize(base, tokenizer, train_problems, args.out / "synth_train.jsonl", **synth_options)
        synthesize(base, tokenizer, dev_problems, args.out / "synth_dev.jsonl", **synth_options)
        synthesize(base, tokenizer, general, args.out / "synth_general.jsonl", instruction=None, **synth_options)
        return {}

    synth_seconds = cache.get("synthetic data", make_data)["seconds"]  # when reused: the time it took then
    train = load_prompt_completion(args.out / "synth_train.jsonl", tokenizer=tokenizer)
    dev = load_prompt_completion(args.out / "synth_dev.jsonl", tokenizer=tokenizer)
    language = load_prompt_completion(args.out / "synth_general.jsonl", tokenizer=tokenizer)
    dev_prompts = [user_message(p["question"]) for p in dev_problems]
    references = [p["answer"] for p in dev_problems]

    def generation_scores(model, dense: bool) -> dict:
        runs = greedy_generations(
            model, tokenizer, dev_prompts, dense=dense, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
        )
        correct = [check_answer(text, ref) for (text, _), ref in zip(runs, references)]
        return {"accuracy": sum(correct) / len(correct), "ids": [ids for _, ids in runs]}

    # the dense logits on the KL continuations, computed at the first evaluation and reused by every other
    teachers: dict[str, dict] = {"dev": {}, "language": {}}
    dense_scores = cache.get("dense", lambda: generation_scores(caprese_peft_model(base, "cats", 0.5, False, 1), True))
    rows = [("Dense", "-", {"math_kl": 0.0, "language_kl": 0.0}, dense_scores, None)]
    ranks: dict[int, float] = {}

    for label, spec in CONFIGS.items():
        key = spec["backbone"]
        if key not in args.configs:
            continue

        def evaluate(model, method: str, generate: bool = True, key: str = key, stepwise: bool = False) -> dict:
            # reselection rewrites past KV entries, which only token-by-token decoding reproduces
            def kl(data, name: str) -> float:
                if stepwise:
                    return stepwise_continuation_kl(model, data, batch_size=args.batch_size)["kl"]
                return continuation_kl(model, data, teacher_cache=teachers[name])["kl"]

            def compute():
                scores = {"math_kl": kl(dev, "dev"), "language_kl": kl(language, "language")}
                if generate:
                    generated = generation_scores(model, dense=False)
                    lengths = agreement_lengths(dense_scores["ids"], generated["ids"])
                    scores.update(accuracy=generated["accuracy"], agreement=sum(lengths) / len(lengths))
                return scores

            return cache.get(f"{key}/{method}", compute)

        model = caprese_peft_model(base, spec["backbone"], spec["density"], spec["half"], args.rank)
        report = parameter_report(model)
        rows.append((label, "backbone", evaluate(model, "backbone"), None, report))

        if args.adam_layerwise:
            lw_dir = args.out / f"{key}-layerwise"
            if not (lw_dir / "adapter_config.json").is_file() or args.fresh:
                stage = partial(train_stage, model, tokenizer, train, args.out, "layerwise", args.lw_epochs, 1e-3)
                cache.get(f"{key}/train layerwise", stage)
                model.save_pretrained(lw_dir)
            else:
                cache.reuse(f"{key}/train layerwise")
                model = caprese_peft_model_from(base, lw_dir)
            rows.append((label, "layer-wise (Adam)", evaluate(model, "layerwise", generate=False), None, report))

        cf_dir = args.out / f"{key}-closed-form"
        model = caprese_peft_model(base, spec["backbone"], spec["density"], spec["half"], args.rank)
        moments_path = args.out / f"{key}-moments.pt"
        if not (cf_dir / "adapter_config.json").is_file() or args.fresh:
            loader = torch.utils.data.DataLoader(
                train, batch_size=8, collate_fn=CapreseDataCollator.from_tokenizer(tokenizer)
            )

            cache.get(f"{key}/train closed-form", partial(closed_form_step, model, loader, moments_path))
            model.save_pretrained(cf_dir)
        else:
            cache.reuse(f"{key}/train closed-form")
            model = caprese_peft_model_from(base, cf_dir)
        rows.append((label, "layer-wise (closed form)", evaluate(model, "closed-form"), None, report))
        if key == "cats" and args.rank_sweep and moments_path.is_file():
            for rank in args.rank_sweep:
                sweep_model = caprese_peft_model(base, spec["backbone"], spec["density"], spec["half"], rank)

                step = partial(rank_step, sweep_model, moments_path, dev, teachers["dev"])
                ranks[rank] = cache.get(f"{key}/closed-form rank {rank}", step)["math_kl"]

        e2e_dir = args.out / f"{key}-e2e"
        e2e_train = train.select(range(min(args.e2e_records, len(train)))) if args.e2e_records else train
        # the adapter folder and the cache keys name the settings, so changing one retrains and rescores
        tag = f"e2e [lr {args.e2e_lr:g}, {args.e2e_epochs:g} epochs, {len(e2e_train)} records]"
        stamp = e2e_dir / "recovery-settings.txt"
        if args.fresh or not stamp.is_file() or stamp.read_text() != tag:
            model = caprese_peft_model_from(base, cf_dir, trainable=True)
            stage = partial(train_stage, model, tokenizer, e2e_train, args.out, "e2e", args.e2e_epochs, args.e2e_lr)
            cache.data.pop(f"{key}/train {tag}", None)
            cache.get(f"{key}/train {tag}", stage)
            model.save_pretrained(e2e_dir)
            stamp.write_text(tag)
        else:
            cache.reuse(f"{key}/train {tag}")
        model = caprese_peft_model_from(base, e2e_dir)
        rows.append((label, "end-to-end", evaluate(model, tag), None, report))
        if key == "griffin" and args.reselect_every:
            model.peft_config["default"].reselect_every = args.reselect_every
            method = f"end-to-end, reselect every {args.reselect_every}"
            rows.append(
                (label, method, evaluate(model, f"{tag} reselect {args.reselect_every}", stepwise=True), None, report)
            )

    total = sum(cache.data[k]["seconds"] for k in dict.fromkeys(cache.used))
    write_report(args, rows, ranks, cache, synth_seconds, total, len(train), len(dev), len(language))
    log(
        f"done: steps {total / 60:.1f} min, this invocation {(time.perf_counter() - start) / 60:.1f} min -> {args.docs}"
    )


def closed_form_step(model, loader, moments_path: Path) -> None:
    """The closed-form layer-wise fit, keeping its moments: the rank sweep solves again from them."""
    moments = collect_moments(model, loader)
    torch.save(moments, moments_path)
    set_closed_form(model, moments)


def rank_step(model, moments_path: Path, dev, teacher: dict) -> dict:
    """Math KL of the closed-form fit at ``model``'s rank, from saved moments."""
    set_closed_form(model, torch.load(moments_path, weights_only=False))
    return {"math_kl": continuation_kl(model, dev, teacher_cache=teacher)["kl"]}


def train_stage(model, tokenizer, dataset, out: Path, stage: str, epochs: float, lr: float) -> None:
    """One distillation stage with CapreseTrainer (batch 8, linear schedule, 2% warmup), in place."""
    arguments = CapreseTrainingArguments(
        output_dir=str(out / "trainer"),
        stage=stage,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    CapreseTrainer(model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer).train()


def caprese_peft_model(base, backbone: str, density: float, half: bool, rank: int):
    from peft import get_peft_model

    layers = list(range(base.config.num_hidden_layers // 2)) if half else None
    config = CapreseConfig(backbone=backbone, density=density, r=rank, layers_to_transform=layers)
    return get_peft_model(copy.deepcopy(base), config)


def caprese_peft_model_from(base, path: Path, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), path, is_trainable=trainable)


def write_report(args, rows, ranks, cache, synth_seconds, total, n_train, n_dev, n_language) -> None:
    lines = [
        "# Measured recovery on SmolLM2-135M-Instruct",
        "",
        f"Regenerate with `{' '.join(['python', 'benchmarks/recovery.py', *sys.argv[1:]])}`: its steps took {total / 60:.1f} min in all on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads (model loading not counted), of which {synth_seconds / 60:.1f} min synthetic data "
        f"(commit {git_commit()}; per-step times in benchmarks/results/recovery/results.json).",
        "",
        f"Data: {n_train} GSM8K train problems answered by the model itself ({args.max_new_tokens} new tokens max, greedy), "
        f"{n_dev} GSM8K dev problems (teacher continuations for KL, greedy answers for agreement and accuracy), "
        f"{n_language} general non-math prompts. Caprese rank r={args.rank}; layer-wise: the closed-form solution of equation 7"
        + (f" (and Adam, {args.lw_epochs:g} epochs at 1e-3)" if args.adam_layerwise else "")
        + f"; end-to-end {args.e2e_epochs:g} epochs at {args.e2e_lr:g} on {args.e2e_records or n_train} records, from the "
        "closed-form layer-wise factors. Reselection rows decode the KL continuations token by token "
        "(stepwise_continuation_kl), since a single teacher-forced pass cannot rewrite past KV entries.",
        "",
        "| backbone | method | math KL | language KL | agreement (tokens) | GSM8K dev accuracy | active params / token |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    backbone_kl = {}
    for label, method, scores, dense_scores, report in rows:
        scores = {**scores, **(dense_scores or {})}
        if method == "backbone":
            backbone_kl[label] = scores["math_kl"]
        agreement = f"{scores['agreement']:.1f}" if "agreement" in scores else ("all" if label == "Dense" else "-")
        accuracy = f"{scores['accuracy']:.1%}" if "accuracy" in scores else "-"
        active = f"{report.active_per_token / 1e6:.1f}M" if report else "-"
        lines.append(
            f"| {label} | {method} | {scores['math_kl']:.4f} | {scores['language_kl']:.4f} | {agreement} | {accuracy} | {active} |"
        )
    lines += ["", "Share of the backbone's math KL gap to dense that each method removes:", ""]
    for label, method, scores, _, _ in rows:
        if label in backbone_kl and method != "backbone" and backbone_kl[label] > 0:
            lines.append(f"- {label}, {method}: {1 - scores['math_kl'] / backbone_kl[label]:.1%}")
    if ranks and "CATS 0.5, all layers" in backbone_kl:
        gap = backbone_kl["CATS 0.5, all layers"]
        lines += [
            "",
            "Closed-form layer-wise fit of CATS 0.5 at other ranks (same moments; 576 is the hidden size, the best "
            "linear correction of each layer):",
            "",
            "| rank | math KL | share of the gap removed |",
            "| ---: | ---: | ---: |",
        ]
        lines += [f"| {rank} | {kl:.4f} | {1 - kl / gap:.1%} |" for rank, kl in sorted(ranks.items())]
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text("\n".join(lines) + "\n")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
