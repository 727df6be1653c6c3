"""The FX passes of the rabit compiler, one job per module: find, rewrite, freeze & pack, fuse siblings."""

from .find import GraphWeights, LinearSite, SkippedSite, find_linears, weight_used_elsewhere
from .freeze import PackedLinearWeights, PackedSite, freeze_and_pack
from .fuse import FusedMember, PackedSiblingWeights, fuse_siblings
from .rewrite import ResidualBinaryScales, RewrittenSite, rewrite_linears

__all__ = [
    "FusedMember",
    "GraphWeights",
    "LinearSite",
    "PackedLinearWeights",
    "PackedSiblingWeights",
    "PackedSite",
    "ResidualBinaryScales",
    "RewrittenSite",
    "SkippedSite",
    "find_linears",
    "freeze_and_pack",
    "fuse_siblings",
    "rewrite_linears",
    "weight_used_elsewhere",
]
