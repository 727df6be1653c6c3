"""FX passes of decode attention: read the KV cache as it is stored (grouped-query fold), and on the CPU, only its
filled positions (the ``rabit::decode_attention`` kernel).

**Grouped-query fold.**

A grouped-query model (``H`` query heads sharing ``H_kv`` key/value heads, ``r = H / H_kv``) written for any
backend repeats its cache before attention (Hugging Face's ``repeat_kv``)::

    K_rep = K[:, :, None].expand(b, H_kv, r, L, d).reshape(b, H, L, d)          (the same for V)
    y = scaled_dot_product_attention(q [b, H, 1, d], K_rep, V_rep, attn_mask=m)

which copies the whole cache, ``2 * b * H * L * d`` numbers per layer and step (``L``: the static cache's
length), before reading it again. For one query position the ``r`` query heads of a group are ``r`` rows that
attend to the same keys, so the pass rewrites the call to::

    y = scaled_dot_product_attention(q.reshape(b, H_kv, r, d), K, V, attn_mask=m).reshape(b, H, 1, d)

(query head ``h`` is row ``h mod r`` of group ``h // r``, the head ``repeat_kv`` gave it). Every output row is
the same softmax-weighted sum over the same keys, so the result is the same up to summation order. Only calls
with one query position, no dropout, no ``is_causal`` and a mask that is the same for every head and row
(``[b or 1, 1, 1, L]``, or none) are rewritten; prefill keeps its form.

**CPU decode attention** (:func:`lower_decode_attention`). An attention call on the CPU with at most
:data:`DECODE_MAX_ROWS` query rows (after the fold, the ``r`` heads of a group are its rows), no dropout, no
``is_causal`` and a boolean mask that is the same for every head and row (``[b or 1, 1, 1, L]``) or none becomes
``rabit::decode_attention`` (:mod:`rabit_compiler.kernels.cpu_attention`): the same result up to fp32 rounding,
computed over the positions the mask lets through only (a static cache's empty slots are masked). Calls that need
gradients, and prefill (more rows), keep ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from rabit_compiler.kernels import cpu_attention

from .graph_edit import finish

_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_NEW_AXIS = (slice(None), slice(None), None, slice(None), slice(None))
_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_UNDERSTOOD = {*_POSITIONAL, "scale"}
DECODE_MAX_ROWS = 16  # query rows per head up to which rabit::decode_attention replaces sdpa on the CPU


def _value(node: object) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: object) -> tuple[int, ...] | None:
    value = _value(node)
    return None if value is None else tuple(value.shape)


def repeated_cache(node: object) -> tuple[fx.Node, int] | None:
    """``(cache, r)`` if ``node`` is ``cache[:, :, None].expand(b, H_kv, r, L, d).reshape(b, H_kv * r, L, d)``
    for a ``cache [b, H_kv, L, d]``, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return None
    expanded = node.args[0]
    if not (isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand"):
        return None
    indexed = expanded.args[0]
    if not (isinstance(indexed, fx.Node) and indexed.op == "call_function" and indexed.target is operator.getitem
            and indexed.args[1] == _NEW_AXIS):
        return None
    cache, repeated, grouped = indexed.args[0], _shape(node), _shape(expanded)
    source = _shape(cache)
    if source is None or repeated is None or grouped is None or len(source) != 4 or len(grouped) != 5:
        return None
    b, kv_heads, length, dim = source
    if grouped != (b, kv_heads, grouped[2], length, dim) or repeated != (b, kv_heads * grouped[2], length, dim):
        return None
    return cache, grouped[2]


def _call_arguments(node: fx.Node) -> dict[str, object]:
    arguments = dict(zip(_POSITIONAL, node.args, strict=False))
    arguments.update(node.kwargs)
    return arguments


def fold_grouped_query_attention(gm: fx.GraphModule) -> int:
    """Rewrite every decode attention call of ``gm`` that reads a repeated cache (module docstring) to read the
    cache itself; returns how many were rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        arguments = _call_arguments(node)
        keys, values = repeated_cache(arguments.get("key")), repeated_cache(arguments.get("value"))
        query, output = _shape(arguments.get("query")), _shape(node)
        mask = arguments.get("attn_mask")
        if keys is None or values is None or keys[1] != values[1] or query is None or output is None:
            continue
        if len(query) != 4 or query[2] != 1 or arguments.get("dropout_p", 0.0) != 0.0 or arguments.get("is_causal"):
            continue
        if set(arguments) - _UNDERSTOOD:  # enable_gqa (no repeat to undo) or a newer argument
            continue
        mask_shape = _shape(mask)
        if mask is not None and (mask_shape is None or len(mask_shape) != 4 or mask_shape[1:3] != (1, 1)):
            continue
        (key_cache, groups), (value_cache, _) = keys, values
        batch, heads, _, dim = query
        with gm.graph.inserting_before(node):
            folded = gm.graph.call_method("reshape", (arguments["query"], batch, heads // groups, groups, dim))
            kwargs = {k: v for k, v in arguments.items() if k not in ("query", "key", "value")}
            attention = gm.graph.call_function(node.target, (folded, key_cache, value_cache), kwargs)
            unfolded = gm.graph.call_method("reshape", (attention, *output))
        # shapes for the passes after this one (lower_decode_attention)
        folded.meta["example_value"] = _value(arguments["query"]).reshape(batch, heads // groups, groups, dim)
        attention.meta["example_value"] = _value(node).reshape(batch, heads // groups, groups, output[-1])
        node.replace_all_uses_with(unfolded)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        finish(gm)
    return rewritten


def _decode_call(node: fx.Node) -> tuple[tuple, float] | None:
    """``((query, key, value, mask), scale)`` if ``node`` is an attention call the CPU kernel computes (module
    docstring), else None."""
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    arguments = _call_arguments(node)
    if set(arguments) - _UNDERSTOOD or arguments.get("dropout_p", 0.0) != 0.0 or arguments.get("is_causal"):
        return None
    query, key, value = (_value(arguments.get(name)) for name in ("query", "key", "value"))
    if query is None or key is None or value is None or any(t.dim() != 4 for t in (query, key, value)):
        return None
    if any(t.device.type != "cpu" or t.dtype != query.dtype or t.requires_grad for t in (query, key, value)):
        return None
    if query.dtype not in cpu_attention.DTYPES or query.shape[2] > DECODE_MAX_ROWS:
        return None
    batch, heads, _, dim = query.shape
    if key.shape[:2] != (batch, heads) or key.shape[3] != dim or value.shape[:3] != key.shape[:3]:
        return None
    mask = arguments.get("attn_mask")
    if mask is not None:
        mask_value = _value(mask)
        if (mask_value is None or mask_value.dtype != torch.bool or mask_value.dim() != 4
                or mask_value.shape[0] not in (1, batch) or tuple(mask_value.shape[1:]) != (1, 1, key.shape[2])):
            return None
    scale = arguments.get("scale")
    if not isinstance(scale, (float, int, type(None))):
        return None
    return (arguments["query"], arguments["key"], arguments["value"], mask), (
        1.0 / math.sqrt(dim) if scale is None else float(scale))


def lower_decode_attention(gm: fx.GraphModule) -> int:
    """Replace every CPU decode attention call of ``gm`` the kernel computes (module docstring) by
    ``rabit::decode_attention``; returns how many were replaced."""
    lowered = 0
    for node in list(gm.graph.nodes):
        call = _decode_call(node)
        if call is None:
            continue
        if not lowered:
            cpu_attention.load_library()
        (query, key, value, mask), scale = call
        with gm.graph.inserting_before(node):
            kernel = gm.graph.call_function(torch.ops.rabit.decode_attention.default, (query, key, value, mask, scale))
        kernel.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val", "stack_trace")})
        node.replace_all_uses_with(kernel)
        gm.graph.erase_node(node)
        lowered += 1
    if lowered:
        finish(gm)
    return lowered
