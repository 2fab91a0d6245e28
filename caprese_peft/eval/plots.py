"""PNG figures of evaluation results, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..extras import require


def _figure(width: float = 6.0, height: float = 4.0) -> Any:
    # a bare Figure on an Agg canvas: never touches pyplot's global backend or figure registry
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "Drawing plots").FigureCanvasAgg
    Figure = require("matplotlib.figure", "Drawing plots").Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def line_plot(
    lines: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    markers: bool = True,
) -> Path:
    """One line per ``label: (xs, ys)`` entry, written as a PNG to ``path``; returns the path."""
    if not lines:
        raise ValueError("Nothing to plot: pass at least one line.")
    for label, (xs, ys) in lines.items():
        if len(xs) != len(ys) or not len(xs):
            raise ValueError(f"Line {label!r} needs as many x as y values, at least one; got {len(xs)} and {len(ys)}.")
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in lines.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, markersize=4, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_coverage(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike, *, logx: bool = False
) -> Path:
    """Best-of-N coverage (paper Figure 3): ``method: (relative compute, coverage)`` lines as a PNG.

    Relative compute is ``N x A``, with ``A`` the fraction of parameters a generated token uses
    (``ParameterReport.active_fraction``); coverage is ``coverage_curve`` at ``k = N``.
    """
    return line_plot(
        curves,
        path,
        xlabel="relative compute units (N x active fraction)",
        ylabel="coverage (pass@N)",
        title="Best-of-N coverage",
        logx=logx,
        markers=False,
    )


def plot_length_histograms(lengths: Mapping[str, Sequence[int]], path: str | os.PathLike, *, bins: int = 30) -> Path:
    """Overlaid histograms of response lengths per method on shared bins, each mean as a dashed line (Appendix F)."""
    if not lengths or any(len(values) == 0 for values in lengths.values()):
        raise ValueError("Every method needs at least one response length to plot.")
    lo = min(min(values) for values in lengths.values())
    hi = max(max(values) for values in lengths.values())
    if hi == lo:
        hi = lo + 1  # a single distinct length still needs a bin of non-zero width
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    fig = _figure()
    ax = fig.add_subplot()
    for label, values in lengths.items():
        mean = sum(values) / len(values)
        _, _, patches = ax.hist(
            list(values), bins=edges, histtype="step", linewidth=1.5, label=f"{label} (mean {mean:.0f})"
        )
        ax.axvline(mean, linestyle="--", linewidth=1, color=patches[0].get_edgecolor())
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("responses")
    ax.set_title("Response lengths")
    ax.legend()
    return _save(fig, path)


def plot_density_sweep(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    metric: str = "accuracy",
    group: str = "method",
) -> Path:
    """Test-time density sweep (Appendix G): ``metric`` against ``density``, one line per ``group`` value.

    Each row is a mapping with keys ``"density"``, ``group`` and ``metric``, e.g.
    ``{"method": "Caprese (CATS)", "density": 0.4, "accuracy": 0.61}``.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to plot.")
    needed = {"density", group, metric}
    bad = [i for i, row in enumerate(rows) if not needed <= set(row)]
    if bad:
        raise ValueError(f"Rows {bad} lack one of the keys {sorted(needed)}.")
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        points.setdefault(str(row[group]), []).append((float(row["density"]), float(row[metric])))
    lines = {label: tuple(zip(*sorted(pts))) for label, pts in points.items()}
    return line_plot(lines, path, xlabel="test-time density", ylabel=metric, title=f"{metric} against density")


def plot_bars(
    panels: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    ylims: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """One bar chart per panel (title -> {label: value}), side by side; writes a PNG and returns its path."""
    labels = list(next(iter(panels.values())))
    fig = _figure(width=max(6.0, 1.3 * len(labels) + 2), height=3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, values) in zip(axes, panels.items()):
        bars = ax.bar(range(len(values)), list(values.values()), color=[f"C{i}" for i in range(len(values))])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(range(len(values)), list(values), rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        if ylims and title in ylims:
            ax.set_ylim(*ylims[title])
    return _save(fig, path)
