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
from functools import partial

import jax
import jax.numpy as jnp

from mergejax.ops.base import Reduction, Stage, TaskVectors
from mergejax.ops.matrix import PreWeightedInputs, static
from mergejax.ops.reduce import DisjointSum, Sum, sum_leaves
from mergejax.ops.sign import ElectSign
from mergejax.ops.trim import Trim
from mergejax.tree import PyTree, is_float

__all__ = [
    "tall_mask", "consensus_mask", "Consensus", "consensus_ta_stages", "consensus_ties_stages", "TallMasks", "tall_masks",
]


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
class Consensus(PreWeightedInputs, Reduction):
    """Reduction: Consensus merging on top of a base method.

    Args:
      inner: the stages of the base method (ending with its reduction) that give tau_MTL, e.g. ``(Sum(),)``
        (Consensus TA) or ``(Trim(0.2), ElectSign(), DisjointSum())`` (Consensus TIES).
      lam: TALL-mask lambda, one for every task.
      k: minimum number of agreeing task masks (0 keeps everything: the base method; > T keeps nothing).
    """

    inner: tuple = static((Sum(),))
    lam: float = static(0.6)
    k: int = static(2)

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


class TallMasks:
    """TALL-mask compression (Wang et al., ICML 2024, Sec. 4): one multi-task vector and per-task boolean masks;
    ``model(t) = theta_0 + m_t * tau_MTL`` recovers task t. Build with :func:`tall_masks`.

    Attributes:
      base: the pre-trained tree.
      mtl: the multi-task vector tau_MTL (float leaves float32 or wider; non-float leaves as the task vectors).
      masks: per task, a tree of boolean masks (``None`` at non-float leaves).
    """

    def __init__(self, base: PyTree, mtl: PyTree, masks: list[PyTree]):
        self.base, self.mtl, self.masks = base, mtl, masks

    def model(self, t: int, *, scale: float = 1.0) -> PyTree:
        """Task t's model theta_0 + scale * m_t * tau_MTL, in the base's dtypes."""
        from mergejax.tree import _leaf_apply

        if not 0 <= int(t) < len(self.masks):
            raise IndexError(f"task index {t} out of range for {len(self.masks)} tasks")
        tv = jax.tree_util.tree_map(
            lambda m, tau: jnp.where(m, tau, 0) if is_float(tau) else tau, self.masks[t], self.mtl,
            is_leaf=lambda x: x is None,
        )
        return jax.tree_util.tree_map(lambda b, x: _leaf_apply(b, x, jnp.float32(scale)), self.base, tv)


def tall_masks(
    base: PyTree, finetuned, *, lam: float = 0.6, inner: tuple = (Sum(),), key: jax.Array | None = None
) -> TallMasks:
    """TALL masks of every task (Eq. 4) against the multi-task vector of ``inner`` (default: task arithmetic).

    Args:
      base: pre-trained parameters.
      finetuned: T fine-tuned trees (validated like every merge).
      lam: one lambda for every task (the paper picks lambda_t in {0.2, ..., 0.6} on validation data).
      inner: stages giving tau_MTL, e.g. :func:`consensus_ties_stages` (TIES dis-sum).
      key: for inner stages that draw random numbers.
    """
    from mergejax.merge import task_vectors_of

    tvs = task_vectors_of(base, finetuned)
    mtl, masks = _tall_masks_jit(tvs, key, inner=tuple(inner), lam=float(lam))
    return TallMasks(base, mtl, masks)


@partial(jax.jit, static_argnames=("inner", "lam"))
def _tall_masks_jit(tvs, key, *, inner: tuple, lam: float):
    """tau_MTL and the T TALL masks, compiled once per structure, ``inner`` and ``lam``."""
    (mtl,) = _run(inner, tvs, key)
    masks = [jax.tree_util.tree_map(lambda m, x: tall_mask(x, m, lam) if is_float(m) else None, mtl, tv) for tv in tvs]
    return mtl, masks
