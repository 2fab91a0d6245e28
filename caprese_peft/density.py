"""Test-time density: run a loaded Caprese adapter at another density than the one it was trained at (appendix G)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .backbones import check_density
from .layer import caprese_layers


def _backbones(model: nn.Module, adapter_name: str | None) -> list:
    layers = caprese_layers(model)
    if adapter_name is None:
        names = {a for layer in layers for a in layer.active_adapters if a in layer.caprese_backbone}
    else:
        names = {adapter_name}
    backbones = [layer.caprese_backbone[n] for layer in layers for n in sorted(names) if n in layer.caprese_backbone]
    if not backbones:
        known = sorted({a for layer in layers for a in layer.caprese_backbone})
        raise ValueError(f"No Caprese adapter named {adapter_name!r} in the model; it has {known}.")
    return backbones


@contextmanager
def test_time_density(model: nn.Module, density: float, adapter_name: str | None = None) -> Iterator[nn.Module]:
    """Run ``model``'s Caprese adapter at ``density`` inside the ``with`` block, then restore the trained density.

    No retraining: the same ``L`` and ``R`` sit beside a backbone that keeps another fraction of neurons
    (the paper's appendix G). The new density takes effect from the next prompt, whose prefill calibrates
    the backbone (GRIFFIN's top-k, CATS's threshold), so change it between ``generate`` calls, not during
    one. ``parameter_report`` counts the active parameters at the density in force. The adapter's config
    (and so what ``save_pretrained`` writes) keeps the trained density.

    Args:
        model: a PEFT model (or any module) holding Caprese layers.
        density: fraction of feed-forward neurons a generated token keeps, in (0, 1].
        adapter_name: the adapter to change; default: the active one.

    Example:
        ```python
        with caprese_peft.test_time_density(model, 0.3):
            out = model.generate(**inputs, max_new_tokens=256)
        ```
    """
    density = check_density(density)
    backbones = _backbones(model, adapter_name)
    trained = [backbone.density for backbone in backbones]
    for backbone in backbones:
        backbone.density = density
    try:
        yield model
    finally:
        for backbone, value in zip(backbones, trained):
            backbone.density = value


test_time_density.__test__ = False  # its name starts with "test": keep pytest from collecting it where imported

__all__ = ["test_time_density"]
