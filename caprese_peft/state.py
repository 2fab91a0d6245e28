"""Tells each forward pass apart: prompt (prefill), one generated token (decode), or teacher forcing.

A forward pre-hook on the wrapped transformers model reads the generation state (the KV cache
and the attention mask it is called with) and publishes a ``Step`` that every Caprese layer reads.
The decision never rests on ``seq_len > 1``: a forward is a prefill when the cache holds no
tokens yet and a decode step when it does.
"""

from __future__ import annotations

import enum
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PREFILL_TRAINS_NOTHING = (
    "This forward runs its input as a prompt (a dense prefill), so the Caprese factors L and R get no gradient from "
    "it and a loss on its output cannot train them. Distill them with caprese_peft.CapreseTrainer, or run the forward "
    "inside caprese_peft.teacher_forcing(model, prompt_mask, attention_mask), where the tokens after the prompt run "
    "the sparse block plus x @ L @ R as in generation."
)
# transformers 5.x calls the KV cache argument `cache`; earlier releases call it `past_key_values`
_CACHE_KWARGS = ("cache", "past_key_values")


class Phase(enum.Enum):
    PREFILL = "prefill"  # dense FF on every token; backbone statistics from the real prompt tokens
    DECODE = "decode"  # sparse FF + low-rank correction, statistics from the last prefill
    TEACHER_FORCED = "teacher_forced"  # prompt tokens as prefill, the rest as decode, in one pass
    OBSERVED = "observed"  # dense outputs everywhere; each layer shows an observer what its backbone keeps
    RESELECT = "reselect"  # the tokens decoded since the last reselection, rerun dense; statistics updated


@dataclass
class Step:
    phase: Phase
    token_mask: torch.Tensor  # (batch, seq) bool: prompt tokens that feed the statistics
    sparse_mask: torch.Tensor | None = None  # (batch, seq) bool: tokens run sparse (teacher forcing)
    generation: int = 0  # counts prefills, so a decode step never reads statistics of another prompt
    observe: Callable[[Any], None] | None = None  # OBSERVED: called with each layer's caprese_peft.Observation


def cache_argument(model: nn.Module) -> str:
    """The name under which ``forward`` of ``model`` (a transformers or PEFT model) takes the KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return next((name for name in _CACHE_KWARGS if name in parameters), _CACHE_KWARGS[-1])


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple of (key, value) per layer
    raise TypeError(f"Caprese cannot read the length of a KV cache of type {type(cache).__name__}.")


class GenerationState:
    """The step of the forward pass in flight, shared by the Caprese layers of one model."""

    def __init__(
        self,
        reselect_every: Callable[[], int | None] | None = None,
        trains_factors: Callable[[], bool] | None = None,
    ) -> None:
        self.step: Step | None = None
        self.generation = 0
        self.batch_size: int | None = None
        self._forced: tuple | None = None  # (phase, prompt_mask, sparse_mask, observe)
        # the reselection interval of the adapter in use (None: never reselect), asked at every decode step
        self.reselect_every = reselect_every or (lambda: None)
        # whether the running adapter's L and R require gradients: a prefill with grad mode on then warns
        self.trains_factors = trains_factors or (lambda: False)
        self._window: list[torch.Tensor] = []  # (batch, 1) ids decoded sparse since the last prefill or reselection
        # inside generate: None before its first forward, then the prompt mask (batch, P) of its prefill
        self._generating: list[torch.Tensor | None] = []
        self._continuing = False  # several tokens on a filled cache run sparse (distillation; see `continuation`)

    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Install the hook that sets ``step`` before each forward of ``model``.

        The step outlives the forward on purpose: activation checkpointing recomputes the layers
        during backward, and they must see the step they ran with.
        """
        return [model.register_forward_pre_hook(self._before_forward, with_kwargs=True)]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("Caprese needs `input_ids` or `inputs_embeds` to tell prompt tokens from generated ones.")
        batch, seq = tokens.shape[:2]
        device = tokens.device

        if self._forced is not None:
            self.step = self._teacher_forced_step(batch, seq)
            return

        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        past = _cache_length(cache)
        if past == 0 and self._generating and self._generating[-1] is not None:
            self.step = self._uncached_step(batch, seq, kwargs.get("attention_mask"), device)
            return
        if past == 0:
            self.generation += 1
            self.batch_size = batch
            self._window = []
            self.step = Step(Phase.PREFILL, self._prompt_mask(kwargs.get("attention_mask"), batch, seq, device),
                             generation=self.generation)  # fmt: skip
            if self._generating:
                self._generating[-1] = self.step.token_mask
            elif torch.is_grad_enabled() and self.trains_factors():
                warnings.warn(PREFILL_TRAINS_NOTHING, stacklevel=2)
            return
        if self._continuing:
            if batch != self.batch_size:
                raise ValueError(f"A continuation of batch size {batch} follows a prompt batch of {self.batch_size}.")
            self.step = Step(Phase.DECODE, torch.ones(batch, seq, dtype=torch.bool, device=device),
                             generation=self.generation)  # fmt: skip
            return None
        if seq != 1:
            raise NotImplementedError(
                f"Caprese decodes one generated token per forward, but got {seq} new tokens on top of a KV cache of "
                f"{past}. Assisted or speculative decoding and continuing from a pre-filled cache are not supported; "
                "generate from the full prompt with an empty cache instead."
            )
        if batch != self.batch_size:
            raise ValueError(
                f"Decode step with batch size {batch}, but the last prompt had batch size {self.batch_size}: "
                "Caprese keeps backbone statistics per sequence of the prompt batch."
            )
        interval = self.reselect_every()
        if interval is not None:
            self._window.append(tokens)
            if len(self._window) >= interval:
                return self._reselect(cache, past, args, kwargs)
        self.step = Step(Phase.DECODE, torch.ones(batch, seq, dtype=torch.bool, device=device),
                         generation=self.generation)  # fmt: skip
        return None

    def _reselect(self, cache: Any, past: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Turn this decode step into a dense rerun of every token decoded since the last reselection (appendix E).

        The sparse KV entries of those tokens are dropped from the cache and recomputed densely in this
        forward, whose last position is the current token: its logits are the dense model's. Every
        Caprese layer adds the rerun tokens' statistics to the prompt's and reselects its neurons.
        """
        positional = kwargs.get("input_ids") is None
        if positional and not (args and torch.is_tensor(args[0]) and not args[0].is_floating_point()):
            raise NotImplementedError(
                "Reselection reruns generated token ids, so it needs `input_ids`, not embeddings."
            )
        window = torch.cat(self._window, dim=1)  # (batch, G), the current token last
        self._window = []
        rerun = window.shape[1] - 1
        if rerun:
            if not hasattr(cache, "crop"):
                raise TypeError(f"Reselection rewrites KV entries, which a {type(cache).__name__} does not allow.")
            try:
                cache.crop(-rerun)  # negative: drop the last `rerun` tokens (every transformers 4.x and 5.x)
            except (RuntimeError, ValueError) as error:
                raise RuntimeError(
                    f"Reselection could not drop the last {rerun} entries of the KV cache ({error}). Sliding-window "
                    "layers that have filled their window cannot roll back; reselect more often than the window size."
                ) from error
            offsets = torch.arange(-rerun, 1, device=window.device)  # (G,)
            for name in ("position_ids", "cache_position"):
                value = kwargs.get(name)
                if value is not None:
                    kwargs[name] = value[..., -1:] + offsets.to(value.dtype)
            if positional:
                args = (window, *args[1:])
            else:
                kwargs["input_ids"] = window
        mask = torch.ones(window.shape, dtype=torch.bool, device=window.device)
        self.step = Step(Phase.RESELECT, mask, generation=self.generation)
        return args, kwargs

    def _uncached_step(self, batch: int, seq: int, attention_mask: torch.Tensor | None, device) -> Step:
        """A step of ``generate(use_cache=False)``: the prompt and every token generated so far, run again.

        It runs as teacher forcing: the prompt dense (statistics from it, as in its prefill), the generated tokens
        sparse plus the correction, which are the values generation with a KV cache computes.
        """
        prompt = self._generating[-1]  # (batch, P)
        if self.reselect_every() is not None:
            raise NotImplementedError(
                "Reselection (reselect_every) reruns tokens through the KV cache, so it needs generate(use_cache=True)."
            )
        if batch != prompt.shape[0] or seq <= prompt.shape[1]:
            raise ValueError(
                f"generate(use_cache=False) fed inputs of shape {(batch, seq)} after a prompt of shape "
                f"{tuple(prompt.shape)}; Caprese expects the prompt followed by the tokens generated so far."
            )
        prompt_mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        prompt_mask[:, : prompt.shape[1]] = prompt
        real = self._prompt_mask(attention_mask, batch, seq, device)
        return Step(Phase.TEACHER_FORCED, prompt_mask, sparse_mask=real & ~prompt_mask, generation=self.generation)

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Mark one ``generate`` call: its first forward is the prefill, and any later forward without a KV cache
        (``use_cache=False`` recomputes the whole sequence at every step) runs the generated tokens sparse."""
        self._generating.append(None)
        try:
            yield
        finally:
            self._generating.pop()

    @staticmethod
    def _prompt_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2:
            raise ValueError(
                f"Caprese needs a 2D (batch, seq) attention mask during prefill to keep padding out of the backbone "
                f"statistics, got shape {tuple(attention_mask.shape)}."
            )
        return attention_mask[:, -seq:].to(device=device, dtype=torch.bool)

    def _teacher_forced_step(self, batch: int, seq: int) -> Step:
        phase, prompt_mask, sparse_mask, observe = self._forced
        if prompt_mask.shape != (batch, seq):
            raise ValueError(
                f"Got a prompt mask of shape {tuple(prompt_mask.shape)} for inputs of shape {(batch, seq)}."
            )
        return Step(phase, prompt_mask, sparse_mask=sparse_mask, observe=observe)

    @contextmanager
    def forced(
        self,
        phase: Phase,
        prompt_mask: torch.Tensor,
        sparse_mask: torch.Tensor,
        observe: Callable[[Any], None] | None = None,
    ) -> Iterator[None]:
        previous = self._forced
        self._forced = (phase, prompt_mask, sparse_mask, observe)
        try:
            yield
        finally:
            self._forced = previous


def find_state(model: nn.Module) -> GenerationState:
    """The ``GenerationState`` of a PEFT model, its ``CapreseModel``, or the base model it wraps."""
    for module in (model, getattr(model, "base_model", None)):
        state = getattr(module, "caprese_state", None)
        if isinstance(state, GenerationState):
            return state
    raise ValueError(f"{type(model).__name__} carries no Caprese adapter; wrap it with get_peft_model first.")


def _split_masks(prompt_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(prompt_mask, sparse_mask)``: the sparse tokens are the real tokens outside the prompt."""
    prompt_mask = prompt_mask.bool()
    sparse_mask = ~prompt_mask
    if attention_mask is not None:
        if attention_mask.shape != prompt_mask.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} and prompt_mask {tuple(prompt_mask.shape)} differ."
            )
        sparse_mask &= attention_mask.bool()
        if bool((prompt_mask & ~attention_mask.bool()).any()):
            raise ValueError("prompt_mask marks padding tokens (attention_mask == 0) as prompt tokens.")
    return prompt_mask, sparse_mask


@contextmanager
def teacher_forcing(
    model: nn.Module, prompt_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> Iterator[None]:
    """Run forwards of ``model`` as if the non-prompt tokens had been generated one by one.

    Tokens where ``prompt_mask`` is True run the dense FF and give the backbone statistics; the
    other tokens (where ``attention_mask`` is 1) run the sparse FF plus the low-rank correction,
    exactly as during ``generate``. Used for distillation and teacher-forced evaluation.

    Args:
        model: a PEFT model with a Caprese adapter.
        prompt_mask: ``(batch, seq)``, True on the prompt tokens of each row (padding excluded).
        attention_mask: ``(batch, seq)``, 1 on real tokens; default all ones.
    """
    prompt_mask, sparse_mask = _split_masks(prompt_mask, attention_mask)
    with find_state(model).forced(Phase.TEACHER_FORCED, prompt_mask, sparse_mask):
        yield


@contextmanager
def continuation(model: nn.Module) -> Iterator[None]:
    """Let forwards of ``model`` feed several tokens on top of a filled KV cache, all run sparse.

    After a prefill of the prompts (which calibrates the backbone), one forward over the continuation tokens with
    the prefill's cache computes what generating them one by one computes, teacher-forced: the sparse block plus
    ``x @ L @ R`` on every new token, with the prompt's statistics. Distillation runs the prompt without a graph
    this way and backpropagates through the continuation only. Reselection does not apply.
    """
    state = find_state(model)
    previous, state._continuing = state._continuing, True
    try:
        yield
    finally:
        state._continuing = previous


@contextmanager
def observing(
    model: nn.Module,
    observe: Callable[[Any], None],
    prompt_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Run forwards of ``model`` densely while every Caprese layer shows ``observe`` a ``caprese_peft.Observation``.

    Each layer sees the input ``x`` the original model gives it, calibrates its backbone on the prompt tokens,
    and hands the observer its input, intermediate features, kept neurons and dense output; it passes the dense
    output on, so every layer observes the original model's activations. The observer picks the rows it needs
    (continuation tokens: ``find_state(model).step.sparse_mask``). Distillation builds its layer-wise loss
    (paper equation 7) and the closed form's regression on this.
    """
    prompt_mask, sparse_mask = _split_masks(prompt_mask, attention_mask)
    with find_state(model).forced(Phase.OBSERVED, prompt_mask, sparse_mask, observe=observe):
        yield
