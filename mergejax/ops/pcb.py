"""PCB-Merging: Parameter Competition Balancing (Du et al., 2024), as its reference code computes it.

Each task vector is one row over the whole model (all float leaves), n its length, T the number of tasks:
  1. clamp |tau_i| to [q_lo, q_hi], the entries at sorted positions floor(n * r) and floor(n * (1 - r)) - 1 (r = 1e-4);
  2. intra-balancing: exp(T * minmax(|tau_i|)^2) with the min-max over the row (Eq. 3);
  3. inter-balancing: tanh(tau_i * sum_j tau_j) on the unclamped vectors (Eq. 4);
  4. beta_i = intra * inter; keep the top ``ratio`` of beta_i: clamp it below at the sorted position
     floor(n * (1 - ratio)) and min-max normalise the row, so dropped entries weigh 0 (Eq. 5-6);
  5. tau_m = sum_i beta_i * clamp(tau_i) / max(sum_i beta_i, 1e-12) (Eq. 7); theta = theta_0 + lambda * tau_m.
Quantiles are exact order statistics found by counting (no sort). A zero-width range (max == min) gives weight 0
where the reference code would divide by zero.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.ops.base import Reduction, TaskVectors, check_fraction, map_float_leaves, rank_from_fraction, static_field
from mergejax.ops.select import key_to_float, kth_largest_groups
from mergejax.tree import float_leaves

__all__ = ["order_statistics", "PCB"]


def order_statistics(groups: list[list[jax.Array]], js: list[int], *, magnitude: bool = False) -> list[jax.Array]:
    """Per group, the value at 0-based position j of the ascending sort of all its entries (of |x| if
    ``magnitude``); no sort is done.

    Args:
      groups: lists of arrays; each group is ranked as one flat row (PCB's whole-model quantiles).
      js: per group, the 0-based ascending position j.
      magnitude: rank |x| instead of x.

    Returns:
      Per group, the float32 scalar at position j.
    """
    ns = [sum(int(x.size) for x in g) for g in groups]
    keys = kth_largest_groups(groups, [n - j for n, j in zip(ns, js)], magnitude=magnitude)
    return [key_to_float(keys[i]) for i in range(len(groups))]


def _minmax(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    width = hi - lo
    return jnp.where(width > 0, (x - lo) / jnp.where(width > 0, width, 1), 0)


class PCB(Reduction):
    """Reduction: PCB-Merging's balanced weighted mean (reference defaults: ratio 0.05, clamp r = 1e-4).

    Memory: in one traced program, beyond the T task vectors, two float32 copies of one task vector per task (the
    clamped vector and its weights) live at once; an eager merge runs leaf by leaf (:mod:`mergejax.ops.schedule`),
    and a large leaf in row chunks (this stage is ``rowwise_given`` and ``row_chunks``), so these are one chunk's.

    Args:
      ratio: kept fraction of each task's balancing weights beta_i (Du et al., 2024, Eq. 5-6), in (0, 1]. Static.
      clamp_ratio: r, the quantile at which |tau_i| is clamped below and (1 - r) above (reference code). Static.
    """

    ratio: float = static_field(0.05)
    clamp_ratio: float = static_field(1e-4)
    rowwise_given: ClassVar[bool] = True  # Eqs. 3-7 elementwise once the quantiles are given
    row_chunks: ClassVar[bool] = True  # T leaf-sized temporaries in one program

    def __post_init__(self):
        check_fraction("ratio", self.ratio)
        if self.ratio <= 0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        check_fraction("clamp_ratio", self.clamp_ratio)

    def _bound_ranks(self, n: int) -> tuple[int, int]:
        j_lo = rank_from_fraction(self.clamp_ratio, n)
        return j_lo, max(rank_from_fraction(1 - self.clamp_ratio, n) - 1, 0)

    def _balance(self, tvs: TaskVectors, lo: jax.Array, hi: jax.Array) -> tuple[tuple, tuple]:
        """Per task, the balancing weights beta_t = intra * inter (Eqs. 3-4) and the clamped vector, as trees."""
        T = len(tvs)
        total = map_float_leaves(lambda xs, i: [sum(xs[1:], xs[0])], tvs, out_count=1)[0]

        def balance(t):
            def leaf(cols, i):
                x, s = cols
                a = jnp.clip(jnp.abs(x), lo[t], hi[t])
                intra = jnp.exp(T * _minmax(a, lo[t], hi[t]) ** 2)
                return [intra * jnp.tanh(x * s), jnp.sign(x) * a]

            return map_float_leaves(leaf, (tvs[t], total), out_count=2)

        betas, clamped = zip(*(balance(t) for t in range(T)))
        return betas, clamped

    def _merge(self, betas: tuple, clamped: tuple, qs: jax.Array, tops: jax.Array) -> TaskVectors:
        """Eqs. 5-7: weights min-max normalised above each task's quantile q_t, then the weighted mean."""
        T = len(betas)
        weights = [map_float_leaves(lambda xs, i, t=t: [_minmax(jnp.maximum(xs[0], qs[t]), qs[t], tops[t])], (b,))[0]
                   for t, b in enumerate(betas)]

        def merge(cols, i):
            ws, cs = cols[:T], cols[T:]
            num = sum(w * c for w, c in zip(ws, cs))
            den = sum(ws)
            return [num / jnp.maximum(den, 1e-12)]

        return map_float_leaves(merge, (*weights, *clamped), out_count=1)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        T = len(tvs)
        n = sum(int(x.size) for x in float_leaves(tvs[0]))
        if n == 0:
            return (tvs[0],)
        leaves = [float_leaves(tv) for tv in tvs]
        j_lo, j_hi = self._bound_ranks(n)
        bounds = order_statistics(leaves + leaves, [j_lo] * T + [j_hi] * T, magnitude=True)
        lo, hi = bounds[:T], bounds[T:]
        betas, clamped = self._balance(tvs, lo, hi)
        beta_leaves = [float_leaves(b) for b in betas]
        qs = order_statistics(beta_leaves, [rank_from_fraction(1 - self.ratio, n)] * T)
        tops = [jnp.max(jnp.stack([jnp.max(x) for x in bl])) for bl in beta_leaves]
        return self._merge(betas, clamped, qs, tops)

    def canonical(self) -> "PCB":
        """This stage with the ratios that only :meth:`host_stats` reads normalised (the leaf programs' cache key)."""
        return dataclasses.replace(self, ratio=1.0, clamp_ratio=0.0)

    def host_stats(self, run) -> tuple | None:
        """(lo, hi, q, top), each [T], computed leaf by leaf (:class:`mergejax.ops.schedule.Runner`): the clamp
        bounds, then the weights' quantile and maximum, which depend on them.

        Args:
          run: the leaf-by-leaf runner of this stage's input.

        Returns:
          Four float32 [T] arrays, or None for a tree without float leaves.
        """
        n, T = run.n, run.n_tasks
        if n == 0:
            return None
        j_lo, j_hi = self._bound_ranks(n)
        # numpy on the host between the passes: nothing there compiles
        bounds = key_to_float(np.asarray(run.kth("abs", [n - j_lo] * T + [n - j_hi] * T, magnitude=True)))
        lo_hi = (bounds[:T], bounds[T:])
        k_q = [n - rank_from_fraction(1 - self.ratio, n)] * T
        if hasattr(run, "kth_and_max"):  # the maxima read in the quantile search's sampled pass
            q_keys, top_keys = run.kth_and_max("beta", k_q, given=lo_hi)
            qs, tops = key_to_float(np.asarray(q_keys)), key_to_float(np.asarray(top_keys))
        else:
            qs = key_to_float(np.asarray(run.kth("beta", k_q, given=lo_hi)))
            tops = np.asarray(run.maximum("top", given=lo_hi), np.float32)
        return (*lo_hi, qs, tops)

    def stat_values(self, tvs: TaskVectors, name: str, given) -> list[jax.Array] | jax.Array:
        """At one leaf: |tau_t| twice ("abs", for the clamp bounds), beta_t ("beta") or max beta_t ("top")."""
        if name == "abs":
            xs = [float_leaves(tv)[0] for tv in tvs]
            return xs + xs
        betas, _ = self._balance(tvs, *given)
        bl = [float_leaves(b)[0] for b in betas]
        return bl if name == "beta" else jnp.stack([jnp.max(b) for b in bl])

    def apply_with(self, tvs: TaskVectors, stats: tuple | None, key: jax.Array | None = None) -> TaskVectors:
        """Eqs. 3-7 at each leaf with the global statistics of :meth:`host_stats`."""
        if stats is None:
            return (tvs[0],)
        lo, hi, qs, tops = stats
        betas, clamped = self._balance(tvs, lo, hi)
        return self._merge(betas, clamped, qs, tops)
