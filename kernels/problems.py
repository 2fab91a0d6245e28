"""Random FF-block problems shared by the kernel tests and benchmarks, so that both exercise the same inputs."""

from __future__ import annotations

import torch

FFWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def ff_problem(
    batch: int,
    hidden: int,
    ff_size: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, FFWeights]:
    """One decode token per sequence ``x (B, D)`` and the weights ``(Wg, W1, W2, L, R)`` of one FF block.

    Shapes as ``caprese_peft.sparse_ff`` takes them: ``Wg, W1 (F, D)``, ``W2 (D, F)``, ``L (D, r)``, ``R (r, D)``.
    Scaled so that gate pre-activations and outputs are O(1), as in a trained model; drawn on the CPU from
    ``seed`` (the same values on every device), then cast and moved.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    weights = (
        randn(ff_size, hidden, scale=hidden**-0.5),
        randn(ff_size, hidden, scale=hidden**-0.5),
        randn(hidden, ff_size, scale=ff_size**-0.5),
        randn(hidden, rank, scale=hidden**-0.5),
        randn(rank, hidden, scale=max(rank, 1) ** -0.5),
    )
    return randn(batch, hidden, scale=1.0), weights
