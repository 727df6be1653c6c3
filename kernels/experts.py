"""``rabit::residual_binary_experts``: one packed linear per MoE expert, each row through the expert that routes it.

Signature (format v1 per expert, stacked on a leading expert axis; y in ``x.dtype``)::

    residual_binary_experts(x [S, K], expert_ids int [S], packed_signs int32 [E, k, N, ceil(K/32)],
                            row_scale [E, k, N], col_scale [E, k, K], bias [E, N] | None, in_features K) -> y [S, N]
    y[s] = sum_i g[e, i] * (B[e, i] @ (h[e, i] * x[s])) + b[e]        with e = expert_ids[s]

The op groups the rows by expert (one host sync for the counts) and calls ``rabit::residual_binary_linear`` on each
routed expert's rows and planes: the LUT kernel for a few rows on the CPU, the Triton kernels on CUDA. It is one
opaque call for Dynamo and Inductor (fake implementation: ``[S, N]``), so a model using it traces without a graph
break whatever the routing. Autograd: gradients for x (through ``rabit::residual_binary_experts_input_grad``, the
same grouping, so a compiled backward stays opaque too) and the bias; the packed tensors are constants.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .packing import words_per_row
from .reference import accumulation_dtype, residual_binary_linear_input_grad

OP_NAME = "rabit::residual_binary_experts"
INPUT_GRAD_OP_NAME = "rabit::residual_binary_experts_input_grad"


def apply_per_expert(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, out_features: int,
                     project: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``y[s] = project(expert_ids[s], x[s])`` for rows ``x [S, K]``, calling ``project(e, rows [S_e, K]) -> [S_e, N]``
    once per expert that routes any row (in expert order); differentiable through ``project``. -> ``[S, N]``."""
    if expert_ids.dim() != 1 or expert_ids.shape[0] != x.shape[0] or expert_ids.is_floating_point():
        raise ValueError(f"expert_ids must be integers [S={x.shape[0]}], got {expert_ids.dtype} "
                         f"{tuple(expert_ids.shape)}")
    if x.shape[0] == 0:
        return x.new_empty(0, out_features)
    low, high = (int(v) for v in torch.aminmax(expert_ids))
    if low < 0 or high >= num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got ids from {low} to {high}")
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
    parts, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            parts.append(project(expert, x[order[start:start + count]]))
            start += count
    return torch.cat(parts).index_select(0, torch.argsort(order))


_SLICES: dict[int, tuple[tuple, list[tuple[torch.Tensor, ...]]]] = {}


def expert_slices(*tensors: torch.Tensor | None) -> list[tuple[torch.Tensor | None, ...]]:
    """``[(t[e] for t in tensors) for e in range(E)]``, the same view objects on every call while the tensors are
    unchanged (kept per first tensor, dropped with it): the LUT kernel keeps its layout per packed tensor."""
    key = tuple((id(t), t._version) for t in tensors if t is not None)
    entry = _SLICES.get(id(tensors[0]))
    if entry is None or entry[0] != key:
        if entry is None:
            weakref.finalize(tensors[0], _SLICES.pop, id(tensors[0]), None)
        views = [tuple(None if t is None else t[e] for t in tensors) for e in range(tensors[0].shape[0])]
        entry = _SLICES[id(tensors[0])] = (key, views)
    return entry[1]


def _check_inputs(x: torch.Tensor, expert_ids: torch.Tensor, packed_signs: torch.Tensor, row_scale: torch.Tensor,
                  col_scale: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> None:
    torch._check(x.dim() == 2 and x.shape[1] == in_features, lambda: f"x must be [S, K={in_features}], got "
                 f"{tuple(x.shape)}")
    torch._check(x.is_floating_point(), lambda: f"x must be floating point, got {x.dtype}")
    torch._check(not expert_ids.is_floating_point() and expert_ids.dim() == 1 and expert_ids.shape[0] == x.shape[0],
                 lambda: f"expert_ids must be integers [S={x.shape[0]}], got {expert_ids.dtype} "
                 f"{tuple(expert_ids.shape)}")
    torch._check(packed_signs.dtype == torch.int32 and packed_signs.dim() == 4,
                 lambda: f"packed_signs must be int32 [E, k, N, words], got {packed_signs.dtype} "
                 f"{tuple(packed_signs.shape)}")
    torch._check(packed_signs.shape[3] == words_per_row(in_features),
                 lambda: f"packed_signs has {packed_signs.shape[3]} words per row, K={in_features} needs "
                 f"{words_per_row(in_features)}")
    torch._check(row_scale.shape == packed_signs.shape[:3], lambda: "row_scale must be [E, k, N]")
    torch._check(col_scale.shape == (*packed_signs.shape[:2], in_features), lambda: "col_scale must be [E, k, K]")
    if bias is not None:
        torch._check(bias.shape == (packed_signs.shape[0], packed_signs.shape[2]), lambda: "bias must be [E, N]")


@torch.library.custom_op(OP_NAME, mutates_args=())
def residual_binary_experts(x: torch.Tensor, expert_ids: torch.Tensor, packed_signs: torch.Tensor,
                            row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
                            in_features: int) -> torch.Tensor:
    """See the module docstring."""
    _check_inputs(x, expert_ids, packed_signs, row_scale, col_scale, bias, in_features)
    slices = expert_slices(packed_signs, row_scale, col_scale, bias)

    def project(expert: int, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.rabit.residual_binary_linear(rows, *slices[expert], in_features)

    return apply_per_expert(x, expert_ids, packed_signs.shape[0], packed_signs.shape[2], project)


@residual_binary_experts.register_fake
def _(x, expert_ids, packed_signs, row_scale, col_scale, bias, in_features):
    _check_inputs(x, expert_ids, packed_signs, row_scale, col_scale, bias, in_features)
    return x.new_empty(x.shape[0], packed_signs.shape[2])


@torch.library.custom_op(INPUT_GRAD_OP_NAME, mutates_args=())
def residual_binary_experts_input_grad(grad_out: torch.Tensor, expert_ids: torch.Tensor, packed_signs: torch.Tensor,
                                       row_scale: torch.Tensor, col_scale: torch.Tensor,
                                       in_features: int) -> torch.Tensor:
    """``dL/dx[s] = sum_i h[e, i] * (B[e, i]^T @ (g[e, i] * dL/dy[s]))`` with ``e = expert_ids[s]`` -> ``[S, K]``."""
    def project(expert: int, rows: torch.Tensor) -> torch.Tensor:
        return residual_binary_linear_input_grad(rows, packed_signs[expert], row_scale[expert], col_scale[expert],
                                                 in_features)

    return apply_per_expert(grad_out, expert_ids, packed_signs.shape[0], in_features, project)


@residual_binary_experts_input_grad.register_fake
def _(grad_out, expert_ids, packed_signs, row_scale, col_scale, in_features):
    return grad_out.new_empty(grad_out.shape[0], in_features)


def _setup_context(ctx, inputs, output):
    x, expert_ids, packed_signs, row_scale, col_scale, bias, in_features = inputs
    ctx.save_for_backward(expert_ids, packed_signs, row_scale, col_scale)
    ctx.in_features = in_features
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    """Gradients for x and the bias (``dL/db[e] = sum of dL/dy over the rows of expert e``)."""
    expert_ids, packed_signs, row_scale, col_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = residual_binary_experts_input_grad(grad_out, expert_ids, packed_signs, row_scale, col_scale,
                                                    ctx.in_features)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        accumulate = accumulation_dtype(grad_out.dtype)
        sums = grad_out.new_zeros(packed_signs.shape[0], packed_signs.shape[2], dtype=accumulate)
        grad_bias = sums.index_add_(0, expert_ids, grad_out.to(accumulate)).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None


residual_binary_experts.register_autograd(_backward, setup_context=_setup_context)
