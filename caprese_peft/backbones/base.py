"""The interface every sparse feed-forward backbone implements, and the registry of backbones."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

_REGISTRY: dict[str, type[Backbone]] = {}
# How a Caprese layer computes generated tokens; see caprese_peft.set_decode_impl.
DECODE_IMPLS = ("auto", "merged", "reference")


class Backbone(ABC):
    """A sparse feed-forward method: statistics from prompt tokens decide which neurons generated tokens keep.

    For a gated MLP ``FF(x) = (act(x Wg) * (x W1)) W2`` a backbone sees, per token, the gate activation
    ``gate = act(x Wg)`` and the intermediate feature ``z = gate * (x W1)``, both ``(batch, seq, d_ff)``.
    ``calibrate`` turns the prompt tokens of each sequence into statistics; ``keep_mask`` says which
    neurons a generated token keeps. These pure-torch methods are the specification fast kernels match.
    """

    name: ClassVar[str]
    # how generated tokens are computed; a backbone with a faster form than the masked reference names its own
    decoder: ClassVar[type[SparseDecoder]]
    # whether a generated token computes every neuron's gate activation (CATS: its keep mask needs them), so that
    # the stand-in of dropped neurons uses the exact ones; False (GRIFFIN) quantizes the dropped gates too
    reads_every_gate: ClassVar[bool] = True
    # whether ``calibrate`` reads ``gate`` only: a prefill then calls it with ``z=None`` before computing ``z``
    statistics_from_gate: ClassVar[bool] = False

    def __init__(self, density: float) -> None:
        self.density = check_density(density)

    @abstractmethod
    def calibrate(self, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> Any:
        """Statistics per sequence from the tokens where ``token_mask`` (``(batch, seq)`` bool) is True.

        A prefill passes ``z=None`` to a backbone with ``statistics_from_gate``: it calibrates before ``z`` exists.
        """

    @abstractmethod
    def keep_mask(self, gate: torch.Tensor, stats: Any) -> torch.Tensor:
        """Bool mask of kept neurons for generated tokens, broadcastable to ``gate`` ``(batch, seq, d_ff)``."""

    def update(self, stats: Any, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> Any:
        """New statistics that add the tokens where ``token_mask`` is True to ``stats`` (reselection, appendix E).

        Backbones whose statistics cannot be updated from new tokens alone do not override this.
        """
        raise NotImplementedError(
            f"The {self.name} backbone cannot update its statistics from generated tokens; reselection "
            f"(reselect_every) is available for: {reselection_backbones()}."
        )

    @classmethod
    def supports_reselection(cls) -> bool:
        """Whether ``update`` is implemented, so that ``CapreseConfig(reselect_every=...)`` can be used."""
        return cls.update is not Backbone.update

    @abstractmethod
    def active_ff_weights(self, hidden_size: int, intermediate_size: int) -> float:
        """Weights of one FF block (gate, up, down) a generated token uses on average, ignoring biases."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(density={self.density})"


class SparseDecoder:
    """How one Caprese layer computes generated tokens for one adapter: the reference formula or a faster form.

    A backbone brings its own decoder, as LoRA variants bring their own forward. This base runs the reference
    ``CapreseLayer.sparse_ff`` (every FF weight read, the dropped neurons masked), which every faster form must
    match. A subclass adds ``fast`` (the same values reading fewer bytes: paper appendix D), ``fast_problem``
    (why ``fast`` cannot run for an input), ``pays_off`` (whether ``decode_impl="auto"`` should take it) and
    ``lean_ff`` (its feed-forward module for ``caprese_peft.FastDecoder``). The layer's ``decode_impl`` chooses:
    ``"reference"``, ``"merged"`` (``fast`` or an error) or ``"auto"`` (``fast`` where it runs and pays off).
    """

    has_fast_path: ClassVar[bool] = False
    has_cpu_stand_in: ClassVar[bool] = False  # ``fast`` passes the 4-bit stand-in (``stand_in()``) to the C++ op
    _activation: tuple | None = None  # (act_fn, its name in sparse_ff.ACTIVATIONS or None)
    _stand_in: tuple | None = None  # (weights key, kernels.cpu_ff.StandIn4)

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        self.layer = layer  # the CapreseLayer
        self.adapter = adapter

    def activation(self) -> str | None:
        """The name under which the kernels know the block's activation, or None if they do not."""
        from ..sparse_ff import activation_name

        act = self.layer.base_layer.act_fn
        if self._activation is None or self._activation[0] is not act:
            self._activation = (act, activation_name(act))
        return self._activation[1]

    def cpu_kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether the C++ CPU ops (``caprese_peft.kernels.cpu_ff``) can compute this decode step's FF block."""
        if x.device.type != "cpu" or x.dim() != 3 or x.shape[1] != 1 or self.activation() is None:
            return False
        try:
            from ..kernels import cpu_ff
        except ImportError:  # the kernels package needs triton, which ships for Linux
            return False
        return x.dtype in cpu_ff.SUPPORTED_DTYPES and cpu_ff.available()

    @property
    def backbone(self) -> Backbone:
        return self.layer.caprese_backbone[self.adapter]

    def __call__(self, x: torch.Tensor, stats: Any) -> torch.Tensor:
        """The layer's output for generated tokens ``x`` ``(B, T, D)`` with this prompt batch's ``stats``."""
        impl = self.layer.decode_impl
        if impl not in DECODE_IMPLS:
            raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {impl!r}.")
        if impl != "reference":
            problem = self.problem(x)
            if problem is None and (impl == "merged" or self.pays_off(x)):
                return self.fast(x, stats)
            if problem is not None:
                if impl == "merged":
                    raise ValueError(f"decode_impl='merged' cannot run: {problem}. Use 'auto' or 'reference'.")
                if not problem.startswith("gradients"):  # training through decode steps is not a slow path to flag
                    warn_once(f"Caprese decodes with the unmerged reference formula: {problem}.")
        return self.reference(x, stats)

    def reference(self, x: torch.Tensor, stats: Any) -> torch.Tensor:
        """``down(act(gate(x)) * up(x) * keep) + x @ L @ R``: reads every FF weight and masks."""
        gate, z = self.layer.intermediate(x)
        return self.layer.sparse_ff(x, gate, z, self.backbone.keep_mask(gate, stats), self.adapter)

    def problem(self, x: torch.Tensor) -> str | None:
        """Why ``fast`` cannot compute ``x``, or None when it can."""
        if not self.has_fast_path:
            return f"the {self.backbone.name!r} backbone has no merged form"
        if self.layer.caprese_stand_in.get(self.adapter):
            problem = self.stand_in_problem(x)
            if problem is not None:
                return problem
        biased = [
            p for p in ("gate_proj", "up_proj", "down_proj") if getattr(self.layer.base_layer, p).bias is not None
        ]
        if biased:
            return f"{', '.join(biased)} of the wrapped block have biases, which the merged weights leave out"
        if torch.is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in self.layer.decode_tensors(self.adapter))
        ):
            return (
                "gradients are needed (grad mode is on and the input or weights require grad), but merged weights "
                "are built without autograd; decode under torch.no_grad(), or train with teacher forcing"
            )
        return self.fast_problem(x)

    def stand_in_problem(self, x: torch.Tensor) -> str | None:
        """Why ``fast`` cannot add the adapter's stand-in of dropped neurons (``stand_in_bits``) for ``x``: its fast
        path is the C++ CPU op, for decoders that pass it on (``has_cpu_stand_in``), at 4 bits."""
        if not self.has_cpu_stand_in:
            return "the stand-in of dropped neurons (stand_in_bits) has no merged form here"
        bits = self.layer.caprese_stand_in[self.adapter]
        if bits != 4:
            return f"only a 4-bit stand-in has a fast path (the C++ CPU op), this adapter's has {bits} bits"
        if x.shape[-1] % 32:
            return f"the 4-bit stand-in's fast path needs a hidden size that is a multiple of 32, got {x.shape[-1]}"
        if not self.cpu_kernel_applies(x):
            return "the 4-bit stand-in's fast path is the C++ CPU op, which does not apply here"
        return None

    def stand_in(self) -> Any:
        """``kernels.cpu_ff.StandIn4``: the block's up and down rows at 4 bits, and its gate rows for a backbone
        that skips dropped neurons' gates; built once per set of weights and cached (never saved)."""
        from ..kernels.cpu_ff import prepare_stand_in

        key = self.layer.weights_key(self.adapter)
        if self._stand_in is None or self._stand_in[0] != key:
            self._stand_in = None  # a stale copy is freed before the new one is made
            gate, up, down, _, _ = self.layer.decode_tensors(self.adapter)
            gate = None if self.backbone.reads_every_gate else gate
            self._stand_in = (key, prepare_stand_in(up, down, gate))
        return self._stand_in[1]

    def lean_stand_in(self, low_rank: bool) -> bool:
        """Whether the lean step's FF module adds the stand-in: it is part of the correction, so the backbone alone
        (``low_rank=False``) has neither."""
        return low_rank and bool(self.layer.caprese_stand_in.get(self.adapter))

    def fast_problem(self, x: torch.Tensor) -> str | None:
        """What, beyond biases and gradients, keeps ``fast`` from computing ``x``; None when nothing does."""
        return None

    def pays_off(self, x: torch.Tensor) -> bool:
        """Whether ``decode_impl="auto"`` takes ``fast`` for ``x`` (it reads fewer bytes than the reference)."""
        return True

    def fast(self, x: torch.Tensor, stats: Any) -> torch.Tensor:
        """The reference's values, reading only what the backbone keeps."""
        raise NotImplementedError

    def release(self) -> None:
        """Free whatever ``fast`` built (merged weights, the stand-in); it is rebuilt when next needed."""
        self._stand_in = None

    def new_prompt(self) -> None:
        """A prefill starts: free what was built for the last prompt batch before the prefill needs the memory."""

    def lean_ff(self, low_rank: bool, use_kernels: bool | None, cpu_ops: bool = False) -> nn.Module:
        """The feed-forward module of ``caprese_peft.FastDecoder``'s lean step for this layer and adapter;
        ``cpu_ops``: the step runs on a CPU where the C++ ops (``caprese_peft.kernels.cpu_ff``) are built."""
        raise ValueError(f"The lean decode step runs backbones with a merged form, not {self.backbone.name!r}.")


Backbone.decoder = SparseDecoder


def check_density(density: float) -> float:
    """``density`` as a float, or a ValueError saying that it must lie in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must lie in (0, 1] (the fraction of feed-forward neurons kept), got {density!r}.")
    return float(density)


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator that makes a backbone available to ``CapreseConfig(backbone=cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(f"register_backbone takes a subclass of caprese_peft.Backbone, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"A backbone needs a lower-case string class attribute `name`, got {name!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"A backbone named {name!r} is already registered ({_REGISTRY[name].__qualname__}).")
    _REGISTRY[name] = cls
    return cls


def available_backbones() -> list[str]:
    """Names accepted by ``CapreseConfig(backbone=...)``."""
    return sorted(_REGISTRY)


def reselection_backbones() -> list[str]:
    """Names of the backbones that support reselection."""
    return [name for name, cls in sorted(_REGISTRY.items()) if cls.supports_reselection()]


def get_backbone(name: str) -> type[Backbone]:
    """The backbone class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown backbone {name!r}. Known backbones: {available_backbones()}; "
            "add your own with caprese_peft.register_backbone."
        ) from None


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn about a slower path once per process, not at every decode step."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def statistics_op(values: torch.Tensor) -> Any:
    """``caprese_peft.kernels.cpu_ff`` when its C++ ops compute a prefill's statistics of ``values (B, S, F)`` (on a
    CPU where they build), else None: the backbone's torch specification runs. Every layer of a prefill asks, so the
    answer for a (device type, dtype) is found once."""
    key = (values.device.type, values.dtype)
    if key not in _STATISTICS_OPS:
        ops = None
        if key[0] == "cpu":
            try:
                from ..kernels import cpu_ff
            except ImportError:  # the kernels package needs triton, which ships for Linux
                cpu_ff = None
            # CAPRESE_CPU_KERNELS=0 or a failed build: available() is False
            ops = cpu_ff if cpu_ff is not None and key[1] in cpu_ff.SUPPORTED_DTYPES and cpu_ff.available() else None
        _STATISTICS_OPS[key] = ops
    return _STATISTICS_OPS[key]


_STATISTICS_OPS: dict[tuple, Any] = {}


def check_token_mask(token_mask: torch.Tensor) -> None:
    """Every sequence needs at least one prompt token to compute statistics from."""
    empty = (~token_mask).all(dim=-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"Sequences {rows} have no prompt tokens to calibrate the sparse backbone on.")
