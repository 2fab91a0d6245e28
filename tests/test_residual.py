"""The Figure 1 residual analysis on a tiny random Llama, checked against a brute-force lstsq + SVD."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from caprese_peft import CapreseConfig
from caprese_peft.eval import ff_residual_errors, plot_residual_errors

from conftest import random_prompts, tiny_model

HIDDEN = 48  # conftest's hidden size
DENSITIES = [0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def long_batch():
    # 2 left-padded rows, 10 prompt tokens each, 60 + 50 = 110 generated tokens > HIDDEN
    ids, mask = random_prompts([70, 60])
    return ids, mask


def _table(rows: list[dict]) -> dict[tuple[int, float, int], float]:
    return {(r["layer"], r["density"], r["rank"]): r["relative_error"] for r in rows}


def _brute_force(model, ids, mask, prompt_len: int, layer: int, density: float, rank: int) -> float:
    """lstsq + SVD of the fitted values, from inputs captured independently of the code under test."""
    captured = {}
    mlp = model.model.layers[layer].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    handle.remove()
    generated = mask.bool() & (mask.cumsum(-1) > prompt_len)
    x = captured["x"][generated].double()  # (N, D)
    w_gate, w_up, w_down = (p.weight.detach().double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    z = mlp.act_fn(x @ w_gate.T) * (x @ w_up.T)
    k = round(density * z.shape[-1])
    threshold = z.abs().sort(dim=-1, descending=True).values[:, k - 1 : k]
    z_topk = torch.where(z.abs() >= threshold, z, torch.zeros_like(z))
    dense, error = z @ w_down.T, (z - z_topk) @ w_down.T
    assert torch.allclose(dense, captured["out"][generated].double(), atol=1e-4)
    left = error
    if rank:
        b_ols = torch.linalg.lstsq(x, error, driver="gelsd").solution  # (D, D)
        fitted = x @ b_ols
        _, _, vh = torch.linalg.svd(fitted, full_matrices=False)
        left = error - fitted @ vh[:rank].T @ vh[:rank]
    return float(left.norm() / dense.norm())


def test_rows_cover_every_layer_density_and_rank(model, long_batch):
    ids, mask = long_batch
    rows = ff_residual_errors(model, ids, mask, 10, DENSITIES, [16, 8])
    assert {(r["layer"], r["density"], r["rank"]) for r in rows} == {
        (layer, d, r) for layer in range(4) for d in DENSITIES for r in (0, 8, 16)
    }
    assert all(r["tokens"] == 110 for r in rows)


def test_error_falls_with_density_and_rank_and_vanishes_at_full_density(model, long_batch):
    ids, mask = long_batch
    ranks = [0, 4, 16, HIDDEN]
    table = _table(ff_residual_errors(model, ids, mask, 10, DENSITIES, ranks))
    for layer in range(4):
        for rank in ranks:
            errors = [table[layer, d, rank] for d in DENSITIES]
            assert errors[0] > 0.01  # a quarter of the neurons visibly changes the output
            assert all(a > b for a, b in zip(errors, errors[1:])), (layer, rank, errors)
            assert errors[-1] == 0.0  # density 1 keeps every neuron
        for density in DENSITIES[:-1]:
            errors = [table[layer, density, r] for r in ranks]
            assert all(a > b for a, b in zip(errors, errors[1:])), (layer, density, errors)
            assert errors[-1] > 0  # 110 tokens > 48 dimensions: a linear map cannot fit the residual exactly


@pytest.mark.parametrize("layer, density, rank", [(0, 0.5, 0), (1, 0.25, 8), (2, 0.5, 16), (3, 0.75, HIDDEN)])
def test_matches_brute_force_lstsq_and_svd(model, long_batch, layer, density, rank):
    ids, mask = long_batch
    table = _table(ff_residual_errors(model, ids, mask, 10, [density], [rank], layers=[layer]))
    assert table[layer, density, rank] == pytest.approx(
        _brute_force(model, ids, mask, 10, layer, density, rank), rel=1e-4
    )


def test_full_rank_fits_exactly_with_fewer_tokens_than_dimensions(model):
    # 30 generated tokens < 48 dimensions: X has full row rank, so any rank >= 30 reproduces E exactly
    ids, mask = random_prompts([40])
    table = _table(ff_residual_errors(model, ids, mask, 10, [0.5], [8, 30, HIDDEN]))
    for layer in range(4):
        assert table[layer, 0.5, 0] > 0.01
        assert table[layer, 0.5, 8] > 1e-3
        assert table[layer, 0.5, 30] < 1e-6
        assert table[layer, 0.5, HIDDEN] < 1e-6


def test_prompt_length_mask_and_per_row_lengths_agree(model, long_batch):
    ids, mask = long_batch
    prompt_mask = mask.bool() & (mask.cumsum(-1) <= 10)
    by_length = ff_residual_errors(model, ids, mask, 10, [0.5], [8], layers=[1])
    by_mask = ff_residual_errors(model, ids, mask, prompt_mask, [0.5], [8], layers=[1])
    by_rows = ff_residual_errors(model, ids, mask, [10, 10], [0.5], [8], layers=[1])
    assert by_length == by_mask == by_rows
    longer = ff_residual_errors(model, ids, mask, [30, 10], [0.5], [8], layers=[1])
    assert longer[0]["tokens"] == 90


def test_bad_input_fails_early(model, long_batch):
    ids, mask = long_batch
    with pytest.raises(ValueError, match="densities"):
        ff_residual_errors(model, ids, mask, 10, [0.0], [8])
    with pytest.raises(ValueError, match="ranks must lie"):
        ff_residual_errors(model, ids, mask, 10, [0.5], [HIDDEN + 1])
    with pytest.raises(ValueError, match="out of range"):
        ff_residual_errors(model, ids, mask, 10, [0.5], [8], layers=[4])
    with pytest.raises(ValueError, match="No generated token"):
        ff_residual_errors(model, ids, mask, 70, [0.5], [8])


def test_caprese_model_needs_its_adapter_disabled():
    base = tiny_model("llama")
    ids, mask = random_prompts([30])
    expected = ff_residual_errors(base, ids, mask, 10, [0.5], [8], layers=[0])
    peft_model = get_peft_model(base, CapreseConfig(backbone="cats", density=0.5, r=4))
    with pytest.raises(ValueError, match="disable_adapter"):
        ff_residual_errors(peft_model, ids, mask, 10, [0.5], [8], layers=[0])
    with peft_model.disable_adapter():
        assert ff_residual_errors(peft_model, ids, mask, 10, [0.5], [8], layers=[0]) == expected


def test_plot_residual_errors_writes_png(model, long_batch, tmp_path):
    ids, mask = long_batch
    rows = ff_residual_errors(model, ids, mask, 10, [0.5, 1.0], [8], layers=[0, 1])
    path = plot_residual_errors(rows, tmp_path / "figure1.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.parametrize("arch, dtype", [("gemma2", torch.bfloat16), ("qwen3", torch.float16)])
def test_other_architectures_and_half_precision(arch, dtype):
    # Gemma's GELU gate and a half-precision forward: the fp32 recomputation still matches each block
    model = tiny_model(arch).to(dtype)
    ids, mask = random_prompts([40, 30])
    table = _table(ff_residual_errors(model, ids, mask, 10, [0.5, 1.0], [8]))
    for layer in range(4):
        assert table[layer, 0.5, 0] > table[layer, 0.5, 8] > 0
        assert table[layer, 1.0, 0] == 0.0
