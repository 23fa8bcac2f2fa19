"""TALL masks and Consensus merging (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging
and Compression", Eqs. 4-5; code nik-dim/tall_masks ``src/utils/tallmask_utils.py``, ``src/eval/aggregation.py``).

TALL mask of task t (Eq. 4): ``m_t = |tau_t| > lambda_t |tau_MTL - tau_t|`` (strict, as the code; the paper writes
>=), with tau_MTL the multi-task vector of a base method (task arithmetic: sum_t tau_t; TIES: the disjoint *sum*
of 20%-trimmed vectors, as the code). Consensus (Eq. 5): keep the entries selected by at least k task masks
(k = 2 drops "catastrophic" and "selfish" weights) and merge ``tau = m_cons * tau_MTL``. The paper tunes lambda_t
per task on validation data from {0.2, ..., 0.6}; data-free, one lambda (default 0.6, FusionBench's config) is used
for every task.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mergejax.ops.base import Reduction, Stage, TaskVectors
from mergejax.ops.reduce import DisjointSum, Sum, sum_leaves
from mergejax.ops.sign import ElectSign
from mergejax.ops.trim import Trim
from mergejax.tree import PyTree, is_float

__all__ = ["tall_mask", "consensus_mask", "Consensus", "consensus_ta_stages", "consensus_ties_stages"]


def tall_mask(x: jax.Array, mtl: jax.Array, lam: float) -> jax.Array:
    """Eq. 4 on one leaf: |tau_t| > lambda |tau_MTL - tau_t| (boolean)."""
    return jnp.abs(x) > lam * jnp.abs(mtl - x)


def consensus_mask(xs: list[jax.Array], mtl: jax.Array, lam: float, k: int) -> jax.Array:
    """Eq. 5 on one leaf: at least ``k`` of the T TALL masks select the entry."""
    count = sum_leaves([tall_mask(x, mtl, lam).astype(jnp.int32) for x in xs])
    return count >= k


def _run(stages: tuple, tvs: TaskVectors, key) -> TaskVectors:
    for i, s in enumerate(stages):
        tvs = s(tvs, None if key is None else jax.random.fold_in(key, i))
    return tvs


@dataclass(frozen=True)
class Consensus(Reduction):
    """Reduction: Consensus merging on top of a base method.

    Args:
      inner: the stages of the base method (ending with its reduction) that give tau_MTL, e.g. ``(Sum(),)``
        (Consensus TA) or ``(Trim(0.2), ElectSign(), DisjointSum())`` (Consensus TIES).
      lam: TALL-mask lambda, one for every task.
      k: minimum number of agreeing task masks (0 keeps everything: the base method; > T keeps nothing).
    """

    inner: tuple = (Sum(),)
    lam: float = 0.6
    k: int = 2

    def __post_init__(self):
        if sum(bool(getattr(s, "reduces", False)) for s in self.inner) != 1:
            raise ValueError("Consensus.inner must be stages ending with exactly one reduction")
        if not float(self.lam) >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")
        if int(self.k) < 0:
            raise ValueError(f"k must be >= 0, got {self.k!r}")

    @property
    def needs_key(self) -> bool:  # type: ignore[override]
        return any(getattr(s, "needs_key", False) for s in self.inner)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        (mtl,) = _run(tuple(self.inner), tvs, key)

        def leaf(m, *xs):
            if not is_float(m):
                return m
            return jnp.where(consensus_mask(list(xs), m, self.lam, int(self.k)), m, jnp.zeros_like(m))

        return (jax.tree_util.tree_map(leaf, mtl, *tvs),)


def consensus_ta_stages() -> tuple[Stage, ...]:
    """tau_MTL of Consensus TA: the task-arithmetic sum."""
    return (Sum(),)


def consensus_ties_stages(density: float = 0.2) -> tuple[Stage, ...]:
    """tau_MTL of Consensus TIES: trim to ``density``, elect signs, disjoint sum (the code's ``dis-sum``, k = 20%)."""
    return (Trim(density, "global"), ElectSign(), DisjointSum())
