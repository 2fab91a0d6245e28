"""The Caprese layer: a gated MLP block with a sparse backbone and a low-rank correction beside it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .backbones import DECODE_IMPLS, Backbone, SparseDecoder, get_backbone
from .sparse_ff import quantize_rows
from .state import GenerationState, Phase, Step

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")

__all__ = [
    "DECODE_IMPLS",
    "CapreseLayer",
    "Observation",
    "caprese_layers",
    "gated_mlp_problem",
    "named_caprese_layers",
]


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


@dataclass
class Observation:
    """What one Caprese layer shows an observer while the model runs densely (distillation, analysis).

    ``x`` is the layer's input as the original model gives it, ``gate = act(x Wg)`` and ``z = gate * (x W1)``
    its intermediate features, ``keep`` the neurons the backbone keeps for each token with statistics from the
    prompt tokens, ``dense`` the block's output (what the layer passes on), ``tokens`` the rows to score: the
    real tokens after the prompt, which would run sparse while generating.
    """

    layer: CapreseLayer
    adapter: str
    x: torch.Tensor  # (B, S, D)
    gate: torch.Tensor  # (B, S, F)
    z: torch.Tensor  # (B, S, F)
    keep: torch.Tensor  # bool, broadcastable to z
    dense: torch.Tensor  # (B, S, D)
    tokens: torch.Tensor  # (B, S) bool

    def sparse(self, low_rank: bool = True) -> torch.Tensor:
        """The sparse block's output on the same inputs (with the adapter's stand-in of dropped neurons, if any),
        plus ``x @ L @ R`` unless ``low_rank=False``."""
        return self.layer.sparse_ff(self.x, self.gate, self.z, self.keep, self.adapter, low_rank=low_rank)


class CapreseLayer(nn.Module, BaseTunerLayer):
    """Wraps one gated MLP block ``down(act(gate(x)) * up(x))``.

    Forward: adapter disabled (or none active) -> the base block untouched; prefill -> the dense block,
    calibrating the backbone on the prompt tokens; sparse -> the sparse block plus ``x @ L @ R``, for generated
    tokens through the backbone's ``SparseDecoder`` and, under teacher forcing, for the non-prompt tokens of a
    whole sequence at once.
    """

    adapter_layer_names = ("caprese_L", "caprese_R")
    other_param_names = ("caprese_backbone", "caprese_decoder", "caprese_stand_in")
    _stand_in_cache: dict | None = None  # bits -> (key, quantized weights): derived from the base weights, never saved
    # how generated tokens are computed (one of DECODE_IMPLS), and whether the CATS kernel may run (None: where it
    # applies); class defaults that caprese_peft.set_decode_impl overrides per layer
    decode_impl: str = "auto"
    decode_use_kernels: bool | None = None

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
        stand_in_bits: int | None = None,
    ) -> None:
        super().__init__()
        problem = gated_mlp_problem(base_layer)
        if problem:
            raise ValueError(f"Caprese wraps gated MLP blocks; {type(base_layer).__name__} is not one: {problem}.")
        self.base_layer = base_layer
        self.caprese_L = nn.ParameterDict()
        self.caprese_R = nn.ParameterDict()
        self.caprese_backbone: dict[str, Backbone] = {}
        self.caprese_decoder: dict[str, SparseDecoder] = {}
        self.caprese_stand_in: dict[str, int | None] = {}
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        # plain attributes, not buffers: per-prompt statistics must never reach a state dict
        object.__setattr__(self, "_state", state)
        self._stats: Any = None
        self._stats_key: tuple[int, str] | None = None  # (prefill number, adapter) the statistics belong to
        self.hidden_size = base_layer.gate_proj.in_features
        self.intermediate_size = base_layer.gate_proj.out_features
        self.update_layer(
            adapter_name,
            r=r,
            backbone=backbone,
            density=density,
            init_weights=init_weights,
            stand_in_bits=stand_in_bits,
        )

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        backbone: str,
        density: float,
        init_weights: bool,
        stand_in_bits: int | None = None,
    ) -> None:
        """Add (or replace) the low-rank factors, backbone and stand-in of ``adapter_name``."""
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
        backbone_cls = get_backbone(backbone)
        self.caprese_backbone[adapter_name] = backbone_cls(density)
        self.caprese_decoder[adapter_name] = backbone_cls.decoder(self, adapter_name)
        self.caprese_stand_in[adapter_name] = stand_in_bits
        self._stand_in_cache = None
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "A Caprese adapter cannot be merged into the base weights: prompt tokens run the dense block and "
            "generated tokens the sparse one, so no single set of weights serves both. Keep the PEFT model, or use "
            "`unload()` to get the base model back."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("A Caprese adapter is never merged, so there is nothing to unmerge.")

    def active_adapter_name(self) -> str | None:
        """The Caprese adapter this layer runs now: None when disabled or when no adapter of it is active."""
        # the attributes behind PEFT's properties, read directly: every forward asks, in every layer
        if self._disable_adapters or self.merged_adapters:
            return None
        active = self._active_adapter
        adapters = [a for a in ([active] if isinstance(active, str) else active) if a in self.caprese_backbone]
        if not adapters:
            return None
        if len(adapters) > 1:
            raise ValueError(f"Caprese runs one adapter at a time, but {adapters} are active.")
        return adapters[0]

    # ---- the three branches ----

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.active_adapter_name()
        step = self._state.step
        if adapter is None or step is None:
            return self.base_layer(x, *args, **kwargs)
        if step.phase is Phase.DECODE:
            return self.caprese_decoder[adapter](x, self.statistics(step, adapter))
        if step.phase is Phase.PREFILL:
            return self._prefill(x, step, adapter)
        gate, z = self.intermediate(x)
        if step.phase is Phase.TEACHER_FORCED:
            return self._teacher_forced(x, gate, z, step, adapter)
        return self._dense_rerun(x, gate, z, step, adapter)

    def _prefill(self, x: torch.Tensor, step: Step, adapter: str) -> torch.Tensor:
        """A prompt: the dense block, bit-identical to the base block's; the backbone computes its statistics from
        the prompt tokens as soon as they exist (a backbone of the gate alone before ``z``), while they are still in
        the caches that the next matrix product flushes."""
        mlp = self.base_layer
        backbone = self.caprese_backbone[adapter]
        self.caprese_decoder[adapter].new_prompt()
        gate = mlp.act_fn(mlp.gate_proj(x))
        if backbone.statistics_from_gate:
            stats = backbone.calibrate(gate, None, step.token_mask)
            z = gate * mlp.up_proj(x)
        else:
            z = gate * mlp.up_proj(x)
            stats = backbone.calibrate(gate, z, step.token_mask)
        # plain attributes (see __init__), set past nn.Module.__setattr__'s checks
        self.__dict__["_stats"] = stats
        self.__dict__["_stats_key"] = (step.generation, adapter)
        return mlp.down_proj(z)

    def _dense_rerun(
        self, x: torch.Tensor, gate: torch.Tensor, z: torch.Tensor, step: Step, adapter: str
    ) -> torch.Tensor:
        """The dense block on tokens that update the statistics (reselection) or that an observer sees."""
        backbone = self.caprese_backbone[adapter]
        dense = self.base_layer.down_proj(z)
        if step.phase is Phase.RESELECT:
            # a new statistics object, so anything derived from the old selection is rebuilt
            self._stats = backbone.update(self.statistics(step, adapter), gate, z, step.token_mask)
        elif step.phase is Phase.OBSERVED:
            keep = backbone.keep_mask(gate, backbone.calibrate(gate, z, step.token_mask))
            step.observe(Observation(self, adapter, x, gate, z, keep, dense, step.sparse_mask))
        return dense

    def _teacher_forced(
        self, x: torch.Tensor, gate: torch.Tensor, z: torch.Tensor, step: Step, adapter: str
    ) -> torch.Tensor:
        """Dense on prompt tokens, sparse plus ``x @ L @ R`` on the others, in one pass: generation's values."""
        backbone = self.caprese_backbone[adapter]
        sparse = step.sparse_mask.unsqueeze(-1)  # (B, S, 1)
        keep = backbone.keep_mask(gate, backbone.calibrate(gate, z, step.token_mask)) | ~sparse
        correction = self.low_rank(x, adapter) * sparse
        if self.caprese_stand_in.get(adapter):  # ~keep: the dropped neurons of the sparse tokens only
            correction = correction + self.stand_in(x, gate, ~keep, adapter)
        return self.base_layer.down_proj(z * keep) + correction

    # ---- the formulas every path shares ----

    def intermediate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate, z)`` with ``gate = act(x Wg)`` and ``z = gate * (x W1)``, both ``(B, S, F)``: the base block's
        own operations, so that the dense output ``down(z)`` is bit-identical to it."""
        mlp = self.base_layer
        gate = mlp.act_fn(mlp.gate_proj(x))
        return gate, gate * mlp.up_proj(x)

    def low_rank(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The correction ``x @ L @ R`` of ``adapter_name``."""
        return (x @ self.caprese_L[adapter_name]) @ self.caprese_R[adapter_name]

    def sparse_ff(
        self,
        x: torch.Tensor,
        gate: torch.Tensor,
        z: torch.Tensor,
        keep: torch.Tensor,
        adapter: str,
        low_rank: bool = True,
    ) -> torch.Tensor:
        """``down(z * keep) + x @ L @ R`` (the latter unless ``low_rank=False``), plus the stand-in of the dropped
        neurons when the adapter has one: the reference of every decode path."""
        out = self.base_layer.down_proj(z * keep)
        if low_rank:
            out = out + self.low_rank(x, adapter)
        if self.caprese_stand_in.get(adapter):
            out = out + self.stand_in(x, gate, ~keep, adapter)
        return out

    def stand_in(self, x: torch.Tensor, gate: torch.Tensor, dropped: torch.Tensor, adapter: str) -> torch.Tensor:
        """The dropped neurons' contribution from their quantized weights (``CapreseConfig.stand_in_bits``).

        A backbone that computes every gate activation anyway (CATS) uses them as they are; one that skips the
        dropped neurons' gates (GRIFFIN) takes them from the quantized gate weights too. ``dropped`` is a bool mask
        broadcastable to ``(B, S, F)``.
        """
        exact_gates = self.caprese_backbone[adapter].reads_every_gate
        gate_q, up_q, down_q = self.stand_in_weights(self.caprese_stand_in[adapter], with_gate=not exact_gates)
        if not exact_gates:
            gate = self.base_layer.act_fn(x @ gate_q.t())
        return ((gate * (x @ up_q.t())) * dropped) @ down_q  # (B, S, D)

    def stand_in_weights(
        self, bits: int, with_gate: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(Wg or None, W1, W2^T)`` quantized to ``bits`` per weight, row by row, and dequantized; built once per
        set of base weights and number of bits."""
        mlp = self.base_layer
        weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in weights)
        cache = self._stand_in_cache if self._stand_in_cache is not None else {}
        entry = cache.pop(bits, None)  # popped: a stale copy is freed before the new one is made
        if entry is None or entry[0] != key:
            up_q = quantize_rows(weights[1], bits).dequantize()
            down_q = quantize_rows(weights[2].t().contiguous(), bits).dequantize()  # neuron-major, as kernels read it
            entry = (key, [None, up_q, down_q])
        if with_gate and entry[1][0] is None:
            entry[1][0] = quantize_rows(weights[0], bits).dequantize()
        cache[bits] = entry
        self._stand_in_cache = cache
        return tuple(entry[1])

    def statistics(self, step: Step, adapter: str) -> Any:
        """The backbone statistics of this prompt batch; raises if the prefill ran for another adapter or none."""
        if self._stats is None or self._stats_key != (step.generation, adapter):
            raise RuntimeError(
                "Decode step without statistics from this prompt: the prefill ran with the Caprese adapter "
                "disabled or another adapter active. Generate with the same adapter state throughout."
            )
        return self._stats

    def decode_tensors(self, adapter: str) -> tuple[torch.Tensor, ...]:
        """``(Wg, W1, W2, L, R)``: the weights of a decode step, as ``caprese_peft.sparse_ff`` takes them."""
        mlp = self.base_layer
        return (
            mlp.gate_proj.weight,
            mlp.up_proj.weight,
            mlp.down_proj.weight,
            self.caprese_L[adapter],
            self.caprese_R[adapter],
        )

    def weights_key(self, adapter: str) -> tuple:
        """Changes whenever a decode weight of ``adapter`` does, so that weights derived from them are rebuilt.

        New storage (a ``.to()``, a reload) changes the pointer; an in-place update (optimizer step,
        ``load_state_dict``, ``copy_`` under no_grad) bumps the version counter; writes through ``.data`` are
        invisible: call ``release_decode_cache`` after them.
        """
        # tensors made under torch.inference_mode() have no version counter, and cannot be updated in place outside it
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in self.decode_tensors(adapter))

    def release_decode_cache(self) -> None:
        """Free the merged decode weights and the stand-in copies; the next step that needs them builds them again."""
        for decoder in self.caprese_decoder.values():
            decoder.release()
        self._stand_in_cache = None

    def __repr__(self) -> str:
        return "caprese." + super().__repr__()


def named_caprese_layers(model: nn.Module) -> dict[str, CapreseLayer]:
    """The Caprese layers of ``model`` (a PEFT model, its tuner or the wrapped transformers model) by module name.

    Raises when there are none, naming what to do.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CapreseLayer)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Caprese layers; wrap it with peft.get_peft_model first.")
    return layers


def caprese_layers(model: nn.Module) -> list[CapreseLayer]:
    """The Caprese layers of ``model`` in module order; raises when there are none."""
    return list(named_caprese_layers(model).values())
