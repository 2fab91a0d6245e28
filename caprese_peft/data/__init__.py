"""What distillation and evaluation both read: math problems, chat prompts, batched generation and tokenized
prompt-completion records.

Below both ``caprese_peft.distill`` and ``caprese_peft.eval``, which import from here and never from each other.
``datasets`` is imported only by the functions that read a dataset.
"""

from .features import (
    FEATURE_FIELDS,
    CapreseDataCollator,
    SplitBatch,
    check_features,
    features_from_record,
    load_prompt_completion,
    position_ids_from,
    prepare_dataset,
    split_prompt_continuation,
)
from .generation import batches, generate_responses, greedy_generations, split_responses
from .problems import ANSWER_FIELDS, QUESTION_FIELDS, SPLITS, load_eval_problems, load_problems, read_records
from .prompts import INSTRUCTION, chat_inputs, user_message

__all__ = [
    "ANSWER_FIELDS",
    "FEATURE_FIELDS",
    "INSTRUCTION",
    "QUESTION_FIELDS",
    "SPLITS",
    "CapreseDataCollator",
    "SplitBatch",
    "batches",
    "chat_inputs",
    "check_features",
    "features_from_record",
    "generate_responses",
    "greedy_generations",
    "load_eval_problems",
    "load_problems",
    "load_prompt_completion",
    "position_ids_from",
    "prepare_dataset",
    "read_records",
    "split_prompt_continuation",
    "split_responses",
    "user_message",
]
