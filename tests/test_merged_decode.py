"""Merged decode (appendix D) inside CapreseLayer gives the reference path's greedy tokens and logits."""

from __future__ import annotations

import pytest
import torch

from caprese_peft import decode_impl, release_decode_caches, set_decode_impl
from caprese_peft.backbones import GriffinDecoder, GriffinStats
from caprese_peft.state import Phase, Step, find_state

from conftest import greedy, layers_of, random_prompts, tiny_model, wrap

NEW_TOKENS = 6
# logits of the tiny models reach ~10; bf16 rounds them (and every activation before them) to ~3 digits, and the
# CPU op sums up and down in fp32 where torch rounds the intermediate features to bf16
LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")


def built(layer) -> object:
    """What the layer's decoder built for its fast path (GRIFFIN's pruned weights, CATS's kernel weights), or None."""
    return layer.caprese_decoder["default"]._cache


def assert_same_greedy(want, got, prompt_width: int, dtype: torch.dtype) -> None:
    """Greedy tokens equal and logits close; in bf16 rounding may flip a near tie, after which rows diverge.

    A flip is accepted only where the reference's two best logits lie within the rounding noise of each other;
    the comparison of that row stops there, and most steps must still have been compared.
    """
    (want_seq, want_logits), (got_seq, got_logits) = want, got
    tol = LOGIT_TOL[dtype]
    if dtype == torch.float32:
        assert torch.equal(got_seq, want_seq)
        torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
        return
    compared = 0
    for row in range(want_seq.shape[0]):
        want_tokens, got_tokens = want_seq[row, prompt_width:], got_seq[row, prompt_width:]
        differ = (want_tokens != got_tokens).nonzero()
        stop = int(differ[0]) if len(differ) else len(want_tokens)
        torch.testing.assert_close(got_logits[row, : stop + 1], want_logits[row, : stop + 1], rtol=0.03, atol=tol)
        if stop < len(want_tokens):
            best = want_logits[row, stop].topk(2).values
            assert best[0] - best[1] < 2 * tol, f"row {row} step {stop}: tokens differ without a near tie"
        compared += stop
    assert compared >= want_seq.shape[0] * NEW_TOKENS // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backbone", ["griffin", "cats"])
def test_merged_decode_matches_reference(arch, backbone, dtype):
    model = wrap(arch, dtype, backbone=backbone)
    ids, mask = random_prompts([7, 3, 9])
    with decode_impl(model, "reference"):
        want = greedy(model, ids, mask, NEW_TOKENS)
    assert all(built(layer) is None for layer in layers_of(model))
    with decode_impl(model, "merged"):
        got = greedy(model, ids, mask, NEW_TOKENS)
    assert all(built(layer) is not None for layer in layers_of(model)), "the merged path did not run"
    assert_same_greedy(want, got, ids.shape[1], dtype)


@pytest.mark.parametrize("lengths", [[5], [5, 8, 3]])
def test_auto_on_cpu_decodes_both_backbones_through_the_cpu_ops(lengths):
    """CATS through the C++ op, GRIFFIN on the union of the batch's kept rows at any batch size: the same tokens."""
    ids, mask = random_prompts(lengths)
    for backbone in ("griffin", "cats"):
        model = wrap("llama", backbone=backbone, layers_to_transform=[0, 2])
        with decode_impl(model, "reference"):
            want = greedy(model, ids, mask, NEW_TOKENS)
        got = greedy(model, ids, mask, NEW_TOKENS)  # the default: auto
        assert_same_greedy(want, got, ids.shape[1], torch.float32)
        for layer in layers_of(model):
            assert layer.decode_impl == "auto" and built(layer) is not None
            if backbone == "griffin":
                assert built(layer)[2]  # the union's rows, read once for all sequences
        release_decode_caches(model)
        assert all(built(layer) is None for layer in layers_of(model))


def test_merged_decode_follows_reselection():
    """Reselection replaces the statistics object mid-generation; the merged GRIFFIN weights follow it."""
    model = wrap("qwen2", backbone="griffin", reselect_every=2)
    ids, mask = random_prompts([6, 9, 4])
    with decode_impl(model, "reference"):
        want = greedy(model, ids, mask, 7)
    with decode_impl(model, "merged"):
        got = greedy(model, ids, mask, 7)
    assert_same_greedy(want, got, ids.shape[1], torch.float32)


def decode_layer(model, batch: int = 2):
    """The first Caprese layer of ``model`` after a prefill, with the state set to a decode step, and an input."""
    ids, mask = random_prompts([7, 5][:batch])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    state = find_state(model)
    state.step = Step(Phase.DECODE, torch.ones(batch, 1, dtype=torch.bool), generation=state.generation)
    layer = layers_of(model)[0]
    x = torch.randn(batch, 1, layer.hidden_size, generator=torch.Generator().manual_seed(3))
    return layer, x


def run(layer, x, impl: str) -> torch.Tensor:
    layer.decode_impl = impl
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("cpu_ops", [True, False], ids=["cpu-op", "per-sequence"])
def test_griffin_weights_follow_new_statistics(cpu_ops, monkeypatch):
    """Per-sequence copies are rebuilt for a new selection; the CPU op reads the new selection in place."""
    if not cpu_ops:  # the per-sequence copies, as on a GPU
        monkeypatch.setattr(GriffinDecoder, "cpu_kernel_applies", lambda self, x: False)
    layer, x = decode_layer(wrap("llama", backbone="griffin"), batch=1)
    first = run(layer, x, "merged")
    torch.testing.assert_close(first, run(layer, x, "reference"), rtol=1e-5, atol=1e-5)
    weights = built(layer)[3]
    assert run(layer, x, "merged") is not None and built(layer)[3] is weights  # reused, not rebuilt

    old = layer._stats
    score = old.score.roll(7, dims=-1)  # another selection, as a reselection would make
    layer._stats = GriffinStats(score=score, keep=old.keep.roll(7, dims=-1))
    second = run(layer, x, "merged")
    assert (built(layer)[3] is weights) == cpu_ops  # the whole block, read where the new selection says
    assert built(layer)[0] is (None if cpu_ops else layer._stats)
    torch.testing.assert_close(second, run(layer, x, "reference"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second, atol=1e-3)


@pytest.mark.parametrize("backbone", ["griffin", "cats"])
def test_merged_weights_follow_in_place_updates_of_the_factors(backbone):
    layer, x = decode_layer(wrap("mistral", backbone=backbone))
    before = run(layer, x, "merged")
    with torch.no_grad():
        layer.caprese_R["default"].mul_(3.0)  # as an optimizer step or load_state_dict would update it
    after = run(layer, x, "merged")
    torch.testing.assert_close(after, run(layer, x, "reference"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)


def test_backbone_only_cats_weights_leave_the_factors_out():
    layer, _ = decode_layer(wrap("llama", backbone="cats"))
    decoder = layer.caprese_decoder["default"]
    full, alone = decoder.weights(), decoder.weights(low_rank=False)
    assert full.rank == 8 and alone.rank == 0
    assert decoder.weights() is full  # cached per low_rank


def test_steps_that_need_gradients_run_the_reference():
    layer, x = decode_layer(wrap("llama", backbone="griffin"))
    layer.decode_impl = "auto"
    out = layer(x)  # grad mode on, L and R require grad
    assert built(layer) is None
    out.sum().backward()
    assert layer.caprese_L["default"].grad is not None
    layer.decode_impl = "merged"
    with pytest.raises(ValueError, match="merged weights are built without autograd"):
        layer(x)


def test_set_decode_impl_validates_and_decode_impl_restores():
    model = wrap("llama", backbone="cats")
    with pytest.raises(ValueError, match="impl must be one of"):
        set_decode_impl(model, "fast")
    with pytest.raises(ValueError, match="use_kernels must be"):
        set_decode_impl(model, "merged", use_kernels="yes")
    with pytest.raises(ValueError, match="has no Caprese layers"):
        set_decode_impl(tiny_model("llama"), "merged")
    set_decode_impl(model, "reference")
    with decode_impl(model, "merged", use_kernels=False):
        assert {(m.decode_impl, m.decode_use_kernels) for m in layers_of(model)} == {("merged", False)}
    assert {(m.decode_impl, m.decode_use_kernels) for m in layers_of(model)} == {("reference", None)}


def test_kernel_choice_can_be_forced_off_and_on_cpu_fails_clearly():
    layer, x = decode_layer(wrap("llama", backbone="cats"))
    layer.decode_use_kernels = False
    torch.testing.assert_close(run(layer, x, "merged"), run(layer, x, "reference"), rtol=1e-5, atol=1e-5)
    import caprese_peft.kernels as kernels

    if not kernels.INTERPRET:
        layer.decode_use_kernels = True
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            run(layer, x, "auto")


@pytest.mark.kernels
def test_cats_kernel_inside_the_layer_matches_reference():
    """The Triton op (interpreted on a CPU) serves the decode steps of a whole generation."""
    kernels = pytest.importorskip("caprese_peft.kernels", reason="needs triton")
    if not (torch.cuda.is_available() or kernels.INTERPRET):
        pytest.skip("kernels was imported without TRITON_INTERPRET=1; run this file in a fresh process")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = wrap("gemma2", backbone="cats", layers_to_transform=[1, 3]).to(device)  # gelu_tanh
    ids, mask = (t.to(device) for t in random_prompts([6, 4]))
    with decode_impl(model, "reference"):
        want = greedy(model, ids, mask, 4)
    with decode_impl(model, "auto", use_kernels=True):
        got = greedy(model, ids, mask, 4)
    assert all(built(layer) is not None for layer in layers_of(model))
    assert_same_greedy(want, got, ids.shape[1], torch.float32)


def test_kernel_weights_share_the_model_s_and_leave_the_base_bit_identical():
    """The CATS decode weights read Wg and W1 in place; prefill and the disabled adapter still equal the base."""
    base = tiny_model("qwen2")
    model = wrap(tiny_model("qwen2"), backbone="cats")
    ids, mask = random_prompts([7, 5])
    with decode_impl(model, "merged"):
        greedy(model, ids, mask, NEW_TOKENS)  # builds the kernel weights of every layer
    layer = layers_of(model)[0]
    assert built(layer)[True][1].gate.data_ptr() == layer.base_layer.gate_proj.weight.data_ptr()
    with model.disable_adapter():
        disabled = greedy(model, ids, mask, NEW_TOKENS)
    want = greedy(base.requires_grad_(False), ids, mask, NEW_TOKENS)
    assert torch.equal(disabled[0], want[0]) and torch.equal(disabled[1], want[1])
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(prefill, base(input_ids=ids, attention_mask=mask).logits)
