"""Merge primitives: leaf- and tree-level functions, and the chain stages built on them."""

from mergejax.ops.base import Reduction, Stage, Transform, map_float_leaves, static_field
from mergejax.ops.breadcrumbs import BreadcrumbsMask, breadcrumbs_mask
from mergejax.ops.dare import DareDrop, drop_and_rescale
from mergejax.ops.lines import LiNeS, blocks_from_regex, lines, lines_coefficient
from mergejax.ops.pcb import PCB
from mergejax.ops.fisher_mean import FisherMean, fisher_weighted_mean
from mergejax.ops.reduce import (
    DisjointMax, DisjointMean, DisjointSum, Mean, Sum, WeightableReduction, WeightedSum, max_magnitude, nonzero_mean,
)
from mergejax.ops.regmean import RegMean, regmean_kernel
from mergejax.ops.select import kth_largest, kth_largest_magnitude, kth_largest_per_row
from mergejax.ops.sign import ElectSign, elect_sign, keep_agreeing
from mergejax.ops.trim import Trim, magnitude_mask, magnitude_thresholds, trim

__all__ = [
    "Stage", "Transform", "Reduction", "map_float_leaves", "static_field", "WeightableReduction",
    "FisherMean", "fisher_weighted_mean", "RegMean", "regmean_kernel",
    "Trim", "trim", "magnitude_mask", "magnitude_thresholds",
    "ElectSign", "elect_sign", "keep_agreeing",
    "Sum", "Mean", "DisjointMean", "DisjointSum", "DisjointMax", "WeightedSum", "nonzero_mean", "max_magnitude",
    "DareDrop", "drop_and_rescale",
    "BreadcrumbsMask", "breadcrumbs_mask",
    "LiNeS", "lines", "blocks_from_regex", "lines_coefficient",
    "PCB",
    "kth_largest", "kth_largest_magnitude", "kth_largest_per_row",
]
