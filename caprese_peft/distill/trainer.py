"""``CapreseTrainer``: a ``transformers.Trainer`` that distills the low-rank factors of a Caprese adapter.

Stage "layerwise" (paper equation 7) runs the original dense model once while every Caprese layer
scores its sparse + low-rank output on the inputs the original model gives it. Stage "e2e"
(equation 8) matches the last hidden state of the model run as in generation (dense prompt,
sparse + low-rank continuation) to that of the original model, which is the same PEFT model with
its adapter disabled: no second copy. Only the factors L and R train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..data.features import FEATURE_FIELDS, CapreseDataCollator, position_ids_from, prepare_dataset
from ..layer import caprese_layers
from ..state import find_state, teacher_forcing
from .losses import hidden_state_mse, layerwise_loss, layerwise_losses

STAGES = ("layerwise", "e2e")
# Table 6 of the paper; the E2E learning rate varies in [4e-6, 2e-4] with model size (larger models, smaller rates)
DEFAULT_LEARNING_RATE = {"layerwise": 1e-3, "e2e": 2e-5}
DEFAULT_EPOCHS = {"layerwise": 20.0, "e2e": 3.0}


@dataclass
class CapreseTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for Caprese distillation, with the paper's defaults (Table 6).

    Linear schedule, 2% warmup, Adam without weight decay; learning rate and epochs follow the stage
    unless given. The paper's batch sizes (128 layer-wise, 16 end-to-end) are global; reach them with
    ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` x devices.
    """

    stage: str = field(
        default="layerwise",
        metadata={
            "help": (
                "'layerwise': each Caprese layer learns FF(x) - FF_sparse(x) on the original model's inputs "
                "(equation 7, all layers in parallel). 'e2e': the last hidden state of the model with Caprese layers "
                "learns that of the original model (equation 8), usually starting from layer-wise factors."
            )
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many tokens of each prompt + completion; None keeps all."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the dataset (datasets.map)."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate. Default: 1e-3 for 'layerwise' (Table 6), 2e-5 for 'e2e'."},
    )
    num_train_epochs: float | None = field(
        default=None, metadata={"help": "Epochs. Default: 20 for 'layerwise', 3 for 'e2e' (Table 6)."}
    )
    warmup_steps: float = field(
        default=0.02,
        metadata={"help": "Linear warmup: a fraction of all steps when below 1 (default 2%, Table 6), else steps."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: prompt_mask is not a model argument but the trainer needs it."},
    )
    label_names: list[str] | None = field(
        default_factory=list,
        metadata={"help": "Distillation has no labels; leave empty."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.stage, str):
            self.stage = self.stage.lower()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}.")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE[self.stage]
        if self.num_train_epochs is None:
            self.num_train_epochs = DEFAULT_EPOCHS[self.stage]
        if self.ddp_find_unused_parameters is None:
            # every L and R takes part in every step, and the layer-wise loss is not reachable from the model's
            # output, so DDP's search for unused parameters would mark them ready twice
            self.ddp_find_unused_parameters = False
        if self.max_length is not None and (isinstance(self.max_length, bool) or self.max_length < 2):
            raise ValueError(
                f"max_length must be an integer >= 2 (a prompt and a completion token), got {self.max_length!r}."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop prompt_mask, which Caprese distillation needs; leave it False."
            )
        super().__post_init__()


def check_caprese_model(model: nn.Module) -> None:
    """Raise unless ``model`` is a PEFT model with an active Caprese adapter whose factors can train."""
    find_state(model)  # raises when no Caprese adapter wraps the model
    layers = caprese_layers(model)
    if not callable(getattr(model, "disable_adapter", None)):
        raise TypeError(
            f"CapreseTrainer needs the PeftModel itself (it uses disable_adapter), got {type(model).__name__}."
        )
    active = [a for a in layers[0].active_adapters if a in layers[0].caprese_L]
    if not active:
        raise ValueError(f"No Caprese adapter is active (active adapters: {layers[0].active_adapters}).")
    trainable = [p for m in layers for p in (*m.caprese_L.values(), *m.caprese_R.values()) if p.requires_grad]
    if not trainable:
        raise ValueError(
            "The Caprese factors L and R do not require gradients; load a saved adapter with "
            "PeftModel.from_pretrained(base, path, is_trainable=True) to train it further."
        )


class CapreseTrainer(Trainer):
    """Distills a Caprese adapter: only the low-rank factors of each Caprese layer train.

    Args:
        model: a ``PeftModel`` with a Caprese adapter (``get_peft_model(model, CapreseConfig(...))``).
        args: ``CapreseTrainingArguments``; ``stage`` picks the loss.
        train_dataset, eval_dataset: prompt-completion records (strings, chat messages or token ids) or
            tokenized records (``input_ids``, ``prompt_mask``); records are tokenized here.
        processing_class: the tokenizer, needed for string and chat records and used for the pad id.
        data_collator: default ``CapreseDataCollator`` (left padding).

    Everything else (logging, checkpoints, gradient accumulation, resuming) is ``Trainer``'s.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by the accumulation steps

    def __init__(
        self,
        model: nn.Module,
        args: CapreseTrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = CapreseTrainingArguments()
        if not isinstance(args, CapreseTrainingArguments):
            raise TypeError(
                f"CapreseTrainer takes CapreseTrainingArguments (they add stage and max_length), got {type(args).__name__}."
            )
        check_caprese_model(model)
        prepare = {"tokenizer": processing_class, "max_length": args.max_length, "num_proc": args.dataset_num_proc}
        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, **prepare)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: prepare_dataset(d, **prepare) for name, d in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, **prepare)
        if data_collator is None:
            if processing_class is not None and hasattr(processing_class, "pad_token_id"):
                data_collator = CapreseDataCollator.from_tokenizer(processing_class)
            else:
                # padded positions are masked everywhere, so any valid id serves
                pad = getattr(getattr(model, "config", None), "pad_token_id", None)
                data_collator = CapreseDataCollator(pad_token_id=int(pad) if isinstance(pad, int) else 0)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Equation 7 (stage 'layerwise') or equation 8 (stage 'e2e') on one batch."""
        missing = [k for k in FEATURE_FIELDS if k not in inputs]
        if missing:
            raise ValueError(
                f"The batch lacks {missing} (has {sorted(inputs)}); Caprese distillation needs {list(FEATURE_FIELDS)}. "
                "Use CapreseDataCollator, and keep remove_unused_columns=False."
            )
        peft_model = self.accelerator.unwrap_model(model)
        attention_mask, prompt_mask = inputs["attention_mask"], inputs["prompt_mask"].bool()
        forward = {
            "input_ids": inputs["input_ids"],
            "attention_mask": attention_mask,
            "position_ids": position_ids_from(attention_mask),
            "use_cache": False,
            "logits_to_keep": 1,  # the losses read hidden states; skip the vocabulary projection
        }
        if self.args.stage == "layerwise":
            with layerwise_losses(peft_model, prompt_mask, attention_mask) as losses:
                outputs = model(**forward)
            loss = layerwise_loss(losses)
        else:
            with torch.no_grad(), peft_model.disable_adapter():
                teacher = model(**forward, output_hidden_states=True).hidden_states[-1]  # (B, S, D)
            with teacher_forcing(peft_model, prompt_mask, attention_mask):
                outputs = model(**forward, output_hidden_states=True)
            continuation = attention_mask.bool() & ~prompt_mask
            loss = hidden_state_mse(outputs.hidden_states[-1], teacher, continuation)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        """Evaluation reports the distillation loss of the stage; there are no predictions or labels."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
