"""Triton kernels for Caprese; each names the pure-torch reference in ``caprese_peft`` it must match."""

from .cats_ff import (
    INTERPRET,
    MAX_BATCH,
    SUPPORTED_DTYPES,
    CatsFFWeights,
    cats_ff,
    cats_ff_op,
    cats_ff_triton,
    gpu_down_configs,
    gpu_up_configs,
    prepare_cats_weights,
    prune_by_registers,
)

__all__ = [
    "INTERPRET",
    "MAX_BATCH",
    "SUPPORTED_DTYPES",
    "CatsFFWeights",
    "cats_ff",
    "cats_ff_op",
    "cats_ff_triton",
    "gpu_down_configs",
    "gpu_up_configs",
    "prepare_cats_weights",
    "prune_by_registers",
]
