"""A lean decode step for Llama-family decoders: one token per sequence, fused weights, a static KV cache.

gpt-fast style (pytorch-labs/gpt-fast ``model.py``): the step reads the weights of a transformers model (fusing
q/k/v and gate/up into single GEMVs), keeps keys and values in preallocated buffers, and does nothing a decode
step does not need, so ``torch.compile(mode="reduce-overhead")`` turns it into one CUDA graph. Its reference
is the transformers model itself: for the same prompt it computes the same logits as a decode step of
``generate``, up to the order of floating-point sums. The feed-forward block of each layer is a module of its
own: dense, GRIFFIN on merged per-sequence weights, or CATS through ``caprese_peft.kernels.cats_ff``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.griffin import kept_count
from ..sparse_ff import activation_name, cats_merged_ff, griffin_fused_ff

# the buffers of a block laid out for caprese_cpu::gated_ff: CatsFFWeights' fields, in its order
CPU_WEIGHTS = ("gate", "up", "low_up", "down_t", "low_down")


def _hold_ff_weights(module: nn.Module, weights: Any, static: bool = True) -> None:
    """Register ``weights`` (``CatsFFWeights``) as ``module``'s non-persistent buffers named ``CPU_WEIGHTS``.

    Interleaved weights (on a CPU) are held as one ``up_down`` buffer, ``up`` and ``down_t`` left None: a compiled
    region (``torch.compiler.nested_compile_region``) refuses inputs that alias, so ``_ff_weights`` takes the two
    views inside the step.
    """
    pair = weights.pair
    mark = _static if static else (lambda t: t)
    module.register_buffer("up_down", None if pair is None else mark(pair), persistent=False)
    for name, tensor in zip(CPU_WEIGHTS, weights.op_args()):
        held = None if pair is not None and name in ("up", "down_t") else mark(tensor)
        module.register_buffer(name, held, persistent=False)


def _ff_weights(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s weights in ``CatsFFWeights.op_args`` order (see ``_hold_ff_weights``)."""
    weights = [getattr(module, name) for name in CPU_WEIGHTS]
    if module.up_down is not None:
        weights[1], weights[3] = module.up_down[:, 0], module.up_down[:, 1]
    return weights


@dataclass(frozen=True)
class Architecture:
    """What the lean step must know of a Llama-family decoder beyond its sizes."""

    qk_norm: bool = False  # an RMSNorm on each head's query and key before the rotary embedding
    sliding_window: str | None = None  # "always" if the config's window always applies, or the flag turning it on


ARCHITECTURES = {
    "llama": Architecture(),
    "mistral": Architecture(sliding_window="always"),
    "qwen2": Architecture(sliding_window="use_sliding_window"),
    "qwen3": Architecture(qk_norm=True, sliding_window="use_sliding_window"),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq fixed at init: a table serves all steps


def architecture_problem(config: Any, max_seq_len: int | None = None) -> str | None:
    """Why the lean step cannot decode a model with this (text) ``config``, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    architecture = ARCHITECTURES[model_type]
    rope = config.rope_parameters or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} changes with the sequence length (supported: {_STATIC_ROPE_TYPES})"
    flag = architecture.sliding_window
    slides = flag == "always" or (flag is not None and getattr(config, flag))
    window = config.sliding_window if flag is not None else None
    if slides and window is not None and (max_seq_len is None or window < max_seq_len):
        return f"sliding-window attention (window {window}) is not implemented"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1 is not supported"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama family computes it: in fp32, scaled after casting back."""
    h = x.float()
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x (B, heads, 1, hd)`` with ``cos, sin (B, 1, 1, hd)`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cpu_op: bool) -> torch.Tensor:
    """``F.linear`` of decode tokens ``x (B, ..., D)``; ``cpu_op``: through ``caprese_cpu::linear`` (a CPU GEMV that
    reads the weights at the memory's speed at any batch size, where MKL's drops past batch 1)."""
    if not cpu_op:
        return F.linear(x, weight, bias)
    out = torch.ops.caprese_cpu.linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _alias(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _static(t: torch.Tensor) -> torch.Tensor:
    # CUDA graphs replay with fixed addresses: these tensors are never copied into graph-owned buffers
    torch._dynamo.mark_static_address(t)
    return t


def _store(module: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Set buffer ``name`` to ``value``'s values (in ``dtype``, default its own), in place when the shape allows.

    In place keeps the addresses a captured CUDA graph reads; it costs one copy, the conversion included. A new
    buffer never shares memory with ``value`` (which may be the layer's statistics).
    """
    current = getattr(module, name)
    dtype = value.dtype if dtype is None else dtype
    if current is not None and current.shape == value.shape and current.dtype == dtype:
        current.copy_(value)
        return
    stored = value.to(dtype, memory_format=torch.contiguous_format)
    if stored.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
        stored = stored.clone()
    setattr(module, name, _static(stored))


class _CpuOpFF(nn.Module):
    """An FF block of the lean step that may run ``caprese_cpu::gated_ff``: ``activation`` is the op's name for its
    activation where it does (None where not), and ``op_args()`` its arguments after ``x``."""

    activation: str | None

    @property
    def runs_cpu_op(self) -> bool:
        """Whether the block runs ``caprese_cpu::gated_ff`` with ``op_args()`` (what ``LeanDecoder.block_step``
        calls)."""
        return self.activation is not None


class DenseFF(_CpuOpFF):
    """The unmodified gated MLP: on a CPU with the C++ ops one pass over its rows (``caprese_cpu::gated_ff``; gate
    read in place, ``W1`` and ``W2^T`` copied once, each neuron's two rows side by side); elsewhere gate and up
    fused into one ``(2F, D)`` GEMV (a copy of those two weights)."""

    def __init__(self, mlp: nn.Module, cpu_ops: bool = False) -> None:
        super().__init__()
        self.act = mlp.act_fn
        self.ff_size = mlp.gate_proj.out_features
        biased = any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj"))
        self.activation = activation_name(mlp.act_fn) if cpu_ops and not biased else None
        if self.activation is not None:
            from ..kernels.cpu_ff import prepare_dense_weights

            weights = prepare_dense_weights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            _hold_ff_weights(self, weights, static=False)
            return
        with torch.no_grad():
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # (2F, D)
            biases = (mlp.gate_proj.bias, mlp.up_proj.bias)
            bias = None if biases[0] is None else torch.cat(biases)
        self.register_buffer("gate_up", _static(gate_up), persistent=False)
        self.register_buffer("gate_up_bias", bias, persistent=False)
        self.register_buffer("down", _static(mlp.down_proj.weight.detach()), persistent=False)
        self.register_buffer("down_bias", _alias(mlp.down_proj.bias), persistent=False)

    def op_args(self) -> tuple:
        """``caprese_cpu::gated_ff``'s arguments after ``x`` for this block (where ``runs_cpu_op``)."""
        return (*_ff_weights(self), None, None, self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            return torch.ops.caprese_cpu.gated_ff(x[:, 0], *self.op_args())[:, None]
        gate, up = F.linear(x, self.gate_up, self.gate_up_bias).split(self.ff_size, dim=-1)  # (B, 1, F) each
        return F.linear(self.act(gate) * up, self.down, self.down_bias)

    def weight_bytes(self, batch: int) -> int:
        """Bytes of weights one decode step reads."""
        if self.activation is not None:
            return sum(t.nbytes for t in _ff_weights(self))
        return self.gate_up.nbytes + self.down.nbytes


class GriffinFF(_CpuOpFF):
    """GRIFFIN (+ low rank) on this prompt batch's kept rows (appendix D).

    On a CPU with the C++ ops: ``caprese_cpu::gated_ff`` with each sequence's keep mask. ``pack`` gathers the gate,
    up and down rows of the union of the batch's kept neurons into contiguous buffers (``min(F, B k)`` rows, the
    union first, in neuron order), which each step reads once for all sequences at the speed of a dense block
    (benchmarks/griffin_rows.py: rows read where they lie, scattered, go about 25% slower). With the 4-bit
    stand-in of pruned neurons the rows are read in place over the whole block instead. Elsewhere: per-sequence
    merged weights, gate and up fused, two batched GEMVs (``caprese_peft.sparse_ff.griffin_fused_ff``, whose
    reference is ``griffin_merged_ff``). Either way ``load`` takes the prompt batch's selection and ``pack``
    materialises the weights the step reads into static buffers.
    """

    STAND_IN = ("stand_up", "stand_down", "stand_scale", "stand_gate")  # StandIn4's op arguments, in order
    # the union's rows of gate, and of up and down_t side by side ((capacity, 2, D), as CatsFFWeights.pair holds them)
    PACKED = ("packed_gate", "packed_up_down")

    def __init__(self, decoder: Any, low_rank: bool, cpu_ops: bool = False, stand_in: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "decoder", decoder)  # a GriffinDecoder; not a submodule: the step never runs it
        self.low_rank = low_rank
        self.act = decoder.layer.base_layer.act_fn
        self.activation = decoder.activation() if cpu_ops else None
        self.kept = 0  # k, set by load
        self.stand_in = stand_in  # the 4-bit stand-in of pruned neurons (CPU op only)
        if stand_in and self.activation is None:
            raise ValueError("The 4-bit stand-in of pruned GRIFFIN neurons decodes through the C++ CPU op only.")
        self._selection: Any = None  # the prompt batch's statistics, between load and pack
        if self.activation is not None:
            _hold_ff_weights(self, decoder.build(None, low_rank, union=True), static=False)
            self.register_buffer("keep", None, persistent=False)  # (B, F) uint8; packed: (B, min(F, B k))
            for name in self.PACKED:
                self.register_buffer(name, None, persistent=False)
            if stand_in:
                for name, tensor in zip(self.STAND_IN, decoder.stand_in().op_args()):
                    self.register_buffer(name, _static(tensor), persistent=False)
            return
        self.register_buffer("gate_up", None, persistent=False)  # (B, 2k + r, D): Wg rows, W1 rows, L^T
        self.register_buffer("down", None, persistent=False)  # (B, D, k + r): W2 columns, R^T

    @property
    def packs(self) -> bool:
        """Whether the C++ op reads packed copies of the kept rows (rather than the block in place)."""
        return self.activation is not None and not self.stand_in

    def load(self) -> None:
        """Take this prompt batch's selection from the layer's statistics; ``pack`` builds what the step reads."""
        self._selection = self.decoder.layer._stats

    def pack(self) -> None:
        """Materialise the weights this prompt batch's steps read, in place where shapes allow: the most expensive
        part of preparing a prompt (one read and one write of the kept rows), so ``LeanDecoder`` can defer it."""
        stats, self._selection = self._selection, None
        if stats is None:
            return
        with torch.no_grad():
            if self.activation is None:
                merged = self.decoder.build(stats, self.low_rank)
                self.kept = merged.gate.shape[1]
                _store(self, "gate_up", torch.cat([merged.gate, merged.up], dim=1))  # (B, 2k + r, D)
                _store(self, "down", merged.down)  # (B, D, k + r)
                return
            keep = stats.keep.reshape(stats.keep.shape[0], -1)  # (B, F) bool
            self.kept = kept_count(self.decoder.backbone.density, self.gate.shape[0])
            if not self.packs:
                _store(self, "keep", keep, torch.uint8)
                return
            union = keep.any(dim=0).nonzero()[:, 0]  # ascending neuron ids
            capacity = min(self.gate.shape[0], keep.shape[0] * self.kept)  # the most a union can hold
            hidden = self.gate.shape[1]
            if self.packed_gate is None or self.packed_gate.shape[0] != capacity:
                # zeros after the union: never read (their keep is 0), but never uninitialised memory either
                self.packed_gate = _static(self.gate.new_zeros(capacity, hidden))
                self.packed_up_down = _static(self.gate.new_zeros(capacity, 2, hidden))
            n = union.numel()
            torch.index_select(self.gate, 0, union, out=self.packed_gate[:n])
            # one gather of each kept neuron's two adjacent rows (CPU weights always hold them side by side)
            torch.index_select(self.up_down, 0, union, out=self.packed_up_down[:n])
            mask = torch.zeros(keep.shape[0], capacity, dtype=torch.uint8, device=keep.device)
            mask[:, : union.numel()] = keep[:, union]
            _store(self, "keep", mask)

    def op_args(self) -> tuple:
        """``caprese_cpu::gated_ff``'s arguments after ``x`` for this prompt batch (after ``pack``; where
        ``runs_cpu_op``)."""
        weights = _ff_weights(self)
        if self.packs:
            pair = self.packed_up_down
            weights[0], weights[1], weights[3] = self.packed_gate, pair[:, 0], pair[:, 1]
        stand_in = [getattr(self, name) for name in self.STAND_IN] if self.stand_in else [None] * 4
        return (*weights, None, self.keep, self.activation, *stand_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            return torch.ops.caprese_cpu.gated_ff(x[:, 0], *self.op_args())[:, None]
        return griffin_fused_ff(x, self.gate_up, self.down, self.kept, self.act)

    def weight_bytes(self, batch: int) -> int:
        """Bytes a step reads: each sequence its own pruned copy; with the CPU op, the union's rows once."""
        if self.activation is None:
            return self.gate_up.nbytes + self.down.nbytes
        union = int(self.keep.any(dim=0).sum()) if self.keep is not None else self.kept  # packed or not
        row = self.gate.nbytes // self.gate.shape[0]  # one row of one matrix
        kept = 3 * union * row + self.low_up.nbytes + self.low_down.nbytes
        if not self.stand_in:
            return kept
        pruned = int((self.keep == 0).any(dim=0).sum()) if self.keep is not None else self.gate.shape[0] - self.kept
        stand_row = sum(getattr(self, name).nbytes for name in self.STAND_IN) / self.gate.shape[0]
        return kept + round(pruned * stand_row)


class CatsFF(_CpuOpFF):
    """CATS (+ low rank) through ``caprese_peft.kernels.cats_ff``: the Triton op on CUDA where it applies, its
    reference elsewhere. An activation the kernel does not know runs ``cats_merged_ff`` (reading every weight).

    The kernel weights (``CatsFFWeights``, shared with the layer's merged decode) are buffers, so that a compiled
    step takes them as inputs: one compiled layer then serves every layer.
    """

    STAND_IN = ("stand_up", "stand_down", "stand_scale")  # StandIn4's fields, in its order

    def __init__(self, decoder: Any, low_rank: bool, use_kernels: bool | None, stand_in: bool = False) -> None:
        super().__init__()
        from ..kernels import CatsFFWeights, cats_ff

        object.__setattr__(self, "decoder", decoder)  # a CatsDecoder
        self.activation = decoder.activation()
        self.use_kernels = use_kernels
        if self.activation is None and use_kernels:
            raise ValueError(
                f"use_kernels=True, but the CATS kernel knows silu and gelu_tanh and "
                f"{decoder.layer.base_layer.act_fn!r} is neither."
            )
        _hold_ff_weights(self, decoder.weights(low_rank))
        object.__setattr__(self, "_cats_ff", cats_ff)
        object.__setattr__(self, "_weights_cls", CatsFFWeights)
        self.register_buffer("threshold", None, persistent=False)  # (B,) fp32
        self.stand_in = None  # the 4-bit stand-in of dropped neurons (kernels.cpu_ff.StandIn4), C++ op only
        if stand_in:
            from ..kernels.cpu_ff import StandIn4, cats_ff_cpu

            for name, tensor in zip(self.STAND_IN, decoder.stand_in().op_args()):
                self.register_buffer(name, _static(tensor), persistent=False)
            object.__setattr__(self, "_cats_ff_cpu", cats_ff_cpu)
            object.__setattr__(self, "_stand_in_cls", StandIn4)
            self.stand_in = True

    @property
    def weights(self) -> Any:
        """The kernel weights, as ``caprese_peft.kernels.CatsFFWeights``."""
        return self._weights_cls(*_ff_weights(self))

    def load(self) -> None:
        """Take this prompt batch's thresholds from the layer's statistics."""
        with torch.no_grad():
            _store(self, "threshold", self.decoder.layer._stats.threshold.reshape(-1), torch.float32)

    @property
    def runs_cpu_op(self) -> bool:
        """Here also kernels not turned off, and a CPU: elsewhere the block runs the Triton op or its reference."""
        return self.activation is not None and self.use_kernels is not False and self.gate.device.type == "cpu"

    def op_args(self) -> tuple:
        """``caprese_cpu::gated_ff``'s arguments after ``x`` for this prompt batch (after ``load``)."""
        stand_in = [getattr(self, name) for name in self.STAND_IN] + [None] if self.stand_in else [None] * 4
        return (*_ff_weights(self), self.threshold, None, self.activation, *stand_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is None:
            act = self.decoder.layer.base_layer.act_fn
            return cats_merged_ff(x, *self.weights.reference_args(), self.threshold.view(-1, 1, 1), act)
        if self.stand_in:
            stand_in = self._stand_in_cls(*(getattr(self, name) for name in self.STAND_IN))
            out = self._cats_ff_cpu(
                x[:, 0], self.weights, self.threshold, self.activation, stand_in, use_kernels=self.use_kernels
            )
        else:
            out = self._cats_ff(x[:, 0], self.weights, self.threshold, self.activation, use_kernels=self.use_kernels)
        return out[:, None]  # (B, 1, D)

    def weight_bytes(self, batch: int, density: float | None = None) -> int:
        """Bytes a step reads: the whole gate, then up and down rows of ``density`` of the neurons plus the ``r``.

        Nominal: at batch > 1 the kernel reads the rows of neurons any sequence keeps, more than ``density``.
        """
        density = self.decoder.backbone.density if density is None else density
        gate, up, low_up, down_t, low_down = _ff_weights(self)
        ff_size = up.shape[0]
        row_bytes = (up.nbytes + down_t.nbytes) / ff_size  # one neuron's up and down rows
        kept = gate.nbytes + round(density * ff_size * row_bytes) + low_up.nbytes + low_down.nbytes
        if not self.stand_in:
            return kept
        # the dropped neurons' 4-bit up and down rows and their two scales
        stand_row = (self.stand_up.nbytes + self.stand_down.nbytes + self.stand_scale.nbytes) / ff_size
        return kept + round((1 - density) * ff_size * stand_row)


class Attention(nn.Module):
    """Self-attention of one decode token over a static KV cache; q/k/v fused into one GEMV."""

    def __init__(self, attn: nn.Module, config: Any) -> None:
        super().__init__()
        architecture = ARCHITECTURES[config.model_type]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        with torch.no_grad():
            qkv = torch.cat([p.weight for p in projections])  # ((H + 2 Hkv) hd, D)
            bias = None if attn.q_proj.bias is None else torch.cat([p.bias for p in projections])
        self.register_buffer("qkv", _static(qkv), persistent=False)
        self.register_buffer("qkv_bias", bias, persistent=False)
        self.register_buffer("o", _static(attn.o_proj.weight.detach()), persistent=False)
        self.register_buffer("o_bias", _alias(attn.o_proj.bias), persistent=False)
        q_norm, k_norm = (attn.q_norm, attn.k_norm) if architecture.qk_norm else (None, None)
        self.register_buffer("q_norm", None if q_norm is None else q_norm.weight.detach(), persistent=False)
        self.register_buffer("k_norm", None if k_norm is None else k_norm.weight.detach(), persistent=False)
        self.qk_eps = 0.0 if q_norm is None else q_norm.variance_epsilon
        self.cpu_gemv = False  # set by LeanDecoder
        self.fuse_attention = True  # compiled on a CPU: attention's products as sums inductor fuses
        self.register_buffer("k_cache", None, persistent=False)  # (B, Hkv, S, hd)
        self.register_buffer("v_cache", None, persistent=False)

    def allocate(self, batch: int, max_seq_len: int) -> None:
        shape = (batch, self.kv_heads, max_seq_len, self.head_dim)
        self.k_cache = _static(torch.zeros(shape, device=self.qkv.device, dtype=self.qkv.dtype))
        self.v_cache = _static(torch.zeros(shape, device=self.qkv.device, dtype=self.qkv.dtype))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        batch = x.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = gemv(x, self.qkv, self.qkv_bias, self.cpu_gemv).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, 1, self.heads, self.head_dim)
        k = k.view(batch, 1, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.qk_eps), rms_norm(k, self.k_norm, self.qk_eps)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, 1, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, 1, hd)
        v = v.view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache.index_copy_(2, slot, k)
        self.v_cache.index_copy_(2, slot, v)
        # query heads grouped by the key/value head they share (transformers' repeat_kv order), so the cache is
        # read once per KV head rather than copied per query head
        q = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)  # (B, Hkv, G, hd)
        # the first n slots of the cache, those visible may hold (all of them unless the step was given fewer)
        n = visible.shape[-1]
        keys, values = self.k_cache[:, :, :n], self.v_cache[:, :, :n]
        # compiled for a CPU, the two products as broadcast sums: inductor fuses each into one loop over the cache,
        # where a batched matmul per layer and product costs ~45 us of library dispatch for a few KFLOPs
        fused = self.fuse_attention and x.device.type == "cpu" and torch.compiler.is_compiling()
        if fused:
            scores = (q[:, :, :, None] * keys[:, :, None]).sum(-1)  # (B, Hkv, G, n)
        else:
            scores = torch.matmul(q, keys.transpose(2, 3))
        scores = (scores * self.scaling).masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if fused:
            out = (probs[..., None] * values[:, :, None]).sum(-2)  # (B, Hkv, G, hd)
        else:
            out = torch.matmul(probs, values)
        return gemv(out.reshape(batch, 1, self.heads * self.head_dim), self.o, self.o_bias, self.cpu_gemv)

    def block_args(self) -> tuple:
        """``caprese_cpu::attention_block``'s arguments from ``qkv`` to ``k_norm``, then ``qk_eps``."""
        return self.qkv, self.qkv_bias, self.q_norm, self.k_norm, self.qk_eps

    def weight_bytes(self) -> int:
        return self.qkv.nbytes + self.o.nbytes

    def cache_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.k_cache, self.v_cache) if t is not None)

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.cache_tensors())


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, config: Any, ff: nn.Module) -> None:
        super().__init__()
        self.attn = Attention(hf_layer.self_attn, config)
        self.ff = ff
        self.register_buffer("attn_norm", hf_layer.input_layernorm.weight.detach(), persistent=False)
        self.register_buffer("ff_norm", hf_layer.post_attention_layernorm.weight.detach(), persistent=False)
        self.eps = hf_layer.input_layernorm.variance_epsilon

    def forward(self, h, cos, sin, slot, visible) -> torch.Tensor:
        h = h + self.attn(rms_norm(h, self.attn_norm, self.eps), cos, sin, slot, visible)
        return h + self.ff(rms_norm(h, self.ff_norm, self.eps))


class LeanDecoder(nn.Module):
    """The decode step of a Llama-family transformers causal LM, with the FF blocks given per layer.

    Call ``allocate`` for a batch size and cache length, ``load_prompt`` with the prefill's KV cache, then
    ``forward(tokens, slot, positions)`` once per generated token.
    """

    def __init__(self, model: nn.Module, ffs: list[nn.Module], cpu_gemv: bool = False) -> None:
        super().__init__()
        config = model.config
        decoder = model.model
        if len(ffs) != len(decoder.layers):
            raise ValueError(f"Got {len(ffs)} FF blocks for {len(decoder.layers)} layers.")
        self.layers = nn.ModuleList(DecoderLayer(layer, config, ff) for layer, ff in zip(decoder.layers, ffs))
        self.register_buffer("embed", model.get_input_embeddings().weight.detach(), persistent=False)
        self.register_buffer("norm", decoder.norm.weight.detach(), persistent=False)
        self.register_buffer("lm_head", _static(model.get_output_embeddings().weight.detach()), persistent=False)
        self.eps = decoder.norm.variance_epsilon
        object.__setattr__(self, "_rotary", decoder.rotary_emb)
        for name in ("cos", "sin", "prompt_visible", "prompt_width", "key_slots"):
            self.register_buffer(name, None, persistent=False)
        self.batch_size = self.max_seq_len = 0
        self.prompt_length = 0  # prompt_width on the host
        self._blocks: list[tuple[tuple, tuple]] | None = None  # block_step's arguments per layer, for this prompt
        self.load_pending = False  # load_prompt(..., defer=True) ran and finish_load has not
        # the C++ GEMV of caprese_peft.kernels.cpu_ff for q/k/v, o and the lm_head (on a CPU)
        self.cpu_gemv = cpu_gemv
        for layer in self.layers:
            layer.attn.cpu_gemv = cpu_gemv
        # FastDecoder on a CPU passes the step the cache slots up to the current token (forward's keys); False: all
        self.bounded_attention = True
        # under torch.compile, trace one decoder layer and reuse its code for the others of the same structure
        self.compile_layers_once = True
        object.__setattr__(self, "_layer_once", _compiled_once())

    def allocate(self, batch: int, max_seq_len: int) -> None:
        """(Re)allocate the static buffers: KV caches, rotary tables and masks for ``batch`` x ``max_seq_len``."""
        device, dtype = self.embed.device, self.embed.dtype
        with torch.no_grad():
            positions = torch.arange(max_seq_len, device=device)
            probe = torch.zeros(1, device=device, dtype=dtype)
            cos, sin = self._rotary(probe, positions[None])  # (1, S, hd), as transformers computes them
        self.cos, self.sin = _static(cos[0].contiguous()), _static(sin[0].contiguous())
        self.key_slots = _static(positions)
        self.prompt_visible = _static(torch.zeros(batch, max_seq_len, device=device, dtype=torch.bool))
        self.prompt_width = _static(torch.zeros(1, device=device, dtype=torch.long))
        for layer in self.layers:
            layer.attn.allocate(batch, max_seq_len)
        self.batch_size, self.max_seq_len = batch, max_seq_len
        self._blocks = None

    def load_prompt(self, cache: Any, attention_mask: torch.Tensor, *, defer: bool = False) -> None:
        """Copy the prefill's KV cache into the static buffers and load the FF blocks for this prompt batch.

        ``defer=True`` leaves the FF blocks' packing of their weights (GRIFFIN's kept rows: on SmolLM2 about as long
        as a tenth of the prefill) to ``finish_load``, which must run before the next step: a caller that hands out
        the prefill's token first keeps it out of the time to first token.
        """
        batch, width = attention_mask.shape
        if batch != self.batch_size or width >= self.max_seq_len:
            raise ValueError(
                f"A prompt batch of shape {(batch, width)} does not fit buffers allocated for batch {self.batch_size} "
                f"and {self.max_seq_len} positions (the prompt plus at least one generated token)."
            )
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                keys, values = cache_layer(cache, index)  # (B, Hkv, P, hd)
                layer.attn.k_cache[:, :, :width].copy_(keys)
                layer.attn.v_cache[:, :, :width].copy_(values)
                if hasattr(layer.ff, "load"):
                    layer.ff.load()
            self.prompt_visible.zero_()
            self.prompt_visible[:, :width].copy_(attention_mask.bool())
            self.prompt_width.fill_(width)
        self.prompt_length = width
        self._blocks = None
        self.load_pending = True
        if not defer:
            self.finish_load()

    def finish_load(self) -> None:
        """What ``load_prompt(..., defer=True)`` left: the FF blocks' packed weights for this prompt batch."""
        for layer in self.layers:
            if hasattr(layer.ff, "pack"):
                layer.ff.pack()
        self.load_pending = False
        self._blocks = None  # packing may have replaced buffers

    def block_problem(self) -> str | None:
        """Why ``block_step`` cannot run this decoder, or None when it can."""
        if not self.cpu_gemv:
            return "the C++ CPU ops are off"
        if self.embed.device.type != "cpu" or self.embed.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return (
                f"the model is {self.embed.dtype} on {self.embed.device.type} (the ops take fp32, bf16, fp16 on a CPU)"
            )
        held = [self.norm, self.lm_head]
        held += [t for layer in self.layers for t in (layer.attn_norm, layer.ff_norm, layer.attn.qkv, layer.attn.o)]
        if any(t.dtype != self.embed.dtype for t in held):
            return f"the model's weights are not all {self.embed.dtype}"
        for index, layer in enumerate(self.layers):
            if not getattr(layer.ff, "runs_cpu_op", False):
                return f"layer {index}'s FF block ({type(layer.ff).__name__}) does not run the C++ op"
        return None

    def block_step(self, tokens: torch.Tensor, slot: int, positions: torch.Tensor) -> torch.Tensor:
        """``forward``'s logits ``(B, V)`` fp32 as a chain of C++ calls (on a CPU, where ``block_problem`` is None):
        per layer ``caprese_cpu::attention_block`` then ``caprese_cpu::ff_block``, then ``norm_linear`` for the
        head. No compilation: ``slot`` is a Python int, and attention reads the cache's slots up to it.

        Why: compiled by inductor, the step's small kernels between the GEMV and FF ops, and their dispatch, cost
        about 4 ms of SmolLM2's 25 ms per token on 2 cores (kernels/CPU.md), the same for every FF variant.
        """
        if self._blocks is None:
            self._blocks = [self._block_args(layer) for layer in self.layers]
        ops = torch.ops.caprese_cpu
        attention, feed_forward, head = ops.attention_block.default, ops.ff_block.default, ops.norm_linear.default
        if not torch.compiler.is_compiling():
            # eagerly, the operators' C++ entry points: an OpOverload's __call__ is one more Python frame per call (on
            # CPython 3.11 such frames can cost a frame-stack chunk each: FastDecoder's _padded_call)
            attention, feed_forward, head = (getattr(op, "_op", op) for op in (attention, feed_forward, head))
        h = F.embedding(tokens, self.embed)  # (B, D)
        for attention_args, ff_args in self._blocks:
            h = attention(h, positions, slot, *attention_args)
            h = feed_forward(h, *ff_args)
        return head(h, self.norm, self.eps, self.lm_head)

    def _block_args(self, layer: DecoderLayer) -> tuple[tuple, tuple]:
        attn = layer.attn
        attention = (
            (layer.attn_norm, layer.eps, *attn.block_args(), self.cos, self.sin, attn.k_cache, attn.v_cache)
            + (self.prompt_visible, self.prompt_length, attn.o, attn.o_bias, attn.heads, float(attn.scaling))
        )  # fmt: skip
        return attention, (layer.ff_norm, layer.eps, *layer.ff.op_args())

    def forward(
        self, tokens: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, V)`` in fp32 of one token per sequence: ``tokens (B,)`` written at cache ``slot (1,)``.

        ``positions (B,)`` are the rotary positions (the number of real tokens before this one in each row).
        ``keys``: ``key_slots[:n]`` for an ``n > slot``: attention reads only the first ``n`` slots of the cache, so a
        step costs what the tokens so far cost rather than what the buffers hold (``n`` marked dynamic, one compiled
        step serves every length); None reads them all (static shapes, as CUDA graphs need).
        """
        keys = self.key_slots if keys is None else keys
        n = keys.shape[0]
        h = F.embedding(tokens, self.embed)[:, None]  # (B, 1, D)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (B, 1, 1, hd)
        # a key is visible if it is a real prompt token or a generated token up to this one
        generated = (keys >= self.prompt_width) & (keys <= slot)  # (n,)
        visible = (self.prompt_visible[:, :n] | generated)[:, None, None]  # (B, 1, 1, n)
        run = self._layer_once if self.compile_layers_once else _layer
        for layer in self.layers:
            h = run(layer, h, cos, sin, slot, visible)
        return gemv(rms_norm(h[:, 0], self.norm, self.eps), self.lm_head, None, self.cpu_gemv).float()

    def weight_bytes(self) -> int:
        """Bytes of weights one step reads (the embedding table only one row per sequence)."""
        total = self.lm_head.nbytes + self.norm.nbytes
        for layer in self.layers:
            total += layer.attn.weight_bytes() + layer.ff.weight_bytes(self.batch_size)
            total += layer.attn_norm.nbytes + layer.ff_norm.nbytes
        return total

    def cache_bytes(self) -> int:
        """Bytes of KV cache a step given no ``keys`` reads: the whole static cache (unused slots masked, not skipped),
        as on CUDA; a CPU step reads its slots up to the current token only (``forward``'s ``keys``)."""
        return sum(layer.attn.cache_bytes() for layer in self.layers)

    def extra_bytes(self, model: nn.Module) -> int:
        """Bytes this step holds beyond ``model``'s own weights and the KV cache (``cache_bytes``): its fused copies
        (q/k/v, gate/up), GRIFFIN's per-sequence pruned weights, CATS's transposed down weights, rotary tables."""
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        skip |= {t.untyped_storage().data_ptr() for layer in self.layers for t in layer.attn.cache_tensors()}
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.buffers()}
        return sum(size for pointer, size in held.items() if pointer not in skip)


def _layer(layer: DecoderLayer, h, cos, sin, slot, visible) -> torch.Tensor:
    return layer(h, cos, sin, slot, visible)


def _compiled_once() -> Any:
    """``_layer`` marked as a region torch.compile compiles once and stamps out for every layer alike (a third of the
    compile time of the unrolled step on SmolLM2's 30 layers, the same code and speed); eagerly the plain call. A
    copy with its own code object per step, so that no cache of the region outlives its decoder. Without the API
    (torch releases before it) the step is compiled unrolled."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    own = types.FunctionType(_layer.__code__.replace(), _layer.__globals__, _layer.__name__)
    return own if region is None else region(own)


def cache_layer(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` of layer ``index`` of a transformers KV cache, across the cache layouts of 4.x and 5.x."""
    if hasattr(cache, "layers"):
        layer = cache.layers[index]
        return layer.keys, layer.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[index], cache.value_cache[index]
    if isinstance(cache, (tuple, list)):
        return cache[index][0], cache[index][1]
    raise TypeError(f"Cannot read keys and values from a KV cache of type {type(cache).__name__}.")
