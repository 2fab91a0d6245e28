"""Math problems from a local JSONL file or a Hugging Face dataset split, with this project's dev/train split.

``datasets`` is imported only when a Hugging Face dataset is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..extras import require
from .prompts import INSTRUCTION, user_message

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
    datasets = require("datasets", "Reading a Hugging Face dataset")

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


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def load_problems(
    source: str | os.PathLike,
    *,
    split: str = "train",
    dev_size: int = 500,
    limit: int | None = None,
    question_field: str | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
    conversations: bool = False,
    need_answers: bool = False,
) -> list[dict[str, Any]]:
    """Math problems as ``{"id", "question", "answer"?}`` from a local JSONL file or a Hugging Face dataset.

    ``split`` picks from the records in file order: ``"dev"`` the last ``dev_size``, ``"train"`` all
    the others, ``"all"`` everything (the GSM8K convention of this project: the last 500 lines of its
    train file are the dev split); then ``limit`` keeps the first ones. ``id`` is the record's index in the
    source, stable across runs. The answer is the record's ``answer`` (or else ``solution``) field.

    Args:
        conversations: also accept conversational prompt-completion records (``prompt`` and ``completion``
            lists of chat messages, as ``caprese-peft synth`` writes them), returned as
            ``{"id", "prompt", "completion", "answer"?}`` with the record's own ``id`` where it has one.
        need_answers: raise for a record without an answer.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    records = read_records(source, hf_split, hf_config)
    if not records:
        raise ValueError(f"{source} holds no records.")
    first = records[0]
    if not isinstance(first, dict):
        raise ValueError(f"Records of {source} must be JSON objects, got {type(first).__name__}.")
    paired = conversations and "completion" in first and "prompt" in first and question_field is None
    field = "prompt" if paired else question_field or next((f for f in QUESTION_FIELDS if f in first), None)
    if field is None or field not in first:
        wanted = [question_field] if question_field else list(QUESTION_FIELDS)
        if conversations and not question_field:
            wanted.append("prompt + completion")
        raise ValueError(f"Records of {source} need a question field ({wanted}); found {sorted(first)}.")

    indexed = list(enumerate(records))
    if split != "all":
        if not 0 < dev_size < len(records):
            raise ValueError(
                f"dev_size must lie in [1, {len(records) - 1}] for the {len(records)} records of {source}, got "
                f"{dev_size}; or pass split='all' (--split all) to use every record."
            )
        indexed = indexed[-dev_size:] if split == "dev" else indexed[:-dev_size]
    problems = []
    for index, record in indexed[:limit]:
        answer_field = next((f for f in ANSWER_FIELDS if record.get(f) is not None), None)
        if answer_field is None and need_answers:
            raise ValueError(
                f"Record {index} of {source} has no answer to score accuracy against: it needs one of the fields "
                f"{list(ANSWER_FIELDS)} (a GSM8K solution ending in '#### n', or an expression such as "
                f"'\\boxed{{...}}'); found fields {sorted(record)}."
            )
        problem: dict[str, Any] = {"id": record.get("id", index) if paired else index}
        if paired:
            prompt, completion = record["prompt"], record["completion"]
            if not _is_messages(prompt) or not _is_messages(completion):
                raise ValueError(
                    f"Record {index} of {source}: evaluation generates through the chat template, so prompt and "
                    "completion must be lists of chat messages ({'role': ..., 'content': ...}) as `caprese-peft "
                    f"synth` writes them; got a {type(prompt).__name__} prompt and a {type(completion).__name__} "
                    "completion."
                )
            problem.update(prompt=list(prompt), completion=list(completion))
        else:
            question = record.get(field)
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"Record {index} of {source} has no text in {field!r}.")
            problem["question"] = question
        if answer_field is not None:
            problem["answer"] = str(record[answer_field])
        problems.append(problem)
    return problems


def load_eval_problems(
    source: str | os.PathLike,
    *,
    split: str = "dev",
    dev_size: int = 500,
    limit: int | None = None,
    question_field: str | None = None,
    instruction: str | None = INSTRUCTION,
    hf_split: str = "train",
    hf_config: str | None = None,
) -> list[dict[str, Any]]:
    """Problems to evaluate on as ``{"id", "prompt", "answer", "completion"?}``: ``load_problems`` with answers.

    Two record layouts are accepted: math problems (a ``question``/``problem`` field, turned into the chat
    prompt ``question + "\\n" + instruction`` as ``caprese-peft synth`` does) and conversational
    prompt-completion records (``prompt`` and ``completion`` lists of chat messages, e.g. written by
    ``caprese-peft synth``), whose completions become the continuations of the teacher-forced KL. Either
    way every record needs an ``answer`` (or ``solution``) to score accuracy against: a GSM8K solution
    ending in ``#### n`` or an expression such as ``\\boxed{...}``.
    """
    problems = load_problems(
        source,
        split=split,
        dev_size=dev_size,
        limit=limit,
        question_field=question_field,
        hf_split=hf_split,
        hf_config=hf_config,
        conversations=True,
        need_answers=True,
    )
    return [_chat_problem(problem, instruction) for problem in problems]


def _chat_problem(problem: dict[str, Any], instruction: str | None) -> dict[str, Any]:
    """A math problem with its question as the chat prompt ``caprese-peft synth`` writes; a conversation as it is."""
    if "question" not in problem:
        return problem
    return {"id": problem["id"], "prompt": user_message(problem["question"], instruction), "answer": problem["answer"]}


__all__ = ["ANSWER_FIELDS", "QUESTION_FIELDS", "SPLITS", "load_eval_problems", "load_problems", "read_records"]
