"""From one full-precision weight to its packed residual-binary form (shared by quantize_ and the backend)."""

from __future__ import annotations

import logging
import weakref

import torch

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.kernels import PackedResidualBinary, pack_paths
from rabit_compiler.math import ResidualBinaryPaths, fit_residual_binary, precondition_scales

logger = logging.getLogger("rabit_compiler")


def fit_weight(
    weight: torch.Tensor,
    config: RaBiTConfig,
    input_stat: torch.Tensor | None = None,
    output_stat: torch.Tensor | None = None,
) -> ResidualBinaryPaths:
    """Initialise ``config.paths`` binary paths for ``weight [N, K]``: iterative residual SVID
    (``config.rounds``), preconditioned by channel statistics ``input_stat [K]`` / ``output_stat [N]``
    when given (raised to ``alpha_in`` / ``alpha_out``)."""
    input_importance, output_importance = precondition_scales(
        input_stat, output_stat, config.alpha_in, config.alpha_out
    )
    return fit_residual_binary(weight.detach(), config.paths, config.rounds, input_importance, output_importance)


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
