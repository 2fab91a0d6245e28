"""The two Caprese distillation losses (paper equations 7 and 8): pure functions of tensors, and the observer that
collects equation 7 from every layer in one dense forward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layer import Observation
from ..state import observing


def layer_mse(observation: Observation, mask: torch.Tensor) -> torch.Tensor:
    """Equation 7 for one layer: ``mean_d (FF(x) - FF_sparse(x) - x L R)^2`` averaged over the tokens in ``mask``.

    ``mask`` is ``(B, S)`` bool (the continuation tokens); the dense output is the target and gets no gradient.
    """
    error = (observation.sparse() - observation.dense.detach()).float().square().mean(dim=-1)  # (B, S)
    return (error * mask).sum() / mask.sum().clamp_min(1)


@contextmanager
def layerwise_losses(
    model: nn.Module, prompt_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> Iterator[list[torch.Tensor]]:
    """Run forwards of ``model`` densely while every Caprese layer scores itself (paper equation 7).

    Each layer sees the input ``x`` the original model gives it, computes backbone statistics from the
    prompt tokens, and appends to the yielded list its ``layer_mse`` over the other (real) tokens; it passes
    the dense output on, so all layers train in parallel from one forward pass. Sum the list
    (``layerwise_loss``) for the layer-wise loss.
    """
    losses: list[torch.Tensor] = []

    def observe(observation: Observation) -> None:
        losses.append(layer_mse(observation, observation.tokens))

    with observing(model, observe, prompt_mask, attention_mask):
        yield losses


def layerwise_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """Equation 7 summed over layers: the sum of the per-layer MSEs ``layerwise_losses`` collects.

    Summing (not averaging) keeps each layer's gradient independent of how many layers are wrapped,
    so every layer trains as if alone.
    """
    if not losses:
        raise ValueError(
            "No Caprese layer reported a layer-wise loss: run the forward inside caprese_peft.layerwise_losses, "
            "with the adapter enabled and at least one continuation token in the batch."
        )
    bad = [i for i, loss in enumerate(losses) if not (isinstance(loss, torch.Tensor) and loss.dim() == 0)]
    if bad:
        raise ValueError(f"Layer-wise losses must be scalar tensors; entries {bad} are not.")
    return torch.stack([loss.float() for loss in losses]).sum()


def hidden_state_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Equation 8: MSE between student and teacher hidden states on the tokens where ``mask`` is True.

    The mean over features of the squared error, averaged over all masked tokens of the batch, in fp32.

    Args:
        student_hidden: ``(batch, seq, hidden)``.
        teacher_hidden: ``(batch, seq, hidden)``; gets no gradient.
        mask: ``(batch, seq)`` bool, True on the continuation tokens to score.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"Student and teacher hidden states differ in shape: {tuple(student_hidden.shape)} vs "
            f"{tuple(teacher_hidden.shape)}."
        )
    if mask.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected {tuple(student_hidden.shape[:-1])} (batch, seq)."
        )
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("mask selects no token: the batch has no continuation token to score.")
    # select rather than multiply: padded positions may hold non-finite values that must not leak in
    diff = student_hidden[mask].float() - teacher_hidden[mask].detach().float()  # (tokens, hidden)
    return diff.square().mean()


def _kl_sum(
    student: torch.Tensor, teacher: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    student_logp = head(student).float().log_softmax(dim=-1)  # (n, V)
    with torch.no_grad():
        teacher_logp = head(teacher).float().log_softmax(dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()


def next_token_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    chunk_tokens: int = 128,
) -> torch.Tensor:
    """Mean KL(teacher || student) of the next-token distributions at the tokens where ``mask`` is True.

    ``head`` maps final hidden states to logits (the LM head, with any soft-capping). Logits are computed
    ``chunk_tokens`` positions at a time, and recomputed in the backward pass (activation checkpointing), so no more
    than ``chunk_tokens x vocabulary`` of them exist at once, forward or backward.

    Args:
        student_hidden, teacher_hidden: ``(batch, seq, hidden)``; the teacher gets no gradient.
        mask: ``(batch, seq)`` bool, True on the continuation tokens to score.
    """
    if student_hidden.shape != teacher_hidden.shape or mask.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"Hidden states {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)} and mask "
            f"{tuple(mask.shape)} must agree on (batch, seq)."
        )
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("mask selects no token: the batch has no continuation token to score.")
    student, teacher = student_hidden[mask], teacher_hidden[mask].detach()  # (n, hidden)
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, len(student), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_kl_sum, student[part], teacher[part], head, use_reentrant=False)
    return total / len(student)
