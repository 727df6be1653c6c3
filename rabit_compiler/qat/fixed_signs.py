"""The linear of scale tuning: fixed signs, trainable scales, and a backward that recomputes the weight.

``y = x @ W_hat^T`` with ``W_hat = sum_i g_i * B_i * h_i`` (:meth:`~rabit_compiler.math.ResidualBinaryPaths.
dequantize`), signs ``B [k, N, K]`` held fixed (int8 +-1: a quarter of fp32), ``g [k, N]``, ``h [k, K]``.
Autograd through ``F.linear(x, W_hat)`` would keep ``W_hat`` and the ``[N, K]`` products of every path of every
layer until the backward (about three fp32 copies of the model: ~16 GB for a 1.5 B model at k = 2); this
function keeps only ``x`` and rebuilds ``W_hat`` in the backward. With the weight gradient ``G = dy^T x [N, K]``:
``dx = dy @ W_hat``, ``dg_i = (G * B_i) @ h_i``, ``dh_i = g_i @ (G * B_i)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rabit_compiler.math import ResidualBinaryPaths


class _FixedSignsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, signs: torch.Tensor, row_scales: torch.Tensor,
                col_scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, signs, row_scales, col_scales)
        weight = ResidualBinaryPaths(signs, row_scales, col_scales).dequantize()
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, signs, row_scales, col_scales = ctx.saved_tensors
        grad_x = grad_row = grad_col = None
        if ctx.needs_input_grad[0]:
            weight = ResidualBinaryPaths(signs, row_scales, col_scales).dequantize()
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            scale_dtype = torch.promote_types(row_scales.dtype, torch.float32)
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            signed = [grad_weight.to(scale_dtype) * sign for sign in signs]
            grad_row = torch.stack([g_b @ h for g_b, h in zip(signed, col_scales.to(scale_dtype), strict=True)])
            grad_col = torch.stack([g @ g_b for g_b, g in zip(signed, row_scales.to(scale_dtype), strict=True)])
            grad_row, grad_col = grad_row.to(row_scales.dtype), grad_col.to(col_scales.dtype)
        return grad_x, None, grad_row, grad_col


def fixed_signs_linear(x: torch.Tensor, signs: torch.Tensor, row_scales: torch.Tensor,
                       col_scales: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ (sum_i g_i * B_i * h_i)^T -> [..., N]`` in ``x``'s dtype: ``signs [k, N, K]`` (+-1, any
    dtype; no gradient), ``row_scales [k, N]``, ``col_scales [k, K]`` (gradients to these and to ``x``)."""
    if signs.dim() != 3 or row_scales.shape != signs.shape[:2] or col_scales.shape != (signs.shape[0], signs.shape[2]):
        raise ValueError(f"signs [k, N, K], row_scales [k, N], col_scales [k, K] expected; got {tuple(signs.shape)}, "
                         f"{tuple(row_scales.shape)}, {tuple(col_scales.shape)}")
    return _FixedSignsLinear.apply(x, signs, row_scales, col_scales)
