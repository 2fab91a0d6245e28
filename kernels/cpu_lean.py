"""Prototype: the lean decode step of ``caprese_peft.fast_decode`` with the CPU ops, for the lead to integrate.

Every GEMV of a step goes through ``caprese_cpu::linear`` (q/k/v, o, lm_head) and every FF block through
``caprese_cpu::gated_ff`` (dense, CATS with its threshold, GRIFFIN on the union of the batch's kept neurons).
Built from a ``FastDecoder`` (``cpu_lean_decoder(fast)``) and set as its ``lean`` before the first prefill, so
FastDecoder's prefill, cache loading and decode loop run unchanged around it. What stays torch: embeddings,
norms, rotary, the attention over the KV cache (small at decode), the argmax.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caprese_peft.fast_decode.lean import Attention, LeanDecoder, apply_rope, rms_norm

from .cpu_ff import (
    GriffinUnionWeights,
    cats_ff_cpu,
    dense_ff,
    griffin_union_ff,
    griffin_union_weights,
    linear,
    load_extension,
    prepare_dense_weights,
)


def _activation(mlp: nn.Module) -> str:
    from caprese_peft.sparse_ff import activation_name

    name = activation_name(mlp.act_fn)
    if name is None:
        raise ValueError(f"The CPU ops compute silu and gelu_tanh, not {mlp.act_fn!r}.")
    return name


class CpuDenseFF(nn.Module):
    """The unmodified gated MLP through ``caprese_cpu::gated_ff``: one pass over gate, up and ``W2^T`` rows."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.activation = _activation(mlp)
        self.weights = prepare_dense_weights(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_ff(x[:, 0], self.weights, self.activation)[:, None]  # (B, 1, D)

    def weight_bytes(self, batch: int) -> int:
        w = self.weights
        return w.gate.nbytes + w.up.nbytes + w.down_t.nbytes


class CpuCatsFF(nn.Module):
    """Caprese(CATS) through the op, from the lean step's ``CatsFF``: every gate row, then the rows kept."""

    def __init__(self, lean_ff: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "decoder", lean_ff.decoder)  # a CatsDecoder
        self.activation = lean_ff.activation
        self.density = lean_ff.decoder.backbone.density
        self.weights = lean_ff.weights
        self.threshold: torch.Tensor | None = None

    def load(self) -> None:
        self.threshold = self.decoder.layer._stats.threshold.reshape(-1).float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cats_ff_cpu(x[:, 0], self.weights, self.threshold, self.activation)[:, None]

    def weight_bytes(self, batch: int) -> int:
        """Nominal: every gate row, up and down rows of ``density`` of the neurons and the ``r`` (batch 1)."""
        w = self.weights
        rows = self.density * w.intermediate_size + w.rank
        return w.gate.nbytes + round(rows * (w.up.nbytes + w.down_t.nbytes) / w.up.shape[0])


class CpuGriffinFF(nn.Module):
    """Caprese(GRIFFIN) on the rows of the union of the batch's kept neurons, gathered once per prompt batch."""

    def __init__(self, lean_ff: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "decoder", lean_ff.decoder)  # a GriffinDecoder
        self.low_rank = lean_ff.low_rank
        self.activation = _activation(lean_ff.decoder.layer.base_layer)
        self.weights: GriffinUnionWeights | None = None

    def load(self) -> None:
        layer = self.decoder.layer
        gate_w, up_w, down_w, left, right = layer.decode_tensors(self.decoder.adapter)
        if not self.low_rank:
            left, right = left[:, :0], right[:0]
        self.weights = None  # free the previous batch's copy first
        self.weights = griffin_union_weights(gate_w, up_w, down_w, left, right, layer._stats.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return griffin_union_ff(x[:, 0], self.weights, self.activation)[:, None]

    def weight_bytes(self, batch: int) -> int:
        w = self.weights
        return 0 if w is None else w.gate.nbytes + w.up.nbytes + w.down_t.nbytes


class CpuAttention(Attention):
    """``lean.Attention`` with its two projections through ``caprese_cpu::linear``."""

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        batch = x.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = linear(x, self.qkv)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, 1, self.heads, self.head_dim)
        k = k.view(batch, 1, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.qk_eps), rms_norm(k, self.k_norm, self.qk_eps)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache.index_copy_(2, slot, k)
        self.v_cache.index_copy_(2, slot, v)
        q = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        scores = torch.matmul(q, self.k_cache.transpose(2, 3)) * self.scaling
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, self.v_cache).reshape(batch, 1, self.heads * self.head_dim)
        out = linear(out, self.o)
        return out if self.o_bias is None else out + self.o_bias


class CpuLeanDecoder(LeanDecoder):
    """``LeanDecoder`` with the CPU FF blocks, and ``CpuAttention`` and the lm_head through ``caprese_cpu::linear``."""

    def __init__(self, model: nn.Module, ffs: list[nn.Module], linear_op: bool = True) -> None:
        super().__init__(model, ffs)
        self.linear_op = linear_op
        if linear_op:
            config = model.config
            for lean_layer, hf_layer in zip(self.layers, model.model.layers):
                lean_layer.attn = CpuAttention(hf_layer.self_attn, config)

    def forward(self, tokens: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens, self.embed)[:, None]
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]
        generated = (self.key_slots >= self.prompt_width) & (self.key_slots <= slot)
        visible = (self.prompt_visible | generated)[:, None, None]
        for layer in self.layers:
            h = layer(h, cos, sin, slot, visible)
        h = rms_norm(h[:, 0], self.norm, self.eps)
        return (linear(h, self.lm_head) if self.linear_op else F.linear(h, self.lm_head)).float()


def cpu_lean_decoder(fast: Any, linear_op: bool = True) -> CpuLeanDecoder:
    """A ``CpuLeanDecoder`` for ``FastDecoder`` ``fast`` (its model and mode); set ``fast.lean`` to it before prefill.

    Each FF block is the CPU counterpart of the one FastDecoder builds (``fast._feed_forward``); a CATS block
    whose activation the ops do not know stays as it is. ``linear_op=False`` keeps torch's GEMV (MKL) for the
    attention projections and the lm_head: the ops then run the FF blocks only.
    """
    from caprese_peft.fast_decode.lean import CatsFF, DenseFF, GriffinFF

    load_extension()  # before torch.compile traces the step
    ffs = []
    for index in range(len(fast.layers)):
        lean_ff = fast._feed_forward(index)
        if isinstance(lean_ff, DenseFF):
            mlp = fast.hf_model.model.layers[index].mlp
            ffs.append(CpuDenseFF(getattr(mlp, "base_layer", mlp)))
        elif isinstance(lean_ff, GriffinFF):
            ffs.append(CpuGriffinFF(lean_ff))
        elif isinstance(lean_ff, CatsFF) and lean_ff.activation is not None:
            ffs.append(CpuCatsFF(lean_ff))
        else:
            ffs.append(lean_ff)
    return CpuLeanDecoder(fast.hf_model, ffs, linear_op).eval()
