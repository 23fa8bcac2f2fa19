"""Exact k-th largest value by counting: a radix select on order-preserving float bit patterns.

The TIES trim, ComPEFT, Breadcrumbs and PCB all need the k-th largest magnitude of a task vector, over one tensor or
over the whole model. Sorting (``jnp.sort``, ``jnp.quantile``, ``lax.top_k``) costs O(n log n), is slow on CPU and
gathers sharded tensors. Here the threshold is found by *counting*: floats are mapped to unsigned integers whose
order is the float order, and the answer is built ``radix_bits`` at a time from the most significant bit. Each pass
counts, for the ``2**radix_bits - 1`` candidate prefixes, how many keys are >= the candidate (one variadic reduction,
so one read of the data), and keeps the largest candidate whose count is still >= k. With 4-bit digits a float32
threshold takes exactly 8 passes (the default on GPU/TPU; CPU defaults to 2-bit digits, see
:func:`default_radix_bits`). A count is a sum, which XLA reduces across devices; no tensor is ever gathered.

The result is exact: the largest key ``t`` with ``#{x : key(x) >= t} >= k``, i.e. the k-th largest value with
multiplicity, so ``key(x) >= t`` keeps every entry tied at the threshold (at least k entries).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "DEFAULT_RADIX_BITS",
    "default_radix_bits",
    "ordered_key",
    "key_to_float",
    "kth_largest",
    "kth_largest_groups",
    "kth_largest_magnitude",
    "kth_largest_per_row",
    "count_ge",
]

DEFAULT_RADIX_BITS = None
"""``None`` picks :func:`default_radix_bits` for the backend at trace time."""


def default_radix_bits() -> int:
    """Bits per counting pass: 4 on GPU/TPU (8 passes for float32; memory-bound there, so fewer passes win) and 2 on
    CPU (16 passes, but 3 instead of 15 comparisons per entry and pass: CPU is compute-bound here, and XLA compiles
    the smaller loop body ~3x faster)."""
    return 2 if jax.default_backend() == "cpu" else 4

_KEY = {4: (jnp.uint32, jnp.float32, 32), 8: (jnp.uint64, jnp.float64, 64)}


def _key_spec(dtype) -> tuple:
    dtype = jnp.promote_types(dtype, jnp.float32)
    return _KEY[np.dtype(dtype).itemsize]


def ordered_key(x: jax.Array) -> jax.Array:
    """Maps floats to unsigned integers with the same order (IEEE-754 trick: flip negatives, set the sign bit of
    non-negatives). bf16/f16 are widened to float32 first, which preserves order."""
    key_t, float_t, nbits = _key_spec(x.dtype)
    bits = lax.bitcast_convert_type(jnp.asarray(x, float_t), key_t)
    sign = key_t(1) << (nbits - 1)
    return jnp.where((bits & sign) != 0, ~bits, bits | sign)


def key_to_float(key: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`ordered_key` (for the float32 / float64 key types)."""
    key_t, float_t, nbits = _key_spec(dtype)
    key = jnp.asarray(key, key_t)
    sign = key_t(1) << (nbits - 1)
    bits = jnp.where((key & sign) != 0, key & ~sign, ~key)
    return lax.bitcast_convert_type(bits, float_t)


def _sum_counts(flags: Sequence[jax.Array], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Counts the True entries of several boolean arrays over ``axes``, reading the data once.

    On CPU one variadic reduction (XLA:CPU does not fuse sibling reductions; separate sums would read the data once
    per candidate, ~10x slower). Elsewhere plain sums: XLA:GPU/TPU fuse them into one pass, and the SPMD partitioner
    turns them into all-reduces that XLA combines into one per pass (a variadic reduce becomes an all-gather of
    per-device partial counts per operand instead: still scalars, but one collective each).
    """
    ops = tuple(f.astype(jnp.int32) for f in flags)
    if not axes:
        return ops
    if jax.default_backend() != "cpu":
        return tuple(jnp.sum(f, axis=axes, dtype=jnp.int32) for f in flags)
    zeros = tuple(jnp.int32(0) for _ in ops)
    return tuple(lax.reduce(ops, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), axes))


def _radix_select(
    enough_fn: Callable[[list[jax.Array]], list[jax.Array]],
    prefix0: jax.Array,
    nbits: int,
    radix_bits: int,
) -> jax.Array:
    """Builds the largest key t with count(key >= t) >= k from the top bit down, ``radix_bits`` per pass.

    ``enough_fn(candidates)`` returns, per candidate key array, the boolean array "count(key >= candidate) >= k".

    ``prefix0`` may be an array (one independent selection per entry); the passes run in a ``lax.fori_loop`` so the
    program holds one copy of the counting code whatever the number of passes.
    """
    if radix_bits is None:
        radix_bits = default_radix_bits()
    if radix_bits not in (1, 2, 4, 8) or nbits % radix_bits:
        raise ValueError(f"radix_bits must be 1, 2, 4 or 8, got {radix_bits}")
    key_t = prefix0.dtype.type
    passes = nbits // radix_bits

    def one_pass(p, prefix):
        shift = (nbits - radix_bits * (p + 1)).astype(prefix.dtype)
        cands = [prefix | (key_t(d) << shift) for d in range(1, 2**radix_bits)]
        digit = sum(e.astype(prefix.dtype) for e in enough_fn(cands))
        return prefix | (digit << shift)

    return lax.fori_loop(0, passes, one_pass, prefix0)


_HALF = 1 << 16


def _split_count(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    return c >> 16, c & (_HALF - 1)


def _total_ge(parts: list[tuple[jax.Array, jax.Array]], k: int) -> jax.Array:
    """Exact ``sum(counts) >= k`` for totals up to 2**47, from int32 (hi, lo) 16-bit halves of per-leaf counts."""
    hi = sum(p[0] for p in parts)
    lo = sum(p[1] for p in parts)
    hi = hi + (lo >> 16)
    lo = lo & (_HALF - 1)
    k_hi, k_lo = k >> 16, k & (_HALF - 1)
    return (hi > k_hi) | ((hi == k_hi) & (lo >= k_lo))


def count_ge(
    leaves: Sequence[jax.Array], key_thresholds: Sequence[jax.Array], *, magnitude: bool = False
) -> list[list[jax.Array]]:
    """Per leaf, the int32 counts of entries whose ordered key (of |x| if ``magnitude``) is >= each threshold.

    One read per leaf for all thresholds. With ``magnitude`` the absolute value is taken inside the pass, so no
    |x| copy of the leaf is ever materialised.
    """
    out = []
    for x in leaves:
        if x.size >= 2**31:
            raise ValueError(f"a single leaf of {x.size} elements is too large for int32 counts")
        kx = ordered_key(jnp.abs(x) if magnitude else x)
        out.append(list(_sum_counts([kx >= t for t in key_thresholds], tuple(range(kx.ndim)))))
    return out


def kth_largest_groups(
    groups: Sequence[Sequence[jax.Array]],
    ks: Sequence[int],
    *,
    radix_bits: int | None = DEFAULT_RADIX_BITS,
    magnitude: bool = False,
) -> jax.Array:
    """Ordered keys of the k_g-th largest value of each group of leaves, all groups in one loop of passes.

    Args:
      groups: G lists of float arrays; a group's entries are all its leaves' entries taken together.
      ks: static ranks, 1 <= k_g <= n_g (1 = the maximum).
      radix_bits: bits decided per pass; a float32 threshold takes 32 / radix_bits passes.
      magnitude: select on |x| (computed inside each pass; no copy of |x| is kept).

    Returns:
      uint keys of shape [G]; ``ordered_key(x) >= t[g]`` selects group g's top k (and every tie at the threshold).
    """
    groups = [[jnp.asarray(x) for x in g] for g in groups]
    for g, k in zip(groups, ks):
        n = sum(int(x.size) for x in g)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] (the number of entries), got {k}")
    key_t, _, nbits = _key_spec(jnp.result_type(*[x for g in groups for x in g]))

    def enough(cands: list[jax.Array]) -> list[jax.Array]:
        flags = []  # [G][D]: group g has at least k_g keys >= candidate d
        for gi, (g, k) in enumerate(zip(groups, ks)):
            per_leaf = count_ge(g, [c[gi] for c in cands], magnitude=magnitude)  # one read per leaf
            flags.append([_total_ge([_split_count(pl[d]) for pl in per_leaf], k) for d in range(len(cands))])
        return [jnp.stack([f[d] for f in flags]) for d in range(len(cands))]

    return _radix_select(enough, jnp.zeros((len(groups),), key_t), nbits, radix_bits)


def kth_largest(leaves: Sequence[jax.Array], k: int, *, radix_bits: int | None = DEFAULT_RADIX_BITS) -> jax.Array:
    """Ordered key of the k-th largest value over all entries of ``leaves`` taken together (1 <= k <= n)."""
    return kth_largest_groups([leaves], [k], radix_bits=radix_bits)[0]


def kth_largest_magnitude(
    leaves: Sequence[jax.Array], k: int, *, radix_bits: int | None = DEFAULT_RADIX_BITS
) -> jax.Array:
    """The k-th largest |x| over all entries of ``leaves`` (float32, or float64 for float64 input); k=0 gives +inf."""
    leaves = [jnp.asarray(x) for x in leaves]
    float_t = _key_spec(jnp.result_type(*leaves))[1]
    if k == 0:
        return jnp.asarray(jnp.inf, float_t)
    key = kth_largest_groups([leaves], [k], radix_bits=radix_bits, magnitude=True)[0]
    return key_to_float(key, float_t)


def kth_largest_per_row(
    x: jax.Array, k: int | jax.Array, *, radix_bits: int | None = DEFAULT_RADIX_BITS
) -> jax.Array:
    """Ordered keys of the k-th largest value of each row (last axis) of ``x``, shape ``x.shape[:-1] + (1,)``.

    ``k`` may be a scalar or an int32 array broadcastable to that shape; rows with k=0 get the largest key
    (use a separate ``k > 0`` test to select nothing there). Counts are per row, so a sharded last axis needs only
    an all-reduce of per-row counts.
    """
    x = jnp.asarray(x)
    key_t, _, nbits = _key_spec(x.dtype)
    kx = ordered_key(x)
    if kx.ndim == 0:
        kx = kx[None]
    k = jnp.asarray(k, jnp.int32)
    prefix0 = jnp.zeros_like(jnp.max(kx, axis=-1, keepdims=True))  # carries the rows' sharding (Explicit meshes)

    def enough(cands: list[jax.Array]) -> list[jax.Array]:
        counts = _sum_counts([kx >= c for c in cands], (kx.ndim - 1,))
        return [c[..., None] >= k for c in counts]

    return _radix_select(enough, prefix0, nbits, radix_bits)
