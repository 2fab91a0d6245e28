"""Side-by-side evaluation of dense, backbone-only and trained Caprese models on the same math problems.

``evaluate_methods`` runs every method (greedy) and collects accuracy, response lengths, teacher-forced KL
and perplexity, greedy agreement with the dense model, parameter counts and measured latency, as the
results dict that ``caprese_peft.eval.report.write_report`` writes.

math_verify is imported only by the functions that need it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backbones import check_density
from ..data.features import features_from_record
from ..data.generation import batches, greedy_generations
from .compare import continuation_kl
from .latency import device_name, measure_latency
from .methods import DENSE, check_inputs, frozen, method_model, param_counts, plan_methods


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
        # dense first, whatever the plan's order: every other method's KL is scored on continuations made from it
        order = sorted(methods, key=lambda name: methods[name]["kind"] != DENSE)
        with tqdm(total=len(methods) * (n_batches + 2), desc="Evaluating", unit="step", disable=not progress) as bar:
            for name in order:
                method = methods[name]
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
                    elif continuations:  # none when the dense model's responses are all empty
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


__all__ = ["dense_continuations", "evaluate_methods"]
