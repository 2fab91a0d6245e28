"""GRIFFIN: keep the top-k feed-forward neurons ranked by their normalised prompt activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..sparse_ff import griffin_merged_ff, griffin_merged_weights, keep_indices
from .base import Backbone, SparseDecoder, check_token_mask, register_backbone, statistics_op


@dataclass
class GriffinStats:
    score: torch.Tensor  # (batch, d_ff) fp32: l2 norm over prompt tokens of the normalised |z|
    keep: torch.Tensor  # (batch, 1, d_ff) bool: the top-k neurons of each sequence


def griffin_scores(z: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``s_j = || z_ij / ||z_i|| ||_2`` over the prompt tokens i of each sequence, in fp32; ``(batch, d_ff)``.

    Computed as ``s_j^2 = sum_i w_i z_ij^2`` with ``w_i = mask_i / ||z_i||^2``: three passes over ``z`` (square,
    row sums, one GEMV) rather than a normalised copy of it, so the prefill pays little for the statistic.
    """
    squares = z.float().square()  # (B, S, F)
    weights = token_mask / squares.sum(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)  # (B, S)
    return (weights.unsqueeze(1) @ squares).squeeze(1).sqrt()


def kept_count(density: float, width: int) -> int:
    """How many of ``width`` neurons GRIFFIN keeps: ``round(density * width)``, at least one."""
    return max(1, round(density * width))


def top_neurons(score: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask ``(batch, 1, d_ff)`` of the ``round(density * d_ff)`` highest scores of each row."""
    idx = score.topk(kept_count(density, score.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.unsqueeze(1)


class GriffinDecoder(SparseDecoder):
    """GRIFFIN decodes on each prompt batch's kept rows with ``L``, ``R`` (appendix D).

    On a CPU with the C++ ops (``caprese_peft.kernels.cpu_ff``): the rows of the union of the batch's kept neurons,
    read in place once for all sequences, each using only its own (the weights laid out once as for CATS;
    ``FastDecoder`` packs the union's rows per prompt batch instead: ``fast_decode.lean.GriffinFF``). Elsewhere
    (CUDA): each sequence's own pruned copy, gathered per prompt, which ``decode_impl="auto"`` takes while batch x
    density < 1; past that the copies read more bytes than the shared full weights the reference reads.
    """

    has_fast_path = True
    _cache: tuple | None = None  # (stats or None, key, union or not, weights): the weights a step reads
    has_cpu_stand_in = True

    def pays_off(self, x: torch.Tensor) -> bool:
        return self.cpu_kernel_applies(x) or x.shape[0] * self.backbone.density < 1

    def build(self, stats: GriffinStats | None, low_rank: bool = True, union: bool = False) -> Any:
        """The weights a step reads (with ``L``, ``R`` unless ``low_rank=False``), uncached: this prompt batch's
        per-sequence ``GriffinMergedWeights``, or with ``union=True`` the whole block as ``CatsFFWeights`` (for every
        prompt: the CPU op reads the kept rows in place)."""
        gate, up, down, left, right = self.layer.decode_tensors(self.adapter)
        if not low_rank:
            left, right = left[:, :0], right[:0]
        with torch.no_grad():
            if union:
                from ..kernels import prepare_cats_weights

                return prepare_cats_weights(gate, up, down, left, right)
            return griffin_merged_weights(gate, up, down, left, right, keep_indices(stats.keep))

    def weights(self, stats: GriffinStats, union: bool = False) -> Any:
        """``build(stats, union=union)``, built once and cached on the weights and, per-sequence, on the identity of
        ``stats``: a new prompt or a reselection replaces the statistics object; an optimizer step or a reload
        changes the weights (see ``CapreseLayer.weights_key``). A stale cache is freed before the new one is built.
        """
        key = self.layer.weights_key(self.adapter)
        owner = None if union else stats
        cached = self._cache
        if cached is not None and cached[0] is owner and cached[1:3] == (key, union):
            return cached[3]
        self._cache = None
        built = self.build(stats, union=union)
        self._cache = (owner, key, union, built)
        return built

    def fast(self, x: torch.Tensor, stats: GriffinStats) -> torch.Tensor:
        if self.cpu_kernel_applies(x):
            from ..kernels.cpu_ff import griffin_ff_cpu

            weights = self.weights(stats, union=True)
            stand_in = self.stand_in() if self.layer.caprese_stand_in.get(self.adapter) else None
            return griffin_ff_cpu(x[:, 0], weights, stats.keep, self.activation(), stand_in)[:, None]
        return griffin_merged_ff(x, self.weights(stats), self.layer.base_layer.act_fn)

    def release(self) -> None:
        super().release()
        self._cache = None

    def new_prompt(self) -> None:
        if self._cache is not None and self._cache[0] is not None:  # per-sequence copies belong to one prompt batch
            self._cache = None

    def lean_ff(self, low_rank: bool, use_kernels: bool | None, cpu_ops: bool = False) -> nn.Module:
        from ..fast_decode.lean import GriffinFF

        return GriffinFF(self, low_rank, cpu_ops, stand_in=self.lean_stand_in(low_rank))


@register_backbone
class Griffin(Backbone):
    """GRIFFIN (Dong et al., 2024): structured pruning of the FF block per prompt."""

    name = "griffin"
    decoder = GriffinDecoder
    reads_every_gate = False  # a generated token computes the gates of its kept neurons only

    def calibrate(self, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> GriffinStats:
        ops = statistics_op(z)
        if ops is not None:  # the same selection in one C++ call (a prefill pays per op, every layer)
            score, keep = ops.griffin_select(z, token_mask, kept_count(self.density, z.shape[-1]))
            return GriffinStats(score=score, keep=keep)
        check_token_mask(token_mask)
        score = griffin_scores(z, token_mask)
        return GriffinStats(score=score, keep=top_neurons(score, self.density))

    def keep_mask(self, gate: torch.Tensor, stats: GriffinStats) -> torch.Tensor:
        return stats.keep

    def update(self, stats: Any, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> GriffinStats:
        # s and s_G are l2 norms over tokens, so sqrt(s^2 + s_G^2) is the statistic of all tokens together
        score = torch.hypot(stats.score, griffin_scores(z, token_mask))
        return GriffinStats(score=score, keep=top_neurons(score, self.density))

    def active_ff_weights(self, hidden_size: int, intermediate_size: int) -> float:
        return 3.0 * hidden_size * kept_count(self.density, intermediate_size)
