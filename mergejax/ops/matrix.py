"""Matrix leaves for the SVD-based and matrix-product merges: which leaves are matrices, their PyTorch orientation,
and a batched map over them.

The SVD methods (TSV-M, Iso-C, Iso-CTS, CART) and WUDI act on the 2-D leaves of a task vector; every other float leaf
(biases, norms, scalars, N-D kernels) is averaged over tasks, as FusionBench does. When more than half of a model's
float parameters are not in matrices (a conv net: every kernel is 4-D), the merge warns once, naming how many leaves
and parameters are averaged (:func:`warn_non_matrix`).

N-D kernels as matrices (opt-in, ``matrix_axes=``). ``matrix_axes=k`` views every float leaf with more than two axes
as the matrix (prod(shape[:k]), prod(shape[k:])) (k < 0 counts from the end) and merges it as one; the result is
reshaped back. A Flax conv kernel (kh, kw, in, out) with ``matrix_axes=-1`` is the (kh*kw*in, out) matrix (a Flax
``kernel``, so transposed to (out, kh*kw*in) by the orientation rule below); a PyTorch conv weight (out, in, kh, kw)
with ``matrix_axes=1`` (and ``layout="torch"``) is (out, in*kh*kw). The two flattenings differ by a permutation of the
input columns, and every method here is equivariant under it (SVD factors permute with the columns, WUDI's
tau tau^T is invariant), so a Flax and a PyTorch copy of one conv net merge to the same weights. A mapping
``{path regex: k}`` (first match wins; leaves matching none stay averaged) gives per-leaf splits, e.g. a Flax
``DenseGeneral`` query kernel (embed, heads, head_dim) is ``{r"query|key|value": 1, r"out": -1}``.

Orientation. A Flax ``Dense`` kernel is stored (in, out), the transpose of PyTorch's ``nn.Linear.weight`` (out, in);
embeddings are (vocab, dim) in both. SVD-based methods that only use U S V^T products (TSV-M, Iso-C, CART) are
transpose-invariant; methods that project on one side (Iso-CTS projects on the left singular vectors, WUDI
multiplies tau tau^T) are not, so they run on the PyTorch orientation to match the published code:
with ``layout="flax"`` (default) every matrix leaf (2-D, or N-D viewed as a matrix) whose last path component is
``kernel`` is transposed, with ``layout="torch"`` (a tree converted from a PyTorch state dict) nothing is.
``transpose=`` (a path regex) overrides the rule: exactly the matrix leaves whose path matches are transposed.
``exclude=`` (a path regex, FusionBench's ``exclude_keys``) sends matching matrix leaves to the averaging branch.

Batching. Matrices of the same (oriented) shape and dtype are stacked and mapped over in one compiled op instead of
a Python loop over leaves: ``jax.vmap`` (one batched SVD per shape) on accelerators, ``jax.lax.map`` (a compiled loop
of unbatched SVDs) on CPU. The reason for the CPU exception: jaxlib 0.10's batched CPU ``gesdd`` kernel splits its
batch over XLA:CPU's intra-op thread pool and blocks until the pieces finish; when as many batched SVDs run
concurrently as the pool has threads (two shape groups on a 2-core host), every thread waits on work queued behind it
and the program deadlocks (seen in ``gdb``: all ``tf_XLAEigen`` threads in ``jax::ParallelBatchMap``). Unbatched
SVDs run inline and independent groups still run concurrently. ``MERGEJAX_MATRIX_BATCH=vmap|map`` overrides the choice.
CPU threads: jaxlib's SVD calls scipy's OpenBLAS, whose own threads compete with XLA's pool; on a loaded 2-core host
``OPENBLAS_NUM_THREADS=1`` (set before numpy/jax load) made a (768, 3072) SVD 10x faster.

Sharding. XLA's SVD is not partitioned: under ``jit`` a sharded matrix is all-gathered and its SVD computed
replicated on every device; the merged matrix is put back in the input's sharding
(:func:`jax.lax.with_sharding_constraint`), so the averaged leaves and the model outside the SVD stay sharded.
Peak extra memory per device: the stacked group of one shape (B matrices x T tasks, unsharded) plus its factors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from typing import Callable, Literal, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from mergejax.ops.base import Reduction, TaskVectors, per_leaf_weights
from mergejax.tree import PyTree, is_float, path_str

__all__ = [
    "Layout", "MatrixGroup", "transposes", "collect_matrices", "map_matrices", "batched", "batch_mode", "check_layout",
    "static", "place", "sharding_of", "resolve_path_rules", "MatrixAxes", "matrix_axes_rules", "matrix_view",
    "warn_non_matrix",
    "scale_task_vectors", "PreWeighted", "PreWeightedInputs",
]

Layout = Literal["flax", "torch"]
MatrixAxes = Union[None, int, Mapping[str, int], Sequence[tuple[str, int]]]
Rules = tuple[tuple[str, int], ...]  # the normalised matrix_axes: (path regex, k) pairs, first match wins


def static(default):
    """A stage field that stays static under ``jit`` (ranks, sizes, regexes, flags): ``mergejax.ops.base.static_field``
    where the core API provides it, a plain default otherwise."""
    from mergejax.ops import base

    sf = getattr(base, "static_field", None)
    return sf(default) if sf is not None else default


def check_layout(layout: str) -> None:
    """Raises ``ValueError`` unless ``layout`` is "flax" or "torch"."""
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}")


def matrix_axes_rules(spec: MatrixAxes) -> Rules:
    """``matrix_axes`` normalised to a hashable tuple of (path regex, k) pairs (idempotent).

    Args:
      spec: None (only 2-D leaves are matrices), an int k (every N-D leaf), or ``{path regex: k}`` / pairs.

    Returns:
      The rules: () for None, (("", k),) for an int.
    """
    if spec is None:
        return ()
    if isinstance(spec, int) and not isinstance(spec, bool):
        items = [("", spec)]
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (tuple, list)):
        items = [tuple(p) for p in spec]
    else:
        raise ValueError(f"matrix_axes must be None, an int or {{path regex: int}}, got {spec!r}")
    for pair in items:
        if len(pair) != 2 or not isinstance(pair[0], str) or isinstance(pair[1], bool) or not isinstance(pair[1], int)\
                or pair[1] == 0:
            raise ValueError(f"matrix_axes entries must be (path regex, nonzero int k), got {pair!r}")
        re.compile(pair[0])
    return tuple((str(r), int(k)) for r, k in items)


def matrix_view(path: str, shape: Sequence[int], rules: Rules) -> tuple[int, int] | None:
    """The (m, n) matrix a leaf is merged as, or None where it is averaged.

    A 2-D leaf is its own matrix; a leaf with more axes is (prod(shape[:k]), prod(shape[k:])) for the first rule whose
    regex matches ``path`` (none: averaged); 0-D and 1-D leaves are never matrices.

    Args:
      path: the leaf's path.
      shape: its shape.
      rules: from :func:`matrix_axes_rules`.

    Raises:
      ValueError: a rule's k does not split the leaf into two non-empty axis groups.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return shape
    if len(shape) < 3:
        return None
    for rx, k in rules:
        if re.search(rx, path):
            split = k if k > 0 else len(shape) + k
            if not 0 < split < len(shape):
                raise ValueError(f"matrix_axes={k} does not split the leaf {path or '<leaf>'} of shape {shape} "
                                 "into two axis groups")
            return math.prod(shape[:split]), math.prod(shape[split:])
    return None


def _caller_level() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside the mergejax package (the user's call)."""
    import sys

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(2), 2  # level 1 is warn_non_matrix itself
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn_non_matrix(tree: PyTree, *, method: str, matrix_axes: MatrixAxes = None, exclude: str | None = None,
                    stacklevel: int | None = None) -> None:
    """Warns once when more than half of the float parameters of ``tree`` are not merged as matrices (averaged).

    Args:
      tree: the base model (shapes and paths only are read; tracers are fine).
      method: the method's name, for the message.
      matrix_axes, exclude: the stage's matrix rules.
      stacklevel: passed to :func:`warnings.warn` (default: the first caller outside mergejax).
    """
    rules = matrix_axes_rules(matrix_axes)
    n_leaves = n_params = avg_leaves = avg_params = nd_leaves = 0
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not is_float(x):
            continue
        path, size = path_str(p), math.prod(jnp.shape(x))
        n_leaves, n_params = n_leaves + 1, n_params + size
        view = matrix_view(path, jnp.shape(x), rules)
        if view is None or (exclude is not None and re.search(exclude, path)):
            avg_leaves, avg_params = avg_leaves + 1, avg_params + size
            nd_leaves += jnp.ndim(x) > 2 and view is None
    if n_params == 0 or 2 * avg_params <= n_params:
        return
    hint = (f"; {nd_leaves} of them have more than two axes (e.g. conv kernels): matrix_axes=-1 merges a Flax "
            f"(..., in, out) kernel as a matrix, matrix_axes=1 a PyTorch (out, in, ...) one (the stage's or "
            f"mj.{method}_chain's matrix_axes=)" if nd_leaves else "")
    warnings.warn(f"{method}: {avg_leaves} of {n_leaves} float leaves ({avg_params} of {n_params} parameters, "
                  f"{100 * avg_params / n_params:.0f}%) are not matrices and are averaged over tasks{hint}",
                  UserWarning, stacklevel=_caller_level() if stacklevel is None else stacklevel)


def transposes(path: str, layout: Layout, transpose: str | None) -> bool:
    """True when the matrix leaf at ``path`` must be transposed to reach the PyTorch (out, in) orientation."""
    if transpose is not None:
        return re.search(transpose, path) is not None
    return layout == "flax" and path.rsplit("/", 1)[-1] == "kernel"


def resolve_path_rules(stage, path: str):
    """``stage`` with its path regexes decided for the one leaf at ``path`` (a stage's ``at_leaf``).

    ``transpose`` (with ``layout``) and ``exclude`` each become "" (matches every path) or "(?!)" (matches none), so
    the stage gives the same result on that leaf alone whatever its path there (the leaf-by-leaf schedule passes a
    bare leaf, path "").

    Args:
      stage: a frozen stage with ``layout`` and ``transpose`` fields (and optionally ``exclude``).
      path: the leaf's path in the model.

    Returns:
      The stage with the rules replaced.
    """
    flip = transposes(path, stage.layout, stage.transpose)
    changes = {"transpose": "" if flip else "(?!)"}
    if getattr(stage, "exclude", None) is not None:
        changes["exclude"] = "" if re.search(stage.exclude, path) else "(?!)"
    if getattr(stage, "matrix_axes", ()):
        hit = [k for rx, k in stage.matrix_axes if re.search(rx, path)]
        changes["matrix_axes"] = (("", hit[0]),) if hit else ()
    return dataclasses.replace(stage, **changes)


class MatrixGroup:
    """Same-shaped matrix leaves of T task vectors, stacked: ``stacks[t]`` is ``[B, m, n]`` (oriented, acc dtype);
    ``shapes[b]`` is leaf b's own shape (an N-D leaf viewed as a matrix is reshaped back to it)."""

    def __init__(self, positions: list[int], flip: bool, stacks: list[jax.Array], shardings: list,
                 shapes: list[tuple[int, ...]] | None = None):
        self.positions, self.flip, self.stacks, self.shardings = positions, flip, stacks, shardings
        self.shapes = shapes


def sharding_of(x: jax.Array):
    """The sharding of ``x`` (None where it has none, e.g. under an older JAX)."""
    try:
        return jax.typeof(x).sharding
    except Exception:  # pragma: no cover - older JAX / non-array leaves
        return None


def collect_matrices(
    tvs: Sequence[PyTree], *, layout: Layout, transpose: str | None, exclude: str | None, orient: bool,
    matrix_axes: MatrixAxes = None,
) -> tuple[list[MatrixGroup], list, list[list[jax.Array]], list[int], object]:
    """Splits the float leaf positions of ``tvs`` into matrix groups and the rest.

    Args:
      tvs: T task-vector trees with equal structure.
      layout, transpose: the orientation rule (see the module docstring).
      exclude: path regex of matrix leaves to treat as non-matrices (averaged).
      orient: False for transpose-invariant methods (no transposes are made).
      matrix_axes: which N-D leaves are viewed as matrices, and how (:func:`matrix_view`).

    Returns:
      ``(groups, leaves0, columns, other, treedef)``: the matrix groups, the first tree's leaves, per position the T
      leaves, the float positions that are not matrices, and the tree structure.
    """
    flat = [jax.tree_util.tree_flatten_with_path(t) for t in tvs]
    treedef = jax.tree_util.tree_structure(tvs[0])
    paths = [path_str(p) for p, _ in flat[0][0]]
    columns = [list(c) for c in zip(*[[leaf for _, leaf in f[0]] for f in flat])]
    rules = matrix_axes_rules(matrix_axes)
    buckets: dict[tuple, list[int]] = {}
    views: dict[int, tuple[int, int]] = {}
    other = []
    for i, (path, col) in enumerate(zip(paths, columns)):
        x = col[0]
        if not is_float(x):
            continue
        view = matrix_view(path, jnp.shape(x), rules)
        if view is not None and not (exclude is not None and re.search(exclude, path)):
            flip = orient and transposes(path, layout, transpose)
            views[i] = view
            shape = view[::-1] if flip else view
            buckets.setdefault((shape, jnp.result_type(x), flip), []).append(i)
        else:
            other.append(i)
    groups = []
    for (_, _, flip), pos in buckets.items():
        stacks = []
        for t in range(len(tvs)):
            mats = [jnp.reshape(columns[i][t], views[i]) for i in pos]
            mats = [m.T if flip else m for m in mats]
            stacks.append(mats[0][None] if len(mats) == 1 else jnp.stack(mats))
        groups.append(MatrixGroup(pos, flip, stacks, [sharding_of(columns[i][0]) for i in pos],
                                  [tuple(jnp.shape(columns[i][0])) for i in pos]))
    return groups, [c[0] for c in columns], columns, other, treedef


def place(x: jax.Array, sharding) -> jax.Array:
    """``x`` constrained to ``sharding`` (unchanged without one)."""
    if sharding is None or not hasattr(sharding, "spec"):
        return x
    try:
        return jax.lax.with_sharding_constraint(x, sharding)
    except Exception:  # pragma: no cover - abstract/unspecified shardings
        return x


def rebuild(
    groups: list[MatrixGroup],
    merged_stacks: list[jax.Array],
    leaves0: list,
    columns: list[list[jax.Array]],
    other: list[int],
    treedef,
    other_fn: Callable[[list[jax.Array]], jax.Array],
) -> PyTree:
    """The merged tree: matrix groups from ``merged_stacks`` (un-transposed, re-sharded), the rest by ``other_fn``."""
    out = list(leaves0)
    for g, stack in zip(groups, merged_stacks):
        for b, i in enumerate(g.positions):
            m = stack[b].T if g.flip else stack[b]
            if g.shapes is not None:
                m = jnp.reshape(m, g.shapes[b])
            out[i] = place(m, g.shardings[b])
    for i in other:
        out[i] = other_fn(columns[i])
    return jax.tree_util.tree_unflatten(treedef, out)


def mean_leaves(xs: Sequence[jax.Array]) -> jax.Array:
    """(1/T) sum_t x_t: what FusionBench does with every non-matrix leaf."""
    return sum(xs[1:], xs[0]) / len(xs)


def map_matrices(
    fn: Callable[[list[jax.Array]], jax.Array],
    tvs: Sequence[PyTree],
    *,
    layout: Layout = "flax",
    transpose: str | None = None,
    exclude: str | None = None,
    orient: bool = True,
    other_fn: Callable[[list[jax.Array]], jax.Array] = mean_leaves,
    matrix_axes: MatrixAxes = None,
) -> TaskVectors:
    """Reduces T task vectors to one: ``fn(xs)`` on each matrix position (xs = the T oriented (m, n) matrices,
    vmapped over same-shaped leaves), ``other_fn`` (default: the mean) on every other float leaf.

    Returns:
      A one-tuple with the merged tree (a reduction stage's output).
    """
    groups, leaves0, columns, other, treedef = collect_matrices(
        tvs, layout=layout, transpose=transpose, exclude=exclude, orient=orient, matrix_axes=matrix_axes
    )
    merged = [batched(fn, g.stacks) for g in groups]
    return (rebuild(groups, merged, leaves0, columns, other, treedef, other_fn),)


def batch_mode() -> str:
    """"vmap" or "map": how :func:`batched` maps over a shape group (``MERGEJAX_MATRIX_BATCH``, else "map" on the CPU
    backend and "vmap" elsewhere; see the module docstring for the CPU deadlock this avoids)."""
    mode = os.environ.get("MERGEJAX_MATRIX_BATCH") or ("map" if jax.default_backend() == "cpu" else "vmap")
    if mode not in ("vmap", "map"):
        raise ValueError(f"MERGEJAX_MATRIX_BATCH must be 'vmap' or 'map', got {mode!r}")
    return mode


def batched(fn: Callable[[list[jax.Array]], jax.Array], stacks: Sequence[jax.Array]) -> jax.Array:
    """``fn`` on every matrix of a shape group: ``stacks[t]`` is ``[B, m, n]``, the result ``[B, m', n']``.

    Args:
      fn: the per-matrix merge of the T task matrices.
      stacks: per task, its B stacked matrices.
    """
    if batch_mode() == "vmap" or stacks[0].shape[0] == 1:
        return jax.vmap(lambda *xs: fn(list(xs)))(*stacks)
    return jax.lax.map(lambda xs: fn(list(xs)), tuple(stacks))


def scale_task_vectors(tvs: Sequence[PyTree], weights) -> TaskVectors:
    """w_t * tau_t on every float leaf; ``weights`` is ``[T]`` or ``{path: [T]}`` (missing paths: weight 1)."""
    table = per_leaf_weights(weights, tvs[0], len(tvs))
    out = []
    for t, tv in enumerate(tvs):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tv)
        leaves = [x * table[path_str(p)][t].astype(x.dtype) if is_float(x) else x for p, x in flat]
        out.append(jax.tree_util.tree_unflatten(treedef, leaves))
    return tuple(out)


class PreWeighted(Reduction):
    """A reduction applied to w_t * tau_t (per-task weights of a merge, for reductions that override ``__call__``)."""

    inner: object
    weights: object

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return self.inner(scale_task_vectors(tvs, self.weights), key)


class PreWeightedInputs:
    """Mixin for reductions that override ``__call__``: per-task weights multiply each task vector first."""

    def with_weights(self, weights):
        return self if weights is None else PreWeighted(self, weights)
