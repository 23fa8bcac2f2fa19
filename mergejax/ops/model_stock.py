"""Model Stock (Jang et al., ECCV 2024, "Model Stock: All we need is just a few fine-tuned models", Eq. 2; FusionBench
``method/model_stock/model_stock.py``), for N >= 2 fine-tunes of the *same* task from one pre-trained model.

Per leaf: theta = t * mean_i(theta_i) + (1 - t) theta_0, i.e. tau_m = t * mean_i(tau_i), with
``t = N cos(phi) / ((N - 1) cos(phi) + 1 + 1e-8)`` and phi the mean of the pairwise angles between the task vectors
(FusionBench averages the angles in degrees, then takes the cosine; cos is clamped to [-1, 1] and its denominator
gets + 1e-8, as there).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mergejax.ops.base import Reduction
from mergejax.ops.matrix import PreWeightedInputs
from mergejax.ops.reduce import sum_leaves

__all__ = ["model_stock_ratio", "ModelStock"]

_EPS = 1e-8


def model_stock_ratio(xs: list[jax.Array]) -> jax.Array:
    """The interpolation ratio t of one leaf from its N task vectors (N >= 2)."""
    n = len(xs)
    if n < 2:
        raise ValueError(f"Model Stock needs at least 2 fine-tuned models, got {n}")
    angles = []
    for i in range(n):
        for j in range(i + 1, n):
            a, b = xs[i], xs[j]
            cos = jnp.sum(a * b) / (jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)) + _EPS)
            angles.append(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
    c = jnp.cos(sum(angles) / len(angles))
    return n * c / ((n - 1) * c + 1 + _EPS)


@dataclass(frozen=True)
class ModelStock(PreWeightedInputs, Reduction):
    """Reduction: tau_m = t * mean(tau) per leaf (:func:`model_stock_ratio`)."""

    def combine(self, xs):
        return model_stock_ratio(xs).astype(xs[0].dtype) * (sum_leaves(xs) / len(xs))
