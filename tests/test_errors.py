"""Bad input fails early, says what was wrong and what is accepted, and leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import DynamicCache

import caprese_peft
from caprese_peft import CapreseConfig, CapreseLayer

from conftest import random_prompts, tiny_model


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
        CapreseConfig(density=density)


@pytest.mark.parametrize("r", [0, -3, 2.5])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        CapreseConfig(r=r)


def test_rank_above_hidden_size():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"r=49 exceeds the model's hidden size 48"):
        get_peft_model(model, CapreseConfig(r=49))
    assert not any(isinstance(m, CapreseLayer) for m in model.modules())


def test_unknown_backbone():
    with pytest.raises(ValueError, match=r"Unknown backbone 'teal'. Known backbones: \['cats', 'griffin'\]"):
        CapreseConfig(backbone="teal")


def test_layer_index_out_of_range():
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match=r"indices \[4, 9\], but the model has 4 layers \(valid: 0 to 3\)"):
        get_peft_model(model, CapreseConfig(r=4, layers_to_transform=[0, 4, 9]))
    assert not any(isinstance(m, CapreseLayer) for m in model.modules())


def test_unsupported_module_names_what_was_found():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"cannot wrap 'model.layers.0.self_attn' \(LlamaAttention\).*q_proj"):
        get_peft_model(model, CapreseConfig(r=4, target_modules=["self_attn"]))
    assert not any(isinstance(m, CapreseLayer) for m in model.modules())


def test_no_matching_module():
    with pytest.raises(ValueError, match="No module of LlamaForCausalLM matches"):
        get_peft_model(tiny_model("llama"), CapreseConfig(r=4, target_modules=["feed_forward"]))


def test_adapter_for_another_base_shape(tmp_path):
    get_peft_model(tiny_model("llama"), CapreseConfig(r=4)).save_pretrained(tmp_path)
    other = tiny_model("llama", hidden_size=64)
    with pytest.raises(ValueError, match=r"made for a base model with hidden_size=48.*has hidden_size=64"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, CapreseLayer) for m in other.modules())


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])  # transformers 5.x and older names
def test_multi_token_step_on_a_filled_cache_is_refused(cache_kwarg):
    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    ids, mask = random_prompts([5])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg: cache})
        with pytest.raises(NotImplementedError, match="Assisted or speculative decoding"):
            model(input_ids=ids[:, :2], use_cache=True, **{cache_kwarg: cache})


def test_assisted_generation_is_refused():
    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    ids, mask = random_prompts([6])
    with pytest.raises(NotImplementedError, match="Assisted or speculative decoding"):
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, assistant_model=tiny_model("llama", seed=3)
        )


def test_decode_after_a_prefill_without_the_adapter():
    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    ids, mask = random_prompts([5])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with model.disable_adapter():
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="Decode step without statistics from this prompt"):
            model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)


def test_four_dimensional_mask_in_prefill():
    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    ids, _ = random_prompts([5])
    with pytest.raises(ValueError, match="needs a 2D"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 5, 5))


def test_teacher_forcing_masks_must_fit():
    from caprese_peft import teacher_forcing

    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    ids, _ = random_prompts([6])
    with pytest.raises(ValueError, match="prompt mask of shape"), teacher_forcing(model, torch.ones(1, 3)):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="no Caprese adapter"), teacher_forcing(tiny_model("llama"), torch.ones(1, 6)):
        pass


def test_several_tokens_on_a_filled_cache_run_sparse_only_inside_continuation():
    from caprese_peft.state import continuation

    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4, init_weights=False))
    ids = torch.randint(3, 90, (2, 9))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :5], cache=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match="one generated token per forward"):
            model(input_ids=ids[:, 5:], cache=copy.deepcopy(cache), use_cache=True)
        with continuation(model):
            continued = model(input_ids=ids[:, 5:], cache=cache, use_cache=True).logits
        with caprese_peft.teacher_forcing(model, torch.arange(9).expand(2, 9) < 5):
            forced = model(input_ids=ids).logits[:, 5:]
    torch.testing.assert_close(continued, forced, rtol=1e-4, atol=1e-5)  # the tokens after the prompt ran sparse
