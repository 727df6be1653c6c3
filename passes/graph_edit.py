"""Small graph-editing helpers shared by the rewrite and freeze passes."""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from .find import LinearSite


def as_node(gm: fx.GraphModule, ref: fx.Node | str | None) -> fx.Node | None:
    """A node for ``ref``: the node itself, or a new ``get_attr`` (inserted before the current point)."""
    if ref is None or isinstance(ref, fx.Node):
        return ref
    return gm.graph.get_attr(ref)


def unique_module_name(gm: fx.GraphModule, layer_name: str, prefix: str) -> str:
    """An unused attribute name ``{prefix}_{layer_name with dots as underscores}`` on ``gm``."""
    base = f"{prefix}_" + re.sub(r"\W", "_", layer_name)
    name, suffix = base, 1
    while hasattr(gm, name):
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def replace_site(gm: fx.GraphModule, site: LinearSite, new_node: fx.Node) -> None:
    """Point every user of the site's output at ``new_node``, erase the old node and dead code."""
    new_node.meta.update({k: v for k, v in site.node.meta.items() if k in ("example_value", "val", "stack_trace")})
    site.node.replace_all_uses_with(new_node)
    gm.graph.erase_node(site.node)


def _keep(node: fx.Node) -> bool:
    """Nodes dead-code elimination must keep although nothing reads them: placeholders (the calling
    convention), side effects FX knows of, and in-place mutations (``k_cache.index_copy_(...)``,
    ``aten.add_``, any op whose schema mutates an argument)."""
    if node.op == "placeholder" or node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    schema = getattr(node.target, "_schema", None)
    return (name.endswith("_") and not name.endswith("__")) or (schema is not None and schema.is_mutable)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove dead nodes (but not those :func:`_keep` names), lint and recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=_keep)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def oriented_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """A weight stored in ``layout`` as ``[N, K]`` (GPT-2 ``Conv1D`` and ``x @ W`` store it ``[K, N]``:
    ``layout == "in_out"``)."""
    return weight.T if layout == "in_out" else weight


def op_name(target: object) -> str | None:
    """``"namespace::op"`` of a call target that is a ``torch.ops`` overload or packet, else None.

    Passes match ops by this name rather than by object identity: the ``OpOverload`` objects behind
    ``torch.ops.rabit.*`` can be re-created while a program runs, and a graph may hold either kind.
    """
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None
