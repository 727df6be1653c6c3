"""FX pass 4a, *fuse siblings*: packed linears that read the same input become one launch.

Projections such as q/k/v or gate/up share their input ``x`` and ``K``. A group of S >= 2 calls::

    y_s = rabit.residual_binary_linear(x, packed_signs_s, row_scale_s, col_scale_s, bias_s, K)   s = 1..S

(same ``x`` node, same K, same number of paths k, same scale dtypes and device) becomes::

    y = rabit.residual_binary_linear_siblings(x, cat_N(packed_signs_s), cat_N(row_scale_s),
                                              stack_s(col_scale_s), cat_N(bias_s or 0), K, [N_1, .., N_S])
    y_s = y[..., N_1 + .. + N_{s-1} : N_1 + .. + N_s]        (each made contiguous, as the original was)

The concatenated tensors ``packed_signs [k, sum N_s, W]``, ``row_scale [k, sum N_s]``, ``col_scale [S, k, K]``
and ``bias [sum N_s]`` are buffers of a :class:`PackedSiblingWeights` submodule (``get_attr``). A member whose
packed tensors are graph inputs (a model packed by ``quantize_``, whose modules own the buffers) is copied in:
the pass reports, per member, which inputs it was copied from, so the caller can re-copy when they change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from rabit_compiler.kernels.packing import segment_starts

from .find import GraphWeights
from .freeze import declare_buffers_to_dynamo
from .graph_edit import finish, op_name, unique_module_name

SINGLE_OP_NAME = "rabit::residual_binary_linear"
FUSED_TENSOR_ARGS = ("packed_signs", "row_scale", "col_scale", "bias")


class PackedSiblingWeights(torch.nn.Module):
    """Buffers of S fused siblings: ``packed_signs`` int32 ``[k, sum N_s, W]``, ``row_scale [k, sum N_s]``,
    ``col_scale [S, k, K]``, ``bias [sum N_s]`` (zeros for a sibling without bias) or None."""

    def __init__(self, packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                 bias: torch.Tensor | None, in_features: int, out_features: Sequence[int]):
        super().__init__()
        self.in_features = in_features
        self.out_features = tuple(out_features)
        self.register_buffer("packed_signs", packed_signs)
        self.register_buffer("row_scale", row_scale)
        self.register_buffer("col_scale", col_scale)
        self.register_buffer("bias", bias)

    def write_segment(self, segment: int, packed_signs: torch.Tensor | None = None,
                      row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> None:
        """Overwrite sibling ``segment``'s rows in place with the given tensors (shapes as when it was fused)."""
        starts = segment_starts(self.out_features)
        rows = slice(starts[segment], starts[segment + 1])
        with torch.no_grad():
            if packed_signs is not None:
                self.packed_signs[:, rows].copy_(packed_signs)
            if row_scale is not None:
                self.row_scale[:, rows].copy_(row_scale)
            if col_scale is not None:
                self.col_scale[segment].copy_(col_scale)
            if bias is not None:
                self.bias[rows].copy_(bias)


@dataclass
class FusedMember:
    """One layer inside a fused group: the submodule that held its packed tensors before (``get_attr``; None
    when they were graph inputs) and the graph-input index of each of its packed_signs, row_scale,
    col_scale and bias (None where that argument was not a graph input)."""

    module_name: str
    segment: int
    former_holder: str | None
    input_indices: tuple[int | None, ...]


@dataclass
class _Operand:
    node: fx.Node
    tensors: dict[str, torch.Tensor | None]
    holder: str | None
    input_indices: tuple[int | None, ...]


def _operand(node: fx.Node, weights: GraphWeights) -> _Operand | None:
    """The known tensors of one op call, or None when one of them is computed in the graph."""
    args = dict(zip(("x", *FUSED_TENSOR_ARGS, "in_features"), node.args, strict=True))
    tensors: dict[str, torch.Tensor | None] = {}
    holders, indices = set(), []
    for name in FUSED_TENSOR_ARGS:
        ref = args[name]
        tensors[name] = None
        indices.append(None)
        if ref is None:
            continue
        if not isinstance(ref, fx.Node) or ref.op not in ("get_attr", "placeholder"):
            return None
        value = weights.value(ref)
        if not isinstance(value, torch.Tensor):
            return None
        tensors[name] = value
        if ref.op == "get_attr":
            holders.add(ref.target.rpartition(".")[0])
        indices[-1] = weights.placeholder_index.get(ref)
    holder = holders.pop() if len(holders) == 1 else None
    return _Operand(node, tensors, holder, tuple(indices))


def _group_key(operand: _Operand) -> tuple:
    """Calls with equal keys are siblings. The bias is not in it: a missing bias fuses as zeros."""
    x, in_features = operand.node.args[0], operand.node.args[5]
    packed_signs, row_scale, col_scale = (operand.tensors[n] for n in FUSED_TENSOR_ARGS[:3])
    return (x, in_features, packed_signs.shape[0], row_scale.dtype, col_scale.dtype, packed_signs.device)


def fuse_siblings(gm: fx.GraphModule, example_inputs: Sequence[object] | None = None) -> list[list[FusedMember]]:
    """Fuse every group of >= 2 sibling ``rabit::residual_binary_linear`` calls of ``gm`` in place.

    Returns the fused groups, each a list of :class:`FusedMember` in segment order.
    """
    weights = GraphWeights(gm, example_inputs)
    groups: dict[tuple, list[_Operand]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_name(node.target) != SINGLE_OP_NAME:
            continue
        operand = _operand(node, weights)
        if operand is not None:
            groups.setdefault(_group_key(operand), []).append(operand)
    fused = []
    for members in groups.values():
        dtypes = {m.tensors["bias"].dtype for m in members if m.tensors["bias"] is not None}
        if len(members) < 2 or len(dtypes) > 1:
            continue
        fused.append(_fuse(gm, members, dtypes.pop() if dtypes else None))
    if fused:
        finish(gm)
    return fused


def _concatenated(members: list[_Operand], bias_dtype: torch.dtype | None) -> PackedSiblingWeights:
    first = members[0].tensors
    out_features = [m.tensors["packed_signs"].shape[1] for m in members]
    bias = None
    if bias_dtype is not None:
        bias = torch.cat([
            m.tensors["bias"].detach() if m.tensors["bias"] is not None
            else torch.zeros(n, dtype=bias_dtype, device=first["packed_signs"].device)
            for m, n in zip(members, out_features, strict=True)
        ])
    return PackedSiblingWeights(
        torch.cat([m.tensors["packed_signs"] for m in members], dim=1),
        torch.cat([m.tensors["row_scale"] for m in members], dim=1),
        torch.stack([m.tensors["col_scale"] for m in members]),
        bias,
        members[0].node.args[5],
        out_features,
    )


def _fuse(gm: fx.GraphModule, members: list[_Operand], bias_dtype: torch.dtype | None) -> list[FusedMember]:
    holder = _concatenated(members, bias_dtype)
    first = members[0]
    module_name = unique_module_name(gm, first.holder or first.node.args[1].name, "rabit_siblings")
    gm.add_submodule(module_name, holder)
    declare_buffers_to_dynamo(gm, module_name, ("packed_signs", "row_scale", "col_scale", "bias"))
    graph = gm.graph
    with graph.inserting_before(members[0].node):
        buffers = [graph.get_attr(f"{module_name}.{name}") if getattr(holder, name) is not None else None
                   for name in FUSED_TENSOR_ARGS]
        fused = graph.call_function(
            torch.ops.rabit.residual_binary_linear_siblings.default,
            (members[0].node.args[0], *buffers, holder.in_features, list(holder.out_features)),
        )
        starts = segment_starts(holder.out_features)
        for member, start, end in zip(members, starts[:-1], starts[1:], strict=True):
            part = graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, end))
            contiguous = graph.call_function(torch.ops.aten.clone.default, (part,),
                                             {"memory_format": torch.contiguous_format})
            contiguous.meta.update({k: v for k, v in member.node.meta.items() if k in ("example_value", "val")})
            member.node.replace_all_uses_with(contiguous)
    for member in members:
        graph.erase_node(member.node)
    return [FusedMember(module_name, segment, member.holder, member.input_indices)
            for segment, member in enumerate(members)]
