"""The methods an evaluation compares (dense, the backbone alone, each adapter), planned and run on the base model.

``plan_methods`` names them and checks that each fits the base model before any generation;
``method_model`` puts one on the base model for a block, reading an adapter's weights only then.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..backbones import check_density
from ..config import CapreseConfig, resolve_layers

DENSE = "dense"
DEFAULT_BACKBONE = "cats"
DEFAULT_DENSITY = 0.5


def _backbone_label(backbone: str, density: float, layers: list[int] | None, n_layers: int) -> str:
    label = f"{backbone} {density:g}"
    if layers is None or sorted(layers) == list(range(n_layers)):
        return label
    if sorted(layers) == list(range(n_layers // 2)):
        return f"{label} first-half"
    return f"{label} layers {','.join(str(i) for i in layers)}"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _adapter_configs(adapters: Sequence[str | os.PathLike]) -> list[tuple[str, Any]]:
    """``(source, CapreseConfig)`` of each adapter; raises for one that is missing or not a Caprese adapter."""
    from peft import PeftConfig

    from ..registration import CAPRESE

    configs = []
    for source in adapters:
        try:
            config = PeftConfig.from_pretrained(str(source))
        except Exception as error:  # PEFT raises ValueError or hub errors for a folder or id it cannot read
            raise ValueError(f"Cannot read the adapter {str(source)!r}: {error}") from error
        if config.peft_type != CAPRESE:
            kind = getattr(config.peft_type, "value", config.peft_type)
            raise ValueError(f"The adapter {str(source)!r} is a {kind} adapter, not a Caprese one.")
        configs.append((str(source), config))
    return configs


def _describe_config(config: Any, rank: bool = True) -> dict[str, Any]:
    layers = config.layers_to_transform
    return {
        "backbone": config.backbone,
        "density": config.density,
        "layers": "all" if layers is None else list(layers),
        "r": config.r if rank else 0,
    }


def plan_methods(
    base: nn.Module,
    adapters: Sequence[str | os.PathLike],
    backbone: str | None,
    density: float | None,
    layers: str | Sequence[int] | None,
) -> dict[str, dict[str, Any]]:
    """The methods to compare, by display name: ``kind``, ``source`` (adapter), ``config`` and ``peft_config``.

    Every backbone and adapter is put on the base model and taken off again here, before any generation,
    so that one that does not fit the base model (another hidden size, missing layers) fails the run at once.
    An adapter is put on with its config alone: its weights are read once, when ``method_model`` runs it.
    """
    n_layers = base.config.get_text_config().num_hidden_layers
    loaded = _adapter_configs(adapters)
    taken = {DENSE}
    methods: dict[str, dict[str, Any]] = {DENSE: {"kind": DENSE, "source": None, "config": None}}

    def add_backbone(config: CapreseConfig) -> None:
        label = _backbone_label(config.backbone, config.density, config.layers_to_transform, n_layers)
        methods[_unique(f"backbone {label}", taken)] = {
            "kind": "backbone",
            "source": None,
            "config": _describe_config(config, rank=False),
            "peft_config": config,
        }

    if backbone is not None or density is not None or layers is not None or not loaded:
        add_backbone(
            CapreseConfig(
                backbone=backbone or DEFAULT_BACKBONE,
                density=check_density(DEFAULT_DENSITY if density is None else density),
                r=1,  # R = 0: the correction vanishes and the backbone runs alone
                layers_to_transform=resolve_layers(layers, n_layers),
            )
        )
    else:  # the backbones of the adapters themselves, each once
        seen = set()
        for _, config in loaded:
            key = (config.backbone, config.density, str(config.layers_to_transform), str(config.target_modules))
            if key not in seen:
                seen.add(key)
                add_backbone(
                    CapreseConfig(
                        backbone=config.backbone,
                        density=config.density,
                        r=1,
                        target_modules=config.target_modules,
                        exclude_modules=config.exclude_modules,
                        layers_to_transform=config.layers_to_transform,
                        layers_pattern=config.layers_pattern,
                    )
                )
    for source, config in loaded:
        name = _unique(Path(source.rstrip("/")).name or source, taken)
        methods[name] = {
            "kind": "adapter",
            "source": source,
            "config": _describe_config(config),
            "peft_config": config,
        }

    for method in methods.values():
        if method["kind"] != DENSE:
            _wrap(base, method, weights=False).unload()
    return methods


def _wrap(base: nn.Module, method: dict[str, Any], *, weights: bool = True) -> nn.Module:
    """``base`` wrapped with a backbone or adapter method; ``weights=False`` leaves an adapter's weights unread."""
    from peft import PeftModel, get_peft_model

    try:
        if method["kind"] == "adapter" and weights:
            return PeftModel.from_pretrained(base, method["source"])
        # PEFT fills the config in (target modules, sizes): wrap with a copy, keep the plan as it was
        return get_peft_model(base, copy.deepcopy(method["peft_config"]))
    except ValueError as error:  # e.g. an adapter made for a base model of another hidden size
        if method["kind"] != "adapter":
            raise
        raise ValueError(f"The adapter {method['source']!r} does not fit the model: {error}") from error


@contextmanager
def method_model(base: nn.Module, method: dict[str, Any]):
    """``base`` as ``method`` runs it, in eval mode: itself for dense, else wrapped with the method until exit.

    A Caprese model holds one adapter at a time, so each method gets its own short-lived wrapper, and reads the
    adapter's weights then.
    """
    if method["kind"] == DENSE:
        yield base.eval()
        return
    model = _wrap(base, method)
    try:
        yield model.eval()
    finally:
        model.unload()


def param_counts(model: nn.Module, kind: str) -> dict[str, int]:
    """``total_params``, ``active_params`` (per generated token) and ``adapter_params`` of a method's model."""
    from ..accounting import parameter_report

    if kind == DENSE:
        total = sum(p.numel() for p in model.parameters())
        return {"total_params": total, "active_params": total, "adapter_params": 0}
    report = parameter_report(model)
    if kind == "backbone":  # R = 0: the correction adds nothing a token needs to read
        return {
            "total_params": report.total,
            "active_params": report.active_per_token - report.adapter,
            "adapter_params": 0,
        }
    return {"total_params": report.total, "active_params": report.active_per_token, "adapter_params": report.adapter}


def check_inputs(model: nn.Module, tokenizer: Any, problems: Sequence[dict[str, Any]]) -> None:
    """Raise before any work unless ``model`` is a base model, ``tokenizer`` has a chat template and every problem
    has a prompt and an answer."""
    if hasattr(model, "peft_config"):
        raise ValueError("Pass the base model: the evaluation adds the Caprese adapters itself.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; evaluation writes chat prompts through it.")
    if not problems:
        raise ValueError("problems is empty: there is nothing to evaluate on.")
    lacking = [p.get("id", i) for i, p in enumerate(problems) if not p.get("answer") or not p.get("prompt")]
    if lacking:
        raise ValueError(f"Problems {lacking[:10]} lack a prompt or an answer (found {sorted(problems[0])}).")


@contextmanager
def frozen(model: nn.Module):
    """``model`` with gradients off for the block, restored after; a wrapped base is frozen, so dense runs match."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)


__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_DENSITY",
    "DENSE",
    "check_inputs",
    "frozen",
    "method_model",
    "param_counts",
    "plan_methods",
]
