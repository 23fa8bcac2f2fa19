"""Exact k-th largest value by counting: order-preserving float bit patterns, counted against candidate thresholds.

The TIES trim, ComPEFT, Breadcrumbs and PCB all need the k-th largest magnitude of a task vector, over one tensor or
over the whole model. Sorting (``jnp.sort``, ``jnp.quantile``, ``lax.top_k``) costs O(n log n), is slow on CPU and
gathers sharded tensors. Here the threshold is found by *counting*: floats are mapped to unsigned integers whose
order is the float order (:func:`ordered_key`), and one *pass* counts, in one read of the data, how many keys are
>= each of a few candidate keys. A count is a sum, which XLA reduces across devices; no tensor is ever gathered.

Two searches share that counting pass:

* **Bracketing search** (the default, ``radix_bits=None``): a Floyd-Rivest-style interpolation search. The answer is
  kept in a bracket ``[lo, hi]`` of keys with ``count(>= lo) >= k > count(>= hi + 1)``. The first pass counts 16
  candidates read off a sorted strided sample of the group (order statistics around rank ``k s / n``, spread by the
  sample's binomial standard deviation, plus the central one + 1 for an exact hit on a tied value). Every later pass
  counts candidates inside the bracket: ``lo + 1`` and ``hi`` (exact hits when entries tie at an end), evenly spaced
  ones (the guarantee: every pass at least halves the bracket in key space, so the search always ends) and the rest
  around the linear interpolation of the counts at the bracket's ends, spread by the binomial error of that estimate;
  a bracket of at most D keys is counted exhaustively. 8 candidates per pass on CPU (compute-bound there: a pass costs
  about a quarter of a read per candidate), 16 elsewhere. The loop stops when every bracket holds one key. On smooth
  data the sampled pass leaves ~0.1% of the entries in the bracket and two to four interpolation passes finish
  (``experiments/bench_merge.py`` reports the passes); a rank in the extreme tails (beyond the sample's reach) first
  takes one min/max pass. Groups of at most :data:`SORT_MAX` entries are sorted outright (no pass at all). A leaf
  that may be sharded (its abstract mesh has more than one device and its layout is not known to be replicated) is
  never sampled, sorted or stacked, only counted, so counts stay the only cross-device traffic; a group holding one
  starts from the min/max pass and the interpolation passes (the bracket-miss path: the same loop, never silent, only
  more passes).
* **Radix select** (``radix_bits`` = 1, 2, 4 or 8): the answer is built ``radix_bits`` at a time from the most
  significant bit, counting the ``2**radix_bits - 1`` candidate prefixes per pass: exactly ``32 / radix_bits``
  passes for float32.

Driven from the host leaf by leaf (:func:`kth_largest_scheduled`, an eager merge), the bracketing search may end with a
**gathering pass** instead of its last two to four counting passes: once a bracket holds few entries
(:func:`gather_ready`), one pass reads each leaf as rows of :data:`GATHER_ROW` entries and returns per row the counts
above and inside the bracket and its smallest and largest key inside; where no row holds three or more bracket keys
these are all of them, and the host picks the exact k-th largest (:func:`gathered_kth`); otherwise (a miss, reported)
the counting passes go on.

Same-(shape, dtype) leaves of all groups (up to :data:`STACK_MAX` entries each) are stacked inside each pass and
counted by one batched reduction, so the program holds one copy of the counting code per leaf *shape*, not per leaf;
larger leaves are counted one by one (no stacked copy of the big kernels). Counts are exact: int32 per leaf, summed as 16-bit
(hi, lo) halves, so group totals up to 2**47 compare exactly with k.

The result is exact: the largest key ``t`` with ``#{x : key(x) >= t} >= k``, i.e. the k-th largest value with
multiplicity, so ``key(x) >= t`` keeps every entry tied at the threshold (at least k entries). Both searches are
deterministic functions of the data.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "DEFAULT_RADIX_BITS",
    "SORT_MAX",
    "SAMPLE_SIZE",
    "STACK_MAX",
    "default_radix_bits",
    "ordered_key",
    "key_to_float",
    "kth_largest",
    "kth_largest_groups",
    "kth_largest_groups_with_passes",
    "kth_largest_magnitude",
    "kth_largest_per_row",
    "count_ge",
    "kth_largest_scheduled",
    "GATHER_ROW",
    "GATHER_MISS",
    "gather_ready",
    "gather_row",
    "gathered_kth",
    "gather_summary",
    "merge_summaries",
]

DEFAULT_RADIX_BITS = None
"""``None``: the bracketing search; an int: the radix select with that many bits per pass."""

SORT_MAX = 1 << 14
"""Groups of at most this many entries (and no possibly-sharded leaf) are sorted instead of counted."""

SAMPLE_SIZE = 1 << 14
"""About this many entries of a larger group are sampled (strided) to place the first pass's candidates."""

STACK_MAX = 1 << 16
"""Same-shaped leaves up to this size are stacked and counted by one batched reduction (one copy of the code per
shape); larger ones are counted one by one, so no stacked copy of a model's big kernels is ever made."""

_D = 16  # candidates counted per pass of the bracketing search

GATHER_ROW = 128
"""A gathering pass (:func:`kth_largest_scheduled`) reads a leaf as rows of this many entries (a divisor of its size
of at least 16, else the whole leaf as one row): per row, the number of keys above the bracket and inside it, and
the smallest and largest key inside."""

GATHER_MISS = 0.01
"""A group's gathering pass runs once its bracket holds so few entries (by the counts at its ends) that, were they
spread at random over its rows, the expected number of rows holding three or more (whose middle keys the pass
cannot see: a miss) is at most this: m**3 / (6 rows**2) <= GATHER_MISS (:func:`gather_ready`)."""


def gather_ready(m: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whether brackets of about ``m`` entries over ``rows`` rows are small enough to gather (:data:`GATHER_MISS`)."""
    return np.asarray(m, np.float64) ** 3 <= 6 * GATHER_MISS * np.asarray(rows, np.float64) ** 2


def default_radix_bits() -> int:
    """Bits per counting pass of the radix select: 4 on GPU/TPU (8 passes for float32; memory-bound there, so fewer
    passes win) and 2 on CPU (16 passes, but 3 instead of 15 comparisons per entry and pass: CPU is compute-bound
    here)."""
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


def key_to_float(key: jax.Array | np.ndarray, dtype=jnp.float32) -> jax.Array | np.ndarray:
    """Inverse of :func:`ordered_key` (for the float32 / float64 key types). A numpy key (a statistic computed on the
    host) is converted with numpy, so the host side of a leaf-by-leaf search compiles nothing."""
    key_t, float_t, nbits = _key_spec(dtype)
    if isinstance(key, (np.ndarray, np.generic)):
        kt = np.dtype(key_t).type
        key = np.asarray(key, kt)
        sign = kt(1) << kt(nbits - 1)
        return np.where((key & sign) != 0, key & ~sign, ~key).astype(kt).view(np.dtype(float_t))
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


_HALF = 1 << 16


def _split_count(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    return c >> 16, c & (_HALF - 1)


def _ge_k(hi: jax.Array, lo: jax.Array, k_hi: jax.Array, k_lo: jax.Array) -> jax.Array:
    """Exact ``hi * 2**16 + lo >= k`` from int32 halves (``lo`` may exceed 16 bits: it is carried first)."""
    hi = hi + (lo >> 16)
    lo = lo & (_HALF - 1)
    return (hi > k_hi) | ((hi == k_hi) & (lo >= k_lo))


def _total_ge(parts: list[tuple[jax.Array, jax.Array]], k: int) -> jax.Array:
    """Exact ``sum(counts) >= k`` for totals up to 2**47, from int32 (hi, lo) 16-bit halves of per-leaf counts."""
    hi = sum(p[0] for p in parts)
    lo = sum(p[1] for p in parts)
    return _ge_k(hi, lo, k >> 16, k & (_HALF - 1))


def _check_leaf_size(x: jax.Array) -> None:
    if x.size >= 2**31:
        raise ValueError(f"a single leaf of shape {x.shape} dtype {x.dtype} ({x.size} elements) is too large for int32 "
                         "counts")


def count_ge(
    leaves: Sequence[jax.Array], key_thresholds: Sequence[jax.Array], *, magnitude: bool = False
) -> list[list[jax.Array]]:
    """Per leaf, the int32 counts of entries whose ordered key (of |x| if ``magnitude``) is >= each threshold.

    One read per leaf for all thresholds. With ``magnitude`` the absolute value is taken inside the pass, so no
    |x| copy of the leaf is ever materialised. Same-(shape, dtype) leaves are stacked and counted by one batched
    reduction (one copy of the code per shape).
    """
    leaves = [jnp.asarray(x) for x in leaves]
    if not leaves:
        return []
    counter = _Counter([[x] for x in leaves], magnitude)
    cands = jnp.stack([jnp.broadcast_to(jnp.asarray(t, counter.key_t), (len(leaves),)) for t in key_thresholds], 1)
    per_item = counter.per_item_counts(cands)  # bucket -> (m, D)
    out: list[list[jax.Array]] = [[] for _ in leaves]
    for (_, gids), counts in zip(counter.buckets, per_item):
        for j, g in enumerate(gids):
            out[int(g)] = [counts[j, d] for d in range(len(key_thresholds))]
    return out


# ---------------------------------------------------------------- grouping same-shaped leaves


def _maybe_sharded(x: jax.Array) -> bool:
    """True unless ``x`` is known to live whole on every device that holds it (one device, or replicated)."""
    # a Tracer's .sharding raises an AttributeError whose message walks the whole jaxpr (quadratic tracing time)
    sharding = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
    if sharding is not None:
        return not (len(sharding.device_set) == 1 or sharding.is_fully_replicated)
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # pragma: no cover - an aval without sharding
        return False
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", False) or math.prod(getattr(mesh, "axis_sizes", ()) or (1,)) <= 1:
        return False
    explicit = all(str(t).endswith("Explicit") for t in getattr(mesh, "axis_types", ()))
    return not (explicit and all(s is None for s in sharding.spec))


def _stack(xs: list[jax.Array]) -> jax.Array:
    return xs[0][None] if len(xs) == 1 else jnp.stack(xs)


class _Counter:
    """Counts, per group and candidate, the entries of the group's leaves whose key is >= the candidate.

    Leaves of the same (shape, dtype) are stacked into one (m, *shape) array counted by one batched reduction; a
    possibly-sharded leaf stays on its own (stacking could move it between devices).
    """

    def __init__(self, groups: Sequence[Sequence[jax.Array]], magnitude: bool):
        self.n_groups = len(groups)
        self.magnitude = magnitude
        self.key_t, self.float_t, self.nbits = _key_spec(jnp.result_type(*[x for g in groups for x in g]))
        order: dict = {}
        for gi, g in enumerate(groups):
            for x in g:
                _check_leaf_size(x)
                alone = _maybe_sharded(x) or x.size > STACK_MAX
                tag = ("alone", len(order)) if alone else (x.shape, str(x.dtype))
                order.setdefault(tag, []).append((gi, x))
        self.buckets = []
        for members in order.values():
            gids = np.asarray([gi for gi, _ in members], np.int32)
            xs = [x for _, x in members]
            self.buckets.append((xs, gids))

    def per_item_counts(self, cands: jax.Array) -> list[jax.Array]:
        """``cands``: [G, D] keys. Per bucket, the int32 counts [m, D] of each stacked leaf (one read of each)."""
        out = []
        for xs_, gids in self.buckets:
            # the barrier keeps each pass one fused read of the data: without it XLA merges the passes' key
            # computations and candidate arithmetic into the counting loops (measured ~10x slower on CPU)
            xs, c = lax.optimization_barrier((xs_, cands[gids]))  # c: [m, D]
            if len(xs) == 1:  # a full reduction of one leaf (XLA:CPU splits it over its threads)
                key = ordered_key(jnp.abs(xs[0]) if self.magnitude else xs[0])
                flags = [key >= c[0, d] for d in range(cands.shape[1])]
                out.append(jnp.stack(_sum_counts(flags, tuple(range(key.ndim))))[None])
                continue
            stacked = _stack(xs)  # inside the pass, so XLA folds it into the counting loop (no stacked copy)
            key = ordered_key(jnp.abs(stacked) if self.magnitude else stacked)
            bshape = (len(gids),) + (1,) * (stacked.ndim - 1)
            flags = [key >= c[:, d].reshape(bshape) for d in range(cands.shape[1])]
            out.append(jnp.stack(_sum_counts(flags, tuple(range(1, stacked.ndim))), axis=1))
        return out

    def extremes(self) -> tuple[jax.Array, jax.Array]:
        """The smallest and the largest key of each group, [G] each (one read of every leaf)."""
        lows, highs = [], []
        for xs, gids in self.buckets:
            stacked = _stack(xs)
            key = ordered_key(jnp.abs(stacked) if self.magnitude else stacked)
            axes = tuple(range(1, key.ndim))  # no reshape: merging a sharded axis could gather it
            lows.append(jax.ops.segment_min(jnp.min(key, axis=axes), gids, self.n_groups, indices_are_sorted=True))
            highs.append(jax.ops.segment_max(jnp.max(key, axis=axes), gids, self.n_groups, indices_are_sorted=True))
        return jnp.min(jnp.stack(lows), axis=0), jnp.max(jnp.stack(highs), axis=0)

    def counts(self, cands: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Exact group totals of ``#{key >= cands[g, d]}`` as int32 (hi, lo) 16-bit halves, each [G, D]."""
        hi = jnp.zeros(cands.shape, jnp.int32)
        lo = jnp.zeros(cands.shape, jnp.int32)
        for (_, gids), per in zip(self.buckets, self.per_item_counts(cands)):
            h, l = _split_count(per)
            if len(gids) == 1:
                hi, lo = hi.at[int(gids[0])].add(h[0]), lo.at[int(gids[0])].add(l[0])
            else:
                hi = hi + jax.ops.segment_sum(h, gids, self.n_groups, indices_are_sorted=True)
                lo = lo + jax.ops.segment_sum(l, gids, self.n_groups, indices_are_sorted=True)
        return hi, lo


# ---------------------------------------------------------------- radix select


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


# ---------------------------------------------------------------- bracketing search


def _next_prime(n: int) -> int:
    n = max(int(n), 2)
    while any(n % p == 0 for p in range(2, int(math.isqrt(n)) + 1)):
        n += 1
    return n


def _sample(leaves: Sequence[jax.Array], n: int) -> jax.Array:
    """A strided sample of about :data:`SAMPLE_SIZE` entries of the group, every ``stride``-th of each raveled leaf.

    The stride is a prime, so it is coprime with (almost) every axis length: a kernel's columns are all visited.
    """
    stride = _next_prime(-(-n // SAMPLE_SIZE))
    by_shape: dict = {}
    for x in leaves:
        if x.size > stride // 2:
            by_shape.setdefault((x.shape, str(x.dtype)), []).append(x)
    # one strided slice per leaf shape (same-shaped leaves stacked), not per leaf: small programs for big trees
    return jnp.concatenate(
        [_stack(xs).reshape(len(xs), -1)[:, stride // 2 :: stride].ravel() for xs in by_shape.values()])


def _by_signature(groups: Sequence[Sequence[jax.Array]], idx: Sequence[int]) -> dict:
    sig: dict = {}
    for g in idx:
        sig.setdefault(tuple((x.shape, str(x.dtype)) for x in groups[g]), []).append(g)
    return sig


def _sorted_keys(groups, idx: list[int], magnitude: bool, build: Callable) -> jax.Array:
    """[len(idx), s] keys of ``build(group leaves)`` sorted in descending order, one batched sort."""
    rows = jnp.stack([build(groups[g]) for g in idx])
    key = ordered_key(jnp.abs(rows) if magnitude else rows)
    return lax.rev(jnp.sort(key, axis=1), (1,))


_SPREAD = np.asarray([0.0, -0.4, 0.4, -0.8, 0.8, -1.3, 1.3, -2.0, 2.0, -3.0, 3.0, -4.5, 4.5, -7.0, 7.0])
_SPREAD_CPU = np.asarray([0.0, -0.7, 0.7, -2.5, 2.5, -7.0, 7.0])  # 8 candidates: as many as a CPU interpolation pass


def _sample_ranks(s: int, ks: np.ndarray, ns: np.ndarray, spread: np.ndarray = _SPREAD) -> np.ndarray:
    """[m, D - 1] 0-based descending ranks in a sorted sample of s entries: around the target rank k s / n, spread by
    the sample's binomial standard deviation."""
    q = ks / ns
    r = (ks - 1) * (s / ns)
    sd = np.sqrt(s * q * (1 - q)) + 1.0
    return np.clip(np.rint(r[:, None] + sd[:, None] * spread[None]), 0, s - 1).astype(np.int32)


def _sample_candidates(sorted_desc: jax.Array, ks: np.ndarray, ns: np.ndarray, spread: np.ndarray = _SPREAD
                       ) -> jax.Array:
    """[m, D] candidates: sample order statistics around the target rank k s / n (plus the central one + 1)."""
    ranks = _sample_ranks(sorted_desc.shape[1], ks, ns, spread)
    picked = jnp.take_along_axis(sorted_desc, jnp.asarray(ranks), axis=1)
    return jnp.concatenate([picked, picked[:, :1] + 1], axis=1)  # + 1: an exact hit when the target value ties


# Candidate layouts of the interpolation passes: (evenly spaced fractions, offsets around the estimate in standard
# errors). Each adds lo + 1 and hi. 16 candidates on GPU/TPU (memory-bound: a pass costs the same whatever it counts);
# 8 on CPU, where a pass costs about a quarter of a read per candidate (compute-bound), so fewer, tighter ones win.
_LAYOUT_WIDE = (np.asarray([0.25, 0.5, 0.75]), np.asarray([0.0, -0.35, 0.35, -0.8, 0.8, -1.4, 1.4, -2.3, 2.3, -4.0, 4.0]))
_LAYOUT_CPU = (np.asarray([0.5]), np.asarray([0.0, -0.7, 0.7, -2.5, 2.5]))


def _layout() -> tuple[np.ndarray, np.ndarray]:
    return _LAYOUT_CPU if jax.default_backend() == "cpu" else _LAYOUT_WIDE


def _interp_candidates(lo, hi, c_lo, c_hi, k_f, float_t, layout, xp=jnp) -> jax.Array:
    """[G, D] candidates in (lo, hi]: lo + 1 and hi (exact hits on ties), evenly spaced ones (each pass shrinks the
    bracket at least 2x: the guarantee) and the rest around the linearly interpolated position of rank k, spread by
    its binomial standard error. A bracket of at most D keys is counted exhaustively. ``xp``: ``jnp`` in a program,
    ``np`` on the host (:func:`kth_largest_scheduled`)."""
    uniform_fr, focus_sd = layout
    D = 2 + len(uniform_fr) + len(focus_sd)
    key_t = lo.dtype
    w = hi - lo
    wf = w.astype(float_t)
    m = xp.maximum(c_lo - c_hi, 1.0)  # entries in the bracket
    u = xp.clip((c_lo - k_f) / m, 0.0, 1.0)  # the count falls from c_lo at lo to c_hi just above hi
    sd = xp.sqrt(xp.maximum(u * (1 - u), 1.0 / m) / m) + 1.0 / m
    focus = u[:, None] + sd[:, None] * xp.asarray(focus_sd, float_t)
    even = xp.asarray(np.arange(1, len(focus_sd) + 1) / (len(focus_sd) + 1), float_t)[None]
    focus = xp.where((sd * focus_sd.max() > 0.5)[:, None], even, focus)  # a few entries: split the bracket evenly
    uniform = xp.broadcast_to(xp.asarray(uniform_fr, float_t), (lo.shape[0], len(uniform_fr)))
    frac = xp.concatenate([uniform, focus], axis=1)
    top = float(np.nextafter(np.asarray(2.0 ** (8 * np.dtype(key_t).itemsize), float_t), 0))  # converts exactly
    off = xp.clip(xp.floor(xp.clip(frac, 0.0, 1.0) * wf[:, None]), 1.0, top).astype(key_t)
    off = xp.concatenate([xp.ones_like(off[:, :1]), w[:, None], off], axis=1)
    exhaustive = xp.arange(1, D + 1, dtype=key_t)[None]
    off = xp.minimum(xp.where((w <= D)[:, None], exhaustive, off), w[:, None])  # in [1, w]; 0 once w = 0
    return lo[:, None] + off


def _update_bracket(state: tuple, cands: jax.Array, cnt_hi: jax.Array, cnt_lo: jax.Array, k_hi: jax.Array,
                    k_lo: jax.Array, xp=jnp) -> tuple:
    """One pass's bracket update from the exact counts (int32 halves) of ``key >= cands`` ([G, D] each).

    ``state`` is (passes, lo, hi, c_lo, c_hi): the bracket [lo, hi] and the (approximate) counts at its ends.
    ``xp``: ``jnp`` or ``np``.
    """
    it, lo, hi, c_lo, c_hi = state
    float_t = c_lo.dtype
    ge = _ge_k(cnt_hi, cnt_lo, k_hi[:, None], k_lo[:, None])
    approx = cnt_hi.astype(float_t) * _HALF + cnt_lo.astype(float_t)
    up = ge & (cands > lo[:, None])
    down = ~ge & (cands <= hi[:, None])
    new_lo = xp.maximum(lo, xp.max(xp.where(up, cands, lo[:, None]), axis=1))
    new_hi = xp.minimum(hi, xp.min(xp.where(down, cands - 1, hi[:, None]), axis=1))
    new_c_lo = xp.minimum(c_lo, xp.min(xp.where(up, approx, xp.inf), axis=1))
    new_c_hi = xp.maximum(c_hi, xp.max(xp.where(down, approx, -xp.inf), axis=1))
    return it + 1, new_lo, new_hi, new_c_lo, new_c_hi


def _bracket_open(state: tuple, nbits: int, xp=jnp) -> jax.Array:
    """Whether another pass is needed: some bracket holds more than one key (and the pass budget is not spent)."""
    it, lo, hi = state[:3]
    return (it < 2 * nbits) & xp.any(lo < hi)


def _needs_extremes(ks: np.ndarray, ns: np.ndarray, sampled: np.ndarray) -> bool:
    """Whether a group's first bracket would reach past the sample's extremes (or it has no sample at all)."""
    s = np.minimum(ns, SAMPLE_SIZE)
    q = ks / ns
    r = (ks - 1) * (s / ns)
    reach = np.abs(_SPREAD).max() * (np.sqrt(s * q * (1 - q)) + 1.0)
    return bool(np.any(~sampled | (r - reach < 1) | (r + reach > s - 2)))


def _bracket_search(groups, ks: list, magnitude: bool) -> tuple[jax.Array, jax.Array]:
    """The bracketing search over all groups at once: (keys [G], passes over the data)."""
    G = len(groups)
    key_t, float_t, nbits = _key_spec(jnp.result_type(*[x for g in groups for x in g]))
    ns = np.asarray([sum(int(x.size) for x in g) for g in groups], np.float64)
    kn = np.asarray(ks, np.float64)
    movable = [not any(_maybe_sharded(x) for x in g) for g in groups]
    small = [g for g in range(G) if movable[g] and ns[g] <= SORT_MAX]
    sampled = [g for g in range(G) if movable[g] and ns[g] > SORT_MAX]
    counted = [g for g in range(G) if g not in small]

    lo0 = jnp.full((G,), (key_t(1) << (nbits - 1)) if magnitude else 0, key_t)  # |x| >= +0.0
    hi0 = jnp.full((G,), np.iinfo(np.dtype(key_t)).max, key_t)
    result = lo0
    for idx in _by_signature(groups, small).values():  # whole groups sorted: exact at once
        desc = _sorted_keys(groups, idx, magnitude, lambda ls: jnp.concatenate([x.ravel() for x in ls]))
        pick = jnp.take_along_axis(desc, jnp.asarray(kn[idx].astype(np.int32) - 1)[:, None], axis=1)[:, 0]
        result = result.at[np.asarray(idx)].set(pick)
    if not counted:
        return result, jnp.int32(0)

    sub = [groups[g] for g in counted]
    counter = _Counter(sub, magnitude)
    Gc = len(counted)
    k_arr = np.asarray([ks[g] for g in counted], np.int64)
    k_hi = jnp.asarray(k_arr >> 16, jnp.int32)
    k_lo = jnp.asarray(k_arr & (_HALF - 1), jnp.int32)
    k_f = jnp.asarray(k_arr, float_t)
    first = jnp.zeros((Gc, _D), key_t)
    has_first = np.zeros((Gc,), bool)
    pos = {g: i for i, g in enumerate(counted)}
    for idx in _by_signature(groups, sampled).values():
        n_g = int(ns[idx[0]])
        desc = _sorted_keys(groups, idx, magnitude, lambda ls: _sample(ls, n_g))
        rows = np.asarray([pos[g] for g in idx])
        first = first.at[rows].set(_sample_candidates(desc, kn[idx], ns[idx]))
        has_first[rows] = True
    has_first_j = jnp.asarray(has_first)
    lo_c, hi_c = lo0[:Gc], hi0[:Gc]
    if _needs_extremes(kn[counted], ns[counted], has_first):  # a target beyond the sample's reach: bound the bracket
        lo_c, hi_c = counter.extremes()

    def update(state, cands):
        return _update_bracket(state, cands, *counter.counts(cands), k_hi, k_lo)

    def interp(state, layout):
        return _interp_candidates(*state[1:], k_f, float_t, layout)

    def cond(state):
        return _bracket_open(state, nbits)

    state = (jnp.int32(0), lo_c, hi_c, jnp.asarray(ns[counted], float_t), jnp.zeros((Gc,), float_t))
    if has_first.any():  # the sampled pass (16 candidates; unsampled groups get 16 interpolated ones)
        state = update(state, jnp.where(has_first_j[:, None], first, interp(state, _LAYOUT_WIDE)))
    layout = _layout()
    passes, lo, hi, _, _ = lax.while_loop(cond, lambda st: update(st, interp(st, layout)), state)
    return result.at[np.asarray(counted)].set(lo), passes


def _descending_np(keys: np.ndarray) -> np.ndarray:
    return np.sort(keys, axis=1)[:, ::-1]


def gather_row(size: int) -> int:
    """The row length a gathering pass reads a leaf of ``size`` entries in (:data:`GATHER_ROW`)."""
    if size <= GATHER_ROW:
        return max(size, 1)
    g = math.gcd(size, GATHER_ROW)
    return g if g >= 16 else size


def gather_summary(packed: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple:
    """One group's gathering-pass rows of one leaf reduced to what :func:`gathered_kth` needs (small: only the rows
    holding bracket keys), so a caller keeps no per-row arrays of the whole model.

    Args:
      packed: per row, int32 ``#{key > hi} + (#{lo <= key <= hi} << 16)`` (rows of at most 2**16 - 1 entries).
      low, high: per row, the smallest and largest key in [lo, hi] (anything where the row has none).

    Returns:
      (the count above the bracket (int), and of the rows holding bracket keys: their number of them, their
      smallest and their largest key).
    """
    packed = np.asarray(packed)
    n_in = packed >> 16
    rows = np.flatnonzero(n_in)
    return int(np.sum(packed & 0xFFFF, dtype=np.int64)), n_in[rows], np.asarray(low)[rows], np.asarray(high)[rows]


def merge_summaries(parts: Sequence[tuple]) -> tuple:
    """:func:`gather_summary` of one group over several leaves, from theirs."""
    return (sum(p[0] for p in parts), *(np.concatenate([p[a] for p in parts]) for a in (1, 2, 3)))


def gathered_kth(k: int, summary: tuple):
    """The exact k-th largest key of a group from its gathering pass (:func:`gather_summary`), or None (a miss):
    where some row holds three or more keys of the bracket (the middle ones unseen) or the rank is not inside it."""
    above, n_in, low, high = summary
    if np.any(n_in > 2):
        return None
    rank = k - above
    keys = np.concatenate([high[n_in >= 1], low[n_in == 2]])
    if not 1 <= rank <= keys.size:
        return None
    return np.sort(keys)[::-1][rank - 1]


def kth_largest_scheduled(
    n: int,
    ks: Sequence[int],
    *,
    key_dtype,
    sample: Callable[[int, bool], tuple[jax.Array, tuple[jax.Array, jax.Array] | None]],
    counts: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    magnitude: bool = False,
    gather: Callable[[np.ndarray, np.ndarray, np.ndarray], list] | None = None,
    gather_rows: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
) -> tuple[jax.Array, int, int]:
    """The bracketing search driven from the host, for data the caller visits piece by piece (leaf by leaf).

    The same search as :func:`kth_largest_groups` (strided-sample pass, then interpolation passes, each at least
    halving the bracket; exact, ties kept), but every pass is a call of ``counts`` that the caller implements, e.g.
    as one small compiled program per leaf signature whose per-leaf counts it sums. G groups of n entries each. On
    CPU the sampled pass counts as many candidates as the later ones (8), so one counting program serves every pass.

    Args:
      n: the number of entries of every group.
      ks: G static ranks, 1 <= k <= n.
      key_dtype: the ordered-key dtype (uint32 for float32 data).
      sample: ``sample(stride, extremes)`` -> ([G, s] ordered keys of every ``stride``-th entry (stride 1: all),
        ([G], [G]) the smallest and largest key of each group when ``extremes`` else None).
      counts: ``counts(cands, open)`` with cands [G, D] keys and ``open`` a numpy bool [G] -> the exact totals
        ``#{key >= cand}`` as int32 (hi, lo) 16-bit halves, [G, D] each. Only the open groups' rows are read: a group
        whose bracket is closed (its answer known) may get any counts, so the caller can skip the data it alone needs.
      magnitude: the keys are of |x| (the search starts at +0.0).
      gather: optional ``gather(lo, hi, now)`` with the [G] brackets and a numpy bool [G] -> per group, the
        :func:`gather_summary` of all rows of the group's data where ``now``, else None (a pass that reads rows of
        :func:`gather_row` entries). Once every open bracket of a unit is small
        enough (:func:`gather_ready`) the unit's next pass is that one instead of the last two to four counting
        passes. Where it misses (a row with three or more keys of the bracket; detected, never silent) the counting
        passes go on from the same bracket.
      gather_rows: [G] the number of such rows in each group's data (needed with ``gather``).
      units: [G] which groups share their data (one pass reads it for all of them, and a unit's groups gather
        together, while other units may still count); None: one unit.

    Returns:
      ([G] keys of the k-th largest entries, as numpy, the number of passes over the data after the sampled one,
      the number of groups the gathering pass missed).
    """
    _check_ranks([[jax.ShapeDtypeStruct((n,), jnp.float32)]] * len(ks), ks)
    key_t = np.dtype(key_dtype).type
    nbits = 8 * np.dtype(key_dtype).itemsize
    float_t = jnp.float32 if nbits == 32 else jnp.float64
    G = len(ks)
    kn = np.asarray(ks, np.float64)
    ns = np.full((G,), float(n))
    if n <= SORT_MAX:
        desc = _descending_np(np.asarray(sample(1, False)[0]))
        return np.take_along_axis(desc, (np.asarray(ks, np.int64) - 1)[:, None], axis=1)[:, 0], 0, 0
    need_extremes = _needs_extremes(kn, ns, np.ones((G,), bool))
    keys, ext = sample(_next_prime(-(-n // SAMPLE_SIZE)), need_extremes)
    cpu = jax.default_backend() == "cpu"
    # between the passes everything is numpy on the host: nothing compiles there, whatever G
    picked = np.take_along_axis(_descending_np(np.asarray(keys)),
                                _sample_ranks(np.shape(keys)[1], kn, ns, _SPREAD_CPU if cpu else _SPREAD), axis=1)
    cands = np.concatenate([picked, picked[:, :1] + key_t(1)], axis=1)  # + 1: an exact hit on a tied target
    lo = np.full((G,), (key_t(1) << key_t(nbits - 1)) if magnitude else 0, key_dtype)
    hi = np.full((G,), np.iinfo(np.dtype(key_dtype)).max, key_dtype)
    if need_extremes:
        lo, hi = (np.asarray(e, key_dtype) for e in ext)
    k_arr = np.asarray(ks, np.int64)
    k_hi, k_lo = np.asarray(k_arr >> 16, np.int32), np.asarray(k_arr & (_HALF - 1), np.int32)
    k_f = np.asarray(k_arr, float_t)
    layout = _LAYOUT_WIDE if not cpu else _layout()
    state = (np.int32(0), lo, hi, np.asarray(ns, float_t), np.zeros((G,), float_t))
    is_open = np.ones((G,), bool)
    unit = np.zeros((G,), np.int64) if units is None else np.asarray(units, np.int64)
    gathered = np.full((G,), gather is None)  # groups whose gathering pass has run (or that have none)
    misses = 0
    now = np.zeros((G,), bool)  # the groups gathering in this pass (the others count)
    while True:
        counted = is_open & ~now
        if counted.any():
            keep = ~counted[:, None]  # a group not counted keeps its bracket: its candidates lo, "count >= k" there
            cands = np.where(keep, state[1][:, None], cands)
            c_hi, c_lo = (np.asarray(c) for c in counts(cands, counted))
            c_hi, c_lo = np.where(keep, k_hi[:, None], c_hi), np.where(keep, k_lo[:, None], c_lo)
            state = _update_bracket(state, cands, c_hi, c_lo, k_hi, k_lo, xp=np)
        else:
            state = (state[0] + 1, *state[1:])
        if now.any():
            state, missed = _apply_gather(state, gather(state[1], state[2], now), ks, now)
            misses += missed
            gathered |= now
        if not _bracket_open(state, nbits, xp=np):
            return state[1], int(state[0]), misses
        is_open = state[1] < state[2]
        now = _gather_now(state, is_open, gathered, unit, gather_rows)
        cands = _interp_candidates(*state[1:], k_f, float_t, layout, xp=np)


def _gather_now(state: tuple, is_open: np.ndarray, gathered: np.ndarray, unit: np.ndarray, rows) -> np.ndarray:
    """The open groups whose next pass is their gathering pass: those of every unit whose open groups have not
    gathered yet and all hold small brackets (:func:`gather_ready`)."""
    if gathered.all():
        return np.zeros_like(is_open)
    ready = ~is_open | (~gathered & gather_ready(np.maximum(state[3] - state[4], 0), rows))
    unit_ready = np.ones((int(unit.max()) + 1,), bool)
    np.logical_and.at(unit_ready, unit, ready)
    return is_open & unit_ready[unit]


def _apply_gather(state: tuple, rows: list, ks: Sequence[int], now: np.ndarray) -> tuple[tuple, int]:
    """The bracket state after a gathering pass of the groups ``now``: each one it resolved closed on its answer;
    and the number it missed (their brackets are kept)."""
    it, lo, hi, c_lo, c_hi = state
    lo, hi = lo.copy(), hi.copy()
    misses = 0
    for g in np.flatnonzero(now):
        key = gathered_kth(int(ks[g]), rows[g])
        if key is None:
            misses += 1
        else:
            lo[g] = hi[g] = key
    return (it, lo, hi, c_lo, c_hi), misses


def _check_ranks(groups, ks) -> None:
    for g, k in zip(groups, ks):
        n = sum(int(x.size) for x in g)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] (the number of entries), got {k}")


def kth_largest_groups_with_passes(
    groups: Sequence[Sequence[jax.Array]],
    ks: Sequence[int],
    *,
    radix_bits: int | None = DEFAULT_RADIX_BITS,
    magnitude: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """:func:`kth_largest_groups` and the number of counting passes over the data it took (int32 scalar)."""
    groups = [[jnp.asarray(x) for x in g] for g in groups]
    ks = [int(k) for k in ks]
    _check_ranks(groups, ks)
    if radix_bits is None:
        return _bracket_search(groups, ks, magnitude)
    counter = _Counter(groups, magnitude)
    k_arr = np.asarray(ks, np.int64)
    k_hi, k_lo = jnp.asarray(k_arr >> 16, jnp.int32), jnp.asarray(k_arr & (_HALF - 1), jnp.int32)

    def enough(cands: list[jax.Array]) -> list[jax.Array]:
        hi, lo = counter.counts(jnp.stack(cands, axis=1))
        ge = _ge_k(hi, lo, k_hi[:, None], k_lo[:, None])
        return [ge[:, d] for d in range(len(cands))]

    keys = _radix_select(enough, jnp.zeros((len(groups),), counter.key_t), counter.nbits, radix_bits)
    return keys, jnp.int32(counter.nbits // radix_bits)


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
      radix_bits: None for the bracketing search (module docstring); 1, 2, 4 or 8 for the radix select with that
        many bits per pass (32 / radix_bits passes for float32).
      magnitude: select on |x| (computed inside each pass; no copy of |x| is kept).

    Returns:
      uint keys of shape [G]; ``ordered_key(x) >= t[g]`` selects group g's top k (and every tie at the threshold).
    """
    return kth_largest_groups_with_passes(groups, ks, radix_bits=radix_bits, magnitude=magnitude)[0]


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
    an all-reduce of per-row counts. Always the radix select (``radix_bits=None``: :func:`default_radix_bits`).
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
