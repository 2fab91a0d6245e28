"""CATS: zero gate activations whose magnitude falls under a threshold calibrated on the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Backbone, check_token_mask, register_backbone


@dataclass
class CatsStats:
    threshold: torch.Tensor  # (batch, 1, 1) fp32: |act(x Wg)| must exceed it to be kept


def cats_thresholds(gate: torch.Tensor, token_mask: torch.Tensor, density: float) -> torch.Tensor:
    """Per sequence, the value a ``density`` fraction of the prompt's ``|gate|`` lies above; ``(batch, 1, 1)``.

    The ``n_drop``-th smallest magnitude, found as the smallest of the ``n - n_drop + 1`` largest: ``topk``
    splits one long slice over many CUDA blocks, where ``kthvalue`` and ``quantile`` give the whole slice to
    one block (pytorch/pytorch#75599) and ``quantile`` refuses the sizes of real prompts.
    """
    thresholds = []
    for row_gate, row_mask in zip(gate, token_mask):
        values = row_gate[row_mask].abs().float().flatten()  # prompt tokens only: padding never counts
        n_drop = values.numel() - round(density * values.numel())
        if n_drop <= 0:
            thresholds.append(values.new_tensor(-1.0))  # density 1: keep everything, even exact zeros
        else:
            thresholds.append(values.topk(values.numel() - n_drop + 1, sorted=False).values.min())
    return torch.stack(thresholds).view(-1, 1, 1)


@register_backbone
class Cats(Backbone):
    """CATS (Lee et al., 2024): contextual activation thresholding of the gate output."""

    name = "cats"

    def calibrate(self, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> CatsStats:
        check_token_mask(token_mask)
        return CatsStats(threshold=cats_thresholds(gate, token_mask, self.density))

    def keep_mask(self, gate: torch.Tensor, stats: CatsStats) -> torch.Tensor:
        return gate.abs() > stats.threshold

    def active_ff_weights(self, hidden_size: int, intermediate_size: int) -> float:
        # the gate projection always runs in full; up and down only over the kept neurons
        return hidden_size * intermediate_size * (1.0 + 2.0 * self.density)
