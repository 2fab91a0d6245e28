"""Chat prompts: a problem's user message, and a left-padded batch of chat prompts ready to generate from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INSTRUCTION = "Please reason step by step."


def user_message(question: str, instruction: str | None = INSTRUCTION) -> list[dict[str, str]]:
    """The chat prompt of one problem: the question, then the instruction on its own line."""
    content = f"{question.strip()}\n{instruction}" if instruction else question.strip()
    return [{"role": "user", "content": content}]


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


__all__ = ["INSTRUCTION", "chat_inputs", "user_message"]
