"""CPU decode ops: a batched GEMV and a fused gated FF block reading only the rows of kept neurons; and a prefill's
backbone statistics in one op per layer.

The C++ source ``cpu_ff.cpp`` is compiled on first use with ``torch.utils.cpp_extension`` (``-O3 -march=native``
on the machine that runs it, cached under ``TORCH_EXTENSIONS_DIR``; about 18 s the first time on 2 cores, then a load) and
registers ``torch.library`` ops, so ``torch.compile`` traces them as opaque calls:

- ``torch.ops.caprese_cpu.linear(x, weight)``: ``x (B, D) @ weight (N, D)^T``, fp32 accumulation;
- ``torch.ops.caprese_cpu.gated_ff(x, gate, up, low_up, down_t, low_down, threshold, keep, activation)``: the
  gated MLP over the neuron-major layout of ``caprese_peft.kernels.CatsFFWeights`` (``gate, up, down_t (F, D)``
  and the ``r`` low-rank neurons ``low_up = L^T``, ``low_down = R`` with gate 1), keeping neuron ``i`` for row
  ``b`` where ``|act(gate)| > threshold[b]`` (CATS), where ``keep[b, i]`` (GRIFFIN on the union of the rows'
  neurons), or always (dense). Up and down rows of a neuron no row keeps are never read. The optional
  ``stand_up, stand_down, stand_scale, stand_gate`` (``StandIn4``) add the neurons a row drops from 4-bit copies of
  their up and down rows (``CapreseConfig.stand_in_bits=4``), and with a keep mask (GRIFFIN) of their gate rows,
  read only for neurons some row drops;
- ``torch.ops.caprese_cpu.attention_block``, ``ff_block`` and ``norm_linear``: a decoder layer's attention half
  (norm, q/k/v, rotary, cache write, attention over the slots so far, o projection, residual), its FF half (norm,
  ``gated_ff``, residual) and the head, each in one call, so that a decode step is a chain of calls
  (``caprese_peft.fast_decode.lean.LeanDecoder.block_step``; its torch step ``forward`` is the specification);
- ``torch.ops.caprese_cpu.cats_threshold`` and ``griffin_select``: the statistics a prefill computes per layer
  (``cats_threshold``, ``griffin_select`` below; specifications ``caprese_peft.backbones.cats.cats_thresholds`` and
  ``caprese_peft.backbones.griffin``'s ``griffin_scores``, ``top_neurons``), which ``Cats.calibrate`` and
  ``Griffin.calibrate`` call on a CPU.

The decode ops have pure-torch references here (``linear_reference``, ``gated_ff_reference``), checked against
the specifications in ``caprese_peft.sparse_ff``; the public functions take ``use_kernels`` like ``caprese_peft.kernels.cats_ff``:
None runs the op when it is built and applies, True demands it, False runs the reference. Where the op cannot be
built (no compiler, no ninja), one warning is given and the references run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..sparse_ff import ACTIVATIONS

SOURCE = Path(__file__).with_name("cpu_ff.cpp")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# -march=native: the vector code is chosen (AVX-512, AVX2, scalar) by the machine that builds it, at first use;
# CAPRESE_CPU_MARCH overrides it (e.g. x86-64-v3 to test the AVX2 path on an AVX-512 machine)
CFLAGS = ["-O3", f"-march={os.environ.get('CAPRESE_CPU_MARCH', 'native')}", "-fopenmp", "-fno-math-errno"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "error": str


def _cpu_tag() -> str:
    """A short tag of this CPU's model and flags: ``-march=native`` builds must not be shared across CPUs."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:8]


def extension_name() -> str:
    """Name of the compiled library: source hash and CPU tag, so edits and other CPUs get their own build."""
    source = hashlib.sha1(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:8]
    return f"caprese_cpu_{source}_{_cpu_tag()}"


def load_extension(verbose: bool = False) -> bool:
    """Build (first use) or load the C++ ops; True when ``torch.ops.caprese_cpu`` is usable.

    Call it before ``torch.compile`` traces code that uses the ops: the build cannot be traced (the prepare
    functions and the modules of ``cpu_lean`` call it).

    A failure (no C++ compiler, no ninja, a compile error) warns once and returns False: callers fall back to
    the torch references.
    """
    if "loaded" in _state:  # checked before the lock, which torch.compile cannot trace
        return bool(_state["loaded"])
    with _lock:
        if "loaded" in _state:
            return bool(_state["loaded"])
        if os.environ.get("CAPRESE_CPU_KERNELS", "1") == "0":
            _state.update(loaded=False, error="disabled by CAPRESE_CPU_KERNELS=0")
            return False
        try:
            from torch.utils import cpp_extension

            cpp_extension.load(
                name=extension_name(),
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],  # libgomp: the soname torch already loaded, so one OpenMP pool
                is_python_module=False,
                verbose=verbose,
            )
            _register_fakes()
            _state.update(loaded=True)
        except Exception as error:  # noqa: BLE001 - any build failure means: run the torch path
            _state.update(loaded=False, error=f"{type(error).__name__}: {error}")
            warnings.warn(
                "caprese_peft.kernels.cpu_ff: the C++ CPU kernels could not be built, so the slower torch path runs instead "
                f"({str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__}). They "
                "need a C++ compiler and ninja (pip install ninja).",
                stacklevel=3,
            )
        return bool(_state["loaded"])


def build_error() -> str | None:
    """Why the C++ ops are unavailable, or None when they loaded (or were not tried yet)."""
    return _state.get("error")  # type: ignore[return-value]


def isa() -> str | None:
    """The vector instruction set the ops were compiled for (``avx512``, ``avx2``, ``scalar``), None if unbuilt."""
    return str(torch.ops.caprese_cpu.isa()) if load_extension() else None


def _register_fakes() -> None:
    """Fake (meta) implementations: the output shapes and dtypes ``torch.compile`` traces with."""

    @torch.library.register_fake("caprese_cpu::linear")
    def _linear_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("caprese_cpu::gated_ff")
    def _gated_ff_fake(
        x, gate, up, low_up, down_t, low_down, threshold, keep, activation, stand_up=None, stand_down=None,
        stand_scale=None, stand_gate=None,
    ) -> torch.Tensor:  # fmt: skip
        return torch.empty_like(x)

    @torch.library.register_fake("caprese_cpu::attention_block")
    def _attention_block_fake(h, positions, slot, norm_weight, eps, qkv, *rest) -> torch.Tensor:
        return torch.empty_like(h)

    @torch.library.register_fake("caprese_cpu::ff_block")
    def _ff_block_fake(h, norm_weight, eps, *rest) -> torch.Tensor:
        return torch.empty_like(h)

    @torch.library.register_fake("caprese_cpu::norm_linear")
    def _norm_linear_fake(h, norm_weight, eps, weight) -> torch.Tensor:
        return h.new_empty(h.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("caprese_cpu::cats_threshold")
    def _cats_threshold_fake(gate, token_mask, draws, sample, density) -> torch.Tensor:
        return gate.new_empty(gate.shape[0], 1, 1, dtype=torch.float32)

    @torch.library.register_fake("caprese_cpu::griffin_select")
    def _griffin_select_fake(z, token_mask, k) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, width = z.shape
        return z.new_empty(batch, width, dtype=torch.float32), z.new_empty(batch, 1, width, dtype=torch.bool)


def available() -> bool:
    """Whether the C++ ops are built and loaded (building them on first use)."""
    return load_extension()


def _use_op(use_kernels: bool | None, applies: bool, why_not: str) -> bool:
    if use_kernels is False:
        return False
    if use_kernels is None:
        return applies and load_extension()
    if not applies:
        raise ValueError(f"use_kernels=True, but the CPU op does not apply: {why_not}.")
    if not load_extension():
        raise RuntimeError(f"use_kernels=True, but the CPU ops could not be built: {build_error()}")
    return True


UP_DOWN = (1, 3)  # the positions of up and down_t in CatsFFWeights.op_args: rows may lie apart (interleaved)


def rows_contiguous(t: torch.Tensor) -> bool:
    """A 2-d tensor whose rows are each contiguous, at least a row apart: what the kernels' row strides allow."""
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) and (t.stride(0) >= t.shape[1] or t.shape[0] <= 1)


def op_problem(x: torch.Tensor, *weights: torch.Tensor, strided_rows: tuple[int, ...] = ()) -> str | None:
    """Why the CPU ops cannot compute ``x (B, D)`` with ``weights``, or None when they can. The weights at the
    positions ``strided_rows`` may hold their rows apart (``CatsFFWeights``' interleaved up and down rows)."""
    if x.device.type != "cpu" or any(w.device.type != "cpu" for w in weights):
        return "tensors are not all on the CPU"
    if x.dim() != 2:
        return f"x must be (B, D), got {tuple(x.shape)}"
    if x.dtype not in SUPPORTED_DTYPES or any(w.dtype != x.dtype for w in weights):
        return f"x and weights must share one of {SUPPORTED_DTYPES}"
    if not all(rows_contiguous(w) if i in strided_rows else w.is_contiguous() for i, w in enumerate(weights)):
        return "weights must be contiguous (up and down_t: row by row)"
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return "the ops have no backward; call them under torch.no_grad()"
    return None


# ---- the 4-bit stand-in of dropped neurons ----

Q4_BLOCK = 32  # weights per packed block: byte k holds weight k (low nibble) and weight k + 16 (high nibble)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``codes (N, D)`` int8 in [-8, 7], ``D`` a multiple of 32, as the op reads them: ``(N, D / 2)`` uint8."""
    n, d = codes.shape
    if d % Q4_BLOCK:
        raise ValueError(f"4-bit rows need a width that is a multiple of {Q4_BLOCK}, got {d}.")
    blocks = codes.view(n, d // Q4_BLOCK, 2, Q4_BLOCK // 2).to(torch.int16) & 0xF  # (N, blocks, nibble, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).to(torch.uint8).reshape(n, d // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: ``(N, D / 2)`` uint8 to ``(N, D)`` int8."""
    n, half = packed.shape
    signed = packed.view(torch.int8).view(n, half // (Q4_BLOCK // 2), 1, Q4_BLOCK // 2).to(torch.int16)
    low, high = (signed << 12) >> 12, signed >> 4  # the nibbles, sign-extended
    return torch.cat([low, high], dim=2).to(torch.int8).reshape(n, 2 * half)


@dataclass
class StandIn4:
    """The 4-bit stand-in of a block's neurons, as ``caprese_cpu::gated_ff`` reads it (``CapreseConfig.stand_in_bits=4``).

    ``up`` and ``down`` hold ``W1`` and ``W2^T`` row by row (one row per neuron), quantized as
    ``caprese_peft.sparse_ff.quantize_rows`` does, packed by ``pack_int4``; ``scale`` their rows' scales.
    """

    up: torch.Tensor  # (F, D / 2) uint8
    down: torch.Tensor  # (F, D / 2) uint8
    scale: torch.Tensor  # (2, F) fp32: up's, then down's; (3, F) with gate: gate's last
    gate: torch.Tensor | None = None  # (F, D / 2) uint8: GRIFFIN computes a pruned neuron's gate from it

    def op_args(self) -> tuple[torch.Tensor, ...]:
        """``(stand_up, stand_down, stand_scale, stand_gate)`` as ``caprese_cpu::gated_ff`` takes them."""
        return self.up, self.down, self.scale, self.gate

    def dequantized(self) -> tuple[torch.Tensor | None, ...]:
        """``(W1_q, W2^T_q, Wg_q or None)``, ``(F, D)`` fp32 each."""
        rows = (self.up, self.down) if self.gate is None else (self.up, self.down, self.gate)
        weights = [unpack_int4(w).float() * s[:, None] for w, s in zip(rows, self.scale)]
        return (*weights, None) if self.gate is None else tuple(weights)

    def problem(self, hidden: int) -> str | None:
        if self.up.device.type != "cpu":
            return "the stand-in is not on the CPU"
        if 2 * self.up.shape[1] != hidden:
            return f"the stand-in's rows hold {2 * self.up.shape[1]} weights, x has {hidden}"
        return None


def prepare_stand_in(
    up_weight: torch.Tensor, down_weight: torch.Tensor, gate_weight: torch.Tensor | None = None
) -> StandIn4:
    """``W1 (F, D)``, ``W2 (D, F)`` and, for GRIFFIN, ``Wg (F, D)`` quantized to 4 bits row by row (per neuron) as
    ``caprese_peft.sparse_ff.quantize_rows`` does, and packed for the op."""
    from ..sparse_ff import quantize_rows

    rows = [quantize_rows(up_weight, 4), quantize_rows(down_weight.t().contiguous(), 4)]
    if gate_weight is not None:
        rows.append(quantize_rows(gate_weight, 4))
    scale = torch.stack([q.scale.reshape(-1) for q in rows]).float().contiguous()
    packed = [pack_int4(q.codes) for q in rows]
    return StandIn4(packed[0], packed[1], scale, packed[2] if gate_weight is not None else None)


# ---- linear ----


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x (B, D) @ weight (N, D)^T`` accumulated in fp32, in ``x``'s dtype: the specification of the op."""
    return (x.float() @ weight.float().T).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, *, use_kernels: bool | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias for decode-sized ``x (..., D)``: the C++ GEMV where it applies."""
    flat = x.reshape(-1, x.shape[-1])
    problem = op_problem(flat, weight)
    if _use_op(use_kernels, problem is None, problem or ""):
        return torch.ops.caprese_cpu.linear(flat, weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


# ---- gated FF ----


def gated_ff_reference(
    x: torch.Tensor,
    weights: Any,
    activation: str,
    threshold: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    stand_in: StandIn4 | None = None,
) -> torch.Tensor:
    """What ``caprese_cpu::gated_ff`` computes, in torch and fp32: ``(B, D) -> (B, D)`` in ``x``'s dtype.

    ``weights`` has ``op_args()`` as ``CatsFFWeights``. Equals ``cats_merged_ff`` (threshold), ``griffin_merged_ff``
    (keep over union weights) or the dense gated MLP (neither); the tests check each link. ``stand_in`` (with a
    threshold) adds the dropped neurons from their 4-bit rows, as ``CapreseLayer.stand_in`` does.
    """
    gate, up, low_up, down_t, low_down = (w.float() for w in weights.op_args())
    xf = x.float()
    g = ACTIVATIONS[activation](xf @ gate.T)  # (B, F)
    out = (xf @ low_up.T) @ low_down
    if threshold is not None:
        kept = g.abs() > threshold.float().view(-1, 1)
        if stand_in is not None:
            up_q, down_q, _ = stand_in.dequantized()
            out = out + ((g * ~kept) * (xf @ up_q.T)) @ down_q
        g = g * kept
    elif keep is not None:
        if stand_in is not None:  # a pruned neuron's gate from its 4-bit row too
            up_q, down_q, gate_q = stand_in.dequantized()
            g_q = ACTIVATIONS[activation](xf @ gate_q.T)
            out = out + ((g_q * ~keep.bool()) * (xf @ up_q.T)) @ down_q
        g = g * keep.bool()
    return ((g * (xf @ up.T)) @ down_t + out).to(x.dtype)


def gated_ff(
    x: torch.Tensor,
    weights: Any,
    activation: str,
    threshold: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    stand_in: StandIn4 | None = None,
    *,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """The fused gated FF block on decode tokens ``x (B, D)``: the C++ op where it applies, else the reference.

    ``weights``: ``CatsFFWeights`` (anything with ``op_args()``); ``stand_in``: ``StandIn4``, with a threshold only.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    if threshold is not None and keep is not None:
        raise ValueError("Pass threshold (CATS) or keep (GRIFFIN), not both.")
    if stand_in is not None and (threshold is None) == (keep is None):
        raise ValueError("A stand-in of dropped neurons needs a threshold (CATS) or a keep mask (GRIFFIN).")
    if stand_in is not None and (keep is not None) != (stand_in.gate is not None):
        raise ValueError(
            "A stand-in with a keep mask (GRIFFIN) holds 4-bit gate rows, one with a threshold (CATS) none."
        )
    args = weights.op_args()
    problem = op_problem(x, *args, strided_rows=UP_DOWN)
    if problem is None and stand_in is not None:
        problem = stand_in.problem(x.shape[-1])
    if _use_op(use_kernels, problem is None, problem or ""):
        extra = stand_in.op_args() if stand_in is not None else (None, None, None, None)
        return torch.ops.caprese_cpu.gated_ff(x, *args, threshold, keep, activation, *extra)
    return gated_ff_reference(x, weights, activation, threshold, keep, stand_in)


# ---- the three uses: dense, CATS, GRIFFIN past batch 1 ----


def prepare_dense_weights(gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor) -> Any:
    """The dense MLP in the fused op's layout (``CatsFFWeights`` with no low-rank neurons): ``Wg`` in place, one
    copy of ``W1`` and ``W2^T`` with each neuron's two rows side by side (do it once, not per step)."""
    from .cats_ff import prepare_cats_weights

    load_extension()
    # two empty factors of their own: tensors sharing storage would alias inside a compiled region
    left, right = up_weight.new_zeros(up_weight.shape[1], 0), up_weight.new_zeros(0, up_weight.shape[1])
    return prepare_cats_weights(gate_weight, up_weight, down_weight, left, right)


def dense_ff(x: torch.Tensor, weights: Any, activation: str, *, use_kernels: bool | None = None) -> torch.Tensor:
    """The unmodified gated MLP ``down(act(gate(x)) * up(x))`` for ``x (B, D)``, one pass over the weights."""
    return gated_ff(x, weights, activation, use_kernels=use_kernels)


def cats_ff_cpu(
    x: torch.Tensor,
    weights: Any,
    threshold: torch.Tensor,
    activation: str,
    stand_in: StandIn4 | None = None,
    *,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """CATS + low rank on ``x (B, D)`` with ``caprese_peft.kernels.CatsFFWeights``; ``threshold (B,)``, one per sequence.

    Specification: ``caprese_peft.sparse_ff.cats_merged_ff``. Reads every gate row, then the up and down rows of
    the neurons at least one sequence keeps, and the ``r`` low-rank rows; with ``stand_in``, the 4-bit up and down
    rows of the neurons some sequence drops.
    """
    threshold = threshold.reshape(-1).float()
    if threshold.numel() != x.shape[0]:
        raise ValueError(f"threshold needs one value per sequence ({x.shape[0]}), got {tuple(threshold.shape)}.")
    return gated_ff(x, weights, activation, threshold=threshold, stand_in=stand_in, use_kernels=use_kernels)


def griffin_ff_cpu(
    x: torch.Tensor,
    weights: Any,
    keep: torch.Tensor,
    activation: str,
    stand_in: StandIn4 | None = None,
    *,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """GRIFFIN + low rank on ``x (B, D)``: each sequence uses only the neurons it keeps (``keep (B, F)`` bool).

    ``weights``: ``caprese_peft.kernels.CatsFFWeights`` of the whole block. The gate, up and down rows of the union
    of the sequences' kept neurons are read once for all of them; a row no sequence keeps is never read, so at batch
    1 this reads what the merged weights of appendix D hold, without gathering them. Specification:
    ``caprese_peft.sparse_ff.griffin_merged_ff`` on ``griffin_merged_weights``.
    """
    keep = keep.reshape(keep.shape[0], -1)
    if keep.shape != (x.shape[0], weights.gate.shape[0]):
        raise ValueError(f"keep must be (B, F) = ({x.shape[0]}, {weights.gate.shape[0]}), got {tuple(keep.shape)}.")
    return gated_ff(x, weights, activation, keep=keep.to(torch.uint8), stand_in=stand_in, use_kernels=use_kernels)


# ---- prompt statistics: one op per layer and prefill ----


def cats_threshold(
    gate: torch.Tensor, token_mask: torch.Tensor, density: float, sample: int | None, draws: torch.Tensor
) -> torch.Tensor:
    """``caprese_peft.backbones.cats.cats_thresholds`` in one call, the same values: per sequence, the order statistic
    of ``|gate|`` over its real tokens (``token_mask (B, S)``), over every value or the fixed ``sample`` of them
    that ``draws`` (fp64 in [0, 1)) give; ``(B, 1, 1)`` fp32. Carries no gradient (the threshold is only compared).
    """
    gate = gate.detach() if gate.requires_grad else gate
    return torch.ops.caprese_cpu.cats_threshold(gate, token_mask, draws, -1 if sample is None else sample, density)


def griffin_select(z: torch.Tensor, token_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``griffin_scores`` and ``top_neurons`` of ``caprese_peft.backbones.griffin`` in one call: ``score (B, F)`` fp32
    (the same up to the order of fp32 sums) and ``keep (B, 1, F)`` bool, the ``k`` highest scores (ties to the lower
    neuron). Carries no gradient."""
    return torch.ops.caprese_cpu.griffin_select(z.detach() if z.requires_grad else z, token_mask, k)
