"""Synthetic distillation data: the original model answers math problems, written as prompt-completion JSONL."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

INSTRUCTION = "Please reason step by step."
QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution")
SPLITS = ("train", "dev", "all")


def read_records(
    source: str | os.PathLike, hf_split: str = "train", hf_config: str | None = None
) -> list[dict[str, Any]]:
    """Records of a local JSONL file, or of a Hugging Face dataset split (``datasets`` is imported only then)."""
    path = Path(source)
    if path.is_file():
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON: {error.msg}.") from None
        return records
    if path.suffix in (".jsonl", ".json") or path.is_absolute() or str(source).startswith("."):
        raise FileNotFoundError(f"No data file at {path} (expected a JSONL file or a Hugging Face dataset name).")
    import datasets

    try:
        return list(datasets.load_dataset(str(source), hf_config, split=hf_split))
    except FileNotFoundError as error:  # datasets' DatasetNotFoundError among them
        raise FileNotFoundError(
            f"{source!r} is neither a local JSONL file nor a Hugging Face dataset that can be found ({error})."
        ) from error
    except Exception as error:  # a missing config name, an unknown split, no network, ...
        raise ValueError(
            f"Cannot load the Hugging Face dataset {source!r}: {type(error).__name__}: {error}"
        ) from error


def load_problems(
    source: str | os.PathLike,
    *,
    split: str = "train",
    dev_size: int = 500,
    limit: int | None = None,
    question_field: str | None = None,
    hf_split: str = "train",
) -> list[dict[str, Any]]:
    """Math problems as ``{"id", "question", "answer"?}`` from a local JSONL file or a Hugging Face dataset.

    ``split`` picks from the records in file order: ``"dev"`` the last ``dev_size``, ``"train"`` all
    the others, ``"all"`` everything (the GSM8K convention of this project: the last 500 lines of its
    train file are the dev split). ``id`` is the record's index in the source, stable across runs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    records = read_records(source, hf_split)
    if not records:
        raise ValueError(f"{source} holds no records.")

    field = question_field or next((f for f in QUESTION_FIELDS if f in records[0]), None)
    if field is None or field not in records[0]:
        wanted = [question_field] if question_field else list(QUESTION_FIELDS)
        raise ValueError(f"Records of {source} need a question field ({wanted}); found {sorted(records[0])}.")
    answer_field = next((f for f in ANSWER_FIELDS if f in records[0]), None)

    indexed = list(enumerate(records))
    if split != "all":
        if not 0 < dev_size < len(records):
            raise ValueError(
                f"dev_size must lie in [1, {len(records) - 1}] for {len(records)} records, got {dev_size}."
            )
        indexed = indexed[-dev_size:] if split == "dev" else indexed[:-dev_size]
    if limit is not None:
        indexed = indexed[:limit]
    problems = []
    for index, record in indexed:
        question = record.get(field)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"Record {index} of {source} has no text in {field!r}.")
        problem = {"id": index, "question": question}
        if answer_field and record.get(answer_field) is not None:
            problem["answer"] = str(record[answer_field])
        problems.append(problem)
    return problems


def user_message(question: str, instruction: str | None = INSTRUCTION) -> list[dict[str, str]]:
    """The chat prompt of one problem: the question, then the instruction on its own line."""
    content = f"{question.strip()}\n{instruction}" if instruction else question.strip()
    return [{"role": "user", "content": content}]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def completed_ids(path: str | os.PathLike) -> set[int]:
    """Ids already written to a synthesis output (to resume); ignores a truncated last line."""
    path = Path(path)
    if not path.is_file():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def chat_inputs(tokenizer: Any, prompts: Sequence[list[dict[str, str]]], device: Any) -> tuple[dict, int]:
    """A left-padded batch of chat ``prompts`` with the generation prompt added, and the pad token id.

    Left padding (and EOS as pad when there is none) for this call only: the caller's tokenizer stays as it was.
    """
    saved = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        inputs = tokenizer.apply_chat_template(
            list(prompts), add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        ).to(device)
        return inputs, tokenizer.pad_token_id
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved


def split_responses(tokenizer: Any, new_tokens: torch.Tensor) -> list[tuple[str, list[int]]]:
    """``(text, token_ids)`` per row of generated ``new_tokens (B, n)``, each cut after its first EOS token."""
    results = []
    for row in new_tokens:
        ends = (row == tokenizer.eos_token_id).nonzero()
        n_tokens = int(ends[0]) + 1 if len(ends) else len(row)
        ids = row[:n_tokens].tolist()
        results.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), ids))
    return results


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 256,
    **generate_kwargs: Any,
) -> list[tuple[str, list[int]]]:
    """Generate from a batch of chat prompts (left-padded); returns ``(text, token_ids)`` per prompt.

    The token ids run up to and including the first EOS token.
    """
    inputs, pad_token_id = chat_inputs(tokenizer, prompts, model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, **generate_kwargs)
    return split_responses(tokenizer, out[:, inputs["input_ids"].shape[1] :])


def synthesize(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    output: str | os.PathLike,
    *,
    instruction: str | None = INSTRUCTION,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 0.7,
    progress: bool = True,
) -> Path:
    """Have ``model`` answer ``problems`` and append prompt-completion records to ``output`` (JSONL).

    Records are conversational (``prompt``: the user message, ``completion``: the assistant message),
    the format ``CapreseTrainer`` takes as it is, plus ``id``, ``answer`` and ``completion_tokens``.
    Problems already in ``output`` are skipped, so an interrupted run resumes where it stopped. With a
    PEFT model the adapter is disabled: the data come from the original model.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; synthesis writes chat prompts through it.")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = completed_ids(output)
    todo = [p for p in problems if p["id"] not in done]
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    disable = getattr(model, "disable_adapter", None)

    empty = 0
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="Synthesizing", disable=not progress)
    with open(output, "a") as sink:
        for batch in _batches(todo, batch_size):
            prompts = [user_message(p["question"], instruction) for p in batch]
            if disable is not None:
                with disable():
                    responses = generate_responses(
                        model, tokenizer, prompts, max_new_tokens=max_new_tokens, **sampling
                    )
            else:
                responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **sampling)
            for problem, prompt, (text, ids) in zip(batch, prompts, responses):
                if not text:
                    empty += 1  # nothing to distil from; a resumed run tries it again
                    continue
                record = {
                    "id": problem["id"],
                    "prompt": prompt,
                    "completion": [{"role": "assistant", "content": text}],
                    "completion_tokens": len(ids),
                }
                if "answer" in problem:
                    record["answer"] = problem["answer"]
                sink.write(json.dumps(record) + "\n")
            sink.flush()  # a stop loses at most the batch in flight
            bar.update(len(batch))
    bar.close()
    if empty:
        warnings.warn(f"{empty} responses were empty and were not written to {output}.", stacklevel=2)
    return output
