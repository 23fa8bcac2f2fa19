"""mergejax: model merging and sparse delta compression for JAX/Flax.

Parameter pytrees in, parameter pytrees out. See the README for a tour.
"""

from mergejax.merge import Merger, average, breadcrumbs, chain, dare, pcb, task_arithmetic, ties
from mergejax.ops import (
    PCB,
    RegMean,
    BreadcrumbsMask,
    DareDrop,
    DisjointMax,
    DisjointMean,
    DisjointSum,
    ElectSign,
    FisherMean,
    LiNeS,
    Mean,
    Sum,
    Trim,
    WeightedSum,
    blocks_from_regex,
    lines,
    static_field,
)
from mergejax.tree import TaskVector, apply_task_vector, task_vector
from mergejax import fisher, ops, sharding, ternary  # noqa: E402  (convert and models import lazily)
from mergejax.fisher import fisher_merge, load_fisher, save_fisher
from mergejax.regmean import gram_matrices, regmean
from mergejax.adamerging import (
    Coefficients,
    adamerging,
    apply_coefficients,
    load_coefficients,
    save_coefficients,
)

__version__ = "0.1.0"

__all__ = [
    "task_vector",
    "TaskVector",
    "apply_task_vector",
    "FisherMean",
    "RegMean",
    "static_field",
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
    "sharding",
    "ternary",
    "fisher",
    "fisher_merge",
    "save_fisher",
    "load_fisher",
    "regmean",
    "gram_matrices",
    "adamerging",
    "Coefficients",
    "apply_coefficients",
    "save_coefficients",
    "load_coefficients",
]

# Newer data-free methods (issue 10): TSV-M, Iso-C/CTS, WUDI, CART, Consensus/TALL, DELLA, Model Stock, EMR.
from mergejax.methods_sota import (  # noqa: E402
    EMRMerged, cart, consensus_ta, consensus_ties, della, emr, iso_c, iso_cts, model_stock, tsv, wudi,
)
from mergejax.ops.consensus import Consensus, TallMasks, tall_masks  # noqa: E402
from mergejax.ops.della import Della, DellaTies  # noqa: E402
from mergejax.ops.model_stock import ModelStock  # noqa: E402
from mergejax.ops.svd import CART, TSV, IsoC, IsoCTS  # noqa: E402
from mergejax.ops.wudi import WUDI  # noqa: E402

__all__ += [
    "tsv", "iso_c", "iso_cts", "wudi", "cart", "consensus_ta", "consensus_ties", "della", "model_stock", "emr",
    "EMRMerged", "TSV", "IsoC", "IsoCTS", "CART", "WUDI", "Consensus", "Della", "ModelStock", "tall_masks", "TallMasks",
]
from mergejax.methods_sota import (  # noqa: E402
    cart_chain, consensus_ta_chain, consensus_ties_chain, della_chain, iso_c_chain, iso_cts_chain, model_stock_chain,
    tsv_chain, wudi_chain,
)

__all__ += [
    "tsv_chain", "iso_c_chain", "iso_cts_chain", "wudi_chain", "cart_chain", "consensus_ta_chain",
    "consensus_ties_chain", "della_chain", "model_stock_chain", "DellaTies",
]
