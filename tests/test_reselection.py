"""GRIFFIN reselection (paper appendix E): ``CapreseConfig(reselect_every=G)`` against an independent oracle."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from caprese_peft import CapreseConfig

from conftest import factors_of, greedy, layers_of, random_prompts, tiny_model, wrap

NEW_TOKENS = 8


def reselecting(model, reselect_every, **options):
    """``model`` with a GRIFFIN 0.4 adapter that reselects every ``reselect_every`` tokens."""
    return wrap(model, **{"backbone": "griffin", "density": 0.4, "reselect_every": reselect_every, **options})


def oracle_step_logits(base, sequence, n_dense, position, density, factors):
    """Next-token logits at ``position`` of one unpadded ``sequence`` recomputed from scratch.

    Positions below ``n_dense`` (the prompt and every token reselection has rerun) run dense; the
    others run GRIFFIN with neurons chosen from the dense positions' statistics, plus ``x L R``.
    """

    def hook_for(layer_idx):
        left, right = factors[layer_idx]

        def hook(mlp, args, output):
            (x,) = args
            z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            seen = z[0, :n_dense]
            score = (seen / seen.norm(dim=-1, keepdim=True)).norm(dim=0)
            keep = torch.zeros_like(score, dtype=torch.bool)
            keep[score.topk(max(1, round(density * score.numel()))).indices] = True
            sparse = mlp.down_proj(z * keep) + x @ left @ right
            return torch.cat([output[:, :n_dense], sparse[:, n_dense:]], dim=1)

        return hook

    handles = [base.model.layers[i].mlp.register_forward_hook(hook_for(i)) for i in factors]
    try:
        with torch.no_grad():
            return base(sequence[:, : position + 1], use_cache=False).logits[0, position]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("interval", [1, 3])
def test_reselection_matches_full_recompute_oracle(arch, interval):
    model = tiny_model(arch)
    reference = tiny_model(arch).requires_grad_(False)
    peft_model = reselecting(model, interval)
    ids, mask = random_prompts([7])
    sequences, logits = greedy(peft_model, ids, mask, n=NEW_TOKENS)
    prompt = ids.shape[1]
    factors = factors_of(peft_model)
    for step in range(1, NEW_TOKENS):  # decode step k feeds generated token k at position prompt + k - 1
        reselected = interval * (step // interval)  # generated tokens rerun dense by the last reselection
        want = oracle_step_logits(reference, sequences, prompt + reselected, prompt + step - 1, 0.4, factors)
        torch.testing.assert_close(logits[0, step], want, rtol=1e-4, atol=1e-4)


def test_interval_one_is_the_dense_model():
    model = tiny_model("llama")
    reference = tiny_model("llama").requires_grad_(False)
    ids, mask = random_prompts([9, 5, 7])
    dense_tokens, dense_logits = greedy(reference, ids, mask, n=NEW_TOKENS)
    tokens, logits = greedy(reselecting(model, 1), ids, mask, n=NEW_TOKENS)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_huge_interval_is_no_reselection():
    ids, mask = random_prompts([9, 5, 7])
    never = greedy(reselecting(tiny_model("qwen2"), None), ids, mask, n=NEW_TOKENS)
    huge = greedy(reselecting(tiny_model("qwen2"), 10_000), ids, mask, n=NEW_TOKENS)
    assert torch.equal(huge[0], never[0])
    assert torch.equal(huge[1], never[1])
    # and a finite interval does change the outputs
    sometimes = greedy(reselecting(tiny_model("qwen2"), 3), ids, mask, n=NEW_TOKENS)
    assert not torch.allclose(sometimes[1], never[1], atol=1e-3)


def test_left_padded_batch_equals_each_row_alone():
    lengths = [9, 4, 6]
    ids, mask = random_prompts(lengths)
    peft_model = reselecting(tiny_model("mistral"), 3)
    tokens, logits = greedy(peft_model, ids, mask, n=NEW_TOKENS)
    for row, n in enumerate(lengths):
        alone_tokens, alone_logits = greedy(peft_model, ids[row : row + 1, -n:], mask[row : row + 1, -n:], NEW_TOKENS)
        assert torch.equal(tokens[row, -NEW_TOKENS:], alone_tokens[0, -NEW_TOKENS:])
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=1e-4, atol=1e-4)


def test_statistics_after_reselection_cover_every_rerun_token():
    peft_model = reselecting(tiny_model("llama"), 2)
    ids, mask = random_prompts([6])
    sequences, _ = greedy(peft_model, ids, mask, n=5)  # decode steps 1..4: reselections after steps 2 and 4
    layer = layers_of(peft_model)[0]
    seen = sequences[:, : ids.shape[1] + 4]  # the prompt and the four generated tokens fed back
    captured = {}

    def capture(mlp, args, output) -> None:
        captured["z"] = mlp.act_fn(mlp.gate_proj(args[0])) * mlp.up_proj(args[0])

    handle = layer.base_layer.register_forward_hook(capture)
    with torch.no_grad(), peft_model.disable_adapter():
        peft_model(input_ids=seen)
    handle.remove()
    z = captured["z"][0]
    want = (z / z.norm(dim=-1, keepdim=True)).norm(dim=0)
    torch.testing.assert_close(layer._stats.score[0], want, rtol=1e-5, atol=1e-6)


def test_config_round_trip_and_bad_values(tmp_path):
    peft_model = reselecting(tiny_model("llama"), 16)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].reselect_every == 16
    with pytest.raises(ValueError, match="not available with the 'cats' backbone"):
        CapreseConfig(backbone="cats", reselect_every=8)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="reselect_every must be"):
            CapreseConfig(backbone="griffin", reselect_every=bad)


def test_disabled_adapter_never_reselects():
    model = tiny_model("llama")
    reference = tiny_model("llama").requires_grad_(False)
    peft_model = reselecting(model, 1)
    ids, mask = random_prompts([5, 8])
    calls = []
    handle = peft_model.base_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with peft_model.disable_adapter():
        tokens, _ = greedy(peft_model, ids, mask, n=4)
    handle.remove()
    assert torch.equal(tokens, greedy(reference, ids, mask, n=4)[0])
    assert calls[1:] == [1, 1, 1]  # every decode step feeds one token: no rerun
