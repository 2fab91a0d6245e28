"""A table of (architecture x adapter config) cases crossed with the shared checks every case must pass."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftConfig, PeftModel

from caprese_peft import CapreseConfig, CapreseLayer, layerwise_losses, teacher_forcing

from conftest import factors_of, greedy, random_prompts, tiny_model, wrap

CASES = {
    "cats": dict(backbone="cats", density=0.5, r=8),
    "griffin-first-half": dict(backbone="griffin", density=0.5, r=8, layers_to_transform=[0, 1]),
    "cats-sparse-rank5": dict(backbone="cats", density=0.3, r=5),
    "griffin-all": dict(backbone="griffin", density=0.4, r=16),
    "cats-stand-in": dict(backbone="cats", density=0.5, r=8, stand_in_bits=4),
    "griffin-stand-in": dict(backbone="griffin", density=0.5, r=8, stand_in_bits=3, layers_to_transform=[1, 2]),
}
NEW_TOKENS = 6


@pytest.fixture(params=sorted(CASES))
def case(request) -> dict:
    return CASES[request.param]


# ---- an independent oracle: recompute the whole sequence without a cache, sparse on non-prompt tokens ----


def _oracle_keep(backbone, density, gate, z, n_prompt):
    if backbone == "griffin":
        zp = z[0, :n_prompt]
        score = (zp.abs() / zp.norm(dim=-1, keepdim=True)).norm(dim=0)
        k = max(1, round(density * score.numel()))
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep[score.topk(k).indices] = True
        return keep
    values = gate[0, :n_prompt].abs().flatten().sort().values
    n_keep = round(density * values.numel())
    if n_keep == values.numel():
        return torch.ones_like(gate, dtype=torch.bool)
    return gate.abs() > values[values.numel() - n_keep - 1]


def _quantized(weight, bits):
    top = 2 ** (bits - 1) - 1
    scale = weight.abs().max(dim=1, keepdim=True).values / top
    return (weight / scale).round().clamp(-top - 1, top) * scale


def oracle_logits(base, sequence, n_prompt, options, factors):
    """Logits of ``base`` on one unpadded ``sequence`` with the Caprese block on positions >= n_prompt.

    ``factors`` maps a layer index to its ``(L, R)``; layers outside it run dense.
    """

    def hook_for(layer_idx):
        left, right = factors[layer_idx]

        def hook(mlp, args, output):
            (x,) = args
            gate = mlp.act_fn(mlp.gate_proj(x))
            z = gate * mlp.up_proj(x)
            keep = _oracle_keep(options["backbone"], options["density"], gate, z, n_prompt)
            sparse = mlp.down_proj(z * keep) + x @ left @ right
            bits = options.get("stand_in_bits")
            if bits:  # the dropped neurons through row-quantized copies of their weights (the gate too for GRIFFIN)
                quantized = [_quantized(w, bits) for w in (mlp.gate_proj.weight, mlp.up_proj.weight)]
                dropped_gate = gate if options["backbone"] == "cats" else mlp.act_fn(x @ quantized[0].T)
                down = _quantized(mlp.down_proj.weight.T, bits)
                sparse = sparse + ((dropped_gate * (x @ quantized[1].T)) * ~keep) @ down
            return torch.cat([output[:, :n_prompt], sparse[:, n_prompt:]], dim=1)

        return hook

    handles = [base.model.layers[i].mlp.register_forward_hook(hook_for(i)) for i in factors]
    try:
        with torch.no_grad():
            return base(sequence, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


# ---- shared checks ----


def test_disabled_adapter_is_bit_identical_to_base(base_pair, case):
    model, reference = base_pair
    peft_model = wrap(model, **case)
    ids, mask = random_prompts([7, 4])
    with torch.no_grad(), peft_model.disable_adapter():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
        got_seq, got_logits = greedy(peft_model, ids, mask)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
    want_seq, want_logits = greedy(reference, ids, mask)
    assert torch.equal(got, want)
    assert torch.equal(got_seq, want_seq)
    assert torch.equal(got_logits, want_logits)


def test_prefill_is_dense(base_pair, case):
    model, reference = base_pair
    peft_model = wrap(model, **case)
    ids, mask = random_prompts([9, 5])
    with torch.no_grad():
        assert torch.equal(
            peft_model(input_ids=ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
        )


def test_decode_matches_full_recompute_oracle(base_pair, case):
    model, reference = base_pair
    peft_model = wrap(model, **case)
    ids, mask = random_prompts([8])
    sequences, logits = greedy(peft_model, ids, mask)
    want = oracle_logits(reference, sequences[:, :-1], ids.shape[1], case, factors_of(peft_model))
    torch.testing.assert_close(logits, want[:, ids.shape[1] - 1 :], rtol=1e-4, atol=1e-4)
    # the correction is really on: the same tokens with L R dropped give other logits
    zeroed = {i: (left, torch.zeros_like(right)) for i, (left, right) in factors_of(peft_model).items()}
    without = oracle_logits(reference, sequences[:, :-1], ids.shape[1], case, zeroed)
    assert not torch.allclose(logits[:, 1:], without[:, ids.shape[1] :], atol=1e-3)


def test_fresh_adapter_equals_pure_backbone(base_pair, case):
    model, reference = base_pair
    peft_model = wrap(model, init_weights=True, **case)
    factors = factors_of(peft_model)
    assert all(torch.count_nonzero(right) == 0 for _, right in factors.values())
    ids, mask = random_prompts([8])
    sequences, logits = greedy(peft_model, ids, mask)
    want = oracle_logits(reference, sequences[:, :-1], ids.shape[1], case, factors)
    torch.testing.assert_close(logits, want[:, ids.shape[1] - 1 :], rtol=1e-4, atol=1e-4)
    # and sparsity changes the model: the dense logits differ after the first generated token
    dense = oracle_logits(reference, sequences[:, :-1], ids.shape[1], {**case, "density": 1.0}, factors)
    assert not torch.allclose(logits[:, 1:], dense[:, ids.shape[1] :], atol=1e-3)


def test_batched_left_padded_equals_per_row(base_pair, case):
    model, _ = base_pair
    peft_model = wrap(model, **case)
    lengths = [9, 3, 6]
    ids, mask = random_prompts(lengths)
    batch_seq, batch_logits = greedy(peft_model, ids, mask)
    for row, n in enumerate(lengths):
        row_ids, row_mask = ids[row : row + 1, -n:], mask[row : row + 1, -n:]
        seq, logits = greedy(peft_model, row_ids, row_mask)
        assert torch.equal(batch_seq[row, -NEW_TOKENS:], seq[0, -NEW_TOKENS:])
        torch.testing.assert_close(batch_logits[row], logits[0], rtol=1e-4, atol=1e-4)


def test_teacher_forcing_reproduces_generation(base_pair, case):
    model, _ = base_pair
    peft_model = wrap(model, **case)
    ids, mask = random_prompts([7, 4])
    sequences, logits = greedy(peft_model, ids, mask)
    full_mask = torch.cat([mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)], dim=1)
    prompt_mask = torch.zeros_like(full_mask, dtype=torch.bool)
    prompt_mask[:, : ids.shape[1]] = mask.bool()
    with torch.no_grad(), teacher_forcing(peft_model, prompt_mask, full_mask):
        forced = peft_model(input_ids=sequences, attention_mask=full_mask).logits
    torch.testing.assert_close(forced[:, ids.shape[1] - 1 : -1], logits, rtol=1e-4, atol=1e-4)


def test_only_low_rank_factors_train(base_pair, case):
    model, _ = base_pair
    peft_model = wrap(model, **case)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    wrapped = len(case.get("layers_to_transform", range(4)))
    assert len(trainable) == 2 * wrapped
    assert all(n.endswith(("caprese_L.default", "caprese_R.default")) for n in trainable)

    ids, mask = random_prompts([6, 6])
    sequence = torch.cat([ids, torch.randint(3, 90, (2, 4))], dim=1)
    prompt_mask = torch.zeros_like(sequence, dtype=torch.bool)
    prompt_mask[:, :6] = True
    with teacher_forcing(peft_model, prompt_mask):
        loss = peft_model(input_ids=sequence).logits[:, 6:].square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_save_load_roundtrip(base_pair, case, tmp_path):
    model, reference = base_pair
    peft_model = wrap(model, **case)
    ids, mask = random_prompts([7, 4])
    want_seq, want_logits = greedy(peft_model, ids, mask)
    peft_model.save_pretrained(tmp_path)

    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, CapreseConfig)
    assert (config.backbone, config.density, config.r) == (case["backbone"], case["density"], case["r"])
    assert (tmp_path / "adapter_model.safetensors").is_file()

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(k.endswith((".caprese_L", ".caprese_R")) for k in saved)

    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    got_seq, got_logits = greedy(loaded, ids, mask)
    assert torch.equal(got_seq, want_seq)
    assert torch.equal(got_logits, want_logits)


def test_unload_returns_untouched_base(base_pair, case):
    model, reference = base_pair
    peft_model = wrap(model, **case)
    base = peft_model.unload()
    assert not any(isinstance(m, CapreseLayer) for m in base.modules())
    ids, mask = random_prompts([5])
    with torch.no_grad():
        assert torch.equal(base(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        wrap(tiny_model("llama"), **case).merge_and_unload()


def test_bf16_dtype_follows_base(arch):
    model = tiny_model(arch).to(torch.bfloat16)
    peft_model = wrap(model, backbone="cats", r=4)
    for module in peft_model.modules():
        if isinstance(module, CapreseLayer):
            assert module.caprese_L["default"].dtype == torch.bfloat16
            assert module.caprese_R["default"].dtype == torch.bfloat16
    ids, mask = random_prompts([5, 3])
    sequences, _ = greedy(peft_model, ids, mask, n=3)
    assert sequences.shape == (2, ids.shape[1] + 3)


def test_layerwise_pass_is_dense_and_scores_every_layer(base_pair, case):
    model, reference = base_pair
    peft_model = wrap(model, **case)
    ids, mask = random_prompts([8, 5])
    sequence = torch.cat([ids, torch.randint(3, 90, (2, 4))], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    prompt_mask = torch.zeros_like(full_mask, dtype=torch.bool)
    prompt_mask[:, : ids.shape[1]] = mask.bool()
    with layerwise_losses(peft_model, prompt_mask, full_mask) as losses:
        logits = peft_model(input_ids=sequence, attention_mask=full_mask).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(sequence, attention_mask=full_mask).logits)
    assert len(losses) == len(factors_of(peft_model))
    assert all(loss.dim() == 0 and loss > 0 for loss in losses)
    torch.stack(losses).sum().backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_activation_checkpointing_gives_the_same_gradients(arch_name):
    def grads(checkpointing: bool) -> dict:
        peft_model = wrap(tiny_model(arch_name), backbone="cats", r=4)
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.train()
        ids, mask = random_prompts([7, 5])
        prompt_mask = mask.bool().clone()
        prompt_mask[:, -3:] = False
        with teacher_forcing(peft_model, prompt_mask, mask):
            loss = peft_model(input_ids=ids, attention_mask=mask).logits.square().mean()
        loss.backward()
        return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
