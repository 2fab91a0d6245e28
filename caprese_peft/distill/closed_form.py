"""Equation 7 solved exactly: each Caprese layer's ``L @ R`` as a reduced-rank regression of the backbone's error.

For a layer with inputs ``X`` (continuation tokens, as the original model gives them) and targets
``Y = FF(X) - FF_sparse(X)``, the best rank-r ``B`` in ``min ||Y - X B||^2`` is ``B_ols V_r V_r^T``, with
``B_ols = (X^T X + eps I)^-1 X^T Y`` and ``V_r`` the top-r eigenvectors of ``B_ols^T X^T X B_ols`` (the right
singular vectors of the fitted values ``X B_ols``). Only the second moments ``X^T X`` and ``X^T Y`` are
needed, so they are streamed over batches in fp32: memory is two ``D x D`` matrices per layer,
whatever the number of tokens. The paper trains instead because it calls this expensive at scale;
here it is an exact initialisation, or a reference for the layer-wise trainer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..data.features import position_ids_from
from ..layer import Observation, named_caprese_layers
from ..state import observing

# a least-squares fit of D x D coefficients needs well over D rows to generalise
MIN_TOKENS_PER_DIM = 4


@dataclass
class Moments:
    """Sufficient statistics of one layer's regression, summed over continuation tokens."""

    xx: torch.Tensor  # (D, D) X^T X
    xy: torch.Tensor  # (D, D) X^T Y
    yy: float  # ||Y||^2, for the loss a solution reaches
    tokens: int

    def loss(self, left: torch.Tensor, right: torch.Tensor) -> float:
        """Equation 7 loss ``mean_tokens mean_d (Y - X L R)^2`` reached by ``(L, R)``, from the moments alone."""
        b = (left.double() @ right.double()).to(self.xx.device)  # (D, D)
        sq = self.yy - 2 * torch.sum(b * self.xy.double()) + torch.sum(b * (self.xx.double() @ b))
        return float(sq) / (self.tokens * self.xx.shape[0])


@torch.no_grad()
def collect_moments(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, Moments]:
    """Stream ``X^T X`` and ``X^T Y`` of every Caprese layer over ``batches`` (fp32).

    Each batch is a mapping with ``input_ids``, ``attention_mask`` and ``prompt_mask`` (as
    ``CapreseDataCollator`` makes them). The model runs densely as in layer-wise distillation, so
    every layer sees the inputs of the original model; rows are the continuation tokens.
    """
    names = {id(layer): name for name, layer in named_caprese_layers(model).items()}
    moments: dict[str, Moments] = {}

    def observe(observation: Observation) -> None:
        rows = observation.tokens
        target = observation.dense - observation.sparse(low_rank=False)  # FF(x) - FF_sparse(x)
        xs, ys = observation.x[rows].float(), target[rows].float()  # (N, D)
        name = names[id(observation.layer)]
        if name not in moments:
            dim = xs.shape[-1]
            zeros = torch.zeros(dim, dim, dtype=torch.float32, device=xs.device)
            moments[name] = Moments(zeros, zeros.clone(), 0.0, 0)
        m = moments[name]
        m.xx += xs.T @ xs
        m.xy += xs.T @ ys
        m.yy += float(ys.square().sum())
        m.tokens += xs.shape[0]

    for batch in batches:
        device = next(model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        prompt = batch["prompt_mask"].to(device).bool()
        with observing(model, observe, prompt, mask):
            model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from(mask),
                use_cache=False,
                logits_to_keep=1,
            )
    if not moments:
        raise ValueError("No batch reached the Caprese layers; pass at least one batch with continuation tokens.")
    return moments


def reduced_rank_solution(
    xx: torch.Tensor, xy: torch.Tensor, r: int, ridge: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` of shapes ``(D, r)`` and ``(r, D)`` minimising ``||Y - X L R||^2`` given ``X^T X`` and ``X^T Y``.

    ``ridge`` is relative to the mean diagonal of ``X^T X``; it keeps the solve defined when fewer
    tokens than dimensions were seen. Solved in fp64.
    """
    dim = xx.shape[0]
    if xx.shape != (dim, dim) or xy.shape != (dim, dim):
        raise ValueError(f"Expected square moments of equal size, got {tuple(xx.shape)} and {tuple(xy.shape)}.")
    if not 1 <= r <= dim:
        raise ValueError(f"r must lie in [1, {dim}], got {r}.")
    xx, xy = xx.double(), xy.double()
    scale = xx.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    b_ols = torch.linalg.solve(xx + ridge * scale * torch.eye(dim, dtype=xx.dtype, device=xx.device), xy)  # (D, D)
    fitted_gram = b_ols.T @ xx @ b_ols  # (D, D) = (X B_ols)^T (X B_ols)
    _, vectors = torch.linalg.eigh((fitted_gram + fitted_gram.T) / 2)  # eigenvalues ascending
    top = vectors[:, -r:].flip(-1)  # (D, r)
    return b_ols @ top, top.T.contiguous()


@torch.no_grad()
def fit_closed_form(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], ridge: float = 1e-6
) -> dict[str, float]:
    """Set every Caprese layer's ``L`` and ``R`` to the exact minimiser of equation 7 on ``batches``.

    Returns the equation-7 loss each layer reaches on the same tokens (pooled over all batches), by layer name.
    """
    return set_closed_form(model, collect_moments(model, batches), ridge)


@torch.no_grad()
def set_closed_form(model: nn.Module, moments: Mapping[str, Moments], ridge: float = 1e-6) -> dict[str, float]:
    """Set each Caprese layer's ``L`` and ``R`` to the reduced-rank solution of its ``moments`` (from ``collect_moments``).

    Moments do not depend on the rank, so one pass serves adapters of any rank. Returns the loss reached per layer.
    """
    layers = named_caprese_layers(model)
    missing = sorted(set(layers) - set(moments))
    if missing:
        raise ValueError(f"No moments for the Caprese layers {missing}; collect them on a model wrapped the same way.")
    few = {name: m.tokens for name, m in moments.items() if m.tokens < MIN_TOKENS_PER_DIM * m.xx.shape[0]}
    if few:
        dim = next(iter(moments.values())).xx.shape[0]
        warnings.warn(
            f"The closed form saw only {min(few.values())} continuation tokens for {dim}-dimensional inputs (fewer "
            f"than {MIN_TOKENS_PER_DIM} per dimension); the fit will overfit those tokens. Use more or longer "
            "completions, or a larger ridge.",
            stacklevel=2,
        )
    reached = {}
    for name, m in moments.items():
        layer = layers[name]
        adapter = layer.active_adapter_name()
        if adapter is None:
            raise ValueError(f"Layer {name} runs no Caprese adapter: enable the adapter to fit.")
        left_param, right_param = layer.caprese_L[adapter], layer.caprese_R[adapter]
        left, right = reduced_rank_solution(m.xx, m.xy, left_param.shape[1], ridge)
        left_param.copy_(left.to(left_param.dtype))
        right_param.copy_(right.to(right_param.dtype))
        reached[name] = m.loss(left_param, right_param)
    return reached
