"""Teacher-forced KL in one pass against the same KL decoded token by token through the KV cache."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from caprese_peft import CapreseConfig
from caprese_peft.eval.compare import continuation_kl, stepwise_continuation_kl

from conftest import VOCAB, tiny_model


def records(prompt_lengths, continuation_lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n_prompt, n_cont in zip(prompt_lengths, continuation_lengths):
        ids = torch.randint(3, VOCAB, (n_prompt + n_cont,), generator=gen).tolist()
        out.append({"input_ids": ids, "prompt_mask": [True] * n_prompt + [False] * n_cont})
    return out


DATA = records([7, 4, 9], [6, 9, 3])


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("backbone", ["cats", "griffin"])
def test_stepwise_decoding_equals_one_teacher_forced_pass(arch, backbone):
    model = get_peft_model(tiny_model(arch), CapreseConfig(backbone=backbone, density=0.5, r=8, init_weights=False))
    one_pass = continuation_kl(model, DATA, batch_size=2, progress=False)
    stepwise = stepwise_continuation_kl(model, DATA, batch_size=3, progress=False)
    assert one_pass["kl"] > 1e-3  # the sparse model really differs from dense
    assert stepwise["tokens"] == one_pass["tokens"] == 18
    assert stepwise["kl"] == pytest.approx(one_pass["kl"], rel=1e-4, abs=1e-6)


def test_stepwise_sees_reselection():
    config = CapreseConfig(backbone="griffin", density=0.5, r=8, init_weights=False, reselect_every=1)
    model = get_peft_model(tiny_model("llama"), config)
    assert continuation_kl(model, DATA, progress=False)["kl"] > 1e-3  # one pass cannot rerun tokens
    assert stepwise_continuation_kl(model, DATA, progress=False)["kl"] < 1e-6  # interval 1 is the dense model
