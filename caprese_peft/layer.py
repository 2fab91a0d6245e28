"""The Caprese layer: a gated MLP block with a sparse backbone and a low-rank correction beside it."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .backbones import Backbone, Cats, Griffin, get_backbone
from .merged import (
    ACTIVATIONS,
    GriffinMergedWeights,
    activation_name,
    cats_merged_ff,
    griffin_merged_ff,
    griffin_merged_weights,
    keep_indices,
)
from .state import GenerationState, Phase

# How a Caprese layer computes generated tokens; see caprese_peft.set_decode_impl.
DECODE_IMPLS = ("auto", "merged", "reference")

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
    # how generated tokens are computed (one of DECODE_IMPLS), and whether the CATS kernel may run (None: where it
    # applies); class defaults that caprese_peft.set_decode_impl overrides per layer
    decode_impl: str = "auto"
    decode_use_kernels: bool | None = None
    # merged weights of appendix D, built by the first decode step that needs them; plain attributes, so they never
    # reach a state dict
    _griffin_decode_cache: tuple | None = None
    _cats_decode_cache: dict | None = None
    _kernel_activation: tuple | None = None

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
        if step.phase is Phase.DECODE:
            return self._decode(x, adapter, step)

        mlp = self.base_layer
        backbone = self.caprese_backbone[adapter]
        gate = mlp.act_fn(mlp.gate_proj(x))  # (B, S, d_ff)
        z = gate * mlp.up_proj(x)  # (B, S, d_ff), the same operations as the base block

        if step.phase is Phase.PREFILL:
            self._griffin_decode_cache = None  # the last prompt's merged weights: free them before new ones are built
            self._stats = backbone.calibrate(gate, z, step.token_mask)
            self._stats_generation = step.generation
            return mlp.down_proj(z)

        if step.phase is Phase.RESELECT:
            self._check_stats(step)
            # a new statistics object, so anything derived from the old selection is rebuilt
            self._stats = backbone.update(self._stats, gate, z, step.token_mask)
            return mlp.down_proj(z)

        sparse = step.sparse_mask.unsqueeze(-1)  # (B, S, 1)
        keep = backbone.keep_mask(gate, backbone.calibrate(gate, z, step.token_mask))
        if step.phase is Phase.MOMENTS:
            # the regression of equation 7 streamed by the closed-form solver: inputs and FF(x) - FF_sparse(x)
            dense = mlp.down_proj(z)
            step.observe(self, x, dense - mlp.down_proj(z * keep))
            return dense
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

    # ---- generated tokens (Phase.DECODE) ----

    def _decode(self, x: torch.Tensor, adapter: str, step: Any) -> torch.Tensor:
        """One generated token per sequence: the sparse block plus ``x @ L @ R``, merged (appendix D) where chosen."""
        self._check_stats(step)
        path = self._decode_path(x, adapter)
        if path == "griffin":
            return griffin_merged_ff(x, self.griffin_decode_weights(adapter), self.base_layer.act_fn)
        if path == "cats":
            return self._cats_decode(x, adapter)
        return self.reference_decode(x, adapter)

    def _check_stats(self, step: Any) -> None:
        if self._stats is None or self._stats_generation != step.generation:
            raise RuntimeError(
                "Decode step without statistics from this prompt: the prefill ran with the Caprese adapter "
                "disabled or another adapter active. Generate with the same adapter state throughout."
            )

    def reference_decode(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The unmerged decode formula ``down(act(gate(x)) * up(x) * keep) + x @ L @ R``; ``x`` is ``(B, S, D)``.

        Reads every FF weight and masks: the specification the merged paths must match.
        """
        mlp = self.base_layer
        gate = mlp.act_fn(mlp.gate_proj(x))  # (B, S, d_ff)
        z = gate * mlp.up_proj(x)
        z = z * self.caprese_backbone[adapter].keep_mask(gate, self._stats)
        return mlp.down_proj(z) + self.low_rank(x, adapter)

    def _decode_path(self, x: torch.Tensor, adapter: str) -> str:
        """``"reference"``, ``"griffin"`` or ``"cats"``: what ``decode_impl`` asks for, where it can run."""
        impl = self.decode_impl
        if impl not in DECODE_IMPLS:
            raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {impl!r}.")
        if impl == "reference":
            return "reference"
        backbone = self.caprese_backbone[adapter]
        kind = "griffin" if isinstance(backbone, Griffin) else "cats" if isinstance(backbone, Cats) else None
        problem = self._merged_decode_problem(x, adapter, kind)
        if problem is not None:
            if impl == "merged":
                raise ValueError(f"decode_impl='merged' cannot run: {problem}. Use 'auto' or 'reference'.")
            if not problem.startswith("gradients"):  # training through decode steps is not a slow path to flag
                _warn_once(f"Caprese decodes with the unmerged reference formula: {problem}.")
            return "reference"
        if impl == "auto" and kind == "cats" and not self._cats_kernel_applies(x):
            # without the kernel, merged CATS computes every neuron as the reference does, from copied weights
            return "reference"
        if impl == "auto" and kind == "griffin" and x.shape[0] * self.caprese_backbone[adapter].density >= 1:
            # each sequence has its own pruned weights: past batch x density = 1 they outweigh the shared full ones
            return "reference"
        return kind

    def _merged_decode_problem(self, x: torch.Tensor, adapter: str, kind: str | None) -> str | None:
        if kind is None:
            name = self.caprese_backbone[adapter].name
            return f"the {name!r} backbone has no merged form (GRIFFIN and CATS have one)"
        biased = [p for p in GATED_MLP_PARTS[:3] if getattr(self.base_layer, p).bias is not None]
        if biased:
            return f"{', '.join(biased)} of the wrapped block have biases, which the merged weights leave out"
        if torch.is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in self._decode_tensors(adapter))
        ):
            return (
                "gradients are needed (grad mode is on and the input or weights require grad), but merged weights "
                "are built without autograd; decode under torch.no_grad(), or train with teacher forcing"
            )
        return None

    def _decode_tensors(self, adapter: str) -> tuple[torch.Tensor, ...]:
        """``(Wg, W1, W2, L, R)``: the weights of a decode step, as ``caprese_peft.merged`` takes them."""
        mlp = self.base_layer
        return (
            mlp.gate_proj.weight,
            mlp.up_proj.weight,
            mlp.down_proj.weight,
            self.caprese_L[adapter],
            self.caprese_R[adapter],
        )

    def _weights_key(self, adapter: str) -> tuple:
        # new storage (a .to(), a reload) changes the pointer; an in-place update (optimizer step, load_state_dict,
        # copy_ under no_grad) bumps the version counter; writes through `.data` are invisible: release the cache
        return tuple((t.data_ptr(), t._version) for t in self._decode_tensors(adapter))

    def griffin_decode_weights(self, adapter: str) -> GriffinMergedWeights:
        """Per-sequence pruned GRIFFIN weights of this prompt batch with ``L``, ``R`` appended, built once.

        Cached on the identity of the statistics object ``self._stats``, which a new prompt or a reselection
        replaces, and on the weights (see ``_weights_key``); a stale cache is freed before the new one is built.
        """
        stats = self._stats
        key = (adapter, self._weights_key(adapter), stats.keep.data_ptr(), stats.keep._version)
        cached = self._griffin_decode_cache
        if cached is not None and cached[0] is stats and cached[1] == key:
            return cached[2]
        self._griffin_decode_cache = None
        with torch.no_grad():
            merged = griffin_merged_weights(*self._decode_tensors(adapter), keep_indices(stats.keep))
        self._griffin_decode_cache = (stats, key, merged)
        return merged

    def cats_decode_weights(self, adapter: str, *, low_rank: bool = True):
        """``kernels.CatsFFWeights`` of ``adapter``: ``Wg``, ``[W1; L^T]``, ``[W2^T; R]``, built once and cached.

        The up and down weights are copied (the kernel reads them neuron-major), which costs their memory once
        more until ``release_decode_cache``. ``low_rank=False`` leaves ``L``, ``R`` out: the backbone alone.
        Rebuilt when a weight changes storage or is updated in place.
        """
        from kernels import prepare_cats_weights

        key = self._weights_key(adapter)
        cache = self._cats_decode_cache if self._cats_decode_cache is not None else {}
        entry = cache.pop((adapter, low_rank), None)  # popped: a stale entry is freed before the rebuild
        if entry is None or entry[0] != key:
            gate, up, down, left, right = self._decode_tensors(adapter)
            if not low_rank:
                left, right = left[:, :0], right[:0]
            entry = (key, prepare_cats_weights(gate, up, down, left, right))
        cache[(adapter, low_rank)] = entry
        self._cats_decode_cache = cache
        return entry[1]

    def _cats_decode(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        activation = self.kernel_activation()
        if activation is None:
            if self.decode_use_kernels:
                raise ValueError(
                    f"decode_use_kernels=True, but the CATS kernel computes {sorted(ACTIVATIONS)} and this block's "
                    f"activation {self.base_layer.act_fn!r} is none of them."
                )
            # the torch form of merged CATS takes any activation
            return cats_merged_ff(x, *self._decode_tensors(adapter), self._stats.threshold, self.base_layer.act_fn)
        from kernels import cats_ff

        weights = self.cats_decode_weights(adapter)
        return cats_ff(x, weights, self._stats.threshold, activation, use_kernels=self.decode_use_kernels)

    def _cats_kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether ``decode_impl="auto"`` runs CATS through the Triton kernel for this input."""
        if self.decode_use_kernels is not None:
            return self.decode_use_kernels
        if not x.is_cuda or self.kernel_activation() is None:
            return False
        try:
            from kernels import MAX_BATCH, SUPPORTED_DTYPES
        except ImportError:  # no triton on this platform
            return False
        return x.shape[0] <= MAX_BATCH and x.shape[1] == 1 and x.dtype in SUPPORTED_DTYPES

    def kernel_activation(self) -> str | None:
        """The name under which the fused kernels know this block's activation, or None if they do not."""
        act = self.base_layer.act_fn
        cached = self._kernel_activation
        if cached is None or cached[0] is not act:
            cached = (act, activation_name(act))
            self._kernel_activation = cached
        return cached[1]

    def release_decode_cache(self) -> None:
        """Free the merged decode weights; the next decode step that needs them builds them again."""
        self._griffin_decode_cache = None
        self._cats_decode_cache = None

    def __repr__(self) -> str:
        return "caprese." + super().__repr__()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
