"""``torch.library`` registration of ``rabit::residual_binary_linear``.

Signature: ``(x [..., K], packed_signs int32 [k, N, ceil(K/32)], row_scale [k, N], col_scale [k, K],
bias [N] | None, in_features K) -> y [..., N]`` in ``x.dtype`` (see :mod:`.packing` for the format).
The fake implementation keeps the op traceable by Dynamo, AOTAutograd and Inductor (symbolic batch
sizes included); the CPU implementation is :func:`.reference.residual_binary_linear_reference`.
"""

from __future__ import annotations

import torch

from .packing import words_per_row
from .reference import residual_binary_linear_input_grad, residual_binary_linear_reference

OP_NAME = "rabit::residual_binary_linear"


def _check_inputs(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> None:
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, layer expects {in_features}")
    torch._check(x.is_floating_point(), lambda: f"x must be floating point, got {x.dtype}")
    torch._check(packed_signs.dtype == torch.int32, lambda: f"packed_signs must be int32, got {packed_signs.dtype}")
    torch._check(packed_signs.dim() == 3, lambda: "packed_signs must be [k, N, words]")
    torch._check(
        packed_signs.shape[2] == words_per_row(in_features),
        lambda: f"packed_signs has {packed_signs.shape[2]} words per row, K={in_features} needs "
        f"{words_per_row(in_features)}",
    )
    torch._check(row_scale.shape == packed_signs.shape[:2], lambda: "row_scale must be [k, N]")
    torch._check(
        col_scale.shape[0] == packed_signs.shape[0] and col_scale.shape[1] == in_features,
        lambda: "col_scale must be [k, K]",
    )
    if bias is not None:
        torch._check(bias.shape == packed_signs.shape[1:2], lambda: "bias must be [N]")


@torch.library.custom_op(OP_NAME, mutates_args=())
def residual_binary_linear(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """``y = sum_i g_i * (B_i @ (h_i * x)) + b``; see the module docstring for shapes."""
    _check_inputs(x, packed_signs, row_scale, col_scale, bias, in_features)
    return residual_binary_linear_reference(x, packed_signs, row_scale, col_scale, bias, in_features)


@residual_binary_linear.register_fake
def _(x, packed_signs, row_scale, col_scale, bias, in_features):
    _check_inputs(x, packed_signs, row_scale, col_scale, bias, in_features)
    return x.new_empty((*x.shape[:-1], packed_signs.shape[1]))


def _setup_context(ctx, inputs, output):
    x, packed_signs, row_scale, col_scale, bias, in_features = inputs
    ctx.save_for_backward(packed_signs, row_scale, col_scale)
    ctx.in_features = in_features
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    """Gradients for x (through the packed weight) and the bias; the packed tensors are constants."""
    packed_signs, row_scale, col_scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = residual_binary_linear_input_grad(grad_out, packed_signs, row_scale, col_scale, ctx.in_features)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None


residual_binary_linear.register_autograd(_backward, setup_context=_setup_context)
