"""Fused CATS + low-rank feed-forward for decode tokens, as a thresholded GEMV that skips inactive neurons.

Torch reference: ``caprese_peft.sparse_ff.cats_merged_ff``. The low-rank factors act as ``r`` always-active
neurons after the ``F`` FF neurons: their up rows are ``L^T`` and their down rows ``R``, so one kernel pair serves
the sparse block and the correction. Every weight is read neuron-major, one row per neuron: ``Wg`` and ``W1`` as
``nn.Linear`` stores them (read in place, no copy), ``W2^T`` (the one copy: ``nn.Linear`` stores ``W2`` with a
neuron per column, and skipping single neurons of a row-major ``W2`` would save no memory traffic), and ``L^T``
and ``R`` apart from them. Three steps per call:

1. ``gate = x @ Wg^T`` in torch: every neuron needs it, so it is a dense GEMV cuBLAS already does well;
2. ``_cats_up_kernel``: activation, threshold and the up GEMV, reading only the up rows of neurons active for
   at least one sequence of the batch; writes ``z (B, F + r)`` in fp32, zero where inactive;
3. ``_cats_down_kernel``: a split-K GEMV over neurons that reads only the down rows where ``z`` is nonzero,
   accumulating ``(B, D)`` in fp32 with atomic adds.

Layers, as in Liger-Kernel: the jit kernels, the host wrapper ``cats_ff_triton``, the ``torch.library``
custom op ``caprese::cats_ff`` (traceable by ``torch.compile``), and the dispatcher ``cats_ff``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..sparse_ff import ACTIVATIONS, cats_merged_ff, check_ff_weights
from .cpu_ff import rows_contiguous

MAX_BATCH = 8  # one token per sequence; the (batch, neurons, hidden) register tile grows with the batch
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# read once, as triton.jit does when it decorates the kernels below
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# a GPU thread holds the fp32 product tile (BLOCK_B, BLOCK_N, BLOCK_D); more than this per thread spills
_TILE_ELEMENTS_PER_THREAD = 64


# the interpreter runs a config's blocks as Python loops: small blocks on small problems (several blocks and loop
# iterations even there), large ones past this many weights (a Llama-8B layer would take minutes in small blocks)
_INTERPRET_LARGE = 1 << 22


def _configs(gpu: list[triton.Config], interpret: list[triton.Config]) -> list[triton.Config]:
    return interpret if INTERPRET else gpu


def gpu_up_configs() -> list[triton.Config]:
    """Autotune candidates of ``_cats_up_kernel`` on a GPU."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=nw)
        for bn in (16, 32, 64)
        for bd in (64, 128, 256)
        for nw in (4, 8)
    ]


def gpu_down_configs() -> list[triton.Config]:
    """Autotune candidates of ``_cats_down_kernel`` on a GPU."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, "SPLIT_N": split}, num_warps=nw)
        for bn in (16, 32, 64)
        for bd in (64, 128, 256)
        for split in (4, 8, 16)
        for nw in (4,)  # the tile per program is small: more warps only cut registers per thread
    ]


def prune_by_registers(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose fp32 product tile would spill registers at this batch; never returns an empty list."""
    block_b = kwargs.get("BLOCK_B", named_args.get("BLOCK_B", MAX_BATCH))

    def elements_per_thread(config: triton.Config) -> float:
        return block_b * config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_D"] / (32 * config.num_warps)

    fitting = [c for c in configs if elements_per_thread(c) <= _TILE_ELEMENTS_PER_THREAD]
    return fitting or [min(configs, key=elements_per_thread)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``prune_by_registers`` on a GPU; under the interpreter the one config, small or large blocks, that suits the
    problem's size, so that nothing is benchmarked."""
    if not INTERPRET:
        return prune_by_registers(configs, named_args, **kwargs)
    large = named_args["hidden"] * named_args["n_neurons"] > _INTERPRET_LARGE
    return [max(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"]) if large else configs[0]]


@triton.autotune(
    configs=_configs(
        gpu_up_configs(),
        [triton.Config({"BLOCK_N": 32, "BLOCK_D": 32}, num_warps=4), triton.Config({"BLOCK_N": 128, "BLOCK_D": 512})],
    ),
    key=["hidden", "n_neurons", "BLOCK_B"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _cats_up_kernel(
    GATE,  # (B, F) gate pre-activation x @ Wg^T, input dtype
    X,  # (B, D) input dtype
    UP,  # (F, D) W1, rows stride_up apart
    LOW_UP,  # (r, D) L^T, contiguous
    THRESHOLD,  # (B,) fp32
    Z,  # (B, F + r) fp32 output
    n_rows,
    hidden,
    ff_size,
    n_neurons,
    stride_gate,
    stride_x,
    stride_z,
    stride_up,
    ACTIVATION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``z = act(gate) * (|act(gate)| > threshold) * (x @ UP^T)`` for BLOCK_N neurons; gate 1 for the last r.

    Part of the fused op whose torch reference is ``caprese_peft.sparse_ff.cats_merged_ff``.
    """
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    neurons = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    is_ff = neurons < ff_size
    is_low_rank = (neurons >= ff_size) & (neurons < n_neurons)

    pre = tl.load(
        GATE + rows[:, None] * stride_gate + neurons[None, :], mask=row_ok[:, None] & is_ff[None, :], other=0.0
    ).to(tl.float32)  # (BLOCK_B, BLOCK_N)
    if ACTIVATION == "silu":
        gate = pre / (1.0 + tl.exp(-pre))
    else:  # gelu_tanh: 0.5 g (1 + tanh(u)) == g * sigmoid(2u); tanh is only in backend libdevice
        gate = pre / (1.0 + tl.exp(-1.5957691216057308 * (pre + 0.044715 * pre * pre * pre)))
    threshold = tl.load(THRESHOLD + rows, mask=row_ok, other=0.0)  # (BLOCK_B,)
    keep = (tl.abs(gate) > threshold[:, None]) & is_ff[None, :]
    coef = tl.where(keep, gate, 0.0)
    coef = tl.where(is_low_rank[None, :], 1.0, coef)
    coef = tl.where(row_ok[:, None], coef, 0.0)  # (BLOCK_B, BLOCK_N)
    # a neuron's up row is read once for the whole batch, so it is skipped only if no sequence keeps it
    active = tl.sum((coef != 0.0).to(tl.int32), axis=0) > 0  # (BLOCK_N,)

    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)
    for start in range(0, hidden, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < hidden
        x = tl.load(
            X + rows[:, None] * stride_x + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
            eviction_policy="evict_last",  # every program reads x: keep it in cache
        ).to(tl.float32)  # (BLOCK_B, BLOCK_D)
        # masked-off rows cost no memory traffic; each neuron's row comes from W1 or from L^T
        w = tl.load(
            UP + neurons[:, None] * stride_up + cols[None, :],
            mask=(active & is_ff)[:, None] & col_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",  # each weight is read once
        ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        w += tl.load(
            LOW_UP + (neurons - ff_size)[:, None] * hidden + cols[None, :],
            mask=(active & is_low_rank)[:, None] & col_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(
        Z + rows[:, None] * stride_z + neurons[None, :],
        acc * coef,
        mask=row_ok[:, None] & (neurons < n_neurons)[None, :],
    )


@triton.autotune(
    configs=_configs(
        gpu_down_configs(),
        [
            triton.Config({"BLOCK_N": 32, "BLOCK_D": 32, "SPLIT_N": 3}, num_warps=4),
            triton.Config({"BLOCK_N": 128, "BLOCK_D": 512, "SPLIT_N": 4}),
        ],
    ),
    key=["hidden", "n_neurons", "BLOCK_B"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["OUT"],  # accumulated with atomics: autotuning runs must each start from zero
)
@triton.jit
def _cats_down_kernel(
    Z,  # (B, F + r) fp32, zero for inactive neurons
    DOWN_T,  # (F, D) W2^T, rows stride_down apart
    LOW_DOWN,  # (r, D) R, contiguous
    OUT,  # (B, D) fp32, zero-initialised
    n_rows,
    hidden,
    ff_size,
    n_neurons,
    stride_z,
    stride_out,
    stride_down,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_N: tl.constexpr,
):
    """``OUT += z[:, chunk] @ DOWN_T[chunk, cols]`` for one block of outputs and one chunk of neurons.

    Part of the fused op whose torch reference is ``caprese_peft.sparse_ff.cats_merged_ff``.
    """
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < hidden
    n_blocks = (n_neurons + BLOCK_N - 1) // BLOCK_N
    per_split = (n_blocks + SPLIT_N - 1) // SPLIT_N
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, n_blocks)

    acc = tl.full((BLOCK_B, BLOCK_D), 0.0, tl.float32)
    for block in range(first, last):
        neurons = block * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tl.load(
            Z + rows[:, None] * stride_z + neurons[None, :],
            mask=row_ok[:, None] & (neurons < n_neurons)[None, :],
            other=0.0,
        )  # (BLOCK_B, BLOCK_N)
        active = tl.sum((z != 0.0).to(tl.int32), axis=0) > 0  # a zero z contributes nothing: skip its row
        is_ff = neurons < ff_size
        w = tl.load(
            DOWN_T + neurons[:, None] * stride_down + cols[None, :],
            mask=(active & is_ff)[:, None] & col_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        w += tl.load(
            LOW_DOWN + (neurons - ff_size)[:, None] * hidden + cols[None, :],
            mask=(active & ~is_ff & (neurons < n_neurons))[:, None] & col_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        acc += tl.sum(z[:, :, None] * w[None, :, :], axis=1)
    tl.atomic_add(OUT + rows[:, None] * stride_out + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class CatsFFWeights:
    """FF weights laid out for the kernel, one row per neuron; the ``r`` low-rank neurons follow the ``F``.

    ``gate`` is the model's own ``Wg`` (no copy). On a GPU ``up`` is the model's ``W1`` too and ``down_t`` the one
    copy, ``W2^T``. On a CPU ``up`` and ``down_t`` are the two halves of one copy, ``pair`` ``(F, 2, D)``: a
    neuron's up and down rows side by side, so a kept neuron is one contiguous read (see ``prepare_cats_weights``).
    """

    gate: torch.Tensor  # (F, D): Wg as nn.Linear stores it
    up: torch.Tensor  # (F, D): W1 as nn.Linear stores it
    low_up: torch.Tensor  # (r, D): L^T
    down_t: torch.Tensor  # (F, D): W2^T
    low_down: torch.Tensor  # (r, D): R

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]

    @property
    def rank(self) -> int:
        return self.low_up.shape[0]

    @property
    def pair(self) -> torch.Tensor | None:
        """``(F, 2, D)``: row ``i`` holds neuron ``i``'s up and down rows, of which ``up`` and ``down_t`` are views;
        None where they are separate tensors (on a GPU)."""
        return interleaved_pair(self.up, self.down_t)

    def copied_bytes(self) -> int:
        """Bytes held beyond the model's own weights: ``W2^T`` (with ``W1`` on a CPU) and ``L^T`` (``R`` is the
        parameter itself)."""
        copied = self.up.nbytes if self.pair is not None else 0
        return copied + self.down_t.nbytes + self.low_up.nbytes

    def op_args(self) -> tuple[torch.Tensor, ...]:
        """``(gate, up, low_up, down_t, low_down)``, as ``torch.ops.caprese.cats_ff`` takes them after ``x``."""
        return self.gate, self.up, self.low_up, self.down_t, self.low_down

    def reference_args(self) -> tuple[torch.Tensor, ...]:
        """``(Wg, W1, W2, L, R)`` as views of these weights, for ``cats_merged_ff``."""
        return self.gate, self.up, self.down_t.t(), self.low_up.t(), self.low_down  # .t(): see cats_merged_ff


def interleaved_pair(up: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor | None:
    """The ``(F, 2, D)`` tensor of which ``up`` and ``down_t`` are the ``[:, 0]`` and ``[:, 1]`` views, or None."""
    if (
        up.dim() != 2
        or up.shape != down_t.shape
        or up.untyped_storage().data_ptr() != down_t.untyped_storage().data_ptr()
    ):
        return None
    rows, hidden = up.shape
    if up.stride() != (2 * hidden, 1) or down_t.stride() != up.stride():
        return None
    if down_t.storage_offset() != up.storage_offset() + hidden:
        return None
    return up.as_strided((rows, 2, hidden), (2 * hidden, hidden, 1))


def prepare_cats_weights(
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    low_rank_left: torch.Tensor,
    low_rank_right: torch.Tensor,
    *,
    interleave: bool | None = None,
) -> CatsFFWeights:
    """Lay out ``Wg (F, D)``, ``W1 (F, D)``, ``W2 (D, F)``, ``L (D, r)``, ``R (r, D)`` for ``cats_ff``.

    Copies ``W2`` once, transposed (do it after training, not per step), and ``L`` (``r`` rows); ``Wg`` and ``R``
    are used in place, so an in-place update of them shows through.

    ``interleave`` (default: on a CPU) copies ``W1`` too, into one ``(F, 2, D)`` tensor with ``W2^T``: neuron
    ``i``'s up and down rows side by side (``CatsFFWeights.pair``). The CPU op then reads a kept neuron as one
    stream of ``2 D`` weights instead of two of ``D``; on the neurons CATS keeps, scattered over the block, that
    is about a tenth faster per block, and a dense block gains a few percent (benchmarks/bench_cpu.py,
    kernels/CPU.md). It costs ``W1``'s memory once more. Without it, ``W1`` is used in place.
    """
    check_ff_weights(gate_weight, up_weight, down_weight, low_rank_left, low_rank_right)
    tensors = (gate_weight, up_weight, down_weight, low_rank_left, low_rank_right)
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        found = [(str(t.dtype), str(t.device)) for t in tensors]
        raise ValueError(f"FF weights and low-rank factors need one dtype and device, got {found}.")
    if interleave is None:
        interleave = gate_weight.device.type == "cpu"
    with torch.no_grad():
        if interleave:
            pair = torch.stack([up_weight.detach(), down_weight.detach().T], dim=1)  # (F, 2, D)
            up, down_t = pair[:, 0], pair[:, 1]
        else:
            up, down_t = up_weight.detach().contiguous(), down_weight.detach().T.contiguous()
        return CatsFFWeights(
            gate=gate_weight.detach().contiguous(),
            up=up,
            low_up=low_rank_left.detach().T.contiguous(),
            down_t=down_t,
            low_down=low_rank_right.detach().contiguous(),
        )


def _check_op_inputs(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    low_up: torch.Tensor,
    down_weight_t: torch.Tensor,
    low_down: torch.Tensor,
    threshold: torch.Tensor,
    activation: str,
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(
            f"x must be (B, D) with one decode token per sequence and 1 <= B <= {MAX_BATCH}, got {tuple(x.shape)}; "
            "use caprese_peft.sparse_ff.cats_merged_ff for longer inputs."
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be one of {SUPPORTED_DTYPES}, got {x.dtype}.")
    n_rows, hidden = x.shape
    ff_size, rank = gate_weight.shape[0], low_up.shape[0]
    weights = {
        "gate_weight": (gate_weight, (ff_size, hidden)),
        "up_weight": (up_weight, (ff_size, hidden)),
        "low_up": (low_up, (rank, hidden)),
        "down_weight_t": (down_weight_t, (ff_size, hidden)),
        "low_down": (low_down, (rank, hidden)),
    }
    for name, (tensor, shape) in {**weights, "threshold": (threshold, (n_rows,))}.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {shape} for x {tuple(x.shape)}, got {tuple(tensor.shape)}.")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}.")
    for name, (tensor, _) in weights.items():
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} is {tensor.dtype} but x is {x.dtype}; the kernel takes one dtype.")
        rows_only = name in ("up_weight", "down_weight_t")  # on a CPU, interleaved: see prepare_cats_weights
        if not (rows_contiguous(tensor) if rows_only else tensor.is_contiguous()):
            raise ValueError(
                f"{name} must be {'row-major' if rows_only else 'contiguous'}; build the weights with "
                "prepare_cats_weights."
            )
    if threshold.dtype != torch.float32:
        raise ValueError(f"threshold must be float32 (as CatsStats stores it), got {threshold.dtype}.")


def cats_ff_triton(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    low_up: torch.Tensor,
    down_weight_t: torch.Tensor,
    low_down: torch.Tensor,
    threshold: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Host wrapper of the fused kernels: ``x (B, D) -> (B, D)``, accumulating in fp32.

    Weights as in ``CatsFFWeights.op_args``; ``threshold`` is ``(B,)`` fp32. Reference: ``cats_merged_ff``.
    """
    _check_op_inputs(x, gate_weight, up_weight, low_up, down_weight_t, low_down, threshold, activation)
    x = x.contiguous()  # (B, D): tiny, unlike the weights
    threshold = threshold.contiguous()
    n_rows, hidden = x.shape
    ff_size = up_weight.shape[0]
    n_neurons = ff_size + low_up.shape[0]
    block_b = triton.next_power_of_2(n_rows)

    gate = x @ gate_weight.T  # (B, F)
    z = torch.empty(n_rows, n_neurons, device=x.device, dtype=torch.float32)
    _cats_up_kernel[lambda meta: (triton.cdiv(n_neurons, meta["BLOCK_N"]),)](
        gate,
        x,
        up_weight,
        low_up,
        threshold,
        z,
        n_rows,
        hidden,
        ff_size,
        n_neurons,
        gate.stride(0),
        x.stride(0),
        z.stride(0),
        up_weight.stride(0),
        ACTIVATION=activation,
        BLOCK_B=block_b,
    )
    out = torch.zeros(n_rows, hidden, device=x.device, dtype=torch.float32)
    _cats_down_kernel[lambda meta: (triton.cdiv(hidden, meta["BLOCK_D"]), meta["SPLIT_N"])](
        z,
        down_weight_t,
        low_down,
        out,
        n_rows,
        hidden,
        ff_size,
        n_neurons,
        z.stride(0),
        out.stride(0),
        down_weight_t.stride(0),
        BLOCK_B=block_b,
    )
    # rounded here, by torch, rather than in the kernel: the interpreter truncates fp32 -> bf16 casts
    return out.to(x.dtype)


@torch.library.custom_op("caprese::cats_ff", mutates_args=())
def cats_ff_op(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    low_up: torch.Tensor,
    down_weight_t: torch.Tensor,
    low_down: torch.Tensor,
    threshold: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """``torch.ops.caprese.cats_ff``: ``cats_ff_triton`` as an op ``torch.compile`` can trace."""
    return cats_ff_triton(x, gate_weight, up_weight, low_up, down_weight_t, low_down, threshold, activation)


@cats_ff_op.register_fake
def _cats_ff_fake(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    low_up: torch.Tensor,
    down_weight_t: torch.Tensor,
    low_down: torch.Tensor,
    threshold: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    return torch.empty_like(x)  # (B, D), x's dtype: what torch.compile needs to trace past the op


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def kernel_for(x: torch.Tensor, weights: CatsFFWeights, tokens: int, use_kernels: bool | None) -> str | None:
    """Which kernel ``cats_ff`` runs for ``x``: ``"triton"``, ``"cpu"`` (``cpu_ff``'s C++ op) or None (torch).

    None (auto): Triton for CUDA inputs it takes, the C++ op for CPU inputs where it builds; True demands a kernel
    (Triton on CUDA or, under ``TRITON_INTERPRET=1``, on a CPU; else the C++ op) and raises where none can run.
    """
    if use_kernels is False:
        return None
    batch = x.shape[0]
    triton_fits = tokens == 1 and 1 <= batch <= MAX_BATCH and x.dtype in SUPPORTED_DTYPES
    why_not = f"{batch} sequences x {tokens} tokens of {x.dtype}"
    if x.is_cuda or (use_kernels and INTERPRET):
        if triton_fits:
            return "triton"
        if use_kernels:
            raise ValueError(
                f"use_kernels=True, but the kernel takes one token for each of at most {MAX_BATCH} sequences in "
                f"{[str(d) for d in SUPPORTED_DTYPES]}, got {why_not}."
            )
        _warn_once(
            f"cats_ff: the Triton kernel takes one token for each of at most {MAX_BATCH} sequences in "
            f"{[str(d) for d in SUPPORTED_DTYPES]}; running the slower torch reference for {why_not}."
        )
        return None
    from . import cpu_ff

    problem = "several tokens"
    if tokens == 1:
        problem = cpu_ff.op_problem(x.reshape(batch, -1), *weights.op_args(), strided_rows=cpu_ff.UP_DOWN)
    if problem is None and cpu_ff.available():
        return "cpu"
    if use_kernels:
        raise ValueError(f"use_kernels=True, but no kernel runs here: {problem or cpu_ff.build_error()}.")
    return None


def cats_ff(
    x: torch.Tensor,
    weights: CatsFFWeights,
    threshold: torch.Tensor,
    activation: str = "silu",
    *,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """CATS + low rank for decode tokens: the Triton op on CUDA, the C++ op on a CPU, ``cats_merged_ff`` otherwise.

    ``x`` is ``(B, D)`` or ``(B, T, D)``; ``threshold`` holds one value per sequence (``(B,)`` or ``(B, 1, 1)``).
    ``use_kernels``: see ``kernel_for``; False always runs the torch reference. Every path reads the up and down rows
    only of neurons some sequence keeps, except the reference, which computes every neuron and masks.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (B, D) or (B, T, D), got {tuple(x.shape)}.")
    batch, hidden = x.shape[0], x.shape[-1]
    tokens = 1 if x.dim() == 2 else x.shape[1]
    if threshold.numel() != batch:
        raise ValueError(f"threshold needs one value per sequence ({batch}), got shape {tuple(threshold.shape)}.")
    kernel = kernel_for(x, weights, tokens, use_kernels)
    if kernel == "triton":
        out = torch.ops.caprese.cats_ff(
            x.reshape(batch, hidden), *weights.op_args(), threshold.reshape(batch).float(), activation
        )  # (B, D)
        return out.view(x.shape)
    if kernel == "cpu":
        from .cpu_ff import cats_ff_cpu

        return cats_ff_cpu(x.reshape(batch, hidden), weights, threshold, activation, use_kernels=True).view(x.shape)
    out = cats_merged_ff(
        x.reshape(batch, tokens, hidden),
        *weights.reference_args(),
        threshold.reshape(batch, 1, 1).float(),
        ACTIVATIONS[activation],
    )  # (B, T, D)
    return out.view(x.shape)
