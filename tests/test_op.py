"""``rabit::residual_binary_linear`` (CPU reference) against a float64 reference, and its registration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import pack_paths
from rabit_compiler.kernels.ops import residual_binary_linear

from .reference import assert_close_scaled, packed_linear_float64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_packed(paths, n, k, bias, dtype, generator):
    signs = torch.where(torch.rand(paths, n, k, generator=generator) < 0.5, -1.0, 1.0)
    row = torch.rand(paths, n, generator=generator) + 0.1
    col = torch.rand(paths, k, generator=generator) + 0.1
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return pack_paths(signs, row, col, b, scale_dtype=torch.float16)


@given(
    paths=st.integers(1, 4), n=st.integers(1, 70), k=st.integers(1, 100), batch=st.sampled_from([(1,), (3,), (2, 5)]),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), transposed_x=st.booleans(), seed=st.integers(0, 2**31),
)
def test_op_matches_float64_reference(paths, n, k, batch, dtype, bias, transposed_x, seed):
    generator = torch.Generator().manual_seed(seed)
    packed = random_packed(paths, n, k, bias, dtype, generator)
    x = torch.randn(*batch, k, generator=generator).to(dtype)
    if transposed_x:  # a non-contiguous input with the same values
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    args = (packed.packed_signs, packed.row_scale, packed.col_scale, packed.bias, k)
    out = torch.ops.rabit.residual_binary_linear(x, *args)
    assert out.dtype == dtype and out.shape == (*batch, n)
    expected = packed_linear_float64(x, *args)
    scale = packed_linear_float64(x.abs(), packed.packed_signs.new_zeros(packed.packed_signs.shape),
                                  packed.row_scale, packed.col_scale, None, k)
    if packed.bias is not None:
        scale = scale + packed.bias.double().abs()
    assert_close_scaled(out, expected, scale, dtype)


def test_opcheck():
    generator = torch.Generator().manual_seed(0)
    packed = random_packed(2, 33, 70, True, torch.float32, generator)
    x = torch.randn(3, 70, generator=generator, requires_grad=True)
    args = (x, packed.packed_signs, packed.row_scale.float(), packed.col_scale.float(), packed.bias, 70)
    torch.library.opcheck(residual_binary_linear, args)


def test_input_gradient_matches_dense():
    generator = torch.Generator().manual_seed(1)
    packed = random_packed(2, 17, 45, True, torch.float64, generator)
    x = torch.randn(4, 45, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = packed.bias.clone().requires_grad_(True)
    out = torch.ops.rabit.residual_binary_linear(x, packed.packed_signs, packed.row_scale, packed.col_scale, bias, 45)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    weight = packed.dequantize(torch.float64)
    torch.testing.assert_close(x.grad, grad_out @ weight)
    torch.testing.assert_close(bias.grad, grad_out.sum(0))


def test_bad_inputs_raise_clear_errors():
    packed = random_packed(2, 8, 40, False, torch.float32, torch.Generator().manual_seed(0))
    args = (packed.packed_signs, packed.row_scale, packed.col_scale, None, 40)
    with pytest.raises(RuntimeError, match="40"):
        torch.ops.rabit.residual_binary_linear(torch.randn(2, 39), *args)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.rabit.residual_binary_linear(torch.ones(2, 40, dtype=torch.int64), *args)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.rabit.residual_binary_linear(torch.randn(2, 40), packed.packed_signs.float(), *args[1:])


def test_empty_batch():
    packed = random_packed(1, 8, 40, True, torch.float32, torch.Generator().manual_seed(0))
    out = torch.ops.rabit.residual_binary_linear(torch.randn(0, 40), packed.packed_signs, packed.row_scale,
                                                 packed.col_scale, packed.bias, 40)
    assert out.shape == (0, 8)
