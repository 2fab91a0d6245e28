"""Teacher-forced KL of a Caprese model against its own dense original: in one pass, or token by token."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..data.features import CapreseDataCollator, position_ids_from, split_prompt_continuation
from ..data.generation import batches
from ..state import cache_argument, teacher_forcing


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of ``logits`` (B, S, V) predicting ``ids[:, 1:]`` where ``targets`` (B, S - 1) is True."""
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return float((loss * targets).sum())


@torch.no_grad()
def continuation_kl(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 4,
    progress: bool = True,
    teacher_cache: dict[int, Any] | None = None,
) -> dict[str, float]:
    """Mean per-token KL(dense || Caprese) and both perplexities on the continuation tokens of ``dataset``.

    ``dataset`` holds tokenized prompt-completion records (``input_ids``, ``prompt_mask``), e.g. from
    ``caprese_peft.data.load_prompt_completion``. The Caprese model runs teacher-forced as it
    would generate (dense prompt, sparse + low-rank continuation); the dense model is the same PEFT model
    with its adapter disabled. Every position holding a continuation token counts, predicting the next.

    Args:
        teacher_cache: a dict this call fills with the dense model's logits on the continuation positions
            (by batch) and reuses when it already holds them: pass the same dict to score several adapters of
            one base model on the same ``dataset`` and ``batch_size`` with a single dense pass. It holds
            ``tokens x vocabulary`` floats, so keep it for small evaluation sets.
    """
    from tqdm.auto import tqdm

    from .metrics import token_kl

    collate = CapreseDataCollator(pad_token_id=0)
    records = [dataset[i] for i in range(len(dataset))]
    kl_sum, tokens, scored = 0.0, 0, 0
    nll = {"dense": 0.0, "model": 0.0}
    grouped = list(batches(records, batch_size))
    for index, batch in enumerate(tqdm(grouped, desc="Teacher-forced KL", disable=not progress)):
        inputs = collate(batch)
        ids, mask = inputs["input_ids"].to(model.device), inputs["attention_mask"].to(model.device)
        prompt_mask = inputs["prompt_mask"].to(model.device)
        continuation = mask.bool() & ~prompt_mask  # (B, S); left padding: continuations end every row
        # logits only where they are read: the continuation positions and the one before (perplexity)
        keep = min(ids.shape[1], int(continuation.sum(1).max()) + 1)
        forward = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": position_ids_from(mask),
            "use_cache": False,
            "logits_to_keep": keep,
        }
        ids_kept, continuation = ids[:, -keep:], continuation[:, -keep:]
        targets = continuation[:, 1:]  # position t predicts token t + 1: continuation tokens with a predecessor

        cached = teacher_cache.get(index) if teacher_cache is not None else None
        if cached is not None and not torch.equal(cached["input_ids"], ids.cpu()):
            raise ValueError(
                "teacher_cache holds the dense logits of other records: use one cache per dataset and batch size."
            )
        if cached is None:
            with model.disable_adapter():
                dense = model(**forward).logits.float()  # (B, keep, V)
            cached = {"input_ids": ids.cpu(), "logits": dense[continuation], "nll": _nll_sum(dense, ids_kept, targets)}
            if teacher_cache is not None:
                teacher_cache[index] = cached
            del dense
        with teacher_forcing(model, prompt_mask, mask):
            student = model(**forward).logits.float()
        selected = student[continuation]  # (tokens, V)
        kl_sum += float(token_kl(cached["logits"][None], selected[None], torch.ones(1, len(selected))).sum())
        tokens += len(selected)
        nll["dense"] += cached["nll"]
        nll["model"] += _nll_sum(student, ids_kept, targets)
        scored += int(targets.sum())
    if tokens == 0:
        raise ValueError("The dataset has no continuation tokens to compare on.")
    return {
        "kl": kl_sum / tokens,
        "tokens": tokens,
        "ppl_dense": math.exp(nll["dense"] / max(1, scored)),
        "ppl_model": math.exp(nll["model"] / max(1, scored)),
    }


@torch.no_grad()
def stepwise_continuation_kl(
    model: nn.Module, dataset: Any, batch_size: int = 16, progress: bool = True
) -> dict[str, float]:
    """``continuation_kl``, but the Caprese model decodes the continuation one token at a time through its KV cache.

    This is generation exactly (teacher tokens fed back instead of sampled ones), so it also measures what a
    single teacher-forced pass cannot reproduce, such as GRIFFIN reselection rewriting past KV entries. The
    dense reference is one pass of the model with its adapter disabled over the same layout.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from .metrics import token_kl

    cache_name = cache_argument(model)
    collate = CapreseDataCollator(pad_token_id=0)
    records = [dataset[i] for i in range(len(dataset))]
    kl_sum, tokens = 0.0, 0
    for batch in tqdm(list(batches(records, batch_size)), desc="Stepwise KL", disable=not progress):
        inputs = {k: v.to(model.device) for k, v in collate(batch).items()}
        split = split_prompt_continuation(inputs["input_ids"], inputs["attention_mask"], inputs["prompt_mask"])
        prompt_ids, prompt_mask, cont_ids, cont_mask = split
        ids, mask = torch.cat([prompt_ids, cont_ids], dim=1), torch.cat([prompt_mask, cont_mask], dim=1)
        positions = position_ids_from(mask)
        width_p = prompt_ids.shape[1]
        with model.disable_adapter():
            dense = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        dense = dense[:, width_p:].float()  # (B, C, V): the logits after each continuation token
        cache, student = DynamicCache(config=model.config), []
        prefill = {"attention_mask": prompt_mask, "position_ids": positions[:, :width_p], cache_name: cache}
        model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **prefill)
        for t in range(cont_ids.shape[1]):
            end = width_p + t + 1
            out = model(
                input_ids=cont_ids[:, t : t + 1],
                attention_mask=mask[:, :end],
                position_ids=positions[:, end - 1 : end],
                use_cache=True,
                **{cache_name: cache},
            )
            student.append(out.logits[:, -1:].float())
        kl_sum += float(token_kl(dense, torch.cat(student, dim=1), cont_mask.bool()).sum())
        tokens += int(cont_mask.sum())
    if tokens == 0:
        raise ValueError("The dataset has no continuation tokens to compare on.")
    return {"kl": kl_sum / tokens, "tokens": tokens}
