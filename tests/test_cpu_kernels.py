"""The C++ CPU ops of ``caprese_peft.kernels.cpu_ff`` match their torch references and the specifications in ``caprese_peft.sparse_ff``.

The first test to need the ops compiles them (about 18 s on 2 cores, once per machine and source version).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caprese_peft.backbones import Cats, Griffin
from caprese_peft.backbones.cats import _uniform, cats_thresholds
from caprese_peft.backbones.griffin import griffin_scores, kept_count, top_neurons
from caprese_peft.kernels import prepare_cats_weights
from caprese_peft.kernels.cats_ff import interleaved_pair
from caprese_peft.kernels.cpu_ff import (
    cats_ff_cpu,
    cats_threshold,
    dense_ff,
    gated_ff,
    gated_ff_reference,
    griffin_ff_cpu,
    griffin_select,
    linear,
    linear_reference,
    load_extension,
    pack_int4,
    prepare_dense_weights,
    prepare_stand_in,
    unpack_int4,
)
from caprese_peft.kernels.problems import ff_problem
from caprese_peft.sparse_ff import (
    ACTIVATIONS,
    cats_merged_ff,
    griffin_merged_ff,
    griffin_merged_weights,
    keep_indices,
    quantize_rows,
)

D, FF, R = 72, 200, 8  # odd sizes: no vector width or tile divides them
# rtol = atol on |out|; the ops accumulate in fp32 and round once at the end, so low-precision error is the
# rounding of the output: fp32 sums in another order 1e-6, fp16 ~5e-4, bf16 ~4e-3
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCHES = [1, 2, 3, 5, 8]

requires_op = pytest.mark.skipif(not load_extension(), reason="the C++ CPU ops could not be built here")


def randn(gen: torch.Generator, *shape: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def make_problem(batch: int, dtype: torch.dtype, seed: int, hidden: int = D, ff: int = FF, rank: int = R):
    """Random x ``(B, D)`` and ``(Wg, W1, W2, L, R)`` in ``dtype``, gate pre-activations O(1); never zeros."""
    return ff_problem(batch, hidden, ff, rank, dtype=dtype, seed=seed)


def half_threshold(x: torch.Tensor, gate_weight: torch.Tensor, act) -> torch.Tensor:
    """Per sequence, a threshold keeping about half the neurons, in the widest gap between ``|act(gate)|`` values.

    The op sums the gate in fp32 in another order than torch; a value within rounding of the threshold could fall
    either side, so the gap keeps the comparison about arithmetic, not a coin toss.
    """
    gates = act(x.float() @ gate_weight.float().T).abs()  # (B, F)
    thresholds = []
    for row in gates:
        values = row.sort().values
        band = values[int(0.4 * len(values)) : int(0.6 * len(values))]
        i = int(band.diff().argmax())
        assert band[i + 1] - band[i] > 1e-5 * band[i]
        thresholds.append((band[i] + band[i + 1]) / 2)
    return torch.stack(thresholds)  # (B,)


def cats_spec(x, weights, threshold, act) -> torch.Tensor:
    """``cats_merged_ff`` in fp32 on the same (rounded) inputs."""
    upcast = [w.float() for w in weights]
    return cats_merged_ff(x.float()[:, None], *upcast, threshold.view(-1, 1, 1), act)[:, 0]


def griffin_keep(batch: int, ff: int, kept: int, seed: int) -> torch.Tensor:
    """``(B, F)`` bool: each row keeps its own random ``kept`` neurons, so the rows' sets differ."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(batch, ff, dtype=torch.bool)
    for row in keep:
        row[torch.randperm(ff, generator=gen)[:kept]] = True
    return keep


def griffin_spec(x, weights, keep, act) -> torch.Tensor:
    """``griffin_merged_ff`` on ``griffin_merged_weights``, in fp32: each sequence its own pruned copy."""
    merged = griffin_merged_weights(*[w.float() for w in weights], keep_indices(keep))
    return griffin_merged_ff(x.float()[:, None], merged, act)[:, 0]


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


# ---- the references agree with the specifications ----


@pytest.mark.parametrize("act_name", sorted(ACTIVATIONS))
def test_reference_is_cats_merged_ff(act_name):
    act = ACTIVATIONS[act_name]
    x, weights = make_problem(3, torch.float32, seed=1)
    threshold = half_threshold(x, weights[0], act)
    out = gated_ff_reference(x, prepare_cats_weights(*weights), act_name, threshold=threshold)
    torch.testing.assert_close(out, cats_spec(x, weights, threshold, act), rtol=1e-5, atol=1e-5)


def test_reference_is_griffin_merged_ff():
    x, weights = make_problem(4, torch.float32, seed=2)
    keep = griffin_keep(4, FF, 60, seed=2)
    out = gated_ff_reference(x, prepare_cats_weights(*weights), "silu", keep=keep)
    torch.testing.assert_close(out, griffin_spec(x, weights, keep, F.silu), rtol=1e-5, atol=1e-5)


# ---- the ops against the specifications ----


@requires_op
@pytest.mark.parametrize("batch", [1, 2, 3, 7, 8, 11])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_matches_reference(dtype, batch):
    gen = torch.Generator().manual_seed(batch)
    x = randn(gen, batch, D, scale=1.0, dtype=dtype)
    weight = randn(gen, FF + 3, D, scale=D**-0.5, dtype=dtype)
    out = linear(x, weight, use_kernels=True)
    assert out.shape == (batch, FF + 3)
    assert_close(out, linear_reference(x, weight), dtype)


@requires_op
@pytest.mark.parametrize("interleave", [True, False], ids=["side-by-side", "separate"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("act_name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cats_op_matches_cats_merged_ff(dtype, act_name, batch, interleave):
    act = ACTIVATIONS[act_name]
    x, weights = make_problem(batch, dtype, seed=10 + batch)
    threshold = half_threshold(x, weights[0], act)
    kept = (act(x.float() @ weights[0].float().T).abs() > threshold[:, None]).float().mean()
    assert 0.35 < kept < 0.65
    prepared = prepare_cats_weights(*weights, interleave=interleave)
    assert (prepared.pair is not None) == interleave
    out = cats_ff_cpu(x, prepared, threshold, act_name, use_kernels=True)
    expected = cats_spec(x, weights, threshold, act)
    assert_close(out, expected, dtype)
    # the comparison can fail: ignoring the threshold, or the low-rank neurons, would not pass it
    tol = TOLERANCES[dtype]
    dense = cats_spec(x, weights, torch.full_like(threshold, -1.0), act)
    assert not torch.allclose(dense, expected, rtol=tol, atol=tol)
    low_rank = (x.float() @ weights[3].float()) @ weights[4].float()
    assert not torch.allclose(expected - low_rank, expected, rtol=tol, atol=tol)


@requires_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cats_rows_no_sequence_keeps_are_never_read(dtype):
    """The point of the op: up and down rows of neurons inactive for the whole batch stay unread."""
    x, weights = make_problem(2, dtype, seed=13)
    threshold = half_threshold(x, weights[0], F.silu)
    expected = cats_spec(x, weights, threshold, F.silu)
    prepared = prepare_cats_weights(*weights)
    unused = ~(F.silu(x.float() @ weights[0].float().T).abs() > threshold[:, None]).any(dim=0)  # (F,)
    assert 10 < unused.sum() < FF // 2
    prepared.up[unused] = float("nan")  # any read of these rows would turn the output into nan
    prepared.down_t[unused] = float("nan")
    assert_close(cats_ff_cpu(x, prepared, threshold, "silu", use_kernels=True), expected, dtype)


@requires_op
def test_cats_low_rank_neurons_are_always_active():
    x, weights = make_problem(3, torch.float32, seed=11)
    none_kept = torch.full((3,), 1e9)
    out = cats_ff_cpu(x, prepare_cats_weights(*weights), none_kept, "silu", use_kernels=True)
    expected = (x @ weights[3]) @ weights[4]  # every FF neuron off: only x @ L @ R
    assert_close(out, expected, torch.float32)


@requires_op
def test_cats_rank_zero_is_plain_cats():
    x, weights = make_problem(2, torch.float32, seed=5, rank=0)
    threshold = half_threshold(x, weights[0], F.silu)
    prepared = prepare_cats_weights(*weights)
    assert prepared.rank == 0
    out = cats_ff_cpu(x, prepared, threshold, "silu", use_kernels=True)
    assert_close(out, cats_spec(x, weights, threshold, F.silu), torch.float32)


@requires_op
@pytest.mark.parametrize("interleave", [True, False], ids=["side-by-side", "separate"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_griffin_matches_griffin_merged_ff(dtype, batch, interleave):
    act_name = "gelu_tanh" if batch % 2 else "silu"
    act = ACTIVATIONS[act_name]
    x, weights = make_problem(batch, dtype, seed=20 + batch)
    keep = griffin_keep(batch, FF, 70, seed=batch)
    prepared = prepare_cats_weights(*weights, interleave=interleave)
    out = griffin_ff_cpu(x, prepared, keep, act_name, use_kernels=True)
    assert_close(out, griffin_spec(x, weights, keep, act), dtype)


def test_cpu_weights_hold_each_neuron_s_up_and_down_rows_side_by_side():
    """On a CPU, W1 and W2^T are copied into one (F, 2, D) tensor; Wg (and, without interleaving, W1) in place."""
    _, weights = make_problem(2, torch.float32, seed=3)
    gate_w, up_w, down_w = weights[:3]
    w = prepare_cats_weights(*weights)
    assert w.pair.shape == (FF, 2, D) and w.pair.is_contiguous()
    assert w.up.data_ptr() == w.pair.data_ptr() and w.down_t.data_ptr() == w.pair[:, 1].data_ptr()
    assert torch.equal(w.up, up_w) and torch.equal(w.down_t, down_w.T) and w.gate.data_ptr() == gate_w.data_ptr()
    assert w.copied_bytes() == up_w.nbytes + down_w.nbytes + w.low_up.nbytes
    separate = prepare_cats_weights(*weights, interleave=False)
    assert separate.pair is None and separate.up.data_ptr() == up_w.data_ptr() and separate.down_t.is_contiguous()
    assert separate.copied_bytes() == down_w.nbytes + w.low_up.nbytes
    assert interleaved_pair(w.down_t, w.up) is None  # the order matters: up first


@requires_op
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_the_op_reads_rows_at_any_row_stride(batch):
    """Up and down rows taken from wider tensors (row strides D + 5 and 3 D): the same answer as contiguous rows."""
    x, weights = make_problem(batch, torch.float32, seed=70 + batch)
    w = prepare_cats_weights(*weights, interleave=False)
    wide_up = torch.full((FF, D + 5), float("nan"))
    wide_up[:, 2 : 2 + D] = w.up
    wide_down = torch.full((FF, 3, D), float("nan"))
    wide_down[:, 1] = w.down_t
    strided = type(w)(w.gate, wide_up[:, 2 : 2 + D], w.low_up, wide_down[:, 1], w.low_down)
    threshold = half_threshold(x, weights[0], F.silu)
    out = cats_ff_cpu(x, strided, threshold, "silu", use_kernels=True)
    assert_close(out, cats_spec(x, weights, threshold, F.silu), torch.float32)
    keep = griffin_keep(batch, FF, 50, seed=batch)
    assert_close(
        griffin_ff_cpu(x, strided, keep, "silu", use_kernels=True),
        griffin_spec(x, weights, keep, F.silu),
        torch.float32,
    )


@requires_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_griffin_reads_the_union_s_rows_only_and_masks_per_sequence(dtype):
    """No gate, up or down row outside the union is read; a neuron another sequence keeps adds nothing to this one."""
    x, weights = make_problem(3, dtype, seed=31)
    keep = griffin_keep(3, FF, 40, seed=31)
    outside = ~keep.any(0)
    assert outside.sum() > 0
    prepared = prepare_cats_weights(*[w.clone() for w in weights])
    for rows in (prepared.gate, prepared.up, prepared.down_t):
        rows[outside] = float("nan")
    out = griffin_ff_cpu(x, prepared, keep, "silu", use_kernels=True)
    expected = griffin_spec(x, weights, keep, F.silu)
    assert_close(out, expected, dtype)
    for b in range(3):  # each row alone, with its own kept neurons only, gives the same answer as in the batch
        assert_close(griffin_ff_cpu(x[b : b + 1], prepared, keep[b : b + 1], "silu"), expected[b : b + 1], dtype)


@requires_op
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_griffin_on_packed_rows_is_griffin_on_the_whole_block(dtype, batch):
    """FastDecoder's layout: the union's rows first (in neuron order), spare rows after them that no sequence keeps
    and no step reads (nan here)."""
    x, weights = make_problem(batch, dtype, seed=60 + batch)
    keep = griffin_keep(batch, FF, 37, seed=60 + batch)
    union = keep.any(0).nonzero()[:, 0]
    prepared = prepare_cats_weights(*weights)
    spare = 23
    packed = []
    for rows in (prepared.gate, prepared.up, prepared.down_t):
        packed.append(torch.cat([rows[union], torch.full((spare, D), float("nan"), dtype=dtype)]))
    mask = torch.zeros(batch, union.numel() + spare, dtype=torch.uint8)
    mask[:, : union.numel()] = keep[:, union]
    gate, up, down_t = packed
    out = torch.ops.caprese_cpu.gated_ff(x, gate, up, prepared.low_up, down_t, prepared.low_down, None, mask, "silu")
    assert_close(out, griffin_spec(x, weights, keep, F.silu), dtype)
    # no neuron kept at all: only x @ L @ R
    out = torch.ops.caprese_cpu.gated_ff(
        x, gate, up, prepared.low_up, down_t, prepared.low_down, None, torch.zeros_like(mask), "silu"
    )
    assert_close(out, (x.float() @ weights[3].float()) @ weights[4].float(), dtype)


@requires_op
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_ff_matches_the_mlp(dtype, batch):
    x, (gate_w, up_w, down_w, _, _) = make_problem(batch, dtype, seed=40 + batch)
    out = dense_ff(x, prepare_dense_weights(gate_w, up_w, down_w), "silu", use_kernels=True)
    xf = x.float()
    expected = F.linear(F.silu(F.linear(xf, gate_w.float())) * F.linear(xf, up_w.float()), down_w.float())
    assert_close(out, expected, dtype)


@requires_op
def test_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and tracing of the ops are consistent."""
    x, weights = make_problem(2, torch.float32, seed=3)
    w = prepare_cats_weights(*weights)
    threshold = half_threshold(x, weights[0], F.silu)
    linear(x, w.gate, use_kernels=True)  # registers the fake implementations
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.caprese_cpu.linear.default, (x, w.gate), test_utils=tests)
    keep = griffin_keep(2, FF, 50, seed=3).to(torch.uint8)
    for thr, kp in ((threshold, None), (None, keep), (None, None)):
        args = (x, *w.op_args(), thr, kp, "silu")
        torch.library.opcheck(torch.ops.caprese_cpu.gated_ff.default, args, test_utils=tests)
    x, weights = make_problem(2, torch.float32, seed=3, hidden=D_Q4)  # with a 4-bit stand-in
    args = (x, *prepare_cats_weights(*weights).op_args(), half_threshold(x, weights[0], F.silu), None, "silu")
    stand_in = prepare_stand_in(weights[1], weights[2]).op_args()
    torch.library.opcheck(torch.ops.caprese_cpu.gated_ff.default, (*args, *stand_in), test_utils=tests)
    args = (*args[:6], None, griffin_keep(2, FF, 50, seed=3).to(torch.uint8), "silu")  # GRIFFIN's, gate rows too
    stand_in = prepare_stand_in(weights[1], weights[2], weights[0]).op_args()
    torch.library.opcheck(torch.ops.caprese_cpu.gated_ff.default, (*args, *stand_in), test_utils=tests)


@requires_op
def test_ops_compile_without_graph_breaks():
    x, weights = make_problem(3, torch.float32, seed=4)
    w = prepare_cats_weights(*weights)
    threshold = half_threshold(x, weights[0], F.silu)

    def step(x: torch.Tensor) -> torch.Tensor:
        h = cats_ff_cpu(x, w, threshold, "silu", use_kernels=True)
        return linear(h, w.gate, use_kernels=True) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)
    x, weights = make_problem(3, torch.float32, seed=4, hidden=D_Q4)  # the 4-bit stand-in too
    w, stand_in = prepare_cats_weights(*weights), prepare_stand_in(weights[1], weights[2])
    threshold = half_threshold(x, weights[0], F.silu)
    step = lambda x: cats_ff_cpu(x, w, threshold, "silu", stand_in, use_kernels=True)  # noqa: E731
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)


def test_forced_off_runs_the_reference():
    x, weights = make_problem(2, torch.float32, seed=6)
    w = prepare_cats_weights(*weights)
    threshold = half_threshold(x, weights[0], F.silu)
    out = cats_ff_cpu(x, w, threshold, "silu", use_kernels=False)
    torch.testing.assert_close(out, cats_spec(x, weights, threshold, F.silu), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, w.gate, use_kernels=False), F.linear(x, w.gate))


@requires_op
def test_bad_inputs_fail_early_with_a_reason():
    x, weights = make_problem(2, torch.float32, seed=9)
    w = prepare_cats_weights(*weights)
    threshold = torch.zeros(2)
    with pytest.raises(ValueError, match="activation must be one of"):
        cats_ff_cpu(x, w, threshold, "relu")
    with pytest.raises(ValueError, match="one value per sequence"):
        cats_ff_cpu(x, w, threshold[:1], "silu")
    with pytest.raises(ValueError, match="share one of"):
        cats_ff_cpu(x.bfloat16(), w, threshold, "silu", use_kernels=True)
    with pytest.raises(ValueError, match="contiguous"):
        transposed = type(w)(w.gate.T.contiguous().T, w.up, w.low_up, w.down_t, w.low_down)
        gated_ff(x, transposed, "silu", threshold=threshold, use_kernels=True)
    with pytest.raises(ValueError, match="no backward"):
        linear(x.requires_grad_(), w.gate, use_kernels=True)
    with pytest.raises(ValueError, match="row by row"):  # rows may lie apart, but each must be contiguous
        column_major = type(w)(w.gate, w.up.T.contiguous().T, w.low_up, w.down_t, w.low_down)
        gated_ff(x, column_major, "silu", threshold=threshold, use_kernels=True)
    with pytest.raises(RuntimeError, match="must hold each row contiguously"):
        torch.ops.caprese_cpu.gated_ff(x.detach(), *column_major.op_args(), threshold, None, "silu")
    with pytest.raises(RuntimeError, match="must all have F rows"):  # the op's own checks, for direct callers
        torch.ops.caprese_cpu.gated_ff(
            x.detach(), w.gate, w.up[:5], w.low_up, w.down_t, w.low_down, threshold, None, "silu"
        )


# ---- the 4-bit stand-in of dropped neurons (CapreseConfig.stand_in_bits=4) ----

D_Q4 = 96  # 4-bit rows come in blocks of 32 weights


def stand_in_spec(x, weights, threshold, act):
    """CATS + low rank + the dropped neurons from ``quantize_rows(., 4)``, as ``CapreseLayer.stand_in`` adds them."""
    gate_w, up_w, down_w = (w.float() for w in weights[:3])
    up_q = quantize_rows(up_w, 4).dequantize()
    down_q = quantize_rows(down_w.t().contiguous(), 4).dequantize()
    g = act(x.float() @ gate_w.T)
    dropped = ~(g.abs() > threshold.float()[:, None])
    return cats_spec(x, weights, threshold, act).float() + ((g * dropped) * (x.float() @ up_q.T)) @ down_q


def test_int4_packing_round_trips():
    codes = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # byte k of a block: weight k low, weight k + 16 high
    assert int(packed[0, 0]) == (int(codes[0, 0]) & 0xF) | ((int(codes[0, 16]) & 0xF) << 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int4(codes[:, :48])


@requires_op
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stand_in_op_matches_its_specification(dtype, batch):
    x, weights = make_problem(batch, dtype, seed=40 + batch, hidden=D_Q4)
    threshold = half_threshold(x, weights[0], F.silu)
    stand_in = prepare_stand_in(weights[1], weights[2])
    out = cats_ff_cpu(x, prepare_cats_weights(*weights), threshold, "silu", stand_in, use_kernels=True)
    reference = cats_ff_cpu(x, prepare_cats_weights(*weights), threshold, "silu", stand_in, use_kernels=False)
    assert_close(out, reference, dtype)
    if dtype == torch.float32:  # the reference is the layer's formula (low precision dequantizes in another order)
        assert_close(reference, stand_in_spec(x, weights, threshold, F.silu).to(dtype), dtype)
    # it can fail: without the stand-in the output differs by more than the tolerance
    plain = cats_ff_cpu(x, prepare_cats_weights(*weights), threshold, "silu", use_kernels=True)
    tol = TOLERANCES[dtype]
    assert not torch.allclose(plain.float(), out.float(), rtol=tol, atol=tol)


@requires_op
def test_stand_in_reads_no_row_of_a_neuron_every_sequence_keeps():
    x, weights = make_problem(2, torch.float32, seed=7, hidden=D_Q4)
    threshold = half_threshold(x, weights[0], F.silu)
    stand_in = prepare_stand_in(weights[1], weights[2])
    expected = cats_ff_cpu(x, prepare_cats_weights(*weights), threshold, "silu", stand_in, use_kernels=True)
    kept_by_all = (F.silu(x @ weights[0].T).abs() > threshold[:, None]).all(dim=0)  # (F,)
    assert kept_by_all.sum() > 10
    stand_in.scale[:, kept_by_all] = float("nan")  # a read of these neurons' 4-bit rows would give nan
    out = cats_ff_cpu(x, prepare_cats_weights(*weights), threshold, "silu", stand_in, use_kernels=True)
    assert_close(out, expected, torch.float32)


def test_stand_in_needs_a_threshold_and_whole_blocks():
    x, weights = make_problem(1, torch.float32, seed=3, hidden=D_Q4)
    stand_in = prepare_stand_in(weights[1], weights[2])
    with pytest.raises(ValueError, match="needs a threshold"):
        gated_ff(x, prepare_cats_weights(*weights), "silu", stand_in=stand_in)
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_stand_in(*make_problem(1, torch.float32, seed=3)[1][1:3])


def griffin_stand_in_spec(x, weights, keep, act):
    """GRIFFIN + low rank + the pruned neurons from ``quantize_rows(., 4)``, their gates included, as
    ``CapreseLayer.stand_in`` adds them for a backbone that skips pruned gates."""
    gate_w, up_w, down_w, left, right = (w.float() for w in weights)
    gate_q, up_q = (quantize_rows(w, 4).dequantize() for w in (gate_w, up_w))
    down_q = quantize_rows(down_w.t().contiguous(), 4).dequantize()
    xf = x.float()
    sparse = ((act(xf @ gate_w.T) * keep) * (xf @ up_w.T)) @ down_w.T + (xf @ left) @ right
    return sparse + ((act(xf @ gate_q.T) * ~keep) * (xf @ up_q.T)) @ down_q


@requires_op
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_griffin_stand_in_op_matches_its_specification(dtype, batch):
    x, weights = make_problem(batch, dtype, seed=60 + batch, hidden=D_Q4)
    keep = griffin_keep(batch, FF, FF // 2, seed=batch)
    stand_in = prepare_stand_in(weights[1], weights[2], weights[0])
    prepared = prepare_cats_weights(*weights)
    out = griffin_ff_cpu(x, prepared, keep, "silu", stand_in, use_kernels=True)
    reference = griffin_ff_cpu(x, prepared, keep, "silu", stand_in, use_kernels=False)
    assert_close(out, reference, dtype)
    if dtype == torch.float32:
        assert_close(reference, griffin_stand_in_spec(x, weights, keep, F.silu).to(dtype), dtype)
    plain = griffin_ff_cpu(x, prepared, keep, "silu", use_kernels=True)  # the comparison can fail
    tol = TOLERANCES[dtype]
    assert not torch.allclose(plain.float(), out.float(), rtol=tol, atol=tol)


@requires_op
def test_griffin_stand_in_reads_no_row_of_a_neuron_every_sequence_keeps():
    x, weights = make_problem(3, torch.float32, seed=8, hidden=D_Q4)
    keep = griffin_keep(3, FF, 150, seed=2)
    stand_in = prepare_stand_in(weights[1], weights[2], weights[0])
    expected = griffin_ff_cpu(x, prepare_cats_weights(*weights), keep, "silu", stand_in, use_kernels=True)
    kept_by_all = keep.all(dim=0)
    assert kept_by_all.sum() > 10
    stand_in.scale[:, kept_by_all] = float("nan")
    out = griffin_ff_cpu(x, prepare_cats_weights(*weights), keep, "silu", stand_in, use_kernels=True)
    assert_close(out, expected, torch.float32)
    with pytest.raises(ValueError, match="gate rows"):  # a CATS stand-in (no gate rows) with a keep mask
        griffin_ff_cpu(x, prepare_cats_weights(*weights), keep, "silu", prepare_stand_in(weights[1], weights[2]))


# ---- prompt statistics ----


def prompt_values(
    batch: int, seq: int, width: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(B, S, F)`` values and a ``(B, S)`` token mask whose odd rows are left-padded (padding loud)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, seq, width, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    for row in range(1, batch, 2):
        mask[row, : seq // 3] = False
        values[row, : seq // 3] *= 100
    return values.to(dtype), mask


@requires_op
@pytest.mark.parametrize("sample", [None, 50, 8192], ids=lambda s: f"sample{s}")
@pytest.mark.parametrize("shape", [(1, 93, 200), (3, 7, 37), (4, 40, 200), (2, 1, 5)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cats_threshold_op_is_cats_thresholds(dtype, shape, sample):
    """The same order statistic, bit for bit: every real value, or the same fixed sample, padding left out."""
    gate, mask = prompt_values(*shape, dtype, seed=sum(shape))
    draws = _uniform(gate.device, sample or 0)
    for density in (0.5, 0.3, 0.01, 1.0):
        expected = cats_thresholds(gate, mask, density, sample)
        assert torch.equal(cats_threshold(gate, mask, density, sample, draws), expected)


@requires_op
def test_cats_threshold_op_with_ties_is_the_kth_smallest_magnitude():
    gate = torch.randint(-6, 7, (3, 17, 29), generator=torch.Generator().manual_seed(4)).float()
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[2, :5] = False
    for density in (0.01, 0.3, 0.5, 0.99):
        assert torch.equal(
            cats_threshold(gate, mask, density, None, _uniform(gate.device)),
            cats_thresholds(gate, mask, density, None),
        )


@requires_op
@pytest.mark.parametrize("shape", [(1, 93, 200), (3, 7, 37), (4, 40, 200), (2, 1, 5)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_griffin_select_op_is_the_specification(dtype, shape):
    """The same scores up to the order of fp32 sums, and the same kept neurons."""
    z, mask = prompt_values(*shape, dtype, seed=sum(shape) + 1)
    expected_score = griffin_scores(z, mask)
    for density in (0.5, 0.1, 1.0):
        score, keep = griffin_select(z, mask, kept_count(density, z.shape[-1]))
        torch.testing.assert_close(score, expected_score, rtol=1e-5, atol=1e-7)
        assert keep.dtype == torch.bool and torch.equal(keep, top_neurons(expected_score, density))


@requires_op
def test_griffin_select_breaks_ties_toward_the_lower_neuron():
    z = torch.ones(1, 3, 8)  # every score equal
    _, keep = griffin_select(z, torch.ones(1, 3, dtype=torch.bool), 3)
    assert keep[0, 0].tolist() == [True] * 3 + [False] * 5


@requires_op
@pytest.mark.parametrize("backbone", [Cats(0.5), Griffin(0.5)], ids=lambda b: b.name)
def test_backbones_calibrate_through_the_op_on_a_cpu(backbone, monkeypatch):
    """A CPU prefill's statistics come from the op, and are what the torch specification computes."""
    from caprese_peft.kernels import cpu_ff

    gate, mask = prompt_values(2, 30, 64, torch.float32, seed=8)
    z = gate * 0.5
    name = "cats_threshold" if backbone.name == "cats" else "griffin_select"
    calls, real = [], getattr(cpu_ff, name)
    monkeypatch.setattr(cpu_ff, name, lambda *args: calls.append(1) or real(*args))
    stats = backbone.calibrate(gate, z, mask)
    assert calls == [1]
    if backbone.name == "cats":
        assert torch.equal(stats.threshold, cats_thresholds(gate, mask, 0.5))
    else:
        assert torch.equal(stats.keep, top_neurons(griffin_scores(z, mask), 0.5))


@requires_op
def test_statistics_ops_refuse_a_sequence_without_prompt_tokens():
    gate = torch.randn(3, 4, 16)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]).bool()
    with pytest.raises(ValueError, match=r"Sequences \[1, 2\] have no prompt tokens"):
        cats_threshold(gate, mask, 0.5, 8192, _uniform(gate.device))
    with pytest.raises(ValueError, match=r"Sequences \[1, 2\] have no prompt tokens"):
        griffin_select(gate, mask, 4)


@requires_op
def test_statistics_ops_pass_opcheck():
    gate, mask = prompt_values(2, 9, 40, torch.float32, seed=2)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    draws = _uniform(gate.device)
    torch.library.opcheck(
        torch.ops.caprese_cpu.cats_threshold.default, (gate, mask, draws, 100, 0.5), test_utils=tests
    )
    torch.library.opcheck(torch.ops.caprese_cpu.griffin_select.default, (gate, mask, 20), test_utils=tests)
