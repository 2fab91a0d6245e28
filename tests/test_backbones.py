"""The backbones as pure functions, and plugging in a backbone of one's own."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from caprese_peft import Backbone, CapreseConfig, available_backbones, register_backbone
from caprese_peft.backbones import Cats, Griffin
from caprese_peft.backbones import base as backbone_base
from caprese_peft.backbones import cats as cats_module
from caprese_peft.backbones import griffin as griffin_module
from caprese_peft.backbones.cats import THRESHOLD_SAMPLE
from caprese_peft.backbones.griffin import griffin_scores

from conftest import random_prompts, tiny_model


@pytest.fixture(autouse=True, params=["cpu-op", "torch"])
def statistics_path(request, monkeypatch):
    """Every test twice: statistics through the C++ op (where it builds) and through the torch specification."""
    if request.param == "torch":
        monkeypatch.setattr(cats_module, "statistics_op", lambda values: None)
        monkeypatch.setattr(griffin_module, "statistics_op", lambda values: None)
    return request.param


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_griffin_score_by_hand():
    z = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]])  # one sequence, two tokens, three neurons
    score = griffin_scores(z, torch.ones(1, 2, dtype=torch.bool))
    # token rows normalised: [0.6, 0.8, 0] and [0, 0, 1]; then l2 over tokens per neuron
    torch.testing.assert_close(score, torch.tensor([[0.6, 0.8, 1.0]]))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77, 1.0])
def test_griffin_keeps_round_density_neurons(density):
    gate, z = _random(3, 11, 101), _random(3, 11, 101, seed=1)
    stats = Griffin(density).calibrate(gate, z, torch.ones(3, 11, dtype=torch.bool))
    assert stats.keep.shape == (3, 1, 101)
    assert (stats.keep.sum(-1) == max(1, round(density * 101))).all()
    kept_min = torch.where(stats.keep[:, 0], stats.score, torch.inf).amin(-1)
    dropped_max = torch.where(stats.keep[:, 0], -torch.inf, stats.score).amax(-1)
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_cats_threshold_keeps_density_of_prompt(density):
    gate = _random(2, 13, 57)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False  # left padding in the second row
    stats = Cats(density).calibrate(gate, gate, mask)
    for row in range(2):
        values = gate[row][mask[row]].abs()
        assert (values > stats.threshold[row]).sum() == round(density * values.numel())


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.99])
def test_cats_threshold_is_the_kth_smallest_magnitude_even_with_ties(density):
    gate = torch.randint(-6, 7, (3, 17, 29), generator=torch.Generator().manual_seed(4)).float()  # many ties
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[2, :5] = False
    threshold = Cats(density).calibrate(gate, gate, mask).threshold
    for row in range(3):
        values = gate[row][mask[row]].abs().flatten()
        n_drop = values.numel() - round(density * values.numel())
        assert threshold[row].item() == values.kthvalue(n_drop).values.item()


@pytest.mark.parametrize("density", [0.3, 0.5, 0.8])
def test_a_long_prompt_calibrates_on_a_fixed_sample(density):
    """Past THRESHOLD_SAMPLE values the threshold is the order statistic of a sample: close to the exact one, the
    same for a prompt alone and in a left-padded batch, and blind to padding."""
    assert THRESHOLD_SAMPLE < 300 * 57
    gate = _random(1, 300, 57, seed=5)
    alone = Cats(density).calibrate(gate, gate, torch.ones(1, 300, dtype=torch.bool)).threshold
    kept = (gate.abs() > alone).float().mean().item()
    assert abs(kept - density) < 4 * 0.5 / THRESHOLD_SAMPLE**0.5  # four standard deviations of the rank error
    exact = gate.abs().flatten().kthvalue(gate.numel() - round(density * gate.numel())).values
    assert alone.item() != exact.item()  # sampled, not the exact selection

    batch = torch.cat([_random(1, 40, 57, seed=6) * 100, gate], dim=1).repeat(2, 1, 1)  # loud padding first
    batch[1] = torch.cat([_random(1, 340, 57, seed=7)], dim=1)[0]  # another, longer prompt beside it
    mask = torch.ones(2, 340, dtype=torch.bool)
    mask[0, :40] = False
    together = Cats(density).calibrate(batch, batch, mask).threshold
    assert together[0].item() == alone.item()


def test_cats_density_one_keeps_everything():
    gate = _random(1, 5, 9)
    gate[0, 0, 0] = 0.0
    stats = Cats(1.0).calibrate(gate, gate, torch.ones(1, 5, dtype=torch.bool))
    assert Cats(1.0).keep_mask(gate, stats).all()


@pytest.mark.parametrize("backbone", [Griffin(0.4), Cats(0.4)])
def test_padding_never_enters_a_statistic(backbone):
    gate, z = _random(1, 6, 40), _random(1, 6, 40, seed=1)
    padded_gate = torch.cat([_random(1, 3, 40, seed=2) * 100, gate], dim=1)  # loud garbage in the padding
    padded_z = torch.cat([_random(1, 3, 40, seed=3) * 100, z], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    plain = backbone.calibrate(gate, z, torch.ones(1, 6, dtype=torch.bool))
    padded = backbone.calibrate(padded_gate, padded_z, mask)
    probe = _random(1, 1, 40, seed=4)
    assert torch.equal(backbone.keep_mask(probe, plain), backbone.keep_mask(probe, padded))


def test_a_sequence_without_prompt_tokens_is_refused():
    with pytest.raises(ValueError, match=r"Sequences \[1\] have no prompt tokens"):
        Cats(0.5).calibrate(_random(2, 3, 8), _random(2, 3, 8), torch.tensor([[1, 1, 1], [0, 0, 0]]).bool())


def test_a_custom_backbone_plugs_in(monkeypatch):
    monkeypatch.setattr(backbone_base, "_REGISTRY", dict(backbone_base._REGISTRY))  # keep the registration local

    @register_backbone
    class FirstNeurons(Backbone):
        """Keeps a fixed prefix of neurons, whatever the prompt."""

        name = "first-neurons-test"

        def calibrate(self, gate, z, token_mask):
            return round(self.density * gate.shape[-1])

        def keep_mask(self, gate, stats):
            keep = torch.zeros(gate.shape[-1], dtype=torch.bool, device=gate.device)
            keep[:stats] = True
            return keep

        def active_ff_weights(self, hidden_size, intermediate_size):
            return 3.0 * hidden_size * round(self.density * intermediate_size)

    assert "first-neurons-test" in available_backbones()
    model = get_peft_model(tiny_model("mistral"), CapreseConfig(backbone="first-neurons-test", r=4))
    ids, mask = random_prompts([5, 2])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)

    with pytest.raises(ValueError, match="already registered"):

        @register_backbone
        class Clash(FirstNeurons):
            name = "cats"

    with pytest.raises(TypeError, match="subclass of caprese_peft.Backbone"):
        register_backbone(object)
