"""Shared fixtures: tiny random decoders of every supported architecture, built from configs."""

from __future__ import annotations

import copy
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on a CPU; it must be set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import caprese_peft  # noqa: E402  (registers the CAPRESE PEFT type)

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=90,  # not a multiple of anything convenient: exercises rounding of density * d_ff
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ARCHITECTURES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {"head_dim": 12}),
    "gemma2": (Gemma2Config, {"head_dim": 12, "query_pre_attn_scalar": 12, "sliding_window": 16}),
    "gemma3": (Gemma3TextConfig, {"head_dim": 12, "query_pre_attn_scalar": 12, "sliding_window": 16}),
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small random causal LM of ``arch`` in fp32 eval mode, with logits sharp enough for stable greedy tests."""
    config_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)  # larger than the 0.02 default, so that sparsity visibly changes outputs
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model.eval()


def wrap(model: torch.nn.Module | str, dtype: torch.dtype | None = None, **options):
    """``model`` (or a tiny model of that architecture) with a Caprese adapter.

    Defaults: density 0.5, r 8 and a random ``R`` (``init_weights=False``), so that the correction visibly acts;
    ``options`` override them and add any other ``CapreseConfig`` field.
    """
    if isinstance(model, str):
        model = tiny_model(model)
    if dtype is not None:
        model = model.to(dtype)
    config = caprese_peft.CapreseConfig(**{"density": 0.5, "r": 8, "init_weights": False, **options})
    return get_peft_model(model, config)


def layers_of(model) -> list:
    """The Caprese layers of ``model``, in order."""
    return caprese_peft.layer.caprese_layers(model)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture
def base_pair(arch):
    """A tiny model and an untouched deep copy of it, to compare against after wrapping."""
    model = tiny_model(arch)
    # frozen like the wrapped base: requires_grad alone changes transformers' prefill numerics in the last bit
    return model, copy.deepcopy(model).requires_grad_(False)


def tiny_tokenizer(words: tuple[str, ...] = ()):
    """A word-level tokenizer with a small chat template, built offline (ids stay below the tiny models' vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<s>", "</s>", "<unk>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab += ["what", "is", "two", "plus", "three", "five", "the", "answer", "think", *words]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tok


def random_prompts(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of random prompts with the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def greedy(model, ids, mask, n: int = 6, **kwargs):
    """Greedy generation of exactly ``n`` tokens: ``(sequences (B, T), logits (B, n, V))``; ``kwargs`` go to generate."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module")
def one_thread():
    """Matrices of 48 x 90 run fastest on one thread; more only contend with whatever else the machine runs.

    bf16 on 2 busy cores is 500x slower with two. Modules opt in with ``pytestmark = usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def factors_of(peft_model, adapter: str = "default") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{decoder layer index: (L, R)}`` of every Caprese layer of ``peft_model``, detached."""
    found = {}
    for name, module in caprese_peft.layer.named_caprese_layers(peft_model).items():
        idx = int(name.split(".layers.")[1].split(".")[0])
        found[idx] = (module.caprese_L[adapter].detach(), module.caprese_R[adapter].detach())
    return found


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
