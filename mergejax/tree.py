"""Pytree plumbing: leaf paths, validation with readable errors, task vectors and the dtype policy.

Every merge operator in mergejax works on *float* leaves only. Integer and boolean leaves (step counters, buffers,
token ids) carry no task information: task vectors hold zeros there, operators ignore them, and merged models take
them unchanged from the base. Arithmetic happens in ``acc_dtype(leaf.dtype)`` (float32 for bf16/f16/f32, float64
stays float64) and results are cast back to the base's dtypes at the very end.
"""

from __future__ import annotations

from typing import Any, Sequence

import re

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
    "is_traced",
    "head_flags",
    "leaf_spec",
    "stack_by_shape",
    "finite_flags",
    "unpack_flags",
    "TaskVector",
    "as_tree",
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


def _node_kind(node: Any) -> str:
    return type(node).__name__


def structure_difference(a: PyTree, b: PyTree, path: str = "") -> str | None:
    """Where two trees' containers first differ, e.g. ``"at 'params': FrozenDict vs dict"``; None if they do not.

    Compares node types, dict keys and sequence lengths top-down (what ``missing/unexpected leaves`` cannot show:
    a tuple where a list was, a ``FrozenDict`` where a ``dict`` was).
    """
    where = repr(path) if path else "the root"
    a_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(a))
    b_leaf = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(b))
    if a_leaf or b_leaf:
        if a_leaf != b_leaf:
            return f"at {where}: a leaf vs a {_node_kind(b if a_leaf else a)}"
        return None
    if type(a) is not type(b):
        return f"at {where}: {_node_kind(a)} vs {_node_kind(b)}"
    a_children, b_children = jax.tree_util.tree_flatten_with_path(a, is_leaf=lambda x: x is not a)[0], \
        jax.tree_util.tree_flatten_with_path(b, is_leaf=lambda x: x is not b)[0]
    a_keys, b_keys = [path_str(k) for k, _ in a_children], [path_str(k) for k, _ in b_children]
    if a_keys != b_keys:
        return f"at {where}: children {a_keys[:6]} vs {b_keys[:6]}"
    for (k, x), (_, y) in zip(a_children, b_children):
        sub = structure_difference(x, y, f"{path}/{path_str(k)}" if path else path_str(k))
        if sub:
            return sub
    return None


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
        if isinstance(tree, str):
            raise ValueError(
                f"{what}[{i}] is the string {tree!r}, not a parameter tree: pass a list of models (a dict of models "
                "iterates over its keys), e.g. list(models.values())"
            )
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
                + (f"; containers differ {diff} (base vs {what}[{i}])"
                   if (diff := structure_difference(base, tree)) else "")
            )
        for (path, b), (_, x) in zip(base_paths, paths_and_leaves(tree)):
            if _shape_of(b) != _shape_of(x) or _dtype_of(b) != _dtype_of(x):
                raise ValueError(
                    f"{what}[{i}] leaf '{path}' has shape {_shape_of(x)} dtype {_dtype_of(x)}, "
                    f"but the base has shape {_shape_of(b)} dtype {_dtype_of(b)}"
                )


def _sharding_key(x: Any) -> Any:
    """The partition spec of ``x`` when JAX knows it at trace time (Explicit meshes, committed arrays), else None."""
    try:
        spec = getattr(jax.typeof(x).sharding, "spec", None)
    except Exception:  # noqa: BLE001 - Python scalars
        return None
    return None if spec is None else str(spec)


def leaf_spec(x: Any) -> tuple:
    """What leaves batched together must share: shape, dtype and (when known) the partition spec."""
    return _shape_of(x), str(_dtype_of(x)), _sharding_key(x)


def stack_by_shape(leaves: Sequence[Any]) -> list[tuple[list[int], jax.Array]]:
    """Groups arrays by :func:`leaf_spec` and stacks each group on a new leading axis: ``[(indices, stacked)]``.

    For reductions over many leaves (counts, norms, finiteness flags), traced once per leaf shape instead of once per
    leaf, so programs stay small for models with hundreds of leaves.
    """
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(leaf_spec(x), []).append(i)
    out = []
    for idx in groups.values():
        xs = [jnp.asarray(leaves[i]) for i in idx]
        out.append((idx, xs[0][None] if len(xs) == 1 else jnp.stack(xs)))
    return out


def finite_flags(leaves: Sequence[Any]) -> list[tuple[list[int], jax.Array]]:
    """Per group of same-shaped leaves, ``(indices, flags)``: flags[m] is True when leaf ``indices[m]`` is all finite.

    One batched reduction (and one small output) per leaf shape; :func:`unpack_flags` turns it into one bool per leaf.
    """
    out = []
    for idx, stacked in stack_by_shape(leaves):
        out.append((idx, jnp.all(jnp.isfinite(stacked), axis=tuple(range(1, stacked.ndim)))))  # no reshape: shardings
    return out


def unpack_flags(groups: Sequence[tuple[list[int], Any]], n: int) -> list[bool]:
    """One bool per leaf from :func:`finite_flags`' groups (after ``jax.device_get``)."""
    out = [True] * n
    for idx, flags in groups:
        for i, ok in zip(idx, np.asarray(flags)):
            out[i] = bool(ok)
    return out


_finite_flags = jax.jit(finite_flags)


def raise_nonfinite(names: Sequence[str], flags: Sequence[Any]) -> None:
    """Raises ``ValueError`` naming the first (and a few more) ``names`` whose flag is False."""
    bad = [n for n, ok in zip(names, flags) if not bool(ok)]
    if bad:
        more = bad[1:4]
        raise ValueError(
            f"{bad[0].split(':', 1)[0]} has NaN or Inf in leaf {bad[0].split(':', 1)[1]!r}"
            + (f" (and {len(bad) - 1} more: {more})" if len(bad) > 1 else "")
            + "; pass check_finite=False to skip this check"
        )


def check_finite(tree: PyTree, *, what: str = "model") -> None:
    """Raises ``ValueError`` naming every float leaf of ``tree`` that holds a NaN or an Inf.

    One fused pass over the float leaves; only one boolean per leaf leaves the devices. Skipped under tracing (inside
    a user's ``jit``/``vmap``/``grad`` the values are not known; use ``jax.experimental.checkify`` there).
    """
    check_finite_many([tree], what=[what])


def check_finite_many(trees: Sequence[PyTree], *, what: Sequence[str]) -> None:
    """:func:`check_finite` for several trees in one compiled program and one device-to-host fetch."""
    items = [(name, p, x) for tree, name in zip(trees, what) for p, x in paths_and_leaves(as_tree(tree)) if is_float(x)]
    if not items or is_traced([x for _, _, x in items]):
        return
    groups = _finite_flags([x for _, _, x in items])
    if is_traced(groups):  # inside the caller's jit/vmap/grad (concrete inputs closed over): values unknown
        return
    flags = unpack_flags(jax.device_get(groups), len(items))
    raise_nonfinite([f"{name}:{p}" for name, p, _ in items], flags)


def is_traced(*xs: Any) -> bool:
    """True when any leaf of ``xs`` is a JAX tracer (we are inside someone's ``jit``, ``vmap`` or ``grad``)."""
    return any(isinstance(leaf, jax.core.Tracer) for x in xs for leaf in jax.tree_util.tree_leaves(x))


@jax.tree_util.register_pytree_with_keys_class
class TaskVector:
    """A task vector tau = theta_ft - theta_0, typed so that it is never mistaken for a model.

    A pytree whose single child is the plain tree ``.tree`` (float leaves in the accumulation dtype, non-float leaves
    zero). Every merge method accepts a ``TaskVector`` wherever it accepts a fine-tuned model. Indexing delegates to
    the tree (``tv["params"]``); ``+``, ``-`` and scalar ``*`` act leaf by leaf.
    """

    __slots__ = ("tree",)

    def __init__(self, tree: PyTree):
        if isinstance(tree, TaskVector):
            tree = tree.tree
        self.tree = tree

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("tree"), self.tree),), None

    @classmethod
    def tree_unflatten(cls, aux: Any, children: Sequence[Any]) -> "TaskVector":
        obj = object.__new__(cls)
        obj.tree = children[0]
        return obj

    def __getitem__(self, key: Any) -> Any:
        return self.tree[key]

    def __repr__(self) -> str:
        n = sum(int(np.size(x)) for x in float_leaves(self.tree))
        return f"TaskVector({len(jax.tree_util.tree_leaves(self.tree))} leaves, {n} float entries)"

    def _zip(self, other: Any, op: Any) -> "TaskVector":
        other = as_tree(other)
        return TaskVector(jax.tree_util.tree_map(lambda a, b: op(a, b) if is_float(a) else a, self.tree, other))

    def __add__(self, other: Any) -> "TaskVector":
        return self._zip(other, jnp.add)

    def __sub__(self, other: Any) -> "TaskVector":
        return self._zip(other, jnp.subtract)

    def __mul__(self, c: Any) -> "TaskVector":
        return TaskVector(jax.tree_util.tree_map(lambda a: a * c if is_float(a) else a, self.tree))

    __rmul__ = __mul__

    def __neg__(self) -> "TaskVector":
        return self * -1.0


def as_tree(x: Any) -> PyTree:
    """The plain tree of a :class:`TaskVector` (anything else is returned unchanged)."""
    return x.tree if isinstance(x, TaskVector) else x


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
      A :class:`TaskVector` wrapping a tree with the structure of ``base`` (``.tree``).

    Example:
      >>> import jax.numpy as jnp
      >>> tv = task_vector({"w": jnp.array([1.5], jnp.bfloat16), "step": 7}, {"w": jnp.array([1.0], jnp.bfloat16), "step": 3})
      >>> tv["w"].dtype.name, tv["w"].tolist(), int(tv["step"])
      ('float32', [0.5], 0)
    """
    if isinstance(finetuned, TaskVector) or isinstance(base, TaskVector):
        raise TypeError("task_vector(finetuned, base) takes two models; got a TaskVector (it already is one)")
    validate_like(base, [finetuned])
    return TaskVector(jax.tree_util.tree_map(_leaf_task_vector, finetuned, base))


def apply_task_vector(base: PyTree, tv: PyTree, scale: float | jax.Array = 1.0) -> PyTree:
    """theta = theta_0 + scale * tau, computed in float32 and cast to the base's dtypes (bf16 in, bf16 out).

    Non-float leaves are taken from ``base`` unchanged. ``tv`` may be a :class:`TaskVector` or a plain tree.
    """
    tv = as_tree(tv)
    if jax.tree_util.tree_structure(tv) != jax.tree_util.tree_structure(base):
        raise ValueError("task vector does not have the base's tree structure")
    for (path, b), (_, t) in zip(paths_and_leaves(base), paths_and_leaves(tv)):
        if is_float(b) and _shape_of(b) != _shape_of(t):
            raise ValueError(
                f"task vector leaf '{path}' has shape {_shape_of(t)} dtype {_dtype_of(t)}, "
                f"but the base has shape {_shape_of(b)} dtype {_dtype_of(b)}"
            )
    return jax.tree_util.tree_map(lambda b, t: _leaf_apply(b, t, scale), base, tv)


def head_flags(tree: PyTree, heads: str | PyTree | None) -> list[bool]:
    """Which leaves of ``tree`` stay per task (classification heads), in flattening order.

    Args:
        tree: a parameter tree.
        heads: None (every leaf is merged), a regular expression searched in each leaf's ``path_str`` path, or a tree
            of booleans with ``tree``'s structure (True = per task).

    Returns:
        One bool per leaf of ``tree``.

    Raises:
        ValueError: if the pattern or the mask names no leaf, or the mask's structure differs from ``tree``'s.
    """
    items = paths_and_leaves(tree)
    if heads is None:
        return [False] * len(items)
    if isinstance(heads, str):
        pattern = re.compile(heads)
        flags = [bool(pattern.search(path)) for path, _ in items]
        if not any(flags):
            sample = [p for p, _ in items[:6]]
            raise ValueError(f"heads pattern {heads!r} matches no leaf path; paths look like {sample}")
        return flags
    if jax.tree_util.tree_structure(heads) != jax.tree_util.tree_structure(tree):
        raise ValueError(
            "heads mask must have the parameter tree's structure: "
            f"{jax.tree_util.tree_structure(heads)} vs {jax.tree_util.tree_structure(tree)}"
        )
    flags = [bool(np.asarray(m)) for m in jax.tree_util.tree_leaves(heads)]
    if not any(flags):
        raise ValueError("heads mask names no leaf (all False); pass heads=None when every leaf is merged")
    return flags
