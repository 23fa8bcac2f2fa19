"""The model contract of mergejax's data-informed methods: apply_fn, batches, head masks, tree I/O.

A model is ``apply_fn(params, batch, task) -> logits`` with logits of shape ``[batch, classes]`` (a flax ``Module.apply``
or an nnx model split into graph and state; ``task`` selects the task's head when heads are separate). A batch is a
dict (inputs and, where labels are needed, labels under ``"y"``, ``"label"`` or ``"labels"``) or a tuple
``(inputs, labels)``, every array leaf with the examples on the leading axis. Which leaves stay per task
(classification heads) is a regular expression over leaf paths or a boolean mask tree (:func:`head_flags`).

Shared by :mod:`mergejax.fisher`, :mod:`mergejax.regmean` and :mod:`mergejax.adamerging`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mergejax.tree import PyTree, head_flags, paths_and_leaves

__all__ = [
    "ApplyFn",
    "head_flags",
    "labels_of",
    "check_batch",
    "shape_signature",
    "save_tree",
    "load_tree",
]

ApplyFn = Callable[[PyTree, Any, int], jax.Array]
"""``apply_fn(params, batch, task) -> logits [examples, classes]``."""

_LABEL_KEYS = ("y", "label", "labels")


def labels_of(batch: Any) -> jax.Array:
    """The labels of a batch: ``batch["y"]``/``["label"]``/``["labels"]`` of a dict, ``batch[1]`` of a tuple.

    Raises:
        ValueError: when the batch carries no labels.
    """
    if isinstance(batch, Mapping):
        for name in _LABEL_KEYS:
            if name in batch:
                return batch[name]
        raise ValueError(f"batch has no labels: expected one of the keys {_LABEL_KEYS}, got {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError("batch has no labels: pass a dict with a 'y' key or a tuple (inputs, labels)")


def _shapes(batch: Any) -> str:
    """Human-readable ``path: shape dtype`` list of a batch's leaves, for error messages."""
    return ", ".join(f"{p}: {tuple(np.shape(x))} {np.asarray(x).dtype if not hasattr(x, 'dtype') else x.dtype}"
                     for p, x in paths_and_leaves(batch))


def check_batch(apply_fn: ApplyFn, params: PyTree, batch: Any, task: int, *, what: str = "batch") -> int:
    """Checks a batch against the model without running it, and returns its number of examples.

    Every array leaf must hold the examples on one common leading axis, and ``apply_fn`` must map it to logits of
    shape ``[examples, classes]`` (checked with ``jax.eval_shape``, so nothing is computed).

    Raises:
        ValueError: naming the batch, its leaf shapes and the model's complaint.
    """
    leaves = paths_and_leaves(batch)
    if not leaves:
        raise ValueError(f"{what} holds no arrays")
    sizes = {p: (np.shape(x)[0] if np.ndim(x) else None) for p, x in leaves}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"{what} leaves must share a leading examples axis; got {_shapes(batch)}")
    n = next(iter(sizes.values()))
    try:
        out = _output_shape(apply_fn, task, *shape_signature(params), *shape_signature(batch))
    except Exception as err:  # noqa: BLE001 - re-raised with the shapes that caused it
        raise ValueError(f"{what} ({_shapes(batch)}) does not fit the model for task {task}: {err}") from err
    if out is None or len(out) != 2 or out[0] != n:
        got = "not an array" if out is None else out
        raise ValueError(f"apply_fn must return logits [examples={n}, classes] for {what} of task {task}; got {got}")
    return n


def shape_signature(tree: PyTree) -> tuple[Any, tuple[tuple[tuple[int, ...], Any], ...]]:
    """A hashable ``(treedef, ((shape, dtype), ...))`` of a tree: the key under which traced functions are cached."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x))
                          for x in leaves)


@functools.lru_cache(maxsize=256)
def _output_shape(apply_fn: ApplyFn, task: int, p_def: Any, p_specs: tuple, b_def: Any, b_specs: tuple
                  ) -> tuple[int, ...] | None:
    """Shape of ``apply_fn``'s output for abstract params and batch (``jax.eval_shape``; cached: tracing costs ms)."""
    params = jax.tree_util.tree_unflatten(p_def, [jax.ShapeDtypeStruct(s, d) for s, d in p_specs])
    batch = jax.tree_util.tree_unflatten(b_def, [jax.ShapeDtypeStruct(s, d) for s, d in b_specs])
    out = jax.eval_shape(lambda p, b: apply_fn(p, b, task), params, batch)
    return tuple(out.shape) if hasattr(out, "shape") else None


def save_tree(path: str | os.PathLike, tree: PyTree) -> None:
    """Saves a tree of arrays to the new directory ``path`` with orbax (``StandardCheckpointer``); waits for it."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(path), tree)
        ckpt.wait_until_finished()


def load_tree(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Restores a tree saved by :func:`save_tree`; ``like`` (arrays or ``ShapeDtypeStruct``s) fixes structure/sharding."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        if like is None:
            return ckpt.restore(os.path.abspath(path))
        abstract = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                                                          sharding=getattr(x, "sharding", None)),
            like,
        )
        return ckpt.restore(os.path.abspath(path), abstract)
