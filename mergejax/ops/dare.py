"""DARE: Drop And REscale (Yu et al., 2024, "Language Models are Super Mario"), and its rescaling variants.

Eq. 2 of the paper: m ~ Bernoulli(p) per entry, tau_tilde = (1 - m) * tau, tau_hat = tau_tilde / (1 - p).
``rescale`` chooses the divisor: ``"inverse"`` is the paper's 1 - p; a float ``q`` is DAREx-q (Deng et al., 2024),
dividing by q instead; ``"l1"`` rescales each tensor so its L1 norm is unchanged (what mergekit does today).

Random stream. Every (task, leaf) pair has its own key ``fold_in(fold_in(key, task), leaf)``
(:func:`mergejax.ops.base.leaf_keys`). Two generators draw the mask from it:

* ``rng="hash"`` (default): a counter-based generator fused into the merge. Two 32-bit words ``(a, b)`` are drawn
  once per leaf from its key (``jax.random.bits``, threefry); entry ``i`` (its row-major index in the whole leaf) gets
  the 32 bits ``h(i) = mix(mix(i ^ a) + b)``, ``mix`` being Wellons' "lowbias32" integer finalizer
  (``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16``, a bijection of uint32 with
  near-ideal avalanche), and is dropped iff ``h(i) < round(p * 2**32)``. Four multiplies per entry, so the mask costs
  about one pass over the leaf instead of threefry's ~40 on CPU. The index is the *global* one (an iota over the
  leaf's shape), so a sharded leaf gets, shard by shard, exactly the bits of the unsharded one; under ``jax.vmap``
  (same-shaped leaves batched, the leaf index traced) each leaf still has its own pair ``(a, b)``.
* ``rng="jax"``: ``jax.random.bernoulli`` on the leaf's key (the threefry stream; JAX's partitionable threefry draws
  a sharded leaf shard by shard).

Same key, same mask, for either generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax.ops.base import TaskVectors, Transform, check_fraction, leaf_keys, map_float_leaves

__all__ = ["Rescale", "Rng", "check_rescale", "check_rng", "hash_bits", "hash_words", "host_hash_words",
           "bits_from_words", "keep_mask", "drop_and_rescale", "DareDrop"]

Rescale = Union[Literal["inverse", "l1"], float]
Rng = Literal["hash", "jax"]


def check_rescale(rescale: Rescale) -> None:
    """Raises ``ValueError`` unless ``rescale`` is "inverse", "l1" or a positive float q."""
    if isinstance(rescale, str):
        if rescale not in ("inverse", "l1"):
            raise ValueError(f"rescale must be 'inverse', 'l1' or a positive float q, got {rescale!r}")
    elif not float(rescale) > 0:
        raise ValueError(f"rescale q must be > 0, got {rescale!r}")


def check_rng(rng: str) -> None:
    """Raises ``ValueError`` unless ``rng`` is "hash" or "jax"."""
    if rng not in ("hash", "jax"):
        raise ValueError(f"rng must be 'hash' or 'jax', got {rng!r}")


def _mix(x: jax.Array) -> jax.Array:
    """Wellons' lowbias32 finalizer: a bijection of uint32 whose output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _global_index(shape: tuple[int, ...], sharding=None) -> jax.Array:
    """uint32 row-major index of every entry of an array of ``shape`` (an iota, so it shards with the array)."""
    if len(shape) == 0:
        return jnp.zeros((), jnp.uint32)
    idx = None
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        term = lax.broadcasted_iota(jnp.uint32, shape, d, out_sharding=sharding) * jnp.uint32(stride)
        idx = term if idx is None else idx + term
        stride *= shape[d]
    return idx


def hash_bits(key: jax.Array, shape: tuple[int, ...], sharding=None) -> jax.Array:
    """32 counter-based random bits per entry of an array of ``shape``: ``mix(mix(i ^ a) + b)`` (module docstring).

    Args:
      key: the PRNG key of this (task, leaf); two uint32 words ``(a, b)`` are drawn from it.
      shape: the leaf's shape (at most 2**32 entries).
      sharding: optional output sharding (Explicit meshes).

    Returns:
      uint32 array of ``shape``.
    """
    return bits_from_words(hash_words(key), shape, sharding)


def hash_words(key: jax.Array) -> jax.Array:
    """The two uint32 words ``(a, b)`` of the hash generator, drawn from one (task, leaf) key (threefry).

    Args:
      key: the PRNG key of this (task, leaf).

    Returns:
      uint32 [2].
    """
    return jax.random.bits(key, (2,), jnp.uint32)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32_np(k1: np.ndarray, k2: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Threefry-2x32 block cipher (20 rounds, Salmon et al., 2011) in numpy, as ``jax.random``'s threefry
    computes it: the same key schedule, rotations and injections."""
    with np.errstate(over="ignore"):
        ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
        x0, x1 = x0 + ks[0], x1 + ks[1]
        for i in range(5):
            for r in _ROTATIONS[i % 2]:
                x0 = x0 + x1
                x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
            x0 = x0 + ks[(i + 1) % 3]
            x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _fold_in_np(key: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``jax.random.fold_in`` of raw threefry keys [..., 2] with uint32 data (broadcast), in numpy."""
    zero = np.zeros_like(data, np.uint32)
    a, b = _threefry2x32_np(key[..., 0], key[..., 1], zero, data.astype(np.uint32))
    return np.stack([a, b], axis=-1)


def host_hash_words(key: jax.Array, stage_ids: tuple[int, ...], n_tasks: int, n_leaves: int) -> np.ndarray | None:
    """:func:`hash_words` of ``leaf_keys(fold_in(key, i), t, leaf)`` for every stage i, task t and leaf, on the host
    (numpy threefry, no compilation), or None when ``key`` is not a threefry key drawn with JAX's partitionable
    threefry (the default), whose bits this reproduces.

    Args:
      key: the merge's ``jax.random`` key.
      stage_ids: the chain positions of the word-drawing stages.
      n_tasks: T.
      n_leaves: L, the merged float leaves.

    Returns:
      uint32 [L, S, T, 2], or None.
    """
    if not jax.config.jax_threefry_partitionable:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape or "threefry2x32" not in str(jax.random.key_impl(key)):
            return None
        raw = np.asarray(jax.random.key_data(key), np.uint32)
    elif key.shape == (2,) and key.dtype == jnp.uint32 and jax.config.jax_default_prng_impl == "threefry2x32":
        raw = np.asarray(key, np.uint32)
    else:
        return None
    stage = _fold_in_np(raw[None], np.asarray(stage_ids, np.uint32))  # [S, 2]
    task = _fold_in_np(stage[:, None], np.arange(n_tasks, dtype=np.uint32)[None])  # [S, T, 2]
    leaf = _fold_in_np(task[None], np.arange(n_leaves, dtype=np.uint32)[:, None, None])  # [L, S, T, 2]
    # jax.random.bits(k, (2,), uint32): counts (hi, lo) = (0, 0) and (0, 1), each block's two outputs xor-ed
    zero = np.zeros(leaf.shape[:-1], np.uint32)
    words = [np.bitwise_xor(*_threefry2x32_np(leaf[..., 0], leaf[..., 1], zero, zero + np.uint32(c))) for c in (0, 1)]
    return np.stack(words, axis=-1)


def bits_from_words(words: jax.Array, shape: tuple[int, ...], sharding=None) -> jax.Array:
    """``mix(mix(i ^ a) + b)`` per entry from the words of :func:`hash_words` (derived beforehand, e.g. on the host
    for every leaf at once, so a per-leaf program holds no threefry code).

    Args:
      words: uint32 [2], ``(a, b)``.
      shape: the leaf's shape (at most 2**32 entries).
      sharding: optional output sharding (Explicit meshes).

    Returns:
      uint32 array of ``shape``.
    """
    if math.prod(shape) > 2**32:
        raise ValueError(f"a leaf of shape {shape} has more than 2**32 entries")
    return _mix(_mix(_global_index(tuple(shape), sharding) ^ words[0]) + words[1])


def _drop_threshold(drop_rate) -> jax.Array:
    """round(p * 2**32) as uint32, p in [0, 1) (float32 arithmetic: p is resolved to 2**-24)."""
    t = jnp.round(jnp.asarray(drop_rate, jnp.float32) * jnp.float32(2.0**32))
    return jnp.minimum(t, jnp.float32(4294967040.0)).astype(jnp.uint32)  # the largest float32 below 2**32


def keep_mask(x: jax.Array, key: jax.Array, drop_rate, rng: Rng = "hash", *, words: jax.Array | None = None
              ) -> jax.Array:
    """Boolean mask of the entries of ``x`` DARE keeps (each dropped with probability ``drop_rate``).

    ``words``: the hash generator's ``hash_words(key)``, when derived beforehand (``key`` is then unused).
    """
    check_rng(rng)
    sharding = jax.typeof(x).sharding
    if rng == "jax":
        return jax.random.bernoulli(key, 1.0 - drop_rate, jnp.shape(x), out_sharding=sharding)
    bits = hash_bits(key, jnp.shape(x), sharding) if words is None else bits_from_words(words, jnp.shape(x), sharding)
    return bits >= _drop_threshold(drop_rate)


def drop_and_rescale(
    x: jax.Array, key: jax.Array | None, drop_rate: float, rescale: Rescale = "inverse", *, rng: Rng = "hash",
    words: jax.Array | None = None,
) -> jax.Array:
    """Drops each entry of ``x`` with probability ``drop_rate`` and rescales the survivors (DARE Eq. 2).

    Args:
      x: one task-vector leaf (float32 or wider).
      key: the PRNG key of this leaf.
      drop_rate: p in [0, 1).
      rescale: "inverse" (divide by 1 - p), "l1" (keep ||x||_1), or a float q (DAREx-q: divide by q).
      rng: "hash" (counter-based, fused; default) or "jax" (``jax.random.bernoulli``); see the module docstring.
      words: for ``rng="hash"``, ``hash_words(key)`` derived beforehand (then ``key`` is unused).
    """
    keep = keep_mask(x, key, drop_rate, rng, words=words)
    kept = jnp.where(keep, x, jnp.zeros_like(x))
    if isinstance(rescale, str) and rescale == "inverse":
        return kept / (1.0 - jnp.asarray(drop_rate, x.dtype))
    if isinstance(rescale, str) and rescale == "l1":
        before = jnp.sum(jnp.abs(x))
        after = jnp.sum(jnp.abs(kept))
        return kept * jnp.where(after > 0, before / jnp.where(after > 0, after, 1), 0).astype(x.dtype)
    return kept / jnp.asarray(rescale, x.dtype)


@dataclass(frozen=True)
class DareDrop(Transform):
    """Chain stage: DARE drop-and-rescale of every task vector (needs a ``key``).

    Args:
      drop_rate: p, the probability of dropping an entry (default 0.9).
      rescale: "inverse", "l1" or a float q (see :func:`drop_and_rescale`).
      rng: "hash" (counter-based generator fused into the merge, default) or "jax" (threefry bernoulli).
    """

    drop_rate: float = 0.9
    rescale: Rescale = "inverse"
    rng: Rng = "hash"
    needs_key: ClassVar[bool] = True
    leafwise: ClassVar[bool] = True

    def __post_init__(self):
        check_fraction("drop_rate", self.drop_rate, upper_open=True)
        check_rescale(self.rescale)
        check_rng(self.rng)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        if key is None:
            raise ValueError("DareDrop needs an explicit jax.random key")

        def per_task(t):
            return map_float_leaves(
                lambda xs, i: [
                    drop_and_rescale(xs[0], leaf_keys(key, t, i), self.drop_rate, self.rescale, rng=self.rng)
                ],
                (tvs[t],),
            )[0]

        return tuple(per_task(t) for t in range(len(tvs)))

    @property
    def host_words(self) -> bool:
        """Whether the mask needs only :func:`hash_words` per (task, leaf), which a leaf-by-leaf schedule derives on
        the host for every leaf at once (:mod:`mergejax.ops.schedule`), so its programs hold no threefry code."""
        return self.rng == "hash"

    def with_words(self, tvs: TaskVectors, words: jax.Array) -> TaskVectors:
        """The stage on trees of one float leaf, given that leaf's words: uint32 [T, 2], row t is
        ``hash_words(leaf_keys(key, t, leaf))`` (the same mask as ``self(tvs, key)``)."""
        return tuple(
            map_float_leaves(lambda xs, i, t=t: [drop_and_rescale(xs[0], None, self.drop_rate, self.rescale,
                                                                  rng=self.rng, words=words[t])], (tv,))[0]
            for t, tv in enumerate(tvs)
        )
