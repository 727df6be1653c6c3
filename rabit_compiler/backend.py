"""The ``torch.compile`` backend ``"rabit"``.

Dynamo hands over an FX graph whose parameters are placeholders and whose ``example_inputs`` are the
real tensors. The backend:

1. *find*s every linear (:mod:`rabit_compiler.passes.find`);
2. *freeze & pack*s each one whose weight is a parameter: a data-free iterative residual SVID fit,
   packed into sign planes + scales held by the graph module (a model already packed by
   :func:`rabit_compiler.quantize_` has no fp linears left and passes through unchanged);
3. *fuse*s packed linears that share an input (q/k/v, gate/up) into one ``residual_binary_linear_siblings``
   call (:mod:`rabit_compiler.passes.fuse`; ``options={"fuse_siblings": False}`` turns it off);
4. on the CPU, *lower*s the packed calls (:mod:`rabit_compiler.passes.lower`): for a few rows (decode) to the
   lookup-table C++ operator ``rabit::lut_gemv`` (:mod:`rabit_compiler.kernels.cpu_lut`), for prefill to unpack +
   matmul aten ops that Inductor fuses; on CUDA the ops stay ``triton_op`` calls that Inductor traces into the Triton
   kernels;
5. *fold*s grouped-query decode attention onto the unrepeated KV cache and, on the CPU, computes decode attention
   with ``rabit::decode_attention``, which reads only the cache positions the mask lets through
   (:mod:`rabit_compiler.passes.attention`);
6. hands the graph to Inductor (``options={"inductor": False}`` runs the packed graph eagerly instead, on
   the op's own CPU kernel); ``mode`` is passed on (``"reduce-overhead"``: CUDA graphs on a GPU).

The returned callable checks, on every call, that the weight tensors it receives are the ones that
were packed (same tensor object, same version counter). If not (another module instance, an in-place
update), it re-packs into the same buffers and logs it, so it never serves stale weights. Fused groups
hold copies of packed tensors that were graph inputs, and the CPU kernel's calls copies in its own layout; those are
re-copied (re-derived) the same way when what they were copied from changes.

Options (``torch.compile(..., options={...})``): every :class:`RaBiTConfig` field (``paths``, ``skip``,
``rounds``, ``scale_dtype``, ...), ``inductor`` and ``fuse_siblings`` (bools, default True), ``cpu_tables``
(the CPU kernel's tables: ``"fp32"`` or ``"int8"``, default :data:`~rabit_compiler.kernels.cpu_lut.
DEFAULT_TABLE_PRECISION`; ``"int8"`` also gives a weight-only LM head int8 activations), ``cpp_wrapper``
(Inductor's C++ wrapper: the graph calls its kernels and the ``rabit::`` operators from C++ instead of Python;
default False), ``fold_gqa`` (default True: a grouped-query model's decode attention reads its KV cache without
repeating it) and ``cpu_attention`` (default True: CPU decode attention by ``rabit::decode_attention``, which reads
only the cache positions the mask lets through; both in :mod:`rabit_compiler.passes.attention`).
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.experts import is_matrix_stack
from rabit_compiler.kernels import PackedResidualBinary
from rabit_compiler.kernels.cpu_lut import DEFAULT_TABLE_PRECISION
from rabit_compiler.passes import GraphWeights, PackedSite, freeze_and_pack, lower_for_cpu
from rabit_compiler.passes.attention import fold_grouped_query_attention, lower_decode_attention
from rabit_compiler.passes.fuse import FUSED_TENSOR_ARGS, FusedMember, fuse_siblings
from rabit_compiler.passes.graph_edit import oriented_weight
from rabit_compiler.passes.lower import DerivedLayout
from rabit_compiler.quantizer import PACK_CACHE, DataFreePackCache

logger = logging.getLogger("rabit_compiler")

_INDUCTOR_MODES = {None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}


class PackedWeightGuard:
    """Wraps a compiled graph; before each call, brings the packed tensors held by the graph up to date.

    - A layer packed at compile time from an fp weight is re-packed when the runtime weight is not the tensor
      (or the version) it was packed from.
    - A fused sibling group copies packed tensors that were graph inputs (a ``quantize_``-packed model owns
      them); a member is re-copied when one of those inputs changed.
    - A CPU kernel call's layout copy (:class:`DerivedLayout`) is derived again when a tensor it was derived from
      was replaced or changed in place (after the two steps above, which change such tensors).

    ``holders`` are the modules holding packed tensors by name, as they were before lowering (which drops from
    ``gm`` those its graph no longer reads: the kernel calls read their layout copies). A call that receives the same
    tensor objects at the same versions as the last one skips the checks (one list of versions compared: a decode
    step's Python cost).
    """

    def __init__(
        self,
        compiled: Callable[..., Any],
        gm: fx.GraphModule,
        sites: Sequence[PackedSite],
        fused: Sequence[Sequence[FusedMember]],
        example_inputs: Sequence[Any],
        config: RaBiTConfig,
        cache: DataFreePackCache,
        holders: dict[str, torch.nn.Module],
        layouts: Sequence[DerivedLayout] = (),
    ):
        self.compiled = compiled
        self.gm = gm
        self.holders = holders
        self.config = config
        self.cache = cache
        self.repacks = 0
        self._fused_at = {m.former_holder: m for group in fused for m in group if m.former_holder is not None}
        self._checks = [
            (site, site.weight_input_index, weakref.ref(site.weight), site.weight._version)
            for site in sites
            if site.weight_input_index is not None
        ]
        self._copies = [
            (member, self._identity(example_inputs, member.input_indices)) for group in fused for member in group
            if any(index is not None for index in member.input_indices)
        ]
        self._layouts = [(layout, self._versions(layout.source_tensors(example_inputs))) for layout in layouts]
        indices = {index for _, index, _, _ in self._checks}
        indices.update(i for member, _ in self._copies for i in member.input_indices if i is not None)
        indices.update(s for layout, _ in self._layouts for s in layout.sources if isinstance(s, int))
        self._watched_inputs = sorted(indices)
        self._watched_buffers = [s for layout, _ in self._layouts for s in layout.sources
                                 if isinstance(s, torch.Tensor)]
        self._last_seen: tuple[list[Any], list[int]] | None = None

    def _seen(self, args: Sequence[Any]) -> tuple[list[Any], list[int]]:
        """Every tensor the three checks read (graph inputs by position, buffers held by layouts) and its version."""
        tensors = [args[i] for i in self._watched_inputs]
        return tensors, [t._version for t in tensors] + [t._version for t in self._watched_buffers]

    def __call__(self, *args: Any) -> Any:
        # fast path: the same tensor objects at the same versions as the last call -> nothing to bring up to date
        tensors, versions = self._seen(args)
        last = self._last_seen
        if last is None or versions != last[1] or not all(map(operator.is_, tensors, last[0])):
            self._update(args)
            self._last_seen = self._seen(args)
        return self.compiled(*args)

    def _update(self, args: Sequence[Any]) -> None:
        for position, (site, index, ref, version) in enumerate(self._checks):
            weight = args[index]
            if ref() is not weight or weight._version != version:
                self._repack(position, site, weight)
        for position, (member, identity) in enumerate(self._copies):
            if identity != self._identity(args, member.input_indices):
                self._recopy(position, member, args)
        for position, (layout, versions) in enumerate(self._layouts):
            current = self._versions(layout.source_tensors(args))
            if current != versions:
                layout.refresh(self.gm, args)
                self._layouts[position] = (layout, current)

    @staticmethod
    def _versions(tensors: Sequence[torch.Tensor | None]) -> tuple:
        return tuple((id(t), t._version) for t in tensors if t is not None)

    @staticmethod
    def _identity(args: Sequence[Any], indices: Sequence[int | None]) -> tuple:
        return tuple((id(args[i]), args[i]._version) for i in indices if i is not None)

    def _recopy(self, position: int, member: FusedMember, args: Sequence[Any]) -> None:
        holder = self.holders[member.module_name]
        tensors = {name: args[index].detach() for name, index in zip(FUSED_TENSOR_ARGS, member.input_indices,
                                                                      strict=True) if index is not None}
        holder.write_segment(member.segment, **tensors)
        self._copies[position] = (member, self._identity(args, member.input_indices))

    def _repack(self, position: int, site: PackedSite, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != tuple(site.weight.shape):
            raise RuntimeError(
                f"rabit: layer {site.name} was packed for a weight of shape {tuple(site.weight.shape)} but "
                f"received {tuple(weight.shape)}; recompile"
            )
        oriented = oriented_weight(weight.detach(), site.layout)
        packed = self.cache.get(weight, oriented, self.config.for_layer(site.name))
        member = self._fused_at.get(site.module_name)
        if member is not None:
            self.holders[member.module_name].write_segment(
                member.segment, packed.packed_signs, packed.row_scale, packed.col_scale)
        else:
            self.holders[site.module_name].write(packed)
        logger.info("rabit: re-packed %s (its weight tensor changed since compilation)", site.name)
        self.repacks += 1
        self._checks[position] = (site, site.weight_input_index, weakref.ref(weight), weight._version)


@dataclass
class PreparedGraph:
    """What the passes did to a graph (packed, fused, lowered for the CPU, GQA-folded): what the weight guard
    needs."""

    config: RaBiTConfig
    packed_sites: list[PackedSite]
    fused: list[list[FusedMember]]
    holders: dict[str, torch.nn.Module]
    layouts: list[DerivedLayout]


def prepare_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any],
                  lower: bool = True) -> PreparedGraph:
    """Steps 1-5 of the module docstring on ``gm``, in place (step 4 only if ``lower``). ``options``: the backend's,
    less the Inductor ones (``inductor``, ``cpp_wrapper``)."""
    options = dict(options)
    fuse = bool(options.pop("fuse_siblings", True))
    cpu_tables = options.pop("cpu_tables", DEFAULT_TABLE_PRECISION)
    fold_gqa = bool(options.pop("fold_gqa", True))
    cpu_attention = bool(options.pop("cpu_attention", True))
    if "head" in options:
        raise ValueError("rabit backend: the LM head is made weight-only by rabit.quantize_ (RaBiTConfig.head); "
                         "the backend's data-free path leaves linears tied to an embedding in full precision")
    config = RaBiTConfig.from_options(options)

    def quantize(name: str, weight: torch.Tensor, oriented: torch.Tensor) -> PackedResidualBinary:
        # a copy: the graph's buffers are re-packed in place, the cache's entry must not change with them
        cached = PACK_CACHE.get(weight, oriented, config.for_layer(name))
        return PackedResidualBinary(cached.packed_signs.clone(), cached.row_scale.clone(),
                                    cached.col_scale.clone(), None, cached.in_features)

    packed_sites, skipped = freeze_and_pack(gm, quantize, example_inputs, skip=config.skips)
    for site in skipped:
        logger.info("rabit: left in full precision: %s (%s)", site.node.name, site.reason)
    for name in _expert_weights(gm, example_inputs):
        logger.info("rabit: left in full precision: %s (stacked MoE expert weights: rabit.quantize_ packs experts, "
                    "the backend packs 2-D linear weights)", name)
    logger.info("rabit: packed %d linear layers into %d-path residual binary", len(packed_sites), config.paths)
    fused = fuse_siblings(gm, example_inputs) if fuse else []
    if fused:
        logger.info("rabit: fused %d sibling groups (%s)", len(fused),
                    ", ".join(str(len(group)) for group in fused))
    holders = dict(gm.named_modules())  # before lowering drops the packed modules the graph no longer reads
    lowered = []
    if lower:
        lowered = [call for call in lower_for_cpu(gm, example_inputs, tables=cpu_tables) if call.form is not None]
        if lowered:
            logger.info("rabit: %d packed calls lowered for the CPU (%s)", len(lowered),
                        ", ".join(sorted({call.form for call in lowered})))
    folded = fold_grouped_query_attention(gm) if fold_gqa else 0
    if folded:
        logger.info("rabit: %d grouped-query decode attention calls read the KV cache unrepeated", folded)
    attention = lower_decode_attention(gm) if cpu_attention else 0
    if attention:
        logger.info("rabit: %d CPU decode attention calls by rabit::decode_attention", attention)
    layouts = [call.layout for call in lowered if call.layout is not None]
    return PreparedGraph(config, list(packed_sites), [list(group) for group in fused], holders, layouts)


def rabit_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """``torch.compile(model, backend="rabit", mode=..., options=...)``; see the module docstring."""
    options = dict(options or {})
    use_inductor = bool(options.pop("inductor", True))
    cpp_wrapper = bool(options.pop("cpp_wrapper", False))
    if mode not in _INDUCTOR_MODES:
        valid = sorted(m for m in _INDUCTOR_MODES if m)
        raise ValueError(f"rabit backend: unknown mode {mode!r}; expected one of {valid}")
    prepared = prepare_graph(gm, example_inputs, options, lower=use_inductor)
    compiled: Callable[..., Any] = gm
    if use_inductor:
        try:
            compiled = _inductor(gm, example_inputs, mode, cpp_wrapper)
        except Exception as error:  # Inductor cannot compile this graph: run the packed graph eagerly
            logger.warning("rabit: Inductor failed on this graph, running it eagerly (%s: %s)",
                           type(error).__name__, error)
    return PackedWeightGuard(compiled, gm, prepared.packed_sites, prepared.fused, example_inputs, prepared.config,
                             PACK_CACHE, prepared.holders, prepared.layouts)


def _expert_weights(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[str]:
    """Names of the graph's parameter inputs that are stacks of matrices (MoE experts held as 3-D weights)."""
    weights = GraphWeights(gm, example_inputs)
    return [weights.name(node) for node, value in weights.placeholder_values.items()
            if isinstance(value, torch.nn.Parameter) and is_matrix_stack(value) and node.users]


def _inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None,
              cpp_wrapper: bool) -> Callable[..., Any]:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    if cpp_wrapper:
        patches["cpp_wrapper"] = True
    return compile_fx(gm, list(example_inputs), config_patches=patches)


def register() -> None:
    """Register ``"rabit"`` with Dynamo (the package also declares a ``torch_dynamo_backends`` entry point)."""
    from torch._dynamo import list_backends, register_backend

    if "rabit" not in list_backends(exclude_tags=()):
        register_backend(name="rabit")(rabit_backend)
