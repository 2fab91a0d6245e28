"""``CapreseTrainer``: a ``transformers.Trainer`` that distills the low-rank factors of a Caprese adapter.

Stage "layerwise" (paper equation 7) runs the original dense model once while every Caprese layer
scores its sparse + low-rank output on the inputs the original model gives it. Stage "e2e"
(equation 8) matches the last hidden state of the model run as in generation (dense prompt,
sparse + low-rank continuation) to that of the original model, which is the same PEFT model with
its adapter disabled: no second copy. Only the factors L and R train.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, Trainer, TrainingArguments

from ..data.features import (
    FEATURE_FIELDS,
    CapreseDataCollator,
    position_ids_from,
    prepare_dataset,
    split_prompt_continuation,
)
from ..layer import caprese_layers
from ..state import cache_argument, continuation, find_state, teacher_forcing
from .losses import hidden_state_mse, layerwise_loss, layerwise_losses, next_token_kl

STAGES = ("layerwise", "e2e")
LOSSES = ("mse", "kl")
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
    loss: str = field(
        default="mse",
        metadata={
            "help": (
                "End-to-end loss on the continuation tokens: 'mse' (equation 8: the last hidden state of the original "
                "model) or 'kl' (KL(dense || student) of the next-token distributions, computed in chunks)."
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
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}.")
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


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits ``model`` computes from final hidden states: its LM head, then any final soft-capping (Gemma 2)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


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
        if self.args.stage == "layerwise":
            forward = {
                "input_ids": inputs["input_ids"],
                "attention_mask": attention_mask,
                "position_ids": position_ids_from(attention_mask),
                "use_cache": False,
                "logits_to_keep": 1,  # the loss reads hidden states; skip the vocabulary projection
            }
            with layerwise_losses(peft_model, prompt_mask, attention_mask) as losses:
                outputs = model(**forward)
            loss = layerwise_loss(losses)
            return (loss, outputs) if return_outputs else loss
        base = peft_model.get_base_model()
        if getattr(base, "is_activation_checkpointing", False) and base.training:
            # transformers drops the KV cache of a checkpointed model in training: one teacher-forced pass instead
            student, teacher, mask, outputs = self._teacher_forced_states(model, peft_model, inputs)
        else:
            student, teacher, mask, outputs = self._continuation_states(model, peft_model, inputs)
        if self.args.loss == "kl":
            loss = next_token_kl(student, teacher, partial(output_logits, peft_model), mask)
        else:
            loss = hidden_state_mse(student, teacher, mask)
        return (loss, outputs) if return_outputs else loss

    def _teacher_forced_states(self, model: nn.Module, peft_model: nn.Module, inputs: dict[str, torch.Tensor]):
        """``_continuation_states`` in one pass over prompt and continuation (the same values, more work)."""
        attention_mask, prompt_mask = inputs["attention_mask"], inputs["prompt_mask"].bool()
        forward = {
            "input_ids": inputs["input_ids"],
            "attention_mask": attention_mask,
            "position_ids": position_ids_from(attention_mask),
            "use_cache": False,
            "output_hidden_states": True,
            "logits_to_keep": 1,
        }
        with torch.no_grad(), peft_model.disable_adapter():
            teacher = model(**forward).hidden_states[-1]  # (B, S, D)
        with teacher_forcing(peft_model, prompt_mask, attention_mask):
            outputs = model(**forward)
        return outputs.hidden_states[-1], teacher, attention_mask.bool() & ~prompt_mask, outputs

    def _continuation_states(self, model: nn.Module, peft_model: nn.Module, inputs: dict[str, torch.Tensor]):
        """Last hidden states of the continuation tokens, student and teacher, as generation computes them.

        The prompts run once, as a dense prefill without a graph (no L or R acts on them): it fills the KV cache and
        calibrates the backbone. The original model (the adapter disabled) and then the student continue from that
        cache over the continuation tokens; only the student's pass builds a graph.
        """
        split = split_prompt_continuation(inputs["input_ids"], inputs["attention_mask"], inputs["prompt_mask"])
        width = split.prompt_ids.shape[1]
        positions = position_ids_from(split.attention_mask)
        cache = DynamicCache(config=peft_model.config)
        continue_from = {
            "input_ids": split.continuation_ids,
            "attention_mask": split.attention_mask,
            "position_ids": positions[:, width:],
            "use_cache": True,
            "output_hidden_states": True,
            "logits_to_keep": 1,  # the losses read hidden states; skip the vocabulary projection
            cache_argument(peft_model): cache,
        }
        name = cache_argument(peft_model)
        with torch.no_grad():
            prompt = {"attention_mask": split.prompt_mask, "position_ids": positions[:, :width], name: cache}
            model(input_ids=split.prompt_ids, use_cache=True, logits_to_keep=1, **prompt)
            # a copy for the teacher: sliding-window layers cannot crop their entries back to the prompt's
            teacher_from = {**continue_from, name: copy.deepcopy(cache)}
            with peft_model.disable_adapter(), continuation(peft_model):
                teacher = model(**teacher_from).hidden_states[-1]  # (B, C, D)
        with continuation(peft_model):
            outputs = model(**continue_from)
        return outputs.hidden_states[-1], teacher, split.continuation_mask.bool(), outputs

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
