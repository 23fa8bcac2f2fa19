"""Model Breadcrumbs (Davari and Belilovsky, 2024): drop the largest outliers and the small noise of a task vector.

Per tensor and per row of its last axis (a vector is one row, a scalar a row of one): with m entries in the row, the
top k_top = floor(gamma * m) entries by |x| are zeroed and the next ones down to rank k_end = floor((gamma + beta) * m)
are kept (beta is the *kept* fraction, as in the reference code); everything below is zeroed. Thresholds are exact
per-row k-th largest magnitudes found by counting, so entries tied at a threshold fall on the same side.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from mergejax.ops.base import TaskVectors, Transform, check_fraction, map_float_leaves, rank_from_fraction, static_field
from mergejax.ops.select import kth_largest_per_row, ordered_key

__all__ = ["breadcrumbs_mask", "BreadcrumbsMask"]


def breadcrumbs_mask(x: jax.Array, beta: float = 0.15, gamma: float = 0.006) -> jax.Array:
    """Boolean mask of the kept band: rank in (k_top, k_end] by |x| within each row of the last axis.

    Davari and Belilovsky (2024), Sec. 3: k_top = floor(gamma * m) outliers and everything below rank
    k_end = floor((gamma + beta) * m) are masked out.

    Args:
      x: one task-vector leaf (a vector is one row, a scalar a row of one).
      beta: kept fraction of each row.
      gamma: fraction of each row's largest magnitudes dropped as outliers.

    Returns:
      A bool array shaped like ``x``.
    """
    a = jnp.abs(x).reshape(jnp.shape(x) if jnp.ndim(x) else (1,))
    m = a.shape[-1]
    k_top = rank_from_fraction(gamma, m)
    k_end = min(rank_from_fraction(gamma + beta, m), m)
    key = ordered_key(a)
    keep = key >= kth_largest_per_row(a, k_end) if k_end > 0 else jnp.zeros(a.shape, bool)
    if k_top > 0:
        keep = keep & (key < kth_largest_per_row(a, k_top))
    return keep.reshape(jnp.shape(x))


class BreadcrumbsMask(Transform):
    """Chain stage: keep each task vector's Breadcrumbs band (paper seeds beta = 0.15, gamma = 0.006).

    Args:
      beta: kept fraction of each row (static: it sets a rank).
      gamma: fraction of each row's largest entries dropped as outliers (static).
    """

    beta: float = static_field(0.15)
    gamma: float = static_field(0.006)
    leafwise: ClassVar[bool] = True
    rowwise: ClassVar[bool] = True  # per row of the last axis
    row_chunks: ClassVar[bool] = True  # T leaf-sized temporaries in one program

    def __post_init__(self):
        check_fraction("beta", self.beta)
        check_fraction("gamma", self.gamma)
        check_fraction("beta + gamma", self.beta + self.gamma)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return map_float_leaves(
            lambda xs, i: [jnp.where(breadcrumbs_mask(x, self.beta, self.gamma), x, jnp.zeros_like(x)) for x in xs],
            tvs,
        )
