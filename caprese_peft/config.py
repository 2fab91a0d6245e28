"""Configuration of a Caprese adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import TaskType

from .backbones import available_backbones, check_density, get_backbone, reselection_backbones
from .registration import CAPRESE


def resolve_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int] | None:
    """Decoder layer indices from ``"all"`` (or None: every layer), ``"first-half"``, ``"0,1,2"`` or a list."""
    if spec is None or spec == "all":
        return None
    if spec == "first-half":
        return list(range(n_layers // 2))
    try:
        return [int(i) for i in (spec.split(",") if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
        raise ValueError(f"layers takes 'all', 'first-half' or layer indices such as '0,1,2', got {spec!r}.") from None


@dataclass
class CapreseConfig(PeftConfig):
    """Configuration of a Caprese adapter: a sparse feed-forward backbone plus a low-rank correction.

    Each targeted gated MLP block runs densely on prompt tokens (prefill), collects the backbone's
    statistics there, and runs the sparse block plus ``x @ L @ R`` on generated tokens.

    Example:
        ```python
        import caprese_peft
        from peft import get_peft_model

        model = get_peft_model(base, caprese_peft.CapreseConfig(backbone="cats", density=0.5, r=256))
        ```
    """

    backbone: str = field(
        default="cats",
        metadata={
            "help": (
                "Sparse feed-forward method used for generated tokens: 'griffin' (top-k neurons chosen from prompt "
                "statistics) or 'cats' (activations below a threshold calibrated on the prompt are zeroed). Other "
                "methods can be added with `caprese_peft.register_backbone`."
            )
        },
    )
    density: float = field(
        default=0.5,
        metadata={"help": "Fraction of feed-forward neurons kept for each generated token, in (0, 1]."},
    )
    r: int = field(
        default=256,
        metadata={"help": "Rank of the low-rank correction x @ L @ R; between 1 and the model's hidden size."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Names (suffix match) or a regex (full match) of the gated MLP blocks to wrap. Default: every module "
                "named 'mlp', which is the MLP block of Llama, Mistral, Qwen2/3 and Gemma 2/3 decoders."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names or a regex of modules not to wrap, matched as `target_modules`."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": (
                "Indices of the decoder layers to wrap, e.g. list(range(n_layers // 2)) for GRIFFIN on the first "
                "half. Default: all layers."
            )
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the module list holding the decoder layers when it is not 'layers'."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "Initialise R to zero so that a fresh adapter equals the pure backbone (the paper's choice). False "
                "initialises R randomly, which is only useful for tests."
            )
        },
    )
    reselect_every: int | None = field(
        default=None,
        metadata={
            "help": (
                "Reselection (paper appendix E): every this many generated tokens, rerun the tokens generated since the "
                "last reselection through the dense model (refreshing their KV entries), add their statistics to the "
                "prompt's and choose the kept neurons again. 1 reproduces the dense model; None never reselects. "
                "GRIFFIN only: CATS would need the whole prefill again."
            )
        },
    )
    stand_in_bits: int | None = field(
        default=None,
        metadata={
            "help": (
                "The neurons the backbone drops still contribute, computed from a copy of their weights quantized to "
                "this many bits per weight (row by row, symmetric): CATS reads the up and down rows of its dropped "
                "neurons at this precision (their gate activations it computes anyway), GRIFFIN the gate, up and down "
                "rows of its pruned ones. The copy is made from the base weights when the adapter is created or "
                "loaded, never saved. None: the sparse block plus x @ L @ R alone (the paper)."
            )
        },
    )
    hidden_size: int | None = field(
        default=None,
        metadata={"help": "Hidden size of the base model; filled in when the adapter is created, checked on load."},
    )
    intermediate_size: int | None = field(
        default=None,
        metadata={
            "help": "Feed-forward size of the base model; filled in when the adapter is created, checked on load."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules to train and save with the adapter (PEFT's usual option)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CAPRESE
        if self.task_type is None:
            self.task_type = TaskType.CAUSAL_LM  # Caprese speeds up decoding, so it only serves causal LMs
        if isinstance(self.backbone, str):
            self.backbone = self.backbone.lower()
        if self.backbone not in available_backbones():
            get_backbone(self.backbone)  # raises with the list of known backbones
        self.density = check_density(self.density)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1 (the rank of x @ L @ R), got {self.r!r}.")
        if self.reselect_every is not None:
            if (
                isinstance(self.reselect_every, bool)
                or not isinstance(self.reselect_every, int)
                or self.reselect_every < 1
            ):
                raise ValueError(
                    f"reselect_every must be a number of generated tokens >= 1, or None, got {self.reselect_every!r}."
                )
            if not get_backbone(self.backbone).supports_reselection():
                raise ValueError(
                    f"reselect_every is not available with the {self.backbone!r} backbone; backbones that support "
                    f"reselection: {reselection_backbones()}."
                )
        if self.stand_in_bits is not None and (
            isinstance(self.stand_in_bits, bool)
            or not isinstance(self.stand_in_bits, int)
            or not 2 <= self.stand_in_bits <= 8
        ):
            raise ValueError(f"stand_in_bits must be an integer in [2, 8] or None, got {self.stand_in_bits!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise ValueError(f"layers_to_transform must hold non-negative layer indices, got {bad}.")
            if isinstance(self.target_modules, str):
                raise ValueError("layers_to_transform cannot be combined with a regex string in target_modules.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform.")
