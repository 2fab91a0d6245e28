"""Side-by-side evaluation of dense, backbone-only and trained Caprese models, written as a report folder.

``evaluate_methods`` runs every method on the same math problems (greedy) and collects accuracy,
response lengths, teacher-forced KL and perplexity, greedy agreement with the dense model, parameter
counts and measured latency; ``write_report`` writes ``results.json``, ``report.md`` and PNG plots into
a folder atomically (a temporary folder renamed into place), so a failed run leaves nothing behind.

datasets, matplotlib and math_verify are imported only by the functions that need them.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import check_density
from ..config import resolve_layers
from ..data.features import features_from_record
from ..data.generation import batches, greedy_generations
from .compare import continuation_kl
from .output import check_output_dir, staged_output

DENSE = "dense"
DEFAULT_BACKBONE = "cats"
DEFAULT_DENSITY = 0.5
REPORT_FILES = ("results.json", "report.md", "lengths.png", "scores.png")


def _backbone_label(backbone: str, density: float, layers: list[int] | None, n_layers: int) -> str:
    label = f"{backbone} {density:g}"
    if layers is None or sorted(layers) == list(range(n_layers)):
        return label
    if sorted(layers) == list(range(n_layers // 2)):
        return f"{label} first-half"
    return f"{label} layers {','.join(str(i) for i in layers)}"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _adapter_configs(adapters: Sequence[str | os.PathLike]) -> list[tuple[str, Any]]:
    """``(source, CapreseConfig)`` of each adapter; raises for one that is missing or not a Caprese adapter."""
    from peft import PeftConfig

    from ..registration import CAPRESE

    configs = []
    for source in adapters:
        try:
            config = PeftConfig.from_pretrained(str(source))
        except Exception as error:  # PEFT raises ValueError or hub errors for a folder or id it cannot read
            raise ValueError(f"Cannot read the adapter {str(source)!r}: {error}") from error
        if config.peft_type != CAPRESE:
            kind = getattr(config.peft_type, "value", config.peft_type)
            raise ValueError(f"The adapter {str(source)!r} is a {kind} adapter, not a Caprese one.")
        configs.append((str(source), config))
    return configs


def plan_methods(
    base: nn.Module,
    adapters: Sequence[str | os.PathLike],
    backbone: str | None,
    density: float | None,
    layers: str | Sequence[int] | None,
) -> dict[str, dict[str, Any]]:
    """The methods to compare, by display name: ``kind``, ``source`` (adapter) and ``config``.

    Every backbone and adapter is put on the base model and taken off again here, before any generation,
    so that one that does not fit the base model (another hidden size, missing layers) fails the run at once.
    """
    from ..config import CapreseConfig

    n_layers = base.config.get_text_config().num_hidden_layers
    loaded = _adapter_configs(adapters)
    taken = {DENSE}
    methods: dict[str, dict[str, Any]] = {DENSE: {"kind": DENSE, "source": None, "config": None}}

    def add_backbone(config: CapreseConfig) -> None:
        label = _backbone_label(config.backbone, config.density, config.layers_to_transform, n_layers)
        methods[_unique(f"backbone {label}", taken)] = {
            "kind": "backbone",
            "source": None,
            "config": _describe_config(config, rank=False),
            "peft_config": config,
        }

    if backbone is not None or density is not None or layers is not None or not loaded:
        add_backbone(
            CapreseConfig(
                backbone=backbone or DEFAULT_BACKBONE,
                density=check_density(DEFAULT_DENSITY if density is None else density),
                r=1,  # R = 0: the correction vanishes and the backbone runs alone
                layers_to_transform=resolve_layers(layers, n_layers),
            )
        )
    else:  # the backbones of the adapters themselves, each once
        seen = set()
        for _, config in loaded:
            key = (config.backbone, config.density, str(config.layers_to_transform), str(config.target_modules))
            if key not in seen:
                seen.add(key)
                add_backbone(
                    CapreseConfig(
                        backbone=config.backbone,
                        density=config.density,
                        r=1,
                        target_modules=config.target_modules,
                        exclude_modules=config.exclude_modules,
                        layers_to_transform=config.layers_to_transform,
                        layers_pattern=config.layers_pattern,
                    )
                )
    for source, config in loaded:
        name = _unique(Path(source.rstrip("/")).name or source, taken)
        methods[name] = {"kind": "adapter", "source": source, "config": _describe_config(config)}

    for method in methods.values():
        with method_model(base, method):
            pass
    return methods


def _describe_config(config: Any, rank: bool = True) -> dict[str, Any]:
    layers = config.layers_to_transform
    return {
        "backbone": config.backbone,
        "density": config.density,
        "layers": "all" if layers is None else list(layers),
        "r": config.r if rank else 0,
    }


@contextmanager
def method_model(base: nn.Module, method: dict[str, Any]):
    """``base`` as ``method`` runs it: itself for dense, else wrapped with the method's adapter until exit.

    A Caprese model holds one adapter at a time, so each method gets its own short-lived wrapper.
    """
    import copy

    from peft import PeftModel, get_peft_model

    if method["kind"] == DENSE:
        yield base
        return
    if method["kind"] == "backbone":
        # PEFT fills the config in (target modules, sizes): wrap with a copy, keep the plan as it was
        model = get_peft_model(base, copy.deepcopy(method["peft_config"]))
    else:
        try:
            model = PeftModel.from_pretrained(base, method["source"])
        except ValueError as error:  # e.g. an adapter made for a base model of another hidden size
            raise ValueError(f"The adapter {method['source']!r} does not fit the model: {error}") from error
    try:
        yield model.eval()
    finally:
        model.unload()


def check_inputs(model: nn.Module, tokenizer: Any, problems: Sequence[dict[str, Any]]) -> None:
    """Raise before any work unless ``model`` is a base model, ``tokenizer`` has a chat template and every problem
    has a prompt and an answer."""
    if hasattr(model, "peft_config"):
        raise ValueError("Pass the base model: the evaluation adds the Caprese adapters itself.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; evaluation writes chat prompts through it.")
    if not problems:
        raise ValueError("problems is empty: there is nothing to evaluate on.")
    lacking = [p.get("id", i) for i, p in enumerate(problems) if not p.get("answer") or not p.get("prompt")]
    if lacking:
        raise ValueError(f"Problems {lacking[:10]} lack a prompt or an answer (found {sorted(problems[0])}).")


@contextmanager
def frozen(model: nn.Module):
    """``model`` with gradients off for the block, restored after; a wrapped base is frozen, so dense runs match."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_latency(
    model: nn.Module, tokenizer: Any, prompt: list[dict[str, str]], *, new_tokens: int = 32, repeats: int = 3
) -> dict[str, float]:
    """Time to first token and to each next token (ms) for one chat prompt at batch size 1, as run now.

    TTFT is one forward over the prompt (the prefill); TTNT is ``(time of generate(new_tokens) - TTFT) /
    (new_tokens - 1)``, the mean decode step. Medians over ``repeats`` runs after one warm-up run.
    """
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"new_tokens must be >= 2 and repeats >= 1, got {new_tokens} and {repeats}.")
    device = model.device
    inputs = tokenizer.apply_chat_template(
        [prompt], add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    ).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prefill() -> None:
        model(**inputs, logits_to_keep=1)  # generate's prefill, which needs the last position's logits only

    def generate() -> None:
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )

    prefill()  # warm-up: allocations, lazy initialisation
    generate()
    ttft = statistics.median(_timed(prefill, device) for _ in range(repeats))
    total = statistics.median(_timed(generate, device) for _ in range(repeats))
    return {
        "ttft_ms": 1e3 * ttft,
        "ttnt_ms": 1e3 * (total - ttft) / (new_tokens - 1),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


def dense_continuations(
    tokenizer: Any, problems: Sequence[dict[str, Any]], dense: Sequence[tuple[str, list[int]]]
) -> tuple[list[dict[str, list]], str]:
    """Tokenized teacher-forcing records: the data's completions, else the dense model's greedy responses."""
    if all("completion" in p for p in problems):
        features = []
        for problem in problems:
            try:
                features.append(features_from_record(problem, tokenizer))
            except (TypeError, ValueError) as error:
                raise ValueError(f"Problem {problem['id']}: {error}") from error
        return features, "completions in the data"
    features = []
    eos = tokenizer.eos_token_id
    for problem, (_, ids) in zip(problems, dense):
        ids = ids[:-1] if ids and ids[-1] == eos else ids  # the EOS is never an input while generating
        if not ids:
            continue
        prompt = tokenizer.apply_chat_template(
            problem["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        prompt = list(prompt)
        features.append(
            {
                "input_ids": prompt + list(ids),
                "attention_mask": [1] * (len(prompt) + len(ids)),
                "prompt_mask": [True] * len(prompt) + [False] * len(ids),
            }
        )
    return features, "greedy responses of the dense model"


def param_counts(model: nn.Module, kind: str) -> dict[str, int]:
    """``total_params``, ``active_params`` (per generated token) and ``adapter_params`` of a method's model."""
    from ..accounting import parameter_report

    if kind == DENSE:
        total = sum(p.numel() for p in model.parameters())
        return {"total_params": total, "active_params": total, "adapter_params": 0}
    report = parameter_report(model)
    if kind == "backbone":  # R = 0: the correction adds nothing a token needs to read
        return {
            "total_params": report.total,
            "active_params": report.active_per_token - report.adapter,
            "adapter_params": 0,
        }
    return {"total_params": report.total, "active_params": report.active_per_token, "adapter_params": report.adapter}


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (n threads)``."""
    if device.type == "cuda":
        return torch.cuda.getdevice_name(device)
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'' if threads == 1 else 's'})"


@torch.no_grad()
def evaluate_methods(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    *,
    adapters: Sequence[str | os.PathLike] = (),
    backbone: str | None = None,
    density: float | None = None,
    layers: str | Sequence[int] | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    kl_batch_size: int = 4,
    timing_tokens: int = 32,
    timing_repeats: int = 3,
    kl_problems: int | None = None,
    fast: bool = False,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the dense model, the backbone alone and each adapter on ``problems``; returns the results dict.

    Methods: ``"dense"`` (the adapter disabled); the backbone alone, a fresh Caprese adapter with ``R = 0``
    built from ``backbone``/``density``/``layers`` (defaults ``cats``/0.5/all when none is given and no
    adapter is), or else from each adapter's own config; and each adapter (named after its folder).

    For each method: accuracy of its greedy answers (math_verify against ``answer``), response lengths,
    mean per-token KL(dense || method) and perplexity on teacher-forced continuations (the problems'
    ``completion`` when they have one, else the dense greedy responses), greedy agreement length with
    the dense responses, parameters per generated token, and TTFT/TTNT measured at batch size 1.

    Args:
        model: the base model (not a PEFT model); it is wrapped for the run and unwrapped at the end.
        tokenizer: its tokenizer, with a chat template.
        problems: from ``caprese_peft.data.load_eval_problems``: ``{"id", "prompt" (chat messages), "answer", "completion"?}``.
        adapters: saved Caprese adapters (folders or Hub ids).
        kl_problems: score KL and perplexity on the continuations of the first this many problems only
            (default all): two teacher-forced passes per method over every continuation cost more than the
            generations on a CPU.
        fast: generate with ``caprese_peft.FastDecoder`` (Llama, Mistral, Qwen2, Qwen3; no reselection) for
            every method, with less work per step: the same computation in another order, so a sparse backbone can
            part from ``generate`` where an activation sits next to its threshold. TTFT/TTNT are timed with
            ``generate``.
        info: extra entries for the results (e.g. the model and data names).
    """
    from tqdm.auto import tqdm

    from .metrics import agreement_lengths, check_answer, length_summary

    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
        ("kl_batch_size", kl_batch_size),
        ("kl_problems", 1 if kl_problems is None else kl_problems),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if density is not None:
        check_density(density)
    check_inputs(model, tokenizer, problems)

    # a wrapped base is frozen: freeze it for the dense runs too, so every method gets the same numerics
    with frozen(model):
        methods = plan_methods(model, adapters, backbone, density, layers)
        prompts = [p["prompt"] for p in problems]
        n_batches = -(-len(prompts) // batch_size)
        generations: dict[str, list[tuple[str, list[int]]]] = {}
        continuations: list[dict[str, list]] = []
        continuation_source = ""
        with tqdm(total=len(methods) * (n_batches + 2), desc="Evaluating", unit="step", disable=not progress) as bar:
            for name, method in methods.items():
                kind = method["kind"]
                with method_model(model, method) as runner:
                    bar.set_description(f"{name}: greedy")
                    outputs: list[tuple[str, list[int]]] = []
                    for batch in batches(prompts, batch_size):
                        outputs += greedy_generations(
                            runner,
                            tokenizer,
                            batch,
                            max_new_tokens=max_new_tokens,
                            batch_size=batch_size,
                            progress=False,
                            fast=fast,
                        )
                        bar.update()
                    generations[name] = outputs

                    bar.set_description(f"{name}: KL")
                    if kind == DENSE:
                        continuations, continuation_source = dense_continuations(
                            tokenizer, problems[:kl_problems], outputs[:kl_problems]
                        )
                    elif continuations:
                        method["kl_stats"] = continuation_kl(
                            runner, continuations, batch_size=kl_batch_size, progress=False
                        )
                    bar.update()

                    bar.set_description(f"{name}: timing")
                    method["latency"] = measure_latency(
                        runner,
                        tokenizer,
                        prompts[0],
                        new_tokens=max(2, min(timing_tokens, max_new_tokens)),
                        repeats=timing_repeats,
                    )
                    method.update(param_counts(runner, kind))
                    bar.update()

    dense_ids = [ids for _, ids in generations[DENSE]]
    ppl_dense = next((m["kl_stats"]["ppl_dense"] for m in methods.values() if "kl_stats" in m), None)
    results_methods = {}
    for name, method in methods.items():
        texts = [text for text, _ in generations[name]]
        ids = [i for _, i in generations[name]]
        correct = [check_answer(text, p["answer"]) for text, p in zip(texts, problems)]
        lengths = [len(i) for i in ids]
        agreement = agreement_lengths(dense_ids, ids)
        stats = method.pop("kl_stats", None)
        method.pop("peft_config", None)
        if method["kind"] == DENSE:
            kl, ppl = (0.0, ppl_dense) if continuations else (None, None)  # KL(dense || dense) = 0 by definition
        else:
            kl, ppl = (stats["kl"], stats["ppl_model"]) if stats else (None, None)
        results_methods[name] = {
            **method,
            "accuracy": sum(correct) / len(correct),
            "correct": sum(correct),
            "length": length_summary(lengths),
            "lengths": lengths,
            "kl": kl,
            "perplexity": ppl,
            "agreement": {
                "mean": statistics.fmean(agreement),
                "median": float(statistics.median(agreement)),
                "full": sum(a == len(r) == len(c) for a, r, c in zip(agreement, dense_ids, ids)) / len(ids),
            },
            "samples": [
                {"id": p["id"], "correct": ok, "length": n, "agreement": a, "response": text}
                for p, ok, n, a, text in zip(problems, correct, lengths, agreement, texts)
            ],
        }
    device = next(model.parameters()).device
    return {
        **(info or {}),
        "problems": len(problems),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "kl_on": continuation_source,
        "kl_problems": min(len(problems), kl_problems or len(problems)),
        "decoder": "FastDecoder" if fast else "generate",
        "kl_tokens": sum(f["prompt_mask"].count(False) for f in continuations),
        "device": device_name(device),
        "torch": torch.__version__,
        "methods": results_methods,
    }


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _kl_subset(results: dict[str, Any]) -> str:
    subset = results.get("kl_problems", results["problems"])
    return "" if subset >= results["problems"] else f"of the first {subset} problems "


def report_markdown(results: dict[str, Any]) -> str:
    """The ``report.md`` text: a short header, one table row per method, and the plots."""
    methods = results["methods"]
    timing = next(iter(methods.values()))["latency"]
    lines = [
        "# Caprese evaluation",
        "",
        f"Model `{results.get('model', '?')}`, data `{results.get('data', '?')}` "
        f"({results['problems']} problems{', split ' + results['split'] if results.get('split') else ''}), "
        f"greedy decoding, at most {results['max_new_tokens']} new tokens, batch size {results['batch_size']}.",
        f"Responses generated with {results.get('decoder', 'generate')}. "
        f"KL(dense || model) and perplexity are teacher-forced on the {results['kl_on']} "
        f"{_kl_subset(results)}({results['kl_tokens']} tokens). Agreement length: leading tokens shared with the dense greedy response.",
        f"TTFT/TTNT measured on {results['device']} at batch size 1 (prompt of {timing['prompt_tokens']} tokens, "
        f"{timing['new_tokens']} new tokens, median of {timing['repeats']}).",
        "",
        "| method | accuracy | mean response length | KL(dense‖model) | perplexity | agreement length "
        "| active params / generated token | adapter params | TTFT ms | TTNT ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in methods.items():
        active = f"{_count(m['active_params'])} ({m['active_params'] / m['total_params']:.1%})"
        lines.append(
            f"| {name} | {m['accuracy']:.1%} ({m['correct']}/{m['length']['count']}) | {m['length']['mean']:.1f} "
            f"| {_number(m['kl'], '.4f')} | {_number(m['perplexity'], '.3f')} | {m['agreement']['mean']:.1f} "
            f"| {active} | {_count(m['adapter_params'])} | {m['latency']['ttft_ms']:.1f} "
            f"| {m['latency']['ttnt_ms']:.2f} |"
        )
    lines += ["", "![Response lengths](lengths.png)", "", "![Accuracy and agreement](scores.png)", ""]
    return "\n".join(lines)


def plot_scores(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Accuracy and mean greedy agreement length per method, as two bar charts side by side."""
    from .plots import plot_bars

    methods = results["methods"]
    panels = {
        "accuracy": {name: m["accuracy"] for name, m in methods.items()},
        "agreement length (tokens)": {name: m["agreement"]["mean"] for name, m in methods.items()},
    }
    return plot_bars(panels, path, ylims={"accuracy": (0.0, 1.05)})


def write_report(results: dict[str, Any], output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``results.json``, ``report.md``, ``lengths.png`` and ``scores.png`` into ``output_dir``.

    Everything is written into a temporary folder next to ``output_dir`` and renamed into place at the
    end, so ``output_dir`` is either complete or untouched. A non-empty ``output_dir`` is replaced only
    with ``overwrite=True``.
    """
    from .plots import plot_length_histograms

    with staged_output(output_dir, overwrite=overwrite) as staging:
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (staging / "report.md").write_text(report_markdown(results))
        plot_length_histograms({n: m["lengths"] for n, m in results["methods"].items()}, staging / "lengths.png")
        plot_scores(results, staging / "scores.png")
    return Path(output_dir)


__all__ = [
    "check_density",
    "check_inputs",
    "check_output_dir",
    "dense_continuations",
    "device_name",
    "evaluate_methods",
    "frozen",
    "measure_latency",
    "method_model",
    "param_counts",
    "plan_methods",
    "plot_scores",
    "report_markdown",
    "write_report",
]
