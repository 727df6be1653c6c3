"""FX pass 3, *freeze & pack*: known weights become packed sign planes held by the graph module.

Each linear site ``y = linear(x, W, b)`` whose weight is known at compile time is replaced by::

    y = torch.ops.rabit.residual_binary_linear(x, packed_signs, row_scale, col_scale, b, K)

where the packed tensors are buffers of a :class:`PackedLinearWeights` submodule (``get_attr`` nodes), and
the full-precision weight no longer feeds the graph. Sites the pass cannot handle are reported with a
reason and left as they were (never a wrong number).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from rabit_compiler.kernels import PackedResidualBinary

from .find import (
    ROUTER_REASON,
    GraphWeights,
    LinearSite,
    SkippedSite,
    find_linears,
    selects_experts,
    weight_used_elsewhere,
)
from .graph_edit import as_node, finish, oriented_weight, replace_site, unique_module_name


class PackedLinearWeights(torch.nn.Module):
    """Holds one packed layer's buffers: ``packed_signs`` int32 ``[k, N, ceil(K/32)]``, ``row_scale [k, N]``,
    ``col_scale [k, K]``."""

    def __init__(self, packed: PackedResidualBinary):
        super().__init__()
        self.in_features = packed.in_features
        self.register_buffer("packed_signs", packed.packed_signs)
        self.register_buffer("row_scale", packed.row_scale)
        self.register_buffer("col_scale", packed.col_scale)

    def write(self, packed: PackedResidualBinary) -> None:
        """Overwrite the buffers in place with ``packed`` (same shapes and dtypes), so that a compiled graph
        holding them sees the new values."""
        with torch.no_grad():
            self.packed_signs.copy_(packed.packed_signs)
            self.row_scale.copy_(packed.row_scale)
            self.col_scale.copy_(packed.col_scale)


@dataclass
class PackedSite:
    """A site that was packed: its layer ``name``, the submodule holding the packed buffers, the fp
    weight it was packed from and, under Dynamo, the index of that weight among the graph inputs."""

    name: str
    module_name: str
    weight: torch.Tensor
    weight_input_index: int | None
    layout: str


QuantizeFn = Callable[[str, torch.Tensor, torch.Tensor], PackedResidualBinary]


def _skip_reason(gm: fx.GraphModule, site: LinearSite, weight: torch.Tensor, site_nodes: set[fx.Node]) -> str | None:
    if weight.dim() != 2 or 0 in weight.shape:
        return f"weight of shape {tuple(weight.shape)} is empty or not 2-D"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if not torch.isfinite(weight).all():
        return "weight has NaN/Inf values"
    example = site.x.meta.get("example_value", site.x.meta.get("val")) if isinstance(site.x, fx.Node) else None
    if isinstance(example, torch.Tensor) and example.dtype != weight.dtype:
        return f"input dtype {example.dtype} differs from weight dtype {weight.dtype} (the original op raises)"
    if weight_used_elsewhere(gm, site, site_nodes):
        return "weight is also used outside this linear (e.g. tied to an embedding)"
    if selects_experts(site.node, site_nodes):
        return ROUTER_REASON
    return None


def freeze_and_pack(
    gm: fx.GraphModule,
    quantize: QuantizeFn,
    example_inputs: Sequence[object] | None = None,
    skip: Callable[[str], bool] = lambda name: False,
) -> tuple[list[PackedSite], list[SkippedSite]]:
    """Pack every linear of ``gm`` in place.

    ``quantize(layer_name, weight, oriented_weight [N, K]) -> PackedResidualBinary`` (``weight`` is the
    tensor as stored, e.g. ``[K, N]`` for ``Conv1D``; the site's own bias is kept).
    Returns the packed sites and the skipped ones with reasons.
    """
    sites, skipped = find_linears(gm, example_inputs)
    weights = GraphWeights(gm, example_inputs)
    packed_sites = []
    site_nodes = {site.node for site in sites}
    for site in sites:
        if skip(site.name):
            skipped.append(SkippedSite(site.node, f"{site.name}: matches a skip pattern"))
            continue
        weight = weights.value(site.weight)
        reason = _skip_reason(gm, site, weight, site_nodes)
        if reason is not None:
            skipped.append(SkippedSite(site.node, f"{site.name}: {reason}"))
            continue
        try:
            packed = quantize(site.name, weight, oriented_weight(weight.detach(), site.layout))
        except (ValueError, OverflowError) as error:
            skipped.append(SkippedSite(site.node, f"{site.name}: cannot be packed: {error}"))
            continue
        module_name = unique_module_name(gm, site.name, "rabit_packed")
        gm.add_submodule(module_name, PackedLinearWeights(packed))
        declare_buffers_to_dynamo(gm, module_name, ("packed_signs", "row_scale", "col_scale"))
        _emit(gm, site, module_name, packed.in_features)
        packed_sites.append(PackedSite(
            name=site.name,
            module_name=module_name,
            weight=weight,
            weight_input_index=weights.placeholder_index.get(site.weight) if isinstance(site.weight, fx.Node)
            else None,
            layout=site.layout,
        ))
    finish(gm)
    return packed_sites, skipped


def declare_buffers_to_dynamo(gm: fx.GraphModule, module_name: str, buffers: Sequence[str]) -> None:
    """A Dynamo graph lists where every attribute tensor came from (``_param_name_to_source``);
    AOTAutograd requires an entry for each, and marks them static inputs (for CUDA graphs)."""
    if not hasattr(gm, "_param_name_to_source"):
        return
    from torch._dynamo.source import ConstantSource

    holder = gm.get_submodule(module_name)
    for buffer in buffers:
        if getattr(holder, buffer) is None:
            continue
        name = f"{module_name}.{buffer}"
        gm._param_name_to_source[name] = ConstantSource(f"rabit__{module_name}__{buffer}")


def _emit(gm: fx.GraphModule, site: LinearSite, module_name: str, in_features: int) -> None:
    graph = gm.graph
    with graph.inserting_before(site.node):
        args = (
            site.x,
            graph.get_attr(f"{module_name}.packed_signs"),
            graph.get_attr(f"{module_name}.row_scale"),
            graph.get_attr(f"{module_name}.col_scale"),
            as_node(gm, site.bias),
            in_features,
        )
        new_node = graph.call_function(torch.ops.rabit.residual_binary_linear.default, args)
    replace_site(gm, site, new_node)
