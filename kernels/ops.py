"""``torch.library`` registration of ``rabit::residual_binary_linear`` and ``rabit::residual_binary_linear_siblings``.

Signatures (format: :mod:`.packing`; y in ``x.dtype``):

* ``residual_binary_linear(x [..., K], packed_signs int32 [k, N, ceil(K/32)], row_scale [k, N],
  col_scale [k, K], bias [N] | None, in_features K) -> y [..., N]``;
* ``residual_binary_linear_siblings(x [..., K], packed_signs int32 [k, N_total, ceil(K/32)],
  row_scale [k, N_total], col_scale [S, k, K], bias [N_total] | None, in_features K, out_features [N_1..N_S])
  -> y [..., N_total]``: S linears sharing x (q/k/v, gate/up), rows concatenated in order, each with its own
  column scales ``col_scale[s]``; the caller splits y.

Both are ``torch.library.triton_op`` s: on CUDA the body launches the Triton kernels through
``torch.library.wrap_triton`` (:mod:`.triton_gemv`), and AOTAutograd traces into it so Inductor sees the kernels;
the CPU kernel is the lookup-table C++ kernel of :mod:`.cpu_lut` with fp32 tables for decode (at most
``KERNEL_MAX_ROWS`` rows of fp32/fp16/bf16) and the float reference (:mod:`.reference`) otherwise, and on CPU the
op stays one opaque call under ``torch.compile``. The same body, run on fake tensors, is the fake implementation
(symbolic batch sizes included). Autograd: gradients for x and the bias; the packed tensors are constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from .cpu_lut import lut_linear_siblings, uses_kernel
from .packing import words_per_row
from .reference import (
    residual_binary_linear_input_grad,
    residual_binary_linear_reference,
    residual_binary_linear_siblings_input_grad,
    residual_binary_linear_siblings_reference,
)
from .triton_gemv import residual_binary_linear_siblings_triton, residual_binary_linear_triton

OP_NAME = "rabit::residual_binary_linear"
SIBLINGS_OP_NAME = "rabit::residual_binary_linear_siblings"


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


def _check_sibling_inputs(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: Sequence[int],
) -> None:
    torch._check(len(out_features) >= 1, lambda: "out_features must name at least one sibling")
    torch._check(col_scale.dim() == 3 and col_scale.shape[0] == len(out_features),
                 lambda: f"col_scale must be [S={len(out_features)}, k, K], got {tuple(col_scale.shape)}")
    _check_inputs(x, packed_signs, row_scale, col_scale[0], bias, in_features)
    torch._check(min(out_features) >= 0 and sum(out_features) == packed_signs.shape[1],
                 lambda: f"out_features {list(out_features)} must be >= 0 and sum to N_total={packed_signs.shape[1]}")


def _linear_body(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """``y = sum_i g_i * (B_i @ (h_i * x)) + b``; see the module docstring for shapes."""
    _check_inputs(x, packed_signs, row_scale, col_scale, bias, in_features)
    if x.device.type == "cuda":
        return residual_binary_linear_triton(x, packed_signs, row_scale, col_scale, bias, in_features,
                                             wrap=wrap_triton)
    return residual_binary_linear_reference(x, packed_signs, row_scale, col_scale, bias, in_features)


def _siblings_body(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: list[int],
) -> torch.Tensor:
    """S sibling linears sharing x, rows concatenated: ``y[..., rows_s] = sum_i g_i * (B_i @ (h_{s,i} * x)) + b``."""
    _check_sibling_inputs(x, packed_signs, row_scale, col_scale, bias, in_features, out_features)
    if x.device.type == "cuda":
        return residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, bias, in_features,
                                                      out_features, wrap=wrap_triton)
    return residual_binary_linear_siblings_reference(x, packed_signs, row_scale, col_scale, bias, in_features,
                                                     out_features)


residual_binary_linear = triton_op(OP_NAME, _linear_body, mutates_args=())
residual_binary_linear_siblings = triton_op(SIBLINGS_OP_NAME, _siblings_body, mutates_args=())


def _linear_cpu(x, packed_signs, row_scale, col_scale, bias, in_features):
    """CPU: the LUT kernel with fp32 tables for few rows of fp32/fp16/bf16 (:mod:`.cpu_lut`), else the reference
    (one unpack and a matmul per path: prefill, and exact fp64)."""
    if uses_kernel(x, row_scale, col_scale):
        return lut_linear_siblings(x, packed_signs, row_scale, col_scale.unsqueeze(0), bias, in_features,
                                   [packed_signs.shape[1]])
    return residual_binary_linear_reference(x, packed_signs, row_scale, col_scale, bias, in_features)


def _siblings_cpu(x, packed_signs, row_scale, col_scale, bias, in_features, out_features):
    """As :func:`_linear_cpu`, for S siblings."""
    if uses_kernel(x, row_scale, col_scale):
        return lut_linear_siblings(x, packed_signs, row_scale, col_scale, bias, in_features, out_features)
    return residual_binary_linear_siblings_reference(x, packed_signs, row_scale, col_scale, bias, in_features,
                                                     out_features)


def _cpu_kernel(op, body: Callable, cpu: Callable, check: Callable) -> None:
    """Register ``cpu`` as ``op``'s CPU kernel, and keep the op opaque to AOTAutograd off CUDA.

    ``triton_op`` makes FunctionalTensorMode (AOTAutograd) trace into the op's body for every device; that is
    what lets Inductor see the Triton kernels on CUDA. Elsewhere the op stays one call that runs this CPU kernel.
    """

    def cpu_kernel(*args):
        check(*args)
        return cpu(*args)

    op.register_kernel("cpu", cpu_kernel)

    def functional_rule(mode, func, types, args, kwargs):
        if args[0].device.type != "cuda":
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            return body(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functional_rule)


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
    return grad_x, None, None, None, _bias_grad(ctx, grad_out), None


def _setup_siblings_context(ctx, inputs, output):
    _setup_context(ctx, inputs[:6], output)
    ctx.out_features = list(inputs[6])


def _siblings_backward(ctx, grad_out):
    """As :func:`_backward`, segment by segment."""
    packed_signs, row_scale, col_scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = residual_binary_linear_siblings_input_grad(grad_out, packed_signs, row_scale, col_scale,
                                                            ctx.in_features, ctx.out_features)
    return grad_x, None, None, None, _bias_grad(ctx, grad_out), None, None


def _bias_grad(ctx, grad_out):
    if ctx.bias_dtype is None or not ctx.needs_input_grad[4]:
        return None
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)


_cpu_kernel(residual_binary_linear, _linear_body, _linear_cpu, _check_inputs)
_cpu_kernel(residual_binary_linear_siblings, _siblings_body, _siblings_cpu, _check_sibling_inputs)
residual_binary_linear.register_autograd(_backward, setup_context=_setup_context)
residual_binary_linear_siblings.register_autograd(_siblings_backward, setup_context=_setup_siblings_context)
