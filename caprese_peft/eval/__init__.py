"""Evaluation of Caprese models: metrics, the Figure 1 residual analysis, and plots.

Not imported by ``import caprese_peft``. math_verify and matplotlib are imported only by the
functions that need them.
"""

from .metrics import (
    agreement_length,
    agreement_lengths,
    check_answer,
    coverage_curve,
    extract_gsm8k_answer,
    length_summary,
    mean_token_kl,
    pass_at_k,
    perplexity,
    token_kl,
)
from .plots import line_plot, plot_bars, plot_coverage, plot_density_sweep, plot_length_histograms
from .residual import ff_residual_errors, plot_residual_errors

__all__ = [
    "agreement_length",
    "agreement_lengths",
    "check_answer",
    "coverage_curve",
    "extract_gsm8k_answer",
    "ff_residual_errors",
    "length_summary",
    "line_plot",
    "mean_token_kl",
    "pass_at_k",
    "perplexity",
    "plot_bars",
    "plot_coverage",
    "plot_density_sweep",
    "plot_length_histograms",
    "plot_residual_errors",
    "token_kl",
]
