"""Choose how the Caprese layers of a model compute generated tokens: merged weights and kernels, or the reference.

Each backbone brings its ``SparseDecoder`` (``caprese_peft.backbones``); these functions set, for every layer,
which of its implementations runs. Three, all computing the same values (up to the order of floating-point sums):

- ``"reference"``: the unmerged formula ``down(act(gate(x)) * up(x) * keep) + x @ L @ R``; reads every FF weight.
- ``"merged"``: paper appendix D. GRIFFIN materialises, once per prompt batch, each sequence's pruned weights with
  ``L`` and ``R`` appended and decodes with batched GEMVs; CATS runs ``caprese_peft.kernels.cats_ff`` on the FF weights with
  ``L``, ``R`` appended (the Triton kernel on CUDA where it applies, its torch reference elsewhere).
- ``"auto"`` (the default): ``"merged"`` where it reads fewer bytes: GRIFFIN while batch x density < 1 (each
  sequence reads its own pruned weights, so a batch of 32 at density 0.5 would read 16 times the weights that the
  reference shares), CATS where the Triton kernel runs (CUDA, at most 8 sequences, fp32/fp16/bf16); otherwise
  the reference. Steps that need gradients always
  run the reference.

``use_kernels`` forces the CATS kernel on (True: fail where it cannot run) or off (False).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .layer import DECODE_IMPLS, caprese_layers


def set_decode_impl(model: nn.Module, impl: str = "auto", *, use_kernels: bool | None = None) -> None:
    """Make every Caprese layer of ``model`` decode with ``impl`` (``"auto"``, ``"merged"`` or ``"reference"``).

    ``use_kernels``: None lets ``impl`` decide; True runs CATS through the Triton kernel (CUDA tensors, or a CPU
    under ``TRITON_INTERPRET=1``) and raises where it cannot; False never runs the kernel.
    """
    if impl not in DECODE_IMPLS:
        raise ValueError(f"impl must be one of {DECODE_IMPLS}, got {impl!r}.")
    if use_kernels not in (None, True, False):
        raise ValueError(f"use_kernels must be None, True or False, got {use_kernels!r}.")
    for layer in caprese_layers(model):
        layer.decode_impl = impl
        layer.decode_use_kernels = use_kernels


@contextmanager
def decode_impl(model: nn.Module, impl: str, *, use_kernels: bool | None = None) -> Iterator[None]:
    """``set_decode_impl`` for the duration of a ``with`` block; the previous choice of each layer is restored."""
    layers = caprese_layers(model)
    previous = [(layer.decode_impl, layer.decode_use_kernels) for layer in layers]
    set_decode_impl(model, impl, use_kernels=use_kernels)
    try:
        yield
    finally:
        for layer, (old_impl, old_use_kernels) in zip(layers, previous):
            layer.decode_impl, layer.decode_use_kernels = old_impl, old_use_kernels


def release_decode_caches(model: nn.Module) -> None:
    """Free the merged decode weights of every Caprese layer (rebuilt when next needed)."""
    for layer in caprese_layers(model):
        layer.release_decode_cache()
