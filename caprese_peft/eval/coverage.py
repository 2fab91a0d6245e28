"""Best-of-N coverage (paper section 4): pass@k for k = 1..N from sampled responses, against relative compute.

``best_of_n`` samples ``pools x N`` responses per problem from each method (dense, backbone alone, each
adapter), scores them with an oracle verifier (math_verify against the reference answer), and averages
the unbiased pass@k over the independent pools of ``N``. Relative compute is ``k x A`` with ``A`` the
fraction of the model's parameters a generated token reads. ``write_coverage_report`` writes
``results.json``, ``report.md``, ``coverage.png`` (against relative compute) and ``coverage_n.png``
(against N), all or nothing.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import check_density
from ..data.generation import batches, generate_responses
from .latency import device_name
from .methods import check_inputs, frozen, method_model, param_counts, plan_methods
from .output import staged_output

COVERAGE_FILES = ("results.json", "report.md", "coverage.png", "coverage_n.png")


def pooled_coverage(correct: Sequence[Sequence[bool]], n: int) -> tuple[list[float], list[float]]:
    """Mean and standard deviation over pools of the coverage at k = 1..n.

    ``correct[p]`` holds the verdicts of one problem's samples, ``pools x n`` of them: pool ``j`` is
    samples ``j*n`` to ``(j+1)*n - 1``. Within a pool, coverage at k is the unbiased pass@k averaged over
    problems (``coverage_curve``); averaging over independent pools tames its variance as k nears n
    (the paper uses 10 pools of 100). The deviation is the sample one, 0 for a single pool.
    """
    from .metrics import coverage_curve

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not correct:
        raise ValueError("correct is empty: coverage needs at least one problem.")
    sizes = {len(row) for row in correct}
    if len(sizes) != 1 or next(iter(sizes)) % n or not next(iter(sizes)):
        raise ValueError(f"Every problem needs the same whole number of pools of {n} samples; got sizes {sizes}.")
    pools = next(iter(sizes)) // n
    ks = range(1, n + 1)
    curves = [coverage_curve([list(row[j * n : (j + 1) * n]) for row in correct], ks) for j in range(pools)]
    mean = [statistics.fmean(values) for values in zip(*curves)]
    std = [statistics.stdev(values) if pools > 1 else 0.0 for values in zip(*curves)]
    return mean, std


def check_sampling(*, n: int, pools: int, temperature: float, top_p: float) -> None:
    """Raise unless N and the number of pools are integers >= 1, temperature > 0 and top-p in (0, 1]."""
    for name, value in (("n", n), ("pools", pools)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}.")


@torch.no_grad()
def best_of_n(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    *,
    n: int = 8,
    pools: int = 2,
    adapters: Sequence[str | os.PathLike] = (),
    backbone: str | None = None,
    density: float | None = None,
    layers: str | Sequence[int] | None = None,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Best-of-N coverage of the dense model, the backbone alone and each adapter, in one run.

    Each method samples ``pools * n`` responses per problem (``temperature``, ``top_p``; the random
    generator is reset to ``seed`` before each method), every response is checked against the
    problem's answer, and ``pooled_coverage`` gives pass@k for k = 1..n averaged over the pools.
    Methods are planned as in ``evaluate_methods``: dense, the backbone alone (``R = 0``) from
    ``backbone``/``density``/``layers`` or from the adapters' configs, and each adapter.

    Returns a dict whose ``methods[name]`` holds ``ks``, ``coverage`` (mean over pools),
    ``coverage_std``, ``active_fraction`` and ``relative_compute`` (``k * active_fraction``).
    """
    from tqdm.auto import tqdm

    from .metrics import check_answer

    check_sampling(n=n, pools=pools, temperature=temperature, top_p=top_p)
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if density is not None:
        check_density(density)
    check_inputs(model, tokenizer, problems)

    per_problem = n * pools
    # problem-major: a batch holds copies of few prompts, so it needs little padding
    samples = [(i, p["prompt"]) for i, p in enumerate(problems) for _ in range(per_problem)]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    results: dict[str, dict[str, Any]] = {}
    with frozen(model):
        methods = plan_methods(model, adapters, backbone, density, layers)
        total = len(methods) * -(-len(samples) // batch_size)
        with tqdm(total=total, desc="Best-of-N", unit="batch", disable=not progress) as bar:
            for name, method in methods.items():
                bar.set_description(f"{name}: sampling")
                torch.manual_seed(seed)
                correct: list[list[bool]] = [[] for _ in problems]
                lengths: list[int] = []
                with method_model(model, method) as runner:
                    for batch in batches(samples, batch_size):
                        outputs = generate_responses(
                            runner,
                            tokenizer,
                            [prompt for _, prompt in batch],
                            max_new_tokens=max_new_tokens,
                            **sampling,
                        )
                        for (index, _), (text, ids) in zip(batch, outputs):
                            correct[index].append(check_answer(text, problems[index]["answer"]))
                            lengths.append(len(ids))
                        bar.update()
                    counts = param_counts(runner, method["kind"])
                mean, std = pooled_coverage(correct, n)
                fraction = counts["active_params"] / counts["total_params"]
                method.pop("peft_config", None)
                results[name] = {
                    **method,
                    **counts,
                    "active_fraction": fraction,
                    "ks": list(range(1, n + 1)),
                    "coverage": mean,
                    "coverage_std": std,
                    "relative_compute": [k * fraction for k in range(1, n + 1)],
                    "mean_length": statistics.fmean(lengths),
                    "correct_per_problem": [sum(row) for row in correct],
                }
    return {
        **(info or {}),
        "problems": len(problems),
        "n": n,
        "pools": pools,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "device": device_name(next(model.parameters()).device),
        "methods": results,
    }


def _shown_ks(n: int) -> list[int]:
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    return ks + [n] if n > 1 else ks


def coverage_markdown(results: dict[str, Any]) -> str:
    """The ``report.md`` text of a best-of-N run: a header and one table row per method."""
    n = results["n"]
    ks = _shown_ks(n)
    lines = [
        "# Caprese best-of-N coverage",
        "",
        f"Model `{results.get('model', '?')}`, data `{results.get('data', '?')}` ({results['problems']} problems). "
        f"{results['pools']} independent pools of N = {n} sampled responses per problem (temperature "
        f"{results['temperature']:g}, top-p {results['top_p']:g}, at most {results['max_new_tokens']} new tokens); "
        "coverage is the unbiased pass@k checked against the reference answer, averaged over problems and pools "
        "(± the standard deviation over pools). Relative compute = k × A, with A the fraction of parameters a "
        "generated token reads.",
        "",
        "| method | A (active fraction) | " + " | ".join(f"pass@{k}" for k in ks) + " | mean response length |",
        "| --- | ---: | " + " | ".join("---:" for _ in ks) + " | ---: |",
    ]
    for name, m in results["methods"].items():
        cells = " | ".join(f"{m['coverage'][k - 1]:.1%} ± {m['coverage_std'][k - 1]:.1%}" for k in ks)
        lines.append(f"| {name} | {m['active_fraction']:.1%} | {cells} | {m['mean_length']:.1f} |")
    lines += [
        "",
        "![Coverage against relative compute](coverage.png)",
        "",
        "![Coverage against N](coverage_n.png)",
        "",
    ]
    return "\n".join(lines)


def write_coverage_report(results: dict[str, Any], output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``results.json``, ``report.md``, ``coverage.png`` and ``coverage_n.png`` into ``output_dir``."""
    from .plots import line_plot, plot_coverage

    methods = results["methods"]
    with staged_output(output_dir, overwrite=overwrite) as staging:
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (staging / "report.md").write_text(coverage_markdown(results))
        plot_coverage(
            {name: (m["relative_compute"], m["coverage"]) for name, m in methods.items()}, staging / "coverage.png"
        )
        line_plot(
            {name: (m["ks"], m["coverage"]) for name, m in methods.items()},
            staging / "coverage_n.png",
            xlabel="N (samples per problem)",
            ylabel="coverage (pass@N)",
            title="Best-of-N coverage",
            markers=False,
        )
    return Path(output_dir)


__all__ = [
    "COVERAGE_FILES",
    "best_of_n",
    "check_sampling",
    "coverage_markdown",
    "pooled_coverage",
    "write_coverage_report",
]
