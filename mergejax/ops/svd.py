"""SVD-based merges of the matrix leaves: TSV-M, Iso-C, Iso-CTS and CART (per-matrix functions and their stages).

Every per-matrix function takes the T task-vector matrices ``xs`` (same shape (m, n), float32 or wider), returns the
merged (m, n) matrix, and is ``vmap``-able (shapes and ranks are static; no branching on values). Non-matrix leaves
are averaged (:mod:`mergejax.ops.matrix`), unless ``matrix_axes=`` views N-D leaves (conv kernels) as matrices.

One deliberate difference from the reference code: orthogonal factors are computed as the *partial isometry*
``polar(A) = U diag(s > tol) V^T`` (``tol = max(m, n) * eps * s_max``, numpy's ``matrix_rank`` rule), and TSV-M drops
singular triplets with sigma = 0. For full-rank inputs this is exactly the reference's ``U V^T``; for rank-deficient
inputs (a zero or low-rank task vector) the reference's result depends on the arbitrary null-space basis its SVD
backend returns, ours does not (the null directions get weight 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from mergejax.ops.base import Reduction, TaskVectors, check_fraction, rank_from_fraction
from mergejax.ops.matrix import (
    Layout, MatrixAxes, PreWeightedInputs, check_layout, map_matrices, matrix_axes_rules, mean_leaves, static,
    warn_non_matrix,
)

__all__ = [
    "polar",
    "low_rank",
    "tsv_matrix",
    "iso_c_matrix",
    "iso_cts_sizes",
    "iso_cts_matrix",
    "cart_matrix",
    "TSV",
    "IsoC",
    "IsoCTS",
    "CART",
]


def _tol(s: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The numerical-rank threshold max(m, n) * eps * s_max of singular values ``s`` (numpy ``matrix_rank``)."""
    return max(shape) * jnp.finfo(s.dtype).eps * jnp.max(s, initial=0.0)


def polar(a: jax.Array) -> jax.Array:
    """The orthogonal polar factor U V^T of ``a`` (the nearest matrix with orthonormal columns/rows), restricted to
    its numerical range: singular directions with sigma <= tol get weight 0 (a partial isometry)."""
    u, s, vh = jnp.linalg.svd(a, full_matrices=False)
    keep = (s > _tol(s, a.shape)).astype(a.dtype)
    return (u * keep) @ vh


def low_rank(x: jax.Array, k: int) -> jax.Array:
    """The best rank-k approximation U_k S_k V_k^T of ``x`` (Eckart-Young); k is static."""
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def tsv_matrix(xs: list[jax.Array]) -> jax.Array:
    """TSV-M on one matrix (Gargiulo et al., CVPR 2025, Sec. 4, Eqs. 5-7; FusionBench
    ``TSVM_utils.compute_and_sum_svd_mem_reduction``).

    Per task the top k = floor(r / T) singular triplets (r = min(m, n)); concatenate the U_t, the sigma_t and the V_t;
    replace the concatenated U and V by their orthogonal polar factors; rebuild ``polar(U) diag(sigma) polar(V)^T``.
    FusionBench computes ``k = int(r * (1 / T))`` in floating point (int(49 * (1/49)) = 0); here k = r // T. T > r
    gives k = 0 and a zero matrix, as in the reference.
    """
    T = len(xs)
    m, n = xs[0].shape
    k = min(m, n) // T
    if k == 0:
        return jnp.zeros_like(xs[0])
    us, ss, vhs = [], [], []
    for x in xs:
        u, s, vh = jnp.linalg.svd(x, full_matrices=False)
        live = (s[:k] > _tol(s, x.shape)).astype(x.dtype)  # drop sigma = 0 triplets: they carry no direction
        us.append(u[:, :k] * live)
        ss.append(s[:k] * live)
        vhs.append(vh[:k] * live[:, None])
    u_cat = jnp.concatenate(us, axis=1)
    s_cat = jnp.concatenate(ss)
    vh_cat = jnp.concatenate(vhs, axis=0)
    return (polar(u_cat) * s_cat) @ polar(vh_cat)


def iso_c_matrix(xs: list[jax.Array]) -> jax.Array:
    """Iso-C on one matrix (Marczak et al., ICML 2025, Eq. 6; FusionBench ``iso_utils.iso_c``).

    The SVD U S V^T of the summed task matrix, every singular value replaced by their mean:
    ``mean(S) * U V^T`` (the mean is over all min(m, n) singular values, zeros included).
    """
    total = sum(xs[1:], xs[0])
    u, s, vh = jnp.linalg.svd(total, full_matrices=False)
    keep = (s > _tol(s, total.shape)).astype(total.dtype)
    return jnp.mean(s) * ((u * keep) @ vh)


def iso_cts_sizes(r: int, T: int, common_fraction: float) -> tuple[int, int]:
    """(common size c, per-task size n_t) of Iso-CTS for rank r (FusionBench ``iso_cts``): c0 = int(r * fraction),
    T n_t = round((r - c0) / T) T (Python's round half to even), c = r - T n_t. When rounding up would exceed r
    (small fractions), n_t = r // T instead (the reference would slice with a negative index)."""
    c0 = int(r * float(common_fraction))
    n_t = round((r - c0) / T)
    if T * n_t > r:
        n_t = r // T
    return r - T * n_t, n_t


def iso_cts_matrix(xs: list[jax.Array], common_fraction: float = 0.8) -> jax.Array:
    """Iso-CTS on one (out, in) matrix (Marczak et al., ICML 2025, Eqs. 7-9; FusionBench ``iso_utils.iso_cts``).

    The common subspace: the top-c left/right singular vectors of the summed matrix. Task-specific subspaces: per
    task, the top-n_t singular triplets of ``x_t - U_c U_c^T x_t`` (its part outside the common left subspace).
    Concatenate [task blocks, common block], orthogonalise U and V (polar factors), and rebuild with every singular
    value replaced by the mean of the concatenated ones. Not transpose-invariant: run on PyTorch (out, in) matrices.
    """
    T = len(xs)
    m, n = xs[0].shape
    c, n_t = iso_cts_sizes(min(m, n), T, common_fraction)
    total = sum(xs[1:], xs[0])
    u, s, vh = jnp.linalg.svd(total, full_matrices=False)
    live_c = (s[:c] > _tol(s, total.shape)).astype(total.dtype)  # null directions of the sum are arbitrary
    uc, sc, vhc = u[:, :c] * live_c, s[:c] * live_c, vh[:c] * live_c[:, None]
    us, ss, vhs = [], [], []
    for x in xs:
        x_ts = x - uc @ (uc.T @ x)
        ut, st, vht = jnp.linalg.svd(x_ts, full_matrices=False)
        tol = max(m, n) * jnp.finfo(x.dtype).eps * jnp.linalg.norm(x)  # relative to x_t, not to its residual
        live = (st[:n_t] > tol).astype(x.dtype)  # sigma = 0: arbitrary directions, dropped
        us.append(ut[:, :n_t] * live)
        ss.append(st[:n_t] * live)
        vhs.append(vht[:n_t] * live[:, None])
    u_all = jnp.concatenate(us + [uc], axis=1)
    s_all = jnp.concatenate(ss + [sc])
    vh_all = jnp.concatenate(vhs + [vhc], axis=0)
    return jnp.mean(s_all) * (polar(u_all) @ polar(vh_all))


def cart_matrix(xs: list[jax.Array], rank_ratio: float = 0.12, coeff: float = 2.0) -> jax.Array:
    """CART on one matrix (Choi et al., 2024, "Revisiting weight averaging for model merging", Eq. 5; code
    JH-GEECS/CART ``src/merging.py``): ``tau_avg + coeff * sum_t lowrank_k(tau_t - tau_avg)``, with
    k = max(1, floor(rank_ratio * r)) (the code: ``max(1, int(rank_ratio * dim))``; here the floor is taken on the
    decimal as written, as everywhere in mergejax)."""
    avg = sum(xs[1:], xs[0]) / len(xs)
    k = max(1, rank_from_fraction(rank_ratio, min(xs[0].shape)))
    return avg + coeff * sum(low_rank(x - avg, k) for x in xs)


@dataclass(frozen=True)
class _MatrixReduction(PreWeightedInputs, Reduction):
    """Base of the matrix reductions: ``merge_matrix(xs)`` on matrix leaves (2-D, or N-D by ``matrix_axes``), the
    mean elsewhere. Subclasses declare ``matrix_axes: MatrixAxes = static(None)`` last."""

    orient: ClassVar[bool] = False  # True for the methods defined on the PyTorch orientation
    method_name: ClassVar[str] = "matrix merge"

    def _normalize_matrix_axes(self) -> None:
        object.__setattr__(self, "matrix_axes", matrix_axes_rules(getattr(self, "matrix_axes", None)))

    def check_model(self, base) -> None:
        """Warns when most of ``base``'s parameters are not matrices and would be averaged (:func:`warn_non_matrix`);
        a merge calls it once with the whole model."""
        warn_non_matrix(base, method=self.method_name, matrix_axes=getattr(self, "matrix_axes", None),
                        exclude=getattr(self, "exclude", None))

    def merge_matrix(self, xs: list[jax.Array]) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def combine(self, xs: list[jax.Array]) -> jax.Array:
        """One 2-D or lower leaf (in its stored orientation): the matrix merge for 2-D leaves, the mean otherwise."""
        if xs[0].ndim != 2:
            return mean_leaves(xs)
        return self.merge_matrix(xs)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return map_matrices(
            self.merge_matrix,
            tvs,
            layout=getattr(self, "layout", "flax"),
            transpose=getattr(self, "transpose", None),
            exclude=getattr(self, "exclude", None),
            orient=self.orient,
            matrix_axes=getattr(self, "matrix_axes", None),
        )


@dataclass(frozen=True)
class TSV(_MatrixReduction):
    """Reduction: Task Singular Vectors merging (TSV-M), :func:`tsv_matrix` on every matrix leaf, the mean elsewhere.

    Args:
      exclude: path regex of matrix leaves to average instead (FusionBench's ``exclude_keys``).
      matrix_axes: None (only 2-D leaves are matrices, as FusionBench), or how N-D leaves are viewed as matrices,
        e.g. -1 for Flax conv kernels (kh, kw, in, out) -> (kh*kw*in, out) (:func:`mergejax.ops.matrix.matrix_view`).
    """

    exclude: str | None = static(None)
    matrix_axes: MatrixAxes = static(None)
    method_name: ClassVar[str] = "tsv"

    def __post_init__(self):
        self._normalize_matrix_axes()

    def merge_matrix(self, xs):
        return tsv_matrix(xs)


@dataclass(frozen=True)
class IsoC(_MatrixReduction):
    """Reduction: Iso-C, :func:`iso_c_matrix` on every matrix leaf, the mean elsewhere.

    Args:
      exclude: path regex of matrix leaves to average instead.
      matrix_axes: how N-D leaves are viewed as matrices (None: they are averaged); see :class:`TSV`.
    """

    exclude: str | None = static(None)
    matrix_axes: MatrixAxes = static(None)
    method_name: ClassVar[str] = "iso_c"

    def __post_init__(self):
        self._normalize_matrix_axes()

    def merge_matrix(self, xs):
        return iso_c_matrix(xs)


@dataclass(frozen=True)
class IsoCTS(_MatrixReduction):
    """Reduction: Iso-CTS, :func:`iso_cts_matrix` on every matrix leaf in PyTorch orientation, the mean elsewhere.

    Args:
      common_fraction: fraction of the rank given to the common subspace (FusionBench ``common_space_fraction``).
      layout, transpose: orientation rule (:mod:`mergejax.ops.matrix`): Flax ``kernel`` leaves are transposed.
      exclude: path regex of matrix leaves to average instead.
      matrix_axes: how N-D leaves are viewed as matrices (None: averaged): -1 for Flax conv kernels (then oriented
        (out, kh*kw*in)), 1 with ``layout="torch"`` for PyTorch conv weights (out, in*kh*kw); see :class:`TSV`.
    """

    common_fraction: float = static(0.8)
    layout: Layout = static("flax")
    transpose: str | None = static(None)
    exclude: str | None = static(None)
    matrix_axes: MatrixAxes = static(None)
    orient: ClassVar[bool] = True
    method_name: ClassVar[str] = "iso_cts"

    def __post_init__(self):
        check_fraction("common_fraction", self.common_fraction)
        check_layout(self.layout)
        self._normalize_matrix_axes()

    def merge_matrix(self, xs):
        return iso_cts_matrix(xs, self.common_fraction)


@dataclass(frozen=True)
class CART(_MatrixReduction):
    """Reduction: centered task arithmetic with rank reduction, :func:`cart_matrix` on every matrix leaf; other leaves
    get tau_avg (their centered residuals sum to zero).

    Args:
      rank_ratio: fraction of the rank kept per centered task matrix (the authors' 8-task default 0.12).
      coeff: lambda on the low-rank residuals (the authors' ``prior``, 2.0 for 8 ViT-B/32 tasks).
      exclude: path regex of matrix leaves to average instead.
      matrix_axes: how N-D leaves are viewed as matrices (None: averaged); see :class:`TSV`.
    """

    rank_ratio: float = static(0.12)
    coeff: float = 2.0
    exclude: str | None = static(None)
    matrix_axes: MatrixAxes = static(None)
    method_name: ClassVar[str] = "cart"

    def __post_init__(self):
        check_fraction("rank_ratio", self.rank_ratio)
        self._normalize_matrix_axes()

    def merge_matrix(self, xs):
        return cart_matrix(xs, self.rank_ratio, self.coeff)
