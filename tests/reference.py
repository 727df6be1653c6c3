"""Float64 references the tests compare against."""

from __future__ import annotations

import torch

# Tolerances for a result computed with fp32 accumulation and rounded to the output dtype, relative to
# the float64 reference's scale (sum over K of |g h x| terms): the output rounding (one ulp of the dtype:
# 2^-11 fp16, 2^-8 bf16) dominates for half types; for fp32, accumulation error grows like sqrt(K) * 2^-24.
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def packed_linear_float64(x, packed_signs, row_scale, col_scale, bias, in_features):
    """``sum_i g_i * (B_i @ (h_i * x)) + b`` in float64 from the unpacked signs."""
    from rabit_compiler.kernels import unpack_signs

    signs = unpack_signs(packed_signs, in_features, torch.float64)
    weight = (row_scale.double()[:, :, None] * signs * col_scale.double()[:, None, :]).sum(0)
    out = x.double() @ weight.T
    return out + bias.double() if bias is not None else out


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """``|actual - expected| <= tol(dtype) * scale`` elementwise, with ``scale`` the magnitude of the
    terms summed (so cancellation does not make the bound vacuous or impossible)."""
    tol = RELATIVE_TOLERANCE[dtype]
    error = (actual.double() - expected.double()).abs()
    bound = tol * scale.double() + 1e-30
    assert torch.isfinite(actual).all(), "non-finite output (an element was never written?)"
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"max error {error.max().item():.3g} exceeds {tol} x scale (ratio {worst:.3g})"
