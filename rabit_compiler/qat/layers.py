"""The training form of a residual-binary linear, and the model-level swaps around it.

:class:`ResidualBinaryTrainLinear` computes ``y = x @ W_hat.T (+ b)`` with ``W_hat [N, K]`` re-derived from
its trainable tensors on every forward, by one of four methods (a switch, not four classes):

- ``"rabit"`` (coupled): one latent ``W_FP [N, K]``, ``row_scale [k, N]``, ``col_scale [k, K]``;
  ``W_hat = coupled_residual_weight(W_FP, g, h)`` (``B_i = sign(R_{i-1})``, ``R_0 = W_FP``).
- ``"standard"``: k independent latents ``W_i [N, K]``; ``W_hat = sum_i g_i * sign(W_i) * h_i``.
- ``"frozen"``: paths ``< k`` are buffers fixed at their initial signs and scales; only the last path is
  trained: ``W_hat = sum_{j<k} path_j + g_k * sign(W_FP - sum_{j<k} path_j) * h_k``.
- ``"scales"``: every sign fixed at the fit (int8 buffers); only ``g``, ``h`` (and the bias) train: the end-to-end
  scale tuning of a PTQ fit, ``2k(N + K)`` numbers per layer, through :func:`~rabit_compiler.qat.fixed_signs.
  fixed_signs_linear` (which rebuilds ``W_hat`` in the backward instead of keeping it).

All use the identity straight-through estimator and start from the same fit (:func:`~rabit_compiler.quantizer.
fit_weight`, as :func:`rabit_compiler.quantize_` uses), reproduced exactly at step 0. The coupled latent
starts either re-anchored inside the fit's sign intervals (:func:`~rabit_compiler.math.reanchor_latent`, any
fit) or at the original weight (``latent_init="weight"``, for fits that obey the coupled sign rule: the
``"coupled"`` fit). :func:`prepare_qat` swaps a model's linears for them (and MoE experts modules for
:class:`ResidualBinaryTrainExperts`, one such layer per expert and projection), :func:`convert` packs the trained
layers into :class:`~rabit_compiler.quantize.RaBiTLinear` / :class:`~rabit_compiler.experts.RaBiTExperts`, and
:func:`rtn_` is the round-to-nearest baseline.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from rabit_compiler.calibration import CapturedLinear
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.experts import (
    ExpertsLayout,
    ExpertStatistics,
    RaBiTExperts,
    capture_with_experts,
    find_experts,
    fit_experts,
    log_not_sequential,
    packed_experts,
    route_tokens,
    skip_experts_reason,
)
from rabit_compiler.integrations.transformers import mark_quantized
from rabit_compiler.kernels import PackedResidualBinary
from rabit_compiler.kernels.experts import apply_per_expert
from rabit_compiler.kernels.packing import unpack_signs
from rabit_compiler.math import (
    ResidualBinaryPaths,
    binary_path,
    coupled_residual_signs,
    coupled_residual_weight,
    hard_sign,
    reanchor_latent,
    rtn_dequantized,
    sign_preserving_latents,
    standard_residual_weight,
)
from rabit_compiler.qat.fixed_signs import fixed_signs_linear
from rabit_compiler.quantize import RaBiTLinear, default_example_input, set_submodule, skip_reason
from rabit_compiler.quantizer import fit_linear, pack_fit
from rabit_compiler.sequential import fit_in_block_order

logger = logging.getLogger("rabit_compiler")

METHODS = ("rabit", "standard", "frozen", "scales")
LATENT_INITS = ("reanchor", "weight")
COUPLED_METHODS = ("rabit", "frozen")  # the methods whose paths derive from one shared latent


class ResidualBinaryTrainLinear(torch.nn.Module):
    """A linear layer in QAT form (see the module docstring for the three ``method`` values).

    Built from an initial ``fit`` (k paths of the weight ``[N, K]``) and the layer's ``bias [N]`` or None.
    The latent of ``"rabit"`` / ``"frozen"`` is ``latent [N, K]`` when given (the original weight; the coupled
    forward from it must reproduce ``fit``'s signs exactly, else ValueError), else re-anchored
    (:func:`~rabit_compiler.math.reanchor_latent`, placed by ``anchor_margin`` in its sign-feasible interval).
    """

    def __init__(self, fit: ResidualBinaryPaths, bias: torch.Tensor | None, method: str = "rabit",
                 anchor_margin: float = 0.5, latent: torch.Tensor | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "frozen" and fit.num_paths < 2:
            raise ValueError("path freezing needs at least 2 paths (the last one is trained)")
        self.method = method
        self.num_paths = fit.num_paths
        self.out_features, self.in_features = fit.signs.shape[1:]
        row_scales, col_scales = fit.row_scales.float(), fit.col_scales.float()
        if latent is not None and method not in COUPLED_METHODS:
            raise ValueError(f"a given latent (latent_init='weight') needs method 'rabit' or 'frozen', not {method!r}")
        if method == "standard":
            self.latents = torch.nn.ParameterList(sign_preserving_latents(fit).unbind(0))
        elif method == "scales":
            self.register_buffer("signs", fit.signs.to(torch.int8))
        elif latent is not None:
            if not latent.is_floating_point() or latent.shape != fit.signs.shape[1:]:
                raise ValueError(f"latent_init='weight' needs the full-precision weight {tuple(fit.signs.shape[1:])}, "
                                 f"got {latent.dtype} {tuple(latent.shape)}")
            latent = latent.detach().float().clone()
            signs = torch.stack(coupled_residual_signs(latent, row_scales, col_scales))
            mismatched = int((signs != fit.signs).any(dim=0).sum())
            if mismatched:
                raise ValueError(f"the coupled forward from the given latent misses the fit's signs at {mismatched} "
                                 f"of {latent.numel()} entries: latent_init='weight' needs the 'coupled' fit")
            self.latent = torch.nn.Parameter(latent)
        else:
            latent, mismatched = reanchor_latent(fit, anchor_margin)
            if mismatched:
                logger.warning("rabit: re-anchored latent misses %d of %d initial signs (k=%d paths)",
                               mismatched, latent.numel(), fit.num_paths)
            self.latent = torch.nn.Parameter(latent)
        if method == "frozen":
            self.register_buffer("frozen_signs", fit.signs[:-1].float().clone())
            self.register_buffer("frozen_row_scale", row_scales[:-1].clone())
            self.register_buffer("frozen_col_scale", col_scales[:-1].clone())
            row_scales, col_scales = row_scales[-1:], col_scales[-1:]
        self.row_scale = torch.nn.Parameter(row_scales.clone())
        self.col_scale = torch.nn.Parameter(col_scales.clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone())

    def _frozen_paths(self) -> list[torch.Tensor]:
        return [binary_path(s, g, h) for s, g, h in
                zip(self.frozen_signs, self.frozen_row_scale, self.frozen_col_scale, strict=True)]

    def _frozen_residual(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(W_FP - sum_{j<k} path_j, frozen paths)``, subtracted in path order as the coupled forward does."""
        paths = self._frozen_paths()
        residual = self.latent
        for path in paths:
            residual = residual - path
        return residual, paths

    def quantized_weight(self) -> torch.Tensor:
        """``W_hat [N, K]`` (fp32), with the straight-through gradient to the latent(s)."""
        if self.method == "rabit":
            return coupled_residual_weight(self.latent, self.row_scale, self.col_scale)
        if self.method == "standard":
            return standard_residual_weight(list(self.latents), self.row_scale, self.col_scale)
        if self.method == "scales":
            return ResidualBinaryPaths(self.signs, self.row_scale, self.col_scale).dequantize()
        residual, paths = self._frozen_residual()
        return sum(paths) + coupled_residual_weight(residual, self.row_scale, self.col_scale)

    def current_paths(self) -> ResidualBinaryPaths:
        """The k paths the forward uses now (detached): ``signs [k, N, K]``, scales ``[k, N]``, ``[k, K]``."""
        with torch.no_grad():
            if self.method == "rabit":
                signs = coupled_residual_signs(self.latent, self.row_scale, self.col_scale)
                row_scales, col_scales = self.row_scale, self.col_scale
            elif self.method == "standard":
                signs = [hard_sign(latent) for latent in self.latents]
                row_scales, col_scales = self.row_scale, self.col_scale
            elif self.method == "scales":
                signs, row_scales, col_scales = list(self.signs), self.row_scale, self.col_scale
            else:
                residual, _ = self._frozen_residual()
                signs = [*self.frozen_signs, *coupled_residual_signs(residual, self.row_scale, self.col_scale)]
                row_scales = torch.cat([self.frozen_row_scale, self.row_scale])
                col_scales = torch.cat([self.frozen_col_scale, self.col_scale])
            return ResidualBinaryPaths(torch.stack(signs), row_scales.detach().clone(), col_scales.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.method == "scales":
            y = fixed_signs_linear(x, self.signs, self.row_scale, self.col_scale)
            return y if bias is None else y + bias
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, paths={self.num_paths}, "
                f"method={self.method}, bias={self.bias is not None}")


class ResidualBinaryTrainExperts(torch.nn.Module):
    """MoE experts in QAT form: projection ``P`` of expert ``e`` is the :class:`ResidualBinaryTrainLinear` child
    ``<e>.<P>`` (named like the expert layer ``<experts>.<e>.<P>`` of :mod:`rabit_compiler.experts`), applied to the
    rows the router sends to ``e``; the forward is :func:`~rabit_compiler.experts.route_tokens`, routing unchanged.
    Built from the experts ``module`` (fp, or a packed :class:`~rabit_compiler.experts.RaBiTExperts`; its biases and
    activation are kept), its ``layout`` and the per-expert ``fits`` by layer name; ``latent_init="weight"`` starts
    each coupled latent at the expert's fp weight."""

    def __init__(self, module: torch.nn.Module, name: str, layout: ExpertsLayout, fits: dict[str, ResidualBinaryPaths],
                 method: str, anchor_margin: float, latent_init: str = "reanchor"):
        super().__init__()
        missing = [layer for layer in layout.layer_names(name) if layer not in fits]
        if missing:
            raise ValueError(f"no fits for {len(missing)} expert layers of {name} (e.g. {missing[0]})")
        self.projections, self.activation, self.num_experts = layout.projections, layout.activation, layout.num_experts
        self.act_fn = module.act_fn
        for expert in range(layout.num_experts):
            layers = {}
            for projection in layout.projections:
                weight = layout.oriented(module, projection)[expert]
                bias = getattr(module, f"{projection}_bias", None)
                layers[projection] = ResidualBinaryTrainLinear(
                    _on(fits[f"{name}.{expert}.{projection}"], weight.device), None if bias is None else bias[expert],
                    method, anchor_margin, weight if latent_init == "weight" else None)
            self.add_module(str(expert), torch.nn.ModuleDict(layers))

    def layer(self, expert: int, projection: str) -> ResidualBinaryTrainLinear:
        return self._modules[str(expert)][projection]

    def _project(self, projection: str, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return apply_per_expert(rows, expert_ids, self.num_experts, self.layer(0, projection).out_features,
                                lambda expert, x: self.layer(expert, projection)(x))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return route_tokens(hidden_states, top_k_index, top_k_weights, self.projections, self.act_fn, self._project)

    def packed(self, config: RaBiTConfig) -> RaBiTExperts:
        """The :class:`~rabit_compiler.experts.RaBiTExperts` holding the current signs and scales."""
        fits, biases = {}, {}
        for projection in self.projections:
            layers = [self.layer(expert, projection) for expert in range(self.num_experts)]
            fits[projection] = [layer.current_paths() for layer in layers]
            has_bias = layers[0].bias is not None
            biases[projection] = torch.stack([layer.bias.detach() for layer in layers]) if has_bias else None
        return packed_experts(fits, biases, self.activation, config, layers[0].row_scale.device)


@dataclass
class LinearFits:
    """Initial fits of a model's swappable linears, by owner module name (``model.layers.0.mlp.up_proj``):
    ``fits[name]`` (CPU), and the linears left in full precision with the reason."""

    fits: dict[str, ResidualBinaryPaths] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def save_fits(fits: LinearFits, path: str | os.PathLike, settings: dict | None = None) -> None:
    """Write ``fits`` to one safetensors file (signs as int8; skipped layers and the JSON-able ``settings``
    that produced the fits, if given, in the metadata)."""
    tensors = {}
    for name, fit in fits.fits.items():
        tensors[f"{name}.signs"] = fit.signs.to(torch.int8).contiguous()
        tensors[f"{name}.row_scales"] = fit.row_scales.contiguous()
        tensors[f"{name}.col_scales"] = fit.col_scales.contiguous()
    save_file(tensors, str(path), metadata={"skipped": json.dumps(fits.skipped), "settings": json.dumps(settings)})


def fits_settings(path: str | os.PathLike) -> dict | None:
    """The ``settings`` a fits file was saved with (None if none were given)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata().get("settings", "null"))


def load_fits(path: str | os.PathLike) -> LinearFits:
    """Read fits written by :func:`save_fits`."""
    with safe_open(str(path), framework="pt") as handle:
        skipped = json.loads(handle.metadata()["skipped"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 -- not a dict
    names = {key.rsplit(".", 1)[0] for key in tensors}
    fits = {name: ResidualBinaryPaths(tensors[f"{name}.signs"].float(), tensors[f"{name}.row_scales"],
                                      tensors[f"{name}.col_scales"]) for name in sorted(names)}
    return LinearFits(fits=fits, skipped=skipped)


def _swappable_linears(model: torch.nn.Module, config: RaBiTConfig,
                       calibration: torch.Tensor | Iterable[torch.Tensor] | None, example_input: torch.Tensor | None,
                       progress: bool, sequential: bool = False, experts: dict[str, ExpertsLayout] | None = None
                       ) -> tuple[list[tuple[str, CapturedLinear]], dict[str, str], ExpertStatistics | None]:
    """``[(owner name, captured linear)]`` for every ``nn.Linear`` / GPT-2 ``Conv1D`` that the skip rules of
    :func:`~rabit_compiler.quantize_` allow, with calibration statistics when ``calibration`` is given (and
    ``X^T X`` when the fit needs it, unless ``sequential``: then the sequential pass takes it); the linears left out
    with the reason; with ``calibration``, the statistics of the ``experts`` modules' experts."""
    if example_input is None:
        example_input = default_example_input(model, calibration)
    capture, statistics = capture_with_experts(model, example_input, calibration, experts or {}, progress,
                                               config.needs_input_gram and not sequential, config.needs_input_gram)
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    chosen, skipped = [], {}
    for linear in capture.linears.values():
        reason = skip_reason(linear, config, names)
        if reason is None:
            owner_name, _, attr = names[id(linear.weight)].rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            is_conv1d = type(owner).__name__ == "Conv1D" and linear.layout == "in_out"
            if attr != "weight" or not (isinstance(owner, torch.nn.Linear) or is_conv1d):
                reason = f"QAT swaps nn.Linear / Conv1D owners only, not {type(owner).__name__}.{attr}"
        if reason is None:
            chosen.append((owner_name, linear))
        else:
            skipped[linear.name] = reason
    torch.compiler.reset()
    return chosen, skipped, statistics


def _on(fit: ResidualBinaryPaths, device: torch.device | str) -> ResidualBinaryPaths:
    return ResidualBinaryPaths(fit.signs.to(device), fit.row_scales.to(device), fit.col_scales.to(device))


def fit_linears(model: torch.nn.Module, config: RaBiTConfig | None = None,
                calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
                example_input: torch.Tensor | None = None, progress: bool = True) -> LinearFits:
    """Fit ``config.paths`` binary paths to every swappable linear of ``model`` (not modified) by ``config.fit``,
    with calibration statistics when ``calibration`` (token windows ``[num, T]``) is given. The same fit as
    :func:`~rabit_compiler.quantize_`, MoE experts included (one fit per expert layer ``<experts>.<e>.<proj>``, see
    :mod:`rabit_compiler.experts`)."""
    config = config or RaBiTConfig()
    sequential = config.sequential and calibration is not None
    layouts, left = find_experts(model)
    chosen, skipped, statistics = _swappable_linears(model, config, calibration, example_input, progress, sequential,
                                                     layouts)
    result = LinearFits(skipped={**skipped, **left})
    for name, layout in tqdm(layouts.items(), desc="rabit: fit experts", disable=not progress):
        reason = skip_experts_reason(config, name, layout)
        if reason is not None:
            result.skipped.update(dict.fromkeys(layout.layer_names(name), reason))
            continue
        for projection, fits in fit_experts(model.get_submodule(name), name, layout, config, statistics).items():
            result.fits.update({f"{name}.{expert}.{projection}": _on(fit, "cpu") for expert, fit in enumerate(fits)})

    def fit(owner_name: str, linear: CapturedLinear) -> None:
        result.fits[owner_name] = _on(fit_linear(linear, config.for_layer(linear.name)), "cpu")

    if sequential:
        log_not_sequential(layouts)
        originals: dict[str, torch.Tensor] = {}

        def fit_and_fake_quantize(owner_name: str, linear: CapturedLinear) -> None:
            """Fit, then leave the packed layer's weight in the model for the later blocks' statistics."""
            fit(owner_name, linear)
            layer_config = config.for_layer(linear.name)
            weight = pack_fit(result.fits[owner_name], layer_config, device=linear.weight.device).dequantize()
            originals[owner_name] = linear.weight.detach().clone()
            with torch.no_grad():
                linear.weight.copy_(weight.T if linear.layout == "in_out" else weight)

        try:
            fit_in_block_order(model, dict(chosen), calibration, config.needs_input_gram, fit_and_fake_quantize,
                               progress)
        finally:
            with torch.no_grad():
                for owner_name, weight in originals.items():
                    model.get_submodule(owner_name).weight.copy_(weight)
    for owner_name, linear in tqdm([c for c in chosen if c[0] not in result.fits], desc="rabit: fit",
                                   disable=not progress):
        fit(owner_name, linear)
    return result


def prepare_qat(model: torch.nn.Module, config: RaBiTConfig | None = None, method: str = "rabit",
                calibration: torch.Tensor | Iterable[torch.Tensor] | None = None, fits: LinearFits | None = None,
                example_input: torch.Tensor | None = None, progress: bool = True,
                latent_init: str = "reanchor") -> LinearFits:
    """Swap ``model``'s linears in place for :class:`ResidualBinaryTrainLinear` (``method`` in
    :data:`METHODS`), initialised from ``fits`` (computed by :func:`fit_linears` with ``calibration`` when not
    given). ``latent_init`` (``"rabit"`` / ``"frozen"``): ``"reanchor"`` puts the latent inside the fit's sign
    intervals (any fit); ``"weight"`` starts it at the original weight, with the fit made by the ``"coupled"``
    rule (``config.fit`` is overridden when the fits are computed here; given fits must obey the rule), so step 0
    is the coupled derivation of the true weight. MoE experts modules (fp, or packed by ``quantize_``) become
    :class:`ResidualBinaryTrainExperts` when ``fits`` has their expert layers. Everything else in the model is
    frozen (``requires_grad=False``): only the latents, scales and biases of the swapped layers train; what stays in
    full precision is logged with the reason. Returns the fits used."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if latent_init not in LATENT_INITS:
        raise ValueError(f"latent_init must be one of {LATENT_INITS}, got {latent_init!r}")
    if latent_init == "weight" and method not in COUPLED_METHODS:
        raise ValueError(f"latent_init='weight' applies to the coupled latent of 'rabit' / 'frozen', not {method!r}")
    config = config or RaBiTConfig()
    if fits is None:
        fit_config = replace(config, fit="coupled") if latent_init == "weight" else config
        fits = fit_linears(model, fit_config, calibration, example_input, progress)
    if not fits.fits:
        raise ValueError("no linear layer of the model can be trained in residual-binary form "
                         f"(skipped: {fits.skipped})")
    for p in model.parameters():
        p.requires_grad_(False)
    layouts = {**find_experts(model)[0],
               **{name: m.layout for name, m in model.named_modules() if isinstance(m, RaBiTExperts)}}
    expert_layers = {layer for name, layout in layouts.items() for layer in layout.layer_names(name)}
    for owner_name, fit in fits.fits.items():
        if owner_name in expert_layers:
            continue
        owner = model.get_submodule(owner_name)
        device = owner.row_scale.device if isinstance(owner, RaBiTLinear) else owner.weight.device
        latent = None
        if latent_init == "weight":
            latent = owner.weight.T if type(owner).__name__ == "Conv1D" else owner.weight
        set_submodule(model, owner_name,
                      ResidualBinaryTrainLinear(_on(fit, device), owner.bias, method, config.anchor_margin, latent))
    for name, layout in layouts.items():
        if not set(layout.layer_names(name)).isdisjoint(fits.fits):
            set_submodule(model, name, ResidualBinaryTrainExperts(model.get_submodule(name), name, layout, fits.fits,
                                                                  method, config.anchor_margin, latent_init))
    for name, reason in fits.skipped.items():
        logger.info("rabit: QAT leaves in full precision: %s (%s)", name, reason)
    return fits


def packed_fits(model: torch.nn.Module) -> LinearFits:
    """The fits held by a quantized model's :class:`~rabit_compiler.quantize.RaBiTLinear` layers (signs unpacked
    to int8 +-1, a quarter of fp32; scales in fp32), by layer name: ``prepare_qat(model, config, "scales",
    fits=packed_fits(model))`` tunes the scales of a model that :func:`~rabit_compiler.quantize_` packed."""
    fits = LinearFits()
    for name, module in model.named_modules():
        if isinstance(module, RaBiTLinear):
            fits.fits[name] = _unpacked(module.packed())
        elif isinstance(module, RaBiTExperts):
            fits.fits.update({f"{name}.{expert}.{projection}": _unpacked(module.expert(projection, expert))
                              for expert in range(module.num_experts) for projection in module.projections})
    return fits


def _unpacked(packed: PackedResidualBinary) -> ResidualBinaryPaths:
    """A packed layer's paths on the CPU: signs unpacked to int8, scales in fp32."""
    signs = unpack_signs(packed.packed_signs, packed.in_features, dtype=torch.int8)
    return ResidualBinaryPaths(signs.cpu(), packed.row_scale.float().cpu(), packed.col_scale.float().cpu())


def qat_layers(model: torch.nn.Module) -> dict[str, ResidualBinaryTrainLinear]:
    """The model's :class:`ResidualBinaryTrainLinear` modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ResidualBinaryTrainLinear)}


def convert(model: torch.nn.Module, config: RaBiTConfig | None = None) -> list[str]:
    """Replace every trained :class:`ResidualBinaryTrainLinear` in place by a packed
    :class:`~rabit_compiler.quantize.RaBiTLinear` (and every :class:`ResidualBinaryTrainExperts` by a
    :class:`~rabit_compiler.experts.RaBiTExperts`) holding its current signs and scales (in
    ``config.scale_dtype``), ready for the packed op, ``torch.compile(backend="rabit")`` and
    :func:`rabit_compiler.serialization.save` (the config is recorded on the model). Returns the converted
    layer names."""
    config = config or RaBiTConfig()
    converted = list(qat_layers(model))
    if not converted:
        raise ValueError("the model has no ResidualBinaryTrainLinear layers to convert (call prepare_qat first)")
    for name, experts in [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBinaryTrainExperts)]:
        set_submodule(model, name, experts.packed(config))
    for name, layer in qat_layers(model).items():
        packed = pack_fit(layer.current_paths(), config, device=layer.row_scale.device)
        bias = None if layer.bias is None else layer.bias.detach()
        set_submodule(model, name, RaBiTLinear(packed, bias))
    mark_quantized(model, config)
    return converted


def rtn_(model: torch.nn.Module, config: RaBiTConfig | None = None, bits: int = 2,
         example_input: torch.Tensor | None = None) -> LinearFits:
    """The RTN baseline, in place: every linear that :func:`prepare_qat` would swap gets its weight replaced
    by :func:`~rabit_compiler.math.rtn_dequantized` (per output channel, asymmetric min/max, ``2**bits``
    levels), kept as a dense float weight. Returns the skipped layers (``fits`` stays empty)."""
    config = config or RaBiTConfig()
    layouts, skipped = find_experts(model)
    for name, layout in layouts.items():
        skipped.update(dict.fromkeys(layout.layer_names(name), "the RTN baseline rounds nn.Linear / Conv1D weights"))
    chosen, linears_skipped, _ = _swappable_linears(model, config, None, example_input, progress=False)
    skipped.update(linears_skipped)
    with torch.no_grad():
        for _, linear in chosen:
            oriented = linear.weight.T if linear.layout == "in_out" else linear.weight
            quantized = rtn_dequantized(oriented, bits).to(linear.weight.dtype)
            linear.weight.copy_(quantized.T if linear.layout == "in_out" else quantized)
    return LinearFits(skipped=skipped)
