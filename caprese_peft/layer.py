"""The Caprese layer: a gated MLP block with a sparse backbone and a low-rank correction beside it."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .backbones import Backbone, get_backbone
from .state import GenerationState, Phase

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def gated_mlp_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a gated MLP Caprese can wrap, or None when it is one."""
    missing = [p for p in GATED_MLP_PARTS if not hasattr(module, p)]
    if missing:
        children = [name for name, _ in module.named_children()] or ["no submodules"]
        return f"it has {', '.join(children)} but lacks {', '.join(missing)}"
    not_linear = [p for p in GATED_MLP_PARTS[:3] if not isinstance(getattr(module, p), nn.Linear)]
    if not_linear:
        return f"{', '.join(not_linear)} must be nn.Linear (quantized or fused projections are not supported)"
    return None


class CapreseLayer(nn.Module, BaseTunerLayer):
    """Wraps one gated MLP block ``down(act(gate(x)) * up(x))``.

    Forward branches: adapter disabled (or none active) -> the base block untouched; prefill ->
    the dense block, recording backbone statistics; decode -> the sparse block plus ``x @ L @ R``.
    """

    adapter_layer_names = ("caprese_L", "caprese_R")
    other_param_names = ("caprese_backbone",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        *,
        r: int,
        backbone: str,
        density: float,
        init_weights: bool,
        state: GenerationState,
    ) -> None:
        super().__init__()
        problem = gated_mlp_problem(base_layer)
        if problem:
            raise ValueError(f"Caprese wraps gated MLP blocks; {type(base_layer).__name__} is not one: {problem}.")
        self.base_layer = base_layer
        self.caprese_L = nn.ParameterDict()
        self.caprese_R = nn.ParameterDict()
        self.caprese_backbone: dict[str, Backbone] = {}
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        # plain attributes, not buffers: per-prompt statistics must never reach a state dict
        object.__setattr__(self, "_state", state)
        self._stats: Any = None
        self._stats_generation = -1
        self.hidden_size = base_layer.gate_proj.in_features
        self.intermediate_size = base_layer.gate_proj.out_features
        self.update_layer(adapter_name, r=r, backbone=backbone, density=density, init_weights=init_weights)

    def update_layer(self, adapter_name: str, *, r: int, backbone: str, density: float, init_weights: bool) -> None:
        """Add (or replace) the low-rank factors and backbone of ``adapter_name``."""
        if r > self.hidden_size:
            raise ValueError(f"r={r} exceeds the hidden size {self.hidden_size}; choose 1 <= r <= {self.hidden_size}.")
        weight = self.base_layer.gate_proj.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        left = torch.empty(self.hidden_size, r, **factory)
        right = torch.zeros(r, self.hidden_size, **factory)
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(left, -bound, bound)
        if not init_weights:
            nn.init.uniform_(right, -bound, bound)
        self.caprese_L[adapter_name] = nn.Parameter(left)  # (D, r)
        self.caprese_R[adapter_name] = nn.Parameter(right)  # (r, D)
        self.caprese_backbone[adapter_name] = get_backbone(backbone)(density)
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "A Caprese adapter cannot be merged into the base weights: prompt tokens run the dense block and "
            "generated tokens the sparse one, so no single set of weights serves both. Keep the PEFT model, or use "
            "`unload()` to get the base model back."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("A Caprese adapter is never merged, so there is nothing to unmerge.")

    def low_rank(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The correction ``x @ L @ R`` of ``adapter_name``."""
        return (x @ self.caprese_L[adapter_name]) @ self.caprese_R[adapter_name]

    def _active(self) -> str | None:
        if self.disable_adapters or self.merged:
            return None
        adapters = [a for a in self.active_adapters if a in self.caprese_L]
        if not adapters:
            return None
        if len(adapters) > 1:
            raise ValueError(f"Caprese runs one adapter at a time, but {adapters} are active.")
        return adapters[0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._active()
        step = self._state.step
        if adapter is None or step is None:
            return self.base_layer(x, *args, **kwargs)

        mlp = self.base_layer
        backbone = self.caprese_backbone[adapter]
        gate = mlp.act_fn(mlp.gate_proj(x))  # (B, S, d_ff)
        z = gate * mlp.up_proj(x)  # (B, S, d_ff), the same operations as the base block

        if step.phase is Phase.PREFILL:
            self._stats = backbone.calibrate(gate, z, step.token_mask)
            self._stats_generation = step.generation
            return mlp.down_proj(z)

        if step.phase in (Phase.DECODE, Phase.RESELECT) and (
            self._stats is None or self._stats_generation != step.generation
        ):
            raise RuntimeError(
                "Decode step without statistics from this prompt: the prefill ran with the Caprese adapter "
                "disabled or another adapter active. Generate with the same adapter state throughout."
            )

        if step.phase is Phase.RESELECT:
            # a new statistics object, so anything derived from the old selection is rebuilt
            self._stats = backbone.update(self._stats, gate, z, step.token_mask)
            return mlp.down_proj(z)

        if step.phase is Phase.DECODE:
            z = z * backbone.keep_mask(gate, self._stats)
            return mlp.down_proj(z) + self.low_rank(x, adapter)

        sparse = step.sparse_mask.unsqueeze(-1)  # (B, S, 1)
        keep = backbone.keep_mask(gate, backbone.calibrate(gate, z, step.token_mask))
        if step.phase is Phase.LAYERWISE:
            # equation 7: the block learns FF(x) - FF_sparse(x) on the original model's inputs
            dense = mlp.down_proj(z)
            student = mlp.down_proj(z * keep) + self.low_rank(x, adapter)
            error = (student - dense.detach()).float().square().mean(dim=-1)  # (B, S)
            step.losses.append((error * step.sparse_mask).sum() / step.sparse_mask.sum().clamp_min(1))
            return dense

        # teacher forcing: dense on prompt tokens, sparse + low rank on the others, in one pass
        z = torch.where(sparse & ~keep, torch.zeros_like(z), z)
        return mlp.down_proj(z) + self.low_rank(x, adapter) * sparse

    def __repr__(self) -> str:
        return "caprese." + super().__repr__()
