"""Batched generation from chat prompts: ``(text, token_ids)`` per prompt, cut after the first EOS token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .prompts import chat_inputs


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of ``size`` items each (the last one may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


def greedy_generations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    dense: bool = False,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
    fast: bool = False,
) -> list[tuple[str, list[int]]]:
    """Greedy ``(text, token_ids)`` for chat ``prompts`` in batches; ``dense=True`` disables the adapter.

    Batches are formed identically for every call, so dense and Caprese runs see the same padding.
    ``fast=True`` decodes with ``caprese_peft.FastDecoder`` (Llama, Mistral, Qwen2 and Qwen3 models, no
    reselection) instead of ``model.generate``, with less work per step: the same computation in another order,
    so a sparse backbone can part from ``generate`` where an activation sits next to its threshold.
    """
    from tqdm.auto import tqdm

    decoder = None
    if fast:
        from ..fast_decode import FastDecoder

        decoder = FastDecoder(model, mode="dense" if dense else None)
    results: list[tuple[str, list[int]]] = []
    desc = "Greedy (dense)" if dense else "Greedy (Caprese)"
    for batch in tqdm(list(batches(prompts, batch_size)), desc=desc, disable=not progress):
        if decoder is not None:
            inputs, pad_token_id = chat_inputs(tokenizer, batch, model.device)
            out = decoder.generate(
                inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens, pad_token_id=pad_token_id
            )
            results += split_responses(tokenizer, out[:, inputs["input_ids"].shape[1] :])
            continue
        with model.disable_adapter() if dense else nullcontext():
            results += generate_responses(model, tokenizer, batch, max_new_tokens=max_new_tokens, do_sample=False)
    return results


__all__ = ["batches", "generate_responses", "greedy_generations", "split_responses"]
