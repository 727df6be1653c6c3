"""The CPU decode attention kernel ``rabit::decode_attention`` (kernels/cpu_attention.py, cpu_attention.cpp) against a
float64 reference, and its lowering by the backend (passes/attention.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import cpu_attention
from rabit_compiler.passes.attention import DECODE_MAX_ROWS, lower_decode_attention

from rabit_compiler.backend import rabit_backend

# the output is rounded to its dtype once (half an ulp, relative) on top of fp32 sums of D products and |P| weights
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def reference(query, key, value, mask, scale) -> torch.Tensor:
    """softmax over the positions the mask lets through of scale * q K^T, times V, in float64 (zeros where none)."""
    scores = (query.double() @ key.double().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return weights @ value.double()


def random_inputs(batch, heads, rows, length, dim, value_dim, dtype, mask_kind, slack, generator):
    """query [B, H, M, D]; key and value as slices [:, :, :L] of caches ``slack`` positions longer (strided as a
    static cache's first L slots); a bool mask [B or 1, 1, 1, L] or None."""
    query = torch.randn(batch, heads, rows, dim, generator=generator).to(dtype)
    key = torch.randn(batch, heads, length + slack, dim, generator=generator).to(dtype)[:, :, :length]
    value = torch.randn(batch, heads, length + slack, value_dim, generator=generator).to(dtype)[:, :, :length]
    mask = None
    if mask_kind != "none":
        mask = torch.rand(batch if mask_kind == "per-batch" else 1, 1, 1, length, generator=generator) < 0.6
    return query, key, value, mask


@given(batch=st.integers(1, 3), heads=st.integers(1, 4), rows=st.integers(1, 7), length=st.integers(1, 70),
       dim=st.sampled_from([1, 7, 16, 17, 64, 80]), value_dim=st.sampled_from([None, 5, 33]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       mask_kind=st.sampled_from(["none", "shared", "per-batch"]), slack=st.sampled_from([0, 3]),
       scale=st.floats(0.05, 1.5), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_decode_attention_equals_a_float64_reference(batch, heads, rows, length, dim, value_dim, dtype, mask_kind,
                                                     slack, scale, threads, seed):
    generator = torch.Generator().manual_seed(seed)
    query, key, value, mask = random_inputs(batch, heads, rows, length, dim, value_dim or dim, dtype, mask_kind,
                                            slack, generator)
    out = torch.full((batch, heads, rows, value_dim or dim), float("nan"), dtype=dtype)  # unwritten shows as NaN
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = cpu_attention.decode_attention(query, key, value, mask, scale, out=out)
    finally:
        torch.set_num_threads(previous)
    assert result.data_ptr() == out.data_ptr()
    expected = reference(query, key, value, mask, scale)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance * value.abs().max().item())
    allocated = cpu_attention.decode_attention(query, key, value, mask, scale)
    assert allocated.dtype == dtype and torch.equal(allocated, out)


@given(batch=st.integers(1, 2), heads=st.integers(1, 3), rows=st.integers(1, 4), length=st.integers(1, 300),
       mask_kind=st.sampled_from(["none", "per-batch"]), seed=st.integers(0, 2**16))
def test_long_caches_give_the_same_bits_at_any_thread_count(batch, heads, rows, length, mask_kind, seed):
    """A decode step's logits must not depend on the thread count: 1 and 2 threads give the same bits over caches
    long enough to be split among threads (batch rows with different masks), and match the float64 reference."""
    generator = torch.Generator().manual_seed(seed)
    query, key, value, mask = random_inputs(batch, heads, rows, length, 64, 64, torch.float32, mask_kind, 0,
                                            generator)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.full((batch, heads, rows, 64), float("nan"))
            results.append(cpu_attention.decode_attention(query, key, value, mask, 0.125, out=out))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])
    expected = reference(query, key, value, mask, 0.125)
    tolerance = TOLERANCE[torch.float32]
    torch.testing.assert_close(results[0].double(), expected, rtol=tolerance,
                               atol=tolerance * value.abs().max().item())


def test_results_the_caller_holds_are_never_overwritten():
    """Outputs are reused from call to call only when nothing else holds them (kernels/outputs.h)."""
    generator = torch.Generator().manual_seed(5)
    calls = [random_inputs(1, 3, 3, 40, 64, 64, torch.float32, "shared", 0, generator) for _ in range(4)]
    expected = [cpu_attention.decode_attention(q, k, v, m, 0.125).clone() for q, k, v, m in calls]
    held = cpu_attention.decode_attention(*calls[0], 0.125)
    with torch.inference_mode():  # a view that references only the storage
        view = cpu_attention.decode_attention(*calls[1], 0.125)[:, 1:]
    for _ in range(3):
        for (q, k, v, m), want in zip(calls[2:], expected[2:], strict=True):
            assert torch.equal(cpu_attention.decode_attention(q, k, v, m, 0.125), want)
    assert torch.equal(held, expected[0]) and torch.equal(view, expected[1][:, 1:])


def test_it_matches_scaled_dot_product_attention_on_a_static_cache():
    """Decode over a static cache whose last slots are empty (masked): the kernel and ATen's sdpa agree."""
    generator = torch.Generator().manual_seed(0)
    query, key, value, _ = random_inputs(1, 3, 3, 200, 64, 64, torch.float32, "none", 0, generator)
    mask = torch.zeros(1, 1, 1, 200, dtype=torch.bool)
    mask[..., :57] = True
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.125)
    torch.testing.assert_close(cpu_attention.decode_attention(query, key, value, mask, 0.125), expected,
                               rtol=1e-5, atol=1e-6)


def test_a_row_with_nothing_to_attend_is_zero_as_in_sdpa():
    query, key, value = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 2] = True
    query, key, value = (t.expand(2, -1, -1, -1) for t in (query, key, value))
    result = cpu_attention.decode_attention(query, key, value, mask, 0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.5)
    assert torch.equal(result[0], torch.zeros_like(result[0]))
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v, m: (q, k[:, :1], v, m), "key"),
    (lambda q, k, v, m: (q, k, v.double(), m), "one dtype"),
    (lambda q, k, v, m: (q, k, v, m.float()), "attn_mask must be bool"),
    (lambda q, k, v, m: (q, k, v, m.expand(1, 2, 1, 5)), "the same for every head"),
    (lambda q, k, v, m: (q[0], k, v, m), "4-D"),
])
def test_bad_operands_raise_clear_errors(bad, message):
    operands = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                torch.ones(1, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=message):
        cpu_attention.decode_attention(*bad(*operands), 0.5)


class Attention(torch.nn.Module):
    def forward(self, query, key, value, mask):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.25)


def lowering(counts: list[int]):
    def backend(gm, example_inputs):
        counts.append(lower_decode_attention(gm))
        return gm.forward

    return backend


@pytest.mark.parametrize("rows, mask_kind, lowered", [
    (1, "bool", 1), (DECODE_MAX_ROWS, "none", 1), (DECODE_MAX_ROWS + 1, "bool", 0), (1, "float", 0),
    (3, "per-row", 0),
])
def test_the_pass_lowers_decode_attention_only(rows, mask_kind, lowered):
    """Few query rows with a shared bool mask (or none) become the kernel, with sdpa's result; prefill, additive
    masks and masks that differ per row keep sdpa."""
    generator = torch.Generator().manual_seed(1)
    query, key, value, _ = random_inputs(2, 3, rows, 11, 16, 16, torch.float32, "none", 0, generator)
    mask = {"none": None, "bool": torch.rand(2, 1, 1, 11, generator=generator) < 0.7,
            "float": torch.zeros(2, 1, 1, 11), "per-row": torch.rand(2, 1, rows, 11, generator=generator) < 0.7}[
        mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True
    counts: list[int] = []
    compiled = torch.compile(Attention(), backend=lowering(counts), fullgraph=True, dynamic=False)
    result = compiled(query, key, value, mask)
    assert counts == [lowered]
    torch.testing.assert_close(result, Attention()(query, key, value, mask), rtol=1e-5, atol=1e-6)


def test_attention_that_needs_gradients_keeps_sdpa():
    counts: list[int] = []
    query = torch.randn(1, 2, 1, 8, requires_grad=True)
    compiled = torch.compile(Attention(), backend=lowering(counts), fullgraph=True, dynamic=False)
    compiled(query, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), None).sum().backward()
    assert counts == [0] and query.grad is not None


@pytest.mark.parametrize("cpu_attention_option", [True, False])
def test_the_backend_option_switches_the_kernel(cpu_attention_option):
    """``options={"cpu_attention": False}`` keeps sdpa in the compiled graph; the default lowers it."""
    graphs = []

    def backend(gm, example_inputs):
        compiled = rabit_backend(gm, example_inputs, options={"cpu_attention": cpu_attention_option,
                                                              "inductor": False})
        graphs.append(gm)
        return compiled

    query, key, value = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    torch.compile(Attention(), backend=backend, fullgraph=True)(query, key, value, mask)
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert ("rabit.decode_attention.default" in targets) == cpu_attention_option
