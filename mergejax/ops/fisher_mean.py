"""Fisher-weighted mean: the reduction of Fisher merging (Matena and Raffel, 2022, Eq. 2) as a chain stage.

On models, theta* = sum_t w_t F_t theta_t / sum_t w_t F_t per coordinate. On task vectors (theta_t = theta_0 + tau_t)
the same merge is tau* = sum_t w_t F_t tau_t / sum_t w_t F_t, because the weights sum to one per coordinate. So the
Fisher mean composes with any per-task stage: ``chain(Trim(0.2), ElectSign(), FisherMean(F))`` is a Fisher-weighted
TIES. Each F_t is floored so that coordinates no task cares about take the (weighted) plain mean.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp

from mergejax.ops.base import TakesWeights, Reduction, TaskVectors, leaf_table, map_float_leaves, per_leaf_weights, static_field
from mergejax.tree import is_float, is_traced, paths_and_leaves

__all__ = ["FisherMean", "fisher_weighted_mean"]


def fisher_weighted_mean(xs: Sequence[jax.Array], fs: Sequence[jax.Array], floor: Any, *, mode: str = "add",
                         w: jax.Array | None = None) -> jax.Array:
    """sum_t w_t F~_t x_t / sum_t w_t F~_t for one leaf, F~ = F + floor (``mode="add"``) or max(F, floor) ("max").

    Where the denominator is 0 (every F~ is 0, only possible with floor 0) the plain (weighted) mean is returned.
    Matena and Raffel (2022), Eq. 2, on task vectors.

    Args:
      xs: the T task vectors' values of one leaf.
      fs: the T Fisher diagonals of that leaf, shaped like ``xs``.
      floor: added to each F (``"add"``) or its lower bound (``"max"``); traced.
      mode: "add" or "max".
      w: ``[T]`` per-task weights, or None (all 1).

    Returns:
      The Fisher-weighted mean, shaped like ``xs[0]`` in its dtype.
    """
    dt = xs[0].dtype
    floor = jnp.asarray(floor, dt)
    fl = [jnp.asarray(f, dt) + floor if mode == "add" else jnp.maximum(jnp.asarray(f, dt), floor) for f in fs]
    wt = [jnp.asarray(1.0, dt) if w is None else w[t].astype(dt) for t in range(len(xs))]
    num = sum(wi * f * x for wi, f, x in zip(wt, fl, xs))
    den = sum(wi * f for wi, f in zip(wt, fl))
    mean = sum(wi * x for wi, x in zip(wt, xs)) / sum(wt)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), mean)


class FisherMean(TakesWeights, Reduction):
    """Reduction: the Fisher-weighted mean sum_t (F_t + floor) tau_t / sum_t (F_t + floor) (Matena and Raffel, Eq. 2).

    Args:
      fishers: T diagonal Fishers (from :func:`mergejax.fisher.diagonal`), each a tree with the models' structure, or
        ``{leaf path: array}``. Traced data: new Fishers of the same shapes do not recompile.
      floor: added to every Fisher value (``floor_mode="add"``), or its lower bound (``"max"``, as the reference code
        mmatena/model_merging does, which :func:`mergejax.fisher_merge` uses).
      floor_mode: "add" or "max".
      weights: per-task weights w_t (set by a merge's ``weights=``): sum_t w_t F_t tau_t / sum_t w_t F_t.

    Memory: the T Fishers (float32, like the task vectors) plus the reduction's output.
    """

    fishers: Any
    floor: Any = 1e-6
    floor_mode: Literal["add", "max"] = static_field("add")
    weights: Any = None

    def __post_init__(self):
        if self.floor_mode not in ("add", "max"):
            raise ValueError(f"floor_mode must be 'add' or 'max', got {self.floor_mode!r}")
        if not is_traced(self.floor) and not float(self.floor) >= 0:
            raise ValueError(f"floor must be >= 0, got {self.floor!r}")
        if not isinstance(self.fishers, (list, tuple)) or not self.fishers:
            raise ValueError("FisherMean needs a list of Fishers, one per task")
        object.__setattr__(self, "fishers", tuple(self.fishers))


    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        if len(self.fishers) != len(tvs):
            raise ValueError(f"FisherMean has {len(self.fishers)} Fishers for {len(tvs)} task vectors")
        tables = [leaf_table(f) for f in self.fishers]
        per_path: dict[str, tuple] = {}
        for path, x in paths_and_leaves(tvs[0]):
            if not is_float(x):
                continue
            for t, table in enumerate(tables):
                if path not in table:
                    raise ValueError(f"fishers[{t}] has no leaf {path!r} (shape {tuple(x.shape)})")
                if tuple(jnp.shape(table[path])) != tuple(x.shape):
                    raise ValueError(f"fishers[{t}] leaf {path!r} has shape {tuple(jnp.shape(table[path]))}, "
                                     f"the task vectors {tuple(x.shape)}")
            per_path[path] = tuple(table[path] for table in tables)
        extras: tuple = (per_path,)
        if self.weights is not None:
            extras += (per_leaf_weights(self.weights, tvs[0], len(tvs)),)

        def fn(xs, i, ex):
            w = ex[1] if len(ex) > 1 else None
            return [fisher_weighted_mean(xs, ex[0], self.floor, mode=self.floor_mode, w=w)]

        return map_float_leaves(fn, tvs, out_count=1, extras=extras)
