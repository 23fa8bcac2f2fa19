"""Magnitude trim: keep the top-k entries of a task vector by |value| (TIES step 1, ComPEFT's mask).

TIES-Merging (Yadav et al., 2023), Sec. 3 "Trim": keep the top-k% values of each task vector by magnitude, reset the
rest to 0. Here k = floor(density * n) and every entry with |x| >= t is kept, t being the exact k-th largest magnitude
(found by counting, :mod:`mergejax.ops.select`), so entries tied at t are all kept (at least k entries survive);
k = 0 keeps nothing, density 1 keeps everything.

Differences from the references: the TIES code computes ``kthvalue(n - int(n * K))`` which keeps int(n * K) + 1
entries (one too many); mergekit and PEFT take an exact per-tensor ``topk`` that breaks ties by position. Scope
``"global"`` (one threshold over all float leaves, the TIES code) and ``"tensor"`` (one per leaf, mergekit/PEFT).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.ops.base import TaskVectors, Transform, check_fraction, map_float_leaves, rank_from_fraction, static_field
from mergejax.ops.select import DEFAULT_RADIX_BITS, key_to_float, kth_largest_groups
from mergejax.tree import PyTree, as_tree, float_leaves, is_float, paths_and_leaves

__all__ = ["Scope", "magnitude_thresholds_many", "magnitude_thresholds", "magnitude_mask", "trim", "Trim"]

Scope = Literal["global", "tensor"]


def _check_scope(scope: str) -> None:
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")


def _densities(density: float | Sequence[float], n_tasks: int) -> tuple[float, ...]:
    """One density per task from a float or a per-task sequence (mergekit gives each model its own)."""
    if isinstance(density, (tuple, list)):
        if len(density) != n_tasks:
            raise ValueError(f"got {len(density)} densities for {n_tasks} task vectors")
        return tuple(density)
    return (density,) * n_tasks


def magnitude_thresholds_many(
    tvs: Sequence[PyTree],
    density: float | Sequence[float],
    *,
    scope: Scope = "global",
    radix_bits: int | None = DEFAULT_RADIX_BITS,
) -> list[list[jax.Array]]:
    """Per task vector, the magnitude threshold t of each float leaf (one t for all leaves when ``scope="global"``).

    t is the k-th largest |x| with k = floor(density * n); +inf when k = 0 (TIES Sec. 3, step 1: keep the top-k%).
    ``density`` is one fraction or one per task. All selections of all task vectors run in one loop of counting passes.

    Args:
      tvs: T task-vector trees with one structure.
      density: kept fraction k in [0, 1], or one per task.
      scope: ``"global"`` (one threshold per task vector over all its float leaves) or ``"tensor"`` (one per leaf).
      radix_bits: bits decided per counting pass; None: the backend's default.

    Returns:
      Per task vector, one float32 scalar threshold per float leaf (the same one for every leaf when global).
    """
    tvs = [as_tree(tv) for tv in tvs]
    dens = _densities(density, len(tvs))
    for d in dens:
        check_fraction("density", d)
    _check_scope(scope)
    per_task = [float_leaves(tv) for tv in tvs]
    if scope == "global":
        groups = [list(leaves) for leaves in per_task]
        group_density = list(dens)
    else:
        groups = [[x] for leaves in per_task for x in leaves]
        group_density = [d for d, leaves in zip(dens, per_task) for _ in leaves]
    ks = [rank_from_fraction(d, sum(int(x.size) for x in g)) for d, g in zip(group_density, groups)]
    live = [i for i, k in enumerate(ks) if k > 0]
    values = [jnp.asarray(jnp.inf, jnp.float32)] * len(groups)
    if live:
        keys = kth_largest_groups(
            [groups[i] for i in live], [ks[i] for i in live], radix_bits=radix_bits, magnitude=True
        )
        for j, i in enumerate(live):
            values[i] = key_to_float(keys[j])
    out, pos = [], 0
    for leaves in per_task:
        if scope == "global":
            out.append([values[pos]] * len(leaves))
            pos += 1
        else:
            out.append(values[pos : pos + len(leaves)])
            pos += len(leaves)
    return out


def magnitude_thresholds(
    tv: PyTree, density: float, *, scope: Scope = "global", radix_bits: int | None = DEFAULT_RADIX_BITS
) -> list[jax.Array]:
    """The magnitude threshold of each float leaf of one task vector (see :func:`magnitude_thresholds_many`).

    Args:
      tv: one task-vector tree.
      density: kept fraction k in [0, 1].
      scope: ``"global"`` or ``"tensor"``.
      radix_bits: bits decided per counting pass; None: the backend's default.

    Returns:
      One float32 scalar threshold per float leaf.
    """
    return magnitude_thresholds_many([tv], density, scope=scope, radix_bits=radix_bits)[0]


def _mask_with(tv: PyTree, thresholds: list[jax.Array]) -> PyTree:
    it = iter(thresholds)

    def leaf(x):
        if not is_float(x):
            return jnp.zeros(jnp.shape(x), bool)
        return jnp.abs(x) >= next(it).astype(jnp.abs(x).dtype)

    return jax.tree_util.tree_map(leaf, tv)


def _apply_mask(tv: PyTree, mask: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)) if is_float(x) else x, tv, mask)


def magnitude_mask(
    tv: PyTree, density: float, *, scope: Scope = "global", radix_bits: int | None = DEFAULT_RADIX_BITS
) -> PyTree:
    """Boolean tree: True where |x| >= t (TIES trim mask). Non-float leaves get an all-False mask of their shape.

    Args:
      tv: one task-vector tree.
      density: kept fraction k in [0, 1].
      scope: ``"global"`` or ``"tensor"``.
      radix_bits: bits decided per counting pass; None: the backend's default.

    Returns:
      A bool tree with ``tv``'s structure and shapes.
    """
    tv = as_tree(tv)
    return _mask_with(tv, magnitude_thresholds(tv, density, scope=scope, radix_bits=radix_bits))


def trim(tv: PyTree, density: float, *, scope: Scope = "global", radix_bits: int | None = DEFAULT_RADIX_BITS) -> PyTree:
    """The task vector with every entry below the magnitude threshold set to 0 (TIES Sec. 3, step 1).

    Args:
      tv: one task-vector tree.
      density: kept fraction k in [0, 1].
      scope: ``"global"`` or ``"tensor"``.
      radix_bits: bits decided per counting pass; None: the backend's default.

    Returns:
      The trimmed tree, with ``tv``'s structure and dtypes.
    """
    tv = as_tree(tv)
    return _apply_mask(tv, magnitude_mask(tv, density, scope=scope, radix_bits=radix_bits))


class Trim(Transform):
    """Chain stage: :func:`trim` each task vector on its own.

    Args:
      density: fraction of entries kept (TIES "k", default 0.2), or one fraction per task (mergekit's per-model
        ``density``). Static: it sets a rank, so a new density compiles a new (small) program.
      scope: ``"global"`` (one threshold per task vector over all its float leaves) or ``"tensor"``.
      radix_bits: bits decided per counting pass (4 -> 8 passes for float32); None: the backend's default.
    """

    density: float | tuple[float, ...] = static_field(0.2)
    scope: Scope = static_field("global")
    radix_bits: int | None = static_field(DEFAULT_RADIX_BITS)
    rowwise_given: ClassVar[bool] = True  # |x| >= a given threshold, elementwise

    def __post_init__(self):
        if isinstance(self.density, list):
            object.__setattr__(self, "density", tuple(self.density))
        for d in self.density if isinstance(self.density, tuple) else (self.density,):
            check_fraction("density", d)
        _check_scope(self.scope)

    def canonical(self) -> "Trim":
        """This stage with the density that only :meth:`host_stats` reads normalised (the leaf programs' cache key)."""
        return dataclasses.replace(self, density=0.0)

    def host_stats(self, run) -> jax.Array | dict:
        """The thresholds, computed leaf by leaf (:class:`mergejax.ops.schedule.Runner`): the exact search reads
        theta_t - theta_0 in every pass, so no task vector is ever stored.

        Args:
          run: the leaf-by-leaf runner of this stage's input.

        Returns:
          float32 [T]: each task's k-th largest magnitude over all its float leaves (+inf where k = 0); per tensor,
          ``{leaf position: [T]}``.
        """
        dens = _densities(self.density, run.n_tasks)

        def live(n):
            return tuple(t for t, d in enumerate(dens) if rank_from_fraction(d, n) > 0)

        def thresholds(n, keys):
            out = np.full((run.n_tasks,), np.inf, np.float32)  # on the host: nothing to compile
            alive = live(n)
            if alive:
                out[np.asarray(alive)] = np.asarray(key_to_float(np.asarray(keys)))
            return out

        if self.scope == "tensor":
            keys = run.kth_by_leaf(lambda n: ("tasks", live(n)),
                                   lambda n: [rank_from_fraction(dens[t], n) for t in live(n)], magnitude=True)
            return {j: thresholds(int(np.size(run.plan.b_leaves[j])), k) for j, k in keys.items()}
        alive = live(run.n)
        keys = run.kth(("tasks", alive), [rank_from_fraction(dens[t], run.n) for t in alive], magnitude=True) \
            if alive else None
        return thresholds(run.n, keys)

    def stat_values(self, tvs: TaskVectors, name: str, given) -> list[jax.Array]:
        """The values whose order statistics :meth:`host_stats` needs at one leaf: the live tasks' entries
        (``name = ("tasks", live task indices)``)."""
        return [float_leaves(tvs[t])[0] for t in name[1]]

    def apply_with(self, tvs: TaskVectors, stats: jax.Array, key: jax.Array | None = None) -> TaskVectors:
        """Keeps ``|x| >= stats[t]`` in task vector t (thresholds from :meth:`host_stats`)."""
        paths = [p for p, x in paths_and_leaves(tvs[0]) if is_float(x)]
        return _keep(tvs, tuple({p: stats[t] for p in paths} for t in range(len(tvs))))

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        ts = magnitude_thresholds_many(tvs, self.density, scope=self.scope, radix_bits=self.radix_bits)
        paths = [p for p, x in paths_and_leaves(tvs[0]) if is_float(x)]
        return _keep(tvs, tuple(dict(zip(paths, t)) for t in ts))


def _keep(tvs: TaskVectors, tables: tuple) -> TaskVectors:
    """Each task vector with the entries below its leaf's threshold (``tables[t][path]``) set to 0."""

    def keep(xs, i, thresholds):
        return [jnp.where(jnp.abs(x) >= t.astype(x.dtype), x, jnp.zeros_like(x)) for x, t in zip(xs, thresholds)]

    return map_float_leaves(lambda xs, i, ex: keep(xs, i, ex), tvs, extras=tables)
