"""Distillation of Caprese adapters: data, losses (paper equations 7 and 8) and a ``transformers.Trainer``.

Importing this package imports ``transformers.Trainer``; ``datasets`` is imported only when data is loaded.
"""

from .closed_form import fit_closed_form
from .data import CapreseDataCollator, features_from_record, load_prompt_completion, prepare_dataset
from .losses import hidden_state_mse, layerwise_loss
from .trainer import CapreseTrainer, CapreseTrainingArguments

__all__ = [
    "CapreseDataCollator",
    "CapreseTrainer",
    "CapreseTrainingArguments",
    "features_from_record",
    "fit_closed_form",
    "hidden_state_mse",
    "layerwise_loss",
    "load_prompt_completion",
    "prepare_dataset",
]
