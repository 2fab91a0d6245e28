"""Greedy generation with a dense prefill through transformers and a lean, graph-captured decode step.

``FastDecoder`` follows gpt-fast's ``generate.py``: ``prefill`` runs the transformers (PEFT) model on the prompt,
which yields the KV cache and, through the generation-state hook, each Caprese layer's backbone statistics;
the cache is copied into static buffers; the sparse FF weights of this prompt batch are materialised before the
first decode step (after the prefill's token, so that time to first token does not include them); then
``decode_one_token`` runs the lean step of ``lean.py``, compiled with ``torch.compile(mode="reduce-overhead")``
(CUDA graphs) on CUDA and, on a CPU, as a chain of C++ calls, two per layer (``LeanDecoder.block_step``). It
computes what ``model.generate(..., do_sample=False)`` computes, in another order: the dense model gives the same
tokens; a sparse backbone thresholds activations, so a rounding difference next to a CATS threshold can change a
token, as a change of batch size can in ``generate`` itself (benchmarks/cats_rounding.py measures both).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import types
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..backbones.base import warn_once
from ..layer import CapreseLayer
from ..state import find_state
from .lean import DenseFF, LeanDecoder, architecture_problem

MODES = ("dense", "backbone", "caprese")
# eager; inductor (faster on a CPU: docs and benchmarks/cpu_generation.py); inductor with CUDA graphs (gpt-fast's);
# inductor with its C++ wrapper (no Python between the step's kernels: up to 8% faster per token on a CPU, but a first
# compile of about 1.5 minutes on 2 cores instead of seconds; benchmarks/cpu_decode.py --forms ops-cpp-wrapper);
# blocks: no compilation, the step as a chain of C++ calls, two per layer (a CPU with the C++ ops only)
COMPILE_MODES = ("none", "default", "reduce-overhead", "cpp-wrapper", "blocks")


def _greedy_step(
    lean: LeanDecoder,
    tokens: torch.Tensor,
    slot: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, V)`` fp32 and the greedy next tokens ``(B,)`` of one decode step (``keys``: see
    ``LeanDecoder.forward``)."""
    logits = lean(tokens, slot, positions, keys)
    return logits, logits.argmax(dim=-1)


def _block_step(
    lean: LeanDecoder, tokens: torch.Tensor, slot: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_greedy_step`` through ``LeanDecoder.block_step`` (``compile="blocks"``): ``slot`` a Python int."""
    logits = lean.block_step(tokens, slot, positions)
    return logits, logits.argmax(dim=-1)


def _padded_call(slots: int) -> Callable:
    """``call(fn, *args) -> fn(*args)`` from a frame holding ``slots`` extra locals (8 bytes each).

    Why: CPython 3.11 keeps Python frames in 16 KiB chunks, and frees a chunk when the frame at its base returns. An
    inductor step's Python ``call()`` has a frame of several KiB; where it ends just short of a chunk's end, each
    Python frame it pushes (one per custom op call) allocates a chunk and frees it on return, an ``mmap`` and
    ``munmap`` pair each, whose TLB flush interrupts the other cores (measured: 76 pairs and 20-35% of a SmolLM2
    step on a 2-core VM; kernels/CPU.md). A kilobyte more above ``call()`` moves it away from such an edge.
    """
    names = ", ".join(f"_{i}" for i in range(slots))
    body = f"    {names}, = (None,) * {slots}\n" if slots else ""
    namespace: dict = {}
    exec(f"def call(fn, *args):\n{body}    return fn(*args)\n", namespace)  # noqa: S102 - fixed source
    return namespace["call"]


# the step called with no padding, then with 1 KiB more above it; FastDecoder keeps the faster (see _padded_call)
STEP_CALLS = (_padded_call(0), _padded_call(128))
PAD_TRIALS = 3  # timed steps per padding, after two warm-up steps


def _own_step() -> Callable:
    """``_greedy_step`` with a code object of its own: torch.compile caches compiled code per code object, so each
    decoder (its own lean step, buffers and guards) gets its own cache instead of the recompile limit of a shared one.
    """
    return types.FunctionType(_greedy_step.__code__.replace(), _greedy_step.__globals__, _greedy_step.__name__)


def _standard_strides(module: nn.Module, args: tuple) -> tuple:
    """The prompt's last positions ``(B, 1, D)``, sliced from ``(B, S, D)``, with the strides of a fresh tensor: with
    the slice's own, torch's ``matmul`` cannot fold them into one ``mm`` when the head's weight needs no gradient (a
    frozen PEFT model) and runs a batched product instead, 30% slower for SmolLM2's head on a CPU."""
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


class FastDecoder:
    """Greedy decoding of a Llama/Mistral/Qwen2/Qwen3 model, plain or with a Caprese adapter, in three modes.

    ``mode``: ``"dense"`` (adapter disabled), ``"backbone"`` (the sparse backbone without ``x @ L @ R``) or
    ``"caprese"`` (sparse backbone plus correction); None picks ``"caprese"`` when a Caprese adapter is
    active, else ``"dense"``.
    ``compile``: None picks ``"reduce-overhead"`` on CUDA and, on a CPU, ``"blocks"`` where the C++ ops are built
    and can run every block, else ``"default"`` (``"none"``, eager, without a C++ compiler). ``"blocks"`` (CPU only)
    compiles nothing: each decoder layer is two C++ calls (``LeanDecoder.block_step``), which measured as fast as
    the best compiled form for dense and faster for CATS and GRIFFIN (benchmarks/cpu_decode.py). ``"default"`` and
    ``"reduce-overhead"`` are passed to ``torch.compile(..., fullgraph=True)`` (on a CPU ``"default"`` without
    inductor's size asserts, which repeat the guards' checks); ``"cpp-wrapper"`` compiles with
    inductor's C++ wrapper (on a CPU up to 8% faster per token than ``"default"``, for a first compile of minutes);
    a callable wraps the step function (e.g. ``lambda f: torch.compile(f, backend="eager", fullgraph=True)``).
    ``max_seq_len`` bounds prompt plus generated tokens (default: what each ``generate`` call needs; the static
    buffers grow when a later call needs more, at the cost of one new compilation or capture).
    ``use_kernels`` is passed to ``caprese_peft.kernels.cats_ff`` for CATS layers; False also keeps the C++ CPU ops
    (``caprese_peft.kernels.cpu_ff``, which otherwise run every GEMV and FF block on a CPU) off.
    ``compile_layers_once``: compile one decoder layer and reuse its code for every layer of the same structure
    (``torch.compiler.nested_compile_region``) rather than the whole unrolled step: a third of the compile time on
    SmolLM2, the same code; False compiles the unrolled step; None: True on CUDA, False on a CPU.

    The lean step copies the q/k/v and gate/up weights it fuses (on a CPU with the C++ ops, each FF block's up and
    down weights instead, a neuron's two rows side by side; CATS layers' up/down weights on a GPU), so it holds
    roughly the attention and FF weights once more; GRIFFIN layers on a CPU also hold their prompt batch's kept
    rows packed (``min(F, B k)`` rows of gate, up and down per layer: half the FF weights at batch 1 and density
    0.5), packed before the first decode step. Build it after the model is on its device and in eval mode.
    GRIFFIN reselection is not supported: use ``model.generate`` for adapters with ``reselect_every``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str | None = None,
        max_seq_len: int | None = None,
        compile: str | Callable | None = None,
        use_kernels: bool | None = None,
        compile_layers_once: bool | None = None,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be None or one of {MODES}, got {mode!r}.")
        self.model = model
        self.hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = self.hf_model.config
        problem = architecture_problem(config, max_seq_len)
        if problem is not None:
            raise ValueError(
                f"FastDecoder cannot decode {type(self.hf_model).__name__}: {problem}. Use model.generate(...) for "
                "this model; the merged Caprese decode (caprese_peft.set_decode_impl) works there for every "
                "supported architecture."
            )
        self.layers = [self._caprese_layer(layer.mlp) for layer in self.hf_model.model.layers]
        if mode is None:
            active = any(layer is not None and layer.active_adapter_name() for layer in self.layers)
            mode = "caprese" if active else "dense"
        self.mode = mode
        if mode != "dense":
            self.adapter = self._check_adapter()
        device = next(self.hf_model.parameters()).device
        # on a CPU the C++ ops (built on first use, before anything is traced) run the GEMVs and FF blocks
        self.cpu_ops = device.type == "cpu" and use_kernels is not False and cpu_ops_available()
        self._compile_chosen = compile is None  # blocks by default: inductor where block_step cannot run
        if compile is None:
            compile = default_compile(device, self.cpu_ops)
        if not callable(compile) and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None, a callable or one of {COMPILE_MODES}, got {compile!r}.")
        if compile == "blocks" and not self.cpu_ops:
            why = "they are off (use_kernels=False)" if use_kernels is False else "they need a CPU model and a build"
            raise ValueError(f"compile='blocks' runs the step through the C++ CPU ops, and {why}.")
        self.compile = compile
        self.use_kernels = use_kernels
        # compiling one layer and stamping it out saves compile time; on a CPU torch 2.13's region tracing has failed
        # after other decoders compiled in the same process (an internal KeyError), so there the step is unrolled
        self.compile_layers_once = device.type == "cuda" if compile_layers_once is None else compile_layers_once
        self.max_seq_len = max_seq_len
        self.device = device
        self.lean: LeanDecoder | None = None
        self._step: Callable | None = None
        self._slot: torch.Tensor | None = None  # (1,) cache slot of the next token
        self._slot_host = 0
        self._positions: torch.Tensor | None = None  # (B,) rotary position of the next token
        self._call_step: Callable = STEP_CALLS[0]
        self._pad_times: list[list[float]] | None = None  # while choosing a padding: seconds per step, per padding
        self._steps_taken = 0

    # ---- construction ----

    @staticmethod
    def _caprese_layer(mlp: nn.Module) -> CapreseLayer | None:
        return mlp if isinstance(mlp, CapreseLayer) else None

    def _check_adapter(self) -> str:
        layers = [layer for layer in self.layers if layer is not None]
        if not layers:
            raise ValueError(f"mode={self.mode!r} needs a Caprese adapter; the model has none (use mode='dense').")
        active = {layer.active_adapter_name() for layer in layers} - {None}
        if len(active) != 1:
            raise ValueError(f"mode={self.mode!r} needs one active Caprese adapter, found {sorted(active) or 'none'}.")
        (adapter,) = active
        config = getattr(self.model, "peft_config", {}).get(adapter)
        if getattr(config, "reselect_every", None) is not None:
            raise ValueError(
                f"Adapter {adapter!r} reselects every {config.reselect_every} tokens, which the lean decode step "
                "does not do; use model.generate(...) for it."
            )
        return adapter

    def _feed_forward(self, index: int) -> nn.Module:
        layer = self.layers[index]
        mlp = self.hf_model.model.layers[index].mlp
        if self.mode == "dense" or layer is None or layer.active_adapter_name() is None:
            return DenseFF(mlp.base_layer if layer is not None else mlp, self.cpu_ops)
        biased = [p for p in ("gate_proj", "up_proj", "down_proj") if getattr(mlp.base_layer, p).bias is not None]
        if biased:
            raise ValueError(f"Layer {index}: {', '.join(biased)} have biases, which merged decode leaves out.")
        if self.mode == "caprese" and layer.caprese_stand_in.get(self.adapter):
            weight = mlp.base_layer.up_proj.weight
            probe = weight.new_empty(1, 1, weight.shape[1], requires_grad=False)
            problem = layer.caprese_decoder[self.adapter].stand_in_problem(probe) if self.cpu_ops else "no C++ ops"
            if problem is not None:
                raise ValueError(
                    f"Layer {index}: the lean step cannot add the stand-in of dropped neurons (stand_in_bits): "
                    f"{problem}; use model.generate(...) for this adapter."
                )
        try:
            return layer.caprese_decoder[self.adapter].lean_ff(self.mode == "caprese", self.use_kernels, self.cpu_ops)
        except ValueError as error:
            raise ValueError(f"Layer {index}: {error}") from None

    def _build(self, batch: int, max_seq_len: int) -> None:
        """The lean step and its buffers for ``batch`` x ``max_seq_len``; reuses what still fits."""
        if self.lean is None:
            ffs = [self._feed_forward(i) for i in range(len(self.layers))]
            self.lean = LeanDecoder(self.hf_model, ffs, cpu_gemv=self.cpu_ops).eval()
            self.lean.compile_layers_once = self.compile_layers_once
            if self.compile == "blocks":
                problem = self.lean.block_problem()
                if problem is not None and not self._compile_chosen:
                    raise ValueError(f"compile='blocks' cannot run this model's step: {problem}.")
                if problem is not None:
                    self.compile = default_compile(self.device)
        if (self.lean.batch_size, self.lean.max_seq_len) != (batch, max_seq_len):
            self.lean.allocate(batch, max_seq_len)
            self._step = None  # new buffers: compile or capture again
        if self._step is None:
            if self.compile == "blocks":
                self._step = _block_step
            elif callable(self.compile):
                self._step = self.compile(_own_step())
            elif self.compile == "none":
                self._step = _greedy_step
            elif self.compile == "cpp-wrapper":
                self._step = torch.compile(_own_step(), fullgraph=True, options={"cpp_wrapper": True})
            elif self.compile == "default" and self.device.type == "cpu":
                # the guards already check every input's size and stride; inductor's Python wrapper asserting them
                # again (one call per input, hundreds per step) costs about 1 ms per SmolLM2 token
                self._step = torch.compile(_own_step(), fullgraph=True, options={"size_asserts": False})
            else:
                self._step = torch.compile(_own_step(), mode=self.compile, fullgraph=True)
            # a CPU step compiled with inductor's Python wrapper: time it with and without a padding frame
            python_wrapper = self.device.type == "cpu" and self.compile == "default"
            self._call_step = STEP_CALLS[0]
            self._pad_times = [[] for _ in STEP_CALLS] if python_wrapper else None
            self._steps_taken = 0

    # ---- the decode loop ----

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 1
    ) -> torch.Tensor:
        """Run the prompt densely through the model; logits ``(B, V)`` fp32 of its last position.

        ``input_ids`` ``(B, P)`` left-padded, ``attention_mask`` ``(B, P)`` (default all ones). Afterwards
        ``decode_one_token`` continues these sequences, for up to ``max_new_tokens`` tokens in all: without a
        fixed ``max_seq_len`` the static buffers grow to hold them when they are too short.
        """
        input_ids, attention_mask = _check_prompt(input_ids, attention_mask, self.device)
        batch, width = input_ids.shape
        needed = width + max(1, max_new_tokens)
        if self.max_seq_len is not None and needed > self.max_seq_len:
            raise ValueError(
                f"{width} prompt positions + {max_new_tokens} new tokens exceed max_seq_len={self.max_seq_len}."
            )
        # buffers that hold the request are kept (no new compilation or capture); shorter ones grow
        max_seq_len = self.max_seq_len or max(needed, self.lean.max_seq_len if self.lean is not None else 0)
        # positions count real tokens only, as generate computes them for left-padded prompts
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        disabled = self.model.disable_adapter() if self.mode == "dense" and self._has_adapter() else None
        head = self.model.get_output_embeddings()
        hook = head.register_forward_pre_hook(_standard_strides) if head is not None else None
        with disabled or contextlib.nullcontext(), hook or contextlib.nullcontext():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5.24 renamed it
        last_logits = out.logits[:, -1].float()  # as generate takes them
        if self.mode != "dense":
            self._check_statistics()
        self._build(batch, max_seq_len)
        # GRIFFIN's packing of kept rows waits for the first decode step: the prefill's token is out by then
        self.lean.load_prompt(cache, attention_mask, defer=True)
        self._slot = torch.full((1,), width, device=self.device, dtype=torch.long)
        self._slot_host = width  # the same, on the host: checking it needs no device sync
        self._positions = attention_mask.sum(-1)  # (B,) the next token follows the real ones
        return last_logits

    def _has_adapter(self) -> bool:
        return any(layer is not None for layer in self.layers)

    def _check_statistics(self) -> None:
        generation = find_state(self.model).generation
        for index, layer in enumerate(self.layers):
            adapter = None if layer is None else layer.active_adapter_name()
            if adapter is not None and layer._stats_key != (generation, adapter):
                raise RuntimeError(f"Layer {index} recorded no backbone statistics during the prefill.")

    @torch.no_grad()
    def decode_one_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens (B,)`` (one per sequence) and return the next logits ``(B, V)`` fp32."""
        return self._advance(tokens)[0].clone()

    @torch.no_grad()
    def decode_greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens (B,)`` and return the greedy next tokens ``(B,)``, without waiting on the device."""
        return self._advance(tokens)[1].clone()  # the graph's output buffer is overwritten by the next replay

    def _advance(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lean is None or self._slot is None:
            raise RuntimeError("Call prefill(...) before decode_one_token(...).")
        if tokens.shape != (self.lean.batch_size,):
            raise ValueError(f"tokens must be ({self.lean.batch_size},), one per sequence; got {tuple(tokens.shape)}.")
        tokens = tokens.contiguous()  # a column of a (B, n) tensor would otherwise cost a recompilation (its stride)
        slot = int(self._slot_host)
        if slot >= self.lean.max_seq_len:
            raise ValueError(f"The static cache holds {self.lean.max_seq_len} positions and is full.")
        if self.lean.load_pending:
            self.lean.finish_load()
        if self.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if self.compile == "blocks":  # the slot as a Python int: nothing compiled, no dynamic shape
            logits, next_tokens = self._step(self.lean, tokens, slot, self._positions)
        elif self._pad_times is None:
            keys = self._keys(slot)
            logits, next_tokens = self._call_step(self._step, self.lean, tokens, self._slot, self._positions, keys)
        else:
            logits, next_tokens = self._choosing_padding(tokens, self._keys(slot))
        self._slot = self._slot + 1
        self._slot_host += 1
        self._positions = self._positions + 1
        return logits, next_tokens

    def _keys(self, slot: int) -> torch.Tensor | None:
        """The cache slots the step's attention reads (``LeanDecoder.forward``): on a CPU the first ``slot + 1``, a
        length marked dynamic, so that one compiled step serves every length and a step costs what the tokens so far
        cost (benchmarks/step_options.py: SmolLM2's dense step 7% faster in a 600-position cache); elsewhere None,
        the whole cache: the static shapes a CUDA graph replays."""
        if self.device.type != "cpu" or not self.lean.bounded_attention:
            return None
        keys = self.lean.key_slots[: slot + 1]
        torch._dynamo.mark_dynamic(keys, 0)
        return keys

    def _choosing_padding(self, tokens: torch.Tensor, keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step while the padding is being chosen: two warm-up steps, then ``PAD_TRIALS`` timed steps with each
        padding in turn; then the padding of the fastest median is kept (see ``_padded_call``)."""
        trial = self._steps_taken - 2
        index = trial % len(STEP_CALLS) if trial >= 0 else 0
        start = time.perf_counter()
        out = STEP_CALLS[index](self._step, self.lean, tokens, self._slot, self._positions, keys)
        if trial >= 0:
            self._pad_times[index].append(time.perf_counter() - start)
        self._steps_taken += 1
        if all(len(times) >= PAD_TRIALS for times in self._pad_times):
            medians = [sorted(times)[len(times) // 2] for times in self._pad_times]
            self._call_step = STEP_CALLS[medians.index(min(medians))]
            self._pad_times = None
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
    ) -> torch.Tensor:
        """Greedy sequences ``(B, P + n)``, as ``model.generate(..., do_sample=False)`` returns them.

        A sequence that emits an ``eos_token_id`` (default: the model's generation config) continues with
        ``pad_token_id`` (default: the config's, else the first EOS id); generation stops when every sequence
        has ended or after ``max_new_tokens``. ``ignore_eos=True`` always generates ``max_new_tokens`` and never
        waits on the device between steps (benchmarks).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        generation_config = getattr(self.hf_model, "generation_config", None)
        if eos_token_id is None and not ignore_eos:
            eos_token_id = getattr(generation_config, "eos_token_id", None)
        eos = None if ignore_eos else _token_set(eos_token_id, self.device)
        if eos is not None and pad_token_id is None:
            pad_token_id = getattr(generation_config, "pad_token_id", None)
            pad_token_id = int(eos[0]) if pad_token_id is None else pad_token_id
        tokens = self.prefill(input_ids, attention_mask, max_new_tokens=max_new_tokens).argmax(dim=-1)  # (B,)
        generated = [tokens]
        unfinished = None if eos is None else ~torch.isin(tokens, eos)
        for _ in range(max_new_tokens - 1):
            if unfinished is not None and not bool(unfinished.any()):
                break
            tokens = self.decode_greedy(tokens)
            if unfinished is not None:
                tokens = torch.where(unfinished, tokens, pad_token_id)
                unfinished &= ~torch.isin(tokens, eos)
            generated.append(tokens)
        return torch.cat([input_ids.to(self.device), torch.stack(generated, dim=1)], dim=1)


def cpu_ops_available() -> bool:
    """Whether the C++ CPU ops of ``caprese_peft.kernels.cpu_ff`` are built (building them on first use)."""
    try:
        from ..kernels import cpu_ff
    except ImportError:  # the kernels package needs triton, which ships for Linux
        return False
    return cpu_ff.available()


def default_compile(device: torch.device, cpu_ops: bool = False) -> str:
    """``"reduce-overhead"`` on CUDA; on a CPU ``"blocks"`` with the C++ ops (the fastest measured:
    benchmarks/cpu_decode.py), else ``"default"`` (inductor) where a C++ compiler is found, else ``"none"`` (eager)
    with one warning."""
    if device.type == "cuda":
        return "reduce-overhead"
    if cpu_ops:
        return "blocks"
    if any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        return "default"
    warn_once(
        "FastDecoder runs its decode step eagerly: torch.compile needs a C++ compiler on a CPU and none was found."
    )
    return "none"


def _token_set(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}.")
    return torch.tensor(ids, device=device)


def _check_prompt(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, prompt length) with at least one token, got {tuple(input_ids.shape)}."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}."
        )
    mask = attention_mask.to(device=device, dtype=torch.long)
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or bool((mask[:, -1] == 0).any()):
        raise ValueError(
            "Prompts must be left-padded (padding first, then the tokens): set tokenizer.padding_side='left'."
        )
    return input_ids.to(device), mask
