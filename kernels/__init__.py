"""Packed residual-binary format, its reference implementation, the Triton kernels and the ``rabit::`` ops."""

from .cpu_lowering import residual_binary_linear_cpu, residual_binary_linear_siblings_cpu
from .ops import residual_binary_linear, residual_binary_linear_siblings
from .packing import (
    FORMAT_VERSION,
    PackedResidualBinary,
    pack_paths,
    pack_signs,
    unpack_signs,
    words_per_row,
)
from .reference import residual_binary_linear_reference, residual_binary_linear_siblings_reference

__all__ = [
    "FORMAT_VERSION",
    "PackedResidualBinary",
    "pack_paths",
    "pack_signs",
    "residual_binary_linear",
    "residual_binary_linear_cpu",
    "residual_binary_linear_reference",
    "residual_binary_linear_siblings",
    "residual_binary_linear_siblings_cpu",
    "residual_binary_linear_siblings_reference",
    "unpack_signs",
    "words_per_row",
]
