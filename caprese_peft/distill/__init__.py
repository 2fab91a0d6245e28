"""Distillation of Caprese adapters: data, losses (paper equations 7 and 8) and a ``transformers.Trainer``.

Names load lazily: ``caprese_peft.distill.synth`` and ``.data`` stay light, and ``transformers.Trainer``
(which imports ``datasets``) loads only when the trainer is asked for.
"""

from importlib import import_module

_EXPORTS = {
    "CapreseDataCollator": ".data",
    "features_from_record": ".data",
    "load_prompt_completion": ".data",
    "prepare_dataset": ".data",
    "fit_closed_form": ".closed_form",
    "hidden_state_mse": ".losses",
    "layer_mse": ".losses",
    "layerwise_loss": ".losses",
    "layerwise_losses": ".losses",
    "CapreseTrainer": ".trainer",
    "CapreseTrainingArguments": ".trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
