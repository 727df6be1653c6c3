"""MoE experts held as 3-D parameters (transformers 5), packed per expert.

transformers 5 keeps the experts of a Mixtral-style MoE block (Qwen3-MoE, OLMoE, Mixtral, ...) in one module
decorated with ``@use_experts_implementation``: ``gate_up_proj [E, 2I, H]`` (``up_proj [E, I, H]`` without a gate)
and ``down_proj [E, H, I]`` (each ``[E, K, N]`` when ``is_transposed``), optional biases ``<proj>_bias [E, N]``,
consumed by per-expert slices or grouped matmuls: there is no ``nn.Linear`` for ``quantize_`` to find.

- :func:`find_experts` finds them, and names every 3-D weight it cannot pack with the reason.
- :func:`pack_experts` fits k paths to every expert's ``[N, K]`` slice of every projection with the one fit
  (:func:`~rabit_compiler.quantizer.fit_linear`, with per-expert calibration statistics when given) into a
  :class:`RaBiTExperts`, which replaces the module with the same forward: the router's top-k indices and weights come
  in as arguments, so the routing is unchanged.
- :func:`expert_statistics` collects those statistics while ``quantize_`` / ``prepare_qat`` calibrate: each expert
  projection is a :class:`~rabit_compiler.calibration.CapturedLinear` (input magnitudes, output gradients, ``X^T X``
  when the fit needs it) of the rows routed to it. Sequential calibration covers ``nn.Linear`` modules only: experts
  are fitted from the statistics of the unquantized model's run.

An expert's projection is a layer named ``<experts>.<e>.<proj>`` (e.g. ``model.layers.0.mlp.experts.3.down_proj``):
``RaBiTConfig.skip`` and ``layer_paths`` match those names; one k per projection (the planes are stacked).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rabit_compiler.calibration import CapturedLinear, InputGram, LinearCapture, capture_linears
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.kernels import PackedResidualBinary, words_per_row
from rabit_compiler.kernels.experts import apply_per_expert
from rabit_compiler.quantizer import fit_linear, pack_fit

logger = logging.getLogger("rabit_compiler")

GATED = ("gate_up_proj", "down_proj")
UNGATED = ("up_proj", "down_proj")
_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


@dataclass
class ExpertsLayout:
    """How a transformers experts module holds its experts: E, its projections (in forward order), whether the
    weights are stored ``[E, K, N]`` (``transposed``) and the ``ACT2FN`` name of its activation."""

    num_experts: int
    projections: tuple[str, ...]
    transposed: bool
    activation: str

    def layer_names(self, name: str) -> list[str]:
        """``<name>.<e>.<proj>`` for every expert and projection (expert-major)."""
        return [f"{name}.{expert}.{projection}" for expert in range(self.num_experts)
                for projection in self.projections]

    def oriented(self, module: torch.nn.Module, projection: str) -> torch.Tensor:
        """The projection's weights as ``[E, N, K]`` (a view)."""
        weight = getattr(module, projection)
        return weight.transpose(1, 2) if self.transposed else weight


def _activation_name(module: torch.nn.Module) -> str | None:
    """``config.hidden_act`` when ``ACT2FN`` of it computes what ``module.act_fn`` computes (checked on a probe)."""
    from transformers.activations import ACT2FN

    name = getattr(getattr(module, "config", None), "hidden_act", None)
    act_fn = getattr(module, "act_fn", None)
    if not isinstance(name, str) or name not in ACT2FN or not callable(act_fn):
        return None
    probe = torch.linspace(-6.0, 6.0, 49)
    return name if torch.equal(ACT2FN[name](probe), act_fn(probe)) else None


def _layout_or_reason(module: torch.nn.Module) -> ExpertsLayout | str:
    """The module's :class:`ExpertsLayout`, or why it cannot be packed."""
    from transformers.integrations.moe import _default_apply_gate

    kind = type(module).__name__
    if not all(hasattr(module, flag) for flag in _FLAGS):
        return f"{kind} holds 3-D weights but is not a transformers experts module (@use_experts_implementation)"
    if module.has_post_expert_norm:
        return f"{kind} normalises each expert's output (has_post_expert_norm), which RaBiTExperts does not"
    if module.has_gate and getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
        return f"{kind} gates with its own _apply_gate, not act(gate) * up"
    if getattr(module, "_is_expert_parallel", False):
        return f"{kind} is sharded for expert parallelism"
    projections = GATED if module.has_gate else UNGATED
    expected = set(projections) | ({f"{p}_bias" for p in projections} if module.has_bias else set())
    held = {name for name, _ in module.named_parameters(recurse=False)}
    if held != expected:
        return f"{kind} holds parameters {sorted(held)}, not the projections {sorted(expected)}"
    activation = _activation_name(module)
    if activation is None:
        return f"{kind}'s act_fn is not ACT2FN[config.hidden_act]"
    weights = [getattr(module, p) for p in projections]
    if any(w.dim() != 3 or not w.is_floating_point() or not torch.isfinite(w).all() for w in weights):
        return f"{kind}'s weights are not 3-D floating point or have NaN/Inf values"
    return ExpertsLayout(weights[0].shape[0], projections, bool(module.is_transposed), activation)


def is_matrix_stack(parameter: torch.Tensor) -> bool:
    """A floating-point ``[E, N, K]`` parameter with every size above 1 (experts; not e.g. a ``[1, 1, H]`` token)."""
    return parameter.dim() == 3 and min(parameter.shape) > 1 and parameter.is_floating_point()


def find_experts(model: torch.nn.Module) -> tuple[dict[str, ExpertsLayout], dict[str, str]]:
    """``(layouts, left)``: every experts module RaBiTExperts can replace (by name), and every other stack of matrices
    (:func:`is_matrix_stack`, outside convolutions; by name) with the reason it stays in full precision."""
    layouts, left = {}, {}
    for name, module in model.named_modules():
        held = [attr for attr, p in module.named_parameters(recurse=False) if is_matrix_stack(p)]
        if not held or isinstance(module, torch.nn.modules.conv._ConvNd):
            continue
        found = _layout_or_reason(module)
        if isinstance(found, ExpertsLayout):
            layouts[name] = found
        else:
            left.update({f"{name}.{attr}": found for attr in held})
    return layouts, left


@dataclass
class PackedExperts:
    """One projection of E experts in packed format v1 with a leading expert axis: ``packed_signs`` int32
    ``[E, k, N, ceil(K/32)]``, ``row_scale [E, k, N]``, ``col_scale [E, k, K]``, ``bias [E, N]`` or None."""

    packed_signs: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    bias: torch.Tensor | None
    in_features: int

    @classmethod
    def stack(cls, experts: list[PackedResidualBinary], bias: torch.Tensor | None) -> PackedExperts:
        return cls(torch.stack([p.packed_signs for p in experts]), torch.stack([p.row_scale for p in experts]),
                   torch.stack([p.col_scale for p in experts]), bias, experts[0].in_features)

    @classmethod
    def empty(cls, num_experts: int, paths: int, out_features: int, in_features: int, scale_dtype: torch.dtype,
              bias_dtype: torch.dtype | None) -> PackedExperts:
        """Uninitialised tensors of these shapes on the current default device."""
        return cls(torch.empty(num_experts, paths, out_features, words_per_row(in_features), dtype=torch.int32),
                   torch.empty(num_experts, paths, out_features, dtype=scale_dtype),
                   torch.empty(num_experts, paths, in_features, dtype=scale_dtype),
                   None if bias_dtype is None else torch.empty(num_experts, out_features, dtype=bias_dtype),
                   in_features)


def route_tokens(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 projections: tuple[str, ...], act_fn: Callable[[torch.Tensor], torch.Tensor],
                 project: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The experts' forward, whatever form their weights take: ``hidden_states [T, H]``, ``top_k_index`` and
    ``top_k_weights [T, top_k]`` from the router ->
    ``out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` (``down_e(act(up_e(x_t)))`` without a gate),
    ``e = top_k_index[t, j]``, as transformers' grouped and batched implementations compute it.
    ``project(proj, rows [S, K], expert_ids [S]) -> [S, N]`` applies projection ``proj`` of expert ``expert_ids[s]``
    to row s (the rows are the tokens repeated ``top_k`` times)."""
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    rows = hidden_states.repeat_interleave(top_k, dim=0)
    first, down = projections
    hidden = project(first, rows, expert_ids)
    if first == "gate_up_proj":
        gate, up = hidden.chunk(2, dim=-1)
        hidden = act_fn(gate) * up
    else:
        hidden = act_fn(hidden)
    out = project(down, hidden, expert_ids) * top_k_weights.reshape(-1, 1)
    return out.view(-1, top_k, out.shape[-1]).sum(dim=1).to(hidden_states.dtype)


class RaBiTExperts(torch.nn.Module):
    """Packed MoE experts: ``forward(hidden_states [T, H], top_k_index, top_k_weights [T, top_k]) -> [T, H]`` as
    :func:`route_tokens`, each projection through ``rabit::residual_binary_experts`` (the packed op on every routed
    expert's rows).

    Per projection ``P`` (``gate_up_proj`` / ``up_proj``, ``down_proj``): buffers ``P``, the sign words int32
    ``[E, k, N, ceil(K/32)]``, ``P_row_scale [E, k, N]``, ``P_col_scale [E, k, K]``; ``P_bias [E, N]`` (a
    parameter) or None. The sign words sit under the fp parameter's own name, so a checkpoint of this module loaded by
    the fp architecture fails on the shape instead of silently keeping random experts.
    """

    def __init__(self, projections: dict[str, PackedExperts], activation: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.projections = tuple(projections)
        if self.projections not in (GATED, UNGATED):
            raise ValueError(f"projections must be {GATED} or {UNGATED}, got {self.projections}")
        self.activation = activation
        self.act_fn = ACT2FN[activation]
        self.in_features = {name: packed.in_features for name, packed in projections.items()}
        self.num_experts = projections["down_proj"].packed_signs.shape[0]
        for name, packed in projections.items():
            self.register_buffer(name, packed.packed_signs)
            self.register_buffer(f"{name}_row_scale", packed.row_scale)
            self.register_buffer(f"{name}_col_scale", packed.col_scale)
            bias = None if packed.bias is None else torch.nn.Parameter(packed.bias.detach(),
                                                                        requires_grad=packed.bias.requires_grad)
            setattr(self, f"{name}_bias", bias)

    def packed(self, projection: str) -> PackedExperts:
        return PackedExperts(getattr(self, projection), getattr(self, f"{projection}_row_scale"),
                             getattr(self, f"{projection}_col_scale"), getattr(self, f"{projection}_bias"),
                             self.in_features[projection])

    def expert(self, projection: str, expert: int) -> PackedResidualBinary:
        """One expert's projection in packed format v1 (views)."""
        packed = self.packed(projection)
        return PackedResidualBinary(packed.packed_signs[expert], packed.row_scale[expert], packed.col_scale[expert],
                                    None if packed.bias is None else packed.bias[expert], packed.in_features)

    @property
    def layout(self) -> ExpertsLayout:
        """The :class:`ExpertsLayout` of these experts (the packed planes are ``[N, K]``: not transposed)."""
        return ExpertsLayout(self.num_experts, self.projections, False, self.activation)

    def _project(self, projection: str, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        packed = self.packed(projection)
        return torch.ops.rabit.residual_binary_experts(rows, expert_ids, packed.packed_signs, packed.row_scale,
                                                       packed.col_scale, packed.bias, packed.in_features)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return route_tokens(hidden_states, top_k_index, top_k_weights, self.projections, self.act_fn, self._project)

    def dequantize(self, projection: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [E, N, K]`` of one projection."""
        return torch.stack([self.expert(projection, expert).dequantize(dtype) for expert in range(self.num_experts)])

    def metadata(self) -> dict[str, Any]:
        """What :meth:`from_metadata` needs to rebuild this module empty (see :mod:`rabit_compiler.serialization`)."""
        from rabit_compiler.quantize import dtype_name  # imports this module

        first = self.packed(self.projections[0])
        shapes = {name: {"paths": getattr(self, name).shape[1], "out_features": getattr(self, name).shape[2],
                         "in_features": self.in_features[name]} for name in self.projections}
        return {"num_experts": self.num_experts, "activation": self.activation, "projections": shapes,
                "scale_dtype": dtype_name(first.row_scale.dtype),
                "bias_dtype": None if first.bias is None else dtype_name(first.bias.dtype)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> RaBiTExperts:
        """An uninitialised module of the recorded shapes and dtypes, on the current default device."""
        scale_dtype = getattr(torch, metadata["scale_dtype"])
        bias_dtype = None if metadata["bias_dtype"] is None else getattr(torch, metadata["bias_dtype"])
        shapes = metadata["projections"]
        order = GATED if "gate_up_proj" in shapes else UNGATED  # JSON may reorder the keys
        if set(shapes) != set(order):
            raise ValueError(f"projections must be {GATED} or {UNGATED}, got {sorted(shapes)}")
        projections = {name: PackedExperts.empty(metadata["num_experts"], shapes[name]["paths"],
                                                 shapes[name]["out_features"], shapes[name]["in_features"],
                                                 scale_dtype, bias_dtype) for name in order}
        return cls(projections, metadata["activation"])

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{name}: k={getattr(self, name).shape[1]} {getattr(self, name).shape[2]}x"
                           f"{self.in_features[name]}" for name in self.projections)
        return f"num_experts={self.num_experts}, {shapes}, activation={self.activation}"


ExpertStatistics = dict[str, CapturedLinear]
"""``<experts>.<e>.<proj>`` -> the expert projection as a linear (its ``[N, K]`` weight view) with its statistics."""


def expert_linears(module: torch.nn.Module, name: str, layout: ExpertsLayout,
                   input_grams: bool = False) -> ExpertStatistics:
    """Every expert projection of ``module`` as a :class:`CapturedLinear` without statistics (an ``X^T X``
    accumulator when ``input_grams``)."""
    linears = {}
    for projection in layout.projections:
        for expert, weight in enumerate(layout.oriented(module, projection)):
            layer = f"{name}.{expert}.{projection}"
            linears[layer] = CapturedLinear(layer, weight, None, "out_in", input_gram=InputGram() if input_grams
                                            else None)
    return linears


def check_projection_paths(config: RaBiTConfig, name: str, layout: ExpertsLayout, projection: str) -> None:
    """Raise if ``layer_paths`` gives the experts of one projection different k (their planes are stacked)."""
    paths = {config.paths_for(f"{name}.{expert}.{projection}") for expert in range(layout.num_experts)}
    if len(paths) > 1:
        raise ValueError(f"RaBiTConfig.layer_paths gives the experts of {name}.{projection} different k "
                         f"{sorted(paths)}: their planes are stacked, one k per projection")


def skip_experts_reason(config: RaBiTConfig, name: str, layout: ExpertsLayout) -> str | None:
    """``"matches a skip pattern"`` when every expert projection's name does, None when none does; a module is packed
    whole or not at all, so a pattern matching only some of them raises."""
    names = layout.layer_names(name)
    skipped = [layer for layer in names if config.skips(layer)]
    if skipped and len(skipped) != len(names):
        raise ValueError(f"RaBiTConfig.skip matches {len(skipped)} of the {len(names)} expert projections of {name} "
                         f"(e.g. {skipped[0]}): an experts module is packed whole or left in full precision")
    return "matches a skip pattern" if skipped else None


def fit_experts(module: torch.nn.Module, name: str, layout: ExpertsLayout, config: RaBiTConfig,
                statistics: ExpertStatistics | None = None) -> dict[str, list]:
    """``{proj: [fit of expert e]}``: k paths of every expert's ``[N, K]`` slice (one :func:`fit_linear` call each,
    with the expert's ``statistics`` when given)."""
    linears = expert_linears(module, name, layout) if statistics is None else statistics
    fits: dict[str, list] = {}
    for projection in layout.projections:
        check_projection_paths(config, name, layout, projection)
        layers = [f"{name}.{expert}.{projection}" for expert in range(layout.num_experts)]
        fits[projection] = [fit_linear(linears[layer], config.for_layer(layer)) for layer in layers]
    return fits


def pack_experts(module: torch.nn.Module, name: str, layout: ExpertsLayout, config: RaBiTConfig,
                 statistics: ExpertStatistics | None = None) -> RaBiTExperts:
    """The :class:`RaBiTExperts` of ``module`` (see :func:`fit_experts`), scales in ``config.scale_dtype``."""
    fits = fit_experts(module, name, layout, config, statistics)
    biases = {projection: getattr(module, f"{projection}_bias", None) for projection in layout.projections}
    return packed_experts(fits, biases, layout.activation, config, getattr(module, layout.projections[0]).device)


def packed_experts(fits: dict[str, list], biases: dict[str, torch.Tensor | None], activation: str,
                   config: RaBiTConfig, device: torch.device) -> RaBiTExperts:
    """Pack per-expert fits ``{proj: [ResidualBinaryPaths of expert e]}`` and biases ``{proj: [E, N] or None}``
    (in forward order) into a :class:`RaBiTExperts` on ``device``."""
    return RaBiTExperts({projection: PackedExperts.stack([pack_fit(fit, config, device=device) for fit in experts],
                                                         biases[projection])
                         for projection, experts in fits.items()}, activation)


def capture_with_experts(model: torch.nn.Module, example_input: torch.Tensor,
                         calibration: torch.Tensor | Iterable[torch.Tensor] | None,
                         layouts: dict[str, ExpertsLayout], progress: bool, input_grams: bool = False,
                         expert_grams: bool = False) -> tuple[LinearCapture, ExpertStatistics | None]:
    """:func:`~rabit_compiler.calibration.capture_linears` (``X^T X`` of the linears when ``input_grams``), and with
    ``calibration`` the statistics of the experts of the modules ``layouts`` names (see :func:`expert_statistics`;
    their ``X^T X`` when ``expert_grams``)."""
    if calibration is None:
        return capture_linears(model, example_input, progress=progress), None
    with expert_statistics(model, layouts, expert_grams) as statistics:
        capture = capture_linears(model, example_input, calibration, progress=progress, input_grams=input_grams)
    log_unseen_experts(statistics)
    return capture, statistics


class _CalibratingExperts(torch.nn.Module):
    """Stands in for an experts module while calibration runs: its fp forward, eagerly (a graph break under Dynamo),
    recording per expert and projection the statistics :class:`~rabit_compiler.calibration.CapturedLinear` records
    (input magnitude; gradient of the output when gradients are on, else the output's magnitude)."""

    def __init__(self, experts: torch.nn.Module, name: str, layout: ExpertsLayout, statistics: ExpertStatistics):
        super().__init__()
        self.experts, self.name, self.layout, self.statistics = experts, name, layout, statistics

    def _project(self, projection: str, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        weights = self.layout.oriented(self.experts, projection)
        bias = getattr(self.experts, f"{projection}_bias", None)

        def one_expert(expert: int, x: torch.Tensor) -> torch.Tensor:
            linear = self.statistics[f"{self.name}.{expert}.{projection}"]
            linear.input_stat.update(x)
            if linear.input_gram is not None:
                linear.input_gram.update(x)
            y = F.linear(x, weights[expert], None if bias is None else bias[expert])
            if not torch.is_grad_enabled():
                linear.output_stat.update(y)
                return y
            y = y.detach().requires_grad_(True)
            y.register_hook(linear.output_stat.update)
            return y

        return apply_per_expert(rows, expert_ids, self.layout.num_experts, weights.shape[1], one_expert)

    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return route_tokens(hidden_states, top_k_index, top_k_weights, self.layout.projections, self.experts.act_fn,
                            self._project)


@contextmanager
def expert_statistics(model: torch.nn.Module, layouts: dict[str, ExpertsLayout],
                      input_grams: bool = False) -> Iterator[ExpertStatistics]:
    """While active, the experts modules ``layouts`` names record calibration statistics (see
    :class:`_CalibratingExperts`; ``X^T X`` too when ``input_grams``) into the yielded dict; the modules are put
    back on exit."""
    from rabit_compiler.quantize import set_submodule  # imports this module

    statistics: ExpertStatistics = {}
    originals = {name: model.get_submodule(name) for name in layouts}
    for name, layout in layouts.items():
        statistics.update(expert_linears(originals[name], name, layout, input_grams))
        set_submodule(model, name, _CalibratingExperts(originals[name], name, layout, statistics))
    try:
        yield statistics
    finally:
        for name, module in originals.items():
            set_submodule(model, name, module)


def log_not_sequential(layouts: dict[str, ExpertsLayout]) -> None:
    """Sequential calibration (``RaBiTConfig.sequential``) is for ``nn.Linear`` modules: say so for the experts."""
    if layouts:
        logger.info("rabit: sequential calibration fits nn.Linear modules block by block; the experts of %d modules "
                    "are fitted from the unquantized model's statistics", len(layouts))


def log_unseen_experts(statistics: ExpertStatistics) -> None:
    """Log the expert projections that no calibration row reached (fitted data-free)."""
    unseen = [layer for layer, linear in statistics.items() if linear.input_stat.rows == 0]
    if unseen:
        logger.info("rabit: %d of %d expert projections saw no calibration tokens and are fitted data-free (e.g. %s)",
                    len(unseen), len(statistics), unseen[0])


def quantize_experts_(model: torch.nn.Module, layouts: dict[str, ExpertsLayout], config: RaBiTConfig,
                      statistics: ExpertStatistics | None = None, progress: bool = True
                      ) -> tuple[list[str], dict[str, str]]:
    """Replace the experts modules ``layouts`` names by their :class:`RaBiTExperts` in place (the fp weights are
    dropped). Returns the packed expert projections' names and those left in full precision with the reason."""
    from rabit_compiler.quantize import set_submodule  # imports this module

    quantized, skipped = [], {}
    for name, layout in tqdm(layouts.items(), desc="rabit: fit + pack experts", disable=not progress):
        reason = skip_experts_reason(config, name, layout)
        if reason is None:
            set_submodule(model, name, pack_experts(model.get_submodule(name), name, layout, config, statistics))
            quantized.extend(layout.layer_names(name))
        else:
            skipped.update(dict.fromkeys(layout.layer_names(name), reason))
    return quantized, skipped
