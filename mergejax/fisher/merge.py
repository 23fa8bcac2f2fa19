"""Fisher-weighted merging (Matena and Raffel, 2022, Eq. 2), a one-line chain over :class:`~mergejax.ops.FisherMean`.

References:
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.merge import chain
from mergejax.model import head_flags
from mergejax.ops.fisher_mean import FisherMean
from mergejax.tree import PyTree, check_finite, is_float, paths_and_leaves, validate_like


@jax.jit
def _global_norms(fishers: list[list[jax.Array]]) -> jax.Array:
    return jnp.stack([jnp.sqrt(sum(jnp.sum(jnp.square(f.astype(jnp.float32))) for f in fs)) for fs in fishers])


def fisher_merge(
    models: Sequence[PyTree],
    fishers: Sequence[PyTree],
    *,
    weights: Sequence[float] | None = None,
    floor: float = 1e-6,
    normalize: bool = False,
    heads: str | PyTree | None = None,
    base: PyTree | None = None,
) -> PyTree:
    """Fisher-weighted average theta* = sum_j w_j F_j theta_j / sum_j w_j F_j per coordinate (Matena and Raffel, Eq. 2).

    The one-line chain ``chain(FisherMean(fishers, floor, floor_mode="max"))`` applied to ``base`` (default:
    ``models[0]``): on task vectors the Fisher mean is the same merge, so it composes with other stages (e.g.
    ``chain(Trim(0.2), ElectSign(), FisherMean(F))``, a Fisher-weighted TIES).

    Each F_j is floored at ``floor`` (so coordinates no model cares about get the weighted average). With
    ``normalize``, each model's weight is first divided by the global L2 norm of its Fisher over the merged leaves,
    w_j <- w_j / ||F_j||_2, so that models whose Fishers differ in scale count alike. Leaves named by ``heads`` stay per
    task: merged = base + sum_j (theta_j - base), i.e. each model keeps what it changed (its own head).
    Non-float leaves come from ``models[0]``. Memory peak: the inputs plus one model.

    Args:
        models: M parameter trees with one structure.
        fishers: M diagonal Fishers (from :func:`diagonal`), each with its model's structure and shapes.
        weights: M non-negative model weights (default uniform).
        floor: lower bound applied to every Fisher value (after normalisation).
        normalize: divide each model's weight by its Fisher's global L2 norm.
        heads: leaves kept per task (regex or bool mask, see :func:`head_flags`); needs ``base``.
        base: the common pre-trained model, required with ``heads``.

    Returns:
        The merged tree, with ``models[0]``'s dtypes.

    Raises:
        ValueError: mismatched counts, structures, shapes; negative or all-zero weights; non-finite Fishers; a zero
            Fisher with ``normalize``; ``heads`` without ``base``.
    """
    models = tuple(models)
    fishers = tuple(fishers)
    if not models:
        raise ValueError("fisher_merge needs at least one model")
    if len(fishers) != len(models):
        raise ValueError(f"got {len(models)} models but {len(fishers)} Fishers")
    validate_like(models[0], models[1:], what="models")
    ref_items = paths_and_leaves(models[0])
    for j, f in enumerate(fishers):
        if jax.tree_util.tree_structure(f) != jax.tree_util.tree_structure(models[0]):
            raise ValueError(f"fishers[{j}] does not have the models' tree structure")
        for (path, x), (_, fx) in zip(ref_items, paths_and_leaves(f)):
            if is_float(x) and np.shape(fx) != np.shape(x):
                raise ValueError(f"fishers[{j}] leaf '{path}' has shape {np.shape(fx)}, the model has {np.shape(x)}")
        check_finite(f, what=f"fishers[{j}]")
    w = np.full(len(models), 1.0 / len(models)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(models),) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"weights must be {len(models)} non-negative numbers, not all zero; got {weights}")
    if floor < 0:
        raise ValueError(f"floor must be >= 0, got {floor}")
    flags = head_flags(models[0], heads)
    if any(flags) and base is None:
        raise ValueError("heads are kept per task as base + sum_j (theta_j - base): pass base=")
    if base is not None:
        validate_like(base, models, what="models")

    merged_idx = [i for i, (_, x) in enumerate(ref_items) if is_float(x) and not flags[i]]
    if normalize:
        fisher_leaves = [jax.tree_util.tree_leaves(f) for f in fishers]
        norms = np.asarray(_global_norms([[fl[i] for i in merged_idx] for fl in fisher_leaves]), np.float64)
        if np.any(norms == 0):
            raise ValueError(f"cannot normalise: Fishers {np.flatnonzero(norms == 0).tolist()} are all zero")
        w = w / norms
    merger = chain(FisherMean(fishers, floor=float(floor), floor_mode="max"))
    return merger(models[0] if base is None else base, models, weights=jnp.asarray(w, jnp.float32), heads=heads)
