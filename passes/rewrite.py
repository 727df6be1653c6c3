"""FX pass 2, *rewrite*: every linear becomes the training-form residual-binary subgraph.

For a site ``y = linear(x, W, b)`` with k paths, the pass inserts, from the shared latent ``R_0 = W``::

    B_1 = sign(R_0);  W_1 = g_1 * B_1 * h_1;  R_1 = R_0 - W_1;  B_2 = sign(R_1);  ...;  W_hat = W_1 + ... + W_k
    y = linear(x, W_hat, b)

as explicit nodes (``print(gm.code)`` shows the hierarchy), by running
:func:`rabit_compiler.math.coupled_residual_weight` on FX proxies: the math is written once. The scales
``g_i [N]``, ``h_i [K]`` become parameters of a ``ResidualBinaryScales`` submodule per site; the latent is
the graph's own weight (so training it trains ``W_FP``), or a re-anchored copy when one is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from rabit_compiler.math import ResidualBinaryPaths, coupled_residual_weight

from .find import GraphWeights, LinearSite, find_linears
from .graph_edit import as_node, finish, oriented_weight, replace_site, unique_module_name


class ResidualBinaryScales(torch.nn.Module):
    """Trainable scales of one rewritten layer: ``row_scale_i [N]`` and ``col_scale_i [K]`` for each path,
    and, when the layer was re-anchored, its own ``latent [N, K]``."""

    def __init__(self, row_scales: torch.Tensor, col_scales: torch.Tensor, latent: torch.Tensor | None = None):
        super().__init__()
        self.num_paths = row_scales.shape[0]
        for i in range(self.num_paths):
            self.register_parameter(f"row_scale_{i}", torch.nn.Parameter(row_scales[i].clone()))
            self.register_parameter(f"col_scale_{i}", torch.nn.Parameter(col_scales[i].clone()))
        if latent is not None:
            self.latent = torch.nn.Parameter(latent.clone())


@dataclass
class RewrittenSite:
    name: str
    module_name: str
    num_paths: int


InitFn = Callable[[str, torch.Tensor], tuple[ResidualBinaryPaths, torch.Tensor | None]]


def rewrite_linears(
    gm: fx.GraphModule,
    init: InitFn,
    example_inputs: Sequence[object] | None = None,
    skip: Callable[[str], bool] = lambda name: False,
) -> list[RewrittenSite]:
    """Rewrite every linear of ``gm`` in place into the coupled training form.

    ``init(layer_name, weight [N, K]) -> (paths, latent or None)`` gives each layer's initial scales (and a
    re-anchored latent, or None to use the graph's weight as ``R_0``). Returns what was rewritten.
    """
    sites, _ = find_linears(gm, example_inputs)
    weights = GraphWeights(gm, example_inputs)
    rewritten = []
    for site in sites:
        if skip(site.name):
            continue
        weight = oriented_weight(weights.value(site.weight).detach(), site.layout)
        paths, latent = init(site.name, weight)
        module_name = unique_module_name(gm, site.name, "rabit")
        gm.add_submodule(module_name, ResidualBinaryScales(
            paths.row_scales.to(weight.dtype), paths.col_scales.to(weight.dtype),
            None if latent is None else latent.to(weight.dtype)))
        _emit(gm, site, module_name, paths.num_paths, has_latent=latent is not None)
        rewritten.append(RewrittenSite(site.name, module_name, paths.num_paths))
    finish(gm)
    return rewritten


def _emit(gm: fx.GraphModule, site: LinearSite, module_name: str, num_paths: int, has_latent: bool) -> None:
    graph = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(site.node):
        if has_latent:
            latent = graph.get_attr(f"{module_name}.latent")
        else:
            latent = as_node(gm, site.weight)
            if site.layout == "in_out":
                latent = graph.call_function(torch.t, (latent,))
        row_scales = [fx.Proxy(graph.get_attr(f"{module_name}.row_scale_{i}"), tracer) for i in range(num_paths)]
        col_scales = [fx.Proxy(graph.get_attr(f"{module_name}.col_scale_{i}"), tracer) for i in range(num_paths)]
        weight_hat = coupled_residual_weight(fx.Proxy(latent, tracer), row_scales, col_scales)
        new_node = graph.call_function(F.linear, (site.x, weight_hat.node, as_node(gm, site.bias)))
    replace_site(gm, site, new_node)
