"""The generated C++ CPU kernel (kernels/cpu_kernel.py) against a float64 reference, and the op's use of it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import cpu_kernel, ops
from rabit_compiler.kernels.cpu_kernel import (
    KERNEL_MAX_ROWS,
    residual_binary_linear_siblings_kernel,
    uses_kernel,
)

from .reference import assert_close_scaled, packed_linear_float64
from .test_op import DTYPES


def random_siblings(paths, sizes, in_features, bias, scale_dtype, generator):
    """Random signs packed for ``sum(sizes)`` rows, row scales ``[k, N]``, column scales ``[S, k, K]``."""
    from rabit_compiler.kernels import pack_signs

    total = sum(sizes)
    signs = torch.where(torch.rand(paths, total, in_features, generator=generator) < 0.5, -1.0, 1.0)
    packed_signs = torch.stack([pack_signs(plane) for plane in signs])
    row_scale = (torch.rand(paths, total, generator=generator) + 0.1).to(scale_dtype)
    col_scale = (torch.rand(len(sizes), paths, in_features, generator=generator) + 0.1).to(scale_dtype)
    bias_values = torch.randn(total, generator=generator) if bias else None
    return packed_signs, row_scale, col_scale, bias_values


def expected_siblings(x, packed_signs, row_scale, col_scale, bias, in_features, sizes):
    """Float64 result and the magnitude of its terms, sibling by sibling."""
    outputs, scales, start = [], [], 0
    for segment, size in enumerate(sizes):
        rows = slice(start, start + size)
        start += size
        part_bias = None if bias is None else bias[rows]
        outputs.append(packed_linear_float64(x, packed_signs[:, rows], row_scale[:, rows], col_scale[segment],
                                             part_bias, in_features))
        scale = packed_linear_float64(x.abs(), torch.zeros_like(packed_signs[:, rows]), row_scale[:, rows],
                                      col_scale[segment], None, in_features)
        scales.append(scale if part_bias is None else scale + part_bias.double().abs())
    return torch.cat(outputs, -1), torch.cat(scales, -1)


@given(
    paths=st.integers(1, 4), in_features=st.integers(1, 300), sizes=st.lists(st.integers(0, 70), min_size=1,
                                                                             max_size=3),
    rows=st.integers(1, 2 * KERNEL_MAX_ROWS), dtype=st.sampled_from(DTYPES),
    scale_dtype=st.sampled_from(DTYPES), bias=st.booleans(), threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31),
)
def test_kernel_matches_float64(paths, in_features, sizes, rows, dtype, scale_dtype, bias, threads, seed):
    """Every output element is written (the output is poisoned with NaN first) and equals the reference."""
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, bias_values = random_siblings(paths, sizes, in_features, bias,
                                                                      scale_dtype, generator)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    out = torch.full((rows, sum(sizes)), float("nan"), dtype=dtype)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = residual_binary_linear_siblings_kernel(x, packed_signs, row_scale, col_scale, bias_values,
                                                        in_features, sizes, out=out)
    finally:
        torch.set_num_threads(previous_threads)
    assert result.data_ptr() == out.data_ptr()
    expected, scale = expected_siblings(x, packed_signs, row_scale, col_scale, bias_values, in_features, sizes)
    assert_close_scaled(out, expected, scale, dtype)


def test_kernel_flips_exactly_the_set_bits():
    """With g = h = 1 and x[c] = c + 1 every partial sum is an exact fp32 integer: the output equals the
    float64 reference bit for bit, so one misread sign anywhere shows (it moves a sum by 2 (c + 1))."""
    in_features, out_features = 101, 9
    generator = torch.Generator().manual_seed(7)
    packed_signs, _, _, _ = random_siblings(2, [out_features], in_features, False, torch.float32, generator)
    x = torch.arange(1, in_features + 1, dtype=torch.float32)[None]
    row_scale, col_scale = torch.ones(2, out_features), torch.ones(1, 2, in_features)
    out = residual_binary_linear_siblings_kernel(x, packed_signs, row_scale, col_scale, None, in_features,
                                                 [out_features])
    assert torch.equal(out.double(), packed_linear_float64(x, packed_signs, row_scale, col_scale[0], None,
                                                           in_features))


def test_op_uses_the_kernel_for_few_rows(monkeypatch):
    """The op's CPU kernel calls the C++ kernel up to KERNEL_MAX_ROWS rows of fp32/fp16/bf16, else the reference."""
    calls = []
    kernel = ops.residual_binary_linear_kernel
    monkeypatch.setattr(ops, "residual_binary_linear_kernel", lambda *args: calls.append(args) or kernel(*args))
    generator = torch.Generator().manual_seed(0)
    packed_signs, row_scale, col_scale, _ = random_siblings(2, [40], 50, False, torch.float16, generator)
    for rows, dtype, uses in ((1, torch.float32, True), (KERNEL_MAX_ROWS, torch.bfloat16, True),
                              (KERNEL_MAX_ROWS + 1, torch.float32, False), (1, torch.float64, False)):
        calls.clear()
        x = torch.randn(rows, 50, generator=generator).to(dtype)
        out = torch.ops.rabit.residual_binary_linear(x, packed_signs, row_scale, col_scale[0], None, 50)
        assert bool(calls) == uses == uses_kernel(x, row_scale, col_scale)
        expected, scale = expected_siblings(x, packed_signs, row_scale, col_scale, None, 50, [40])
        assert_close_scaled(out, expected, scale, dtype)


def test_bad_inputs_raise_clear_errors():
    generator = torch.Generator().manual_seed(0)
    packed_signs, row_scale, col_scale, _ = random_siblings(2, [8], 40, False, torch.float32, generator)
    with pytest.raises(TypeError, match="float64"):
        residual_binary_linear_siblings_kernel(torch.randn(1, 40, dtype=torch.float64), packed_signs, row_scale,
                                               col_scale, None, 40, [8])
    with pytest.raises(ValueError, match="words"):
        residual_binary_linear_siblings_kernel(torch.randn(1, 70), packed_signs, row_scale, col_scale, None, 70,
                                               [8])
    with pytest.raises(ValueError, match="out must be"):
        residual_binary_linear_siblings_kernel(torch.randn(2, 40), packed_signs, row_scale, col_scale, None, 40,
                                               [8], out=torch.empty(1, 8))
    with pytest.raises(TypeError, match="takes"):
        cpu_kernel.kernel_source(torch.int32, torch.float32)


def test_gemv_op_opcheck():
    """The op the CPU lowering emits: schema, fake implementation and dispatch agree (``torch.library.opcheck``)."""
    generator = torch.Generator().manual_seed(3)
    packed_signs, row_scale, col_scale, bias = random_siblings(2, [20, 13], 45, True, torch.float16, generator)
    x = torch.randn(1, 45, generator=generator)
    torch.library.opcheck(torch.ops.rabit.residual_binary_gemv_cpu.default,
                          (x, packed_signs, row_scale, col_scale, bias, torch.tensor([0, 20, 33]), 45))
