"""The interface every sparse feed-forward backbone implements, and the registry of backbones."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, type[Backbone]] = {}


class Backbone(ABC):
    """A sparse feed-forward method: statistics from prompt tokens decide which neurons generated tokens keep.

    For a gated MLP ``FF(x) = (act(x Wg) * (x W1)) W2`` a backbone sees, per token, the gate activation
    ``gate = act(x Wg)`` and the intermediate feature ``z = gate * (x W1)``, both ``(batch, seq, d_ff)``.
    ``calibrate`` turns the prompt tokens of each sequence into statistics; ``keep_mask`` says which
    neurons a generated token keeps. These pure-torch methods are the specification fast kernels match.
    """

    name: ClassVar[str]

    def __init__(self, density: float) -> None:
        self.density = check_density(density)

    @abstractmethod
    def calibrate(self, gate: torch.Tensor, z: torch.Tensor, token_mask: torch.Tensor) -> Any:
        """Statistics per sequence from the tokens where ``token_mask`` (``(batch, seq)`` bool) is True."""

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


def check_token_mask(token_mask: torch.Tensor) -> None:
    """Every sequence needs at least one prompt token to compute statistics from."""
    empty = (~token_mask).all(dim=-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"Sequences {rows} have no prompt tokens to calibrate the sparse backbone on.")
