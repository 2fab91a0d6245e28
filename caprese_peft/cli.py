"""The ``caprese-peft`` command: ``synth`` (distillation data), ``distill`` (train an adapter), ``eval`` (compare)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_DATA = "../shared/data/gsm8k/train.jsonl"


def _layers(spec: str, n_layers: int) -> list[int] | None:
    if spec == "all":
        return None
    if spec == "first-half":
        return list(range(n_layers // 2))
    try:
        return [int(i) for i in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--layers takes 'all', 'first-half' or comma-separated indices, got {spec!r}.") from None


def _synth(args: argparse.Namespace) -> None:
    from .distill.synth import load_problems, synthesize
    from .loading import load_model

    problems = load_problems(
        args.data, split=args.split, dev_size=args.dev_size, limit=args.limit, question_field=args.question_field
    )
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    path = synthesize(
        model,
        tokenizer,
        problems,
        args.output,
        instruction=args.instruction or None,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
    )
    print(f"{len(problems)} problems -> {path} ({time.perf_counter() - start:.0f} s)")


def build_adapter(base, args: argparse.Namespace):
    """A trainable Caprese PEFT model: loaded from ``--init`` or fresh from the flags."""
    from peft import PeftModel, get_peft_model

    from .config import CapreseConfig

    if args.init:
        return PeftModel.from_pretrained(base, args.init, is_trainable=True)
    layers = _layers(args.layers, base.config.get_text_config().num_hidden_layers)
    config = CapreseConfig(backbone=args.backbone, density=args.density, r=args.rank, layers_to_transform=layers)
    return get_peft_model(base, config)


def _distill(args: argparse.Namespace) -> None:
    from .distill import CapreseDataCollator, CapreseTrainer, CapreseTrainingArguments, fit_closed_form
    from .distill.data import load_prompt_completion
    from .loading import load_model

    base, tokenizer = load_model(args.model)
    model = build_adapter(base, args)
    output = Path(args.output)
    start = time.perf_counter()
    if args.stage == "closed-form":
        import torch
        from tqdm.auto import tqdm

        dataset = load_prompt_completion(args.data, tokenizer=tokenizer, max_length=args.max_length)
        collate = CapreseDataCollator.from_tokenizer(tokenizer)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)
        reached = fit_closed_form(model, tqdm(loader, desc="Second moments"))
        summary = {"stage": "closed-form", "mean_layer_loss": sum(reached.values()) / len(reached)}
    else:
        training = CapreseTrainingArguments(
            output_dir=str(output / "trainer"),
            stage=args.stage,
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            max_length=args.max_length,
            logging_steps=args.logging_steps,
            save_strategy="no" if args.no_checkpoints else "epoch",
            report_to=[],
            use_cpu=args.cpu,
            seed=args.seed,
        )
        dataset = load_prompt_completion(args.data, tokenizer=tokenizer, max_length=args.max_length)
        trainer = CapreseTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer)
        result = trainer.train(resume_from_checkpoint=args.resume or None)
        summary = {"stage": args.stage, "train_loss": result.training_loss}
    model.save_pretrained(output)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (output / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"adapter -> {output}  {summary}")


def _eval(args: argparse.Namespace) -> None:
    from .eval.report import check_density, check_output_dir, evaluate_methods, load_eval_problems, write_report
    from .loading import load_model

    # everything that can be checked without the model fails here, before the model loads
    check_output_dir(args.output, args.overwrite)
    if args.density is not None:
        check_density(args.density)
    layers = args.layers if args.layers in (None, "all", "first-half") else _layers(args.layers, 0)
    problems = load_eval_problems(
        args.data,
        split=args.split,
        dev_size=args.dev_size,
        limit=args.limit,
        question_field=args.question_field,
        instruction=args.instruction or None,
        hf_split=args.hf_split,
        hf_config=args.hf_config,
    )
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    results = evaluate_methods(
        model,
        tokenizer,
        problems,
        adapters=args.adapter,
        backbone=args.backbone,
        density=args.density,
        layers=layers,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        timing_tokens=args.timing_tokens,
        timing_repeats=args.timing_repeats,
        info={"model": args.model, "data": str(args.data), "split": args.split},
    )
    results["seconds"] = round(time.perf_counter() - start, 1)
    output = write_report(results, args.output, overwrite=args.overwrite)
    for name, method in results["methods"].items():
        print(f"{name}: accuracy {method['accuracy']:.1%}, mean length {method['length']['mean']:.1f} tokens")
    print(f"report -> {output / 'report.md'} ({results['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="caprese-peft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="have the original model answer math problems (prompt-completion JSONL)")
    synth.add_argument("--data", default=DEFAULT_DATA, help="local JSONL or Hugging Face dataset of math problems")
    synth.add_argument("--split", default="train", choices=["train", "dev", "all"], help="dev = the last --dev-size")
    synth.add_argument("--dev-size", type=int, default=500)
    synth.add_argument("--limit", type=int, help="at most this many problems")
    synth.add_argument("--question-field", help="field holding the problem (default: question, problem or prompt)")
    synth.add_argument("--instruction", default="Please reason step by step.", help="appended to each question")
    synth.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, or a transformers model")
    synth.add_argument("--output", required=True, help="JSONL to append to; problems already there are skipped")
    synth.add_argument("--batch-size", type=int, default=16)
    synth.add_argument("--max-new-tokens", type=int, default=256)
    synth.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    synth.add_argument("--temperature", type=float, default=0.7)
    synth.set_defaults(run=_synth)

    distill = commands.add_parser("distill", help="train a Caprese adapter (layer-wise, closed-form or end-to-end)")
    distill.add_argument("--data", required=True, help="prompt-completion JSONL (from `synth`) or dataset name")
    distill.add_argument("--output", required=True, help="folder for the adapter (and trainer checkpoints)")
    distill.add_argument("--stage", default="layerwise", choices=["layerwise", "closed-form", "e2e"])
    distill.add_argument("--model", default="smollm2")
    distill.add_argument("--init", help="start from this adapter (e.g. the layer-wise result for 'e2e')")
    distill.add_argument("--backbone", default="cats")
    distill.add_argument("--density", type=float, default=0.5)
    distill.add_argument("--rank", type=int, default=256)
    distill.add_argument("--layers", default="all", help="'all', 'first-half' or indices like 0,1,2")
    distill.add_argument("--epochs", type=float, help="default: 20 layer-wise, 3 end-to-end (paper Table 6)")
    distill.add_argument("--lr", type=float, help="default: 1e-3 layer-wise, 2e-5 end-to-end")
    distill.add_argument("--batch-size", type=int, default=8)
    distill.add_argument("--grad-accum", type=int, default=1)
    distill.add_argument("--max-length", type=int, help="truncate prompt + completion to this many tokens")
    distill.add_argument("--logging-steps", type=int, default=10)
    distill.add_argument("--no-checkpoints", action="store_true", help="do not save trainer checkpoints")
    distill.add_argument("--resume", help="resume from this trainer checkpoint folder")
    distill.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    distill.add_argument("--seed", type=int, default=0)
    distill.set_defaults(run=_distill)

    evaluate = commands.add_parser("eval", help="compare dense, backbone-only and trained Caprese models side by side")
    evaluate.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, or a transformers model")
    evaluate.add_argument(
        "--adapter", action="extend", nargs="+", default=[], help="Caprese adapters (folders or Hub ids) to compare"
    )
    evaluate.add_argument(
        "--backbone",
        help="backbone alone (R = 0); default: cats if --density/--layers or no --adapter is given, "
        "else each adapter's own backbone",
    )
    evaluate.add_argument("--density", type=float, help="density of the backbone alone, in (0, 1] (default 0.5)")
    evaluate.add_argument("--layers", help="layers of the backbone alone: 'all', 'first-half' or indices like 0,1,2")
    evaluate.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="JSONL or HF dataset of question + answer records, or prompt-completion records with an answer (synth)",
    )
    evaluate.add_argument("--split", default="dev", choices=["train", "dev", "all"], help="dev = the last --dev-size")
    evaluate.add_argument("--dev-size", type=int, default=500)
    evaluate.add_argument("--limit", type=int, help="at most this many problems")
    evaluate.add_argument("--question-field", help="field holding the problem (default: question, problem or prompt)")
    evaluate.add_argument("--instruction", default="Please reason step by step.", help="appended to each question")
    evaluate.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    evaluate.add_argument("--hf-config", help="configuration of a Hugging Face dataset (e.g. 'main' for gsm8k)")
    evaluate.add_argument("--output", required=True, help="folder for results.json, report.md and plots")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--timing-tokens", type=int, default=32, help="tokens generated to time TTNT")
    evaluate.add_argument("--timing-repeats", type=int, default=3, help="timing runs per method (median)")
    evaluate.set_defaults(run=_eval)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"caprese-peft {args.command}: {error}")


if __name__ == "__main__":
    main()
