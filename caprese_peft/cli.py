"""The ``caprese-peft`` command: ``synth`` (distillation data), ``distill`` (train an adapter), ``eval`` (compare),
``sweep`` (test-time density), ``coverage`` (best-of-N) and ``lm-eval`` (lm-evaluation-harness with Caprese)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .backbones import check_density
from .config import resolve_layers

DEFAULT_DATA = "../shared/data/gsm8k/train.jsonl"
# the stand-in `distill` gives a fresh adapter by default: the best recipe measured per backbone (docs/recovery.md);
# its fast decode path is the C++ CPU op (on CUDA it decodes through the reference, with a warning)
DEFAULT_STAND_IN_BITS = {"cats": 4, "griffin": 4}


def _synth(args: argparse.Namespace) -> None:
    from .data.problems import load_problems
    from .distill.synth import synthesize
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
    layers = resolve_layers(args.layers, base.config.get_text_config().num_hidden_layers)
    bits = getattr(args, "stand_in_bits", None)
    bits = DEFAULT_STAND_IN_BITS.get(args.backbone) if bits is None else bits or None  # 0: none
    config = CapreseConfig(
        backbone=args.backbone, density=args.density, r=args.rank, layers_to_transform=layers, stand_in_bits=bits
    )
    return get_peft_model(base, config)


def _distill(args: argparse.Namespace) -> None:
    from .data.features import CapreseDataCollator, load_prompt_completion
    from .distill import CapreseTrainer, CapreseTrainingArguments, fit_closed_form
    from .loading import load_model
    from .model_card import update_model_card

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
            loss=args.loss,
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
    summary["seconds"] = round(time.perf_counter() - start, 1)
    update_model_card(model, training_data=args.data, training=_training_record(args, summary))
    model.save_pretrained(output)
    (output / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"adapter -> {output}  {summary}")


def _training_record(args: argparse.Namespace, summary: dict) -> dict:
    """What the model card says about a distillation run: its stage, settings and result."""
    record = {"stage": args.stage, "init": args.init, "epochs": args.epochs, "learning_rate": args.lr}
    if args.stage == "e2e":
        record["loss"] = args.loss
    record.update({"batch_size": args.batch_size * args.grad_accum, "max_length": args.max_length, **summary})
    return {k: v for k, v in record.items() if v is not None}


def _problems(args: argparse.Namespace) -> list:
    """Checks everything that can be checked without the model (output folder, density, data), then the problems."""
    from .data.problems import load_eval_problems
    from .eval.output import check_output_dir

    check_output_dir(args.output, args.overwrite)
    if getattr(args, "density", None) is not None:
        check_density(args.density)
    return load_eval_problems(
        args.data,
        split=args.split,
        dev_size=args.dev_size,
        limit=args.limit,
        question_field=args.question_field,
        instruction=args.instruction or None,
        hf_split=args.hf_split,
        hf_config=args.hf_config,
    )


def _info(args: argparse.Namespace) -> dict:
    return {"model": args.model, "data": str(args.data), "split": args.split}


def _card_targets(args: argparse.Namespace) -> list[Path]:
    """The adapter folders whose model cards ``--card`` updates; raises for one that is not a local folder."""
    if not args.card:
        return []
    if not args.adapter:
        raise ValueError("--card records figures in the adapters' model cards: pass --adapter.")
    folders = [Path(a) for a in args.adapter]
    remote = [str(f) for f in folders if not (f / "adapter_config.json").is_file()]
    if remote:
        raise ValueError(
            f"--card writes into the adapter folder, but {remote} is not a local adapter folder; download it first."
        )
    return folders


def _record_eval(results: dict, args: argparse.Namespace) -> None:
    """Write an eval run's figures into each adapter's model card, with dense and the backbone as baselines."""
    from .model_card import describe_source, update_model_card

    def figures(method: dict) -> dict:
        values = {
            "accuracy": method["accuracy"],
            "mean_length": method["length"]["mean"],
            "kl": method["kl"],
            "perplexity": method["perplexity"],
            "agreement_length": method["agreement"]["mean"],
            "active_fraction": method["active_params"] / method["total_params"],
            "ttnt_ms": method["latency"]["ttnt_ms"],
        }
        return {k: v for k, v in values.items() if v is not None}

    methods = results["methods"]
    baselines = {name: figures(m) for name, m in methods.items() if m["kind"] != "adapter"}
    dataset = f"{describe_source(args.data)}, {args.split} split, {results['problems']} problems"
    notes = f"greedy, at most {args.max_new_tokens} new tokens, latency on {results['device']}"
    for m in methods.values():
        if m["kind"] == "adapter":
            update_model_card(m["source"], metrics=figures(m), dataset=dataset, baselines=baselines, notes=notes)


def _eval(args: argparse.Namespace) -> None:
    from .eval.evaluate import evaluate_methods
    from .eval.report import write_report
    from .loading import load_model

    # everything that can be checked without the model fails here, before the model loads
    problems = _problems(args)
    cards = _card_targets(args)
    layers = args.layers
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
        kl_problems=args.kl_problems,
        fast=args.fast_decode,
        info=_info(args),
    )
    results["seconds"] = round(time.perf_counter() - start, 1)
    output = write_report(results, args.output, overwrite=args.overwrite)
    if cards:
        _record_eval(results, args)
        print(f"figures recorded in the model cards of {', '.join(map(str, cards))}")
    for name, method in results["methods"].items():
        print(f"{name}: accuracy {method['accuracy']:.1%}, mean length {method['length']['mean']:.1f} tokens")
    print(f"report -> {output / 'report.md'} ({results['seconds']:.0f} s)")


def _densities(spec: str) -> list[float]:
    try:
        return [float(d) for d in spec.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"--densities takes comma-separated numbers like 0.3,0.5,0.7, got {spec!r}.") from None


def _sweep(args: argparse.Namespace) -> None:
    from .eval.sweep import check_densities, density_sweep, write_sweep_report
    from .loading import load_model

    densities = check_densities(_densities(args.densities))
    problems = _problems(args)
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    results = density_sweep(
        model,
        tokenizer,
        problems,
        densities=densities,
        adapters=args.adapter,
        backbone=args.backbone,
        layers=args.layers,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        kl_batch_size=args.kl_batch_size,
        info=_info(args),
    )
    results["seconds"] = round(time.perf_counter() - start, 1)
    output = write_sweep_report(results, args.output, overwrite=args.overwrite)
    for name, method in results["methods"].items():
        accuracies = ", ".join(f"{p['density']:g}: {p['accuracy']:.1%}" for p in method["points"])
        print(f"{name}: accuracy {accuracies}")
    print(f"report -> {output / 'report.md'} ({results['seconds']:.0f} s)")


def _coverage(args: argparse.Namespace) -> None:
    from .eval.coverage import best_of_n, check_sampling, write_coverage_report
    from .loading import load_model

    check_sampling(n=args.n, pools=args.pools, temperature=args.temperature, top_p=args.top_p)
    problems = _problems(args)
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    results = best_of_n(
        model,
        tokenizer,
        problems,
        n=args.n,
        pools=args.pools,
        adapters=args.adapter,
        backbone=args.backbone,
        density=args.density,
        layers=args.layers,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        info=_info(args),
    )
    results["seconds"] = round(time.perf_counter() - start, 1)
    output = write_coverage_report(results, args.output, overwrite=args.overwrite)
    for name, method in results["methods"].items():
        print(
            f"{name}: pass@1 {method['coverage'][0]:.1%}, pass@{args.n} {method['coverage'][-1]:.1%} "
            f"at {method['relative_compute'][-1]:.2f} relative compute"
        )
    print(f"report -> {output / 'report.md'} ({results['seconds']:.0f} s)")


def _add_problem_args(parser: argparse.ArgumentParser) -> None:
    """The flags naming the model, the problems and the output folder, shared by eval, sweep and coverage."""
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, or a transformers model")
    parser.add_argument(
        "--adapter", action="extend", nargs="+", default=[], help="Caprese adapters (folders or Hub ids) to compare"
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="JSONL or HF dataset of question + answer records, or prompt-completion records with an answer (synth)",
    )
    parser.add_argument("--split", default="dev", choices=["train", "dev", "all"], help="dev = the last --dev-size")
    parser.add_argument("--dev-size", type=int, default=500)
    parser.add_argument("--limit", type=int, help="at most this many problems")
    parser.add_argument("--question-field", help="field holding the problem (default: question, problem or prompt)")
    parser.add_argument("--instruction", default="Please reason step by step.", help="appended to each question")
    parser.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    parser.add_argument("--hf-config", help="configuration of a Hugging Face dataset (e.g. 'main' for gsm8k)")
    parser.add_argument("--output", required=True, help="folder for results.json, report.md and plots")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences generated together")


def _add_backbone_args(parser: argparse.ArgumentParser, density: bool = True) -> None:
    parser.add_argument(
        "--backbone",
        help="backbone alone (R = 0); default: cats if --density/--layers or no --adapter is given, "
        "else each adapter's own backbone",
    )
    if density:
        parser.add_argument("--density", type=float, help="density of the backbone alone, in (0, 1] (default 0.5)")
    parser.add_argument("--layers", help="layers of the backbone alone: 'all', 'first-half' or indices like 0,1,2")


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
    distill.add_argument(
        "--stage",
        default="closed-form",
        choices=["layerwise", "closed-form", "e2e"],
        help="closed-form (default): the exact solution of equation 7, the best measured recipe with CATS's stand-in "
        "(docs/recovery.md); layerwise: equation 7 by Adam (paper Table 6); e2e: equation 8, usually from --init",
    )
    distill.add_argument("--model", default="smollm2")
    distill.add_argument("--init", help="start from this adapter (e.g. the layer-wise result for 'e2e')")
    distill.add_argument(
        "--loss", default="mse", choices=["mse", "kl"], help="end-to-end loss: last hidden state MSE or next-token KL"
    )
    distill.add_argument("--backbone", default="cats")
    distill.add_argument("--density", type=float, default=0.5)
    distill.add_argument("--rank", type=int, default=256)
    distill.add_argument("--layers", default="all", help="'all', 'first-half' or indices like 0,1,2")
    distill.add_argument(
        "--stand-in-bits",
        type=int,
        help="bits of the stand-in of dropped neurons (CapreseConfig.stand_in_bits); default 4, the best measured "
        "recipe (docs/recovery.md; its fast decode path is the C++ CPU op); 0 for none (the paper's correction alone)",
    )
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
    _add_problem_args(evaluate)
    _add_backbone_args(evaluate)
    evaluate.add_argument("--timing-tokens", type=int, default=32, help="tokens generated to time TTNT")
    evaluate.add_argument("--timing-repeats", type=int, default=3, help="timing runs per method (median)")
    evaluate.add_argument(
        "--kl-problems", type=int, help="score KL and perplexity on the first N problems' continuations (default all)"
    )
    evaluate.add_argument(
        "--fast-decode",
        action="store_true",
        help="generate with caprese_peft.FastDecoder (Llama, Mistral, Qwen2, Qwen3; no reselection): less work per step, "
        "the same computation in another order (a sparse backbone may then part from generate at a near-tie)",
    )
    evaluate.add_argument(
        "--card", action="store_true", help="record the measured figures in each (local) adapter's model card"
    )
    evaluate.set_defaults(run=_eval)

    sweep = commands.add_parser(
        "sweep", help="test-time density: run adapters at other densities than trained at, against the backbone alone"
    )
    _add_problem_args(sweep)
    _add_backbone_args(sweep, density=False)
    sweep.add_argument(
        "--densities", default="0.3,0.4,0.5,0.6,0.7", help="comma-separated test-time densities, each in (0, 1]"
    )
    sweep.add_argument("--kl-batch-size", type=int, default=4, help="sequences per teacher-forced KL pass")
    sweep.set_defaults(run=_sweep)

    coverage = commands.add_parser(
        "coverage", help="best-of-N coverage (pass@k, k = 1..N) of dense, backbone and adapters against compute"
    )
    _add_problem_args(coverage)
    _add_backbone_args(coverage)
    coverage.add_argument("--n", type=int, default=8, help="N: sampled responses per problem in each pool")
    coverage.add_argument("--pools", type=int, default=2, help="independent pools of N averaged over")
    coverage.add_argument("--temperature", type=float, default=0.7)
    coverage.add_argument("--top-p", type=float, default=1.0)
    coverage.add_argument("--seed", type=int, default=0)
    coverage.set_defaults(run=_coverage)

    commands.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with Caprese registered; takes lm-eval's own arguments",
        add_help=False,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval's own parser
        from .lm_eval import main as lm_eval_main

        lm_eval_main(argv[1:])
        return
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"caprese-peft {args.command}: {error}")


if __name__ == "__main__":
    main()
