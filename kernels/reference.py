"""Plain-torch reference of the packed residual-binary linear (CPU path and the kernels' oracle).

    y = sum_i g_i * ( B_i @ (h_i * x) ) + b        x [..., K], B_i [N, K], g_i [N], h_i [K] -> y [..., N]

Accumulates in fp32 (fp64 for fp64 inputs) and returns ``x.dtype``.
"""

from __future__ import annotations

import itertools

import torch

from .packing import segment_starts, unpack_signs


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


def _segments(out_features: list[int]) -> list[slice]:
    """Row ranges of the concatenated siblings, in order."""
    return [slice(start, end) for start, end in itertools.pairwise(segment_starts(out_features))]


def residual_binary_linear_siblings_reference(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: list[int],
) -> torch.Tensor:
    """S linears sharing x, rows concatenated: ``y[..., rows_s] = sum_i g_i * (B_i @ (h_{s,i} * x)) + b``.

    ``packed_signs [k, N_total, W]``, ``row_scale [k, N_total]``, ``bias [N_total]`` or None hold sibling s in
    rows ``rows_s`` (``out_features[s]`` of them, in order); ``col_scale [S, k, K]``. -> ``[..., N_total]``.
    """
    parts = [
        residual_binary_linear_reference(x, packed_signs[:, rows], row_scale[:, rows], col_scale[segment],
                                         None if bias is None else bias[rows], in_features)
        for segment, rows in enumerate(_segments(out_features))
    ]
    return torch.cat(parts, dim=-1)


def residual_binary_linear_siblings_input_grad(
    grad_out: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    in_features: int,
    out_features: list[int],
) -> torch.Tensor:
    """``dL/dx = sum_s sum_i h_{s,i} * ( B_i[rows_s]^T @ (g_i[rows_s] * dL/dy[..., rows_s]) )`` -> ``[..., K]``."""
    grad_in = None
    for segment, rows in enumerate(_segments(out_features)):
        part = residual_binary_linear_input_grad(grad_out[..., rows], packed_signs[:, rows], row_scale[:, rows],
                                                 col_scale[segment], in_features)
        grad_in = part if grad_in is None else grad_in + part
    return grad_in
