"""The FX passes of the rabit compiler, one job per module: find, rewrite, freeze & pack, fuse, CPU lowering,
grouped-query decode attention."""

from .find import (
    ROUTER_REASON,
    GraphWeights,
    LinearSite,
    SkippedSite,
    find_linears,
    selects_experts,
    weight_used_elsewhere,
)
from .freeze import PackedLinearWeights, PackedSite, freeze_and_pack
from .fuse import FusedMember, PackedSiblingWeights, fuse_siblings
from .lower import LoweredCall, lower_for_cpu
from .rewrite import ResidualBinaryScales, RewrittenSite, rewrite_linears

__all__ = [
    "ROUTER_REASON",
    "FusedMember",
    "GraphWeights",
    "LinearSite",
    "LoweredCall",
    "PackedLinearWeights",
    "PackedSiblingWeights",
    "PackedSite",
    "ResidualBinaryScales",
    "RewrittenSite",
    "SkippedSite",
    "find_linears",
    "freeze_and_pack",
    "fuse_siblings",
    "lower_for_cpu",
    "rewrite_linears",
    "selects_experts",
    "weight_used_elsewhere",
]
