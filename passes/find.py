"""FX pass 1, *find*: locate every linear layer in a graph, whatever form it takes, and the weight feeding it.

Forms recognised (``W`` a 2-D parameter, ``t(W)`` any transpose of it):

- ``torch._C._nn.linear`` / ``F.linear`` / ``aten.linear``: ``(x, W, b)``, W stored ``[N, K]``;
- ``mm`` / ``matmul`` / ``@`` on ``t(W)`` (W ``[N, K]``) or on ``W`` itself (stored ``[K, N]``, e.g.
  GPT-2's ``Conv1D`` as ``addmm(b, x, W)``), and ``addmm(b, x, t(W))`` with unit alpha and beta;
- ``call_module`` of ``nn.Linear`` or transformers' ``Conv1D`` in a symbolically traced graph.

:func:`selects_experts` tells a MoE router (a linear whose output decides a top-k) from the others.

Weights are graph inputs under Dynamo (placeholders whose runtime value is an ``nn.Parameter``) and
``get_attr`` nodes after ``torch.fx.symbolic_trace``; :class:`GraphWeights` answers for both.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

LINEAR_FUNCTIONS = {torch._C._nn.linear, F.linear, aten.linear.default}
MM_FUNCTIONS = {torch.mm, aten.mm.default, torch.matmul, aten.matmul.default, operator.matmul}
MM_METHODS = {"mm", "matmul", "__matmul__"}
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
TRANSPOSE_FUNCTIONS = {torch.t, aten.t.default, torch.transpose, aten.transpose.int, aten.permute.default,
                       torch.permute}
TRANSPOSE_METHODS = {"t", "transpose", "permute"}

WeightLayout = Literal["out_in", "in_out"]


@dataclass
class LinearSite:
    """One linear layer found in a graph.

    ``node`` computes ``y = x @ W_hat.T (+ bias)`` where ``W_hat [N, K]`` is ``weight`` if ``layout`` is
    ``"out_in"`` and ``weight.T`` if ``"in_out"``. ``weight``/``bias`` are nodes, or for a ``call_module``
    site the qualified attribute names (``"layer.weight"``). ``name`` is the layer's dotted path.
    """

    node: fx.Node
    weight: fx.Node | str
    bias: fx.Node | str | None
    layout: WeightLayout
    form: str
    name: str

    @property
    def x(self) -> fx.Node:
        """The activation input, read from the node now (earlier rewrites may have replaced its producer)."""
        if self.form == "linear":
            return _call_args(self.node, ("input",))[0]
        if self.form == "addmm":
            return _call_args(self.node, ("input", "mat1"))[1]
        return self.node.args[0]


@dataclass
class SkippedSite:
    """A matmul-like node that is not rewritten, with the reason (logged by the callers)."""

    node: fx.Node
    reason: str


class GraphWeights:
    """Tells which nodes of a graph hold weights, their runtime values and their dotted names.

    ``example_inputs`` are the runtime values of the placeholders (Dynamo passes the real parameters);
    with ``example_inputs=None`` only ``get_attr`` parameters count as weights.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object] | None = None):
        self.gm = gm
        self.placeholder_values: dict[fx.Node, object] = {}
        self.placeholder_index: dict[fx.Node, int] = {}
        if example_inputs is not None:
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False)):
                self.placeholder_values[node] = value
                self.placeholder_index[node] = index

    def is_weight(self, node: object) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node.op == "placeholder":
            return isinstance(self.placeholder_values.get(node), torch.nn.Parameter)
        if node.op == "get_attr":
            value = _get_attr(self.gm, node.target)
            return isinstance(value, torch.nn.Parameter)
        return False

    def value(self, ref: fx.Node | str) -> torch.Tensor:
        if isinstance(ref, str):
            return _get_attr(self.gm, ref)
        if ref.op == "placeholder":
            return self.placeholder_values[ref]
        if ref.op == "get_attr":
            return _get_attr(self.gm, ref.target)
        raise TypeError(f"node {ref.name} ({ref.op}) does not hold a weight")

    def name(self, ref: fx.Node | str) -> str:
        """Dotted name of the tensor, e.g. ``model.layers.0.mlp.up_proj.weight``."""
        if isinstance(ref, str):
            return ref
        if ref.op == "get_attr":
            return ref.target
        source = getattr(ref, "_dynamo_source", None) or getattr(ref.meta.get("grapharg"), "source", None)
        if source is not None:
            return source_to_dotted_name(source.name if isinstance(source.name, str) else source.name())
        return ref.name


def source_to_dotted_name(source_name: str) -> str:
    """``L['self']._modules['lm_head']._parameters['weight']`` -> ``lm_head.weight``."""
    parts = re.findall(r"\['([^']+)'\]|\.(\w+)", source_name)
    names = [quoted or attr for quoted, attr in parts][1:]  # the first is the local variable (``self``)
    names = [n for n in names if n not in {"_modules", "_parameters", "_buffers"}]
    return ".".join(names) if names else source_name


def _get_attr(module: torch.nn.Module, target: str) -> object:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _is_transpose_of_weight(node: object, weights: GraphWeights) -> fx.Node | None:
    """If ``node`` is a 2-D transpose of a weight (``t(W)``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``,
    ``W.T``), return W."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    source = node.args[0]
    if not weights.is_weight(source):
        return None
    if node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS or (
        node.op == "call_method" and node.target in TRANSPOSE_METHODS
    ):
        rest = [a for a in node.args[1:]]
        if node.target in (torch.permute, aten.permute.default, "permute"):
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            return source if list(dims) == [1, 0] else None
        if node.target in (torch.transpose, aten.transpose.int, "transpose"):
            return source if sorted(int(d) % 2 for d in rest) == [0, 1] else None
        return source
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return source
    return None


def _linear_module_site(node: fx.Node, gm: fx.GraphModule) -> LinearSite | SkippedSite | None:
    module = gm.get_submodule(node.target)
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, torch.nn.Linear):
        layout: WeightLayout = "out_in"
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        layout = "in_out"
    else:
        return None
    if len(node.args) != 1 or node.kwargs:
        return SkippedSite(node, "linear module called with more than one input")
    return LinearSite(
        node=node,
        weight=f"{node.target}.weight",
        bias=f"{node.target}.bias" if has_bias else None,
        layout=layout,
        form="call_module",
        name=node.target,
    )


def _call_args(node: fx.Node, names: Sequence[str]) -> list[object]:
    """Positional + keyword arguments of ``node`` in the order ``names`` (missing ones are None)."""
    args = list(node.args) + [None] * (len(names) - len(node.args))
    for i, name in enumerate(names):
        if name in node.kwargs:
            args[i] = node.kwargs[name]
    return args


def classify(node: fx.Node, weights: GraphWeights) -> LinearSite | SkippedSite | None:
    """The :class:`LinearSite` computed by ``node``, a :class:`SkippedSite` with a reason if it looks like
    a linear layer that cannot be rewritten, or None if it is not a linear layer at all."""
    if node.op == "call_module":
        return _linear_module_site(node, weights.gm)
    is_fn = node.op == "call_function"
    is_method = node.op == "call_method"
    if is_fn and node.target in LINEAR_FUNCTIONS:
        _, weight, bias = _call_args(node, ("input", "weight", "bias"))
        if not weights.is_weight(weight):
            return SkippedSite(node, "linear whose weight is not a parameter (computed at run time)")
        return LinearSite(node, weight, bias, "out_in", "linear", _layer_name(weights, weight))
    if is_fn and node.target in MM_FUNCTIONS or is_method and node.target in MM_METHODS:
        return _matmul_site(node, node.args[1], None, "mm", weights)
    if is_fn and node.target in ADDMM_FUNCTIONS or is_method and node.target == "addmm":
        bias, _, rhs, beta, alpha = _call_args(node, ("input", "mat1", "mat2", "beta", "alpha"))
        if beta not in (None, 1) or alpha not in (None, 1):
            return SkippedSite(node, f"addmm with beta={beta}, alpha={alpha}")
        return _matmul_site(node, rhs, bias, "addmm", weights)
    return None


def _matmul_site(node, rhs, bias, form, weights) -> LinearSite | SkippedSite | None:
    transposed = _is_transpose_of_weight(rhs, weights)
    if transposed is not None:
        weight, layout = transposed, "out_in"
    elif weights.is_weight(rhs):
        weight, layout = rhs, "in_out"
    else:
        return None
    if weights.value(weight).dim() != 2:
        return SkippedSite(node, "matmul with a weight that is not 2-D")
    if bias is not None and not weights.is_weight(bias):
        return SkippedSite(node, "addmm whose bias is not a parameter")
    return LinearSite(node, weight, bias, layout, form, _layer_name(weights, weight))


def _layer_name(weights: GraphWeights, weight: fx.Node) -> str:
    name = weights.name(weight)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def find_linears(
    gm: fx.GraphModule, example_inputs: Sequence[object] | None = None
) -> tuple[list[LinearSite], list[SkippedSite]]:
    """Every linear layer of ``gm`` (in graph order) and the linear-looking nodes that were passed over."""
    weights = GraphWeights(gm, example_inputs)
    sites: list[LinearSite] = []
    skipped: list[SkippedSite] = []
    for node in gm.graph.nodes:
        found = classify(node, weights)
        if isinstance(found, LinearSite):
            sites.append(found)
        elif isinstance(found, SkippedSite):
            skipped.append(found)
    return sites, skipped


def weight_used_elsewhere(gm: fx.GraphModule, site: LinearSite, site_nodes: set[fx.Node]) -> bool:
    """Whether the site's weight also feeds something other than linear sites: another node using it, or
    (in a symbolic trace) a ``call_module`` of a module that owns it, such as a tied ``nn.Embedding``."""
    if isinstance(site.weight, fx.Node):
        for user in site.weight.users:
            if user not in site_nodes and not all(u in site_nodes for u in user.users):
                return True
    target = site.weight if isinstance(site.weight, str) else site.weight.target
    if isinstance(site.weight, str) or site.weight.op == "get_attr":
        for node in gm.graph.nodes:
            if node.op == "call_module" and node not in site_nodes and target.startswith(f"{node.target}."):
                return True
            if node.op == "get_attr" and node.target == target and isinstance(site.weight, str):
                return True
    return False


TOPK_TARGETS = {torch.topk, aten.topk.default, "topk"}
ROUTER_REASON = "its output selects experts (top-k): a MoE router, kept in full precision so the routing is unchanged"


def selects_experts(node: fx.Node, site_nodes: set[fx.Node], max_depth: int = 8) -> bool:
    """Whether the output of the linear ``node`` reaches a ``topk`` within ``max_depth`` ops without passing through
    another linear site: a MoE router (logits -> softmax or sigmoid, maybe a bias -> top-k experts)."""
    frontier, seen = [node], {node}
    for _ in range(max_depth):
        reached = []
        for user in (user for current in frontier for user in current.users):
            if user in seen or user in site_nodes:
                continue
            if user.op in ("call_function", "call_method") and user.target in TOPK_TARGETS:
                return True
            seen.add(user)
            reached.append(user)
        frontier = reached
    return False
