"""Plain-torch reference of the packed residual-binary linear (CPU path and the kernels' oracle).

    y = sum_i g_i * ( B_i @ (h_i * x) ) + b        x [..., K], B_i [N, K], g_i [N], h_i [K] -> y [..., N]

Accumulates in fp32 (fp64 for fp64 inputs) and returns ``x.dtype``.
"""

from __future__ import annotations

import torch

from .packing import unpack_signs


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def residual_binary_linear_reference(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """The packed linear by unpacking each sign plane to +-1 (fp32) and one matmul per path."""
    out_features = packed_signs.shape[1]
    accumulate = accumulation_dtype(x.dtype)
    rows = x.reshape(-1, in_features).to(accumulate)
    signs = unpack_signs(packed_signs, in_features, accumulate)
    out = rows.new_zeros(rows.shape[0], out_features)
    for path in range(packed_signs.shape[0]):
        scaled = rows * col_scale[path].to(accumulate)
        out += (scaled @ signs[path].T) * row_scale[path].to(accumulate)
    if bias is not None:
        out += bias.to(accumulate)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def residual_binary_linear_input_grad(
    grad_out: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    """``dL/dx = sum_i h_i * ( B_i^T @ (g_i * dL/dy) )``: grad_out ``[..., N]`` -> ``[..., K]`` (fp32 accumulate)."""
    out_features = packed_signs.shape[1]
    accumulate = accumulation_dtype(grad_out.dtype)
    rows = grad_out.reshape(-1, out_features).to(accumulate)
    signs = unpack_signs(packed_signs, in_features, accumulate)
    grad_in = rows.new_zeros(rows.shape[0], in_features)
    for path in range(packed_signs.shape[0]):
        grad_in += ((rows * row_scale[path].to(accumulate)) @ signs[path]) * col_scale[path].to(accumulate)
    return grad_in.to(grad_out.dtype).reshape(*grad_out.shape[:-1], in_features)
