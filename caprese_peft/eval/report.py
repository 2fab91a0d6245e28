"""The report of an evaluation run: ``results.json``, ``report.md`` and PNG plots, written into a folder at once.

``write_report`` writes the results of ``caprese_peft.eval.evaluate.evaluate_methods`` into a temporary
folder renamed into place, so a failed run leaves nothing behind. matplotlib is imported only by the plots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .output import staged_output

REPORT_FILES = ("results.json", "report.md", "lengths.png", "scores.png")


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


__all__ = ["REPORT_FILES", "plot_scores", "report_markdown", "write_report"]
