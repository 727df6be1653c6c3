"""From one full-precision weight to its packed residual-binary form (shared by quantize_ and the backend)."""

from __future__ import annotations

import logging
import weakref

import torch

from rabit_compiler.calibration import CapturedLinear
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.fit import Objective, alternating_fit, check_fit, coupled_fit, dampened, error_feedback_fit
from rabit_compiler.kernels import PackedResidualBinary, pack_paths
from rabit_compiler.math import ResidualBinaryPaths, fit_residual_binary, precondition_scales

logger = logging.getLogger("rabit_compiler")


def fit_weight(
    weight: torch.Tensor,
    config: RaBiTConfig,
    input_stat: torch.Tensor | None = None,
    output_stat: torch.Tensor | None = None,
    input_gram: torch.Tensor | None = None,
) -> ResidualBinaryPaths:
    """Fit ``config.paths`` binary paths to ``weight [N, K]`` by ``config.fit`` (see :class:`RaBiTConfig`).

    Every fit starts from residual SVID (``config.rounds`` iterative rounds; greedy for ``"coupled"``) of the
    weight preconditioned by the channel statistics ``input_stat [K]`` / ``output_stat [N]`` (raised to
    ``alpha_in`` / ``alpha_out``) and lowers the objective :func:`fit_objective` builds; ``input_gram [K, K]``
    (``X^T X`` of the calibration inputs) is what the ``"hessian"`` objective needs.
    """
    weight = weight.detach()
    input_importance, output_importance = precondition_scales(
        input_stat, output_stat, config.alpha_in, config.alpha_out
    )
    rounds = 0 if config.fit == "coupled" else config.rounds
    start = fit_residual_binary(weight, config.paths, rounds, input_importance, output_importance)
    if config.fit == "svid":
        return start
    objective = fit_objective(config, input_importance, output_importance, input_gram)
    if config.fit == "als":
        fit = alternating_fit(weight, start, objective, config.fit_rounds)
    elif config.fit == "coupled":
        fit = coupled_fit(weight, start, objective, config.fit_rounds)
    elif objective.separable:
        fit = alternating_fit(weight, start, objective, config.fit_rounds)
    else:
        fit = error_feedback_fit(weight, start, objective, config.fit_rounds, config.block_size)
    return check_fit(fit)


def fit_objective(config: RaBiTConfig, input_importance: torch.Tensor | None,
                  output_importance: torch.Tensor | None, input_gram: torch.Tensor | None) -> Objective:
    """The objective of :mod:`rabit_compiler.fit` for ``config.objective``: rows weighted by
    ``output_importance^2``; columns by ``input_importance^2`` (``"diag"``) or the dampened ``input_gram``
    (``"hessian"``; without it, as ``"diag"``: the caller logs the data-free case)."""
    row_weight = None if output_importance is None else output_importance.square()
    if config.objective == "hessian" and input_gram is not None:
        return Objective(row_weight, dampened(input_gram, config.damp))
    return Objective(row_weight, None if input_importance is None else input_importance.square())


def fit_linear(linear: CapturedLinear, config: RaBiTConfig) -> ResidualBinaryPaths:
    """:func:`fit_weight` of a captured linear's weight (as ``[N, K]``) with its calibration statistics;
    ``config`` is the layer's own (:meth:`RaBiTConfig.for_layer`)."""
    oriented = linear.weight.detach().T if linear.layout == "in_out" else linear.weight.detach()
    gram = None if linear.input_gram is None else linear.input_gram.mean()
    if config.needs_input_gram and gram is None and linear.input_stat.rows:
        logger.info("rabit: %s: no X^T X was collected (not a linear module); fitting with the diagonal objective",
                    linear.name)
    return fit_weight(oriented, config, linear.input_stat.summary(config.statistic),
                      linear.output_stat.summary(config.statistic), gram)


def pack_fit(fit: ResidualBinaryPaths, config: RaBiTConfig, device: torch.device | None = None) -> PackedResidualBinary:
    """Pack a fit's signs and scales (scales in ``config.scale_dtype``)."""
    packed = pack_paths(fit.signs, fit.row_scales, fit.col_scales, None, config.scale_dtype)
    if device is not None:
        packed.packed_signs = packed.packed_signs.to(device)
        packed.row_scale = packed.row_scale.to(device)
        packed.col_scale = packed.col_scale.to(device)
    return packed


class DataFreePackCache:
    """Packs weights data-free and remembers the result per (tensor, version, config), so a recompile
    (a new sequence length, a graph break) does not refit. Entries die with their tensor."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int, tuple, PackedResidualBinary]] = {}

    def get(self, weight: torch.Tensor, oriented: torch.Tensor, config: RaBiTConfig) -> PackedResidualBinary:
        key = id(weight)
        entry = self._entries.get(key)
        if entry is not None:
            ref, version, fit_key, packed = entry
            if ref() is weight and version == weight._version and fit_key == config.fit_key():
                return packed
        packed = pack_fit(fit_weight(oriented, config), config, device=weight.device)
        self._entries[key] = (weakref.ref(weight, lambda _, key=key: self._entries.pop(key, None)),
                              weight._version, config.fit_key(), packed)
        return packed

    def __len__(self) -> int:
        return len(self._entries)


PACK_CACHE = DataFreePackCache()
