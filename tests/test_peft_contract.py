"""PEFT's contract for a tuner, after its own tests: (architecture x Caprese config) crossed with the adapter lifecycle
(add, load, set, delete, save selected, status, state dicts, gradients) and every generation mode a user reaches for.

What LoRA does, Caprese does; what Caprese cannot do (merging, beam search with reselection) it refuses clearly.
tests/test_tuner.py holds the numerical checks of one adapter (oracle, teacher forcing, save/load, unload).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from caprese_peft import CapreseConfig, decode_impl
from caprese_peft.layer import caprese_layers

from conftest import greedy, random_prompts, tiny_model, wrap

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["llama", "qwen2", "gemma3"]
CONFIGS = {
    "cats": dict(backbone="cats", density=0.5, r=8),
    "griffin-first-half": dict(backbone="griffin", density=0.5, r=8, layers_to_transform=[0, 1]),
    "griffin-reselect": dict(backbone="griffin", density=0.4, r=4, reselect_every=3),
    "cats-stand-in": dict(backbone="cats", density=0.5, r=8, stand_in_bits=4),
}
# the second adapter of a lifecycle test: another backbone, rank and set of layers than the first
OTHER = {
    "cats": dict(backbone="griffin", density=0.4, r=4, layers_to_transform=[2, 3], reselect_every=2),
    "griffin-first-half": dict(backbone="cats", density=0.3, r=6, layers_to_transform=[1, 2, 3]),
    "griffin-reselect": dict(backbone="cats", density=0.6, r=8),
    "cats-stand-in": dict(backbone="griffin", density=0.5, r=4, stand_in_bits=3, layers_to_transform=[0, 3]),
}
NEW = 5
PER_ADAPTER = ("caprese_L", "caprese_R", "caprese_backbone", "caprese_decoder")


@pytest.fixture(params=[(a, c) for a in ARCHS for c in CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    return request.param


def tokens(model, ids, mask, n: int = NEW, **kwargs) -> torch.Tensor:
    """The generated tokens ``(B, n)`` of ``model.generate`` (greedy unless ``kwargs`` say otherwise)."""
    kwargs = {"do_sample": False, **kwargs}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kwargs)
    return out[:, ids.shape[1] :]


def alone(arch: str, options: dict, seed: int, state_dict: dict | None = None):
    """A model holding one adapter: random factors from ``seed``, or ``state_dict`` (a saved adapter's)."""
    model = tiny_model(arch)  # seeds the base model's weights itself
    torch.manual_seed(seed)
    model = wrap(model, **options)
    if state_dict is not None:
        set_peft_model_state_dict(model, state_dict)
    return model


def two_adapters(arch: str, config: str):
    """A model with adapter "default" (the case's config) and "other" (OTHER), and each of them alone."""
    first, second = alone(arch, CONFIGS[config], seed=1), alone(arch, OTHER[config], seed=2)
    both = copy.deepcopy(first)
    both.add_adapter("other", CapreseConfig(**{"init_weights": False, **OTHER[config]}))
    set_peft_model_state_dict(both, get_peft_model_state_dict(second), adapter_name="other")
    return both, first, second


def factors(model, adapter: str = "default") -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith(f".{adapter}")]


# ---- the lifecycle ----


def test_add_adapter_wraps_the_blocks_already_wrapped(case):
    arch, config = case
    both, first, second = two_adapters(arch, config)
    assert len(caprese_layers(both)) == 4  # one wrapper per block, holding both adapters where both apply
    covered = {layer for layer in caprese_layers(both) if "other" in layer.caprese_L}
    assert len(covered) == len(OTHER[config].get("layers_to_transform", range(4)))
    ids, mask = random_prompts([6, 4])
    assert torch.equal(tokens(both, ids, mask), tokens(first, ids, mask))
    both.set_adapter("other")  # its own backbone, density, rank and reselection interval apply
    assert torch.equal(tokens(both, ids, mask), tokens(second, ids, mask))
    both.set_adapter("default")
    assert torch.equal(tokens(both, ids, mask), tokens(first, ids, mask))


def test_several_adapters_load_from_disk_and_switch(case, tmp_path):
    arch, config = case
    first, second = alone(arch, CONFIGS[config], seed=1), alone(arch, OTHER[config], seed=2)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "first", adapter_name="a")
    model.load_adapter(tmp_path / "second", adapter_name="b")
    ids, mask = random_prompts([5, 7], seed=3)
    assert model.active_adapters == ["a"]
    assert torch.equal(tokens(model, ids, mask), tokens(first, ids, mask))
    model.set_adapter("b")
    assert torch.equal(tokens(model, ids, mask), tokens(second, ids, mask))
    with model.disable_adapter():
        assert torch.equal(tokens(model, ids, mask), tokens(tiny_model(arch), ids, mask))


@pytest.mark.parametrize("which", ["active", "inactive"])
def test_delete_adapter_leaves_no_per_adapter_entries(case, which):
    arch, config = case
    both, first, second = two_adapters(arch, config)  # "default" active
    gone, kept, kept_alone = ("default", "other", second) if which == "active" else ("other", "default", first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that the deleted adapter was active
        both.delete_adapter(gone)
    assert both.active_adapters == [kept] and list(both.peft_config) == [kept]
    for layer in caprese_layers(both):
        for attribute in PER_ADAPTER:
            assert gone not in getattr(layer, attribute), attribute
    assert not [k for k in both.state_dict() if f".{gone}" in k]
    ids, mask = random_prompts([4, 6], seed=4)
    assert torch.equal(tokens(both, ids, mask), tokens(kept_alone, ids, mask))


def test_save_selected_adapters(case, tmp_path):
    arch, config = case
    both, _, second = two_adapters(arch, config)
    both.save_pretrained(tmp_path, selected_adapters=["other"])
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter_config.json").exists()  # "default" was not selected
    reloaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "other")
    ids, mask = random_prompts([6], seed=5)
    assert torch.equal(tokens(reloaded, ids, mask), tokens(second, ids, mask))


def test_model_and_layer_status(case):
    arch, config = case
    both, _, _ = two_adapters(arch, config)
    status = both.get_model_status()
    assert status.available_adapters == ["default", "other"] and status.active_adapters == ["default"]
    assert status.requires_grad == {"default": True, "other": False} and status.enabled
    assert status.peft_types == {"default": "CAPRESE", "other": "CAPRESE"}
    layers = both.get_layer_status()
    assert len(layers) == 4 and all(s.module_type == "caprese.CapreseLayer" for s in layers)
    with both.disable_adapter():
        assert not both.get_model_status().enabled


def test_state_dict_into_a_named_adapter(case):
    arch, config = case
    both, first, second = two_adapters(arch, config)
    replacement = alone(arch, OTHER[config], seed=9)
    set_peft_model_state_dict(both, get_peft_model_state_dict(replacement), adapter_name="other")
    saved = get_peft_model_state_dict(both, adapter_name="other")
    assert saved.keys() == get_peft_model_state_dict(replacement).keys()
    assert all(torch.equal(saved[k], v) for k, v in get_peft_model_state_dict(replacement).items())
    assert not any(torch.equal(saved[k], v) for k, v in get_peft_model_state_dict(second).items())  # replaced
    assert all(torch.equal(a, b) for a, b in zip(factors(both, "default"), factors(first)))  # untouched
    both.set_adapter("other")
    ids, mask = random_prompts([7, 5], seed=6)
    assert torch.equal(tokens(both, ids, mask), tokens(replacement, ids, mask))


def test_requires_grad_follows_the_active_adapter(case):
    arch, config = case
    both, _, _ = two_adapters(arch, config)

    def trainable() -> set[str]:
        return {n.split(".")[-1] for n, p in both.named_parameters() if p.requires_grad}

    assert trainable() == {"default"}
    both.set_adapter("other")
    assert trainable() == {"other"}
    both.set_adapter("other", inference_mode=True)
    assert trainable() == set()


def test_mixed_adapter_batches_are_refused_clearly():
    both, _, _ = two_adapters("llama", "cats")
    ids, mask = random_prompts([5, 6])
    with pytest.raises(ValueError, match="one adapter for a whole batch"):
        both(input_ids=ids, attention_mask=mask, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="one adapter for a whole batch"):
        both.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, adapter_names=["default", "other"])


def test_merging_is_refused_clearly(case):
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1)
    with pytest.raises(NotImplementedError, match="cannot be merged|merge_and_unload is not available"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        caprese_layers(model)[0].merge()


# ---- generation modes ----


def test_inference_mode_gives_the_no_grad_tokens(case):
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1)
    for lengths in ([6], [6, 4]):  # batch 1 takes GRIFFIN's merged weights, batch 2 the reference
        ids, mask = random_prompts(lengths, seed=7)
        with torch.no_grad():
            want = tokens(model, ids, mask)
        with torch.inference_mode():
            assert torch.equal(tokens(model, ids, mask), want)


def test_without_a_kv_cache_the_tokens_are_caprese_s(case):
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1)
    ids, mask = random_prompts([6, 8], seed=8)
    if "reselect_every" in CONFIGS[config]:
        with pytest.raises(NotImplementedError, match="needs generate\\(use_cache=True\\)"):
            tokens(model, ids, mask, use_cache=False)
        return
    cached = greedy(model, ids, mask, NEW)
    uncached = greedy(model, ids, mask, NEW, use_cache=False)
    assert torch.equal(uncached[0], cached[0])
    torch.testing.assert_close(uncached[1], cached[1], rtol=1e-4, atol=1e-4)
    with model.disable_adapter():
        dense = greedy(model, ids, mask, NEW, use_cache=False)
    assert (dense[1] - cached[1]).abs().max() > 1e-2  # not the dense model's, as it was before


def test_sampling_and_num_return_sequences(case):
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1)
    ids, mask = random_prompts([6, 4], seed=9)
    torch.manual_seed(0)
    got = tokens(model, ids, mask, do_sample=True, temperature=2.0, num_return_sequences=3)
    assert got.shape == (6, NEW)
    # the same draws as the prompts repeated by hand, through the reference formula
    torch.manual_seed(0)
    with decode_impl(model, "reference"):
        want = tokens(
            model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), do_sample=True, temperature=2.0
        )
    assert torch.equal(got, want)


def test_beam_search(case):
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1)
    ids, mask = random_prompts([6, 5], seed=10)
    if "reselect_every" in CONFIGS[config]:
        with pytest.raises(NotImplementedError, match="Beam search"):
            tokens(model, ids, mask, num_beams=3)
        return
    # the beams of one prompt share its statistics, so reordering them needs nothing more
    got = tokens(model, ids, mask, num_beams=3, num_return_sequences=2)
    with decode_impl(model, "reference"):
        assert torch.equal(got, tokens(model, ids, mask, num_beams=3, num_return_sequences=2))
    for row in range(2):  # each prompt alone gives its own beams
        alone_ids, alone_mask = ids[row : row + 1, mask[row].argmax() :], mask[row : row + 1, mask[row].argmax() :]
        assert torch.equal(
            got[2 * row : 2 * row + 2], tokens(model, alone_ids, alone_mask, num_beams=3, num_return_sequences=2)
        )


def test_inputs_embeds(case):
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1)
    ids, mask = random_prompts([5, 7], seed=11)
    embeds = model.get_input_embeddings()(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    # decode steps feed token ids again, so reselection reruns them as usual
    assert torch.equal(model.generate(inputs_embeds=embeds, **kwargs), tokens(model, ids, mask))


def test_holes_in_the_mask_are_left_out_of_the_statistics(case):
    """A masked token inside a prompt changes nothing: the row generates as if the token were not there."""
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1)
    ids, mask = random_prompts([8, 6], seed=12)
    holed = mask.clone()
    holed[0, 3] = 0
    without = torch.cat([ids[0, :3], ids[0, 4:]])[None]
    assert torch.equal(tokens(model, ids, holed)[:1], tokens(model, without, torch.ones_like(without)))


def test_bf16_with_holes_in_the_mask(case):
    arch, config = case
    model = alone(arch, CONFIGS[config], seed=1).to(torch.bfloat16)
    ids, mask = random_prompts([9, 6, 7], seed=13)
    mask[0, 4] = mask[2, 5] = 0
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert bool(torch.isfinite(torch.stack(out.logits, 1)).all())
    assert {p.dtype for n, p in model.named_parameters() if "caprese" in n} == {torch.bfloat16}
    with decode_impl(model, "reference"):  # the merged weights (GRIFFIN at batch 1) agree in bf16 too
        assert torch.equal(
            tokens(model, ids[:1], mask[:1]),
            model.generate(
                input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
            )[:, ids.shape[1] :],
        )


# ---- training says what to do ----


def test_a_plain_training_step_names_the_way_to_train():
    model = alone("llama", CONFIGS["cats"], seed=1).train()
    ids, mask = random_prompts([6, 4])
    with pytest.warns(UserWarning, match=r"CapreseTrainer.*caprese_peft\.teacher_forcing"):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert loss.grad_fn is None  # nothing trainable took part: the warning said why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # inference does not warn
        model.eval()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
