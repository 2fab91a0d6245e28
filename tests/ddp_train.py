"""Run by tests/test_distill_launch.py under torchrun: CapreseTrainer in 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import sys

import torch
from peft import get_peft_model

sys.path.insert(0, os.path.dirname(__file__))
from caprese_peft import CapreseConfig, CapreseTrainer, CapreseTrainingArguments  # noqa: E402

from conftest import tiny_model  # noqa: E402


def records(n: int = 16) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "prompt": torch.randint(3, 90, (6,), generator=gen).tolist(),
            "completion": torch.randint(3, 90, (4,), generator=gen).tolist(),
        }
        for _ in range(n)
    ]


def main(out: str, stage: str) -> None:
    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    args = CapreseTrainingArguments(
        output_dir=out, stage=stage, num_train_epochs=2, per_device_train_batch_size=2, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
    )  # fmt: skip
    trainer = CapreseTrainer(model=model, args=args, train_dataset=records())
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model.save_pretrained(os.path.join(out, f"adapter-rank{rank}"))
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{world} {trainer.state.global_step}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
