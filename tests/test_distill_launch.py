"""CapreseTrainer keeps what transformers.Trainer gives: multi-process training and mixed precision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from caprese_peft import CapreseConfig, CapreseTrainer, CapreseTrainingArguments

from conftest import tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["layerwise", "e2e"])
def test_two_processes_train_in_sync(tmp_path, stage):
    script = Path(__file__).with_name("ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    subprocess.run([*command, str(tmp_path), stage], check=True, env=env, timeout=600)
    for rank in (0, 1):
        world, steps = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert world == "2" and int(steps) == 8  # 16 records / (2 per device x 2 processes) = 4 steps, x 2 epochs
    weights = [load_file(tmp_path / f"adapter-rank{r}" / "adapter_model.safetensors") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)  # gradients were all-reduced
    assert any(torch.count_nonzero(v) for k, v in weights[0].items() if "caprese_R" in k)
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter-rank0")


def test_bf16_mixed_precision_trains(tmp_path):
    from ddp_train import records
    from peft import get_peft_model

    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    args = CapreseTrainingArguments(
        output_dir=str(tmp_path), stage="e2e", num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
        bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
    )  # fmt: skip
    trainer = CapreseTrainer(model=model, args=args, train_dataset=records())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "caprese_" in n)
