"""DARE: Drop And REscale (Yu et al., 2024, "Language Models are Super Mario"), and its rescaling variants.

Eq. 2 of the paper: m ~ Bernoulli(p) per entry, tau_tilde = (1 - m) * tau, tau_hat = tau_tilde / (1 - p).
``rescale`` chooses the divisor: ``"inverse"`` is the paper's 1 - p; a float ``q`` is DAREx-q (Deng et al., 2024),
dividing by q instead; ``"l1"`` rescales each tensor so its L1 norm is unchanged (what mergekit does today).
Every (task, leaf) pair draws from its own stream ``fold_in(fold_in(key, task), leaf)``; random bits are generated
where the tensor lives, so a sharded tensor is dropped shard by shard (JAX's partitionable threefry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import jax
import jax.numpy as jnp

from mergejax.ops.base import TaskVectors, Transform, check_fraction, leaf_keys, map_float_leaves

__all__ = ["Rescale", "check_rescale", "drop_and_rescale", "DareDrop"]

Rescale = Union[Literal["inverse", "l1"], float]


def check_rescale(rescale: Rescale) -> None:
    """Raises ``ValueError`` unless ``rescale`` is "inverse", "l1" or a positive float q."""
    if isinstance(rescale, str):
        if rescale not in ("inverse", "l1"):
            raise ValueError(f"rescale must be 'inverse', 'l1' or a positive float q, got {rescale!r}")
    elif not float(rescale) > 0:
        raise ValueError(f"rescale q must be > 0, got {rescale!r}")


def drop_and_rescale(x: jax.Array, key: jax.Array, drop_rate: float, rescale: Rescale = "inverse") -> jax.Array:
    """Drops each entry of ``x`` with probability ``drop_rate`` and rescales the survivors (DARE Eq. 2).

    Args:
      x: one task-vector leaf (float32 or wider).
      key: the PRNG key of this leaf.
      drop_rate: p in [0, 1).
      rescale: "inverse" (divide by 1 - p), "l1" (keep ||x||_1), or a float q (DAREx-q: divide by q).
    """
    keep = jax.random.bernoulli(key, 1.0 - drop_rate, jnp.shape(x), out_sharding=jax.typeof(x).sharding)
    kept = jnp.where(keep, x, jnp.zeros_like(x))
    if rescale == "inverse":
        return kept / jnp.asarray(1.0 - drop_rate, x.dtype)
    if rescale == "l1":
        before = jnp.sum(jnp.abs(x))
        after = jnp.sum(jnp.abs(kept))
        return kept * jnp.where(after > 0, before / jnp.where(after > 0, after, 1), 0).astype(x.dtype)
    return kept / jnp.asarray(rescale, x.dtype)


@dataclass(frozen=True)
class DareDrop(Transform):
    """Chain stage: DARE drop-and-rescale of every task vector (needs a ``key``)."""

    drop_rate: float = 0.9
    rescale: Rescale = "inverse"
    needs_key: ClassVar[bool] = True

    def __post_init__(self):
        check_fraction("drop_rate", self.drop_rate, upper_open=True)
        check_rescale(self.rescale)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        if key is None:
            raise ValueError("DareDrop needs an explicit jax.random key")

        def per_task(t):
            return map_float_leaves(
                lambda xs, i: [drop_and_rescale(xs[0], leaf_keys(key, t, i), self.drop_rate, self.rescale)],
                (tvs[t],),
            )[0]

        return tuple(per_task(t) for t in range(len(tvs)))
