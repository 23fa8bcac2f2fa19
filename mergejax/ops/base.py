"""Shared plumbing of the merge primitives: stages as pytrees, and batched maps over the float leaves of T trees.

A *stage* maps a tuple of T task-vector trees to a tuple of trees: per-task transforms (:class:`Transform`) keep T,
a reduction (:class:`Reduction`) returns a tuple of one tree. Stages only touch float leaves; non-float leaves pass
through untouched.

A stage is a frozen dataclass *and* a pytree, like ``flax.struct.dataclass``. Subclassing :class:`Transform` or
:class:`Reduction` is enough: the subclass is made a frozen dataclass on first use (decorating it with
``@dataclass(frozen=True)`` yourself is fine too). Its fields split in two:

- **data** (pytree leaves, traced under ``jit``): arrays and floats such as per-task weights, Fisher diagonals, Gram
  matrices or learned coefficients. New values never recompile.
- **static metadata** (part of the treedef, hashed): strings, booleans, integers, None, ranks and shapes. A field is
  static when declared with :func:`static_field` (e.g. a density, which sets a rank), or when its value is a string,
  boolean, integer, None or a tuple of those. Changing one compiles a new program.

:func:`map_float_leaves` is how stages visit leaves: it groups same-shaped leaves and runs the per-leaf function once
per group under ``jax.vmap``, so a 300-leaf model traces (and compiles) about as much code as a 10-leaf one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from fractions import Fraction
from typing import Any, Callable, ClassVar, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.tree import PyTree, is_float, is_traced, leaf_spec, path_str, paths_and_leaves, stack_by_shape

__all__ = [
    "Stage",
    "TaskVectors",
    "static_field",
    "map_float_leaves",
    "leaf_table",
    "stack_by_shape",
    "rank_from_fraction",
    "check_fraction",
    "leaf_keys",
    "Transform",
    "Reduction",
    "TakesWeights",
    "leaf_index",
    "run_stages",
    "Given",
]

TaskVectors = tuple[PyTree, ...]


class Stage(Protocol):
    """One step of a merge chain: ``stage(task_vectors, key) -> task_vectors``."""

    reduces: ClassVar[bool]
    needs_key: ClassVar[bool]

    def __call__(self, tvs: TaskVectors, key: jax.Array | None) -> TaskVectors: ...


# ----------------------------------------------------------------------------------------------------------------------
# Stages as frozen-dataclass pytrees.
# ----------------------------------------------------------------------------------------------------------------------


def static_field(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A stage field that is static metadata (hashed into the treedef, never traced), like ``flax.struct.field``."""
    return dataclasses.field(default=default, metadata={"static": True}, **kwargs)


def _is_static_value(v: Any) -> bool:
    """Strings, booleans, integers, None and (nested) tuples of them are metadata; arrays and floats are data."""
    if isinstance(v, tuple):
        return all(_is_static_value(e) for e in v)
    return v is None or isinstance(v, (str, bool, int, np.integer, np.bool_))


def _finalize_stage_class(cls: type) -> None:
    """Makes ``cls`` a frozen dataclass (unless it is one already) and registers it as a pytree, once.

    Fields declared with :func:`static_field` are always metadata. Any other field is metadata when its value is a
    string, boolean, integer, None or a tuple of those, and data (a pytree child, traced under ``jit``) otherwise.
    """
    if cls.__dict__.get("_mergejax_stage_ready", False):
        return
    if "__dataclass_fields__" not in cls.__dict__:
        dataclasses.dataclass(frozen=True)(cls)
    elif not cls.__dataclass_params__.frozen:
        raise TypeError(
            f"{cls.__name__}: merge stages are frozen dataclasses; drop the @dataclass decorator (subclassing "
            "Transform or Reduction is enough) or write @dataclass(frozen=True)"
        )
    names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    declared = frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("static", False))

    def split(obj):
        static = tuple(n for n in names if n in declared or _is_static_value(getattr(obj, n)))
        data = tuple(n for n in names if n not in static)
        return static, data

    def flatten_with_keys(obj):
        static, data = split(obj)
        children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data)
        return children, (static, tuple(getattr(obj, n) for n in static), data)

    def unflatten(aux, children):
        static, values, data = aux
        obj = object.__new__(cls)  # no __init__/__post_init__: leaves may be tracers or placeholders
        for n, v in zip(static, values):
            object.__setattr__(obj, n, v)
        for n, v in zip(data, children):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten)
    cls._mergejax_stage_ready = True


class _StageBase:
    """Finalizes subclasses lazily (first instantiation), so an optional ``@dataclass(frozen=True)`` still works.

    ``leafwise``: the stage's output at a leaf depends only on the T task-vector leaves there, the float-leaf index
    and its ``[T]`` weights (not on leaf paths, extras or other leaves), so an eager merge may run it leaf by leaf
    (:mod:`mergejax.ops.schedule`). A stage whose only cross-leaf dependence is a few global statistics implements
    ``host_stats(run)`` and ``apply_with(tvs, stats, key)`` instead.

    ``rowwise``: moreover, at a leaf of two or more axes, the output's rows (slices along the first axis) depend only on
    the same rows of the inputs, never on the leaf's size, its other rows or flat indices (elementwise maps, per-row
    selections along the last axis), so the schedule may run a large leaf in row chunks and hold only a chunk's
    temporaries. ``rowwise_given``: the same of ``apply_with`` and of the arrays ``stat_values`` returns, once the
    global statistics are given (the statistics' reductions, counts, extremes, sums and maxima, combine over chunks).
    ``row_chunks``: the stage's program holds leaf-sized temporaries (T key arrays of a per-row selection, T balancing
    weights), so chunking pays; a fused elementwise program is left whole (it needs no temporaries, and the loop costs
    time).
    """

    reduces: ClassVar[bool] = False
    needs_key: ClassVar[bool] = False
    leafwise: ClassVar[bool] = False
    rowwise: ClassVar[bool] = False
    rowwise_given: ClassVar[bool] = False
    row_chunks: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        for parent in reversed(cls.__mro__[1:]):  # parents first, so a subclass's dataclass sees their fields
            if issubclass(parent, _StageBase) and parent.__name__ not in ("_StageBase", "Transform", "Reduction"):
                _finalize_stage_class(parent)

    def __new__(cls, *args: Any, **kwargs: Any):
        _finalize_stage_class(cls)
        return object.__new__(cls)

    def with_weights(self, weights: Any) -> "_StageBase":
        """This stage with per-task weights (a ``[T]`` array or ``{path: [T]}``); transforms ignore them."""
        return self


class TakesWeights:
    """Mixin of stages with a ``weights`` data field: :meth:`with_weights` returns a copy with the field set."""

    def with_weights(self, weights: Any):
        """This stage with per-task ``weights`` (set by a merge's ``weights=``).

        Args:
          weights: per-task weights, ``[T]`` or ``{path: [T]}`` (traced data), or None.

        Returns:
          A copy of this stage with ``weights`` set.
        """
        return dataclasses.replace(self, weights=weights)


class Transform(_StageBase):
    """Base of per-task (T -> T) stages: implement ``__call__(self, tvs, key=None) -> tvs``."""


class Reduction(_StageBase):
    """Base of reductions (T -> 1): implement ``combine(self, xs) -> leaf`` for one leaf position.

    ``xs`` are the T task-vector leaves (float32 or wider) of one position; same-shaped positions are batched with
    ``jax.vmap``, so ``combine`` sees one unbatched leaf and must be vmappable. Per-task weights (``weights=`` of a
    merge) multiply each task vector before ``combine`` unless the reduction overrides :meth:`with_weights`.
    """

    reduces: ClassVar[bool] = True

    def combine(self, xs: list[jax.Array]) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return map_float_leaves(lambda xs, i: [self.combine(xs)], tvs, out_count=1)

    def with_weights(self, weights: Any) -> "Reduction":
        return _PreWeighted(self, weights)


class _PreWeighted(Reduction):
    """A reduction applied to w_t * tau_t (the default meaning of per-task weights)."""

    inner: Any
    weights: Any

    @property
    def leafwise(self) -> bool:  # type: ignore[override]
        """Leafwise when the wrapped reduction is."""
        return bool(getattr(self.inner, "leafwise", False))

    @property
    def rowwise(self) -> bool:  # type: ignore[override]
        """Rowwise when the wrapped reduction is (the weights scale whole leaves)."""
        return bool(getattr(self.inner, "rowwise", False))

    @property
    def rowwise_given(self) -> bool:  # type: ignore[override]
        """Rowwise with its statistics given when the wrapped reduction is."""
        return bool(getattr(self.inner, "rowwise_given", False))

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return self.inner(scale_tasks(tvs, self.weights), key)

    def stat_values(self, tvs: TaskVectors, name: Any, given: Any) -> Any:
        """The wrapped reduction's leaf statistics of w_t tau_t (see :mod:`mergejax.ops.schedule`)."""
        return self.inner.stat_values(scale_tasks(tvs, self.weights), name, given)

    def apply_with(self, tvs: TaskVectors, stats: Any, key: jax.Array | None = None) -> TaskVectors:
        """The wrapped reduction on w_t tau_t with its global statistics given."""
        return self.inner.apply_with(scale_tasks(tvs, self.weights), stats, key)


def scale_tasks(tvs: TaskVectors, weights: Any) -> TaskVectors:
    """w_t * tau_t for every float leaf; ``weights`` is ``[T]`` or ``{path: [T]}`` (missing paths: weight 1)."""
    if weights is None:
        return tvs
    T = len(tvs)

    def fn(xs, i, ex):
        return [x * ex[0][t].astype(x.dtype) for t, x in enumerate(xs)]

    return map_float_leaves(fn, tvs, extras=(per_leaf_weights(weights, tvs[0], T),))


def per_leaf_weights(weights: Any, tree: PyTree, T: int) -> dict[str, jax.Array]:
    """``{path: [T] float32}`` for every float leaf of ``tree`` from a ``[T]`` array, a mapping or a tree of ``[T]``."""
    paths = [p for p, x in paths_and_leaves(tree) if is_float(x)]
    if not isinstance(weights, Mapping) and np.ndim(weights) == 1:
        w = jnp.asarray(weights, jnp.float32)
        return {p: w for p in paths}
    table = leaf_table(weights)
    ones = jnp.ones((T,), jnp.float32)
    return {p: jnp.asarray(table[p], jnp.float32) if p in table else ones for p in paths}


# ----------------------------------------------------------------------------------------------------------------------
# Batched maps over float leaves.
# ----------------------------------------------------------------------------------------------------------------------


def leaf_table(extra: Any) -> dict[str, Any]:
    """``{path: leaf}`` of a tree, or the mapping itself (paths as :func:`mergejax.tree.path_str` renders them)."""
    if extra is None:
        return {}
    if isinstance(extra, Mapping) and all(isinstance(k, str) for k in extra) and not _looks_like_tree(extra):
        return dict(extra)
    return dict(paths_and_leaves(extra))


def _looks_like_tree(m: Mapping) -> bool:
    return any(isinstance(v, Mapping) for v in m.values())


def _tree_spec(e: Any) -> Hashable:
    if e is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(e)
    return str(treedef), tuple(leaf_spec(x) for x in leaves)


_LEAF_INDEX: list = []  # the float-leaf index of the one leaf a leaf-by-leaf program maps (see leaf_index)


class leaf_index:
    """Context (used while tracing a leaf-by-leaf program): trees given to :func:`map_float_leaves` hold one float
    leaf, whose float-leaf index in the whole model is ``index`` (traced), so per-leaf random streams match."""

    def __init__(self, index: Any):
        self.index = index

    def __enter__(self):
        _LEAF_INDEX.append(self.index)
        return self

    def __exit__(self, *exc: Any) -> None:
        _LEAF_INDEX.pop()


def map_float_leaves(
    fn: Callable[..., list[jax.Array]],
    tvs: Sequence[PyTree],
    *,
    out_count: int | None = None,
    kind: Callable[[str], Hashable] | None = None,
    extras: Sequence[Any] = (),
    batch: bool = True,
) -> TaskVectors:
    """Applies ``fn`` to every float leaf position of the T trees ``tvs``, one traced copy per group of leaves.

    ``fn(cols, i)`` gets the T leaves of one position and its float-leaf index ``i`` (a traced int32 when batched) and
    returns ``out_count`` leaves (default T). With ``kind``, ``fn(cols, i, kind(path))`` also gets a static value per
    leaf (e.g. "this 2-D leaf is a Flax kernel"). With ``extras`` (trees or ``{path: leaf}`` mappings), ``fn`` also
    gets, last, the list of their leaves at this path (None where one has none).

    Positions with the same shapes, dtypes, shardings, kind and extras' shapes are stacked and mapped with
    ``jax.vmap`` (XLA folds the stacking into its consumers), so code size and compile time grow with the number of
    distinct leaf shapes, not of leaves. ``batch=False`` maps leaf by leaf. Non-float positions keep the first tree's
    leaf.
    """
    tvs = tuple(tvs)
    flat = [jax.tree_util.tree_flatten_with_path(t) for t in tvs]
    treedef = flat[0][1]
    paths = [path_str(p) for p, _ in flat[0][0]]
    columns = list(zip(*[[x for _, x in leaves] for leaves, _ in flat]))
    n_out = len(tvs) if out_count is None else out_count
    tables = [leaf_table(e) for e in extras]
    outs: list[list[Any]] = [[col[0] for col in columns] for _ in range(n_out)]

    groups: dict[Hashable, list[tuple[int, int]]] = {}
    fi = 0 if not _LEAF_INDEX else _LEAF_INDEX[-1]
    for j, col in enumerate(columns):
        if not is_float(col[0]):
            continue
        k = kind(paths[j]) if kind is not None else None
        ex = [t.get(paths[j]) for t in tables]
        key = (tuple(leaf_spec(x) for x in col), k, tuple(_tree_spec(e) for e in ex))
        groups.setdefault(key if batch else (j,), []).append((j, fi))
        fi += 1

    def call(cols, i, k, ex):
        args = [list(cols), i]
        if kind is not None:
            args.append(k)
        if extras:
            args.append(list(ex))
        res = fn(*args)
        if len(res) != n_out:
            raise ValueError(f"map_float_leaves: fn returned {len(res)} leaves, expected {n_out}")
        return list(res)

    for members in groups.values():
        j0 = members[0][0]
        k = kind(paths[j0]) if kind is not None else None
        if len(members) == 1:
            j, i = members[0]
            res = call(columns[j], i, k, [t.get(paths[j]) for t in tables])
            for o in range(n_out):
                outs[o][j] = res[o]
            continue
        stacked = [jnp.stack([jnp.asarray(columns[j][t]) for j, _ in members]) for t in range(len(tvs))]
        ex_stacked = []
        for t in tables:
            vals = [t.get(paths[j]) for j, _ in members]
            ex_stacked.append(None if vals[0] is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *vals))
        idx = jnp.stack([jnp.asarray(i, jnp.int32) for _, i in members])
        res = jax.vmap(lambda cols, i, ex: call(cols, i, k, ex))(stacked, idx, ex_stacked)
        for m, (j, _) in enumerate(members):
            for o in range(n_out):
                outs[o][j] = res[o][m]
    return tuple(jax.tree_util.tree_unflatten(treedef, o) for o in outs)


# ----------------------------------------------------------------------------------------------------------------------
# Hyperparameter helpers.
# ----------------------------------------------------------------------------------------------------------------------


def check_fraction(name: str, value: Any, *, upper_open: bool = False) -> None:
    """Raises ``ValueError`` unless ``0 <= value <= 1`` (``< 1`` when ``upper_open``); traced values are not checked."""
    if is_traced(value):
        return
    v = float(value)
    ok = 0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value!r}")


def rank_from_fraction(fraction: float, n: int) -> int:
    """k = floor(fraction * n), computed exactly on the decimal the user wrote (0.29 * 100 -> 29, not 28)."""
    return int(Fraction(float(fraction)).limit_denominator(10**9) * n)


def run_stages(stages: Sequence[Any], tvs: TaskVectors, key: jax.Array | None, offset: int = 0) -> TaskVectors:
    """Applies ``stages`` in order; stage i draws from ``fold_in(key, offset + i)``.

    Args:
      stages: the chain's stages.
      tvs: T task-vector trees.
      key: ``jax.random`` key, or None.
      offset: the position of ``stages[0]`` in its chain.

    Returns:
      The stages' output (T trees, or one after a reduction).
    """
    for i, stage in enumerate(stages):
        tvs = stage(tvs, None if key is None else jax.random.fold_in(key, offset + i))
    return tvs


class Given(_StageBase):
    """A stage whose global statistics (a trim threshold, a majority sign) were computed beforehand, e.g. leaf by
    leaf from the host (:mod:`mergejax.ops.schedule`): calling it runs ``inner.apply_with(tvs, stats, key)``."""

    inner: Any
    stats: Any

    @property
    def reduces(self) -> bool:  # type: ignore[override]
        """The wrapped stage's ``reduces``."""
        return bool(self.inner.reduces)

    @property
    def rowwise(self) -> bool:  # type: ignore[override]
        """The wrapped stage's ``rowwise_given``: rowwise once its statistics are given."""
        return bool(getattr(self.inner, "rowwise_given", False))

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return self.inner.apply_with(tvs, self.stats, key)


def leaf_keys(key: jax.Array, task: int, leaf: int | jax.Array) -> jax.Array:
    """The PRNG key of one (task, leaf) pair: independent streams, stable under adding other leaves or tasks."""
    return jax.random.fold_in(jax.random.fold_in(key, task), leaf)
