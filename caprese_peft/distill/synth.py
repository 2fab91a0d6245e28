"""Synthetic distillation data: the original model answers math problems, written as prompt-completion JSONL."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..data.generation import batches, generate_responses
from ..data.prompts import INSTRUCTION, user_message


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
        for batch in batches(todo, batch_size):
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
