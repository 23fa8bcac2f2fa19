"""Reductions: T task vectors -> one merged task vector (the last step of every merge chain).

After :class:`~mergejax.ops.sign.ElectSign` every nonzero entry of a coordinate agrees with the elected sign, so the
TIES disjoint mean (Yadav et al., 2023, Eq. 3: tau_m^p = sum_{t in A^p} tau_t^p / |A^p|) is the sum over tasks divided
by max(#nonzero entries, 1); disjoint sum (AdaMerging's and FusionBench's TIES) and disjoint max follow the same way.
Sums run in the task vectors' dtype (float32 or wider: task vectors are never narrower than float32).

Per-task weights w_t (``weights=`` of every merge; a ``[T]`` array, or ``{path: [T]}`` for per-leaf coefficients as
AdaMerging learns them) are traced data: new weights never recompile. With weights,

- ``Sum``/``DisjointSum``: sum_t w_t tau_t;
- ``Mean``: sum_t w_t tau_t / sum_t w_t (mergekit's ``linear`` with ``normalize``);
- ``DisjointMean``: sum_t w_t tau_t [agree] / sum_t w_t [agree] (mergekit's TIES; 1 where no task agrees);
- ``DisjointMax``: the agreeing w_t tau_t of largest magnitude.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from mergejax.ops.base import TakesWeights, Reduction, TaskVectors, map_float_leaves, per_leaf_weights

__all__ = [
    "sum_leaves",
    "nonzero_mean",
    "max_magnitude",
    "WeightableReduction",
    "Sum",
    "Mean",
    "DisjointMean",
    "DisjointSum",
    "DisjointMax",
    "WeightedSum",
]


def sum_leaves(xs: Sequence[jax.Array]) -> jax.Array:
    """x_1 + ... + x_T as a chain of elementwise adds (XLA fuses it; no stacked [T, ...] copy).

    Args:
      xs: T arrays of one shape.

    Returns:
      Their sum.
    """
    return sum(xs[1:], xs[0])


def nonzero_mean(xs: Sequence[jax.Array], w: jax.Array | None = None) -> jax.Array:
    """sum_t w_t x_t / max(sum_{t : x_t != 0} w_t, 1 if none) (w = 1: the disjoint mean of TIES Eq. 3).

    Args:
      xs: T arrays of one shape (sign-agreeing task-vector entries, zero elsewhere).
      w: ``[T]`` per-task weights, or None (all 1).

    Returns:
      The disjoint mean, shaped like ``xs[0]`` (0 where every x_t is 0).
    """
    if w is None:
        count = sum_leaves([(x != 0).astype(x.dtype) for x in xs])
        return sum_leaves(xs) / jnp.maximum(count, 1)
    w = [w[t].astype(x.dtype) for t, x in enumerate(xs)]
    den = sum_leaves([jnp.where(x != 0, wt, 0) for x, wt in zip(xs, w)])
    num = sum_leaves([wt * x for x, wt in zip(xs, w)])
    return num / jnp.where(den != 0, den, 1)


def max_magnitude(xs: Sequence[jax.Array]) -> jax.Array:
    """The entry of largest |x| over tasks (first task wins ties): the disjoint max after sign election.

    Args:
      xs: T arrays of one shape.

    Returns:
      Per coordinate, the x_t of largest magnitude.
    """
    out = xs[0]
    for x in xs[1:]:
        out = jnp.where(jnp.abs(x) > jnp.abs(out), x, out)
    return out


def _weighted(xs: Sequence[jax.Array], w: jax.Array) -> list[jax.Array]:
    return [w[t].astype(x.dtype) * x for t, x in enumerate(xs)]


class WeightableReduction(TakesWeights, Reduction):
    """A reduction with an optional ``weights`` data field: ``combine(xs, w)`` gets the leaf's ``[T]`` weights or None.

    Subclass it and implement ``combine(self, xs, w=None)``; ``with_weights`` fills the field.

    Args:
      weights: per-task weights, ``[T]`` or ``{path: [T]}`` (traced data), or None (all 1).
    """

    weights: Any = None
    leafwise: ClassVar[bool] = True  # combine() sees one leaf position (set False when overriding __call__ otherwise)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        if self.weights is None:
            return map_float_leaves(lambda xs, i: [self.combine(xs, None)], tvs, out_count=1)
        table = per_leaf_weights(self.weights, tvs[0], len(tvs))
        return map_float_leaves(lambda xs, i, ex: [self.combine(xs, ex[0])], tvs, out_count=1, extras=(table,))


class Sum(WeightableReduction):
    """Reduction: sum_t w_t tau_t (task arithmetic, Ilharco et al., 2023, Eq. 2, w = 1; Breadcrumbs; DARE)."""

    rowwise: ClassVar[bool] = True  # elementwise over the T task vectors

    def combine(self, xs, w=None):
        """sum_t w_t x_t (Ilharco et al., 2023, Eq. 2).

        Args:
          xs: the T task vectors' values of one float leaf (or a stack of same-shaped leaves).
          w: that leaf's ``[T]`` per-task weights, or None (all 1).

        Returns:
          The reduced leaf, shaped like ``xs[0]``.
        """
        return sum_leaves(xs if w is None else _weighted(xs, w))


class Mean(WeightableReduction):
    """Reduction: sum_t w_t tau_t / sum_t w_t ((1/T) sum_t tau_t without weights: weight averaging at scale 1)."""

    rowwise: ClassVar[bool] = True  # elementwise over the T task vectors

    def combine(self, xs, w=None):
        """sum_t w_t x_t / sum_t w_t.

        Args:
          xs: the T task vectors' values of one float leaf (or a stack of same-shaped leaves).
          w: that leaf's ``[T]`` per-task weights, or None (all 1).

        Returns:
          The reduced leaf, shaped like ``xs[0]``.
        """
        if w is None:
            return sum_leaves(xs) / len(xs)
        return sum_leaves(_weighted(xs, w)) / jnp.sum(w).astype(xs[0].dtype)


class DisjointMean(WeightableReduction):
    """Reduction: TIES disjoint mean (Eq. 3), the mean over the nonzero (sign-agreeing) entries of each coordinate.

    With weights: sum_t w_t tau_t [tau_t != 0] / sum_t w_t [tau_t != 0], as mergekit's ``ties`` with ``normalize``.
    """

    rowwise: ClassVar[bool] = True  # elementwise over the T task vectors

    def combine(self, xs, w=None):
        """The disjoint mean (TIES Eq. 3), see :func:`nonzero_mean`.

        Args:
          xs: the T task vectors' values of one float leaf (or a stack of same-shaped leaves).
          w: that leaf's ``[T]`` per-task weights, or None (all 1).

        Returns:
          The reduced leaf, shaped like ``xs[0]``.
        """
        return nonzero_mean(xs, w)


class DisjointSum(Sum):
    """Reduction: sum of the sign-agreeing entries (TIES as re-implemented by AdaMerging and FusionBench)."""


class DisjointMax(WeightableReduction):
    """Reduction: the sign-agreeing entry of largest magnitude per coordinate (of w_t tau_t with weights)."""

    rowwise: ClassVar[bool] = True  # elementwise over the T task vectors

    def combine(self, xs, w=None):
        """The entry of largest magnitude of w_t x_t, see :func:`max_magnitude`.

        Args:
          xs: the T task vectors' values of one float leaf (or a stack of same-shaped leaves).
          w: that leaf's ``[T]`` per-task weights, or None (all 1).

        Returns:
          The reduced leaf, shaped like ``xs[0]``.
        """
        return max_magnitude(xs if w is None else _weighted(xs, w))


class WeightedSum(Sum):
    """Reduction: sum_t w_t tau_t with per-task weights (task arithmetic with per-task lambda_t).

    Args:
      weights: one weight per task (traced data: a new weight vector does not recompile).
    """

    weights: Any

    def __post_init__(self):
        if self.weights is None:
            raise ValueError("WeightedSum needs weights (one per task)")

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        n = len(self.weights) if isinstance(self.weights, (list, tuple)) else None
        if n is not None and n != len(tvs):
            raise ValueError(f"WeightedSum has {n} weights for {len(tvs)} task vectors")
        return super().__call__(tvs, key)
