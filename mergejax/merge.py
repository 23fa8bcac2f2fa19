"""The merge combinator and the named data-free methods built from it.

A merge is ``theta = theta_0 + scale * R(S_k(... S_1(tau_1, ..., tau_T)))``: per-task stages S (trim, DARE drop,
Breadcrumbs band, LiNeS, sign election) followed by one reduction R (sum, mean, disjoint mean, Fisher-weighted mean,
RegMean, PCB, ...), exactly like ``optax.chain`` composes gradient transformations::

    ties = mergejax.chain(mergejax.Trim(0.2), mergejax.ElectSign(), mergejax.DisjointMean())
    merged = ties(base, [ft_a, ft_b], scale=1.0, weights=[0.7, 0.3], heads=r"classifier/")

Stages after the reduction act on the merged vector ("TIES then LiNeS"). The combinator handles, once for every
method:

- **inputs**: fine-tuned models, :class:`~mergejax.tree.TaskVector` s and compressed task vectors (ternary), mixed;
- **heads**: leaves named by ``heads`` (a path regex or a boolean mask tree) are not merged; each takes
  base + sum_t tau_t (every task keeps its own head), and no stage ever sees them;
- **weights**: per-task weights (``[T]``, or ``{path: [T]}`` per leaf), given to each stage's ``with_weights``;
- **dtypes**: float32 accumulation (float64 stays float64), the base's dtypes out; integer leaves from the base;
- **NaN/Inf**: the inputs' finiteness is computed inside the merge program (no extra pass over the data) and reported
  by model and leaf path afterwards.
- **schedule**: an eager call on concrete, unsharded arrays runs leaf by leaf (:mod:`mergejax.ops.schedule`): one
  small program per leaf signature, global statistics (trim thresholds, majority sign, PCB quantiles) from per-leaf
  counts summed on the host, peak memory the output plus one leaf position's temporaries; ``donate=True`` frees the
  inputs as they are consumed. Under the caller's tracing the merge is one program (below).

A :class:`Merger` and its stages are pytrees: their static metadata (ranks, scopes, methods) keys the compiled
program, their data (weights, Fisher diagonals, coefficients, ``scale``) is traced, so new weights or a lambda sweep
never recompile. Every method works under the caller's ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (values are not
known there, so the NaN/Inf report is skipped; use ``jax.experimental.checkify`` if you need it). Task vectors are a
tuple of trees traced in a static loop (never stacked into [T, ...] arrays); same-shaped leaves are batched with
``vmap``, so compile time depends on the number of distinct leaf shapes, not of leaves. Every operation is
elementwise or a scalar count, so arrays placed with a ``NamedSharding`` stay sharded and only scalars cross devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.ops.base import Stage, TaskVectors, leaf_table, run_stages
from mergejax.ops.breadcrumbs import BreadcrumbsMask
from mergejax.ops.dare import DareDrop, Rescale
from mergejax.ops.pcb import PCB
from mergejax.ops.reduce import DisjointMax, DisjointMean, DisjointSum, Sum
from mergejax.ops.schedule import merge_leaf_by_leaf, schedulable
from mergejax.ops.sign import ElectSign, SignMethod
from mergejax.ops.trim import Scope, Trim
from mergejax.precision import warn_float16_overflow, warn_float64
from mergejax.tree import (
    PyTree,
    TaskVector,
    _leaf_apply,
    _leaf_task_vector,
    acc_dtype,
    as_tree,
    check_finite_many,
    finite_flags,
    head_flags,
    is_float,
    is_traced,
    paths_and_leaves,
    raise_nonfinite,
    stack_by_shape,
    unpack_flags,
    validate_like,
)

__all__ = [
    "Merger",
    "chain",
    "average",
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "pcb",
    "task_vectors_of",
    "ties_chain",
    "dare_chain",
    "breadcrumbs_chain",
]

Schedule = Literal["auto", "leaves", "program"]
Heads = Any  # a path regex, a boolean mask tree with the base's structure, or None
Weights = Any  # None, T floats, or {leaf path: [T]} / a tree of [T] arrays (per-leaf weights)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: models, typed task vectors, compressed task vectors.
# ----------------------------------------------------------------------------------------------------------------------


def _is_encoded(x: Any) -> bool:
    """True for a task vector stored in another form (e.g. a compressed ``TernaryTaskVector``)."""
    return hasattr(x, "to_task_vector") and hasattr(x, "abstract")


def _structure(x: Any) -> PyTree:
    """What validation compares for a task vector: shapes and accumulation dtypes of its dense tree."""
    tree = x.abstract() if _is_encoded(x) else as_tree(x)

    def leaf(v):
        dt = acc_dtype(v.dtype) if is_float(v) else v.dtype
        return jax.ShapeDtypeStruct(tuple(v.shape) if hasattr(v, "shape") else (), dt)

    return jax.tree_util.tree_map(leaf, tree)


def _entry_task_vector(entry: Any, base: PyTree) -> PyTree:
    """The dense task vector (acc dtype float leaves) of a model, a TaskVector or a compressed task vector.

    Called inside the merge's ``jit``, so XLA fuses a decode or a ``ft - base`` into its consumers.
    """
    if _is_encoded(entry):
        return entry.to_task_vector()
    if isinstance(entry, TaskVector):
        return jax.tree_util.tree_map(
            lambda t, b: jnp.asarray(t, acc_dtype(b.dtype)) if is_float(b) else jnp.zeros_like(b), entry.tree, base
        )
    return jax.tree_util.tree_map(_leaf_task_vector, entry, base)


def _check_sequence(models: Any, what: str) -> tuple:
    if isinstance(models, (Mapping, TaskVector)) or _is_encoded(models) or not isinstance(models, Sequence):
        kind = type(models).__name__
        raise TypeError(f"{what} must be a list of models or task vectors, got a {kind}; wrap a single one in a list")
    models = tuple(models)
    if not models:
        raise ValueError(f"{what} is empty: need at least one model")
    return models


def _validate_entries(base: PyTree, entries: Sequence[Any], what: str = "finetuned") -> tuple:
    """Checks each entry against ``base``: models must match its structure, shapes and dtypes; task vectors (typed or
    compressed) its structure and shapes."""
    entries = _check_sequence(entries, what)
    if isinstance(base, TaskVector) or _is_encoded(base):
        raise TypeError("base must be the pre-trained model, got a task vector")
    for i, m in enumerate(entries):
        if _is_encoded(m) or isinstance(m, TaskVector):
            validate_like(_structure(base), [_structure(m)], what=what, first_index=i)
        else:
            validate_like(base, [m], what=what, first_index=i)
    warn_float64(base, what="base")  # x64 off: float64 inputs are computed in float32; say so, naming the leaves
    return entries


def task_vectors_of(base: PyTree, entries: Sequence[Any]) -> TaskVectors:
    """The dense task vectors of ``entries`` (models, TaskVectors or compressed ones) as plain trees, validated.

    Args:
      base: the pre-trained model theta_0.
      entries: T fine-tuned models, :class:`TaskVector` s or compressed task vectors.

    Returns:
      T plain trees tau_t = theta_t - theta_0 (Ilharco et al., 2023, Eq. 1), in the accumulation dtype.
    """
    entries = _validate_entries(base, entries)
    return _task_vectors_jit(base, entries)


@jax.jit
def _task_vectors_jit(base: PyTree, entries: tuple) -> TaskVectors:
    return tuple(_entry_task_vector(e, base) for e in entries)


def _finite_names(base: PyTree, entries: Sequence[Any], what: str, with_base: bool) -> list[str]:
    """The ``"model:path"`` names of the leaves :func:`_input_flags` checks, in the same order."""
    trees = ([("base", base)] if with_base else []) + [
        (f"{what}[{i}]", as_tree(e)) for i, e in enumerate(entries) if not _is_encoded(e)
    ]
    return [f"{name}:{p}" for name, t in trees for p, x in paths_and_leaves(t) if is_float(x)]


def _input_flags(base: PyTree, entries: Sequence[Any], with_base: bool) -> list:
    trees = ([base] if with_base else []) + [as_tree(e) for e in entries if not _is_encoded(e)]
    return finite_flags([x for t in trees for x in jax.tree_util.tree_leaves(t) if is_float(x)])


def _check_scalar(name: str, value: Any) -> None:
    if value is None or is_traced(value):
        return
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    if not np.isfinite(arr):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_weights(weights: Weights, n_tasks: int) -> None:
    """Per-task weights: T finite numbers, or per leaf ``[T]`` arrays of finite numbers (traced values unchecked)."""
    if weights is None or is_traced(weights):
        return
    vector = not isinstance(weights, Mapping) and np.ndim(weights) == 1
    items = [("", weights)] if vector else list(leaf_table(weights).items())
    for path, w in items:
        arr = np.asarray(w, np.float64)
        where = f" at {path!r}" if path else ""
        if arr.shape != (n_tasks,):
            raise ValueError(f"weights{where} must have one entry per task ({n_tasks}), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"weights{where} must be finite, got {arr.tolist()}")


def _as_weights(weights: Weights) -> Weights:
    """Weights as float32 arrays (a Python list would become a list of tracers, and keys the cache by its length)."""
    if weights is None:
        return None
    if not isinstance(weights, Mapping) and np.ndim(weights) == 1:
        return jnp.asarray(weights, jnp.float32)
    return jax.tree_util.tree_map(lambda w: jnp.asarray(w, jnp.float32), weights)


# ----------------------------------------------------------------------------------------------------------------------
# Heads: leaves kept per task.
# ----------------------------------------------------------------------------------------------------------------------


def _without_heads(tv: PyTree, flags: tuple[bool, ...]) -> PyTree:
    """``tv`` with head leaves replaced by None (stages never see them; paths of the other leaves are unchanged)."""
    if not any(flags):
        return tv
    leaves, treedef = jax.tree_util.tree_flatten(tv)
    return jax.tree_util.tree_unflatten(treedef, [None if f else x for x, f in zip(leaves, flags)])


def assemble(base: PyTree, merged: PyTree, tvs: TaskVectors, flags: tuple[bool, ...], scale: Any) -> PyTree:
    """theta_0 + scale * tau_m in the base's dtypes; head leaves get base + sum_t tau_t, non-float leaves the base's.

    ``merged`` has None at head positions (it was computed on :func:`_without_heads` trees).

    Args:
      base: the pre-trained model theta_0.
      merged: the merged task vector tau_m, None at head leaves.
      tvs: the T task vectors (their head leaves are summed).
      flags: per leaf of ``base``, whether it is a head leaf.
      scale: lambda (traced).

    Returns:
      The merged model, with the base's structure and dtypes.
    """
    b_leaves, treedef = jax.tree_util.tree_flatten(base)
    m_leaves = jax.tree_util.tree_flatten(merged, is_leaf=lambda x: x is None)[0]
    t_leaves = [jax.tree_util.tree_leaves(tv) for tv in tvs]
    out = []
    for i, (b, m) in enumerate(zip(b_leaves, m_leaves)):
        if not is_float(b):
            out.append(b)
        elif flags[i]:
            dt = acc_dtype(b.dtype)
            out.append((jnp.asarray(b, dt) + sum(jnp.asarray(t[i], dt) for t in t_leaves)).astype(b.dtype))
        else:
            out.append(_leaf_apply(b, m, scale))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------------------------------
# The combinator.
# ----------------------------------------------------------------------------------------------------------------------


_run = run_stages


@jax.tree_util.register_pytree_with_keys_class
class Merger:
    """A chain of stages with exactly one reduction. Build it with :func:`chain`.

    A pytree: the stages' data (weights, Fishers, coefficients, LiNeS alpha/beta) are its leaves, their static
    metadata its treedef.
    """

    __slots__ = ("stages",)

    def __init__(self, stages: Sequence[Stage]):
        stages = tuple(stages)
        for s in stages:
            if not callable(s) or not hasattr(s, "reduces"):
                raise TypeError(f"{s!r} is not a merge stage (a Transform or a Reduction)")
        n_red = sum(bool(s.reduces) for s in stages)
        if n_red != 1:
            raise ValueError(f"a merge chain needs exactly one reduction stage, got {n_red}")
        self.stages = stages

    def tree_flatten_with_keys(self):
        """The stages as children keyed by position; their count as the treedef's auxiliary data.

        Returns:
          ((SequenceKey(i), stage_i), ...) and the number of stages.
        """
        return tuple((jax.tree_util.SequenceKey(i), s) for i, s in enumerate(self.stages)), len(self.stages)

    @classmethod
    def tree_unflatten(cls, aux: Any, children: Sequence[Any]) -> "Merger":
        """Rebuilds a chain from :meth:`tree_flatten_with_keys` output without re-validating it.

        Args:
          aux: the number of stages (unused).
          children: the stages.

        Returns:
          The chain.
        """
        obj = object.__new__(cls)
        obj.stages = tuple(children)
        return obj

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.stages))})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Merger) and self.stages == other.stages

    def __hash__(self) -> int:
        return hash(jax.tree_util.tree_structure(self))

    @property
    def split(self) -> int:
        """Index of the reduction stage.

        Returns:
          The position of the one stage whose ``reduces`` is true.
        """
        return next(i for i, s in enumerate(self.stages) if s.reduces)

    @property
    def needs_key(self) -> bool:
        """Whether a stage draws random numbers (DARE).

        Returns:
          True when some stage has ``needs_key``.
        """
        return any(s.needs_key for s in self.stages)

    def with_weights(self, weights: Weights) -> "Merger":
        """The chain with per-task ``weights`` given to every stage (``Stage.with_weights``).

        Args:
          weights: T per-task weights w_t (traced), or None.

        Returns:
          A new chain (this one when ``weights`` is None).
        """
        if weights is None:
            return self
        return Merger(tuple(s.with_weights(weights) for s in self.stages))

    def _check_key(self, key: jax.Array | None) -> None:
        if self.needs_key and key is None:
            names = [type(s).__name__ for s in self.stages if s.needs_key]
            raise ValueError(f"this merge chain draws random numbers ({', '.join(names)}): pass key=jax.random.key(...)")

    def _task_vector_inputs(self, tvs: Sequence[Any], key: jax.Array | None) -> tuple:
        tvs = _check_sequence(tvs, "task_vectors")
        validate_like(_structure(tvs[0]), [_structure(t) for t in tvs[1:]], what="task_vectors")
        self._check_key(key)
        return tuple(tvs)

    def transform(self, tvs: Sequence[Any], key: jax.Array | None = None) -> TaskVectors:
        """The per-task vectors after the stages before the reduction (e.g. TIES-trimmed, sign-agreeing vectors).

        Args:
          tvs: T task vectors (plain trees, :class:`TaskVector` s or compressed ones).
          key: ``jax.random`` key, required when a stage draws random numbers (DARE).

        Returns:
          The T transformed task vectors, as plain trees.
        """
        return _transform_jit(self, self._task_vector_inputs(tvs, key), key)

    def merge_task_vectors(self, tvs: Sequence[Any], key: jax.Array | None = None, *, weights: Weights = None
                           ) -> PyTree:
        """The merged task vector tau_m (a plain tree) of the given task vectors.

        Args:
          tvs: T task vectors (plain trees, :class:`TaskVector` s or compressed ones).
          key: ``jax.random`` key, required when a stage draws random numbers (DARE).
          weights: T per-task weights w_t (traced), or None.

        Returns:
          tau_m, a plain tree with the task vectors' structure.
        """
        tvs = self._task_vector_inputs(tvs, key)
        _check_weights(weights, len(tvs))
        return _merge_tvs_jit(self, tvs, _as_weights(weights), key)

    def __call__(
        self,
        base: PyTree,
        finetuned: Sequence[Any],
        *,
        scale: float | jax.Array = 1.0,
        weights: Weights = None,
        heads: Heads = None,
        key: jax.Array | None = None,
        check_finite: bool = True,
        donate: bool = False,
        schedule: Schedule = "auto",
    ) -> PyTree:
        """theta_0 + scale * merged task vector of ``finetuned`` against ``base``, in the base's dtypes.

        An eager call on concrete, unsharded arrays runs leaf by leaf (:mod:`mergejax.ops.schedule`) when every stage
        allows it (the data-free methods do): one small program per leaf signature, so compile time does not grow
        with the number of leaves, and peak memory is the output plus one leaf position's temporaries. Otherwise
        (inside the caller's ``jit``/``vmap``/``grad``, sharded leaves, compressed inputs, stages that need leaf
        paths) the merge is one traced program.

        Args:
          base: pre-trained parameters theta_0.
          finetuned: T fine-tuned trees with the base's structure, shapes and dtypes; an entry may instead be a
            :class:`~mergejax.tree.TaskVector` or a compressed task vector (``mergejax.ternary.TernaryTaskVector``).
          scale: lambda, traced (changing it does not recompile).
          weights: per-task weights: T numbers, or ``{leaf path: [T]}`` (per-leaf, e.g. AdaMerging's layer-wise
            coefficients); traced. How a stage uses them is its ``with_weights`` (sum: sum_t w_t tau_t; TIES: sign
            elected on w_t tau_t and a weighted disjoint mean).
          heads: leaves kept per task (classification heads): a regex searched in leaf paths or a boolean mask
            tree. A head leaf is base + sum_t tau_t; no stage sees it.
          key: ``jax.random`` key, required when a stage draws random numbers.
          check_finite: report NaN/Inf inputs by model and leaf path (computed inside the merge program; skipped under
            the caller's tracing).
          donate: the caller no longer needs ``base`` and ``finetuned``: their buffers are donated (leaf by leaf:
            each leaf's inputs are deleted once its output exists), so the merge needs no memory beyond the
            inputs. The inputs are deleted afterwards (a NaN/Inf report is still raised).
          schedule: ``"auto"`` (above), ``"leaves"`` (leaf by leaf, an error where it does not apply) or
            ``"program"`` (one traced program).

        Returns:
          The merged tree, with the base's structure and dtypes.
        """
        entries = _validate_entries(base, finetuned)
        for stage in self.stages:  # whole-model checks, e.g. a matrix merge warning that most leaves are averaged
            if hasattr(stage, "check_model"):
                stage.check_model(base)
        _check_scalar("scale", scale)
        _check_weights(weights, len(entries))
        self._check_key(key)
        flags = tuple(head_flags(base, heads))
        models_traced = is_traced(base, entries)
        eager = not models_traced and not is_traced(scale, weights, key, self)
        if schedule not in ("auto", "leaves", "program"):
            raise ValueError(f"schedule must be 'auto', 'leaves' or 'program', got {schedule!r}")
        if schedule != "program" and eager and schedulable(self.stages, base, entries):
            out, finite, _ = merge_leaf_by_leaf(self.stages, base, entries, np.asarray(scale, np.float32),
                                                _as_weights(weights), key, flags, check=check_finite, donate=donate)
            if check_finite:
                raise_nonfinite(_finite_names(base, entries, "finetuned", True), finite)
            warn_float16_overflow(out)
            return out
        if schedule == "leaves":
            raise ValueError("schedule='leaves' needs an eager call on concrete, unsharded models or TaskVectors and "
                             "stages that run leaf by leaf (leafwise or with host_stats)")
        fused = check_finite and eager
        if check_finite and not models_traced and not fused:  # traced scale/weights: a separate check
            check_finite_many([base, *[e for e in entries if not _is_encoded(e)]],
                              what=["base", *[f"finetuned[{i}]" for i, e in enumerate(entries) if not _is_encoded(e)]])
        donating = donate and not models_traced and not _aliased(base, entries)
        run = _merge_models_donating if donating else _merge_models_jit
        out, finite = run(self, base, entries, jnp.asarray(scale, jnp.float32), _as_weights(weights), key,
                          flags=flags, check=fused)
        if donate and not models_traced:
            jax.block_until_ready(out)
            _delete_inputs(base, entries, keep=out)
        if fused and not is_traced(finite):  # (concrete inputs inside the caller's trace give traced flags)
            names = _finite_names(base, entries, "finetuned", True)
            raise_nonfinite(names, unpack_flags(jax.device_get(finite), len(names)))
        if not is_traced(out):
            warn_float16_overflow(out)
        return out


@jax.jit
def _transform_jit(m: Merger, tvs: tuple, key):
    return _run(m.stages[: m.split], tuple(_dense(t) for t in tvs), key)


def _dense(tv: Any) -> PyTree:
    return tv.to_task_vector() if _is_encoded(tv) else as_tree(tv)


@jax.jit
def _merge_tvs_jit(m: Merger, tvs: tuple, weights, key):
    (merged,) = _run(m.with_weights(weights).stages, tuple(_dense(t) for t in tvs), key)
    return merged


def merge_body(m: Merger, base: PyTree, tvs: TaskVectors, scale: Any, weights: Weights, key: Any,
               flags: tuple[bool, ...]) -> PyTree:
    """The traced merge: stages on the head-free task vectors, then :func:`assemble` (for use inside a ``jit``).

    Args:
      m: the merge chain.
      base: the pre-trained model theta_0.
      tvs: the T dense task vectors.
      scale: lambda (traced).
      weights: T per-task weights (traced), or None.
      key: ``jax.random`` key for stages that draw random numbers, or None.
      flags: per leaf of ``base``, whether it is a head leaf.

    Returns:
      The merged model, with the base's structure and dtypes.
    """
    body = tuple(_without_heads(tv, flags) for tv in tvs)
    (merged,) = _run(m.with_weights(weights).stages, body, key)
    return assemble(base, merged, tvs, flags, scale)


def _task_vectors_stacked(base: PyTree, entries: tuple) -> TaskVectors:
    """The dense task vectors of ``entries``, computed on stacks of same-shaped leaves (one subtraction per leaf shape,
    not per leaf: the stages' own batching then reads the same stacks, which keeps programs small)."""
    b_leaves, treedef = jax.tree_util.tree_flatten(base)
    fpos = [i for i, x in enumerate(b_leaves) if is_float(x)]
    groups = [[fpos[j] for j in idx] for idx, _ in stack_by_shape([b_leaves[i] for i in fpos])]
    out = []
    for e in entries:
        if _is_encoded(e) or isinstance(e, TaskVector):
            out.append(_entry_task_vector(e, base))
            continue
        e_leaves = jax.tree_util.tree_leaves(e)
        tv = [jnp.zeros_like(x) for x in b_leaves]
        for idx in groups:
            dt = acc_dtype(b_leaves[idx[0]].dtype)
            diff = (jnp.stack([jnp.asarray(e_leaves[i], dt) for i in idx])
                    - jnp.stack([jnp.asarray(b_leaves[i], dt) for i in idx]))
            for m, i in enumerate(idx):
                tv[i] = diff[m]
        out.append(jax.tree_util.tree_unflatten(treedef, tv))
    return tuple(out)


def _merge_models(m: Merger, base: PyTree, entries: tuple, scale, weights, key, *, flags, check):
    tvs = _task_vectors_stacked(base, entries)
    finite = _input_flags(base, entries, True) if check else None
    return merge_body(m, base, tvs, scale, weights, key, flags), finite


_merge_models_jit = jax.jit(_merge_models, static_argnames=("flags", "check"))
_merge_models_donating = jax.jit(_merge_models, static_argnames=("flags", "check"), donate_argnames=("base",))


def _aliased(base: PyTree, entries: Sequence[Any]) -> bool:
    """Whether a buffer of ``base`` is also passed as a leaf of an entry (it cannot be donated then)."""
    ids = {id(x) for x in jax.tree_util.tree_leaves(base)}
    return any(id(x) in ids for e in entries for x in jax.tree_util.tree_leaves(e))


def _delete_inputs(base: PyTree, entries: Sequence[Any], keep: PyTree) -> None:
    """Deletes the device buffers of ``base`` and ``entries`` (``donate=True``: the caller gave them up), except
    those that are leaves of ``keep`` (the result: a non-float leaf is the base's own array)."""
    kept = {id(x) for x in jax.tree_util.tree_leaves(keep)}
    for x in jax.tree_util.tree_leaves((base, tuple(entries))):
        if isinstance(x, jax.Array) and id(x) not in kept and not x.is_deleted():
            x.delete()


def chain(*stages: Stage) -> Merger:
    """Composes per-task stages and one reduction into a merge method (like ``optax.chain``).

    Args:
      *stages: :class:`Transform` s and exactly one :class:`Reduction`, applied in order.

    Returns:
      The :class:`Merger`, callable as ``merger(base, finetuned, ...)``.

    Raises:
      TypeError: an argument is not a stage.
      ValueError: the chain does not hold exactly one reduction.

    Example::

        dare_ties = chain(DareDrop(0.9), Trim(0.2), ElectSign(), DisjointMean())
        merged = dare_ties(base, finetuned, key=jax.random.key(0))
    """
    return Merger(tuple(stages))


# ----------------------------------------------------------------------------------------------------------------------
# Named methods.
# ----------------------------------------------------------------------------------------------------------------------


@jax.jit
def _average_jit(models: tuple[PyTree, ...], weights=None) -> PyTree:
    def leaf(*xs):
        if not is_float(xs[0]):
            return xs[0]
        dt = acc_dtype(xs[0].dtype)
        if weights is None:
            return (sum(jnp.asarray(x, dt) for x in xs) / len(xs)).astype(xs[0].dtype)
        w = jnp.asarray(weights, dt)
        return (sum(w[i] * jnp.asarray(x, dt) for i, x in enumerate(xs)) / jnp.sum(w)).astype(xs[0].dtype)

    return jax.tree_util.tree_map(leaf, *models)


def average(models: Sequence[PyTree], *, weights: Sequence[float] | jax.Array | None = None,
            check_finite: bool = True) -> PyTree:
    """Weight averaging (Wortsman et al., 2022, "model soups"): theta = sum_m w_m theta_m / sum_m w_m (w = 1).

    Accumulates in float32 and returns the first model's dtypes; non-float leaves come from the first model.
    Memory: the M inputs plus one output.

    Args:
      models: M models with one structure, shapes and dtypes (not task vectors: those need a base, see
        :func:`task_arithmetic`).
      weights: M non-negative weights (mergekit's ``linear`` with ``normalize``), traced.
      check_finite: report NaN/Inf leaves by model and path.

    Returns:
      The averaged model, with the first model's structure and dtypes.
    """
    models = _check_sequence(models, "models")
    for i, m in enumerate(models):
        if isinstance(m, TaskVector) or _is_encoded(m):
            raise TypeError(
                f"models[{i}] is a {type(m).__name__}: average merges models; for task vectors use "
                "task_arithmetic(base, task_vectors, scale=1/T)"
            )
    validate_like(models[0], models[1:], what="models", first_index=1)
    warn_float64(models[0], what="models[0]")
    _check_weights(weights, len(models))
    if weights is not None and not is_traced(weights) and not np.sum(np.asarray(weights, np.float64)) > 0:
        raise ValueError(f"weights must have a positive sum, got {np.asarray(weights).tolist()}")
    if check_finite:
        check_finite_many(models, what=[f"models[{i}]" for i in range(len(models))])
    return _average_jit(models, None if weights is None else jnp.asarray(weights, jnp.float32))


def task_arithmetic(
    base: PyTree,
    finetuned: Sequence[Any],
    *,
    scale: float = 1.0,
    weights: Weights = None,
    heads: Heads = None,
    check_finite: bool = True,
    donate: bool = False,
) -> PyTree:
    """Task arithmetic (Ilharco et al., 2023, Eq. 2): theta = theta_0 + lambda * sum_t w_t tau_t.

    Memory (eager call, leaf by leaf): the output, 1.0 model above the inputs (measured, T = 4); traced inside a
    ``jit``, about one float32 model of intermediates more.

    Args:
      base: pre-trained model theta_0.
      finetuned: T fine-tuned models or task vectors.
      scale: lambda (paper: chosen on validation, 0.3-0.4 typical for 8 tasks).
      weights: per-task weights w_t (default 1).
      heads: leaves kept per task (see :meth:`Merger.__call__`).
      check_finite: report NaN/Inf inputs by path.
      donate: the inputs are no longer needed: their buffers are freed as the merge consumes them (deleted
        afterwards; see :meth:`Merger.__call__`).

    Returns:
      The merged model, with the base's structure and dtypes.

    Example:
      >>> import jax.numpy as jnp, mergejax as mj
      >>> mj.task_arithmetic({"w": jnp.ones(2)}, [{"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([1.0, 3.0])}],
      ...                    scale=0.5)["w"].tolist()
      [1.5, 2.0]
    """
    return chain(Sum())(base, finetuned, scale=scale, weights=weights, heads=heads, check_finite=check_finite,
                        donate=donate)


_DISJOINT = {"mean": DisjointMean, "sum": DisjointSum, "max": DisjointMax}


def _disjoint(reduce: str):
    if reduce not in _DISJOINT:
        raise ValueError(f"reduce must be one of {sorted(_DISJOINT)}, got {reduce!r}")
    return _DISJOINT[reduce]()


def ties(
    base: PyTree,
    finetuned: Sequence[Any],
    *,
    density: float | Sequence[float] = 0.2,
    scale: float = 1.0,
    scope: Scope = "global",
    sign_method: SignMethod = "sum",
    reduce: Literal["mean", "sum", "max"] = "mean",
    weights: Weights = None,
    heads: Heads = None,
    check_finite: bool = True,
    donate: bool = False,
) -> PyTree:
    """TIES-Merging (Yadav et al., 2023, Alg. 1): trim, elect sign, disjoint merge; theta = theta_0 + lambda tau_m.

    Trim keeps every |tau| >= the exact k-th largest magnitude, k = floor(density * n) (Sec. 3 step 1; the reference
    code keeps one entry more, see :mod:`mergejax.ops.trim`); election is Eq. 2 with the code's majority rule for
    zero sums; ``reduce="mean"`` is the disjoint mean of Eq. 3 (``"sum"``: AdaMerging/FusionBench's variant).
    Defaults follow the paper (k = 20%, lambda = 1, one threshold over the whole model). Memory (eager call, leaf by
    leaf): the output, 1.0 model above the inputs for either scope (measured, T = 4); traced inside a ``jit``, about
    2T float32 task vectors more.

    With ``weights`` (the paper has none) this follows mergekit: the sign is elected on the weighted trimmed vectors
    w_t tau_t and the disjoint mean is sum_t w_t tau_t [agree] / sum_t w_t [agree] (1 where nothing agrees). mergekit
    also trims per tensor (``scope="tensor"``) and sends zero sums to +1 where mergejax follows the TIES code.

    Args:
      base: pre-trained model.
      finetuned: T fine-tuned models or task vectors.
      density: kept fraction k (or one per task).
      scale: lambda.
      scope: "global" (TIES code: one threshold per task vector) or "tensor" (mergekit/PEFT).
      sign_method: "sum" (Eq. 2) or "count".
      reduce: "mean" (Eq. 3), "sum" or "max".
      weights: per-task weights (mergekit semantics, above).
      heads: leaves kept per task.
      check_finite: report NaN/Inf inputs by path.
      donate: the inputs are no longer needed: their buffers are freed as the merge consumes them (deleted
        afterwards; see :meth:`Merger.__call__`).

    Returns:
      The merged model, with the base's structure and dtypes.

    Example:
      >>> import jax.numpy as jnp, mergejax as mj
      >>> base = {"w": jnp.zeros(4)}
      >>> fts = [{"w": jnp.array([1.0, -2.0, 0.1, 3.0])}, {"w": jnp.array([1.0, 2.0, -0.1, -1.0])}]
      >>> mj.ties(base, fts, density=0.5)["w"].tolist()  # k=2 per task; coordinate 1: +2 vs -2 -> majority sign
      [1.0, 2.0, 0.0, 3.0]
    """
    return ties_chain(density=density, scope=scope, sign_method=sign_method, reduce=reduce)(
        base, finetuned, scale=scale, weights=weights, heads=heads, check_finite=check_finite, donate=donate)


def ties_chain(*, density: float | Sequence[float] = 0.2, scope: Scope = "global", sign_method: SignMethod = "sum",
               reduce: Literal["mean", "sum", "max"] = "mean") -> Merger:
    """The chain :func:`ties` runs: ``chain(Trim(density, scope), ElectSign(sign_method), Disjoint<reduce>())``."""
    return chain(Trim(density, scope), ElectSign(sign_method), _disjoint(reduce))


def dare(
    base: PyTree,
    finetuned: Sequence[Any],
    *,
    key: jax.Array,
    drop_rate: float = 0.9,
    rescale: Rescale = "inverse",
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    density: float | Sequence[float] = 0.2,
    scope: Scope = "global",
    scale: float = 1.0,
    weights: Weights = None,
    heads: Heads = None,
    check_finite: bool = True,
    donate: bool = False,
) -> PyTree:
    """DARE (Yu et al., 2024, Eq. 2) followed by task arithmetic or TIES (DARE-TIES, which still trims after dropping).

    Memory (eager call, leaf by leaf): the output, 1.0 model above the inputs, with either ``combine`` (measured, T = 4).

    Args:
      base: pre-trained model.
      finetuned: T fine-tuned models or task vectors.
      key: ``jax.random`` key of the drop masks.
      drop_rate: p, the dropped fraction (traced: a sweep over p does not recompile).
      rescale: "inverse" (1/(1-p), the paper), "l1" (per-tensor L1 norm kept, mergekit), or a float q (DAREx-q).
      combine: "task_arithmetic" or "ties".
      density: TIES trim density (``combine="ties"`` only).
      scope: TIES trim scope (``combine="ties"`` only).
      scale: lambda.
      weights: per-task weights, as in :func:`task_arithmetic` / :func:`ties`.
      heads: leaves kept per task.
      check_finite: report NaN/Inf inputs by path.
      donate: the inputs are no longer needed: their buffers are freed as the merge consumes them (deleted
        afterwards; see :meth:`Merger.__call__`).

    Returns:
      The merged model, with the base's structure and dtypes.
    """
    m = dare_chain(drop_rate=drop_rate, rescale=rescale, combine=combine, density=density, scope=scope)
    return m(base, finetuned, scale=scale, weights=weights, heads=heads, key=key, check_finite=check_finite,
             donate=donate)


def dare_chain(*, drop_rate: float = 0.9, rescale: Rescale = "inverse",
               combine: Literal["task_arithmetic", "ties"] = "task_arithmetic", density: float | Sequence[float] = 0.2,
               scope: Scope = "global") -> Merger:
    """The chain :func:`dare` runs: DARE drop, then a sum or TIES' trim, election and disjoint mean."""
    drop = DareDrop(drop_rate, rescale)
    if combine == "task_arithmetic":
        return chain(drop, Sum())
    if combine == "ties":
        return chain(drop, Trim(density, scope), ElectSign(), DisjointMean())
    raise ValueError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")


def breadcrumbs(
    base: PyTree,
    finetuned: Sequence[Any],
    *,
    beta: float = 0.15,
    gamma: float = 0.006,
    scale: float = 1.0,
    weights: Weights = None,
    heads: Heads = None,
    check_finite: bool = True,
    donate: bool = False,
) -> PyTree:
    """Model Breadcrumbs (Davari and Belilovsky, 2024): theta = theta_0 + lambda sum_t w_t mask_t * tau_t.

    The mask keeps, per row of each tensor's last axis, the band below the top ``gamma`` fraction and of width
    ``beta`` (see :mod:`mergejax.ops.breadcrumbs`). The paper's experiments use lambda = 0.2 as a seed. Memory (eager
    call, leaf by leaf): 1.5-2.5 models above the inputs (the output and one leaf position's per-row selection keys,
    T of them; measured, T = 4, largest leaf a quarter of the model).

    Args:
      base: pre-trained model.
      finetuned: T fine-tuned models or task vectors.
      beta: kept fraction per row.
      gamma: dropped top fraction per row.
      scale: lambda.
      weights: per-task weights w_t.
      heads: leaves kept per task.
      check_finite: report NaN/Inf inputs by path.
      donate: the inputs are no longer needed: their buffers are freed as the merge consumes them (deleted
        afterwards; see :meth:`Merger.__call__`).

    Returns:
      The merged model, with the base's structure and dtypes.
    """
    return breadcrumbs_chain(beta=beta, gamma=gamma)(base, finetuned, scale=scale, weights=weights, heads=heads,
                                                     check_finite=check_finite, donate=donate)


def breadcrumbs_chain(*, beta: float = 0.15, gamma: float = 0.006) -> Merger:
    """The chain :func:`breadcrumbs` runs: ``chain(BreadcrumbsMask(beta, gamma), Sum())``."""
    return chain(BreadcrumbsMask(beta, gamma), Sum())


def pcb(
    base: PyTree,
    finetuned: Sequence[Any],
    *,
    ratio: float = 0.05,
    scale: float = 1.2,
    weights: Weights = None,
    heads: Heads = None,
    check_finite: bool = True,
    donate: bool = False,
) -> PyTree:
    """PCB-Merging (Du et al., 2024, Eqs. 3-7): balanced per-parameter weights; theta = theta_0 + lambda tau_m.

    Memory (eager call, leaf by leaf): about 2.7 models above the inputs at T = 4 (the output, and at the largest leaf
    position the T balancing weights and clamped vectors XLA keeps; measured).

    Args:
      base: pre-trained model.
      finetuned: T fine-tuned models or task vectors.
      ratio: kept fraction of the balancing weights (reference: 0.05).
      scale: lambda (reference: 1.2).
      weights: per-task weights, applied to the task vectors before balancing (PCB has none of its own).
      heads: leaves kept per task.
      check_finite: report NaN/Inf inputs by path.
      donate: the inputs are no longer needed: their buffers are freed as the merge consumes them (deleted
        afterwards; see :meth:`Merger.__call__`).

    Returns:
      The merged model, with the base's structure and dtypes.
    """
    return chain(PCB(ratio))(base, finetuned, scale=scale, weights=weights, heads=heads, check_finite=check_finite,
                             donate=donate)
