"""RegMean's closed-form merge of linear layers as a reduction stage (Jin et al., ICLR 2023, Eq. 3).

For a Dense kernel W (layout ``[in, out]``) and Gram matrices G_i = X_i^T X_i / N_i of the layer's inputs on task i,
W* = (sum_i G~_i)^-1 sum_i G~_i W_i with G~_i = alpha G_i + (1 - alpha) diag(G_i). On task vectors (W_i = W_0 + tau_i)
the same merge is tau* = (sum G~_i)^-1 sum G~_i tau_i, so RegMean is a reduction like any other and composes with
per-task stages. Leaves without Gram matrices (biases, norms, embeddings) take the mean.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mergejax.ops.base import TakesWeights, Reduction, TaskVectors, leaf_table, map_float_leaves, per_leaf_weights
from mergejax.tree import acc_dtype, is_float, is_traced, paths_and_leaves

__all__ = ["RegMean", "regmean_kernel", "scale_off_diagonal"]


def scale_off_diagonal(g: jax.Array, alpha: Any) -> jax.Array:
    """alpha * G + (1 - alpha) * diag(G): off-diagonals times alpha (RegMean Sec. 3.2).

    Args:
      g: a Gram matrix ``[in, in]``.
      alpha: the off-diagonal scale in [0, 1] (traced).

    Returns:
      The scaled matrix, shaped like ``g``.
    """
    return alpha * g + (1.0 - alpha) * jnp.diag(jnp.diag(g))


def regmean_kernel(grams: Sequence[jax.Array], kernels: Sequence[jax.Array], rcond: Any = 1e-6) -> jax.Array:
    """W* = (sum_i G_i)^-1 sum_i G_i W_i for one ``[in, out]`` kernel (RegMean Eq. 3, already alpha-scaled G_i).

    Computed through the eigendecomposition of S = sum_i G_i: input directions whose eigenvalue is at most
    ``rcond * max eigenvalue`` (no task's inputs reach them, e.g. pixels that are always 0) take the plain average of
    the kernels instead of an undefined value; with S well conditioned this is exactly S^-1 sum_i G_i W_i.
    Memory: a few ``in x in`` matrices.

    Args:
      grams: T (alpha-scaled, weighted) Gram matrices G_i ``[in, in]``.
      kernels: T kernels (or kernel task vectors) W_i ``[in, out]``.
      rcond: relative eigenvalue cut-off (traced).

    Returns:
      W* ``[in, out]`` in ``kernels[0]``'s dtype.
    """
    dt = acc_dtype(kernels[0].dtype)
    s = sum(g.astype(dt) for g in grams)
    rhs = sum(g.astype(dt) @ w.astype(dt) for g, w in zip(grams, kernels))
    mean = sum(w.astype(dt) for w in kernels) / len(kernels)
    evals, evecs = jnp.linalg.eigh(s)
    keep = evals > rcond * jnp.maximum(evals.max(), 0.0)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
    solved = evecs @ (inv[:, None] * (evecs.T @ rhs))
    null = evecs @ (jnp.where(keep, 0.0, 1.0)[:, None] * (evecs.T @ mean))
    return (solved + null).astype(kernels[0].dtype)


class RegMean(TakesWeights, Reduction):
    """Reduction: RegMean on every leaf that has Gram matrices, the mean elsewhere (Jin et al., 2023, Eq. 3).

    Args:
      grams: T mappings ``{kernel leaf path: G [in, in]}`` (from :func:`mergejax.regmean.gram_matrices`). A kernel is
        merged by regression only when every task has its Gram matrix. Traced data.
      alpha: off-diagonal scale in [0, 1] (paper's sweep 0.1-0.95; 1 = exact regression). Traced.
      rcond: relative eigenvalue cut-off of :func:`regmean_kernel`.
      weights: per-task weights w_i (set by a merge's ``weights=``): G_i -> w_i G_i, and a weighted mean elsewhere.

    Memory: the T Gram matrices of each layer plus a few ``in x in`` temporaries.
    """

    grams: Any
    alpha: Any = 0.9
    rcond: Any = 1e-6
    weights: Any = None

    def __post_init__(self):
        if not is_traced(self.alpha) and not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.grams, (list, tuple)) or not self.grams:
            raise ValueError("RegMean needs a list of Gram-matrix mappings, one per task")
        object.__setattr__(self, "grams", tuple(self.grams))


    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        if len(self.grams) != len(tvs):
            raise ValueError(f"RegMean has Gram matrices for {len(self.grams)} tasks, got {len(tvs)} task vectors")
        tables = [leaf_table(g) for g in self.grams]
        per_path: dict[str, tuple] = {}
        for path, x in paths_and_leaves(tvs[0]):
            if not is_float(x) or not all(path in t for t in tables):
                continue
            gs = tuple(t[path] for t in tables)
            if jnp.ndim(x) != 2 or tuple(jnp.shape(gs[0])) != (x.shape[0], x.shape[0]):
                raise ValueError(f"Gram matrix of {path!r} is {tuple(jnp.shape(gs[0]))}, the kernel is {tuple(x.shape)}")
            per_path[path] = gs
        weights = per_leaf_weights(self.weights, tvs[0], len(tvs)) if self.weights is not None else {}

        def fn(xs, i, ex):
            gs, w = ex
            if w is None:
                w = jnp.ones((len(xs),), xs[0].dtype)
            if gs is None:
                return [sum(w[t].astype(x.dtype) * x for t, x in enumerate(xs)) / jnp.sum(w).astype(xs[0].dtype)]
            scaled = [w[t] * scale_off_diagonal(jnp.asarray(g, xs[0].dtype), self.alpha) for t, g in enumerate(gs)]
            return [regmean_kernel(scaled, xs, self.rcond)]

        # leaf by leaf: batched (vmapped) eigh/matmuls have been seen to wedge XLA:CPU's Eigen thread pool
        return map_float_leaves(fn, tvs, out_count=1, extras=(per_path, weights), batch=False)
