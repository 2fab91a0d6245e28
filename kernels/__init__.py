"""Triton kernels for Caprese, installed as ``caprese_peft.kernels``; each names the pure-torch reference it matches.

The repo folder is named ``kernels``, like Hugging Face's package on PyPI, which transformers probes for with
``importlib.util.find_spec("kernels")``. Where a checkout's root is on ``sys.path`` (``python -m pytest`` run there,
a benchmark script) that probe imports this folder as the top-level ``kernels``: it then defines nothing, so the
probe finds no version and moves on, and the kernels never load twice under two names.
"""

if __name__ == "caprese_peft.kernels":
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
        kernel_for,
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
        "kernel_for",
        "prepare_cats_weights",
        "prune_by_registers",
    ]
