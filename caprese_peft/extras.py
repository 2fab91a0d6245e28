"""Optional dependencies: import one where it is used, or say which extra of caprese-peft installs it.

Loading an adapter and generating needs only what ``pip install caprese-peft`` brings. Distillation, evaluation,
GGUF loading and lm-evaluation-harness are extras, named in setup.cfg.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extras that bring it (the first one is suggested)
EXTRAS = {
    "datasets": ("train", "eval"),
    "trl": ("train",),
    "math_verify": ("eval",),
    "matplotlib": ("eval",),
    "gguf": ("gguf",),
    "lm_eval": ("lm-eval",),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that brings it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose`` (e.g. "reading datasets"), or raise naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extras = EXTRAS.get(module.split(".")[0])
        if extras is None:
            raise
        hint = " or ".join(f"pip install 'caprese-peft[{extra}]'" for extra in extras)
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}, which is not installed: {hint}.") from error
