"""FX pass 4b, *lower for CPU*: each packed-linear call on the CPU gets the CPU form that is fastest for its rows.

For every ``rabit::residual_binary_linear`` and ``rabit::residual_binary_linear_siblings`` call whose ``x`` and
packed tensors are on the CPU, :func:`~rabit_compiler.kernels.cpu_lowering.cpu_form` picks from the rows of ``x``
at compile time (a symbolic row count uses its size hint, the example the graph was compiled for):

* ``"kernel"`` (decode, few rows of fp32/fp16/bf16): the call becomes ``rabit::lut_gemv``, the lookup-table C++
  operator of :mod:`rabit_compiler.kernels.cpu_lut` (fp32 or int8 tables: ``tables``), which Inductor calls as an
  extern kernel. Its tiled sign layout is derived here, once, into a :class:`LutLayoutWeights` submodule of ``gm``;
  the :class:`DerivedLayout` of the call says what it was derived from, so that the caller can derive it again
  when those tensors change (the backend's guard does);
* ``"dense"`` (prefill): the call is replaced by the decomposition of :mod:`rabit_compiler.kernels.cpu_lowering`,
  traced into the graph on FX proxies (its tensor constants become buffers of ``gm``), so Inductor's C++
  backend fuses the unpack with its neighbours and calls the matmul library once;
* ``"bitwise"`` (only when forced): the same decomposition's matmul-free Inductor loop nest, inside the graph
  (slower than the kernel on every shape measured; it needs no C++ build of its own).

Every form is correct for every row count; only its speed depends on the rows.

A weight-only LM head call (``rabit::weight_only_linear``, a Python custom op) with a static ``x`` of few CPU rows
becomes ``rabit::weight_only_gemv``, the C++ operator of its decode kernel (no Python in the call); with int8
tables, either takes the same integer arithmetic: its decode kernel rounds ``x`` to int8 per 32 columns
(:mod:`rabit_compiler.kernels.weight_only`).

Use: ``lower_for_cpu(gm, example_inputs)`` after freeze/fuse and before ``compile_fx``. Calls that cannot be
lowered (a CUDA tensor, an ``x`` whose dtype and shape are unknown) are left as they are, with the reason
logged and returned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from rabit_compiler.kernels import cpu_lut, weight_only
from rabit_compiler.kernels.cpu_lowering import (
    cpu_form,
    residual_binary_linear_cpu,
    residual_binary_linear_siblings_cpu,
)
from rabit_compiler.kernels.cpu_lut import (
    DEFAULT_TABLE_PRECISION,
    TiledLayout,
    byte_planes_for,
    supports,
    tiled_layout,
)
from rabit_compiler.kernels.reference import accumulation_dtype

from .find import GraphWeights
from .freeze import declare_buffers_to_dynamo
from .graph_edit import finish, op_name, unique_module_name

logger = logging.getLogger("rabit_compiler")

_DECOMPOSITIONS = {
    "rabit::residual_binary_linear": residual_binary_linear_cpu,
    "rabit::residual_binary_linear_siblings": residual_binary_linear_siblings_cpu,
}


_LAYOUT_BUFFERS = ("signs", "row_scale", "col_scale", "bias")


class LutLayoutWeights(torch.nn.Module):
    """One kernel call's packed tensors in the LUT kernel's layout (:func:`~rabit_compiler.kernels.cpu_lut.
    tiled_layout`): buffers ``signs`` (int32 row words or uint8 byte planes), ``row_scale`` fp32 ``[k, tiles, 16]``,
    ``col_scale`` fp32 ``[S, k, K]``, ``bias`` fp32 ``[tiles, 16]`` or None."""

    def __init__(self, layout: TiledLayout):
        super().__init__()
        for name in _LAYOUT_BUFFERS:
            self.register_buffer(name, getattr(layout, name))

    def write(self, layout: TiledLayout) -> None:
        """Overwrite the buffers in place (same shapes), so that a compiled graph holding them sees the new values."""
        with torch.no_grad():
            for name in _LAYOUT_BUFFERS:
                if getattr(self, name) is not None:
                    getattr(self, name).copy_(getattr(layout, name))


@dataclass
class DerivedLayout:
    """A kernel call's layout copy, held by the :class:`LutLayoutWeights` ``module_name`` of ``gm``, and what it was
    derived from: for packed_signs, row_scale, col_scale and bias, the index of the graph input that held it (int),
    the tensor itself (a buffer of a packed-weights module, which the graph no longer reads), or None (no bias)."""

    module_name: str
    sources: tuple[int | torch.Tensor | None, ...]
    out_features: tuple[int, ...]

    def source_tensors(self, args: Sequence[object]) -> list[torch.Tensor | None]:
        """The tensors it is derived from, given the graph's inputs ``args``."""
        return [args[source] if isinstance(source, int) else source for source in self.sources]

    def refresh(self, gm: fx.GraphModule, args: Sequence[object]) -> None:
        """Derive the layout again from the current tensors, into the same buffers."""
        tensors = (None if t is None else t.detach() for t in self.source_tensors(args))
        weights = gm.get_submodule(self.module_name)
        weights.write(tiled_layout(*tensors, self.out_features, byte_planes=weights.signs.dtype == torch.uint8))


@dataclass
class LoweredCall:
    """One op call and the CPU ``form`` it was replaced by (``"kernel"``: ``rabit::lut_gemv``, with its ``layout``;
    ``"bitwise"``/``"dense"``: that decomposition), or the ``reason`` it was left for another device."""

    name: str
    form: str | None = None
    reason: str | None = None
    layout: DerivedLayout | None = None


class _ConstantTracer(fx.proxy.GraphAppendingTracer):
    """Appends to ``gm.graph``; a tensor built while tracing becomes an ``arange`` node if it is one (the bit
    positions), else a buffer of a ``rabit_cpu_constants`` submodule of ``gm`` (declared to Dynamo), shared by
    equal constants."""

    def __init__(self, gm: fx.GraphModule, weights: GraphWeights):
        super().__init__(gm.graph)
        self.gm = gm
        self.weights = weights
        self.holder_name: str | None = None
        self.constants: dict[tuple, str] = {}

    def create_arg(self, a: object) -> object:
        if isinstance(a, torch.Tensor) and _is_range(a):
            # emitted as arange: Inductor then builds it in registers instead of loading a buffer in the bit
            # loop (measured 2x slower at 576 x 576 with the buffer)
            return self.graph.call_function(torch.arange, (a.numel(),), {"dtype": a.dtype, "device": a.device})
        if isinstance(a, torch.Tensor):
            key = (a.dtype, a.device, tuple(a.shape), tuple(a.flatten().tolist()))
            if key not in self.constants:
                if self.holder_name is None:
                    self.holder_name = unique_module_name(self.gm, "constants", "rabit_cpu")
                    self.gm.add_submodule(self.holder_name, torch.nn.Module())
                buffer = f"constant_{len(self.constants)}"
                self.gm.get_submodule(self.holder_name).register_buffer(buffer, a)
                declare_buffers_to_dynamo(self.gm, self.holder_name, [buffer])
                self.constants[key] = f"{self.holder_name}.{buffer}"
            return self.graph.get_attr(self.constants[key])
        return super().create_arg(a)


def _is_range(tensor: torch.Tensor) -> bool:
    """``tensor`` is ``arange(n)`` (1-D, integer)."""
    return (tensor.dim() == 1 and not tensor.is_floating_point() and tensor.numel() > 0
            and torch.equal(tensor, torch.arange(tensor.numel(), dtype=tensor.dtype, device=tensor.device)))


def _example(node: object, weights: GraphWeights) -> torch.Tensor | None:
    """The tensor (real or fake) a node stands for, from the example inputs, an attribute or its meta."""
    if not isinstance(node, fx.Node):
        return None
    if node.op in ("placeholder", "get_attr"):
        try:
            value = weights.value(node)
        except (KeyError, AttributeError):
            value = None
        if isinstance(value, torch.Tensor):
            return value
    for key in ("val", "example_value"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return value
    tensor_meta = node.meta.get("tensor_meta")
    if tensor_meta is not None:
        return torch.empty(tensor_meta.shape, dtype=tensor_meta.dtype, device="meta")
    return None


def _rows(x: torch.Tensor) -> int | None:
    """Rows of ``x [..., K]``; a symbolic size counts as its hint; None when a size has no hint (unbacked)."""
    rows = 1
    for size in x.shape[:-1]:
        hint = size.node.hint if isinstance(size, torch.SymInt) else size
        if hint is None:
            return None
        rows *= int(hint)
    return rows


def _overload(node: fx.Node) -> torch._ops.OpOverload:
    """The call's op as an overload (a symbolically traced graph calls the packet)."""
    target = node.target
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target


def _call_arguments(node: fx.Node) -> dict[str, object]:
    """The op's arguments by schema name (positional and keyword)."""
    schema = _overload(node)._schema
    arguments = dict(zip([argument.name for argument in schema.arguments], node.args, strict=False))
    arguments.update(node.kwargs)
    for argument in schema.arguments:
        if argument.name not in arguments and argument.has_default_value():
            arguments[argument.name] = argument.default_value
    return arguments


def _skip_reason(arguments: dict[str, object], weights: GraphWeights) -> str | None:
    x = _example(arguments["x"], weights)
    if x is None:
        return "the dtype and shape of x are unknown (no example input or meta)"
    for name in ("x", "packed_signs", "row_scale", "col_scale", "bias"):
        value = x if name == "x" else _example(arguments[name], weights)
        if value is None and name == "bias" and arguments[name] is None:
            continue
        if value is None:
            return f"{name} has no known device"
        if value.device.type not in ("cpu", "meta"):
            return f"{name} is on {value.device}"
    return None


_LAYOUT_ARGS = ("packed_signs", "row_scale", "col_scale", "bias")  # what a layout is derived from, in order


def _layout_sources(arguments: dict[str, object],
                    weights: GraphWeights) -> tuple[int | torch.Tensor | None, ...] | None:
    """Where packed_signs, row_scale and bias come from (see :class:`DerivedLayout`), or None when one is computed
    in the graph or has no real value (then no layout can be derived at compile time)."""
    sources = []
    for name in _LAYOUT_ARGS:
        node = arguments[name]
        if node is None:
            sources.append(None)
            continue
        value = _example(node, weights)
        if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or isinstance(
                value, torch._subclasses.FakeTensor):
            return None
        if node.op == "get_attr":
            sources.append(value)
        elif node.op == "placeholder" and node in weights.placeholder_index:
            sources.append(weights.placeholder_index[node])
        else:
            return None
    return tuple(sources)


def _form(arguments: dict[str, object], weights: GraphWeights, x: torch.Tensor, form: str | None) -> str:
    """The forced ``form``, or the one :func:`cpu_form` picks for the rows of ``x`` ("dense" for an unknown row
    count; "kernel" turns into "dense" for dtypes the C++ kernel does not take, e.g. fp64, and
    for packed tensors whose values are not known at compile time)."""
    row_scale, col_scale = (_example(arguments[name], weights) for name in ("row_scale", "col_scale"))
    kernel_ok = supports(x, row_scale, col_scale)
    if form == "kernel" and not kernel_ok:
        raise ValueError(f"the CPU kernel takes fp32/fp16/bf16 x and scales, got x {x.dtype}, "
                         f"row_scale {row_scale.dtype}, col_scale {col_scale.dtype}")
    derivable = _layout_sources(arguments, weights) is not None
    if form == "kernel" and not derivable:
        raise ValueError("the CPU kernel needs packed tensors known at compile time (graph inputs or attributes)")
    if form is not None:
        return form
    rows = _rows(x)
    if rows is None:
        return "dense"
    chosen = cpu_form(rows)
    if chosen == "kernel" and not (kernel_ok and derivable):
        logger.info("rabit: packed call left to the dense form: %s", "its dtypes are not the kernel's" if not
                    kernel_ok else "its packed tensors are not known at compile time")
        return "dense"
    return chosen


def _kernel_call(gm: fx.GraphModule, node: fx.Node, x: fx.Proxy, arguments: dict[str, object],
                 tracer: _ConstantTracer, out_features: list[int], tables: str) -> tuple[fx.Proxy, DerivedLayout]:
    """``rabit::lut_gemv`` on a layout derived now into a new :class:`LutLayoutWeights` submodule of ``gm``."""
    sources = (_example(arguments[name], tracer.weights) for name in _LAYOUT_ARGS)
    module_name = unique_module_name(gm, node.name, "rabit_lut")
    tensors = (None if t is None else t.detach() for t in sources)
    byte_planes = byte_planes_for(tables)
    gm.add_submodule(module_name, LutLayoutWeights(tiled_layout(*tensors, out_features, byte_planes=byte_planes)))
    declare_buffers_to_dynamo(gm, module_name, _LAYOUT_BUFFERS)
    layout = {name: None if getattr(gm.get_submodule(module_name), name) is None
              else fx.Proxy(gm.graph.get_attr(f"{module_name}.{name}"), tracer)
              for name in _LAYOUT_BUFFERS}
    cpu_lut.load_library()
    out = torch.ops.rabit.lut_gemv(x, layout["signs"], layout["row_scale"], layout["col_scale"],
                                   layout["bias"], out_features, arguments["in_features"], tables == "int8")
    return out, DerivedLayout(module_name, _layout_sources(arguments, tracer.weights), tuple(out_features))


def _lower(gm: fx.GraphModule, node: fx.Node, tracer: _ConstantTracer, x: torch.Tensor, form: str,
           tables: str) -> DerivedLayout | None:
    arguments = _call_arguments(node)
    tensors = {
        name: None if arguments[name] is None else fx.Proxy(arguments[name], tracer)
        for name in ("x", "packed_signs", "row_scale", "col_scale", "bias")
    }
    siblings = op_name(node.target) == "rabit::residual_binary_linear_siblings"
    out_features = list(arguments["out_features"]) if siblings else [_example(arguments["packed_signs"],
                                                                              tracer.weights).shape[1]]
    layout = None
    with gm.graph.inserting_before(node):
        if form == "kernel":
            out, layout = _kernel_call(gm, node, tensors["x"], arguments, tracer, out_features, tables)
        else:
            statics = {"in_features": arguments["in_features"], **({"out_features": out_features} if siblings else {})}
            decomposition = _DECOMPOSITIONS[op_name(node.target)]
            out = decomposition(**tensors, **statics, form=form, accumulate=accumulation_dtype(x.dtype))
    out.node.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "stack_trace")})
    node.replace_all_uses_with(out.node)
    gm.graph.erase_node(node)
    return layout


def lower_for_cpu(
    gm: fx.GraphModule, example_inputs: Sequence[object] | None = None, form: str | None = None,
    tables: str = DEFAULT_TABLE_PRECISION,
) -> list[LoweredCall]:
    """Replace, in place, every CPU call of ``rabit::residual_binary_linear`` /
    ``rabit::residual_binary_linear_siblings`` in ``gm`` by its traced decomposition; recompiles ``gm``.

    ``example_inputs`` are the placeholders' values (what a ``torch.compile`` backend receives); without them
    the dtype and rows of ``x`` come from node meta (``val`` / ``example_value`` / ``tensor_meta``). ``form``
    forces ``"kernel"``, ``"bitwise"`` or ``"dense"`` for every call (default: by the rows of each call's
    ``x``); ``tables`` is the kernel's table precision (``"fp32"`` or ``"int8"``). Returns one
    :class:`LoweredCall` per op call: its form (and for the kernel its :class:`DerivedLayout`), or why it was left.
    """
    if tables not in cpu_lut.TABLE_PRECISIONS:
        raise ValueError(f"tables must be one of {cpu_lut.TABLE_PRECISIONS}, got {tables!r}")
    weights = GraphWeights(gm, example_inputs)
    tracer = _ConstantTracer(gm, weights)
    calls = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_name(node.target) not in _DECOMPOSITIONS:
            continue
        arguments = _call_arguments(node)
        reason = _skip_reason(arguments, weights)
        if reason is not None:
            logger.info("rabit: %s not lowered for the CPU: %s", node.name, reason)
            calls.append(LoweredCall(node.name, reason=reason))
            continue
        x = _example(arguments["x"], weights)
        chosen = _form(arguments, weights, x, form)
        calls.append(LoweredCall(node.name, form=chosen, layout=_lower(gm, node, tracer, x, chosen, tables)))
    _lower_heads(gm, weights, tables)
    if calls:
        finish(gm)  # a packed-weights module the graph no longer reads leaves gm (not a graph input any more)
    return calls


def _lower_heads(gm: fx.GraphModule, weights: GraphWeights, tables: str) -> None:
    """Every ``rabit::weight_only_linear`` call of ``gm``: ``rabit::weight_only_gemv`` where that takes its tensors
    (:func:`~rabit_compiler.kernels.weight_only.gemv_takes`); ``int8_activations=True`` with int8 tables."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or op_name(node.target) != "rabit::weight_only_linear":
            continue
        arguments = _call_arguments(node)
        x, qweight, scale = (_example(arguments[name], weights) for name in ("x", "qweight", "scale"))
        if weight_only.gemv_takes(x, qweight, scale):
            weight_only.load_operator(arguments["bits"], scale.dtype)
            node.target = torch.ops.rabit.weight_only_gemv.default
        node.args = tuple(arguments[name] for name in ("x", "qweight", "scale", "bias", "bits", "group_size",
                                                       "in_features"))
        node.kwargs = {"int8_activations": tables == "int8" or bool(arguments["int8_activations"])}
        changed += 1
    if changed:
        logger.info("rabit: %d weight-only head calls lowered (%s tables)", changed, tables)
        gm.recompile()
