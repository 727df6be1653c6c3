"""Packed residual-binary format, its reference implementation and the ``rabit::`` torch.library ops."""

from .ops import residual_binary_linear
from .packing import (
    FORMAT_VERSION,
    PackedResidualBinary,
    pack_paths,
    pack_signs,
    unpack_signs,
    words_per_row,
)
from .reference import residual_binary_linear_reference

__all__ = [
    "FORMAT_VERSION",
    "PackedResidualBinary",
    "pack_paths",
    "pack_signs",
    "residual_binary_linear",
    "residual_binary_linear_reference",
    "unpack_signs",
    "words_per_row",
]
