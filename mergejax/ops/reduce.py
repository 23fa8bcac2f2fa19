"""Reductions: T task vectors -> one merged task vector (the last step of every merge chain).

After :class:`~mergejax.ops.sign.ElectSign` every nonzero entry of a coordinate agrees with the elected sign, so the
TIES disjoint mean (Yadav et al., 2023, Eq. 3: tau_m^p = sum_{t in A^p} tau_t^p / |A^p|) is the sum over tasks divided
by max(#nonzero entries, 1); disjoint sum (AdaMerging's and FusionBench's TIES) and disjoint max follow the same way.
Sums run in the task vectors' dtype (float32 or wider: task vectors are never narrower than float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp

from mergejax.ops.base import Reduction

__all__ = [
    "sum_leaves",
    "nonzero_mean",
    "max_magnitude",
    "Sum",
    "Mean",
    "DisjointMean",
    "DisjointSum",
    "DisjointMax",
    "WeightedSum",
]


def sum_leaves(xs: Sequence[jax.Array]) -> jax.Array:
    """x_1 + ... + x_T as a chain of elementwise adds (XLA fuses it; no stacked [T, ...] copy)."""
    return sum(xs[1:], xs[0])


def nonzero_mean(xs: Sequence[jax.Array]) -> jax.Array:
    """sum_t x_t / max(#{t : x_t != 0}, 1): the disjoint mean once disagreeing entries are zeroed (TIES Eq. 3)."""
    count = sum_leaves([(x != 0).astype(x.dtype) for x in xs])
    return sum_leaves(xs) / jnp.maximum(count, 1)


def max_magnitude(xs: Sequence[jax.Array]) -> jax.Array:
    """The entry of largest |x| over tasks (first task wins ties): the disjoint max after sign election."""
    out = xs[0]
    for x in xs[1:]:
        out = jnp.where(jnp.abs(x) > jnp.abs(out), x, out)
    return out


@dataclass(frozen=True)
class Sum(Reduction):
    """Reduction: sum_t tau_t (task arithmetic, Ilharco et al., 2023, Eq. 2; Breadcrumbs)."""

    def combine(self, xs):
        return sum_leaves(xs)


@dataclass(frozen=True)
class Mean(Reduction):
    """Reduction: (1/T) sum_t tau_t (weight averaging when applied with scale 1)."""

    def combine(self, xs):
        return sum_leaves(xs) / len(xs)


@dataclass(frozen=True)
class DisjointMean(Reduction):
    """Reduction: TIES disjoint mean (Eq. 3), the mean over the nonzero (sign-agreeing) entries of each coordinate."""

    def combine(self, xs):
        return nonzero_mean(xs)


@dataclass(frozen=True)
class DisjointSum(Sum):
    """Reduction: sum of the sign-agreeing entries (TIES as re-implemented by AdaMerging and FusionBench)."""


@dataclass(frozen=True)
class DisjointMax(Reduction):
    """Reduction: the sign-agreeing entry of largest magnitude per coordinate."""

    def combine(self, xs):
        return max_magnitude(xs)


@dataclass(frozen=True)
class WeightedSum(Reduction):
    """Reduction: sum_t w_t tau_t with fixed per-task weights (task arithmetic with per-task lambda_t).

    Args:
      weights: one float per task (a tuple, so the stage stays hashable).
    """

    weights: tuple[float, ...]

    def combine(self, xs):
        if len(self.weights) != len(xs):
            raise ValueError(f"WeightedSum has {len(self.weights)} weights for {len(xs)} task vectors")
        return sum_leaves([w * x for w, x in zip(self.weights, xs)])
