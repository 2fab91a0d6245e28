"""The sparse FF block of one decode step with the correction as extra neurons (paper appendix D), in pure torch.

A gated MLP ``FF(x) = (act(x Wg^T) * (x W1^T)) W2^T`` with nn.Linear weights ``Wg, W1: (F, D)`` and
``W2: (D, F)``, plus the correction ``x L R`` with ``L: (D, r)`` and ``R: (r, D)``, is one gated MLP with
``r`` extra neurons whose gate is fixed to 1: their up rows are ``L^T`` and their down columns ``R^T``. These
pure-torch functions are the references the fused kernels in ``kernels/`` must match; they compute the same
values as the decode branch of ``CapreseLayer.forward``, up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]
# the activations the fused kernels implement, by the name they take
ACTIVATIONS: dict[str, Activation] = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


def activation_name(act: Activation) -> str | None:
    """The name in ``ACTIVATIONS`` of the function ``act`` computes, or None if it is none of them.

    Decided by evaluating ``act`` on probe values, so any module or function of transformers' activation table
    (``nn.SiLU``, ``SiLUActivation``, ``GELUTanh``, ...) is recognised by what it computes, not by its class name.
    """
    probe = torch.linspace(-8.0, 8.0, 161)
    with torch.no_grad():
        values = act(probe)
    for name, reference in ACTIVATIONS.items():
        if torch.allclose(values, reference(probe), rtol=1e-6, atol=1e-6):
            return name
    return None


class GriffinMergedWeights(NamedTuple):
    """Per-sequence pruned FF weights with the low-rank factors appended as ``r`` always-active neurons."""

    gate: torch.Tensor  # (B, k, D): the kept rows of Wg
    up: torch.Tensor  # (B, k + r, D): the kept rows of W1, then L^T
    down: torch.Tensor  # (B, D, k + r): the kept columns of W2, then R^T


def check_ff_weights(
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    low_rank_left: torch.Tensor,
    low_rank_right: torch.Tensor,
) -> tuple[int, int, int]:
    """``(D, F, r)`` of consistent FF weights; raises ValueError naming the first inconsistent shape."""
    if gate_weight.dim() != 2:
        raise ValueError(f"gate_weight must be (F, D) as nn.Linear stores it, got shape {tuple(gate_weight.shape)}.")
    ff_size, hidden = gate_weight.shape
    rank = low_rank_left.shape[-1] if low_rank_left.dim() == 2 else -1
    expected = {
        "up_weight": (up_weight, (ff_size, hidden)),
        "down_weight": (down_weight, (hidden, ff_size)),
        "low_rank_left": (low_rank_left, (hidden, rank)),
        "low_rank_right": (low_rank_right, (rank, hidden)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, but gate_weight {tuple(gate_weight.shape)} and "
                f"low_rank_left {tuple(low_rank_left.shape)} require {shape} (D={hidden}, F={ff_size}, r={rank})."
            )
    return hidden, ff_size, rank


def keep_indices(keep: torch.Tensor) -> torch.Tensor:
    """Sorted indices ``(B, k)`` of the kept neurons of a GRIFFIN keep mask ``(B, 1, F)`` or ``(B, F)``."""
    keep = keep.reshape(keep.shape[0], -1)  # (B, F)
    counts = keep.sum(dim=-1)
    if keep.dtype != torch.bool or bool((counts != counts[0]).any()):
        raise ValueError(
            f"keep must be a bool mask with the same number of kept neurons in every row, got dtype {keep.dtype} "
            f"and counts {counts.tolist()}."
        )
    return keep.nonzero()[:, 1].view(keep.shape[0], -1)  # nonzero lists rows in order, indices sorted


def griffin_merged_weights(
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    low_rank_left: torch.Tensor,
    low_rank_right: torch.Tensor,
    keep_idx: torch.Tensor,
) -> GriffinMergedWeights:
    """Prune the FF block to the ``k`` neurons each sequence keeps and append ``L``, ``R`` as ``r`` more.

    ``keep_idx`` is ``(B, k)`` integer indices into the ``F`` neurons (see ``keep_indices``); the weights are
    ``Wg, W1: (F, D)``, ``W2: (D, F)``, ``L: (D, r)``, ``R: (r, D)``. Done once per prompt after prefill.
    """
    hidden, ff_size, rank = check_ff_weights(gate_weight, up_weight, down_weight, low_rank_left, low_rank_right)
    if keep_idx.dim() != 2 or keep_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"keep_idx must be (B, k) integer indices, got {keep_idx.dtype} {tuple(keep_idx.shape)}.")
    batch = keep_idx.shape[0]
    gate = gate_weight[keep_idx]  # (B, k, D)
    up = torch.cat([up_weight[keep_idx], low_rank_left.T.expand(batch, rank, hidden)], dim=1)  # (B, k + r, D)
    kept_down = down_weight.T[keep_idx].transpose(1, 2)  # (B, D, k)
    down = torch.cat([kept_down, low_rank_right.T.expand(batch, hidden, rank)], dim=2)  # (B, D, k + r)
    return GriffinMergedWeights(gate=gate, up=up, down=down)


def griffin_merged_ff(x: torch.Tensor, merged: GriffinMergedWeights, act: Activation) -> torch.Tensor:
    """GRIFFIN + low rank with merged weights: ``(B, T, D) -> (B, T, D)``, ``T = 1`` for a decode step.

    Equals ``down((act(gate(x)) * up(x)) * keep) + x @ L @ R``.
    """
    if x.dim() != 3 or x.shape[0] != merged.gate.shape[0] or x.shape[-1] != merged.gate.shape[-1]:
        raise ValueError(
            f"x must be (B, T, D) matching the merged weights (B={merged.gate.shape[0]}, D={merged.gate.shape[-1]}), "
            f"got {tuple(x.shape)}."
        )
    k = merged.gate.shape[1]
    gate = act(x @ merged.gate.transpose(1, 2))  # (B, T, k)
    up = x @ merged.up.transpose(1, 2)  # (B, T, k + r)
    # the last r neurons have their gate fixed to 1: their up output x @ L goes through unscaled
    z = torch.cat([gate * up[..., :k], up[..., k:]], dim=-1)  # (B, T, k + r)
    return z @ merged.down.transpose(1, 2)  # (B, T, D)


def griffin_fused_ff(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, kept: int, act: Activation
) -> torch.Tensor:
    """``griffin_merged_ff`` with the gate and up rows in one tensor: two batched GEMVs per block.

    ``gate_up`` is ``(B, 2k + r, D)``: ``merged.gate`` then ``merged.up``; ``down`` is ``merged.down``
    ``(B, D, k + r)``; ``kept`` is ``k``. ``(B, T, D) -> (B, T, D)``.
    """
    h = x @ gate_up.transpose(1, 2)  # (B, T, 2k + r)
    # the r low-rank neurons have their gate fixed to 1: their x @ L goes through unscaled
    z = torch.cat([act(h[..., :kept]) * h[..., kept : 2 * kept], h[..., 2 * kept :]], dim=-1)  # (B, T, k + r)
    return z @ down.transpose(1, 2)  # (B, T, D)


def cats_merged_ff(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    low_rank_left: torch.Tensor,
    low_rank_right: torch.Tensor,
    threshold: torch.Tensor,
    act: Activation,
) -> torch.Tensor:
    """CATS + low rank: ``(B, T, D) -> (B, T, D)``, the reference of the fused kernel ``caprese_peft.kernels.cats_ff``.

    ``threshold`` is ``(B, 1, 1)`` (``CatsStats.threshold``): a neuron is kept where ``|act(x Wg^T)|`` exceeds
    it. Computes every neuron densely; a kernel gains by reading up and down weights of kept neurons only.
    """
    check_ff_weights(gate_weight, up_weight, down_weight, low_rank_left, low_rank_right)
    if x.dim() != 3 or x.shape[-1] != gate_weight.shape[1]:
        raise ValueError(f"x must be (B, T, D) with D={gate_weight.shape[1]}, got {tuple(x.shape)}.")
    if threshold.shape != (x.shape[0], 1, 1):
        raise ValueError(f"threshold must be (B, 1, 1) = ({x.shape[0]}, 1, 1), got {tuple(threshold.shape)}.")
    # .t() rather than .T: torch.compile cannot trace .T of an input inside a nested_compile_region (torch 2.13)
    gate = act(x @ gate_weight.t())  # (B, T, F)
    keep = gate.abs() > threshold  # (B, T, F)
    z = (gate * keep) * (x @ up_weight.t())  # (B, T, F)
    return z @ down_weight.t() + (x @ low_rank_left) @ low_rank_right  # (B, T, D)


class QuantizedRows(NamedTuple):
    """A weight matrix quantized row by row: ``codes * scale``, symmetric, ``bits`` bits per weight."""

    codes: torch.Tensor  # (rows, cols) int8, in [-2**(bits-1), 2**(bits-1) - 1]
    scale: torch.Tensor  # (rows, 1), the weight's dtype
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(self.scale.dtype) * self.scale


def quantize_rows(weight: torch.Tensor, bits: int) -> QuantizedRows:
    """Round each row of ``weight`` to ``bits``-bit integers times the row's scale (its largest magnitude over the
    largest code), the stand-in of dropped neurons (``CapreseConfig.stand_in_bits``)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must lie in [2, 8], got {bits}.")
    with torch.no_grad():
        top = 2 ** (bits - 1) - 1
        scale = (weight.abs().amax(dim=-1, keepdim=True) / top).clamp_min(torch.finfo(weight.dtype).tiny)
        codes = torch.round(weight / scale).clamp(-top - 1, top).to(torch.int8)
    return QuantizedRows(codes, scale, bits)
