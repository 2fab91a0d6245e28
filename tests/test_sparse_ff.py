"""Merged inference (appendix D) equals the unmerged decode formula of CapreseLayer on odd shapes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from caprese_peft.backbones import Cats, Griffin
from caprese_peft.sparse_ff import (
    cats_merged_ff,
    griffin_fused_ff,
    griffin_merged_ff,
    griffin_merged_weights,
    keep_indices,
)

D, FF, R, B = 40, 77, 5, 3
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


def make_block(seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 FF weights, low-rank factors and a prompt, scaled so gate pre-activations are O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = D**-0.5) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    return {
        "Wg": randn(FF, D),
        "W1": randn(FF, D),
        "W2": randn(D, FF, scale=FF**-0.5),
        "L": randn(D, R),
        "R": randn(R, D),
        "prompt": randn(B, 9, D, scale=1.0),
        "x": randn(B, 1, D, scale=1.0),
    }


def unmerged(x, w, keep, act):
    """The decode branch of CapreseLayer.forward: ``down(act(gate(x)) * up(x) * keep) + x @ L @ R``."""
    z = act(F.linear(x, w["Wg"])) * F.linear(x, w["W1"])
    return F.linear(z * keep, w["W2"]) + (x @ w["L"]) @ w["R"]


def prompt_features(w, act):
    gate = act(F.linear(w["prompt"], w["Wg"]))
    return gate, gate * F.linear(w["prompt"], w["W1"]), torch.ones(B, w["prompt"].shape[1], dtype=torch.bool)


@pytest.mark.parametrize("act_name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("density", [0.3, 0.65])
def test_griffin_merged_matches_unmerged(act_name, density):
    act = ACTIVATIONS[act_name]
    w = make_block(seed=int(density * 100))
    stats = Griffin(density).calibrate(*prompt_features(w, act))
    keep_idx = keep_indices(stats.keep)
    assert keep_idx.shape == (B, round(density * FF))
    # sequences keep different neurons, so per-sequence weights are really needed
    assert not torch.equal(keep_idx[0], keep_idx[1])

    merged = griffin_merged_weights(w["Wg"], w["W1"], w["W2"], w["L"], w["R"], keep_idx)
    out = griffin_merged_ff(w["x"], merged, act)
    expected = unmerged(w["x"], w, stats.keep, act)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    dense = unmerged(w["x"], w, torch.ones(FF, dtype=torch.bool), act)
    assert (out - dense).abs().max() > 1e-2, "pruning must change the output, or this test checks nothing"


def test_griffin_fused_equals_merged():
    w = make_block(seed=2)
    keep_idx = torch.stack([torch.randperm(FF)[:13].sort().values for _ in range(B)])
    merged = griffin_merged_weights(w["Wg"], w["W1"], w["W2"], w["L"], w["R"], keep_idx)
    gate_up = torch.cat([merged.gate, merged.up], dim=1)
    x = torch.randn(B, 2, D, generator=torch.Generator().manual_seed(2))
    want = griffin_merged_ff(x, merged, F.silu)
    torch.testing.assert_close(griffin_fused_ff(x, gate_up, merged.down, 13, F.silu), want, rtol=1e-5, atol=1e-5)


def test_griffin_merged_weights_layout():
    w = make_block(seed=1)
    keep_idx = torch.stack([torch.randperm(FF)[:11].sort().values for _ in range(B)])
    merged = griffin_merged_weights(w["Wg"], w["W1"], w["W2"], w["L"], w["R"], keep_idx)
    assert merged.gate.shape == (B, 11, D)
    assert merged.up.shape == (B, 11 + R, D)
    assert merged.down.shape == (B, D, 11 + R)
    for row in range(B):
        idx = keep_idx[row]
        torch.testing.assert_close(merged.gate[row], w["Wg"][idx], rtol=0, atol=0)
        torch.testing.assert_close(merged.up[row], torch.cat([w["W1"][idx], w["L"].T]), rtol=0, atol=0)
        torch.testing.assert_close(merged.down[row], torch.cat([w["W2"][:, idx], w["R"].T], dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("act_name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("tokens", [1, 4])
def test_cats_merged_matches_unmerged(act_name, tokens):
    act = ACTIVATIONS[act_name]
    w = make_block(seed=7 + tokens)
    threshold = Cats(0.5).calibrate(*prompt_features(w, act)).threshold  # (B, 1, 1)
    x = torch.randn(B, tokens, D, generator=torch.Generator().manual_seed(tokens))
    keep = act(F.linear(x, w["Wg"])).abs() > threshold
    assert 0.2 < keep.float().mean() < 0.8, "the prompt threshold should keep a fraction of the neurons"

    out = cats_merged_ff(x, w["Wg"], w["W1"], w["W2"], w["L"], w["R"], threshold, act)
    torch.testing.assert_close(out, unmerged(x, w, keep, act), rtol=1e-5, atol=1e-5)
    dense = unmerged(x, w, torch.ones(FF, dtype=torch.bool), act)
    assert (out - dense).abs().max() > 1e-2, "thresholding must change the output, or this test checks nothing"


def test_cats_merged_low_rank_is_added():
    w = make_block(seed=3)
    threshold = torch.full((B, 1, 1), 0.2)
    with_lr = cats_merged_ff(w["x"], w["Wg"], w["W1"], w["W2"], w["L"], w["R"], threshold, F.silu)
    without = cats_merged_ff(w["x"], w["Wg"], w["W1"], w["W2"], w["L"], torch.zeros_like(w["R"]), threshold, F.silu)
    torch.testing.assert_close(with_lr - without, (w["x"] @ w["L"]) @ w["R"], rtol=1e-5, atol=1e-5)


def test_keep_indices_round_trip_and_rejects_ragged_masks():
    keep = torch.zeros(2, 1, 6, dtype=torch.bool)
    keep[0, 0, [1, 4]] = True
    keep[1, 0, [0, 5]] = True
    assert keep_indices(keep).tolist() == [[1, 4], [0, 5]]
    keep[1, 0, 2] = True
    with pytest.raises(ValueError, match="same number of kept neurons"):
        keep_indices(keep)


def test_shape_errors_name_the_offending_tensor():
    w = make_block(seed=0)
    with pytest.raises(ValueError, match="down_weight has shape"):
        cats_merged_ff(w["x"], w["Wg"], w["W1"], w["W2"].T, w["L"], w["R"], torch.zeros(B, 1, 1), F.silu)
    with pytest.raises(ValueError, match="threshold must be"):
        cats_merged_ff(w["x"], w["Wg"], w["W1"], w["W2"], w["L"], w["R"], torch.zeros(B), F.silu)
    with pytest.raises(ValueError, match="low_rank_right has shape"):
        griffin_merged_weights(w["Wg"], w["W1"], w["W2"], w["L"], w["R"].T, torch.zeros(B, 2, dtype=torch.long))
