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
    "checksums",
    "verify_checksums",
    "CheckpointError",
    "CHECKSUM_FILE",
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


CHECKSUM_FILE = "mergejax_checksums.json"
_CHECKSUM_FORMAT = "mergejax.checksums"


class CheckpointError(ValueError):
    """A dense checkpoint is missing, truncated, corrupted (checksum mismatch) or not a checkpoint at all."""


def _leaf_crc(x: Any) -> tuple[np.ndarray, int]:
    import zlib

    host = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    return host, zlib.crc32(host.view(np.uint8).reshape(-1) if host.size else b"") & 0xFFFFFFFF


def checksums(tree: PyTree) -> dict[str, dict[str, Any]]:
    """Per array leaf of ``tree``: its path -> ``{"shape", "dtype", "crc32"}`` (zlib CRC-32 of its C-order bytes)."""
    out = {}
    for path, leaf in paths_and_leaves(tree):
        if not hasattr(leaf, "dtype"):
            continue
        host, crc = _leaf_crc(leaf)
        out[path] = {"shape": list(host.shape), "dtype": host.dtype.name, "crc32": crc}
    return out


def save_tree(
    path: str | os.PathLike, tree: PyTree, *, force: bool = False, checksum: bool = True,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Saves a tree of arrays as an orbax ``StandardCheckpointer`` directory at ``path``, atomically.

    The tree is written to a hidden sibling and swapped in with renames (:mod:`mergejax.fsutil`), so an earlier
    checkpoint at ``path`` survives any failure; with ``checksum`` the directory also holds ``mergejax_checksums.json``
    (CRC-32 of every array), which :func:`load_tree` verifies.

    Args:
      path: the checkpoint directory.
      tree: a tree of arrays.
      force: replace an existing checkpoint at ``path`` (never a directory that is not a checkpoint).
      checksum: write the per-array checksums (one device-to-host copy and one CRC pass per array).
      extra: text files ``{name: contents}`` written into the directory before it is swapped in.

    Raises:
      mergejax.fsutil.OutputError: ``path`` exists (without ``force``) or is not a checkpoint.
    """
    import json

    import orbax.checkpoint as ocp

    from mergejax import fsutil

    if jax.process_count() > 1:
        raise ValueError("save_tree writes and swaps the directory from one process; in a multi-process job save "
                         "with orbax's CheckpointManager (or gather the tree to one process first)")
    out = fsutil.check_output(path, force=force, flag="checkpoint directory")
    with fsutil.atomic_dir(out) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp, tree)
            ckpt.wait_until_finished()
        if checksum:
            body = {"format": _CHECKSUM_FORMAT, "version": 1, "algorithm": "crc32", "leaves": checksums(tree)}
            (tmp / CHECKSUM_FILE).write_text(json.dumps(body, indent=1))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def verify_checksums(path: str | os.PathLike, tree: PyTree) -> None:
    """Checks ``tree`` (restored from ``path``) against the checkpoint's ``mergejax_checksums.json``, if it has one.

    Raises:
      CheckpointError: naming the first leaf whose bytes, shape or dtype differ, or the leaves missing on one side.
    """
    import json

    file = os.path.join(os.fspath(path), CHECKSUM_FILE)
    if not os.path.isfile(file):
        return
    try:
        want = json.loads(open(file).read())["leaves"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: unreadable checksum file ({_short(err)}); re-create the checkpoint") from None
    got = dict(paths_and_leaves(tree))
    if set(want) - set(got) or {p for p, x in got.items() if hasattr(x, "dtype")} - set(want):
        raise CheckpointError(
            f"{path}: restored leaves {sorted(set(got))[:5]} do not match the checksummed leaves {sorted(want)[:5]}"
        )
    for leaf_path, entry in want.items():
        host, crc = _leaf_crc(got[leaf_path])
        if host.dtype.name != entry["dtype"]:
            continue  # cast on restore (a ``like`` of another dtype, or float64 with x64 off): bytes cannot match
        if list(host.shape) != entry["shape"] or crc != entry["crc32"]:
            raise CheckpointError(
                f"{path}: leaf {leaf_path!r} {tuple(host.shape)} {host.dtype} fails its checksum (corrupted data); "
                "re-create the checkpoint, or pass verify=False / --no-verify to load it anyway"
            )


def load_tree(path: str | os.PathLike, like: PyTree | None = None, *, verify: bool = True) -> PyTree:
    """Restores a tree saved by :func:`save_tree` (or any orbax ``StandardCheckpointer`` directory).

    Args:
      path: the checkpoint directory (an orphaned ``.NAME.old-*`` sibling left by a killed save is put back first).
      like: arrays or ``ShapeDtypeStruct``s fixing structure, dtypes and sharding.
      verify: check the per-array checksums when the directory has them.

    Raises:
      CheckpointError: missing, truncated or corrupted checkpoint (one line, naming the directory or leaf).
    """
    import orbax.checkpoint as ocp

    from mergejax import fsutil

    path = os.path.abspath(path)
    if not os.path.exists(path):
        fsutil.recover(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no checkpoint directory there")
    ckpt = ocp.StandardCheckpointer()
    try:
        if like is None:
            tree = ckpt.restore(path)
        else:
            abstract = jax.tree_util.tree_map(
                lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
                else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                like,
            )
            tree = ckpt.restore(path, abstract)
    except Exception as err:  # noqa: BLE001 - orbax/TensorStore errors are pages long; one line is enough
        # TensorStore reads of other leaves still in flight complete on orbax's closed event loop and print
        # "Event loop is closed" tracebacks from a background thread: let them finish into a sink
        import contextlib
        import io
        import time

        with contextlib.redirect_stderr(io.StringIO()):
            time.sleep(0.25)
        raise CheckpointError(
            f"{path}: cannot restore the checkpoint, it is truncated, corrupted or not an orbax checkpoint "
            f"({_short(err)})"
        ) from err
    ckpt.close()
    if verify:
        verify_checksums(path, tree)
    return tree
