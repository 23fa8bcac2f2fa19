"""Shared plumbing of the merge primitives: the ``Stage`` protocol and maps over the float leaves of T trees.

A *stage* is a frozen dataclass (hashable, so its hyperparameters are static under ``jax.jit``) that maps a tuple of
T task-vector trees to a tuple of trees: per-task transforms keep T, a *reduction* returns a tuple of one tree.
Stages only touch float leaves; non-float leaves pass through untouched.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, ClassVar, Protocol, Sequence

import jax
import jax.numpy as jnp

from mergejax.tree import PyTree, is_float

__all__ = [
    "Stage",
    "TaskVectors",
    "map_float_leaves",
    "rank_from_fraction",
    "check_fraction",
    "leaf_keys",
    "Transform",
    "Reduction",
]

TaskVectors = tuple[PyTree, ...]


class Stage(Protocol):
    """One step of a merge chain: ``stage(task_vectors, key) -> task_vectors``."""

    reduces: ClassVar[bool]
    needs_key: ClassVar[bool]

    def __call__(self, tvs: TaskVectors, key: jax.Array | None) -> TaskVectors: ...


def map_float_leaves(
    fn: Callable[[list[jax.Array], int], list[jax.Array]], tvs: Sequence[PyTree], *, out_count: int | None = None
) -> TaskVectors:
    """Applies ``fn(leaves_of_all_tasks, leaf_index)`` to every float leaf position of the T trees ``tvs``.

    ``fn`` returns ``out_count`` leaves (default T). Non-float positions keep the first tree's leaf.
    """
    flat = [jax.tree_util.tree_flatten(t) for t in tvs]
    treedef = flat[0][1]
    columns = list(zip(*[leaves for leaves, _ in flat]))
    n_out = len(tvs) if out_count is None else out_count
    outs: list[list[Any]] = [[] for _ in range(n_out)]
    for i, col in enumerate(columns):
        res = fn(list(col), i) if is_float(col[0]) else [col[0]] * n_out
        for j in range(n_out):
            outs[j].append(res[j])
    return tuple(jax.tree_util.tree_unflatten(treedef, o) for o in outs)


def check_fraction(name: str, value: float, *, upper_open: bool = False) -> None:
    """Raises ``ValueError`` unless ``0 <= value <= 1`` (``< 1`` when ``upper_open``)."""
    ok = 0.0 <= float(value) < 1.0 if upper_open else 0.0 <= float(value) <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value!r}")


def rank_from_fraction(fraction: float, n: int) -> int:
    """k = floor(fraction * n), computed exactly on the decimal the user wrote (0.29 * 100 -> 29, not 28)."""
    return int(Fraction(float(fraction)).limit_denominator(10**9) * n)


def leaf_keys(key: jax.Array, task: int, leaf: int) -> jax.Array:
    """The PRNG key of one (task, leaf) pair: independent streams, stable under adding other leaves or tasks."""
    return jax.random.fold_in(jax.random.fold_in(key, task), leaf)



class Transform:
    """Base of per-task (T -> T) stages; subclasses are frozen dataclasses implementing ``__call__``."""

    reduces: ClassVar[bool] = False
    needs_key: ClassVar[bool] = False


class Reduction:
    """Base of reductions (T -> 1): subclasses implement ``combine(leaves_of_all_tasks) -> leaf``."""

    reduces: ClassVar[bool] = True
    needs_key: ClassVar[bool] = False

    def combine(self, xs: list[jax.Array]) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return map_float_leaves(lambda xs, i: [self.combine(xs)], tvs, out_count=1)
