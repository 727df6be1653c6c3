"""Packed residual-binary format, its reference implementation, the Triton kernels and the ``rabit::`` ops."""

if __name__ != "rabit_compiler.kernels":
    # This folder imported as a top-level ``kernels``: the repository root is on sys.path (pytest, scripts run from
    # the checkout) and transformers imports any ``kernels`` it finds while probing for Hugging Face's package of
    # that name. Hand out the installed package instead of a second copy of its modules, which would register the
    # rabit:: ops a second time and split module state (compiled-kernel caches, patched functions) in two.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("rabit_compiler.kernels")
else:
    from .cpu_lowering import residual_binary_linear_cpu, residual_binary_linear_siblings_cpu
    from .experts import residual_binary_experts
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
    from .weight_only import weight_only_linear

    __all__ = [
        "FORMAT_VERSION",
        "PackedResidualBinary",
        "pack_paths",
        "pack_signs",
        "residual_binary_experts",
        "residual_binary_linear",
        "residual_binary_linear_cpu",
        "residual_binary_linear_reference",
        "residual_binary_linear_siblings",
        "residual_binary_linear_siblings_cpu",
        "residual_binary_linear_siblings_reference",
        "unpack_signs",
        "weight_only_linear",
        "words_per_row",
    ]
