"""GRIFFIN: keep the top-k feed-forward neurons ranked by their normalised prompt activations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Backbone, check_token_mask, register_backbone


@dataclass
class GriffinStats:
    score: torch.Tensor  # (batch, d_ff) fp32: l2 norm over prompt tokens of the normalised |z|
    keep: torch.Tensor  # (batch, 1, d_ff) bool: the top-k neurons of each sequence


def griffin_scores(z: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``s_j = || z_ij / ||z_i|| ||_2`` over the prompt tokens i of each sequence, in fp32; ``(batch, d_ff)``."""
    z = z.float()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    z = z * token_mask.unsqueeze(-1)
    return z.square().sum(dim=1).sqrt()


def top_neurons(score: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask ``(batch, 1, d_ff)`` of the ``round(density * d_ff)`` highest scores of each row."""
    k = max(1, round(density * score.shape[-1]))
    idx = score.topk(k, dim=-1).indices
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.unsqueeze(1)


@register_backbone
class Griffin(Backbone):
    """GRIFFIN (Dong et al., 2024): structured pruning of the FF block per prompt."""

    name = "griffin"

    def calibrate(self, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> GriffinStats:
        check_token_mask(token_mask)
        score = griffin_scores(z, token_mask)
        return GriffinStats(score=score, keep=top_neurons(score, self.density))

    def keep_mask(self, gate: torch.Tensor, stats: GriffinStats) -> torch.Tensor:
        return stats.keep

    def update(
        self, stats: GriffinStats, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor
    ) -> GriffinStats:
        # s and s_G are l2 norms over tokens, so sqrt(s^2 + s_G^2) is the statistic of all tokens together
        score = torch.hypot(stats.score, griffin_scores(z, token_mask))
        return GriffinStats(score=score, keep=top_neurons(score, self.density))

    def active_ff_weights(self, hidden_size: int, intermediate_size: int) -> float:
        k = max(1, round(self.density * intermediate_size))
        return 3.0 * hidden_size * k
