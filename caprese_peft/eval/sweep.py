"""Test-time density sweep (appendix G): adapters trained at one density, run at others, against the backbone alone.

``density_sweep`` runs every method (each adapter and its backbone alone, with ``R = 0``) at each density
of the sweep without retraining, plus the dense model once as the reference; ``write_sweep_report``
writes ``results.json``, ``report.md``, ``accuracy.png`` and ``kl.png`` into a folder, all or nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import check_density
from ..data.generation import batches, greedy_generations
from ..density import test_time_density
from .compare import continuation_kl
from .evaluate import dense_continuations
from .latency import device_name
from .methods import DENSE, check_inputs, frozen, method_model, param_counts, plan_methods
from .output import staged_output

SWEEP_FILES = ("results.json", "report.md", "accuracy.png", "kl.png")
KL_LABEL = "KL(dense || model)"


def check_densities(densities: Sequence[float]) -> list[float]:
    """The sweep's densities, sorted and without repeats; raises for an empty sweep or one outside (0, 1]."""
    if isinstance(densities, (str, bytes)) or not len(densities):
        raise ValueError(f"densities must be a non-empty list of numbers in (0, 1], got {densities!r}.")
    return sorted({check_density(d) for d in densities})


def _sweep_label(name: str, method: dict[str, Any]) -> str:
    config = method["config"]
    if method["kind"] == "backbone":
        # the plan names a backbone after its density, which the sweep varies
        layers = "" if config["layers"] == "all" else f" layers {','.join(map(str, config['layers']))}"
        return f"{config['backbone']} alone{layers}"
    return f"{name} (trained at {config['density']:g})"


@torch.no_grad()
def density_sweep(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    *,
    densities: Sequence[float],
    adapters: Sequence[str | os.PathLike] = (),
    backbone: str | None = None,
    layers: str | Sequence[int] | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    kl_batch_size: int = 4,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy, KL(dense || method), response length and active parameters of each method at each density.

    Methods: each adapter, run with ``test_time_density`` at every density (no retraining), and the
    backbone alone (``R = 0``) at the same densities: the adapters' own backbones, or the one given by
    ``backbone``/``layers``. The dense model runs once as the reference. Decoding is greedy; the KL is
    teacher-forced on the dense model's greedy responses (or the problems' completions).

    Args:
        model: the base model (not a PEFT model).
        tokenizer: its tokenizer, with a chat template.
        problems: from ``caprese_peft.data.load_eval_problems``.
        densities: the test-time densities, each in (0, 1].
        adapters: saved Caprese adapters (folders or Hub ids).
        info: extra entries for the results (e.g. the model and data names).
    """
    from tqdm.auto import tqdm

    from .metrics import check_answer, length_summary

    densities = check_densities(densities)
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    check_inputs(model, tokenizer, problems)
    prompts = [p["prompt"] for p in problems]

    def run(runner: nn.Module) -> dict[str, Any]:
        outputs: list[tuple[str, list[int]]] = []
        for batch in batches(prompts, batch_size):
            outputs += greedy_generations(
                runner, tokenizer, batch, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False
            )
            bar.update()
        correct = [check_answer(text, p["answer"]) for (text, _), p in zip(outputs, problems)]
        return {
            "accuracy": sum(correct) / len(correct),
            "correct": sum(correct),
            "mean_length": length_summary([len(ids) for _, ids in outputs])["mean"],
            "outputs": outputs,
        }

    with frozen(model):
        methods = plan_methods(model, adapters, backbone, None, layers)  # the sweep sets each density
        swept = {name: m for name, m in methods.items() if m["kind"] != DENSE}
        n_batches = -(-len(prompts) // batch_size)
        total = n_batches + len(swept) * len(densities) * (n_batches + 1)
        results: dict[str, dict[str, Any]] = {}
        with tqdm(total=total, desc="Density sweep", unit="step", disable=not progress) as bar:
            bar.set_description("dense")
            with method_model(model, methods[DENSE]) as runner:
                dense = run(runner)
                continuations, kl_on = dense_continuations(tokenizer, problems, dense.pop("outputs"))
                counts = param_counts(runner, DENSE)
            results[DENSE] = {
                "kind": DENSE,
                "source": None,
                "config": None,
                "points": [{"density": 1.0, **dense, "kl": 0.0, **counts, "active_fraction": 1.0}],
            }
            taken = {DENSE}
            for name, method in swept.items():
                label = _sweep_label(name, method)
                while label in taken:
                    label += "'"
                taken.add(label)
                points = []
                with method_model(model, method) as runner:
                    for density in densities:
                        bar.set_description(f"{label} @ {density:g}")
                        with test_time_density(runner, density):
                            point = {"density": density, **run(runner)}
                            point.pop("outputs")
                            point["kl"] = (
                                continuation_kl(runner, continuations, batch_size=kl_batch_size, progress=False)["kl"]
                                if continuations
                                else None
                            )
                            counts = param_counts(runner, method["kind"])
                        bar.update()
                        points.append(
                            {**point, **counts, "active_fraction": counts["active_params"] / counts["total_params"]}
                        )
                results[label] = {
                    "kind": method["kind"],
                    "source": method["source"],
                    "config": method["config"],
                    "points": points,
                }
    return {
        **(info or {}),
        "problems": len(problems),
        "densities": densities,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "kl_on": kl_on,
        "device": device_name(next(model.parameters()).device),
        "methods": results,
    }


def sweep_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, density) for ``plot_density_sweep``; the dense reference is repeated at every density."""
    rows = []
    for name, method in results["methods"].items():
        if method["kind"] == DENSE:
            point = method["points"][0]
            rows += [{**point, "method": name, "density": d} for d in results["densities"]]
        else:
            rows += [{**point, "method": name} for point in method["points"]]
    return rows


def sweep_markdown(results: dict[str, Any]) -> str:
    """The ``report.md`` text of a density sweep: a header and one table row per (method, density)."""
    lines = [
        "# Caprese test-time density sweep",
        "",
        f"Model `{results.get('model', '?')}`, data `{results.get('data', '?')}` ({results['problems']} problems), "
        f"greedy decoding, at most {results['max_new_tokens']} new tokens. Adapters keep the `L` and `R` they were "
        "trained with; only the backbone's density changes. The backbone alone runs with `R = 0`. "
        f"KL(dense‖model) is teacher-forced on the {results['kl_on']}.",
        "",
        "| method | density | accuracy | KL(dense‖model) | mean response length | active params / generated token |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, method in results["methods"].items():
        for p in method["points"]:
            kl = "n/a" if p["kl"] is None else f"{p['kl']:.4f}"
            density = "dense" if method["kind"] == DENSE else f"{p['density']:g}"
            lines.append(
                f"| {name} | {density} | {p['accuracy']:.1%} ({p['correct']}/{results['problems']}) | {kl} "
                f"| {p['mean_length']:.1f} | {p['active_fraction']:.1%} |"
            )
    lines += ["", "![Accuracy against density](accuracy.png)", "", "![KL against density](kl.png)", ""]
    return "\n".join(lines)


def write_sweep_report(results: dict[str, Any], output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``results.json``, ``report.md``, ``accuracy.png`` and ``kl.png`` into ``output_dir``, all or nothing."""
    from .plots import plot_density_sweep

    rows = sweep_rows(results)
    with staged_output(output_dir, overwrite=overwrite) as staging:
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (staging / "report.md").write_text(sweep_markdown(results))
        plot_density_sweep(rows, staging / "accuracy.png", metric="accuracy")
        kl_rows = [{**r, KL_LABEL: r["kl"]} for r in rows if r["kl"] is not None]
        if kl_rows:
            plot_density_sweep(kl_rows, staging / "kl.png", metric=KL_LABEL)
    return Path(output_dir)


__all__ = ["SWEEP_FILES", "check_densities", "density_sweep", "sweep_markdown", "sweep_rows", "write_sweep_report"]
