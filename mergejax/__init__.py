"""mergejax: model merging and sparse delta compression for JAX/Flax.

Parameter pytrees in, parameter pytrees out. See the README for a tour.
"""

from mergejax.merge import Merger, average, breadcrumbs, chain, dare, pcb, task_arithmetic, ties
from mergejax.ops import (
    PCB,
    BreadcrumbsMask,
    DareDrop,
    DisjointMax,
    DisjointMean,
    DisjointSum,
    ElectSign,
    LiNeS,
    Mean,
    Sum,
    Trim,
    WeightedSum,
    blocks_from_regex,
    lines,
)
from mergejax.tree import apply_task_vector, task_vector
from mergejax import ops, ternary  # noqa: E402  (subpackages; convert and models import lazily: torch is optional)

__version__ = "0.1.0"

__all__ = [
    "task_vector",
    "apply_task_vector",
    "average",
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "pcb",
    "chain",
    "Merger",
    "Trim",
    "ElectSign",
    "DisjointMean",
    "DisjointSum",
    "DisjointMax",
    "Sum",
    "Mean",
    "WeightedSum",
    "DareDrop",
    "BreadcrumbsMask",
    "LiNeS",
    "lines",
    "blocks_from_regex",
    "PCB",
    "ops",
    "ternary",
]
