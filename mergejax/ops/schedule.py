"""Leaf-by-leaf execution of a merge chain, for eager calls: compile time and peak memory independent of the tree.

A merge traced as one program holds a copy of its code per group of same-shaped leaves, plus per-leaf slices,
flags and outputs, so XLA's compile time grows with the number of leaves; and the program's buffers (the T task
vectors, their trimmed and sign-filtered copies) are live at once. When a merge is called eagerly on concrete,
unsharded arrays, :func:`merge_leaf_by_leaf` instead runs it from the host as a schedule of small jitted programs,
each over the T + 1 input leaves of ONE leaf position:

- a chain of *leafwise* stages (DARE, Breadcrumbs, every ``WeightableReduction``) runs as one
  program per leaf: tau_t = theta_t - theta_0, the stages, theta_0 + lambda tau_m and the NaN/Inf flags of the
  inputs, fused in one read of the leaf;
- a stage with global statistics (the trim's thresholds, per tensor or global, the majority sign of TIES' zero-sum rule, PCB's
  quantiles) implements ``host_stats(run)``: :class:`Runner` computes them with per-leaf programs (counts summed on
  the host, the exact bracketing search of :func:`mergejax.ops.select.kth_largest_scheduled`), and the stage then
  runs leafwise as ``Given(stage, stats)``;
- the chain's last statistics stage may instead be *deferred* into the final pass (:func:`_deferrable`; TIES's
  majority sign): each leaf's program assumes a provisional statistic (the stage's ``deferred_guess`` of the tallies
  of the leaves before it), and returns, in the same read of its inputs, the tally of per-coordinate
  ``deferred_codes`` the statistic is summed from and how many coordinates it decides; once every leaf is done the
  true statistic is resolved from the exact totals and only the leaves that assumed another one and have such
  coordinates run again (:func:`_resolve_deferred`);
- a leafwise stage whose rule depends on the leaf's path (which 2-D leaves are Flax kernels, an ``exclude`` regex)
  implements ``at_leaf(path)``, the stage with that rule decided for the one leaf (its programs are then cached by the
  decision, a static field).

Programs are cached by the leaf's signature (shapes, dtypes, the chain's static metadata), so a 300-leaf model
compiles as much as its few distinct leaf shapes; the leaf index, weights and statistics are traced. DARE's hash
words (two uint32 per task and leaf) are derived for the whole tree on the host beforehand
(:func:`mergejax.ops.dare.host_hash_words`, bit-exact with ``jax.random``), so no leaf program holds threefry code.
Results equal the single program's: the same stage code, the same exact thresholds, the same random bits.

Peak memory above the inputs: the output (one model in the base's dtype) plus one leaf position's temporaries
(the fused elementwise chains need none). A program that would hold leaf-sized temporaries (a stage marked
``row_chunks``: Breadcrumbs' per-row selection keeps T key arrays for its passes, PCB's statistics T balancing
weights) runs a large leaf (at least :data:`CHUNK_MIN` entries, two or more axes) in *row chunks* of about
:data:`CHUNK_ENTRIES` entries when every stage of it is ``rowwise`` (:class:`mergejax.ops.base.Transform`): a
``lax.fori_loop`` over slices along the first axis, each written into the output in place (or its counts, extremes,
sums, maxima or strided sample folded into the statistic's), so the temporaries are T chunks, not T leaves. Same
numbers: the rows are computed by the same code. A ``flat_stats`` stage (PCB) first in its chain computes its
statistics on small leaves (at most :data:`FLAT_MAX` entries) as flat zero-padded copies, the padding masked: one
program per size bucket and pass kind, whatever the leaves' shapes. With ``donate=True`` the inputs of each
leaf are freed as soon as its output exists, so the peak stays at about the inputs' size.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax.ops.base import Given, leaf_index, leaf_keys, per_leaf_weights
from mergejax.ops.dare import hash_words, host_hash_words
from mergejax.ops.select import (_key_spec, _sum_counts, gather_row, gather_summary, kth_largest_scheduled,
                                merge_summaries, ordered_key)
from mergejax.tree import PyTree, TaskVector, _leaf_apply, acc_dtype, as_tree, is_float, paths_and_leaves

__all__ = ["CHUNK_MIN", "CHUNK_ENTRIES", "FLAT_MIN", "FLAT_MAX", "schedulable", "Runner", "RunInfo",
           "merge_leaf_by_leaf"]

CHUNK_MIN = 1 << 20
"""A leaf of at least this many entries (and two or more axes) runs in row chunks when its program is rowwise."""

CHUNK_ENTRIES = 1 << 18
"""About this many entries per row chunk (1 MiB of float32: a chunk's T temporaries stay in cache)."""

FLAT_MIN = 1 << 12
FLAT_MAX = 1 << 16
"""A leaf of at most :data:`FLAT_MAX` entries whose statistic is ``flat_stats`` is searched as a flat zero-padded
copy of :func:`_flat_size` entries (a power of two, at least :data:`FLAT_MIN`): leaves of many shapes share one
program per size bucket."""


def _stage_ok(stage: Any) -> bool:
    return bool(getattr(stage, "leafwise", False)) or hasattr(stage, "host_stats")


def _concrete_unsharded(x: Any) -> bool:
    if isinstance(x, (np.ndarray, np.generic)):
        return True
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    return len(x.sharding.device_set) == 1


def schedulable(stages: Sequence[Any], base: PyTree, entries: Sequence[Any]) -> bool:
    """Whether :func:`merge_leaf_by_leaf` can run this merge: every stage leafwise or with ``host_stats``, entries
    models or :class:`TaskVector` s, and every array concrete and on one device (sharded leaves keep the single
    program, whose only cross-device traffic is counts)."""
    if not all(_stage_ok(s) for s in stages):
        return False
    if not all(isinstance(e, TaskVector) or not hasattr(e, "to_task_vector") for e in entries):
        return False
    trees = [base, *[as_tree(e) for e in entries]]
    return all(_concrete_unsharded(x) for t in trees for x in jax.tree_util.tree_leaves(t))


def _tau(entry: jax.Array, base: jax.Array, is_tv: bool) -> jax.Array:
    dt = acc_dtype(base.dtype)
    return jnp.asarray(entry, dt) if is_tv else jnp.asarray(entry, dt) - jnp.asarray(base, dt)


def _run(stages: tuple, xs: tuple, key, words: tuple | None, start: int = 0):
    """``run_stages(stages[start:], xs, key, offset=start)`` (stage i draws from ``fold_in(key, i)``), except that a
    stage with host-derived words (``words[i]`` not None, see :meth:`_Plan.words_at`) gets them instead of its key."""
    for i in range(start, len(stages)):
        stage = stages[i]
        if words is not None and words[i] is not None:
            xs = stage.with_words(xs, words[i])
        else:
            xs = stage(xs, None if key is None else jax.random.fold_in(key, i))
    return xs


def _prefix(stages: tuple, base: jax.Array, entries: tuple, index, key, tv_mask: tuple, q: int, words=None):
    xs = tuple(_tau(e, base, t) for e, t in zip(entries, tv_mask))
    with leaf_index(index):
        return _run(stages[:q], xs, key, words)


def _chunkable(stages: Sequence[Any], stat: bool = False) -> bool:
    """Whether a leaf program of ``stages`` may run in row chunks and gains from it: every stage ``rowwise`` (the last
    one ``rowwise_given`` when the program computes its statistics, ``stat``) and one of them ``row_chunks``."""
    head, last = (stages[:-1], stages[-1:]) if stat else (stages, ())
    if not all(getattr(s, "rowwise", False) for s in head):
        return False
    if not all(getattr(s, "rowwise_given", False) for s in last):
        return False
    return any(getattr(_unwrap(s), "row_chunks", False) for s in stages)


def _unwrap(stage: Any) -> Any:
    while hasattr(stage, "inner"):  # Given, a pre-weighted reduction
        stage = stage.inner
    return stage


def _chunk_rows(shape: tuple[int, ...], rowwise: bool) -> int:
    """Rows per chunk for a leaf of ``shape`` whose program is ``rowwise``, or 0 (the whole leaf at once): about
    :data:`CHUNK_ENTRIES` entries, a divisor of the row count where one lies within 2x (no remainder piece)."""
    if not rowwise or len(shape) < 2 or math.prod(shape) < CHUNK_MIN:
        return 0
    target = max(1, CHUNK_ENTRIES // math.prod(shape[1:]))
    if target >= shape[0]:
        return 0
    return next((r for r in range(target, target // 2, -1) if shape[0] % r == 0), target)


def _rows(x: jax.Array, start, n: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, start, n, axis=0)


def _fold_rows(step: Callable, carry: Any, n_rows: int, rows: int) -> Any:
    """``carry = step(carry, start, n)`` over the row chunks [start, start + n) of a leaf: a ``lax.fori_loop`` over
    the chunks of ``rows`` rows (one traced copy of ``step``), then the remainder rows if any (a second copy)."""
    full = n_rows // rows
    carry = lax.fori_loop(0, full, lambda c, acc: step(acc, c * rows, rows), carry)
    if n_rows > full * rows:
        carry = step(carry, full * rows, n_rows - full * rows)
    return carry


def _identity(op: str, x: jax.ShapeDtypeStruct) -> jax.Array:
    """The identity of ``op`` ("sum", "max" or "min") for arrays like ``x``."""
    if op == "sum":
        return jnp.zeros(x.shape, x.dtype)
    info = jnp.finfo(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype)
    lowest = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else info.min
    highest = jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else info.max
    return jnp.full(x.shape, lowest if op == "max" else highest, x.dtype)


_COMBINE = {"sum": jnp.add, "max": jnp.maximum, "min": jnp.minimum}


@partial(jax.jit, static_argnames=("stage_ids", "n_tasks"))
def _all_words(key: jax.Array, leaves: jax.Array, *, stage_ids: tuple, n_tasks: int) -> jax.Array:
    """uint32 [L, S, T, 2]: ``hash_words(leaf_keys(fold_in(key, i), t, leaf))`` for every merged leaf, word-drawing
    stage i and task t: the per-(task, leaf) threefry work of DARE's hash generator, done once for the whole tree."""

    tasks = jnp.arange(n_tasks, dtype=jnp.int32)

    def one(stage_key, t, leaf):  # one copy of the threefry code, mapped over every (stage, leaf, task)
        return hash_words(leaf_keys(stage_key, t, leaf))

    stage_keys = jnp.stack([jax.random.fold_in(key, i) for i in stage_ids])
    grid = jax.vmap(jax.vmap(jax.vmap(one, (None, 0, None)), (0, None, None)), (None, None, 0))
    return grid(stage_keys, tasks, leaves)


@partial(jax.jit, static_argnames=("tv_mask", "q", "name", "mode", "magnitude", "stride", "rows"))
def _stat_program(stages, base, entries, index, key, words, cands, given, *, tv_mask, q, name, mode, magnitude,
                  stride, rows=0):
    """One leaf: the stage-q input there, then its ``stat_values`` sampled, counted, bounded or reduced ("sum",
    "max": returned as they are for a whole leaf, folded over the chunks of a chunked one); ``rows`` > 0: in row
    chunks of that many rows (:func:`_chunk_rows`)."""

    def values_of(b, es):
        tvs = _prefix(stages, b, es, index, key, tv_mask, q, words)
        with leaf_index(index):
            return stages[q].stat_values(tvs, name, given)

    if rows:
        return _stat_chunked(values_of, base, entries, cands, mode=mode, magnitude=magnitude, stride=stride,
                             rows=rows)
    values = values_of(base, entries)
    if mode in ("sum", "max"):
        return values
    if mode == "gather":
        return _leaf_gather(values, cands, magnitude)
    if mode in ("sample", "sample+extremes"):
        keys = [ordered_key(jnp.abs(v) if magnitude else v).ravel() for v in values]
        picked = jnp.stack([k[stride // 2 :: stride] if stride > 1 else k for k in keys])
        return picked, _leaf_extremes(values, magnitude) if mode == "sample+extremes" else None
    return _leaf_counts(values, cands, magnitude)


def _leaf_keys(values: Sequence[jax.Array], magnitude: bool) -> list[jax.Array]:
    """The ordered keys (of |v| if ``magnitude``) of G same-shaped value arrays, in their common float type."""
    dtype = jnp.result_type(*values)
    return [ordered_key(jnp.abs(v) if magnitude else v) for v in (jnp.asarray(v, dtype) for v in values)]


def _leaf_counts(values: Sequence[jax.Array], cands: jax.Array, magnitude: bool) -> tuple[jax.Array, jax.Array]:
    """``#{key(values[g]) >= cands[g, d]}`` of one leaf's G value arrays as int32 (hi, lo) 16-bit halves, [G, D]
    each: every count of every group in ONE reduction, one read of the leaf's inputs (a reduction per group would
    read and recompute them G times: ~2x slower at T = 8 on CPU)."""
    keys = _leaf_keys(values, magnitude)
    D = cands.shape[1]
    flags = [k >= cands[g, d].astype(k.dtype) for g, k in enumerate(keys) for d in range(D)]
    if jax.default_backend() == "cpu" and keys[0].ndim >= 2 and keys[0].shape[-1] < 1 << 16:
        c = _paired_counts(flags)
    else:
        c = jnp.stack(_sum_counts(flags, tuple(range(keys[0].ndim))))
    c = c.reshape(len(keys), D)  # int32: a leaf has < 2**31 entries
    return c >> 16, c & 0xFFFF


def _paired_counts(flags: list[jax.Array]) -> jax.Array:
    """The True counts of same-shaped boolean arrays (at least 2-D, rows along the last axis shorter than 2**16), as
    one int32 vector: two flags per uint32 word (16-bit halves), summed along the rows in one variadic reduction,
    then the halves over the rows. On XLA:CPU half the accumulators of one count each: ~30% faster at 64 flags (the
    rows must be the leaf's own last axis: a reshape into other rows costs more than it saves)."""
    u32 = jnp.uint32
    words = [f.astype(u32) + (g.astype(u32) << 16) for f, g in zip(flags[0::2], flags[1::2])]
    if len(flags) % 2:
        words.append(flags[-1].astype(u32))
    rows = lax.reduce(tuple(words), (u32(0),) * len(words), lambda a, b: tuple(x + y for x, y in zip(a, b)),
                      (flags[0].ndim - 1,))
    per = jnp.stack([w.reshape(-1) for w in rows])  # [words, rows]
    halves = jnp.stack([per & 0xFFFF, per >> 16], axis=1).astype(jnp.int32)  # [words, 2, rows]
    return jnp.sum(halves, axis=2, dtype=jnp.int32).reshape(-1)[: len(flags)]


def _leaf_gather(values: Sequence[jax.Array], bounds: jax.Array, magnitude: bool) -> tuple[jax.Array, ...]:
    """A gathering pass over one leaf's G value arrays with brackets ``bounds`` [G, 2] (lo, hi keys), in one
    reduction over rows of :func:`mergejax.ops.select.gather_row` entries: per group and row, int32
    ``#{key > hi} + (#{lo <= key <= hi} << 16)`` and the smallest and largest key in the bracket ([G, rows] each)."""
    keys = _leaf_keys(values, magnitude)
    size = int(keys[0].size)
    rows = [k.reshape(-1, gather_row(size)) for k in keys]
    info = jnp.iinfo(keys[0].dtype)
    top, bottom = jnp.asarray(info.max, keys[0].dtype), jnp.asarray(info.min, keys[0].dtype)
    ops, inits = [], []
    for g, k in enumerate(rows):
        lo, hi = bounds[g, 0].astype(k.dtype), bounds[g, 1].astype(k.dtype)
        inside = (k >= lo) & (k <= hi)
        ops += [(k > hi).astype(jnp.int32) + (inside.astype(jnp.int32) << 16), jnp.where(inside, k, top),
                jnp.where(inside, k, bottom)]
        inits += [jnp.int32(0), top, bottom]

    def combine(a, b):
        out = []
        for i in range(0, len(a), 3):
            out += [a[i] + b[i], jnp.minimum(a[i + 1], b[i + 1]), jnp.maximum(a[i + 2], b[i + 2])]
        return tuple(out)

    out = lax.reduce(tuple(ops), tuple(inits), combine, (1,))
    return tuple(jnp.stack(out[a::3]) for a in range(3))


def _leaf_extremes(values: Sequence[jax.Array], magnitude: bool) -> tuple[jax.Array, jax.Array]:
    """The smallest and largest key of each of one leaf's G value arrays, [G] each, in one reduction."""
    keys = _leaf_keys(values, magnitude)
    info = jnp.iinfo(keys[0].dtype)
    hi0, lo0 = jnp.asarray(info.max, keys[0].dtype), jnp.asarray(info.min, keys[0].dtype)
    G = len(keys)

    def combine(a, b):
        return (*(jnp.minimum(x, y) for x, y in zip(a[:G], b[:G])), *(jnp.maximum(x, y) for x, y in zip(a[G:], b[G:])))

    out = lax.reduce((*keys, *keys), (hi0,) * G + (lo0,) * G, combine, tuple(range(keys[0].ndim)))
    return jnp.stack(out[:G]), jnp.stack(out[G:])


def _stat_chunked(values_of, base, entries, cands, *, mode, magnitude, stride, rows):
    """:func:`_stat_program` over the row chunks of one leaf: per chunk the ``stat_values`` of its rows, whose counts,
    extremes and reductions are folded and whose strided sample (every ``stride``-th entry of the flat leaf, from
    ``stride // 2``) is written in place: the same numbers as the whole leaf at once."""
    R, width = base.shape[0], math.prod(base.shape[1:])

    def piece(start, n):
        return values_of(_rows(base, start, n), tuple(_rows(e, start, n) for e in entries))

    if mode in ("sum", "max"):
        shapes = jax.eval_shape(lambda: piece(0, rows))
        init = jax.tree_util.tree_map(lambda x: _identity(mode, x), shapes)
        return _fold_rows(lambda acc, start, n: jax.tree_util.tree_map(_COMBINE[mode], acc, piece(start, n)),
                          init, R, rows)
    shapes = jax.eval_shape(lambda: piece(0, rows))
    G = len(shapes)
    key_t = _key_spec(jnp.result_type(*[v.dtype for v in shapes]))[0]
    if mode == "count":
        zero = jnp.zeros(cands.shape, jnp.int32)

        def count(acc, start, n):
            hi, lo = _leaf_counts(piece(start, n), cands, magnitude)
            return acc[0] + hi, acc[1] + lo

        return _fold_rows(count, (zero, zero), R, rows)
    n_sample = len(range(stride // 2, R * width, stride))
    k_info = jnp.iinfo(key_t)
    init = (jnp.zeros((G, n_sample), key_t), jnp.full((G,), k_info.max, key_t), jnp.full((G,), k_info.min, key_t))
    extremes = mode == "sample+extremes"

    def sample(acc, start, n):
        values = piece(start, n)
        keys = jnp.stack([ordered_key(jnp.abs(v) if magnitude else v).ravel() for v in values])  # [G, n * width]
        first = start * width  # flat index of the chunk's first entry
        m0 = jnp.maximum((first - stride // 2 + stride - 1) // stride, 0)  # the first sample index in the chunk
        m = m0 + jnp.arange((n * width) // stride + 2, dtype=jnp.int32)
        local = stride // 2 + m * stride - first
        ok = (local < n * width) & (m < n_sample)
        buf = acc[0].at[:, jnp.where(ok, m, n_sample)].set(keys[:, jnp.clip(local, 0, n * width - 1)], mode="drop")
        if not extremes:
            return buf, acc[1], acc[2]
        lo, hi = _leaf_extremes(values, magnitude)
        return buf, jnp.minimum(acc[1], lo), jnp.maximum(acc[2], hi)

    buf, lo, hi = _fold_rows(sample, init, R, rows)
    return buf, (lo, hi) if extremes else None


def _flat_size(size: int) -> int:
    """The padded length of a flat leaf of ``size`` entries: the next power of two, at least :data:`FLAT_MIN`."""
    return max(FLAT_MIN, 1 << max(size - 1, 0).bit_length())


def _flat_copy(x: Any) -> jax.Array:
    """``x`` raveled and zero-padded to :func:`_flat_size` entries, on the host (no program compiles)."""
    flat = np.asarray(x).reshape(-1)
    buf = np.zeros((_flat_size(flat.size),), flat.dtype)
    buf[: flat.size] = flat
    return jnp.asarray(buf)


@partial(jax.jit, static_argnames=("tv_mask", "name", "mode", "magnitude", "stride"))
def _flat_stat_program(stage, base, entries, n_valid, cands, given, *, tv_mask, name, mode, magnitude, stride):
    """:func:`_stat_program` for a ``flat_stats`` stage with no stage before it, on flat zero-padded leaves whose
    first ``n_valid`` entries are the leaf's (traced, so every leaf of a size bucket shares the program): mode
    "count" counts only those; "sample" returns the strided sample of the whole buffer (the caller keeps the
    leaf's part, a prefix) and the extremes of the valid entries."""
    tvs = tuple(_tau(e, base, t) for e, t in zip(entries, tv_mask))
    keys = jnp.stack([ordered_key(jnp.abs(v) if magnitude else v) for v in stage.stat_values(tvs, name, given)])
    valid = jnp.arange(keys.shape[1], dtype=jnp.int32) < n_valid  # [n]
    if mode == "count":
        flags = (keys[:, :, None] >= cands[:, None, :]) & valid[None, :, None]
        c = jnp.sum(flags, axis=1, dtype=jnp.int32)  # at most FLAT_MAX: exact
        return c >> 16, c & 0xFFFF
    info = jnp.iinfo(keys.dtype)
    lo = jnp.min(jnp.where(valid, keys, np.asarray(info.max, keys.dtype)), axis=1)
    hi = jnp.max(jnp.where(valid, keys, np.asarray(info.min, keys.dtype)), axis=1)
    return keys[:, stride // 2 :: stride], (lo, hi)


def _final(stages, base, entries, index, key, words, scale, prior=None, *, tv_mask, check, rows=0, defer=-1):
    """One leaf's merged output and its inputs' finiteness flags. ``defer`` >= 0: stage ``defer``'s statistic is
    deferred (:func:`_deferred_leaf`, whole leaves only), which also returns its tally, the statistic it assumed and
    ``prior`` plus the tally."""
    if defer >= 0:
        out, tally, used = _deferred_leaf(stages, base, entries, index, key, words, scale, prior, tv_mask, defer)
        return out, _flags(base, entries, tv_mask, check), tally, used, prior + tally.astype(prior.dtype)

    def piece(b, es):
        (merged,) = _prefix(stages, b, es, index, key, tv_mask, len(stages), words)
        return _leaf_apply(b, merged, scale)

    if not rows:
        out = piece(base, entries)
    else:  # row chunks, each written into the output in place
        def step(acc, start, n):
            part = piece(_rows(base, start, n), tuple(_rows(e, start, n) for e in entries))
            return lax.dynamic_update_slice_in_dim(acc, part, start, axis=0)

        out = _fold_rows(step, jnp.zeros_like(base), base.shape[0], rows)
    return out, _flags(base, entries, tv_mask, check)


def _deferred_leaf(stages, base, entries, index, key, words, scale, prior, tv_mask, q: int):
    """One leaf's output with stage q's statistic assumed to be ``stages[q].deferred_guess(prior)`` (``prior``: the
    earlier leaves' tallies summed), the int32 tally of its ``deferred_codes`` (the count of each of its
    ``deferred_kinds``) and the statistic assumed; the output and the codes in one read of the inputs."""
    stage = stages[q]
    used = stage.deferred_guess(prior)
    xs = _prefix(stages, base, entries, index, key, tv_mask, q, words)
    with leaf_index(index):
        codes = stage.deferred_codes(xs)
        (merged,) = _run((*stages[:q], Given(stage, used), *stages[q + 1 :]), xs, key, words, start=q)
    out, codes = _side_output(_leaf_apply(base, merged, scale), codes)
    codes = lax.optimization_barrier(codes)  # the counts read the int8 codes, not the inputs again
    tally = jnp.stack(_sum_counts([codes == c for c in stage.deferred_kinds], tuple(range(codes.ndim))))
    return out, tally, used


def _side_output(out: jax.Array, side: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(out, side)``, two arrays of one shape computed in one loop over the inputs they share.

    XLA:CPU fuses no sibling elementwise outputs (each would re-read and recompute the inputs), but it emits a
    variadic reduction as one loop: so on CPU both come out of a reduction over a trailing axis of two, the second
    slot the identity (-0.0 for floats, x + -0.0 = x exactly; 0 for integers). Elsewhere XLA fuses siblings itself.
    """
    if jax.default_backend() != "cpu":
        return out, side

    def pad(x):
        ident = jnp.asarray(-0.0 if jnp.issubdtype(x.dtype, jnp.floating) else 0, x.dtype)
        return jnp.stack([x, jnp.broadcast_to(ident, x.shape)], axis=-1), ident

    (po, io), (ps, is_) = pad(out), pad(side)
    return tuple(lax.reduce((po, ps), (io, is_), lambda a, b: (a[0] + b[0], a[1] + b[1]), (out.ndim,)))


def _head(base, entries, *, tv_mask, check):
    dt = acc_dtype(base.dtype)
    out = (jnp.asarray(base, dt) + sum(_tau(e, base, t) for e, t in zip(entries, tv_mask))).astype(base.dtype)
    return out, _flags(base, entries, tv_mask, check)


def _flags(base, entries, tv_mask, check):
    if not check:
        return None
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in (base, *entries)])


_final_jit = jax.jit(_final, static_argnames=("tv_mask", "check", "rows", "defer"))
_final_donating = jax.jit(_final, static_argnames=("tv_mask", "check", "rows", "defer"), donate_argnames=("base",))
_head_jit = jax.jit(_head, static_argnames=("tv_mask", "check"))


class Runner:
    """Computes a stage's global statistics leaf by leaf (the argument of ``stage.host_stats``).

    ``stage.stat_values(tvs, name, given)`` gives, at one leaf (``tvs``: T one-leaf trees, the stage's input there),
    the values a statistic ranks or sums; ``given`` is data computed in an earlier round (e.g. PCB's clamp bounds
    before its weights' quantile). Attributes: ``n`` (float entries per task over the merged leaves),
    ``n_tasks``.
    """

    def __init__(self, plan: "_Plan", q: int):
        self.plan, self.q = plan, q
        self.n = plan.n
        self.n_tasks = plan.n_tasks

    def _call(self, j: int, cands, name: Hashable, mode: str, magnitude: bool = False, stride: int = 1,
              given: Any = None):
        p = self.plan
        stages = p.stages_at(j, self.q + 1)
        if mode in ("count", "sample", "sample+extremes") and self._flat(j, stages[-1]):
            return self._flat_call(j, stages[-1], cands, name, mode, magnitude, stride, given)
        return _stat_program(stages, p.b_leaves[j], p.entries_at(j), np.int32(p.index[j]),
                             p.key_for(self.q), p.words_at(j, self.q), cands, given, tv_mask=p.tv_mask, q=self.q,
                             name=name, mode=mode, magnitude=magnitude, stride=stride, rows=self._rows(j, stages))

    def _rows(self, j: int, stages: tuple) -> int:
        """The row chunks leaf j's statistics program runs in (0: the whole leaf at once)."""
        return _chunk_rows(np.shape(self.plan.b_leaves[j]), _chunkable(stages, stat=True))

    def _whole(self, j: int) -> bool:
        """Whether leaf j's statistics run as one program on the whole leaf (neither flat nor in row chunks): the
        programs a gathering pass has."""
        stages = self.plan.stages_at(j, self.q + 1)
        return not self._flat(j, stages[-1]) and not self._rows(j, stages)

    def _flat(self, j: int, stage: Any) -> bool:
        """Whether leaf j's statistic runs on its flat padded copy: the stage is the chain's first (its input is tau)
        and ``flat_stats`` (its ``stat_values`` elementwise, the same whatever the leaf's shape), the leaf small."""
        return self.q == 0 and bool(getattr(_unwrap(stage), "flat_stats", False)) \
            and int(np.size(self.plan.b_leaves[j])) <= FLAT_MAX

    def _flat_call(self, j: int, stage: Any, cands, name: Hashable, mode: str, magnitude: bool, stride: int,
                   given: Any):
        p = self.plan
        if j not in p.flat:
            p.flat[j] = (_flat_copy(p.b_leaves[j]), tuple(_flat_copy(e) for e in p.entries_at(j)))
        size = int(np.size(p.b_leaves[j]))
        if mode == "count":
            return _flat_stat_program(stage, *p.flat[j], np.int32(size), cands, given, tv_mask=p.tv_mask, name=name,
                                      mode="count", magnitude=magnitude, stride=1)
        picked, ext = _flat_stat_program(stage, *p.flat[j], np.int32(size), None, given, tv_mask=p.tv_mask,
                                         name=name, mode="sample", magnitude=magnitude, stride=stride)
        # the leaf's own sample: the entries stride // 2 + m * stride below its size (a prefix of the buffer's)
        picked = np.asarray(picked)[:, : len(range(stride // 2, size, stride))]  # on the host: nothing compiles
        return picked, ext if mode == "sample+extremes" else None

    @property
    def key(self) -> jax.Array | None:
        """The key this stage draws from (``fold_in(merge key, q)``, as in the single program), or None."""
        return None if self.plan.key is None else jax.random.fold_in(self.plan.key, self.q)

    def per_leaf(self, name: Hashable, given: Any = None) -> dict[int, Any]:
        """``stat_values`` at every merged leaf, left on the device: {leaf position: values} (a stage's
        ``host_stats`` may return such a dict, one entry per leaf, as its statistics)."""
        # whole leaves, as they are
        return {j: self._call(j, None, name, "sum", given=given) for j in self.plan.positions}

    def _values(self, name: Hashable, given: Any, op: str) -> list:
        """``stat_values`` of every leaf position (folded with ``op`` over a chunked leaf's chunks), on the host."""
        return jax.device_get([self._call(j, None, name, op, given=given) for j in self.plan.positions])

    def total(self, name: Hashable, given: Any = None) -> Any:
        """The sum over leaves of ``stat_values`` (int64 for integer values: exact).

        Args:
          name: which statistic (static, hashable).
          given: data for ``stat_values``.

        Returns:
          The summed values, as numpy arrays.
        """
        parts = self._values(name, given, "sum")
        return jax.tree_util.tree_map(
            lambda *xs: np.sum([np.asarray(x, np.int64 if np.issubdtype(np.asarray(x).dtype, np.integer)
                                           else np.float64) for x in xs], axis=0), *parts)

    def maximum(self, name: Hashable, given: Any = None) -> Any:
        """The maximum over leaves of ``stat_values`` (a pytree of arrays).

        Args:
          name: which statistic (static, hashable).
          given: data for ``stat_values``.

        Returns:
          The elementwise maxima, as numpy arrays.
        """
        parts = self._values(name, given, "max")
        return jax.tree_util.tree_map(lambda *xs: np.max(np.stack(xs), axis=0), *parts)

    def kth(self, name: Hashable, ks: Sequence[int], *, magnitude: bool = False, given: Any = None) -> jax.Array:
        """Exact k-th largest of each of G value groups over all leaves (ties kept), by host-driven counting passes.

        Args:
          name: which statistic; ``stat_values`` returns G arrays shaped like the leaf.
          ks: G ranks, 1 <= k <= n.
          magnitude: rank |x|.
          given: data for ``stat_values``.

        Returns:
          [G] ordered keys (``mergejax.ops.select.key_to_float`` turns them into values).
        """
        return self._search(self.plan.positions, name, list(ks), self.n, magnitude, given, per_leaf=False)

    def kth_and_max(self, name: Hashable, ks: Sequence[int], *, given: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`kth` (of the values, not magnitudes) and each group's largest key, read in the search's sampled pass
        (no program or pass of its own).

        Args:
          name: which statistic; ``stat_values`` returns G arrays shaped like the leaf.
          ks: G ranks, 1 <= k <= n.
          given: data for ``stat_values``.

        Returns:
          ([G] ordered keys of the k-th largest values, [G] ordered keys of the largest values).
        """
        seen: list = []
        keys = self._search(self.plan.positions, name, list(ks), self.n, False, given, per_leaf=False, extremes=seen)
        return keys, seen[0][1]

    def kth_by_leaf(self, name_of: Callable[[int], Hashable], ks_of: Callable[[int], list[int]], *,
                    magnitude: bool = False) -> dict[int, jax.Array]:
        """Per merged leaf, the exact k-th largest of each of its value groups within that leaf (per-tensor scope).

        The leaves of one signature are searched in lockstep (one pass counts them all), so the passes do not
        multiply with the number of leaves.

        Args:
          name_of: the statistic's name for a leaf of this many entries (``stat_values`` returns len(ks) arrays).
          ks_of: the ranks for a leaf of this many entries (may be empty).
          magnitude: rank |x|.

        Returns:
          {leaf position: [G] ordered keys} (G = len(ks_of(size)); empty where it is 0).
        """
        plan = self.plan
        by_sig: dict = {}
        for j in plan.positions:
            x = plan.b_leaves[j]
            by_sig.setdefault((tuple(np.shape(x)), str(x.dtype)), []).append(j)
        out: dict[int, jax.Array] = {}
        for members in by_sig.values():
            size = int(np.size(plan.b_leaves[members[0]]))
            ks = ks_of(size)
            if not ks:
                out.update({j: None for j in members})
                continue
            keys = self._search(members, name_of(size), ks * len(members), size, magnitude, None, per_leaf=True)
            out.update({j: keys[i * len(ks):(i + 1) * len(ks)] for i, j in enumerate(members)})
        return out

    def _search(self, positions, name, ks, n, magnitude, given, *, per_leaf: bool, extremes: list | None = None
                ) -> np.ndarray:
        """:func:`kth_largest_scheduled` over ``positions``: their counts summed (one search of G groups over all
        of them) or, ``per_leaf``, stacked (G groups per leaf, each leaf its own search, all in lockstep). With
        ``extremes`` (a list), the sampled pass also reads the groups' smallest and largest keys and appends them."""
        key_dtype = _key_spec(self.plan.float_dtype)[0]
        G = len(ks) // len(positions) if per_leaf else len(ks)

        def sample(stride, with_extremes):
            keys, ext = sampled(stride, with_extremes or extremes is not None)
            if extremes is not None:
                extremes.append(ext)
            return keys, ext if with_extremes else None

        def sampled(stride, with_extremes):
            mode = "sample+extremes" if with_extremes else "sample"
            parts = jax.device_get([self._call(j, None, name, mode, magnitude, stride, given) for j in positions])
            axis = 0 if per_leaf else 1
            # numpy on the host, like everything between the passes: nothing compiles there
            keys = np.concatenate([x for x, _ in parts if per_leaf or x.shape[1]], axis=axis)
            if not with_extremes:
                return keys, None
            if per_leaf:
                return keys, (np.concatenate([e[0] for _, e in parts]), np.concatenate([e[1] for _, e in parts]))
            return keys, (np.min([e[0] for _, e in parts], axis=0), np.max([e[1] for _, e in parts], axis=0))

        def counts(cands, is_open):
            if per_leaf:  # a leaf whose G searches have all ended is not read again (lockstep costs no extra passes)
                skip = np.zeros((2, G, cands.shape[1]), np.int32)
                parts = jax.device_get([
                    self._call(j, cands[i * G:(i + 1) * G], name, "count", magnitude, given=given)
                    if is_open[i * G:(i + 1) * G].any() else skip for i, j in enumerate(positions)])
                return np.concatenate([h for h, _ in parts]), np.concatenate([l for _, l in parts])
            parts = jax.device_get([self._call(j, cands, name, "count", magnitude, given=given) for j in positions])
            total = sum((np.asarray(h, np.int64) << 16) + np.asarray(l, np.int64) for h, l in parts)
            return np.asarray(total >> 16, np.int32), np.asarray(total & 0xFFFF, np.int32)

        def gather(lo, hi, now):
            bounds = np.stack([lo, hi], axis=1)  # [G, 2]

            def summaries(j, b):  # leaf by leaf, so that no per-row arrays of the whole model are ever held
                rows = jax.device_get(self._call(j, b, name, "gather", magnitude, given=given))
                return [gather_summary(*(a[g] for a in rows)) for g in range(len(b))]

            if per_leaf:  # as in counts: only the leaves of the groups gathering now are read
                out = []
                for i, j in enumerate(positions):
                    part = slice(i * G, (i + 1) * G)
                    out += summaries(j, bounds[part]) if now[part].any() else [None] * G
                return out
            parts = [summaries(j, bounds) for j in positions]
            return [merge_summaries([p[g] for p in parts]) for g in range(G)]

        rows = [int(np.size(self.plan.b_leaves[j])) // gather_row(int(np.size(self.plan.b_leaves[j])))
                for j in positions]
        gather_rows = np.repeat(rows, G) if per_leaf else np.full((G,), sum(rows))
        keys, passes, misses = kth_largest_scheduled(
            n, ks, key_dtype=key_dtype, sample=sample, counts=counts, magnitude=magnitude,
            gather=gather if all(self._whole(j) for j in positions) else None, gather_rows=gather_rows,
            units=np.repeat(np.arange(len(positions)), G) if per_leaf else None)
        self.plan.passes = max(self.plan.passes, passes)
        self.plan.gather_misses += misses
        return keys


class _Plan:
    """The leaf positions of one merge, their per-leaf stage chains and inputs."""

    def __init__(self, stages, base, entries, flags, weights, key):
        self.b_leaves, self.treedef = jax.tree_util.tree_flatten(base)
        self.paths = [p for p, _ in paths_and_leaves(base)]
        self.e_leaves = [jax.tree_util.tree_leaves(as_tree(e)) for e in entries]
        self.tv_mask = tuple(isinstance(e, TaskVector) for e in entries)
        self.n_tasks = len(entries)
        self.positions = [j for j, b in enumerate(self.b_leaves) if is_float(b) and not flags[j]]
        self.index = {j: i for i, j in enumerate(self.positions)}  # float-leaf index among the merged leaves
        self.n = sum(int(np.size(self.b_leaves[j])) for j in self.positions)
        self.float_dtype = jnp.result_type(*[acc_dtype(self.b_leaves[j].dtype) for j in self.positions]) \
            if self.positions else jnp.float32
        self.stages = tuple(stages)
        self.key = key
        self.word_stages = tuple(i for i, s in enumerate(self.stages) if getattr(s, "host_words", False))
        self.words = None
        if key is not None and self.word_stages and self.positions:
            self.words = host_hash_words(key, self.word_stages, self.n_tasks, len(self.positions))
            if self.words is None:  # not a (partitionable) threefry key: one small program derives them
                self.words = _all_words(key, jnp.arange(len(self.positions), dtype=jnp.int32),
                                        stage_ids=self.word_stages, n_tasks=self.n_tasks)
        self.given: dict[int, Any] = {}
        self.flat: dict[int, tuple] = {}  # flat padded copies of small leaves (base, entries), made once per merge
        self.passes = 0
        self.gather_misses = 0
        self.weights = self._leaf_weights(weights, flags)

    def _leaf_weights(self, weights, flags) -> dict[int, Any]:
        if weights is None:
            return {j: None for j in self.positions}
        if not hasattr(weights, "keys") and np.ndim(weights) == 1:
            return {j: weights for j in self.positions}
        paths = [p for p, _ in paths_and_leaves(jax.tree_util.tree_unflatten(self.treedef, self.b_leaves))]
        merged = jax.tree_util.tree_unflatten(
            self.treedef, [x if j in self.index else None for j, x in enumerate(self.b_leaves)])
        table = per_leaf_weights(weights, merged, self.n_tasks)
        return {j: table[paths[j]] for j in self.positions}

    def stages_at(self, j: int, upto: int) -> tuple:
        """The first ``upto`` stages at leaf j: its weights given, global statistics injected."""
        w = self.weights[j]
        out = []
        for q, s in enumerate(self.stages[:upto]):
            if hasattr(s, "at_leaf"):
                s = s.at_leaf(self.paths[j])  # a path-dependent rule decided for this leaf
            if hasattr(s, "canonical") and not getattr(s, "leafwise", False):
                s = s.canonical()  # hyperparameters only its host_stats read: a new density compiles nothing
            if w is not None:
                s = s.with_weights(w)
            if q in self.given:
                stats = self.given[q]
                out.append(Given(s, stats[j] if isinstance(stats, dict) else stats))
            else:
                out.append(s)
        return tuple(out)

    def key_for(self, upto: int):
        """The key the first ``upto`` stages draw from in a leaf program: None unless one of them draws in-program
        (so a chain whose random stages all take host-derived words compiles no threefry code)."""
        inline = any(getattr(s, "needs_key", False) and i not in self.word_stages
                     for i, s in enumerate(self.stages[:upto]))
        return self.key if inline else None

    def words_at(self, j: int, upto: int) -> tuple | None:
        """Per stage of the first ``upto``, leaf j's host-derived words (uint32 [T, 2]) or None."""
        if self.words is None:
            return None
        slot = {i: n for n, i in enumerate(self.word_stages)}
        return tuple(self.words[self.index[j], slot[i]] if i in slot else None for i in range(upto))

    def entries_at(self, j: int) -> tuple:
        return tuple(e[j] for e in self.e_leaves)


@dataclasses.dataclass
class RunInfo:
    """What one leaf-by-leaf merge did: ``passes``, the counting passes of its last global search;
    ``deferred``, the chain position of the stage whose statistic was deferred (None: none was);
    ``recomputed``, the leaves run a second time because that statistic differed from the one assumed;
    ``gather_misses``, the searches whose gathering pass missed (they went on counting)."""

    passes: int = 0
    deferred: int | None = None
    recomputed: int = 0
    gather_misses: int = 0


last_info = RunInfo()
"""The :class:`RunInfo` of the latest :func:`merge_leaf_by_leaf` call (for benchmarks and tests)."""


def _deferrable(stages: tuple, donate: bool) -> int | None:
    """The position of the stage whose statistic the final pass may defer, or None.

    A stage defers when it implements the deferred protocol (``deferred_codes``, ``deferred_kinds``,
    ``deferred_guess``, ``deferred_resolve``; :func:`_deferred_leaf`) and is the chain's last one with global
    statistics (no later statistic reads its output), no leaf of the chain runs in row chunks and the inputs are
    not donated (a leaf may have to be recomputed from them)."""
    stat_stages = [q for q, s in enumerate(stages) if not getattr(s, "leafwise", False)]
    if donate or not stat_stages or any(getattr(_unwrap(s), "row_chunks", False) for s in stages):
        return None
    q = stat_stages[-1]
    protocol = ("deferred_codes", "deferred_kinds", "deferred_guess", "deferred_resolve")
    return q if all(hasattr(stages[q], a) for a in protocol) else None


def merge_leaf_by_leaf(stages: Sequence[Any], base: PyTree, entries: Sequence[Any], scale: jax.Array, weights: Any,
                       key: jax.Array | None, flags: Sequence[bool], *, check: bool, donate: bool = False
                       ) -> tuple[PyTree, list[bool] | None, int]:
    """Runs a merge chain leaf by leaf (module docstring); see :func:`schedulable` for when it applies.

    Args:
      stages: the chain's stages (exactly one reduction).
      base: theta_0, concrete arrays.
      entries: T fine-tuned models or :class:`TaskVector` s.
      scale: lambda (float32 scalar).
      weights: T per-task weights, ``{path: [T]}``, or None.
      key: ``jax.random`` key, or None.
      flags: per leaf of ``base``, whether it is a head leaf (base + sum_t tau_t).
      check: compute the inputs' finiteness flags.
      donate: delete each leaf of ``base`` and ``entries`` once its output exists (the base's buffer is donated).

    Returns:
      (the merged tree, per leaf of base then of each entry the finiteness flag of every float leaf in the order of
      ``mergejax.merge._finite_names`` (None without ``check``), the counting passes of the last global search).
    """
    global last_info
    plan = _Plan(stages, base, entries, flags, weights, key)
    defer = _deferrable(plan.stages, donate)
    for q, s in enumerate(plan.stages):
        if not getattr(s, "leafwise", False) and q != defer:
            plan.given[q] = s.host_stats(Runner(plan, q))
    out = list(plan.b_leaves)
    finite: dict[int, Any] = {}
    upto = len(plan.stages)
    prior = None if defer is None else jnp.zeros((len(plan.stages[defer].deferred_kinds),), jnp.float32)
    tallies: dict[int, tuple] = {}  # deferred: leaf -> (its tally, the statistic it assumed)

    def run_final(j: int, final: Callable) -> Any:
        stages = plan.stages_at(j, upto)
        rows = _chunk_rows(np.shape(plan.b_leaves[j]), _chunkable(stages))
        deferring = defer is not None and defer not in plan.given  # not yet resolved
        return final(stages, plan.b_leaves[j], plan.entries_at(j), np.int32(plan.index[j]), plan.key_for(upto),
                     plan.words_at(j, upto), scale, prior if deferring else None, tv_mask=plan.tv_mask,
                     check=check, rows=rows, defer=defer if deferring else -1)

    for j, b in enumerate(plan.b_leaves):
        if not is_float(b):
            continue
        ent = plan.entries_at(j)
        aliased = any(e is b for e in ent)  # the same buffer passed twice cannot be donated
        final = _final_donating if donate and not aliased else _final_jit
        if flags[j]:
            out[j], finite[j] = _head_jit(b, ent, tv_mask=plan.tv_mask, check=check)
        elif defer is None:
            out[j], finite[j] = run_final(j, final)
        else:
            out[j], finite[j], tally, used, prior = run_final(j, final)
            tallies[j] = (tally, used)
        if donate:
            jax.block_until_ready(out[j])
            for x in (b, *ent):
                if isinstance(x, jax.Array) and not x.is_deleted():
                    x.delete()
    recomputed = _resolve_deferred(plan, defer, tallies, lambda j: run_final(j, _final_jit)[0], out)
    last_info = RunInfo(plan.passes, defer, recomputed, plan.gather_misses)
    merged = jax.tree_util.tree_unflatten(plan.treedef, out)
    if not check:
        return merged, None, plan.passes
    fl = {j: np.asarray(v) for j, v in jax.device_get(finite).items()}
    fpos = [j for j, b in enumerate(plan.b_leaves) if is_float(b)]
    order = [fl[j][0] for j in fpos]
    for t in range(plan.n_tasks):
        order += [fl[j][1 + t] for j in fpos]
    return merged, [bool(v) for v in order], plan.passes


def _resolve_deferred(plan: _Plan, defer: int | None, tallies: dict, rerun: Callable[[int], Any], out: list) -> int:
    """After a deferred final pass: the true statistic from the exact (int64) sum of the leaves' tallies, set as
    ``plan.given[defer]``, and every leaf that assumed another one and has coordinates it affects (its tally of the
    last of ``deferred_kinds``) rerun with it into ``out``. Returns the number of leaves rerun."""
    if defer is None or not tallies:
        return 0
    got = jax.device_get(tallies)
    total = np.sum([np.asarray(t, np.int64) for t, _ in got.values()], axis=0)
    true = plan.stages[defer].deferred_resolve(total)
    plan.given[defer] = true
    stale = [j for j, (t, used) in got.items() if int(t[-1]) > 0 and not np.array_equal(np.asarray(used),
                                                                                      np.asarray(true))]
    for j in stale:
        out[j].delete()  # its stale output freed first: the rerun's takes its place, no more memory
        out[j] = rerun(j)
    return len(stale)
