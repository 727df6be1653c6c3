"""The FX passes of the rabit compiler, one job per module: find, rewrite, freeze & pack."""

from .find import GraphWeights, LinearSite, SkippedSite, find_linears, weight_used_elsewhere
from .freeze import PackedLinearWeights, PackedSite, freeze_and_pack
from .rewrite import ResidualBinaryScales, RewrittenSite, rewrite_linears

__all__ = [
    "GraphWeights",
    "LinearSite",
    "PackedLinearWeights",
    "PackedSite",
    "ResidualBinaryScales",
    "RewrittenSite",
    "SkippedSite",
    "find_linears",
    "freeze_and_pack",
    "rewrite_linears",
    "weight_used_elsewhere",
]
