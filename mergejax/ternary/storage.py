"""Orbax storage of ternary task vectors: an orbax ``CheckpointHandler`` plus atomic ``save``/``load`` helpers.

A checkpoint item is a directory with two files:

``streams.bin``  the entropy-coded leaves (:mod:`mergejax.ternary.codec`), one blob per float leaf, back to back.
``ternary.json`` metadata: format name and version, codec version, density, alpha, scope, scale rule, the tree
                 structure, and per leaf its path, shape, dtype, scale, nnz, byte offset, length and the CRC-32 of its
                 blob; the metadata carries a CRC-32 of itself.

Because the handler follows orbax's handler/args API (:class:`TernarySave` / :class:`TernaryRestore`), a ternary
vector can be one item of a composite checkpoint (``ocp.args.Composite(base=StandardSave(...),
expert=TernarySave(ttv))``) and a ``CheckpointManager`` can keep several; orbax then provides the atomic commit.
:func:`save` does the same for a bare directory: it writes a temporary sibling and swaps it in with renames, so a
save that fails part-way leaves the earlier checkpoint at that path intact.

Every blob's length and CRC are checked before decoding, and the decoder checks its own framing: a truncated or
corrupted file raises :class:`TernaryCheckpointError` naming the leaf, never returns wrong weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mergejax.ternary import codec
from mergejax.ternary.device import LeafInfo, TernarySpec, TernaryTaskVector, bitmap_sharding

__all__ = [
    "TernaryCheckpointError",
    "TernaryCheckpointHandler",
    "TernarySave",
    "TernaryRestore",
    "save",
    "load",
    "read_metadata",
    "TernarySource",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "mergejax.ternary"
FORMAT_VERSION = codec.FORMAT_VERSION
STREAMS_FILE = "streams.bin"
METADATA_FILE = "ternary.json"


class TernaryCheckpointError(ValueError):
    """A ternary checkpoint is missing, truncated, corrupted or of an unsupported version."""


# ------------------------------------------------------------------------------------------------- tree structure
def _structure_to_json(treedef: Any) -> Any:
    """JSON skeleton of a tree of dicts (str keys), lists, tuples and None; leaves become their flat index."""
    skeleton = jax.tree_util.tree_unflatten(treedef, list(range(treedef.num_leaves)))

    def walk(node: Any) -> Any:
        if isinstance(node, int):
            return {"leaf": node}
        if node is None:
            return {"none": True}
        if type(node) is dict:
            if not all(isinstance(k, str) for k in node):
                raise TypeError("dict keys must be str")
            return {"dict": {k: walk(v) for k, v in node.items()}}
        if type(node) in (list, tuple):
            return {type(node).__name__: [walk(v) for v in node]}
        raise TypeError(f"node type {type(node).__name__}")

    try:
        return walk(skeleton)
    except TypeError:
        return None  # restore then needs ``like=``


def _structure_from_json(obj: Any) -> Any:
    def build(node: dict) -> Any:
        if "leaf" in node:
            return node["leaf"]
        if "none" in node:
            return None
        if "dict" in node:
            return {k: build(v) for k, v in node["dict"].items()}
        if "list" in node:
            return [build(v) for v in node["list"]]
        return tuple(build(v) for v in node["tuple"])

    return jax.tree_util.tree_structure(build(obj))


# ------------------------------------------------------------------------------------------------------- metadata
def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _metadata_crc(meta: dict) -> int:
    body = {k: v for k, v in meta.items() if k != "metadata_crc32"}
    return _crc(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def read_metadata(directory: epath.PathLike) -> dict:
    """Reads and checks ``ternary.json`` of a checkpoint item."""
    path = epath.Path(directory) / METADATA_FILE
    if not path.exists():
        raise TernaryCheckpointError(f"{path} not found: not a mergejax ternary checkpoint (or an unfinished save)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TernaryCheckpointError(f"{path}: metadata is not valid JSON (truncated or corrupted): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TernaryCheckpointError(f"{path}: not a {FORMAT_NAME} metadata file")
    if meta.get("metadata_crc32") != _metadata_crc(meta):
        raise TernaryCheckpointError(f"{path}: metadata checksum mismatch (corrupted)")
    if meta.get("version") != FORMAT_VERSION:
        raise TernaryCheckpointError(
            f"{path}: format version {meta.get('version')} is not supported (this build reads {FORMAT_VERSION})"
        )
    return meta


# -------------------------------------------------------------------------------------------------------- handler
def _decode_blob(blob: bytes | memoryview, entry: dict, info: LeafInfo, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The (mask, sign) bitmaps of one leaf's blob, after checking its CRC-32 (errors name ``where``)."""
    if _crc(blob) != entry["crc32"]:
        raise TernaryCheckpointError(f"{where}: checksum mismatch (corrupted data)")
    try:
        return codec.decode_leaf(blob, info.shape)
    except codec.CodecError as e:
        raise TernaryCheckpointError(f"{where}: {e}") from None


class TernaryCheckpointHandler(ocp.CheckpointHandler):
    """Orbax handler for :class:`~mergejax.ternary.TernaryTaskVector` (use with :class:`TernarySave` /
    :class:`TernaryRestore`). Saving gathers each leaf's bitmaps to the host and entropy-codes them one leaf at a
    time (peak host memory: about one leaf's bitmaps, 2 bits per parameter, plus its unpacked bits)."""

    def save(self, directory: epath.Path, args: "TernarySave") -> None:
        ttv = args.item
        if not isinstance(ttv, TernaryTaskVector):
            raise TypeError(f"TernarySave expects a TernaryTaskVector, got {type(ttv).__name__}")
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = ttv.spec
        leaves, offset, j = [], 0, 0
        with open(os.fspath(directory / STREAMS_FILE), "wb") as f:
            for info in spec.leaves:
                entry = {"path": info.path, "shape": list(info.shape), "dtype": info.dtype, "coded": info.coded}
                if info.coded:
                    mask = np.asarray(jax.device_get(ttv.mask[j]))
                    sign = np.asarray(jax.device_get(ttv.sign[j]))
                    blob = codec.encode_leaf(mask, sign, info.shape)
                    f.write(blob)
                    entry.update(
                        offset=offset,
                        length=len(blob),
                        crc32=_crc(blob),
                        nnz=codec.read_header(blob).nnz,
                        scale=float(np.asarray(jax.device_get(ttv.scale[j]), np.float32)),
                    )
                    offset += len(blob)
                    j += 1
                leaves.append(entry)
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "codec_version": codec.CODEC_VERSION,
            "density": spec.density,
            "alpha": spec.alpha,
            "scope": spec.scope,
            "scale_rule": spec.scale_rule,
            "structure": _structure_to_json(spec.treedef),
            "streams_bytes": offset,
            "leaves": leaves,
        }
        meta["metadata_crc32"] = _metadata_crc(meta)
        (directory / METADATA_FILE).write_text(json.dumps(meta, indent=1))

    def restore(self, directory: epath.Path, args: "TernaryRestore | None" = None) -> TernaryTaskVector:
        args = args or TernaryRestore()
        directory = epath.Path(directory)
        meta = read_metadata(directory)
        if args.like is not None:
            treedef = jax.tree_util.tree_structure(args.like)
        elif meta["structure"] is not None:
            treedef = _structure_from_json(meta["structure"])
        else:
            raise TernaryCheckpointError(
                f"{directory}: the tree has custom node types; pass like=<a tree of that structure> to restore it"
            )
        infos = tuple(LeafInfo(e["path"], tuple(e["shape"]), e["dtype"], bool(e["coded"])) for e in meta["leaves"])
        if treedef.num_leaves != len(infos):
            raise TernaryCheckpointError(
                f"{directory}: the tree structure has {treedef.num_leaves} leaves, the metadata {len(infos)}"
            )
        spec = TernarySpec(treedef, infos, float(meta["density"]), float(meta["alpha"]), meta["scope"],
                           meta["scale_rule"])
        shardings = _leaf_shardings(args.sharding, treedef, len(infos))
        streams_path = directory / STREAMS_FILE
        if not streams_path.exists():
            raise TernaryCheckpointError(f"{streams_path} not found (incomplete checkpoint)")
        data = memoryview(streams_path.read_bytes())
        masks, signs, scales = [], [], []
        for entry, info, sharding in zip(meta["leaves"], infos, shardings):
            if not info.coded:
                continue
            start, length = int(entry["offset"]), int(entry["length"])
            where = f"{streams_path}, leaf {info.path!r} (shape {info.shape}, dtype {info.dtype})"
            if start + length > len(data):
                raise TernaryCheckpointError(
                    f"{where}: file truncated: the leaf needs bytes [{start}, {start + length}), file has {len(data)}"
                )
            mask, sign = _decode_blob(data[start : start + length], entry, info, where)
            bsh = bitmap_sharding(sharding, info)
            masks.append(jax.device_put(mask, bsh))
            signs.append(jax.device_put(sign, bsh))
            scales.append(jax.device_put(np.float32(entry["scale"]), _replicated(sharding)))
        if len(data) != meta["streams_bytes"]:
            raise TernaryCheckpointError(
                f"{streams_path}: {len(data)} bytes, metadata says {meta['streams_bytes']} (truncated or extended)"
            )
        return TernaryTaskVector(tuple(masks), tuple(signs), tuple(scales), spec)

    def metadata(self, directory: epath.Path) -> dict:
        """The checked ``ternary.json`` contents."""
        return read_metadata(directory)

    def finalize(self, directory: epath.Path) -> None:
        del directory

    def close(self) -> None:
        pass


def _replicated(sharding: Any) -> Any:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def _leaf_shardings(sharding: Any, treedef: Any, num_leaves: int) -> list[Any]:
    """One sharding (or None) per dense leaf from ``None``, a single sharding, or a tree of shardings."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return [sharding] * num_leaves
    flat = jax.tree_util.tree_leaves(sharding, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))
    if len(flat) != num_leaves:
        raise ValueError(f"sharding tree has {len(flat)} leaves, the task vector {num_leaves}")
    return flat


@ocp.args.register_with_handler(TernaryCheckpointHandler, for_save=True)
@dataclasses.dataclass
class TernarySave(ocp.args.CheckpointArgs):
    """Orbax save args for a :class:`~mergejax.ternary.TernaryTaskVector`."""

    item: TernaryTaskVector


@ocp.args.register_with_handler(TernaryCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class TernaryRestore(ocp.args.CheckpointArgs):
    """Orbax restore args.

    Attributes:
      sharding: ``None`` (default device), one ``jax.sharding.Sharding`` for every leaf, or a tree of them shaped
        like the dense task vector. A ``NamedSharding`` of a dense leaf applies to its bitmaps (same spec).
      like: optional tree of the dense structure, needed only for trees with custom pytree node types.
    """

    sharding: Any = None
    like: Any = None


# ------------------------------------------------------------------------------------------------ bare directories
def save(directory: epath.PathLike, ttv: TernaryTaskVector) -> None:
    """Saves ``ttv`` at ``directory`` atomically (an earlier checkpoint there survives any failure of this save).

    Writes a hidden sibling with an orbax ``Checkpointer`` and swaps it in with renames (:func:`mergejax.fsutil.
    atomic_dir`); the earlier checkpoint is removed only after the new one is in place, and a save killed between
    the renames is recovered by the next :func:`save` or :func:`load`.

    Raises:
      TernaryCheckpointError: ``directory`` exists and is a file or a non-empty directory that is not a ternary
        checkpoint (it is never replaced).
    """
    from mergejax import fsutil

    path = epath.Path(os.path.abspath(os.fspath(directory)))
    fsutil.recover(path)
    if path.exists():
        if not path.is_dir() or (any(path.iterdir()) and not (path / METADATA_FILE).is_file()):
            raise TernaryCheckpointError(
                f"{path} exists and is not a ternary checkpoint; refusing to replace it (choose another directory)"
            )
    with fsutil.atomic_dir(path) as tmp:
        checkpointer = ocp.Checkpointer(TernaryCheckpointHandler())
        try:
            checkpointer.save(epath.Path(tmp), args=TernarySave(ttv))
        finally:
            checkpointer.close()


def load(directory: epath.PathLike, *, sharding: Any = None, like: Any = None) -> TernaryTaskVector:
    """Loads a ternary task vector saved by :func:`save` (or by an orbax manager with :class:`TernarySave`).

    Args:
      directory: the checkpoint (item) directory.
      sharding: ``None``, one sharding for all leaves, or a tree of ``NamedSharding`` like the dense task vector.
      like: a tree with the dense structure, only needed for custom pytree node types.

    Raises:
      TernaryCheckpointError: missing, truncated or corrupted files (naming the leaf), unsupported version.
    """
    from mergejax import fsutil

    directory = epath.Path(directory)
    if not directory.exists():
        fsutil.recover(os.fspath(directory))  # a save killed between its two renames left it in .NAME.old-*
    if not directory.exists():
        raise TernaryCheckpointError(f"{directory} does not exist")
    checkpointer = ocp.Checkpointer(TernaryCheckpointHandler())
    try:
        return checkpointer.restore(directory, args=TernaryRestore(sharding=sharding, like=like))
    finally:
        checkpointer.close()


class TernarySource:
    """A ternary checkpoint read one leaf at a time as its dense task vector (a ``mergejax.convert.io`` tensor
    source, for :mod:`mergejax.stream`): the metadata once, then per leaf one positioned read of its blob, checked
    (length, CRC) and decoded to the accumulation dtype, as ``TernaryTaskVector.decode_leaf``; non-float leaves read
    as zeros. Peak memory: one leaf.

    ``task_vector = True`` tells the streaming merge these tensors are task vectors tau_t, not fine-tuned weights.

    Args:
      directory: the checkpoint (item) directory (an orphaned ``.NAME.old-*`` from a killed save is put back first).
    """

    task_vector = True

    def __init__(self, directory: epath.PathLike):
        from mergejax import fsutil

        self.path = epath.Path(directory)
        if not self.path.exists():
            fsutil.recover(os.fspath(self.path))
        meta = read_metadata(self.path)
        self._entries = {e["path"]: e for e in meta["leaves"]}
        streams = self.path / STREAMS_FILE
        if not streams.exists():
            raise TernaryCheckpointError(f"{streams} not found (incomplete checkpoint)")
        self._size = streams.stat().length
        if self._size != meta["streams_bytes"]:
            raise TernaryCheckpointError(
                f"{streams}: {self._size} bytes, metadata says {meta['streams_bytes']} (truncated or extended)")
        self._fd: int | None = os.open(os.fspath(streams), os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self._entries)

    def _leaf(self, key: str) -> LeafInfo:
        e = self._entries[key]
        return LeafInfo(e["path"], tuple(e["shape"]), e["dtype"], bool(e["coded"]))

    def info(self, key: str) -> Any:
        from mergejax.convert.io import TensorInfo
        from mergejax.tree import acc_dtype

        leaf = self._leaf(key)
        dtype = np.dtype(jax.numpy.dtype(leaf.dtype))
        return TensorInfo(leaf.shape, np.dtype(acc_dtype(dtype)) if leaf.coded else dtype)

    def read(self, key: str) -> np.ndarray:
        from mergejax.ternary.device import _decode_jit

        leaf, entry, info = self._leaf(key), self._entries[key], self.info(key)
        if not leaf.coded:
            return np.zeros(info.shape, info.dtype)
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        start, length = int(entry["offset"]), int(entry["length"])
        where = f"{self.path / STREAMS_FILE}, leaf {leaf.path!r} (shape {leaf.shape}, dtype {leaf.dtype})"
        blob = os.pread(self._fd, length, start)
        if len(blob) != length:
            raise TernaryCheckpointError(f"{where}: file truncated: the leaf needs bytes [{start}, {start + length})")
        mask, sign = _decode_blob(blob, entry, leaf, where)
        return np.asarray(_decode_jit(mask, sign, np.float32(entry["scale"]), shape=leaf.shape, dtype=info.dtype))

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.read(key)[index]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
