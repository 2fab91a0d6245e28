"""Measured latency of a model as it runs now: time to first token and to each next token, and the device's name."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_latency(
    model: nn.Module, tokenizer: Any, prompt: list[dict[str, str]], *, new_tokens: int = 32, repeats: int = 3
) -> dict[str, float]:
    """Time to first token and to each next token (ms) for one chat prompt at batch size 1, as run now.

    TTFT is one forward over the prompt (the prefill); TTNT is ``(time of generate(new_tokens) - TTFT) /
    (new_tokens - 1)``, the mean decode step. Medians over ``repeats`` runs after one warm-up run.
    """
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"new_tokens must be >= 2 and repeats >= 1, got {new_tokens} and {repeats}.")
    device = model.device
    inputs = tokenizer.apply_chat_template(
        [prompt], add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    ).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prefill() -> None:
        model(**inputs, logits_to_keep=1)  # generate's prefill, which needs the last position's logits only

    def generate() -> None:
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )

    prefill()  # warm-up: allocations, lazy initialisation
    generate()
    ttft = statistics.median(_timed(prefill, device) for _ in range(repeats))
    total = statistics.median(_timed(generate, device) for _ in range(repeats))
    return {
        "ttft_ms": 1e3 * ttft,
        "ttnt_ms": 1e3 * (total - ttft) / (new_tokens - 1),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (n threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'' if threads == 1 else 's'})"


__all__ = ["device_name", "measure_latency"]
