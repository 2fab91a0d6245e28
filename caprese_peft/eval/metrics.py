"""Evaluation statistics as pure functions: distribution distances, agreement, answer checking, pass@k, lengths."""

from __future__ import annotations

import math
import re
import statistics
import threading
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..extras import require


def _check_logits(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"Teacher and student logits differ in shape: {tuple(teacher_logits.shape)} vs "
            f"{tuple(student_logits.shape)}; both must be (batch, seq, vocab)."
        )
    if teacher_logits.dim() != 3:
        raise ValueError(f"Logits must be (batch, seq, vocab), got shape {tuple(teacher_logits.shape)}.")
    if mask.shape != teacher_logits.shape[:-1]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(teacher_logits.shape[:-1])}.")
    return mask.to(device=teacher_logits.device, dtype=torch.bool)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(teacher || student) = sum_v p_t (log p_t - log p_s)`` in fp32, ``(batch, seq)``.

    Args:
        teacher_logits: ``(batch, seq, vocab)``, the reference distribution ``p_t``.
        student_logits: ``(batch, seq, vocab)``, the approximation ``p_s``.
        mask: ``(batch, seq)``, True (or 1) on the tokens to score; the result is 0 elsewhere.

    Vocabulary entries the teacher gives probability 0 (logit ``-inf``) contribute 0, as in the
    definition; padded positions may hold any value, non-finite included, without leaking in.
    """
    mask = _check_logits(teacher_logits, student_logits, mask)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)  # (B, S, V)
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    p_t = log_p_t.exp()
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    kl = terms.sum(dim=-1)  # (B, S)
    return torch.where(mask, kl, torch.zeros_like(kl))


def mean_token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """``token_kl`` averaged over the tokens where ``mask`` is True."""
    kl = token_kl(teacher_logits, student_logits, mask)
    count = int(mask.bool().sum())
    if count == 0:
        raise ValueError("mask selects no token: there is nothing to average the KL divergence over.")
    return float(kl.sum()) / count


def perplexity(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the masked tokens, in fp32.

    ``logits[b, t]`` is scored against ``labels[b, t]``: the caller aligns them (for a causal LM,
    ``logits[:, :-1]`` with ``input_ids[:, 1:]``). Labels outside the mask are ignored, so ``-100``
    padding is fine there.

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` token ids.
        mask: ``(batch, seq)``, True on the tokens to score.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"Expected logits (batch, seq, vocab) and labels (batch, seq), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if mask.shape != labels.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(labels.shape)}.")
    mask = mask.to(device=logits.device, dtype=torch.bool)
    if not bool(mask.any()):
        raise ValueError("mask selects no token: perplexity is undefined.")
    nll = F.cross_entropy(logits[mask].float(), labels.to(logits.device)[mask], reduction="mean")
    return math.exp(float(nll))


def _as_list(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"Expected a 1D sequence of token ids, got a tensor of shape {tuple(tokens.shape)}.")
        return tokens.tolist()
    return [int(t) for t in tokens]


def agreement_length(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Number of leading tokens ``candidate`` shares with ``reference`` before their first difference.

    When one sequence is a prefix of the other, it is the length of the shorter one.
    Accepts lists of ints or 1D tensors.
    """
    ref, cand = _as_list(reference), _as_list(candidate)
    for i, (a, b) in enumerate(zip(ref, cand)):
        if a != b:
            return i
    return min(len(ref), len(cand))


def agreement_lengths(references: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> list[int]:
    """``agreement_length`` of each (reference, candidate) pair, e.g. greedy continuations of a batch of prompts."""
    if len(references) != len(candidates):
        raise ValueError(f"Got {len(references)} references but {len(candidates)} candidates; pair them one to one.")
    return [agreement_length(ref, cand) for ref, cand in zip(references, candidates)]


_GSM8K_ANSWER = re.compile(r"####\s*([^\n]*)")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution: what follows the last ``####``, without commas, ``$`` or a final dot.

    ``"...\\n#### 1,250"`` gives ``"1250"``. None when ``text`` is not a string, has no ``####``,
    or nothing follows it.
    """
    if not isinstance(text, str):
        return None
    found = _GSM8K_ANSWER.findall(text)
    if not found:
        return None
    answer = found[-1].replace(",", "").replace("$", "").strip().rstrip(".").strip()
    return answer or None


def check_answer(response: str, reference: str) -> bool:
    """Whether ``response`` reaches the answer of ``reference``, judged by math_verify; never raises.

    The reference is either a GSM8K solution (the number after its last ``####`` is the answer) or
    any expression math_verify parses, e.g. ``\\boxed{\\frac{1}{2}}`` or ``72``.

    The response is read by ``math_verify.parse`` (version 0.9), which tries anchored patterns
    before unanchored ones and, within one priority, takes the rightmost match: first
    ``"final answer is X. I hope"``, then ``\\boxed{X}`` or ``"final answer ... is X"``, then
    ``"answer: X"``, then ``"answer ... X"`` (the number after the last ``=`` within 100 characters
    of "answer", else the first number within 50), and failing all of these the last number or
    expression in the text. So ``"... so she sold 72 clips."`` counts as 72 and ``"The answer is 72.
    She sold 48 and 24."`` as 72, but ``"She sold 72 clips, 24 of them in May."`` counts as 24 and
    ``"The answer is 72. Check: 72 - 24 = 48."`` as 48. Commas in numbers (``1,000``) and currency
    signs are understood; equivalent forms (``0.5`` and ``\\frac{1}{2}``) match.

    Outside the main thread math_verify's signal-based timeouts cannot run, so they are switched off there.
    """
    if not isinstance(response, str) or not isinstance(reference, str):
        return False
    # outside the try: without math_verify every answer would silently count as wrong
    math_verify = require("math_verify", "Checking answers")
    parse, verify = math_verify.parse, math_verify.verify
    try:
        # math_verify times out with signal.alarm, which only the main thread may use
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold_text = extract_gsm8k_answer(reference) if "####" in reference else reference
        if not gold_text:
            return False
        gold = parse(gold_text, parsing_timeout=timeout)
        pred = parse(response, parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # an unparseable answer is a wrong answer, whatever math_verify or sympy raised
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n - c, k) / C(n, k)``.

    Computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which neither overflows nor loses
    precision for large ``n`` (Chen et al., 2021).
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c and k must be ints, got {n!r}, {c!r}, {k!r}.")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must lie in [0, n={n}], got {c}.")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n={n}]: pass@k needs at least k samples, got k={k}.")
    if n - c < k:
        return 1.0  # every choice of k samples holds a correct one
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def coverage_curve(correct: list[list[bool]], ks: Iterable[int]) -> list[float]:
    """Coverage (pass@k averaged over problems) for each k in ``ks``.

    ``correct[p]`` holds one bool per sample drawn for problem ``p``; problems may have different
    numbers of samples but each needs at least ``max(ks)``.
    """
    if not correct:
        raise ValueError("correct is empty: coverage needs at least one problem.")
    ks = list(ks)
    counts = [(len(row), sum(bool(x) for x in row)) for row in correct]
    fewest = min(n for n, _ in counts)
    too_big = [k for k in ks if k > fewest]
    if too_big:
        raise ValueError(f"k={too_big} exceed the {fewest} samples of the smallest pool; use k <= {fewest}.")
    return [sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    # linear interpolation between closest ranks, numpy's default
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def length_summary(lengths: Sequence[int]) -> dict:
    """``{"mean", "median", "p90", "max", "count"}`` of response lengths (p90 interpolates linearly, as numpy)."""
    values = sorted(lengths)
    if not values:
        raise ValueError("lengths is empty: there is nothing to summarise.")
    return {
        "mean": statistics.fmean(values),
        "median": float(statistics.median(values)),
        "p90": float(_percentile(values, 0.9)),
        "max": values[-1],
        "count": len(values),
    }
