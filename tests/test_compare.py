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


def reference_scores(model, data):
    """KL and perplexities record by record from full, unpadded logits: what continuation_kl must give."""
    from caprese_peft import teacher_forcing
    from caprese_peft.eval.metrics import token_kl

    kl, tokens, nll, scored = 0.0, 0, {"dense": 0.0, "model": 0.0}, 0
    for record in data:
        ids = torch.tensor([record["input_ids"]])
        prompt = torch.tensor([record["prompt_mask"]])
        with torch.no_grad():
            with model.disable_adapter():
                dense = model(input_ids=ids).logits
            with teacher_forcing(model, prompt):
                student = model(input_ids=ids).logits
        kl += float(token_kl(dense, student, ~prompt).sum())
        tokens += int((~prompt).sum())
        for name, logits in (("dense", dense), ("model", student)):
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            nll[name] += float(loss[~prompt[0, 1:]].sum())
        scored += int((~prompt[0, 1:]).sum())
    return {
        "kl": kl / tokens,
        "ppl_dense": torch.tensor(nll["dense"] / scored).exp().item(),
        "ppl_model": torch.tensor(nll["model"] / scored).exp().item(),
    }


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_continuation_kl_matches_record_by_record_reference(batch_size):
    model = get_peft_model(tiny_model("llama"), CapreseConfig(backbone="cats", density=0.5, r=8, init_weights=False))
    expected = reference_scores(model, DATA)
    got = continuation_kl(model, DATA, batch_size=batch_size, progress=False)
    for key in ("kl", "ppl_dense", "ppl_model"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key


def test_teacher_cache_runs_the_dense_model_once_and_gives_the_same_scores(monkeypatch):
    model = get_peft_model(tiny_model("llama"), CapreseConfig(backbone="cats", density=0.5, r=8, init_weights=False))
    cache: dict = {}
    first = continuation_kl(model, DATA, batch_size=2, progress=False, teacher_cache=cache)
    assert sorted(cache) == [0, 1]

    def no_dense_pass():
        raise AssertionError("the dense model ran again although its logits were cached")

    monkeypatch.setattr(model, "disable_adapter", no_dense_pass)
    again = continuation_kl(model, DATA, batch_size=2, progress=False, teacher_cache=cache)
    assert again == pytest.approx(first)
    with pytest.raises(ValueError, match="other records"):
        continuation_kl(model, records([5, 5], [4, 4], seed=9), batch_size=2, progress=False, teacher_cache=cache)
