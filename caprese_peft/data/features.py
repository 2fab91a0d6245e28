"""Prompt-completion records tokenized to ``input_ids``, ``attention_mask`` and ``prompt_mask``, for training and eval.

Records follow TRL's prompt-completion format. ``prompt`` and ``completion`` are plain strings,
conversational lists of chat messages (rendered with the tokenizer's chat template the way TRL
renders them), or lists of token ids (no tokenizer needed). Prompt tokens run the dense block and
feed the backbone statistics; completion tokens are the ones Caprese learns to reproduce.

``datasets`` is imported inside the functions that need it, so ``import caprese_peft`` stays light.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..extras import require

RECORD_FIELDS = ("prompt", "completion")
FEATURE_FIELDS = ("input_ids", "attention_mask", "prompt_mask")


def _kind(value: Any) -> str:
    """'text', 'messages' or 'ids' for a prompt or completion value; anything else raises."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, Sequence) and value:
        first = value[0]
        if isinstance(first, Mapping) and "role" in first:
            return "messages"
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return "ids"
    if isinstance(value, torch.Tensor) and value.dim() == 1 and not value.is_floating_point():
        return "ids"
    raise TypeError(
        "prompt and completion must each be a string, a list of chat messages ({'role': ..., 'content': ...}) or a "
        f"list of token ids; got {type(value).__name__} {str(value)[:80]!r}."
    )


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _chat_ids(tokenizer: Any, messages: list, **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _prompt_and_full_ids(record: Mapping[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the prompt alone and of prompt + completion, tokenized as TRL's SFT trainer does."""
    prompt, completion = record["prompt"], record["completion"]
    kinds = (_kind(prompt), _kind(completion))
    if kinds == ("ids", "ids"):
        prompt_ids = [int(t) for t in prompt]
        return prompt_ids, prompt_ids + [int(t) for t in completion]
    if kinds[0] != kinds[1]:
        raise TypeError(
            f"prompt and completion must be of the same kind, got a prompt of {kinds[0]} and a completion of {kinds[1]}."
        )
    if tokenizer is None:
        raise ValueError(
            f"Records with {kinds[0]} prompts need a tokenizer; pass one (processing_class=... to CapreseTrainer), "
            "or give prompt and completion as lists of token ids."
        )
    if kinds[0] == "messages":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("Conversational records need a tokenizer with a chat template; this one has none.")
        # optional per-record template inputs, as TRL reads them
        options = dict(record.get("chat_template_kwargs") or {})
        tools = record.get("tools")
        if tools is not None:
            options["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        prompt_ids = _chat_ids(tokenizer, list(prompt), add_generation_prompt=True, **options)
        return prompt_ids, _chat_ids(tokenizer, list(prompt) + list(completion), **options)
    # Unlike TRL's SFT, no EOS is appended: the token after the last completion token is never a model input
    # while generating, so it would teach the correction nothing.
    return list(tokenizer(text=prompt)["input_ids"]), list(tokenizer(text=prompt + completion)["input_ids"])


def features_from_record(
    record: Mapping[str, Any], tokenizer: Any = None, max_length: int | None = None
) -> dict[str, list]:
    """``input_ids``, ``attention_mask`` and ``prompt_mask`` (True on prompt tokens) of one prompt-completion record.

    Conversational records are rendered as TRL renders them: the prompt with
    ``apply_chat_template(prompt, add_generation_prompt=True)``, the whole sequence with
    ``apply_chat_template(prompt + completion)``; the completion starts where the two diverge.
    ``max_length`` cuts tokens from the end; cutting into the prompt raises.
    """
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise ValueError(
            f"A prompt-completion record needs the fields {list(RECORD_FIELDS)}; it lacks {missing} "
            f"(found {sorted(record)})."
        )
    for name in RECORD_FIELDS:
        value = record[name]
        if value is None or (isinstance(value, (str, Sequence, torch.Tensor)) and len(value) == 0):
            raise ValueError(
                f"The {name} is empty; there is nothing to {'calibrate on' if name == 'prompt' else 'distill'}."
            )
    prompt_ids, ids = _prompt_and_full_ids(record, tokenizer)
    n_prompt = _common_prefix_length(prompt_ids, ids)
    if n_prompt < len(prompt_ids):
        warnings.warn(
            "The tokenized prompt is not a prefix of the tokenized prompt + completion (the chat template renders "
            "the prompt differently alone, or tokens merge across the boundary); the prompt is cut to the tokens "
            "both share, so the dense prefill covers slightly fewer tokens than at inference.",
            stacklevel=2,
        )
    if n_prompt == 0:
        raise ValueError("The prompt is empty after tokenization; the sparse backbone calibrates on prompt tokens.")
    if len(ids) == n_prompt:
        raise ValueError(
            f"The completion is empty after tokenization (prompt of {n_prompt} tokens, nothing after it): there is "
            "nothing to distill. Drop such records or check the completion text."
        )
    if max_length is not None:
        if n_prompt >= max_length:
            raise ValueError(
                f"max_length={max_length} truncates the whole completion of a record whose prompt has {n_prompt} "
                "tokens. Raise max_length or drop records with long prompts."
            )
        ids = ids[:max_length]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "prompt_mask": [True] * n_prompt + [False] * (len(ids) - n_prompt),
    }


def check_features(record: Mapping[str, Any]) -> None:
    """Raise if a tokenized record lacks ``input_ids`` or ``prompt_mask`` or has no prompt or no continuation."""
    missing = [f for f in ("input_ids", "prompt_mask") if f not in record]
    if missing:
        raise ValueError(
            f"A tokenized record needs input_ids and prompt_mask; it lacks {missing} (found {sorted(record)})."
        )
    n, prompt = len(record["input_ids"]), [bool(p) for p in record["prompt_mask"]]
    real = [bool(a) for a in record.get("attention_mask", [1] * n)]
    if len(prompt) != n or len(real) != n:
        raise ValueError(
            f"input_ids, attention_mask and prompt_mask differ in length ({n}, {len(real)}, {len(prompt)})."
        )
    if not any(prompt):
        raise ValueError("A tokenized record has no prompt token (prompt_mask is all False).")
    if not any(r and not p for r, p in zip(real, prompt)):
        raise ValueError("A tokenized record has no continuation token (prompt_mask is True on every real token).")


def _describe(dataset: Any) -> tuple[str, Mapping[str, Any]]:
    """The record layout of ``dataset`` ('features' or 'records') and its first record; raise on any other."""
    try:
        first = next(iter(dataset))
    except StopIteration:
        raise ValueError("The dataset is empty.") from None
    if not isinstance(first, Mapping):
        raise TypeError(f"Dataset items must be dicts (records), got {type(first).__name__}.")
    if "input_ids" in first and "prompt_mask" in first:
        return "features", first
    if all(f in first for f in RECORD_FIELDS):
        return "records", first
    raise ValueError(
        "Distillation data needs prompt-completion records (fields 'prompt' and 'completion') or tokenized records "
        f"(fields 'input_ids' and 'prompt_mask', optionally 'attention_mask'); found fields {sorted(first)}."
    )


def prepare_dataset(dataset: Any, tokenizer: Any = None, max_length: int | None = None, num_proc: int | None = None):
    """A dataset of ``input_ids``, ``attention_mask`` and ``prompt_mask`` from prompt-completion records.

    Args:
        dataset: a ``datasets.Dataset`` or ``IterableDataset``, or a list of dicts, of prompt-completion
            records or of records already tokenized (``input_ids``, ``prompt_mask``).
        tokenizer: needed for string and conversational records.
        max_length: keep at most this many tokens per record (from the start).
        num_proc: processes for ``datasets.map``.

    Returns:
        a ``datasets.Dataset`` (``IterableDataset`` for an iterable input) holding only the three features.
    """
    datasets = require("datasets", "Tokenizing prompt-completion datasets")

    if isinstance(dataset, list):
        dataset = datasets.Dataset.from_list(dataset)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"Got a dataset dict with splits {list(dataset)}; pass one split, e.g. dataset['train'].")
    layout, first = _describe(dataset)
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        if layout == "records":
            raise TypeError(
                f"Prompt-completion records must come as a datasets.Dataset, IterableDataset or list of dicts to be "
                f"tokenized; got {type(dataset).__name__}. A torch Dataset must yield tokenized records."
            )
        check_features(first)  # a torch Dataset of tokenized records is used as it is
        return dataset
    columns = dataset.column_names or list(first)  # an IterableDataset may not know its columns

    def tokenize(record: dict, index: int) -> dict:
        try:
            return features_from_record(record, tokenizer, max_length)
        except (TypeError, ValueError) as err:
            raise type(err)(f"Record {index}: {err.args[0] if err.args else err}") from err

    def complete(record: dict, index: int) -> dict:
        out = {"input_ids": list(record["input_ids"]), "prompt_mask": [bool(p) for p in record["prompt_mask"]]}
        out["attention_mask"] = list(record.get("attention_mask") or [1] * len(out["input_ids"]))
        if max_length is not None:
            if sum(out["prompt_mask"][:max_length]) == sum(out["attention_mask"][:max_length]):
                raise ValueError(f"Record {index}: max_length={max_length} truncates its whole continuation.")
            out = {k: v[:max_length] for k, v in out.items()}
        try:
            check_features(out)
        except ValueError as err:
            raise ValueError(f"Record {index}: {err}") from err
        return out

    kwargs: dict[str, Any] = {"with_indices": True, "remove_columns": columns}
    if isinstance(dataset, datasets.Dataset):
        kwargs["num_proc"] = num_proc
        kwargs["desc"] = "Tokenizing prompt-completion records" if layout == "records" else "Checking records"
    return dataset.map(tokenize if layout == "records" else complete, **kwargs)


def load_prompt_completion(
    path_or_name: str | os.PathLike,
    split: str = "train",
    tokenizer: Any = None,
    max_length: int | None = None,
    num_proc: int | None = None,
    **load_kwargs: Any,
):
    """Load prompt-completion records from a local JSON/JSONL file or a Hugging Face dataset and tokenize them.

    A path to an existing ``.json``/``.jsonl`` file loads with the ``json`` builder; anything else goes to
    ``datasets.load_dataset`` as a dataset name or folder. Extra keyword arguments go to ``load_dataset``.
    """
    datasets = require("datasets", "Tokenizing prompt-completion datasets")

    path = os.fspath(path_or_name)
    if os.path.isfile(path):
        if not path.endswith((".json", ".jsonl")):
            raise ValueError(f"Local data files must be JSON Lines (.jsonl) or JSON (.json); got {path}.")
        dataset = datasets.load_dataset("json", data_files=path, split=split, **load_kwargs)
    else:
        dataset = datasets.load_dataset(path, split=split, **load_kwargs)
    return prepare_dataset(dataset, tokenizer=tokenizer, max_length=max_length, num_proc=num_proc)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` counts them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class SplitBatch(NamedTuple):
    """A batch laid out as generation lays it out: left-padded prompts, then right-padded continuations."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P) long, 1 on real prompt tokens
    continuation_ids: torch.Tensor  # (B, C)
    continuation_mask: torch.Tensor  # (B, C) long, 1 on real continuation tokens

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(B, P + C)``: the mask of prompt and continuation together."""
        return torch.cat([self.prompt_mask, self.continuation_mask], dim=1)

    @property
    def continuation_positions(self) -> torch.Tensor:
        """``(B, C)`` position ids of the continuation tokens: after each row's real prompt tokens."""
        return position_ids_from(self.attention_mask)[:, self.prompt_ids.shape[1] :]


def split_prompt_continuation(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor, pad_token_id: int = 0
) -> SplitBatch:
    """Re-lay a batch of ``(B, S)`` sequences (any padding) as ``SplitBatch``: each row's prompt tokens left-padded
    to the longest prompt, its other real tokens right-padded to the longest continuation.

    A prompt can then run once, as a prefill into a KV cache, and the continuations on top of it, as in generation.
    """
    prompt_mask, real = prompt_mask.bool(), attention_mask.bool()
    continuation = real & ~prompt_mask
    n_prompt, n_continuation = prompt_mask.sum(1), continuation.sum(1)  # (B,)
    width_p, width_c = int(n_prompt.max()), int(n_continuation.max())
    batch = input_ids.shape[0]
    device = input_ids.device
    columns_p = torch.arange(width_p, device=device)
    columns_c = torch.arange(width_c, device=device)
    prompt_real = columns_p >= (width_p - n_prompt)[:, None]  # (B, P): left padding
    continuation_real = columns_c < n_continuation[:, None]  # (B, C): right padding
    prompt_ids = torch.full((batch, width_p), pad_token_id, dtype=input_ids.dtype, device=device)
    continuation_ids = torch.full((batch, width_c), pad_token_id, dtype=input_ids.dtype, device=device)
    prompt_ids[prompt_real] = input_ids[prompt_mask]  # row-major order keeps each row's tokens in order
    continuation_ids[continuation_real] = input_ids[continuation]
    return SplitBatch(prompt_ids, prompt_real.long(), continuation_ids, continuation_real.long())


@dataclass
class CapreseDataCollator:
    """Left-pads tokenized records into ``input_ids``, ``attention_mask`` (long) and ``prompt_mask`` (bool) tensors.

    Left padding puts every sequence's end at the same position, as in batched generation.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> CapreseDataCollator:
        """A collator padding with the tokenizer's pad token (its EOS token when it has no pad token)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
        return cls(pad_token_id=int(pad), pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        for record in features:
            missing = [f for f in ("input_ids", "prompt_mask") if f not in record]
            if missing:
                raise ValueError(
                    f"CapreseDataCollator needs input_ids and prompt_mask; a record lacks {missing} "
                    f"(found {sorted(record)}). Tokenize records with prepare_dataset first."
                )
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, width, dtype=torch.long)
        prompt_mask = torch.zeros(batch, width, dtype=torch.bool)
        for row, record in enumerate(features):
            n = len(record["input_ids"])
            input_ids[row, width - n :] = torch.as_tensor(record["input_ids"], dtype=torch.long)
            mask = record.get("attention_mask")
            attention_mask[row, width - n :] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
            prompt_mask[row, width - n :] = torch.as_tensor(record["prompt_mask"], dtype=torch.bool)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask}
