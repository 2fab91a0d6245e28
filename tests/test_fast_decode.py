"""FastDecoder (dense prefill + lean static-cache decode step) gives the greedy output of ``model.generate``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing

from caprese_peft import decode_impl
from caprese_peft.fast_decode import FastDecoder
from caprese_peft.fast_decode.decoder import _block_step, cpu_ops_available

from conftest import greedy, layers_of, random_prompts, tiny_model, wrap

LEAN_ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 8
CASES = {  # name: (adapter options or None for the plain model, FastDecoder mode): every mode of the lean step
    "plain-dense": (None, "dense"),
    "griffin-caprese": (dict(backbone="griffin", layers_to_transform=[0, 1]), "caprese"),
    "griffin-backbone": (dict(backbone="griffin", layers_to_transform=[0, 1]), "backbone"),
    "cats-caprese": (dict(backbone="cats"), "caprese"),
    "cats-backbone": (dict(backbone="cats", density=0.4, layers_to_transform=[1, 2, 3]), "backbone"),
    "adapter-disabled": (dict(backbone="cats"), "dense"),
}


pytestmark = pytest.mark.usefixtures("one_thread")
needs_ops = pytest.mark.skipif(not cpu_ops_available(), reason="the C++ CPU ops could not be built here")


def eager_decoder(model, **options) -> FastDecoder:
    """A FastDecoder with its step uncompiled: these tests compare values, not compilers (tests below compile)."""
    return FastDecoder(model, **{"compile": "none", **options})


def build(arch: str, options: dict | None):
    return tiny_model(arch) if options is None else wrap(arch, **options)


def reference_generate(model, mode: str, ids, mask, new_tokens: int = NEW_TOKENS, **kwargs) -> torch.Tensor:
    """``generate`` on the reference decode path; backbone mode is the same adapter with ``R`` zeroed."""
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    if not hasattr(model, "peft_config"):
        return model.generate(**kwargs)
    model = copy.deepcopy(model)
    if mode == "backbone":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "caprese_R" in name:
                    param.zero_()
    with decode_impl(model, "reference"):
        if mode == "dense":
            with model.disable_adapter():
                return model.generate(**kwargs)
        return model.generate(**kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", LEAN_ARCHITECTURES)
def test_greedy_output_equals_generate(arch, case):
    options, mode = CASES[case]
    model = build(arch, options)
    ids, mask = random_prompts([7, 3, 9])
    want = reference_generate(model, mode, ids, mask)
    got = eager_decoder(model, mode=mode).generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got, want)


def test_sparse_modes_change_the_output():
    """Otherwise the equality above would not tell the modes apart."""
    model = build("llama", dict(backbone="cats", density=0.3))
    ids, mask = random_prompts([7, 3, 9])
    outputs = {mode: eager_decoder(model, mode=mode).generate(ids, mask, max_new_tokens=NEW_TOKENS) for mode in
               ("dense", "backbone", "caprese")}  # fmt: skip
    assert not torch.equal(outputs["dense"], outputs["backbone"])
    assert not torch.equal(outputs["backbone"], outputs["caprese"])


def test_eos_ends_rows_with_padding_as_generate_does():
    model = build("qwen2", dict(backbone="griffin"))
    ids, mask = random_prompts([6, 9, 4])
    free = eager_decoder(model).generate(ids, mask, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    eos = int(free[1, ids.shape[1] + 2])  # row 1 stops after its third token; the others may run on
    want = reference_generate(model, "caprese", ids, mask, eos_token_id=eos, pad_token_id=0)
    got = eager_decoder(model).generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[1, ids.shape[1] + 3 :] == 0).all()
    # a sequence of EOS everywhere ends at once
    first = [int(t) for t in free[:, ids.shape[1]]]
    short = eager_decoder(model).generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=first)
    assert short.shape[1] == ids.shape[1] + 1


def test_prefill_and_decode_one_token_give_the_logits_of_generate():
    model = build("mistral", dict(backbone="cats"))
    ids, mask = random_prompts([5, 8])
    with decode_impl(model, "reference"):
        sequences, logits = greedy(model, ids, mask, 4)
    decoder = eager_decoder(model, max_seq_len=32)
    got = [decoder.prefill(ids, mask)]
    for step in range(3):
        got.append(decoder.decode_one_token(sequences[:, ids.shape[1] + step]))
    torch.testing.assert_close(torch.stack(got, dim=1), logits, rtol=1e-4, atol=1e-4)


def test_buffers_are_reused_across_prompt_batches_of_one_shape():
    model = build("llama", dict(backbone="griffin"))
    decoder = eager_decoder(model, max_seq_len=24)
    first_ids, first_mask = random_prompts([7, 3, 9], seed=1)
    decoder.generate(first_ids, first_mask, max_new_tokens=NEW_TOKENS)
    lean, cache_ptr = decoder.lean, decoder.lean.layers[0].attn.k_cache.data_ptr()
    buffers = {name: b.data_ptr() for name, b in decoder.lean.layers[0].ff.named_buffers()}
    ids, mask = random_prompts([9, 5, 2], seed=2)
    got = decoder.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got, reference_generate(model, "caprese", ids, mask))
    assert decoder.lean is lean and lean.layers[0].attn.k_cache.data_ptr() == cache_ptr
    # a captured CUDA graph stays valid: the prompt batch's weights (or keep mask) were written in place
    assert {name: b.data_ptr() for name, b in lean.layers[0].ff.named_buffers()} == buffers
    # another batch size reallocates
    ids, mask = random_prompts([4, 6], seed=3)
    assert torch.equal(
        decoder.generate(ids, mask, max_new_tokens=4), reference_generate(model, "caprese", ids, mask, 4)
    )


def test_extra_memory_is_what_each_variant_copies():
    """On a CPU, CATS reads Wg in place and copies W1 and W2^T side by side (and L^T); the dense step copies W1 and
    W2^T alike with the C++ ops (they read neuron-major rows) and gate/up elsewhere (fused into one GEMV)."""
    model = build("llama", dict(backbone="cats", layers_to_transform=[1, 3]))
    ids, mask = random_prompts([6, 4])
    extra, decoders = {}, {}
    for mode in ("dense", "caprese"):
        decoders[mode] = decoder = eager_decoder(model, mode=mode)
        decoder.generate(ids, mask, max_new_tokens=3)
        extra[mode] = decoder.lean.extra_bytes(model)
    layers = layers_of(model)
    mlp = layers[0].base_layer
    gate_up = mlp.gate_proj.weight.nbytes + mlp.up_proj.weight.nbytes
    low_up, thresholds = layers[0].caprese_L["default"].nbytes, 2 * 4  # L^T; one fp32 threshold per sequence
    up_down = mlp.up_proj.weight.nbytes + mlp.down_proj.weight.nbytes
    dense_copy = up_down if decoders["dense"].cpu_ops else gate_up
    assert extra["caprese"] - extra["dense"] == len(layers) * (up_down + low_up + thresholds - dense_copy)
    weights = layers[0].caprese_decoder["default"].weights()
    assert weights.gate.data_ptr() == mlp.gate_proj.weight.data_ptr() and weights.copied_bytes() == up_down + low_up
    assert weights.pair.shape == (mlp.up_proj.out_features, 2, mlp.up_proj.in_features)
    assert torch.equal(weights.pair[:, 0], mlp.up_proj.weight) and torch.equal(
        weights.pair[:, 1], mlp.down_proj.weight.T
    )


def test_a_cpu_runs_the_chain_of_block_ops_by_default_and_inductor_without_the_ops():
    decoder = FastDecoder(tiny_model("llama"), mode="dense")
    assert decoder.cpu_ops == cpu_ops_available()
    assert decoder.compile == ("blocks" if decoder.cpu_ops else "default") and not decoder.compile_layers_once
    assert FastDecoder(tiny_model("llama"), mode="dense", use_kernels=False).compile == "default"


@needs_ops
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", LEAN_ARCHITECTURES)
def test_the_chain_of_block_ops_decodes_what_generate_decodes(arch, case):
    """compile="blocks": each layer's attention and FF halves in one C++ call each (odd sizes: D 48, head size 12;
    Qwen2's q/k/v biases, Qwen3's q/k norms, grouped KV heads, left padding, batch 3)."""
    options, mode = CASES[case]
    model = build(arch, options)
    ids, mask = random_prompts([7, 3, 9])
    decoder = FastDecoder(model, mode=mode, compile="blocks")
    assert torch.equal(
        decoder.generate(ids, mask, max_new_tokens=NEW_TOKENS), reference_generate(model, mode, ids, mask)
    )
    assert decoder._step is _block_step
    ids, mask = random_prompts([5, 8, 2], seed=4)  # another prompt batch in the same buffers
    assert torch.equal(decoder.generate(ids, mask, max_new_tokens=4), reference_generate(model, mode, ids, mask, 4))


@needs_ops
@pytest.mark.parametrize("lengths", [[7, 3, 9], [150, 20, 201]], ids=["short", "long"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["plain-dense", "cats-caprese", "griffin-caprese"])
def test_a_block_step_computes_the_torch_step_s_logits_and_cache(case, dtype, lengths):
    """``LeanDecoder.block_step`` against ``forward`` (its specification) on the same cache: logits, and the keys and
    values written at the slot; in bf16 and fp16 the C++ calls round where the torch step stores a tensor. Long
    prompts: 200 cached slots, the first 180 of one row padding."""
    options, mode = CASES[case]
    model = build("qwen3", options).to(dtype)  # q/k norms: every part of the attention block
    ids, mask = random_prompts(lengths)
    decoder = eager_decoder(model, mode=mode)
    decoder.prefill(ids, mask, max_new_tokens=4)
    lean, slot = decoder.lean, decoder._slot_host
    lean.finish_load()
    tokens = torch.tensor([5, 6, 7])
    before = [(layer.attn.k_cache.clone(), layer.attn.v_cache.clone()) for layer in lean.layers]
    want = lean(tokens, decoder._slot, decoder._positions, lean.key_slots[: slot + 1])
    written = [(layer.attn.k_cache.clone(), layer.attn.v_cache.clone()) for layer in lean.layers]
    for layer, (keys, values) in zip(lean.layers, before):
        layer.attn.k_cache.copy_(keys)
        layer.attn.v_cache.copy_(values)
    got = lean.block_step(tokens, slot, decoder._positions)
    tolerance = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tolerance)
    assert got.dtype == torch.float32 and torch.equal(got.argmax(-1), want.argmax(-1))
    for layer, (keys, values) in zip(lean.layers, written):
        torch.testing.assert_close(layer.attn.k_cache, keys, **tolerance)
        torch.testing.assert_close(layer.attn.v_cache, values, **tolerance)
    assert not torch.equal(written[0][0], before[0][0])  # the step did write its token


@needs_ops
def test_blocks_fall_back_to_inductor_by_default_and_refuse_when_asked_for():
    """An activation the C++ ops do not know: the default form is inductor; compile="blocks" says why it cannot."""
    model = tiny_model("llama", hidden_act="relu")
    ids, mask = random_prompts([4, 6])
    decoder = FastDecoder(model, mode="dense")
    decoder.prefill(ids, mask)
    assert decoder.compile == "default"
    with pytest.raises(ValueError, match="compile='blocks' cannot run this model's step: layer 0's FF block"):
        FastDecoder(model, mode="dense", compile="blocks").prefill(ids, mask)
    with pytest.raises(ValueError, match="compile='blocks' runs the step through the C\\+\\+ CPU ops"):
        FastDecoder(tiny_model("llama"), mode="dense", compile="blocks", use_kernels=False)
    decoder = FastDecoder(tiny_model("llama").to(torch.bfloat16), mode="dense")
    decoder.prefill(ids, mask)
    assert decoder.compile == "blocks" and decoder.lean.block_problem() is None
    decoder.lean.norm = decoder.lean.norm.float()  # weights of two dtypes: the ops take one
    assert decoder.lean.block_problem() == "the model's weights are not all torch.bfloat16"


@needs_ops
def test_the_block_ops_declare_what_they_write_and_trace_under_torch_compile():
    """``torch.library.opcheck``: the schema (``attention_block`` writes the two caches and nothing else), the fake
    implementations, and tracing by AOT autograd; then the whole block step compiles as one graph."""
    model = build("qwen2", dict(backbone="cats", layers_to_transform=[1]))  # q/k/v biases; a dense and a CATS block
    decoder = FastDecoder(model, compile="blocks")
    ids, mask = random_prompts([4, 6])
    decoder.prefill(ids, mask, max_new_tokens=4)
    lean, tokens = decoder.lean, torch.tensor([3, 4])
    want = lean.block_step(tokens, decoder._slot_host, decoder._positions)
    ops = torch.ops.caprese_cpu
    h = torch.randn(2, 48)
    for (attention_args, ff_args), positions in zip(lean._blocks[:2], (decoder._positions, decoder._positions - 1)):
        torch.library.opcheck(ops.attention_block.default, (h, positions, decoder._slot_host, *attention_args))
        torch.library.opcheck(ops.ff_block.default, (h, *ff_args))
    torch.library.opcheck(ops.norm_linear.default, (h, lean.norm, lean.eps, lean.lm_head))
    compiled = torch.compile(lean.block_step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(tokens, decoder._slot_host, decoder._positions), want)


@needs_ops
def test_the_attention_block_op_checks_its_inputs():
    decoder = FastDecoder(tiny_model("llama"), mode="dense", compile="blocks")
    ids, mask = random_prompts([4, 6])
    decoder.prefill(ids, mask, max_new_tokens=3)
    lean = decoder.lean
    lean.block_step(torch.tensor([3, 4]), decoder._slot_host, decoder._positions)
    attention_args, _ = lean._blocks[0]
    h = torch.randn(2, 48)
    op = torch.ops.caprese_cpu.attention_block.default
    with pytest.raises(RuntimeError, match="need 0 <= prompt_width <= slot < 9"):
        op(h, decoder._positions, 9, *attention_args)
    with pytest.raises(RuntimeError, match="position 300 is outside the rotary tables"):
        op(h, torch.tensor([1, 300]), 7, *attention_args)
    with pytest.raises(RuntimeError, match="h must be a contiguous Float tensor"):
        op(h.t().contiguous().t(), decoder._positions, 7, *attention_args)
    with pytest.raises(RuntimeError, match="qkv has shape"):
        op(h, decoder._positions, 7, *attention_args[:2], attention_args[2][1:], *attention_args[3:])


def test_padded_calls_hold_extra_locals_and_only_call():
    from caprese_peft.fast_decode.decoder import STEP_CALLS, _padded_call

    padded = _padded_call(40)
    assert padded(lambda a, b=0: (a, b), 3, 4) == (3, 4)
    assert padded.__code__.co_nlocals == _padded_call(0).__code__.co_nlocals + 40
    assert [call.__code__.co_nlocals for call in STEP_CALLS] == [2, 2 + 128]


def test_a_cpu_step_keeps_the_faster_of_two_paddings_after_timing_both():
    """Two warm-up steps, then PAD_TRIALS timed steps with each padding; then the faster one stays (the tokens are
    the same either way: the padding only moves the step's frame)."""
    from caprese_peft.fast_decode.decoder import PAD_TRIALS, STEP_CALLS

    model = build("llama", dict(backbone="cats", layers_to_transform=[0, 2]))
    decoder = FastDecoder(model, max_seq_len=40, compile="default")  # inductor, Python wrapper
    ids, mask = random_prompts([5, 3], seed=8)
    steps = 2 + len(STEP_CALLS) * PAD_TRIALS
    decoder.prefill(ids, mask)
    assert decoder._pad_times == [[] for _ in STEP_CALLS]
    sequences = decoder.generate(ids, mask, max_new_tokens=steps + 2)
    assert decoder._pad_times is None and decoder._call_step in STEP_CALLS
    assert torch.equal(sequences, reference_generate(model, "caprese", ids, mask, steps + 2))
    eager = FastDecoder(model, max_seq_len=40, compile="none")
    eager.prefill(ids, mask)
    assert eager._pad_times is None  # no inductor wrapper, nothing to choose


def test_buffers_grow_for_a_longer_second_call_and_are_kept_for_a_shorter_one():
    model = build("qwen2", dict(backbone="cats"))
    decoder = eager_decoder(model)  # no max_seq_len: each call sizes what it needs
    ids, mask = random_prompts([5, 3], seed=5)
    assert torch.equal(
        decoder.generate(ids, mask, max_new_tokens=2), reference_generate(model, "caprese", ids, mask, 2)
    )
    short = decoder.lean.max_seq_len
    longer_ids, longer_mask = random_prompts([9, 12], seed=6)
    got = decoder.generate(longer_ids, longer_mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got, reference_generate(model, "caprese", longer_ids, longer_mask))
    assert decoder.lean.max_seq_len == 12 + NEW_TOKENS > short
    lean_cache = decoder.lean.layers[0].attn.k_cache
    assert torch.equal(
        decoder.generate(ids, mask, max_new_tokens=2), reference_generate(model, "caprese", ids, mask, 2)
    )
    assert decoder.lean.layers[0].attn.k_cache is lean_cache  # long enough already: no new buffers, no recompile


@pytest.mark.parametrize("once", [True, False], ids=["layer-once", "unrolled"])
@pytest.mark.parametrize("case", [*CASES, "cats-kernel"])
def test_every_mode_compiles_as_one_graph(case, once):
    """No graph breaks under torch.compile(fullgraph=True), one layer reused or the step unrolled: the condition
    for capturing the whole step in one CUDA graph, checked here because no GPU runs in CI."""
    torch._dynamo.reset()
    options, mode = CASES["cats-caprese" if case == "cats-kernel" else case]
    kernels = {"use_kernels": True} if case == "cats-kernel" else {}  # the Triton op (interpreted) inside the graph
    model = build("qwen3", options)
    ids, mask = random_prompts([7, 3])
    eager = eager_decoder(model, mode=mode, **kernels).generate(ids, mask, max_new_tokens=4)
    compile = lambda f: torch.compile(f, backend="eager", fullgraph=True)  # noqa: E731
    compiled = FastDecoder(model, mode=mode, compile=compile, compile_layers_once=once, **kernels)
    assert torch.equal(compiled.generate(ids, mask, max_new_tokens=4), eager)


@pytest.mark.skipif(not cpu_ops_available(), reason="the C++ CPU ops could not be built here")
def test_cpp_wrapper_step_decodes_what_the_eager_step_decodes():
    """compile="cpp-wrapper": inductor's C++ wrapper calls the C++ ops (CATS and dense blocks, every GEMV) itself."""
    torch._dynamo.reset()
    model = build("llama", dict(backbone="cats", layers_to_transform=[1, 3]))
    ids, mask = random_prompts([5, 7])
    want = eager_decoder(model).generate(ids, mask, max_new_tokens=4)
    assert torch.equal(FastDecoder(model, compile="cpp-wrapper").generate(ids, mask, max_new_tokens=4), want)


@pytest.mark.parametrize("compiled", [False, True, "blocks"], ids=["eager", "inductor", "blocks"])
def test_a_cpu_step_reads_only_the_slots_so_far_and_compiles_once_for_every_length(compiled):
    """On a CPU the step's attention reads the first ``slot + 1`` positions of the static cache, a length marked
    dynamic: slots past the current token, poisoned with NaN, leave the logits finite, and one compiled graph serves
    every length."""
    torch._dynamo.reset()
    model = build("llama", dict(backbone="cats", layers_to_transform=[1, 3]))  # dense and CATS layers
    ids, mask = random_prompts([5, 7])
    want = eager_decoder(model).generate(ids, mask, max_new_tokens=6)
    if compiled == "blocks" and not cpu_ops_available():
        pytest.skip("the C++ CPU ops could not be built here")
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compile = (lambda f: torch.compile(f, backend=counter, fullgraph=True)) if compiled is True else "none"
    compile = "blocks" if compiled == "blocks" else compile
    decoder = FastDecoder(model, compile=compile, max_seq_len=64)
    assert torch.equal(decoder.generate(ids, mask, max_new_tokens=6), want)
    width = ids.shape[1]
    decoder.prefill(ids, mask)
    for layer in decoder.lean.layers:  # what a step must never read: the slots after the token it writes
        layer.attn.k_cache[:, :, width + 1 :] = float("nan")
        layer.attn.v_cache[:, :, width + 1 :] = float("nan")
    logits = decoder.decode_one_token(want[:, width])
    assert torch.isfinite(logits).all()
    assert torch.equal(logits.argmax(-1), want[:, width + 1])
    assert counter.frame_count == (1 if compiled is True else 0)  # 5 lengths, then a new prompt: no recompilation


def test_inductor_step_writes_a_long_cache_in_place():
    """Compiled by inductor (as on a GPU, without CUDA graphs), the step keeps 8K positions of static KV buffers and
    writes each token into them in place: one step allocates far less than one layer's cache would take to copy."""
    torch._dynamo.reset()
    model = build("llama", dict(backbone="cats", layers_to_transform=[1, 3]))  # dense and CATS layers
    ids, mask = random_prompts([5, 7])
    want = eager_decoder(model).generate(ids, mask, max_new_tokens=6)
    decoder = FastDecoder(model, compile="default", max_seq_len=8192)
    assert torch.equal(decoder.generate(ids, mask, max_new_tokens=6), want)
    decoder.prefill(ids, mask)
    tokens = want[:, ids.shape[1]]
    cache = decoder.lean.layers[0].attn.k_cache
    tokens = decoder.decode_greedy(tokens)  # the first step after a prefill may still settle guards
    with torch.profiler.profile(profile_memory=True) as profile:
        decoder.decode_greedy(tokens)
    allocated = sum(max(event.cpu_memory_usage, 0) for event in profile.key_averages())
    assert decoder.lean.layers[0].attn.k_cache is cache and cache.shape[2] == 8192
    assert allocated < cache.nbytes / 16, (allocated, cache.nbytes)


def test_weight_bytes_count_what_a_step_reads():
    model = build("llama", dict(backbone="griffin", density=0.5, layers_to_transform=[0, 1]))
    ids, mask = random_prompts([5])
    dense = eager_decoder(model, mode="dense")
    dense.generate(ids, mask, max_new_tokens=2)
    base = model.get_base_model()
    everything = sum(p.nbytes for n, p in base.named_parameters() if "caprese" not in n)
    assert dense.lean.weight_bytes() == everything - base.get_input_embeddings().weight.nbytes
    sparse = eager_decoder(model, mode="caprese")
    sparse.generate(ids, mask, max_new_tokens=2)
    config = base.config
    k, r = round(0.5 * config.intermediate_size), 8
    saved = 2 * 3 * config.hidden_size * (config.intermediate_size - k) - 2 * 2 * config.hidden_size * r
    assert dense.lean.weight_bytes() - sparse.lean.weight_bytes() == saved * 4  # fp32


def test_bad_input_fails_early_with_a_reason():
    with pytest.raises(ValueError, match="model_type 'gemma2'"):
        eager_decoder(tiny_model("gemma2"), mode="dense")
    with pytest.raises(ValueError, match="mode must be None or one of"):
        eager_decoder(tiny_model("llama"), mode="sparse")
    with pytest.raises(ValueError, match="needs a Caprese adapter"):
        eager_decoder(tiny_model("llama"), mode="caprese")
    with pytest.raises(ValueError, match="reselects every 4 tokens"):
        eager_decoder(build("llama", dict(backbone="griffin", reselect_every=4)))
    with pytest.raises(ValueError, match="sliding-window"):
        eager_decoder(tiny_model("mistral", sliding_window=8), mode="dense", max_seq_len=64)
    with pytest.raises(ValueError, match="compile must be"):
        FastDecoder(tiny_model("llama"), mode="dense", compile="fast")
    decoder = eager_decoder(build("llama", dict(backbone="cats")))
    with pytest.raises(RuntimeError, match="Call prefill"):
        decoder.decode_one_token(torch.zeros(2, dtype=torch.long))
    ids, mask = random_prompts([4, 6])
    with pytest.raises(ValueError, match="left-padded"):
        decoder.prefill(ids, mask.flip(-1))
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        eager_decoder(tiny_model("llama"), mode="dense", max_seq_len=8).generate(ids, mask, max_new_tokens=4)


@pytest.mark.kernels
def test_cats_kernel_in_the_lean_step():
    kernels = pytest.importorskip("caprese_peft.kernels", reason="needs triton")
    if not (torch.cuda.is_available() or kernels.INTERPRET):
        pytest.skip("kernels was imported without TRITON_INTERPRET=1; run this file in a fresh process")
    model = build("llama", dict(backbone="cats", layers_to_transform=[1, 2]))
    ids, mask = random_prompts([6, 4])
    want = reference_generate(model, "caprese", ids, mask, 4)
    got = eager_decoder(model, use_kernels=True).generate(ids, mask, max_new_tokens=4)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", ["reduce-overhead"])
@pytest.mark.parametrize("case", ["plain-dense", "griffin-caprese", "cats-caprese"])
def test_graph_captured_decode_on_gpu_equals_generate(case, compile):
    """CUDA graphs (compiled with inductor) and, for CATS, the Triton op inside them; fp32 without TF32."""
    torch._dynamo.reset()
    options, mode = CASES[case]
    model = build("llama", options).cuda()
    ids, mask = (t.cuda() for t in random_prompts([7, 3, 9]))
    want = reference_generate(model, mode, ids, mask)
    decoder = FastDecoder(model, mode=mode, compile=compile)
    assert torch.equal(decoder.generate(ids, mask, max_new_tokens=NEW_TOKENS), want)
    ids, mask = (t.cuda() for t in random_prompts([5, 8, 2], seed=4))  # the same graph, another prompt batch
    assert torch.equal(
        decoder.generate(ids, mask, max_new_tokens=NEW_TOKENS), reference_generate(model, mode, ids, mask)
    )


@pytest.mark.skipif(not cpu_ops_available(), reason="the C++ CPU ops could not be built here")
@pytest.mark.parametrize("backbone", ["cats", "griffin"])
def test_int4_stand_in_decodes_through_the_cpu_op(backbone):
    """A 4-bit stand-in (hidden size a multiple of 32) decodes through the C++ op in generate and in FastDecoder,
    with the reference's logits and tokens; the backbone mode leaves the stand-in out with L and R."""
    model = wrap(tiny_model("llama", hidden_size=64), backbone=backbone, density=0.4, r=4, stand_in_bits=4)
    layer = layers_of(model)[0]
    decoder = layer.caprese_decoder["default"]
    assert decoder.stand_in_problem(torch.zeros(1, 1, 64)) is None
    ids, mask = random_prompts([7, 3, 9])
    with torch.no_grad(), decode_impl(model, "reference"):
        want_seq, want_logits = greedy(model, ids, mask, n=NEW_TOKENS)
    calls = []
    original = type(decoder).fast

    def counted(self, x, stats):
        calls.append(x.shape)
        return original(self, x, stats)

    type(decoder).fast = counted
    try:
        with torch.no_grad():
            got_seq, got_logits = greedy(model, ids, mask, n=NEW_TOKENS)
    finally:
        type(decoder).fast = original
    assert calls, "the stand-in decoded through the reference, not the C++ op"
    assert torch.equal(got_seq, want_seq)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    fast = {mode: eager_decoder(model, mode=mode).generate(ids, mask, max_new_tokens=NEW_TOKENS) for mode in
            ("caprese", "backbone")}  # fmt: skip
    assert torch.equal(fast["caprese"], reference_generate(model, "caprese", ids, mask))
    blocks = FastDecoder(model, mode="caprese", compile="blocks").generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(blocks, fast["caprese"])  # the stand-in's arguments reach the FF block op too
    plain = wrap(tiny_model("llama", hidden_size=64), backbone=backbone, density=0.4, r=4)  # no stand-in
    plain.load_state_dict(model.state_dict())
    assert torch.equal(fast["backbone"], reference_generate(plain, "backbone", ids, mask))  # the backbone alone
    # without the stand-in the tokens differ: the comparison above can fail
    assert not torch.equal(eager_decoder(plain, mode="caprese").generate(ids, mask, max_new_tokens=NEW_TOKENS),
                           fast["caprese"])  # fmt: skip


@pytest.mark.skipif(not cpu_ops_available(), reason="the C++ CPU ops could not be built here")
def test_griffin_packs_its_kept_rows_after_the_prefill_s_token():
    """The prefill only takes the selection; the first decode step packs the union's rows, in neuron order, and
    a later prompt batch repacks them into the same buffers."""
    model = build("llama", dict(backbone="griffin", density=0.5, layers_to_transform=[0, 1]))
    decoder = eager_decoder(model)
    addresses = None
    for seed, lengths in enumerate(([7, 3], [4, 9])):
        ids, mask = random_prompts(lengths, seed=seed)
        want = reference_generate(model, "caprese", ids, mask, new_tokens=3)
        tokens = decoder.prefill(ids, mask, max_new_tokens=3).argmax(-1)
        ff = decoder.lean.layers[0].ff
        assert decoder.lean.load_pending and ff.packs
        if addresses is None:
            assert ff.packed_gate is None  # nothing packed before the first decode step
        generated = [tokens]
        for _ in range(2):
            generated.append(decoder.decode_greedy(generated[-1]))
        assert not decoder.lean.load_pending
        assert torch.equal(torch.stack(generated, 1), want[:, ids.shape[1] :])
        keep = decoder.layers[0]._stats.keep.reshape(2, -1)
        union = keep.any(0).nonzero()[:, 0]
        n = union.numel()
        assert ff.packed_gate.shape[0] == min(keep.shape[1], 2 * ff.kept) >= n
        mlp = decoder.layers[0].base_layer
        rows = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T)
        packed = (ff.packed_gate, ff.packed_up_down[:, 0], ff.packed_up_down[:, 1])  # a neuron's up, down side by side
        for packed_rows, block in zip(packed, rows):
            assert torch.equal(packed_rows[:n], block[union])
        assert torch.equal(ff.keep[:, :n].bool(), keep[:, union]) and not ff.keep[:, n:].any()
        now = [t.data_ptr() for t in (ff.packed_gate, ff.packed_up_down, ff.keep)]
        assert addresses is None or now == addresses  # in place: a compiled step's inputs stay where they were
        addresses = now


def test_a_stored_buffer_never_shares_memory_with_the_statistics():
    from torch import nn

    from caprese_peft.fast_decode.lean import _store

    module = nn.Module()
    module.register_buffer("threshold", None)
    module.register_buffer("keep", None)
    threshold, keep = torch.ones(3, 1, 1), torch.ones(3, 1, 5, dtype=torch.bool)
    _store(module, "threshold", threshold.reshape(-1), torch.float32)  # a view, no conversion: copied
    _store(module, "keep", keep.reshape(3, -1), torch.uint8)  # converted
    threshold.zero_()
    keep.zero_()
    assert module.threshold.eq(1).all() and module.keep.dtype == torch.uint8 and module.keep.eq(1).all()
    before = module.threshold.data_ptr()
    _store(module, "threshold", torch.full((3,), 2.0))  # same shape: written in place
    assert module.threshold.data_ptr() == before and module.threshold.eq(2).all()
