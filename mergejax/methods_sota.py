"""The newer data-free merges as named methods, each a :func:`mergejax.chain` of the stages in ``mergejax.ops``.

=================  =============================================  ===========================================
method             chain                                          reference code
=================  =============================================  ===========================================
``tsv``            ``chain(TSV())``                               FusionBench task_singular_vector/TSVM_utils
``iso_c``          ``chain(IsoC())``                              FusionBench isotropic_merging/iso_utils
``iso_cts``        ``chain(IsoCTS(common_fraction))``             FusionBench isotropic_merging/iso_utils
``wudi``           ``chain(WUDI(steps, lr))``                     nathanielyvo/WUDI-Merging, FusionBench wudi
``cart``           ``chain(CART(rank_ratio, coeff))``             JH-GEECS/CART
``consensus_ta``   ``chain(Consensus((Sum(),), lam, k))``         nik-dim/tall_masks
``consensus_ties`` ``chain(Consensus((Trim, ElectSign,            nik-dim/tall_masks
                   DisjointSum), lam, k))``
``della``          ``chain(DellaTies(density, epsilon))``         mergekit sparsify.della_magprune
                   (= Della, ElectSign, DisjointMean in one
                   stage; ``combine="task_arithmetic"``:
                   ``chain(Della(...), Sum())``)
``model_stock``    ``chain(ModelStock())``                        FusionBench model_stock
``emr``            (not a chain: per-task masks and rescalers)    FusionBench emr_merging/utils, EMR_Merging
=================  =============================================  ===========================================

Every chain method also takes ``weights=`` (per-task weights applied to the task vectors by the combinator) and
``heads=`` (leaves kept per task), forwarded to the chain, and ``check_finite``.

Each chain method ``m`` has a factory ``m_chain(**hyperparameters)`` (``tsv_chain``, ``iso_c_chain``, ...) returning
the :class:`~mergejax.Merger` that ``m`` runs, with the same hyperparameter keywords and defaults, so callers (the
streaming merge, a config) need not rebuild stages: ``mj.tsv(base, fts, scale=s)`` is
``mj.tsv_chain()(base, fts, scale=s)``. The matrix methods' factories also take ``matrix_axes=`` (N-D leaves such as
conv kernels merged as matrices, :mod:`mergejax.ops.matrix`): ``mj.tsv_chain(matrix_axes=-1)(base, fts)`` on a Flax
conv net; by default those leaves are averaged, as the reference code does, with a warning when they hold most of the
model.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from mergejax.emr import EMRMerged, emr
from mergejax.merge import Merger, chain
from mergejax.ops.consensus import Consensus, consensus_ta_stages, consensus_ties_stages
from mergejax.ops.della import Della, DellaTies
from mergejax.ops.matrix import Layout, MatrixAxes
from mergejax.ops.model_stock import ModelStock
from mergejax.ops.reduce import Sum
from mergejax.ops.svd import CART, TSV, IsoC, IsoCTS
from mergejax.ops.wudi import WUDI
from mergejax.tree import PyTree

__all__ = [
    "tsv",
    "iso_c",
    "iso_cts",
    "wudi",
    "cart",
    "consensus_ta",
    "consensus_ties",
    "della",
    "model_stock",
    "emr",
    "EMRMerged",
    "tsv_chain",
    "iso_c_chain",
    "iso_cts_chain",
    "wudi_chain",
    "cart_chain",
    "consensus_ta_chain",
    "consensus_ties_chain",
    "della_chain",
    "model_stock_chain",
]


def _run(merger: Merger, base, finetuned, *, scale, weights, heads, key=None, check_finite=True) -> PyTree:
    if isinstance(weights, (list, tuple)):  # T numbers: one [T] array (a tuple would be traced as T scalars)
        weights = jnp.asarray(weights, jnp.float32)
    return merger(base, finetuned, scale=scale, weights=weights, heads=heads, key=key, check_finite=check_finite)


def tsv_chain(*, exclude: str | None = None, matrix_axes: MatrixAxes = None) -> Merger:
    """The chain :func:`tsv` runs: ``chain(TSV(exclude, matrix_axes))``."""
    return chain(TSV(exclude, matrix_axes))


def iso_c_chain(*, exclude: str | None = None, matrix_axes: MatrixAxes = None) -> Merger:
    """The chain :func:`iso_c` runs: ``chain(IsoC(exclude, matrix_axes))``."""
    return chain(IsoC(exclude, matrix_axes))


def iso_cts_chain(*, common_fraction: float = 0.8, layout: Layout = "flax", transpose: str | None = None,
                  exclude: str | None = None, matrix_axes: MatrixAxes = None) -> Merger:
    """The chain :func:`iso_cts` runs: ``chain(IsoCTS(common_fraction, layout, transpose, exclude, matrix_axes))``."""
    return chain(IsoCTS(common_fraction, layout, transpose, exclude, matrix_axes))


def wudi_chain(*, steps: int = 300, lr: float = 1e-5, normalize: Literal["squared", "norm"] = "squared",
               layout: Layout = "flax", transpose: str | None = None, exclude: str | None = None,
               progress: bool = True, matrix_axes: MatrixAxes = None) -> Merger:
    """The chain :func:`wudi` runs: ``chain(WUDI(steps, lr, normalize, layout, transpose, exclude, progress,
    matrix_axes))``."""
    return chain(WUDI(steps, lr, normalize, layout, transpose, exclude, progress, matrix_axes))


def cart_chain(*, rank_ratio: float = 0.12, coeff: float = 2.0, exclude: str | None = None,
               matrix_axes: MatrixAxes = None) -> Merger:
    """The chain :func:`cart` runs: ``chain(CART(rank_ratio, coeff, exclude, matrix_axes))``."""
    return chain(CART(rank_ratio, coeff, exclude, matrix_axes))


def consensus_ta_chain(*, lam: float = 0.6, k: int = 2) -> Merger:
    """The chain :func:`consensus_ta` runs: ``chain(Consensus((Sum(),), lam, k))``."""
    return chain(Consensus(consensus_ta_stages(), lam, k))


def consensus_ties_chain(*, lam: float = 0.6, k: int = 2, density: float = 0.2) -> Merger:
    """The chain :func:`consensus_ties` runs: ``chain(Consensus((Trim(density), ElectSign(), DisjointSum()), lam,
    k))``."""
    return chain(Consensus(consensus_ties_stages(density), lam, k))


def della_chain(*, density: float = 0.5, epsilon: float = 0.1, rescale: Literal["inverse", "l1"] = "inverse",
                combine: Literal["ties", "task_arithmetic"] = "ties", layout: Layout = "flax") -> Merger:
    """The chain :func:`della` runs: ``chain(DellaTies(density, epsilon, rescale, layout))`` (``combine="ties"``;
    the same merge as ``chain(Della(...), ElectSign(), DisjointMean())``, pruning each leaf once when run leaf by
    leaf) or ``chain(Della(density, epsilon, rescale, layout), Sum())``. Call it with ``key=``."""
    if combine == "ties":
        return chain(DellaTies(density, epsilon, rescale, layout))
    if combine == "task_arithmetic":
        return chain(Della(density, epsilon, rescale, layout), Sum())
    raise ValueError(f"combine must be 'ties' or 'task_arithmetic', got {combine!r}")


def model_stock_chain() -> Merger:
    """The chain :func:`model_stock` runs: ``chain(ModelStock())``."""
    return chain(ModelStock())


def tsv(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    scale: float = 1.0,
    exclude: str | None = None,
    matrix_axes: MatrixAxes = None,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """TSV-M (Gargiulo et al., CVPR 2025, Eqs. 5-7): per matrix, the top r/T singular triplets of each task,
    U and V orthogonalised, theta = theta_0 + scale * tau_TSV; non-matrix leaves averaged. FusionBench's scale: 1.0.

    Memory: per matrix shape, the T task matrices and their SVD factors (see :mod:`mergejax.ops.matrix`).
    """
    return _run(tsv_chain(exclude=exclude, matrix_axes=matrix_axes), base, finetuned, scale=scale, weights=weights,
                heads=heads,
                check_finite=check_finite)


def iso_c(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    scale: float = 1.0,
    exclude: str | None = None,
    matrix_axes: MatrixAxes = None,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """Iso-C (Marczak et al., ICML 2025, Eq. 6): the summed task matrix with a flat spectrum (every singular value
    the mean); non-matrix leaves averaged. The paper tunes scale on validation data (FusionBench: about 1.5)."""
    return _run(iso_c_chain(exclude=exclude, matrix_axes=matrix_axes), base, finetuned, scale=scale, weights=weights,
                heads=heads,
                check_finite=check_finite)


def iso_cts(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    common_fraction: float = 0.8,
    scale: float = 1.0,
    layout: Layout = "flax",
    transpose: str | None = None,
    exclude: str | None = None,
    matrix_axes: MatrixAxes = None,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """Iso-CTS (Marczak et al., ICML 2025, Eqs. 7-9): Iso-C on a common subspace (``common_fraction`` of the rank)
    plus per-task subspaces, on PyTorch-oriented matrices (Flax kernels transposed; see ``layout``/``transpose``)."""
    m = iso_cts_chain(common_fraction=common_fraction, layout=layout, transpose=transpose, exclude=exclude,
                      matrix_axes=matrix_axes)
    return _run(m, base, finetuned, scale=scale, weights=weights, heads=heads, check_finite=check_finite)


def wudi(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    steps: int = 300,
    lr: float = 1e-5,
    scale: float = 1.0,
    normalize: Literal["squared", "norm"] = "squared",
    layout: Layout = "flax",
    transpose: str | None = None,
    exclude: str | None = None,
    matrix_axes: MatrixAxes = None,
    progress: bool = True,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """WUDI merging (Cheng et al., ICML 2025, Eq. 9): per matrix, Adam on
    sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 from tau_m = sum_i tau_i (``steps`` and ``lr`` as the
    official repository), with a progress bar. Non-matrix leaves averaged. The result is applied with scale 1
    (FusionBench).

    Execution: called eagerly, matrix by matrix from the host (one compiled Adam loop per matrix shape, reused for
    every matrix of that shape; a bar per matrix); under the caller's ``jit``, one ``fori_loop`` over all matrices.
    Every product is a 2-D matrix product (see :mod:`mergejax.ops.wudi` for why: XLA:CPU ran the batched form
    20-60x slower)."""
    m = wudi_chain(steps=steps, lr=lr, normalize=normalize, layout=layout, transpose=transpose, exclude=exclude,
                   matrix_axes=matrix_axes,
                   progress=progress)
    return _run(m, base, finetuned, scale=scale, weights=weights, heads=heads, check_finite=check_finite)


def cart(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    rank_ratio: float = 0.12,
    coeff: float = 2.0,
    scale: float = 1.0,
    exclude: str | None = None,
    matrix_axes: MatrixAxes = None,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """CART (Choi et al., 2024, Eq. 5): theta_avg + coeff * sum_t lowrank_k(theta_t - theta_avg), k = rank_ratio * r
    per matrix (the authors' 8-task defaults: 0.12 and 2.0); ``scale`` multiplies the whole merged task vector."""
    m = cart_chain(rank_ratio=rank_ratio, coeff=coeff, exclude=exclude, matrix_axes=matrix_axes)
    return _run(m, base, finetuned, scale=scale, weights=weights, heads=heads, check_finite=check_finite)


def consensus_ta(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    lam: float = 0.6,
    k: int = 2,
    scale: float = 1.0,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """Consensus TA (Wang et al., ICML 2024, Eq. 5): task arithmetic restricted to the entries at least ``k`` TALL
    masks (lambda = ``lam``) select."""
    return _run(consensus_ta_chain(lam=lam, k=k), base, finetuned, scale=scale, weights=weights, heads=heads,
                check_finite=check_finite)


def consensus_ties(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    lam: float = 0.6,
    k: int = 2,
    density: float = 0.2,
    scale: float = 1.0,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """Consensus TIES (Wang et al., ICML 2024): TIES (trim to ``density``, elect, disjoint sum, as the code) restricted
    to the consensus entries."""
    m = consensus_ties_chain(lam=lam, k=k, density=density)
    return _run(m, base, finetuned, scale=scale, weights=weights, heads=heads, check_finite=check_finite)


def della(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    key: jax.Array,
    density: float = 0.5,
    epsilon: float = 0.1,
    rescale: Literal["inverse", "l1"] = "inverse",
    combine: Literal["ties", "task_arithmetic"] = "ties",
    scale: float = 1.0,
    layout: Layout = "flax",
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """DELLA (Deep et al., 2024): MagPrune (rank-based keep probabilities density +/- epsilon, rescaled), then sign
    election and disjoint mean (``combine="ties"``, DELLA-Merging) or a plain sum (mergekit's ``della_linear``).
    Eagerly (leaf by leaf) the TIES variant prunes every leaf once (:class:`~mergejax.ops.della.DellaTies`; peak
    memory: two float32 copies of the merged model during its pass)."""
    m = della_chain(density=density, epsilon=epsilon, rescale=rescale, combine=combine, layout=layout)
    return _run(m, base, finetuned, scale=scale, weights=weights, heads=heads, key=key, check_finite=check_finite)


def model_stock(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    scale: float = 1.0,
    weights=None,
    heads=None,
    check_finite: bool = True,
) -> PyTree:
    """Model Stock (Jang et al., ECCV 2024, Eq. 2) for >= 2 fine-tunes of the same task: per leaf,
    theta_0 + t * mean(tau) with t from the mean pairwise angle of the task vectors."""
    if len(tuple(finetuned)) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models, got {len(tuple(finetuned))}")
    return _run(model_stock_chain(), base, finetuned, scale=scale, weights=weights, heads=heads,
                check_finite=check_finite)
