"""DELLA MagPrune (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", Sec. 3.1; mergekit ``sparsify.della_magprune``).

Within each row, entries are ranked by |tau| (rank 0 = smallest); the keep probability rises linearly with rank,
``p_i = (density - epsilon) + 2 epsilon * rank_i / (n - 1)`` (mean ``density``), entries are kept with probability
p_i and rescaled by 1 / p_i (the paper's rescaling; ``rescale="l1"`` keeps each tensor's L1 norm, what mergekit does
with ``rescale: true``). Rows follow the PyTorch layout, as mergekit: each output neuron's weights over its inputs
(a Flax ``kernel`` (in, out) is ranked along axis 0, any other leaf along its last axis; 0-D/1-D leaves form one
row). Ties in |tau| are ranked by position (mergekit's ``argsort`` leaves them unspecified); a one-entry row gets
rank 1 (p = density + epsilon). Random draws: ``uniform(fold_in(fold_in(key, task), leaf))`` per leaf, keep where
``u < p_i``.

Execution: leaf by leaf in an eager merge (``leafwise``; :meth:`Della.at_leaf` decides the ranking axis from the
path), so its compile time depends on the distinct leaf shapes only; in one traced program, same-shaped leaves share
one vmapped copy (:func:`mergejax.ops.base.map_float_leaves`).

DELLA-TIES in one pass (:class:`DellaTies`). ``chain(Della(), ElectSign(), DisjointMean())`` run leaf by leaf prunes
every leaf twice: once for the sign election's global majority sign (TIES' zero-sum rule, a whole-model count) and
once for the output. :class:`DellaTies` is the same merge as one stage whose statistics pass prunes each leaf once
and keeps, per leaf, its two candidate outputs (the disjoint mean with the zero-sum coordinates elected + and -)
with its sign counts; the host then picks the candidate of the majority sign, and the output pass only adds the base.
The results equal the three-stage chain's (the same draws, the same code); the price is memory: two float32 copies
of the merged model while the pass runs, instead of none. If the majority sign is 0 (as many +1 as -1 elected signs
in the whole model) the output pass prunes again with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from jax import lax

import numpy as np

from mergejax.ops.base import Reduction, TakesWeights, TaskVectors, Transform, check_fraction, leaf_keys, \
    map_float_leaves
from mergejax.ops.matrix import Layout, check_layout, resolve_path_rules, static, transposes
from mergejax.ops.reduce import DisjointMean
from mergejax.ops.sign import ElectSign

__all__ = ["della_ranks", "della_probabilities", "della_prune", "Della", "DellaTies"]


def della_ranks(a: jax.Array, axis: int = -1) -> jax.Array:
    """The rank of every entry of ``a`` within its row along ``axis`` (0 = smallest; ties by position), int32.

    One stable sort per row (the values with their positions as payload) and a scatter of the positions back,
    instead of the double ``argsort`` (two sorts): about 1.7x faster on XLA:CPU, where the sort dominates DELLA.
    The row axis is moved last first (sorting along a major axis was slower still).
    """
    moved = jnp.moveaxis(a, axis, -1)
    n = moved.shape[-1]
    rows = moved.reshape(-1, n)
    pos = lax.broadcasted_iota(jnp.int32, rows.shape, 1)
    _, order = lax.sort((rows, pos), dimension=1, is_stable=True, num_keys=1)
    row_id = lax.broadcasted_iota(jnp.int32, rows.shape, 0)
    ranks = jnp.zeros(rows.shape, jnp.int32).at[row_id, order].set(pos, unique_indices=True)
    return jnp.moveaxis(ranks.reshape(moved.shape), -1, axis)


def della_probabilities(x: jax.Array, density: float, epsilon: float, axis: int = -1) -> jax.Array:
    """Keep probabilities p_i of one leaf, ranked by |x| along ``axis`` (a 0-D/1-D leaf is one row)."""
    a = jnp.abs(x)
    if a.ndim == 0:
        a = a[None]
    n = a.shape[axis]
    ranks = della_ranks(a, axis).astype(jnp.float32)
    rank_norm = ranks / (n - 1) if n > 1 else jnp.ones_like(ranks)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(jnp.shape(x)).astype(x.dtype)


def della_prune(
    x: jax.Array, u: jax.Array, density: float, epsilon: float, *, axis: int = -1, rescale: str = "inverse"
) -> jax.Array:
    """MagPrune one leaf given uniform draws ``u`` (same shape): keep where u < p_i, then rescale."""
    p = della_probabilities(x, density, epsilon, axis)
    keep = u < p
    if rescale == "inverse":
        return jnp.where(keep, x / p, jnp.zeros_like(x))
    kept = jnp.where(keep, x, jnp.zeros_like(x))
    before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(kept))
    return kept * jnp.where(after > 0, before / jnp.where(after > 0, after, 1), 1).astype(x.dtype)


@dataclass(frozen=True)
class Della(Transform):
    """Chain stage: DELLA MagPrune of every task vector (needs a ``key``). Use before any reduction, e.g.
    ``chain(Della(0.5, 0.1), ElectSign(), DisjointMean())`` (DELLA-TIES; :class:`DellaTies` is the same merge as one
    stage, pruning each leaf once when run leaf by leaf) or ``chain(Della(...), Sum())``.

    Args:
      density: mean keep probability, in (0, 1]; density 1 keeps everything.
      epsilon: half-width of the probability range; needs 0 <= density - epsilon and density + epsilon <= 1.
      rescale: "inverse" (divide by p_i, the paper) or "l1" (mergekit).
      layout, transpose: which 2-D leaves are Flax kernels (:mod:`mergejax.ops.matrix`).
    """

    density: float = static(0.5)
    epsilon: float = static(0.1)
    rescale: Literal["inverse", "l1"] = static("inverse")
    layout: Layout = static("flax")
    transpose: str | None = static(None)
    needs_key: ClassVar[bool] = True
    leafwise: ClassVar[bool] = True  # per leaf; the ranking axis is decided per leaf by at_leaf

    def __post_init__(self):
        check_fraction("density", self.density)
        check_layout(self.layout)
        d, e = float(self.density), float(self.epsilon)
        if d < 1 and not (e >= 0 and d - e >= 0 and d + e <= 1):
            raise ValueError(f"epsilon must keep density +/- epsilon in [0, 1], got density={d}, epsilon={e}")
        if self.rescale not in ("inverse", "l1"):
            raise ValueError(f"rescale must be 'inverse' or 'l1', got {self.rescale!r}")

    def at_leaf(self, path: str) -> "Della":
        """This stage for the one leaf at ``path``: its ranking axis decided (the leaf-by-leaf schedule)."""
        return resolve_path_rules(self, path)

    def _axis(self, path: str) -> int:
        """The ranking axis of a 2-D leaf at ``path``: 0 for a Flax kernel (its PyTorch rows), else -1."""
        return 0 if transposes(path, self.layout, self.transpose) else -1

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        if key is None:
            raise ValueError("Della needs an explicit jax.random key")
        if float(self.density) >= 1:
            return tuple(tvs)

        def prune(xs, i, axis, t):
            x = xs[0]
            u = jax.random.uniform(leaf_keys(key, t, i), jnp.shape(x), x.dtype)
            return [della_prune(x, u, self.density, self.epsilon, axis=axis if jnp.ndim(x) == 2 else -1,
                                rescale=self.rescale)]

        return tuple(
            map_float_leaves(partial(prune, t=t), (tv,), kind=self._axis)[0] for t, tv in enumerate(tvs)
        )


class DellaTies(TakesWeights, Reduction):
    """Reduction: DELLA-TIES (Deep et al., 2024), MagPrune then TIES' sign election and disjoint mean, as one stage:
    equal to ``chain(Della(density, epsilon, rescale, layout, transpose), ElectSign(), DisjointMean())`` (needs a
    ``key``), but leaf by leaf it prunes every leaf once instead of twice (module docstring).

    Args:
      density, epsilon, rescale, layout, transpose: as :class:`Della`.
      weights: per-task weights (set by a merge's ``weights=``): the election on w_t tau_t and a weighted disjoint
        mean, as the three-stage chain.
    """

    density: float = static(0.5)
    epsilon: float = static(0.1)
    rescale: Literal["inverse", "l1"] = static("inverse")
    layout: Layout = static("flax")
    transpose: str | None = static(None)
    weights: object = None
    needs_key: ClassVar[bool] = True

    def __post_init__(self):
        self.drop_stage()  # validates the DELLA hyperparameters

    def drop_stage(self) -> Della:
        """The MagPrune stage of this merge."""
        return Della(self.density, self.epsilon, self.rescale, self.layout, self.transpose)

    def stages(self) -> tuple:
        """The equivalent three-stage chain: (Della, ElectSign, DisjointMean), with this stage's weights."""
        elect, reduce = ElectSign(), DisjointMean()
        if self.weights is not None:
            elect, reduce = elect.with_weights(self.weights), reduce.with_weights(self.weights)
        return self.drop_stage(), elect, reduce

    def at_leaf(self, path: str) -> "DellaTies":
        """This stage for the one leaf at ``path``: its ranking axis decided (the leaf-by-leaf schedule)."""
        return resolve_path_rules(self, path)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        drop, elect, reduce = self.stages()
        return reduce(elect(drop(tvs, key)))

    def stat_values(self, tvs: TaskVectors, name: str, key) -> tuple:
        """At one leaf (``key``: this stage's key, passed as the statistic's data): ``"signs"`` gives the counts
        [#(+1), #(-1)] of the raw elected signs of the pruned task vectors; ``"candidates"`` gives those counts and
        the merged leaf for a majority sign of +1 and of -1."""
        drop, elect, reduce = self.stages()
        pruned = drop(tvs, key)
        counts = elect.stat_values(pruned, "signs", None)
        if name == "signs":
            return counts
        plus, minus = (reduce(elect.apply_with(pruned, jnp.int32(m)))[0] for m in (1, -1))
        return counts, plus, minus

    def host_stats(self, run):
        """Leaf by leaf: one pruning pass giving the majority sign and each leaf's merged value.

        Args:
          run: the leaf-by-leaf runner (:class:`mergejax.ops.schedule.Runner`: its ``key`` and ``per_leaf``).

        Returns:
          {leaf position: merged leaf}, or the int32 majority sign when it is 0 (the output pass prunes again).
        """
        key = getattr(run, "key", None)
        if key is None or not hasattr(run, "per_leaf"):
            raise ValueError("DellaTies runs leaf by leaf only under mergejax.ops.schedule (it needs the runner's key "
                             "and per_leaf); elsewhere use its stages(): chain(Della(...), ElectSign(), DisjointMean())")
        parts = run.per_leaf("candidates", given=key)
        counts = np.sum([np.asarray(c, np.int64) for c in jax.device_get([v[0] for v in parts.values()])],
                        axis=0) if parts else np.zeros(2, np.int64)
        majority = int(np.sign(int(counts[0]) - int(counts[1])))
        if majority == 0:
            return jnp.asarray(0, jnp.int32)
        return {j: (plus if majority > 0 else minus) for j, (_, plus, minus) in parts.items()}

    def apply_with(self, tvs: TaskVectors, stats, key: jax.Array | None = None) -> TaskVectors:
        """The merged leaf from :meth:`host_stats`: given (a float array), or pruned again with the given integer
        majority sign."""
        if jnp.issubdtype(jnp.result_type(stats), jnp.integer):
            drop, elect, reduce = self.stages()
            return reduce(elect.apply_with(drop(tvs, key), stats))
        return (stats,)
