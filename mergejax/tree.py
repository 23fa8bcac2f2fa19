"""Pytree plumbing: leaf paths, validation with readable errors, task vectors and the dtype policy.

Every merge operator in mergejax works on *float* leaves only. Integer and boolean leaves (step counters, buffers,
token ids) carry no task information: task vectors hold zeros there, operators ignore them, and merged models take
them unchanged from the base. Arithmetic happens in ``acc_dtype(leaf.dtype)`` (float32 for bf16/f16/f32, float64
stays float64) and results are cast back to the base's dtypes at the very end.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "PyTree",
    "path_str",
    "paths_and_leaves",
    "is_float",
    "acc_dtype",
    "float_leaves",
    "validate_like",
    "check_finite",
    "check_finite_many",
    "task_vector",
    "apply_task_vector",
]


def path_str(keypath: Sequence[Any]) -> str:
    """Renders a ``jax.tree_util`` key path as ``"params/Dense_0/kernel"`` (list/tuple indices as numbers)."""
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # pragma: no cover - future key types
            parts.append(str(key))
    return "/".join(parts) if parts else "<root>"


def paths_and_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """Returns ``[(path, leaf), ...]`` in ``jax.tree_util`` flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def _dtype_of(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def is_float(x: Any) -> bool:
    """True for leaves with a floating dtype (float16/bfloat16/float32/float64)."""
    return bool(jnp.issubdtype(_dtype_of(x), jnp.floating))


def acc_dtype(dtype: Any) -> np.dtype:
    """The accumulation dtype for a float leaf: float32 for 16/32-bit floats, float64 stays float64."""
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def float_leaves(tree: PyTree) -> list[Any]:
    """The float leaves of ``tree``, in flattening order."""
    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if is_float(leaf)]


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def validate_like(
    base: PyTree, trees: Sequence[PyTree], *, what: str = "finetuned", first_index: int = 0
) -> None:
    """Checks that every tree in ``trees`` has ``base``'s structure, shapes and dtypes.

    Models are named ``what[first_index + i]``.

    Raises:
      ValueError: naming the model (``what[i]``), the leaf path, both shapes and both dtypes.
    """
    base_paths = paths_and_leaves(base)
    base_def = jax.tree_util.tree_structure(base)
    for i, tree in enumerate(trees, start=first_index):
        if jax.tree_util.tree_structure(tree) != base_def:
            other = dict(paths_and_leaves(tree))
            mine = dict(base_paths)
            missing = sorted(set(mine) - set(other))
            extra = sorted(set(other) - set(mine))
            raise ValueError(
                f"{what}[{i}] does not have the base's tree structure: "
                f"missing leaves {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected leaves {extra[:5]}{'...' if len(extra) > 5 else ''} "
                f"(base: {len(mine)} leaves, {what}[{i}]: {len(other)} leaves)"
            )
        for (path, b), (_, x) in zip(base_paths, paths_and_leaves(tree)):
            if _shape_of(b) != _shape_of(x) or _dtype_of(b) != _dtype_of(x):
                raise ValueError(
                    f"{what}[{i}] leaf '{path}' has shape {_shape_of(x)} dtype {_dtype_of(x)}, "
                    f"but the base has shape {_shape_of(b)} dtype {_dtype_of(b)}"
                )


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite(tree: PyTree, *, what: str = "model") -> None:
    """Raises ``ValueError`` naming every float leaf of ``tree`` that holds a NaN or an Inf.

    One fused pass over the float leaves; only one boolean per leaf leaves the devices.
    """
    check_finite_many([tree], what=[what])


def check_finite_many(trees: Sequence[PyTree], *, what: Sequence[str]) -> None:
    """:func:`check_finite` for several trees in one compiled program and one device-to-host fetch."""
    items = [(name, p, x) for tree, name in zip(trees, what) for p, x in paths_and_leaves(tree) if is_float(x)]
    if not items:
        return
    flags = jax.device_get(_finite_flags([x for _, _, x in items]))
    bad = [(name, p) for (name, p, _), ok in zip(items, flags) if not ok]
    if bad:
        name, path = bad[0]
        more = [f"{n}:{p}" for n, p in bad[1:4]]
        raise ValueError(
            f"{name} has NaN or Inf in leaf {path!r}"
            + (f" (and {len(bad) - 1} more: {more})" if len(bad) > 1 else "")
            + "; pass check_finite=False to skip this check"
        )


def _leaf_task_vector(ft: jax.Array, b: jax.Array) -> jax.Array:
    if not is_float(b):
        return jnp.zeros_like(b)
    dt = acc_dtype(b.dtype)
    return jnp.asarray(ft, dt) - jnp.asarray(b, dt)


def _leaf_apply(b: jax.Array, tv: jax.Array, scale: jax.Array) -> jax.Array:
    if not is_float(b):
        return b
    dt = acc_dtype(b.dtype)
    return (jnp.asarray(b, dt) + jnp.asarray(scale, dt) * jnp.asarray(tv, dt)).astype(b.dtype)


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """Task vector tau = theta_ft - theta_0, leaf by leaf (Ilharco et al., 2023, Eq. 1).

    Float leaves become ``acc_dtype`` differences (bf16 in, float32 out: nothing is rounded); non-float leaves become
    zeros of their own dtype, which every operator ignores.

    Args:
      finetuned: a fine-tuned parameter tree.
      base: the pre-trained parameter tree it was fine-tuned from (same structure, shapes and dtypes).

    Returns:
      A tree with the structure of ``base``.

    Example:
      >>> import jax.numpy as jnp
      >>> tv = task_vector({"w": jnp.array([1.5], jnp.bfloat16), "step": 7}, {"w": jnp.array([1.0], jnp.bfloat16), "step": 3})
      >>> tv["w"].dtype.name, tv["w"].tolist(), int(tv["step"])
      ('float32', [0.5], 0)
    """
    validate_like(base, [finetuned])
    return jax.tree_util.tree_map(_leaf_task_vector, finetuned, base)


def apply_task_vector(base: PyTree, tv: PyTree, scale: float | jax.Array = 1.0) -> PyTree:
    """theta = theta_0 + scale * tau, computed in float32 and cast to the base's dtypes (bf16 in, bf16 out).

    Non-float leaves are taken from ``base`` unchanged.
    """
    if jax.tree_util.tree_structure(tv) != jax.tree_util.tree_structure(base):
        raise ValueError("task vector does not have the base's tree structure")
    for (path, b), (_, t) in zip(paths_and_leaves(base), paths_and_leaves(tv)):
        if is_float(b) and _shape_of(b) != _shape_of(t):
            raise ValueError(
                f"task vector leaf '{path}' has shape {_shape_of(t)} dtype {_dtype_of(t)}, "
                f"but the base has shape {_shape_of(b)} dtype {_dtype_of(b)}"
            )
    return jax.tree_util.tree_map(lambda b, t: _leaf_apply(b, t, scale), base, tv)
