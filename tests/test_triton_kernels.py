"""The Triton kernels, run by Triton's interpreter on CPU tensors, against a float64 reference.

Outputs are poisoned: every ``torch.empty`` during a launch is filled with NaN first, so an output element a
kernel never writes fails the comparison.
"""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import pack_paths
from rabit_compiler.kernels.triton_gemv import residual_binary_linear_triton

from .reference import assert_close_scaled, packed_linear_float64

_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    tensor = _real_empty(*args, **kwargs)
    return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor


@given(
    rows=st.integers(1, 16), n=st.integers(1, 70), k=st.integers(1, 150), paths=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
    kernel=st.sampled_from(["gemv", "gemm", None]), seed=st.integers(0, 2**31),
)
def test_kernels_match_float64_reference(rows, n, k, paths, dtype, bias, kernel, seed):
    if kernel == "gemm" and dtype == torch.float32:
        kernel = "gemv"  # the GEMM kernel takes fp16/bf16 (tensor-core operands)
    generator = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(paths, n, k, generator=generator) < 0.5, -1.0, 1.0)
    packed = pack_paths(signs, torch.rand(paths, n, generator=generator) + 0.1,
                        torch.rand(paths, k, generator=generator) + 0.1,
                        torch.randn(n, generator=generator).to(dtype) if bias else None)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    args = (packed.packed_signs, packed.row_scale, packed.col_scale, packed.bias, k)
    with mock.patch.object(torch, "empty", _poisoned_empty):
        out = residual_binary_linear_triton(x, *args, kernel=kernel)
    assert out.shape == (rows, n) and out.dtype == dtype
    expected = packed_linear_float64(x, *args)
    zero_signs = torch.zeros_like(packed.packed_signs)  # all +1: sum of |terms|
    scale = packed_linear_float64(x.abs(), zero_signs, packed.row_scale, packed.col_scale, None, k)
    if packed.bias is not None:
        scale = scale + packed.bias.double().abs()
    assert_close_scaled(out, expected, scale, dtype)
