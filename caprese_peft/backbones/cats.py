"""CATS: zero gate activations whose magnitude falls under a threshold calibrated on the prompt."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..sparse_ff import ACTIVATIONS, cats_merged_ff
from .base import Backbone, SparseDecoder, check_token_mask, register_backbone, statistics_op


@dataclass
class CatsStats:
    threshold: torch.Tensor  # (batch, 1, 1) fp32: |act(x Wg)| must exceed it to be kept


# |gate| values a prompt's threshold is estimated from: calibration costs the same for any prompt length
THRESHOLD_SAMPLE = 8192
_UNIFORM: dict[torch.device, torch.Tensor] = {}


def _uniform(device: torch.device, size: int = THRESHOLD_SAMPLE) -> torch.Tensor:
    """At least ``size`` fixed draws in [0, 1), fp64, on ``device`` (samples take a prefix, the same for any
    ``size``): every prompt is sampled the same way."""
    if device not in _UNIFORM or _UNIFORM[device].numel() < size:
        generator = torch.Generator().manual_seed(0)
        _UNIFORM[device] = torch.rand(max(size, 1 << 16), generator=generator, dtype=torch.float64).to(device)
    return _UNIFORM[device]


def cats_thresholds(
    gate: torch.Tensor, token_mask: torch.Tensor, density: float, sample: int | None = THRESHOLD_SAMPLE
) -> torch.Tensor:
    """Per sequence, the value a ``density`` fraction of the prompt's ``|gate|`` lies above; ``(batch, 1, 1)``.

    A prompt with at most ``THRESHOLD_SAMPLE`` gate values gets the exact order statistic: the ``n_drop``-th
    smallest magnitude: on CUDA the smallest of the ``n - n_drop + 1`` largest (``topk`` spreads one slice over
    many CUDA blocks; ``kthvalue`` gives it to one, pytorch/pytorch#75599), on a CPU numpy's ``partition`` (a
    selection: a twelfth of ``topk``'s time, a quarter of ``kthvalue``'s), elsewhere ``kthvalue``. A longer prompt gets the same order
    statistic of a fixed sample of ``THRESHOLD_SAMPLE`` of its values, as the CATS paper calibrates on samples:
    an exact selection over every value of a 2048-token prompt costs more than the dense prefill's own work (a
    top-k with k near 15 million, per layer, for Llama-3.1-8B), a sample costs the same at any length. The sample
    is drawn among the row's real tokens only, from fixed draws, so a prompt gets the same threshold alone or in a
    left-padded batch; its rank error is about ``0.5 / sqrt(THRESHOLD_SAMPLE)`` (0.6% of the neurons). ``sample``:
    another sample size, or None for the exact selection at any length (``benchmarks/calibration.py`` compares them).
    Sampled rows are gathered and selected together: one ``take`` and one selection for the batch.
    """
    width = gate.shape[-1]
    lengths = token_mask.sum(-1).tolist()  # real tokens per row
    thresholds: list[torch.Tensor | None] = [None] * gate.shape[0]
    sampled = [i for i, t in enumerate(lengths) if sample is not None and t * width > sample]
    for i in (i for i in range(gate.shape[0]) if i not in sampled):  # short prompts: every real value
        values = gate[i][token_mask[i]].abs().float().flatten()
        thresholds[i] = _order_statistic(values[None], density)[0]
    if sampled:
        index = []
        for i in sampled:
            token, column = _sample_positions(gate.device, lengths[i], width, sample)
            if lengths[i] < gate.shape[1]:  # padding: the t-th real token's position
                token = token_mask[i].nonzero().squeeze(-1)[token]
            index.append((token + i * gate.shape[1]) * width + column)
        index = index[0][None] if len(index) == 1 else torch.stack(index)
        values = gate.reshape(-1).take(index).abs().float()  # (rows, sample): nothing else copied
        for i, threshold in zip(sampled, _order_statistic(values, density)):
            thresholds[i] = threshold
    return torch.stack(thresholds).view(-1, 1, 1)


@functools.lru_cache(maxsize=64)
def _sample_positions(device: torch.device, length: int, width: int, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``sample`` (token, column) pairs a prompt of ``length`` real tokens is sampled at, ``(sample,)`` each:
    fixed draw ``u`` picks token ``floor(u T)`` and, from the rest of ``u T``, column ``floor(frac F)``. Cached: a
    prompt length's positions are computed once."""
    scaled = _uniform(device, sample)[:sample] * length
    token = scaled.long()
    return token, ((scaled - token) * width).long().clamp_max(width - 1)


def _order_statistic(values: torch.Tensor, density: float) -> torch.Tensor:
    """Per row of ``values (rows, n)``: the largest value a ``density`` fraction lies above; ``(rows,)``."""
    n = values.shape[-1]
    n_drop = n - round(density * n)
    if n_drop <= 0:  # density 1: keep everything, even exact zeros
        return values.new_full((values.shape[0],), -1.0)
    if values.is_cuda:
        return values.topk(n - n_drop + 1, dim=-1, sorted=False).values.amin(dim=-1)
    if values.device.type == "cpu" and not values.requires_grad:  # numpy's introselect: a quarter of kthvalue's time
        import numpy as np

        selected = np.partition(values.numpy(), n_drop - 1, axis=-1)[:, n_drop - 1]
        return torch.from_numpy(np.ascontiguousarray(selected)).to(values.dtype)
    return values.kthvalue(n_drop, dim=-1).values


class CatsDecoder(SparseDecoder):
    """CATS decodes through ``caprese_peft.kernels.cats_ff``: the FF weights with ``L``, ``R`` as ``r`` always-active
    neurons, read only for the neurons the threshold keeps (the Triton kernel on CUDA, the C++ op on a CPU), or its
    torch reference.

    ``decode_impl="auto"`` takes it where a kernel runs (CUDA: at most ``kernels.MAX_BATCH`` sequences, fp32, fp16
    or bf16; a CPU: where the C++ ops build): without one, merged CATS computes every neuron as the reference does.
    """

    has_fast_path = True
    _cache: dict | None = None  # low_rank -> (weights key, CatsFFWeights)
    has_cpu_stand_in = True

    def pays_off(self, x: torch.Tensor) -> bool:
        use_kernels = self.layer.decode_use_kernels
        if use_kernels is not None:
            return use_kernels
        if not x.is_cuda:
            return self.cpu_kernel_applies(x)
        if self.activation() is None:
            return False
        try:
            from ..kernels import MAX_BATCH, SUPPORTED_DTYPES
        except ImportError:  # no triton on this platform
            return False
        return x.shape[0] <= MAX_BATCH and x.shape[1] == 1 and x.dtype in SUPPORTED_DTYPES

    def weights(self, low_rank: bool = True):
        """``kernels.CatsFFWeights``: ``Wg``, ``[W1; L^T]``, ``[W2^T; R]``, built once and cached.

        The up and down weights are copied (the kernel reads them neuron-major), which costs their memory once
        more until ``release``. ``low_rank=False`` leaves ``L``, ``R`` out: the backbone alone. Rebuilt when a
        weight changes storage or is updated in place.
        """
        from ..kernels import prepare_cats_weights

        key = self.layer.weights_key(self.adapter)
        cache = self._cache if self._cache is not None else {}
        entry = cache.pop(low_rank, None)  # popped: a stale entry is freed before the rebuild
        if entry is None or entry[0] != key:
            gate, up, down, left, right = self.layer.decode_tensors(self.adapter)
            if not low_rank:
                left, right = left[:, :0], right[:0]
            entry = (key, prepare_cats_weights(gate, up, down, left, right))
        cache[low_rank] = entry
        self._cache = cache
        return entry[1]

    def fast(self, x: torch.Tensor, stats: CatsStats) -> torch.Tensor:
        if self.layer.caprese_stand_in.get(self.adapter):  # stand_in_problem: the C++ op runs
            from ..kernels.cpu_ff import cats_ff_cpu

            batch, tokens, hidden = x.shape
            out = cats_ff_cpu(
                x.reshape(batch * tokens, hidden), self.weights(), stats.threshold, self.activation(),
                self.stand_in(), use_kernels=self.layer.decode_use_kernels,
            )  # fmt: skip
            return out.view(x.shape)
        activation = self.activation()
        if activation is None:
            if self.layer.decode_use_kernels:
                raise ValueError(
                    f"decode_use_kernels=True, but the CATS kernel computes {sorted(ACTIVATIONS)} and this block's "
                    f"activation {self.layer.base_layer.act_fn!r} is none of them."
                )
            # the torch form of merged CATS takes any activation
            tensors = self.layer.decode_tensors(self.adapter)
            return cats_merged_ff(x, *tensors, stats.threshold, self.layer.base_layer.act_fn)
        from ..kernels import cats_ff

        return cats_ff(x, self.weights(), stats.threshold, activation, use_kernels=self.layer.decode_use_kernels)

    def release(self) -> None:
        super().release()
        self._cache = None

    def lean_ff(self, low_rank: bool, use_kernels: bool | None, cpu_ops: bool = False) -> nn.Module:
        from ..fast_decode.lean import CatsFF

        return CatsFF(self, low_rank, use_kernels, stand_in=self.lean_stand_in(low_rank))


@register_backbone
class Cats(Backbone):
    """CATS (Lee et al., 2024): contextual activation thresholding of the gate output."""

    name = "cats"
    decoder = CatsDecoder
    statistics_from_gate = True  # the threshold is a quantile of |gate|
    threshold_sample: int | None = THRESHOLD_SAMPLE  # gate values a long prompt's threshold comes from; None: all

    def calibrate(self, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> CatsStats:
        ops = statistics_op(gate)
        if ops is not None:  # the same thresholds in one C++ call (a prefill pays per op, every layer)
            sample = self.threshold_sample
            draws = _uniform(gate.device, sample or 0)
            return CatsStats(threshold=ops.cats_threshold(gate, token_mask, self.density, sample, draws))
        check_token_mask(token_mask)
        return CatsStats(threshold=cats_thresholds(gate, token_mask, self.density, self.threshold_sample))

    def keep_mask(self, gate: torch.Tensor, stats: CatsStats) -> torch.Tensor:
        return gate.abs() > stats.threshold

    def active_ff_weights(self, hidden_size: int, intermediate_size: int) -> float:
        # the gate projection always runs in full; up and down only over the kept neurons
        return hidden_size * intermediate_size * (1.0 + 2.0 * self.density)
