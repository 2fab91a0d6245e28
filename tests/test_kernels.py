"""The fused CATS + low-rank Triton op matches its torch reference ``cats_merged_ff``; on CPU via the interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed, so its kernels cannot run (triton ships for Linux)")

import torch.nn.functional as F  # noqa: E402

from caprese_peft.kernels import (  # noqa: E402
    INTERPRET,
    MAX_BATCH,
    cats_ff,
    cats_ff_triton,
    gpu_down_configs,
    gpu_up_configs,
    prepare_cats_weights,
    prune_by_registers,
)
from caprese_peft.kernels.problems import ff_problem  # noqa: E402
from caprese_peft.sparse_ff import cats_merged_ff  # noqa: E402

pytestmark = pytest.mark.kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip(
        "kernels was imported before TRITON_INTERPRET=1 could be set, so its kernels were built for a GPU; "
        "run tests/test_kernels.py in a fresh process",
        allow_module_level=True,
    )

D, FF, R = 72, 200, 8  # odd sizes: no block divides them
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
# rtol = atol. The op accumulates in fp32 and rounds once at the end; fp16/bf16 error is the rounding of the
# gate pre-activation (x @ Wg^T in the input dtype) and of the output. Measured worst |err| / (1 + |ref|) on
# these shapes: fp32 5e-7, fp16 6e-4, bf16 4e-3.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_problem(batch: int, dtype: torch.dtype, seed: int, hidden: int = D, ff: int = FF, rank: int = R):
    """Random x ``(B, D)`` and weights ``(Wg, W1, W2, L, R)`` in ``dtype`` on the test device."""
    return ff_problem(batch, hidden, ff, rank, dtype=dtype, device=DEVICE, seed=seed)


def half_threshold(x: torch.Tensor, gate_weight: torch.Tensor, act) -> torch.Tensor:
    """Per sequence, a threshold keeping about half the neurons, in a wide gap between ``|gate|`` values.

    A value at the threshold could fall either side in two precisions; the gap keeps the keep mask the same for
    the fp32 reference and the op's low-precision gate, so the test compares arithmetic, not a coin toss.
    """
    exact = act(x.float() @ gate_weight.float().T).abs()  # (B, F)
    rounded = act((x @ gate_weight.T).float()).abs()  # (B, F): the op's gate, from the same torch GEMV
    thresholds = []
    for exact_row, rounded_row in zip(exact, rounded):
        values = exact_row.sort().values
        band = values[int(0.4 * len(values)) : int(0.6 * len(values))]
        for i in band.diff().argsort(descending=True)[:32].tolist():  # widest gaps first
            threshold = (band[i] + band[i + 1]) / 2
            margin = min((exact_row - threshold).abs().min(), (rounded_row - threshold).abs().min())
            if torch.equal(exact_row > threshold, rounded_row > threshold) and margin > 1e-4 * threshold:
                thresholds.append(threshold)
                break
        else:
            raise AssertionError("no gap separates the fp32 and low-precision gates alike: change the seed")
    return torch.stack(thresholds)  # (B,)


def reference(x, weights, threshold, act) -> torch.Tensor:
    """``cats_merged_ff`` in fp32 on the same (rounded) inputs: the exact answer the op approximates."""
    upcast = [w.float() for w in weights]
    return cats_merged_ff(x.float()[:, None], *upcast, threshold.view(-1, 1, 1), act)[:, 0]  # (B, D)


@pytest.mark.parametrize("interleave", [True, False], ids=["side-by-side", "separate"])
@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
@pytest.mark.parametrize("act_name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_op_matches_reference(dtype, act_name, batch, interleave):
    """Both layouts of the up and down rows: separate (a GPU's default) and side by side (a CPU's)."""
    act = ACTIVATIONS[act_name]
    x, weights = make_problem(batch, dtype, seed=batch)
    threshold = half_threshold(x, weights[0], act)
    kept = (act(x.float() @ weights[0].float().T).abs() > threshold[:, None]).float().mean()
    assert 0.35 < kept < 0.65

    prepared = prepare_cats_weights(*weights, interleave=interleave)
    out = cats_ff(x, prepared, threshold, act_name, use_kernels=True)
    assert out.shape == x.shape and out.dtype == dtype
    expected = reference(x, weights, threshold, act)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    # the comparison can fail: an op ignoring the threshold, or the low-rank neurons, would not pass it
    dense = reference(x, weights, torch.full_like(threshold, -1.0), act)
    assert not torch.allclose(dense, expected, rtol=tol, atol=tol)
    low_rank = (x.float() @ weights[3].float()) @ weights[4].float()
    assert not torch.allclose(expected - low_rank, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_rank_neurons_are_always_active(dtype):
    x, weights = make_problem(3, dtype, seed=11)
    none_kept = torch.full((3,), 1e9, device=DEVICE)
    out = cats_ff(x, prepare_cats_weights(*weights), none_kept, "silu", use_kernels=True)
    expected = (x.float() @ weights[3].float()) @ weights[4].float()  # every FF neuron off: only x @ L @ R
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weights_of_neurons_no_sequence_keeps_are_never_read(dtype):
    """The point of the kernel: up and down rows of neurons inactive for the whole batch stay unread."""
    x, weights = make_problem(2, dtype, seed=13)
    threshold = half_threshold(x, weights[0], F.silu)
    expected = reference(x, weights, threshold, F.silu)
    prepared = prepare_cats_weights(*weights)
    unused = ~(F.silu(x.float() @ weights[0].float().T).abs() > threshold[:, None]).any(dim=0)  # (F,)
    assert 10 < unused.sum() < FF // 2
    prepared.up[unused] = float("nan")  # any read of these rows would turn the output into nan
    prepared.down_t[unused] = float("nan")
    out = cats_ff(x, prepared, threshold, "silu", use_kernels=True)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_rank_zero_is_plain_cats():
    x, weights = make_problem(2, torch.float32, seed=5, rank=0)
    threshold = half_threshold(x, weights[0], F.silu)
    prepared = prepare_cats_weights(*weights)
    assert prepared.rank == 0
    out = cats_ff(x, prepared, threshold, "silu", use_kernels=True)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, reference(x, weights, threshold, F.silu), rtol=tol, atol=tol)


def test_op_passes_opcheck():
    """Schema, fake (meta) implementation and tracing of ``torch.ops.caprese.cats_ff`` are consistent."""
    x, weights = make_problem(2, torch.float32, seed=3)
    prepared = prepare_cats_weights(*weights)
    threshold = half_threshold(x, weights[0], F.silu)
    args = (x, *prepared.op_args(), threshold, "silu")
    torch.library.opcheck(
        torch.ops.caprese.cats_ff.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_op_compiles_without_graph_breaks():
    x, weights = make_problem(3, torch.float32, seed=4)
    prepared = prepare_cats_weights(*weights)
    threshold = half_threshold(x, weights[0], F.silu)

    def step(x: torch.Tensor) -> torch.Tensor:
        return cats_ff(x, prepared, threshold, "silu", use_kernels=True) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)


def test_dispatcher_picks_the_op_only_where_it_applies(monkeypatch):
    calls = []
    module = importlib.import_module(
        "caprese_peft.kernels.cats_ff"
    )  # `kernels.cats_ff` the attribute is the dispatcher
    wrapper = module.cats_ff_triton
    monkeypatch.setattr(module, "cats_ff_triton", lambda *args: calls.append(1) or wrapper(*args))
    x, weights = make_problem(2, torch.float32, seed=8)
    prepared = prepare_cats_weights(*weights)
    threshold = half_threshold(x, weights[0], ACTIVATIONS["gelu_tanh"])
    expected = reference(x, weights, threshold, ACTIVATIONS["gelu_tanh"])

    auto = cats_ff(x, prepared, threshold, "gelu_tanh")
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    torch.testing.assert_close(auto, expected, rtol=1e-5, atol=1e-5)
    forced = cats_ff(x, prepared, threshold, "gelu_tanh", use_kernels=True)
    assert len(calls) == (2 if DEVICE == "cuda" else 1)
    torch.testing.assert_close(forced, expected, rtol=1e-5, atol=1e-5)

    tokens = torch.randn(2, 3, D, device=DEVICE)  # teacher forcing: several tokens per sequence
    long_expected = cats_merged_ff(tokens, *weights, threshold.view(2, 1, 1), ACTIVATIONS["gelu_tanh"])
    torch.testing.assert_close(cats_ff(tokens, prepared, threshold, "gelu_tanh", use_kernels=False), long_expected)
    with pytest.raises(ValueError, match="one token for each of at most"):
        cats_ff(tokens, prepared, threshold, "gelu_tanh", use_kernels=True)
    assert len(calls) == (2 if DEVICE == "cuda" else 1)


def test_bad_inputs_fail_early_with_a_reason():
    x, weights = make_problem(MAX_BATCH + 1, torch.float32, seed=9)
    prepared = prepare_cats_weights(*weights)
    threshold = torch.zeros(MAX_BATCH + 1, device=DEVICE)
    with pytest.raises(ValueError, match="activation must be one of"):
        cats_ff(x, prepared, threshold, "relu")
    with pytest.raises(ValueError, match="at most 8 sequences"):
        cats_ff(x, prepared, threshold, "silu", use_kernels=True)
    with pytest.raises(ValueError, match="one value per sequence"):
        cats_ff(x, prepared, threshold[:2], "silu")
    with pytest.raises(ValueError, match="one dtype and device"):
        prepare_cats_weights(weights[0].half(), *weights[1:])
    with pytest.raises(ValueError, match="must be contiguous"):
        transposed_gate = prepared.gate.T.contiguous().T  # same shape, column-major
        args = prepared.op_args()
        cats_ff_triton(x[:2], transposed_gate, *args[1:], threshold[:2], "silu")


@pytest.mark.parametrize("block_b", [1, 2, 4, 8])
def test_register_pruning_keeps_configs_that_fit(block_b):
    for configs in (gpu_up_configs(), gpu_down_configs()):
        kept = prune_by_registers(configs, {}, BLOCK_B=block_b)
        assert kept
        for config in kept:
            tile = block_b * config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_D"]
            assert tile <= 64 * 32 * config.num_warps
        assert len(kept) < len(configs)  # the largest tiles spill even at batch 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_op_matches_reference_on_gpu_at_model_like_shape(dtype):
    """Exercises real autotuning (several configs, reset of the atomic output) that the interpreter skips."""
    x, weights = make_problem(4, dtype, seed=21, hidden=1024, ff=2816, rank=64)
    threshold = half_threshold(x, weights[0], F.silu)
    out = cats_ff(x, prepare_cats_weights(*weights), threshold, "silu")  # automatic: CUDA picks the op
    expected = reference(x, weights, threshold, F.silu)
    torch.testing.assert_close(out.float(), expected, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])


@pytest.mark.slow
def test_one_llama_8b_layer_size():
    """The real shapes (D = 4096, F = 14336, r = 256): offsets past 2**31 bits of a neuron index, grids of hundreds of
    programs, and the ragged last blocks of a GPU run, caught by the interpreter on a CPU first."""
    hidden, ff, rank = 4096, 14336, 256
    # fp32: at 14336 neurons no threshold gap separates bf16 and fp32 gates alike; the shapes are the point here
    x, weights = ff_problem(2, hidden, ff, rank, dtype=torch.float32, device=DEVICE, seed=21)
    threshold = half_threshold(x, weights[0], F.silu)
    out = cats_ff(x, prepare_cats_weights(*weights), threshold, "silu", use_kernels=True)
    expected = reference(x, weights, threshold, F.silu)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
