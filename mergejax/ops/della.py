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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from mergejax.ops.base import TaskVectors, Transform, check_fraction, leaf_keys
from mergejax.ops.matrix import Layout, check_layout, static, transposes
from mergejax.tree import is_float, path_str

__all__ = ["della_probabilities", "della_prune", "Della"]


def della_probabilities(x: jax.Array, density: float, epsilon: float, axis: int = -1) -> jax.Array:
    """Keep probabilities p_i of one leaf, ranked by |x| along ``axis`` (a 0-D/1-D leaf is one row)."""
    a = jnp.abs(x)
    if a.ndim == 0:
        a = a[None]
    n = a.shape[axis]
    ranks = jnp.argsort(jnp.argsort(a, axis=axis, stable=True), axis=axis, stable=True).astype(jnp.float32)
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
    ``chain(Della(0.5, 0.1), ElectSign(), DisjointMean())`` (DELLA-TIES) or ``chain(Della(...), Sum())``.

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

    def __post_init__(self):
        check_fraction("density", self.density)
        check_layout(self.layout)
        d, e = float(self.density), float(self.epsilon)
        if d < 1 and not (e >= 0 and d - e >= 0 and d + e <= 1):
            raise ValueError(f"epsilon must keep density +/- epsilon in [0, 1], got density={d}, epsilon={e}")
        if self.rescale not in ("inverse", "l1"):
            raise ValueError(f"rescale must be 'inverse' or 'l1', got {self.rescale!r}")

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        if key is None:
            raise ValueError("Della needs an explicit jax.random key")
        if float(self.density) >= 1:
            return tuple(tvs)
        out = []
        for t, tv in enumerate(tvs):
            flat, treedef = jax.tree_util.tree_flatten_with_path(tv)
            leaves, fi = [], 0
            for p, x in flat:
                if not is_float(x):
                    leaves.append(x)
                    continue
                axis = 0 if (jnp.ndim(x) == 2 and transposes(path_str(p), self.layout, self.transpose)) else -1
                u = jax.random.uniform(leaf_keys(key, t, fi), jnp.shape(x), x.dtype)
                leaves.append(della_prune(x, u, self.density, self.epsilon, axis=axis, rescale=self.rescale))
                fi += 1
            out.append(jax.tree_util.tree_unflatten(treedef, leaves))
        return tuple(out)
