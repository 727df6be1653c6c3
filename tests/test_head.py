"""The weight-only int8 / int4 LM head: the format (round trips, the rounding bound), the C++ kernel on every ISA
path this CPU runs against a float64 reference, the op (eager, autograd, ``backend="rabit"``), and the model-level
swap (a tied head untied, the embedding exact, save/load and generate)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels.weight_only import (
    ISAS,
    QMAX,
    WeightOnlyQuantized,
    dequantize_activations,
    dequantize_weight_only,
    gptq_weight_only,
    load_operator,
    native_isa,
    pack_int4,
    quantize_activations,
    quantize_weight_only,
    unpack_int4,
    weight_only_linear_kernel,
)
from transformers import LlamaConfig, LlamaForCausalLM

import rabit_compiler as rabit
from rabit_compiler.fit import dampened, inverse_hessian_factor
from rabit_compiler.head import WeightOnlyLinear, head_input_gram, quantize_head_

RUNNABLE_ISAS = ISAS[ISAS.index(native_isa()):]
SCHEMES = st.sampled_from([(8, None), (8, 32), (8, 64), (4, None), (4, 32), (4, 96)])


@given(n=st.integers(1, 9), k=st.integers(1, 140), seed=st.integers(0, 2**16))
def test_int4_pack_round_trip(n, k, seed):
    q = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 16 * -(-k // 32))
    assert torch.equal(unpack_int4(packed, k), q)


@given(scheme=SCHEMES, n=st.integers(1, 9), k=st.integers(1, 140), seed=st.integers(0, 2**16))
def test_rounding_error_is_at_most_half_a_step(scheme, n, k, seed):
    bits, group_size = scheme
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    weight[0, : k // 2] = 0.0  # an all-zero group must give scale 0, not NaN
    quantized = quantize_weight_only(weight, bits, group_size, torch.float32)
    restored = dequantize_weight_only(quantized.qweight, quantized.scale, bits, group_size, k, torch.float64)
    group = k if group_size is None else group_size
    step = quantized.scale.double().repeat_interleave(group, dim=1)[:, :k]
    assert torch.isfinite(restored).all()
    # round to nearest: |W - q s| <= s / 2 (plus the fp32 division's rounding) where W is within the levels
    inside = weight.double().abs() <= step * QMAX[bits] * (1 + 1e-6)
    assert ((restored - weight.double()).abs() <= step * (0.5 + 1e-6))[inside].all()
    assert (restored.abs() <= step * QMAX[bits] * (1 + 1e-6)).all()
    if bits == 8:
        assert inside.all()  # s = max |w| / 127: nothing clipped
    else:  # per group, the squared error is at most that of s = max |w| / 7 (c = 1 is among the clips tried)
        pad = (0, -k % group)
        grouped = torch.nn.functional.pad(weight, pad).unflatten(1, (-1, group))
        plain = grouped.abs().amax(-1, keepdim=True) / QMAX[bits]
        unclipped = (torch.round(grouped / plain.clamp_min(1e-30)).clamp(-7, 7) * plain - grouped).square().sum(-1)
        error = torch.nn.functional.pad(restored - weight.double(), pad).square().unflatten(1, (-1, group)).sum(-1)
        assert (error <= unclipped.double() * (1 + 1e-5) + 1e-12).all()


@given(scheme=SCHEMES, n=st.integers(1, 70), k=st.integers(1, 200), rows=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
       scale_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), threads=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_kernel_matches_float64_reference_on_every_isa(scheme, n, k, rows, dtype, bias, scale_dtype, threads, seed):
    bits, group_size = scheme
    generator = torch.Generator().manual_seed(seed)
    quantized = quantize_weight_only(torch.randn(n, k, generator=generator), bits, group_size, scale_dtype)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator) if bias else None
    weight = dequantize_weight_only(quantized.qweight, quantized.scale, bits, group_size, k, torch.float64)
    reference = x.double() @ weight.T + (0 if b is None else b.double())
    # fp32 accumulation of k products: |error| <= k * 2^-23 * sum |w x| (with slack), the output then rounded once
    bound = 4 * k * 2**-23 * (x.double().abs() @ weight.abs().T) + 1e-6
    outputs = {}
    for isa in RUNNABLE_ISAS:
        out = outputs[isa] = torch.full((rows, n), float("nan"))
        weight_only_linear_kernel(x, quantized.qweight, quantized.scale, b, bits, group_size, k, isa=isa,
                                  threads=threads, out=out)
        assert torch.isfinite(out).all()
        assert ((out.double() - reference).abs() <= bound).all(), isa
    via_op = torch.ops.rabit.weight_only_linear(x, quantized.qweight, quantized.scale, b, bits, group_size or 0, k)
    assert via_op.dtype == dtype and torch.equal(via_op, outputs[native_isa()].to(dtype))


@given(k=st.integers(1, 200), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_activation_rounding_is_within_half_a_step(k, rows, seed):
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[0, : k // 3] = 0.0  # an all-zero block has step 0 and q = 0
    q, step = quantize_activations(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and step.shape == (rows, -(-k // 32))
    assert q.abs().max() <= 127 and torch.isfinite(step).all()
    per_column = step.double().repeat_interleave(32, dim=1)[:, :k]
    # round to nearest: |x - q d| <= d / 2, plus the fp32 rounding of d = max / 127 times |q| <= 127
    assert ((dequantize_activations(q, step) - x.double()).abs() <= per_column * (0.5 + 127 * 2**-23)).all()


# k: short rows, and rows of 8 blocks and more (the AVX2 int4 path's vector scale loads) on both sides of its
# 512-byte switch between two rows at a time and one
@given(scheme=SCHEMES, n=st.integers(1, 70), k=st.one_of(st.integers(1, 200), st.integers(200, 1200)),
       rows=st.integers(1, 4), bias=st.booleans(),
       scale_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), threads=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_int8_activation_kernel_matches_float64_reference_on_every_isa(scheme, n, k, rows, bias, scale_dtype, threads,
                                                                        seed):
    bits, group_size = scheme
    generator = torch.Generator().manual_seed(seed)
    quantized = quantize_weight_only(torch.randn(n, k, generator=generator), bits, group_size, scale_dtype)
    x = torch.randn(rows, k, generator=generator)
    b = torch.randn(n, generator=generator) if bias else None
    weight = dequantize_weight_only(quantized.qweight, quantized.scale, bits, group_size, k, torch.float64)
    rounded = dequantize_activations(*quantize_activations(x))
    reference = rounded @ weight.T + (0 if b is None else b.double())
    # the block dot products are exact integers; fp32 scaling and summing them: a few roundings per term
    bound = 4 * k * 2**-23 * (rounded.abs() @ weight.abs().T) + 1e-6
    outputs = {}
    for isa in RUNNABLE_ISAS:
        out = outputs[isa] = torch.full((rows, n), float("nan"))
        weight_only_linear_kernel(x, quantized.qweight, quantized.scale, b, bits, group_size, k, isa=isa,
                                  threads=threads, out=out, int8_activations=True)
        assert ((out.double() - reference).abs() <= bound).all(), isa
    via_op = torch.ops.rabit.weight_only_linear(x, quantized.qweight, quantized.scale, b, bits, group_size or 0, k,
                                                int8_activations=True)
    assert torch.equal(via_op, outputs[native_isa()])


@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("scheme", [(8, None), (4, 32)])
def test_two_threads_give_the_bits_of_one(isa, int8_activations, scheme):
    """The kernel hands its rows to the threads in units shared out by stealing at the tail (work_sharing.h): which
    thread computes a row changes from call to call, the result must not. 25 two-thread calls on 3,001 rows (about
    50 units per thread, a partial last one) equal one thread's bits."""
    bits, group_size = scheme
    generator = torch.Generator().manual_seed(bits)
    n, k = 3001, 200
    quantized = quantize_weight_only(torch.randn(n, k, generator=generator), bits, group_size, torch.float16)
    x = torch.randn(2, k, generator=generator)

    def run(threads: int) -> torch.Tensor:
        out = torch.full((2, n), float("nan"))
        weight_only_linear_kernel(x, quantized.qweight, quantized.scale, None, bits, group_size, k, isa=isa,
                                  threads=threads, out=out, int8_activations=int8_activations)
        return out

    one_thread = run(1)
    assert one_thread.isfinite().all()
    for _ in range(25):
        assert torch.equal(run(2), one_thread)


@given(scheme=SCHEMES, n=st.integers(1, 70), k=st.integers(1, 200), shape=st.sampled_from([(1,), (4,), (1, 1), (2, 2)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
       scale_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), int8_activations=st.booleans(),
       threads=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_cpp_operator_is_the_kernel(scheme, n, k, shape, dtype, bias, scale_dtype, int8_activations, threads, seed):
    """``rabit::weight_only_gemv`` (C++, no Python in the call) returns what the kernel writes into a NaN-poisoned
    output, bit for bit, in x's dtype and shape: the same kernel, whose accuracy the tests above bound."""
    bits, group_size = scheme
    generator = torch.Generator().manual_seed(seed)
    quantized = quantize_weight_only(torch.randn(n, k, generator=generator), bits, group_size, scale_dtype)
    x = torch.randn(*shape, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator) if bias else None
    load_operator(bits, scale_dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        via_cpp = torch.ops.rabit.weight_only_gemv(x, quantized.qweight, quantized.scale, b, bits, group_size or 0, k,
                                                   int8_activations)
        out = torch.full((x.numel() // k, n), float("nan"))
        weight_only_linear_kernel(x, quantized.qweight, quantized.scale, b, bits, group_size, k, threads=threads,
                                  out=out, int8_activations=int8_activations)
    finally:
        torch.set_num_threads(previous)
    assert via_cpp.shape == (*shape, n) and via_cpp.dtype == dtype
    assert torch.equal(via_cpp, out.to(dtype).reshape(*shape, n))


def test_cpp_operator_refuses_bad_inputs():
    quantized = quantize_weight_only(torch.randn(8, 64), 8, None)
    load_operator(8, quantized.scale.dtype)
    gemv = torch.ops.rabit.weight_only_gemv
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        gemv(torch.randn(5, 64), quantized.qweight, quantized.scale, None, 8, 0, 64, False)
    with pytest.raises(RuntimeError, match="x must be"):
        gemv(torch.randn(1, 63), quantized.qweight, quantized.scale, None, 8, 0, 64, False)
    with pytest.raises(RuntimeError, match="qweight must be"):
        gemv(torch.randn(1, 64), quantized.qweight, quantized.scale, None, 4, 0, 64, False)
    with pytest.raises(RuntimeError, match="scale must be"):
        gemv(torch.randn(1, 64), quantized.qweight, quantized.scale[:4], None, 8, 0, 64, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        gemv(torch.randn(1, 64), quantized.qweight, quantized.scale, torch.randn(7), 8, 0, 64, False)
    torch.library.opcheck(torch.ops.rabit.weight_only_gemv.default,
                          (torch.randn(2, 64), quantized.qweight, quantized.scale, torch.randn(8), 8, 0, 64, True))


def test_cpu_lowering_calls_the_cpp_operator_with_the_tables_arithmetic():
    """A head call with few static CPU rows becomes ``rabit::weight_only_gemv``, int8 activations with int8 tables;
    more rows keep the Python op (any rows)."""
    from rabit_compiler.passes.lower import lower_for_cpu

    torch.manual_seed(0)
    head = WeightOnlyLinear.from_linear(torch.nn.Linear(100, 37), 8, None)
    x = torch.randn(1, 100)
    exact = head(x)
    rounded = torch.ops.rabit.weight_only_linear(x, head.qweight, head.scale, head.bias, 8, 0, 100,
                                                 int8_activations=True)
    assert not torch.equal(exact, rounded)
    for tables, expected in (("fp32", exact), ("int8", rounded)):
        gm = torch.fx.symbolic_trace(head)
        lower_for_cpu(gm, [x], tables=tables)
        targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
        assert targets == ["rabit.weight_only_gemv.default"], targets
        assert torch.equal(gm(x), expected), tables
    many = torch.randn(9, 100)
    gm = torch.fx.symbolic_trace(head)
    lower_for_cpu(gm, [many], tables="int8")
    assert [str(node.target).removesuffix(".default") for node in gm.graph.nodes
            if node.op == "call_function"] == ["rabit.weight_only_linear"]
    assert torch.equal(gm(many), head(many))


def test_op_gradients_and_many_rows_match_the_dequantized_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(70, 33)
    head = WeightOnlyLinear.from_linear(linear, 4, 32)
    weight = head.dequantize(torch.float64)
    x = torch.randn(3, 7, 70, dtype=torch.float64, requires_grad=True)  # 21 rows: the reference path
    y = head(x)
    expected = x.detach() @ weight.T + linear.bias.double()
    torch.testing.assert_close(y.detach(), expected, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * expected @ weight, rtol=1e-10, atol=1e-10)
    assert linear.bias.grad is None and head.bias.grad is not None


@given(scheme=SCHEMES, n=st.integers(1, 9), k=st.integers(1, 140), seed=st.integers(0, 2**16))
def test_gptq_under_a_diagonal_second_moment_is_round_to_nearest(scheme, n, k, seed):
    """With a diagonal H no error moves between columns, so every group sees its own weights: the same bits."""
    bits, group_size = scheme
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    factor = inverse_hessian_factor(dampened(torch.diag(torch.rand(k, generator=generator) + 0.1), 0.01))
    gptq, nearest = gptq_weight_only(weight, bits, group_size, factor), quantize_weight_only(weight, bits, group_size)
    assert torch.equal(gptq.qweight, nearest.qweight) and torch.equal(gptq.scale, nearest.scale)


def output_error(weight: torch.Tensor, quantized, inputs: torch.Tensor) -> float:
    restored = dequantize_weight_only(quantized.qweight, quantized.scale, quantized.bits, quantized.group_size,
                                      quantized.in_features, torch.float64)
    return ((restored - weight.double()) @ inputs.double().T).square().sum().item()


@pytest.mark.parametrize("scheme", [(4, 32), (4, 96), (8, None)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(scheme):
    """Inputs with correlated channels (as a model's hidden states): GPTQ's output error on them is well below
    round-to-nearest's (measured: about half), and its codes are in range (int4 within +-7)."""
    bits, group_size = scheme
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 150, generator=generator)
    inputs = (torch.randn(600, 150, generator=generator) @ torch.randn(150, 150, generator=generator) * 0.2
              + torch.randn(600, 1, generator=generator))
    factor = inverse_hessian_factor(dampened(inputs.T @ inputs / inputs.shape[0], 0.01))
    gptq = gptq_weight_only(weight, bits, group_size, factor)
    assert output_error(weight, gptq, inputs) < 0.75 * output_error(weight, quantize_weight_only(weight, bits,
                                                                                                group_size), inputs)
    if bits == 4:
        assert unpack_int4(gptq.qweight, 150).abs().max() <= QMAX[4]
    with pytest.raises(ValueError, match="inverse_factor"):
        gptq_weight_only(weight, bits, group_size, factor[1:, 1:])


def test_the_default_head_is_gptq_int4_with_calibration_and_int8_without():
    """quantize_'s default head ("auto") with calibration: int4 by GPTQ under the packed model's final hidden
    states (the head's inputs as the quantized body computes them), lower output error there than rounding to
    nearest; int8 (asked for, or the default without calibration) is rounded to nearest."""
    calibration = torch.randint(0, 211, (6, 16), generator=torch.Generator().manual_seed(1))
    models = {}
    for scheme, data in (("auto", calibration), ("int8", calibration), ("auto", None)):
        model = tiny_llama()
        weight = model.lm_head.weight.detach().clone()
        rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, head=scheme), calibration=data, progress=False)
        models[scheme, data is not None] = (model, weight)
    model, weight = models["auto", True]
    assert (model.lm_head.bits, model.lm_head.group_size) == (4, 32)
    with torch.no_grad():
        inputs = model.model(calibration).last_hidden_state.reshape(-1, weight.shape[1])
    gram = head_input_gram(model, model.lm_head, calibration)
    torch.testing.assert_close(gram, inputs.T @ inputs / inputs.shape[0], rtol=1e-5, atol=1e-6)
    head = model.lm_head
    gptq = WeightOnlyQuantized(head.qweight, head.scale, 4, 32, head.in_features)
    assert output_error(weight, gptq, inputs) < 0.9 * output_error(weight, quantize_weight_only(weight, 4, 32), inputs)
    for key in (("int8", True), ("auto", False)):
        model, weight = models[key]
        assert model.lm_head.bits == 8
        assert torch.equal(model.lm_head.qweight, quantize_weight_only(weight, 8, None).qweight)


def test_bad_schemes_are_refused():
    weight = torch.randn(4, 64)
    for bits, group_size in ((3, None), (8, 48), (4, 0), (4, True)):
        with pytest.raises(ValueError):
            quantize_weight_only(weight, bits, group_size)
    with pytest.raises(ValueError, match="finite"):
        quantize_weight_only(torch.full((4, 64), float("nan")), 8, None)
    with pytest.raises(ValueError, match="head must be one of"):
        rabit.RaBiTConfig(head="int2")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_unties_the_head_and_keeps_the_embedding_exact(scheme, tmp_path):
    model = tiny_llama()
    embedding = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    report = rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, head=scheme), progress=False)
    assert report.head == "lm_head" and "lm_head" not in report.skipped
    assert isinstance(model.lm_head, WeightOnlyLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    with torch.no_grad():
        head_out = model.lm_head(hidden)
    torch.testing.assert_close(head_out, hidden @ model.lm_head.dequantize().T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "hf")
    rabit.save(model, tmp_path / "rabit")
    for directory in ("hf", "rabit"):
        loaded = rabit.load(tmp_path / directory)
        assert isinstance(loaded.lm_head, WeightOnlyLinear)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, before)
    generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    compiled = torch.compile(model, backend="rabit")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, before, rtol=1e-4, atol=1e-4)
    assert generated.shape == (1, 13)


def test_fp_head_scheme_leaves_the_model_as_it_was():
    model = tiny_llama()
    report = rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, head="fp"), progress=False)
    assert report.head is None and report.skipped["lm_head"]
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert quantize_head_(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int8") is None  # no head found: logged


def test_backend_refuses_a_head_option_it_would_not_apply():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(Exception, match="weight-only by rabit.quantize_"):
        torch.compile(model, backend="rabit", options={"head": "int8"})(torch.randn(2, 8))
