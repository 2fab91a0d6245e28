"""The paper's Figure 1: how much of an oracle top-k FF residual a rank-r linear map of the block input explains."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import gated_mlp_problem


def _gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if gated_mlp_problem(m) is None]


def _generated_mask(
    prompt_len_or_mask: int | Sequence[int] | torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Bool ``(batch, seq)``: the real tokens after each row's prompt."""
    batch, seq = attention_mask.shape
    real = attention_mask.bool()
    if isinstance(prompt_len_or_mask, torch.Tensor) and prompt_len_or_mask.dim() == 2:
        prompt = prompt_len_or_mask.to(device=real.device, dtype=torch.bool)
        if prompt.shape != real.shape:
            raise ValueError(f"The prompt mask has shape {tuple(prompt.shape)}; expected {(batch, seq)}.")
        return real & ~prompt
    lengths = torch.as_tensor(prompt_len_or_mask, device=real.device).long().flatten()
    if lengths.numel() == 1:
        lengths = lengths.expand(batch)
    if lengths.numel() != batch or bool((lengths < 0).any()):
        raise ValueError(
            "prompt_len_or_mask must be a prompt length >= 0, one length per row, or a (batch, seq) bool mask; "
            f"got {prompt_len_or_mask!r} for a batch of {batch}."
        )
    # the first `length` real tokens of a row are its prompt, whichever side the padding is on
    return real & (real.long().cumsum(-1) > lengths.unsqueeze(-1))


def _block_parts(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, dense)`` of a gated MLP in fp32 for token rows ``x`` ``(N, D)``: ``z = act(x Wg^T) * (x W1^T)``."""

    def linear(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(inputs, layer.weight.float(), bias)

    z = mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x)  # (N, d_ff)
    return z, linear(mlp.down_proj, z)


def _oracle_topk(z: torch.Tensor, density: float) -> torch.Tensor:
    """``z`` with all but the ``round(density * d_ff)`` largest ``|z|`` of each token zeroed."""
    k = max(1, round(density * z.shape[-1]))
    idx = z.abs().topk(k, dim=-1).indices
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
    return z * keep


def _column_basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``(N, rank X)`` of the column space of the token rows ``x`` ``(N, D)``, in fp64."""
    x = x.double()
    u, s, _ = torch.linalg.svd(x, full_matrices=False)  # u: (N, min(N, D))
    tol = s.max() * max(x.shape) * torch.finfo(torch.float64).eps
    return u[:, s > tol]


def _rank_r_errors(basis: torch.Tensor, error: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """``min_{rank(B) <= r} ||E - X B||_F^2`` for each r, in fp64, given ``basis = _column_basis(X)``.

    With ``P`` the projection onto the column space of ``X``, ``||E - X B||^2 = ||(I - P) E||^2 +
    ||P E - X B||^2`` and ``X B`` can be any matrix of rank <= r in that space, so the minimum is
    ``||(I - P) E||^2`` plus the tail ``sum_{i > r} s_i^2`` of the singular values of ``P E``. This
    equals projecting the OLS fit ``X B_ols`` onto its top-r right singular vectors, needs one SVD
    of ``X`` per layer for every density and rank, and stays defined when ``X`` is rank deficient.
    """
    error = error.double()
    coords = basis.T @ error  # (rank X, D): P E in the basis
    fitted = torch.linalg.svdvals(coords).square()  # descending
    outside = (error.square().sum() - fitted.sum()).clamp_min(0)  # ||(I - P) E||^2
    return [float(outside + fitted[r:].sum()) for r in ranks]


@torch.no_grad()
def ff_residual_errors(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_len_or_mask: int | Sequence[int] | torch.Tensor,
    densities: Sequence[float],
    ranks: Sequence[int],
    layers: Sequence[int] | None = None,
) -> list[dict]:
    """Relative FF output error of generated tokens under oracle top-k, with and without a rank-r correction.

    One teacher-forced forward of ``model`` (a plain transformers causal LM, no adapter) over
    prompt + generated tokens records the input ``x`` and output of each gated MLP block. For the
    generated tokens ``X`` ``(N, D)`` of a block, each density keeps per token the
    ``round(density * d_ff)`` largest ``|z|`` of ``z = act(x Wg^T) * (x W1^T)``; the residual is
    ``E = FF(X) - FF_topk(X)`` and its relative error ``||E||_F / ||FF(X)||_F`` (pooled over tokens,
    Frobenius norms). For each rank r, the error left by the best rank-r linear correction from the
    block input, ``min_{rank(B) <= r} ||E - X B||_F / ||FF(X)||_F`` (reduced-rank regression), is
    reported as well. Blocks are recomputed in fp32 from the recorded inputs.

    The correction is fitted and scored on the same tokens, as in the paper's Figure 1: it is a
    best-case bound, not what a correction trained on other text achieves. With ``N <= D`` tokens
    any ``r >= N`` fits ``E`` exactly, so use many more generated tokens than ``D`` (or than ``r``).

    Args:
        model: the causal LM; its gated MLP blocks (with ``gate_proj``, ``up_proj``, ``down_proj``,
            ``act_fn``) must run their own forward, so a Caprese PEFT model needs its adapter disabled.
        input_ids: ``(batch, seq)`` prompt followed by generated tokens, padded either side.
        attention_mask: ``(batch, seq)``, 1 on real tokens; None means all real.
        prompt_len_or_mask: the number of prompt tokens (one for all rows or one per row, counted over
            real tokens), or a ``(batch, seq)`` bool mask True on prompt tokens.
        densities: top-k densities in (0, 1].
        ranks: correction ranks in [0, D]; rank 0 (no correction) is always reported.
        layers: indices among the model's gated MLP blocks (its decoder layers); default all.

    Returns:
        One dict per (layer, density, rank): ``{"layer", "density", "rank", "relative_error", "tokens"}``,
        where ``tokens`` is the number of generated tokens the layer was scored on.
    """
    blocks = _gated_mlps(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no gated MLP block (modules with gate_proj, up_proj, down_proj and act_fn)."
        )
    layers = list(range(len(blocks))) if layers is None else sorted(set(layers))
    if not layers:
        raise ValueError("layers is empty; pass None for every gated MLP block.")
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: the model has {len(blocks)} gated MLP blocks (0..{len(blocks) - 1})."
        )
    densities = sorted({float(d) for d in densities})
    if not densities or any(not 0.0 < d <= 1.0 for d in densities):
        raise ValueError(f"densities must be a non-empty list of values in (0, 1], got {densities}.")
    hidden = blocks[layers[0]][1].gate_proj.in_features
    ranks = sorted({0, *(int(r) for r in ranks)})
    if ranks[0] < 0 or ranks[-1] > hidden:
        raise ValueError(f"ranks must lie in [0, {hidden}] (the hidden size), got {ranks}.")

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} differ."
        )
    generated = _generated_mask(prompt_len_or_mask, attention_mask)  # (B, S)
    if not bool(generated.any()):
        raise ValueError("No generated token: every real token is a prompt token, so there is no residual to measure.")

    rows: list[dict] = []
    seen: set[int] = set()

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            x = x[generated].float()  # (N, D)
            z, dense = _block_parts(module, x)  # (N, d_ff), (N, D)
            # the recomputation must be the block: a block with extra terms would pass them off as residual
            drift = float((dense - output[generated].float()).norm() / dense.norm().clamp_min(1e-30))
            if drift > max(1e-3, 16 * torch.finfo(output.dtype).eps):
                raise ValueError(
                    f"Gated MLP block {index} ({type(module).__name__}) does not compute down(act(gate(x)) * up(x)): "
                    f"recomputing it differs from its output by {drift:.2e} (relative)."
                )
            dense_sq = float(dense.double().square().sum())
            w_down = module.down_proj.weight.float()  # (D, d_ff)
            basis = _column_basis(x)
            for density in densities:
                dropped = z - _oracle_topk(z, density)  # (N, d_ff)
                error = dropped @ w_down.T  # (N, D): FF(x) - FF_topk(x), the bias cancels
                for rank, err_sq in zip(ranks, _rank_r_errors(basis, error, ranks)):
                    rows.append(
                        {
                            "layer": index,
                            "density": density,
                            "rank": rank,
                            "relative_error": (err_sq / dense_sq) ** 0.5 if dense_sq > 0 else 0.0,
                            "tokens": x.shape[0],
                        }
                    )
            seen.add(index)

        return hook

    handles = [blocks[i][1].register_forward_hook(hook_for(i), with_kwargs=True) for i in layers]
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(-1) - 1).clamp_min(0),  # as generate numbers left-padded rows
            use_cache=False,
            logits_to_keep=1,  # only the blocks matter; full logits of a long batch can dwarf them
        )
    finally:
        for handle in handles:
            handle.remove()
    missing = [blocks[i][0] for i in layers if i not in seen]
    if missing:
        raise ValueError(
            f"The forward never ran gated MLP blocks {missing}. For a PEFT model with a Caprese adapter, run this "
            "inside `with model.disable_adapter():` or pass the base model."
        )
    return sorted(rows, key=lambda row: (row["layer"], row["density"], row["rank"]))


def plot_residual_errors(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Figure 1 as a PNG: mean relative error over layers (y) against density (x), one line per rank."""
    from .plots import line_plot

    if not rows:
        raise ValueError("rows is empty: run ff_residual_errors first.")
    sums: dict[tuple[int, float], list[float]] = {}
    for row in rows:
        sums.setdefault((row["rank"], row["density"]), []).append(row["relative_error"])
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for rank in sorted({rank for rank, _ in sums}):
        xs = sorted(d for r, d in sums if r == rank)
        label = "top-k only" if rank == 0 else f"top-k + rank {rank}"
        lines[label] = (xs, [sum(sums[rank, d]) / len(sums[rank, d]) for d in xs])
    return line_plot(
        lines,
        path,
        xlabel="density (fraction of FF neurons kept)",
        ylabel="mean relative FF output error",
        title="Oracle top-k residual of generated tokens",
    )
