"""CPU decode ops: a batched GEMV and a fused gated FF block reading only the rows of kept neurons.

The C++ source ``cpu_ff.cpp`` is compiled on first use with ``torch.utils.cpp_extension`` (``-O3 -march=native``
on the machine that runs it, cached under ``TORCH_EXTENSIONS_DIR``; about 18 s the first time on 2 cores, then a load) and
registers two ``torch.library`` ops, so ``torch.compile`` traces them as opaque calls:

- ``torch.ops.caprese_cpu.linear(x, weight)``: ``x (B, D) @ weight (N, D)^T``, fp32 accumulation;
- ``torch.ops.caprese_cpu.gated_ff(x, gate, up, down_t, threshold, keep, ff_size, activation)``: the gated MLP
  over the neuron-major layout of ``caprese_peft.kernels.cats_ff`` (``gate (F, D)``, ``up (F + r, D)``, ``down_t (F + r, D)``,
  the last ``r`` rows the low-rank neurons with gate 1), keeping neuron ``i`` for row ``b`` where
  ``|act(gate)| > threshold[b]`` (CATS), where ``keep[b, i]`` (GRIFFIN on the union of the rows' neurons), or
  always (dense). Up and down rows of a neuron no row keeps are never read.

Each op has a pure-torch reference here (``linear_reference``, ``gated_ff_reference``), itself checked against
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

import torch
import torch.nn.functional as F

from caprese_peft.sparse_ff import ACTIVATIONS, check_ff_weights, keep_indices

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
    def _gated_ff_fake(x, gate, up, down_t, threshold, keep, ff_size, activation) -> torch.Tensor:
        return torch.empty_like(x)


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


def _op_applies(x: torch.Tensor, *weights: torch.Tensor) -> tuple[bool, str]:
    if x.device.type != "cpu" or any(w.device.type != "cpu" for w in weights):
        return False, "tensors are not all on the CPU"
    if x.dim() != 2:
        return False, f"x must be (B, D), got {tuple(x.shape)}"
    if x.dtype not in SUPPORTED_DTYPES or any(w.dtype != x.dtype for w in weights):
        return False, f"x and weights must share one of {SUPPORTED_DTYPES}"
    if not all(w.is_contiguous() for w in weights):
        return False, "weights must be contiguous"
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False, "the ops have no backward; call them under torch.no_grad()"
    return True, ""


# ---- linear ----


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x (B, D) @ weight (N, D)^T`` accumulated in fp32, in ``x``'s dtype: the specification of the op."""
    return (x.float() @ weight.float().T).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, *, use_kernels: bool | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias for decode-sized ``x (..., D)``: the C++ GEMV where it applies."""
    flat = x.reshape(-1, x.shape[-1])
    applies, why_not = _op_applies(flat, weight)
    if _use_op(use_kernels, applies, why_not):
        return torch.ops.caprese_cpu.linear(flat, weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


# ---- gated FF: the torch reference ----


def gated_ff_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down_t: torch.Tensor,
    ff_size: int,
    activation: str,
    threshold: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``caprese_cpu::gated_ff`` computes, in torch and fp32: ``(B, D) -> (B, D)`` in ``x``'s dtype.

    Equals ``cats_merged_ff`` (threshold), ``griffin_merged_ff`` (keep over union weights) or the dense gated
    MLP (neither) on the same weights; the tests check both links.
    """
    act = ACTIVATIONS[activation]
    xf = x.float()
    g = act(xf @ gate.float().T)  # (B, F)
    if threshold is not None:
        g = g * (g.abs() > threshold.float().view(-1, 1))
    elif keep is not None:
        g = g * keep.bool()
    h = xf @ up.float().T  # (B, F + r)
    z = torch.cat([g * h[:, :ff_size], h[:, ff_size:]], dim=-1)
    return (z @ down_t.float()).to(x.dtype)


def gated_ff(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down_t: torch.Tensor,
    ff_size: int,
    activation: str,
    threshold: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    *,
    use_kernels: bool | None = None,
) -> torch.Tensor:
    """The fused gated FF block on decode tokens ``x (B, D)``: the C++ op where it applies, else the reference."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    if threshold is not None and keep is not None:
        raise ValueError("Pass threshold (CATS) or keep (GRIFFIN), not both.")
    applies, why_not = _op_applies(x, gate, up, down_t)
    if _use_op(use_kernels, applies, why_not):
        return torch.ops.caprese_cpu.gated_ff(x, gate, up, down_t, threshold, keep, ff_size, activation)
    return gated_ff_reference(x, gate, up, down_t, ff_size, activation, threshold, keep)


# ---- the three uses: dense, CATS, GRIFFIN past batch 1 ----


@dataclass(frozen=True)
class GatedFFWeights:
    """Neuron-major gated-MLP weights: ``gate (F, D)``, ``up (F + r, D)``, ``down_t (F + r, D)``.

    The same layout as ``caprese_peft.kernels.CatsFFWeights`` (which can be passed wherever this is taken).
    """

    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    intermediate_size: int

    @property
    def rank(self) -> int:
        return self.up.shape[0] - self.intermediate_size


def prepare_dense_weights(
    gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor
) -> GatedFFWeights:
    """The dense MLP in the fused op's layout: a contiguous copy of ``W2^T`` (do it once, not per step)."""
    load_extension()
    with torch.no_grad():
        return GatedFFWeights(
            gate=gate_weight.detach().contiguous(),
            up=up_weight.detach().contiguous(),
            down_t=down_weight.detach().T.contiguous(),
            intermediate_size=gate_weight.shape[0],
        )


def dense_ff(x: torch.Tensor, weights: GatedFFWeights, activation: str, *, use_kernels: bool | None = None):
    """The unmodified gated MLP ``down(act(gate(x)) * up(x))`` for ``x (B, D)``, one pass over the weights."""
    return gated_ff(
        x, weights.gate, weights.up, weights.down_t, weights.intermediate_size, activation, use_kernels=use_kernels
    )


def cats_ff_cpu(
    x: torch.Tensor, weights, threshold: torch.Tensor, activation: str, *, use_kernels: bool | None = None
) -> torch.Tensor:
    """CATS + low rank on ``x (B, D)`` with ``caprese_peft.kernels.CatsFFWeights``; ``threshold (B,)``, one per sequence.

    Specification: ``caprese_peft.sparse_ff.cats_merged_ff``. Reads every gate row, then the up and down rows of
    the neurons at least one sequence keeps, and the ``r`` low-rank rows.
    """
    threshold = threshold.reshape(-1).float()
    if threshold.numel() != x.shape[0]:
        raise ValueError(f"threshold needs one value per sequence ({x.shape[0]}), got {tuple(threshold.shape)}.")
    return gated_ff(
        x,
        weights.gate,
        weights.up,
        weights.down_t,
        weights.intermediate_size,
        activation,
        threshold=threshold,
        use_kernels=use_kernels,
    )


@dataclass(frozen=True)
class GriffinUnionWeights:
    """GRIFFIN weights of a prompt batch: the rows of the union ``U`` of the sequences' kept neurons, gathered.

    ``gate (n, D)``, ``up (n + r, D)``, ``down_t (n + r, D)`` for the ``n = |U|`` neurons (then ``L^T`` and
    ``R``), and ``keep (B, n)`` uint8: which of them each sequence keeps. At batch 1 ``n = k`` and this is the
    merged weights of appendix D; at batch B the rows are read once for all sequences.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    keep: torch.Tensor
    neurons: torch.Tensor  # (n,) int64: the union's indices into the F neurons, sorted

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[0]


def griffin_union_weights(
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    low_rank_left: torch.Tensor,
    low_rank_right: torch.Tensor,
    keep: torch.Tensor,
) -> GriffinUnionWeights:
    """Gather the union of the kept neurons of ``keep (B, F)`` or ``(B, 1, F)`` (bool) once per prompt batch.

    ``Wg, W1 (F, D)``, ``W2 (D, F)``, ``L (D, r)``, ``R (r, D)``; pass ``L[:, :0]``, ``R[:0]`` for the backbone
    alone.
    """
    check_ff_weights(gate_weight, up_weight, down_weight, low_rank_left, low_rank_right)
    load_extension()
    keep = keep.reshape(keep.shape[0], -1)
    keep_indices(keep)  # validates: bool, the same count per row, as the merged reference requires
    with torch.no_grad():
        neurons = keep.any(dim=0).nonzero()[:, 0]  # (n,) sorted
        gate = gate_weight.detach()[neurons].contiguous()
        up = torch.cat([up_weight.detach()[neurons], low_rank_left.detach().T]).contiguous()
        down_t = torch.cat([down_weight.detach().T[neurons], low_rank_right.detach()]).contiguous()
        return GriffinUnionWeights(
            gate=gate, up=up, down_t=down_t, keep=keep[:, neurons].to(torch.uint8).contiguous(), neurons=neurons
        )


def griffin_union_ff(
    x: torch.Tensor, weights: GriffinUnionWeights, activation: str, *, use_kernels: bool | None = None
) -> torch.Tensor:
    """GRIFFIN + low rank on ``x (B, D)``: each sequence uses only its own kept neurons among the union's rows.

    Specification: ``caprese_peft.sparse_ff.griffin_merged_ff`` on ``griffin_merged_weights``. At batch 1 no mask
    is needed (every gathered neuron is kept), so none is passed.
    """
    if x.shape[0] != weights.keep.shape[0]:
        raise ValueError(f"x has {x.shape[0]} sequences, the GRIFFIN weights were built for {weights.keep.shape[0]}.")
    keep = None if weights.keep.shape[0] == 1 else weights.keep
    return gated_ff(
        x,
        weights.gate,
        weights.up,
        weights.down_t,
        weights.intermediate_size,
        activation,
        keep=keep,
        use_kernels=use_kernels,
    )
