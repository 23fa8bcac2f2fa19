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

Under ``jax.distributed`` (more than one process) nothing is gathered: each process entropy-codes the shards of each
leaf's bitmaps that its devices hold (replica 0 only) as separate blobs into ``streams-<process>.bin`` and lists them
in ``shards-<process>.json``; orbax's ``finalize`` on the primary joins those lists into ``ternary.json`` (per leaf,
its shards: bitmap index range, file, offset, length, CRC) and removes them, and :func:`save`'s swap runs on the
primary alone. Loading assembles each leaf from its shards' blobs, one leaf at a time.

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


def _write_metadata(directory: epath.Path, settings: dict, structure: Any, leaves: list[dict], **layout: Any) -> None:
    """ternary.json: ``settings`` (density, alpha, scope, scale_rule), the tree ``structure``, the file layout and
    the per-leaf entries, with the metadata's own CRC-32."""
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "codec_version": codec.CODEC_VERSION,
        **{k: settings[k] for k in ("density", "alpha", "scope", "scale_rule")},
        "structure": structure,
        **layout,
        "leaves": leaves,
    }
    meta["metadata_crc32"] = _metadata_crc(meta)
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=1))


def _settings(spec: TernarySpec) -> dict:
    return {"density": spec.density, "alpha": spec.alpha, "scope": spec.scope, "scale_rule": spec.scale_rule}


def _process_file(kind: str, process: int) -> str:
    return f"{kind}-{process:05d}.{'bin' if kind == 'streams' else 'json'}"


def _save_process_shards(directory: epath.Path, ttv: TernaryTaskVector) -> None:
    """One process's part of a multi-process save: the shards of every leaf's bitmaps that this process holds
    (replica 0 only, so each shard is written once), each entropy-coded as its own blob into
    ``streams-<process>.bin``, and their index, offsets, lengths and CRCs into ``shards-<process>.json``. Nothing is
    gathered: each process reads only its own devices' shards.
    """
    pid = jax.process_index()
    entries: list[list[dict]] = []
    scales: list[float | None] = []
    offset = 0
    with open(os.fspath(directory / _process_file("streams", pid)), "wb") as f:
        for j, (mask, sign, scale) in enumerate(zip(ttv.mask, ttv.sign, ttv.scale)):
            mine = []
            signs = {sh.device: sh for sh in sign.addressable_shards}
            for sh in mask.addressable_shards:
                if sh.replica_id != 0:
                    continue
                words = np.asarray(sh.data)
                dense = words.shape[:-1] + (words.shape[-1] * 32,)  # the shard as a leaf of whole words
                blob = codec.encode_leaf(words, np.asarray(signs[sh.device].data), dense)
                f.write(blob)
                index = [[sl.start or 0, words.shape[a] + (sl.start or 0)] for a, sl in enumerate(sh.index)]
                mine.append({"index": index, "shape": list(dense), "file": _process_file("streams", pid),
                             "offset": offset, "length": len(blob), "crc32": _crc(blob),
                             "nnz": codec.read_header(blob).nnz})
                offset += len(blob)
            entries.append(mine)
            scales.append(float(np.asarray(scale.addressable_data(0), np.float32)))
        f.flush()
        os.fsync(f.fileno())
    part = {"process": pid, "streams_bytes": offset, "shards": entries, "scales": scales}
    if pid == 0:
        spec = ttv.spec
        part["spec"] = {**_settings(spec), "leaves": [dataclasses.asdict(i) for i in spec.leaves]}
        part["structure"] = _structure_to_json(spec.treedef)
    (directory / _process_file("shards", pid)).write_text(json.dumps(part))


def _finalize_process_shards(directory: epath.Path) -> None:
    """The primary's finalisation of a multi-process save: ternary.json from every process's shard list."""
    parts = sorted((json.loads(p.read_text()) for p in directory.glob("shards-*.json")), key=lambda q: q["process"])
    if not parts or parts[0]["process"] != 0:
        raise TernaryCheckpointError(f"{directory}: the primary's shard list is missing (unfinished save)")
    head = parts[0]["spec"]
    coded = [i for i in head["leaves"] if i["coded"]]
    leaves, j = [], 0
    for info in head["leaves"]:
        entry = {"path": info["path"], "shape": list(info["shape"]), "dtype": info["dtype"], "coded": info["coded"]}
        if info["coded"]:
            shards = [s for q in parts for s in q["shards"][j]]
            entry.update(shards=shards, nnz=sum(s["nnz"] for s in shards), scale=parts[0]["scales"][j])
            j += 1
        leaves.append(entry)
    if j != len(coded) or any(len(q["shards"]) != len(coded) for q in parts):
        raise TernaryCheckpointError(f"{directory}: the processes' shard lists disagree on the leaves")
    files = {_process_file("streams", q["process"]): q["streams_bytes"] for q in parts}
    _write_metadata(directory, head, parts[0]["structure"], leaves, streams_files=files)
    for q in parts:
        (directory / _process_file("shards", q["process"])).unlink()


class _ShardFiles:
    """The per-process stream files of a multi-process checkpoint, read one shard blob at a time."""

    def __init__(self, directory: epath.Path, meta: dict):
        self.directory = epath.Path(directory)
        self._fds: dict[str, int] = {}
        for name, size in meta["streams_files"].items():
            path = self.directory / name
            if not path.exists():
                raise TernaryCheckpointError(f"{path} not found (incomplete checkpoint)")
            if path.stat().length != size:
                raise TernaryCheckpointError(f"{path}: {path.stat().length} bytes, metadata says {size}")
            self._fds[name] = os.open(os.fspath(path), os.O_RDONLY)

    def leaf_words(self, entry: dict, info: LeafInfo) -> tuple[np.ndarray, np.ndarray]:
        """A leaf's whole (mask, sign) bitmaps, assembled from its shards' blobs (each checked)."""
        wshape = codec.packed_shape(info.shape)
        mask, sign = np.zeros(wshape, np.uint32), np.zeros(wshape, np.uint32)
        covered = 0
        for sh in entry["shards"]:
            where = f"{self.directory / sh['file']}, leaf {info.path!r} shard {sh['index']}"
            fd = self._fds.get(sh["file"])
            if fd is None:
                raise TernaryCheckpointError(f"{where}: file not listed in the metadata")
            blob = os.pread(fd, int(sh["length"]), int(sh["offset"]))
            if len(blob) != int(sh["length"]):
                raise TernaryCheckpointError(f"{where}: file truncated")
            m, g = _decode_blob(blob, sh, dataclasses.replace(info, shape=tuple(sh["shape"])), where)
            region = tuple(slice(a, b) for a, b in sh["index"])
            mask[region], sign[region] = m, g
            covered += m.size
        if covered != mask.size:
            raise TernaryCheckpointError(f"{self.directory}: leaf {info.path!r}: its shards cover {covered} of "
                                         f"{mask.size} bitmap words (incomplete checkpoint)")
        return mask, sign

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class TernaryCheckpointHandler(ocp.CheckpointHandler):
    """Orbax handler for :class:`~mergejax.ternary.TernaryTaskVector` (use with :class:`TernarySave` /
    :class:`TernaryRestore`). A single process entropy-codes each leaf's bitmaps one leaf at a time (peak host
    memory: about one leaf's bitmaps, 2 bits per parameter, plus its unpacked bits); several processes each code the
    shards they hold, and the primary's :meth:`finalize` writes the metadata (see the module docstring)."""

    def save(self, directory: epath.Path, args: "TernarySave") -> None:
        ttv = args.item
        if not isinstance(ttv, TernaryTaskVector):
            raise TypeError(f"TernarySave expects a TernaryTaskVector, got {type(ttv).__name__}")
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if jax.process_count() > 1:
            _save_process_shards(directory, ttv)  # the primary's finalize() writes ternary.json
            return
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
        _write_metadata(directory, _settings(spec), _structure_to_json(spec.treedef), leaves, streams_bytes=offset)

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
        masks, signs, scales = [], [], []
        if "streams_files" in meta:  # written by several processes: per-process files, one blob per shard
            files = _ShardFiles(directory, meta)
            try:
                for entry, info, sharding in zip(meta["leaves"], infos, shardings):
                    if info.coded:
                        mask, sign = files.leaf_words(entry, info)
                        bsh = bitmap_sharding(sharding, info)
                        masks.append(jax.device_put(mask, bsh))
                        signs.append(jax.device_put(sign, bsh))
                        scales.append(jax.device_put(np.float32(entry["scale"]), _replicated(sharding)))
            finally:
                files.close()
            return TernaryTaskVector(tuple(masks), tuple(signs), tuple(scales), spec)
        streams_path = directory / STREAMS_FILE
        if not streams_path.exists():
            raise TernaryCheckpointError(f"{streams_path} not found (incomplete checkpoint)")
        data = memoryview(streams_path.read_bytes())
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
        """On the primary process, after every process saved: joins the processes' shard lists into ternary.json
        (a no-op for a single-process save, which wrote it already)."""
        directory = epath.Path(directory)
        if not (directory / METADATA_FILE).exists():
            _finalize_process_shards(directory)

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
    if jax.process_count() > 1:
        _save_multiprocess(path, ttv)
        return
    _check_target(path)
    with fsutil.atomic_dir(path) as tmp:
        _orbax_save(epath.Path(tmp), ttv)


def _check_target(path: epath.Path) -> None:
    from mergejax import fsutil

    fsutil.recover(path)
    if path.exists():
        if not path.is_dir() or (any(path.iterdir()) and not (path / METADATA_FILE).is_file()):
            raise TernaryCheckpointError(
                f"{path} exists and is not a ternary checkpoint; refusing to replace it (choose another directory)"
            )


def _orbax_save(tmp: epath.Path, ttv: TernaryTaskVector) -> None:
    checkpointer = ocp.Checkpointer(TernaryCheckpointHandler())
    try:
        checkpointer.save(tmp, args=TernarySave(ttv))
    finally:
        checkpointer.close()


def _broadcast_text(text: str) -> str:
    """Process 0's ``text`` in every process (at most 4096 UTF-8 bytes)."""
    from jax.experimental import multihost_utils

    raw = text.encode()[:4096].ljust(4096, b"\0") if jax.process_index() == 0 else bytes(4096)
    got = multihost_utils.broadcast_one_to_all(np.frombuffer(raw, np.uint8))
    return bytes(np.asarray(got, np.uint8)).rstrip(b"\0").decode()


def _save_multiprocess(path: epath.Path, ttv: TernaryTaskVector) -> None:
    """:func:`save` under ``jax.distributed``: every process writes the shards it holds (no leaf is gathered), the
    primary writes the metadata (orbax's finalize) and alone swaps the new directory in; the others wait for it.

    Every process must call it with the same arguments; the directory must be on a file system they all see.
    """
    from jax.experimental import multihost_utils

    from mergejax import fsutil

    primary = jax.process_index() == 0
    swap, failure = None, None
    if primary:
        try:
            _check_target(path)
            swap = fsutil.atomic_dir(path)
            message = "T" + os.fspath(swap.__enter__())
        except Exception as e:  # every process raises it
            failure, message = e, f"E{type(e).__name__}: {e}"
    else:
        message = ""
    message = _broadcast_text(message)
    if message.startswith("E"):
        if failure is not None:
            raise failure
        raise TernaryCheckpointError(f"process 0 could not start the save of {path}: {message[1:]}")
    try:
        _orbax_save(epath.Path(message[1:]), ttv)
    except BaseException as e:
        if swap is not None:
            swap.__exit__(type(e), e, e.__traceback__)
        raise
    if swap is not None:
        swap.__exit__(None, None, None)  # renames the finished directory into place
    multihost_utils.sync_global_devices(f"mergejax.ternary.save:{path}")


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
        self._fd: int | None = None
        self._files = _ShardFiles(self.path, meta) if "streams_files" in meta else None  # a multi-process save
        if self._files is not None:
            return
        streams = self.path / STREAMS_FILE
        if not streams.exists():
            raise TernaryCheckpointError(f"{streams} not found (incomplete checkpoint)")
        self._size = streams.stat().length
        if self._size != meta["streams_bytes"]:
            raise TernaryCheckpointError(
                f"{streams}: {self._size} bytes, metadata says {meta['streams_bytes']} (truncated or extended)")
        self._fd = os.open(os.fspath(streams), os.O_RDONLY)

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
        if self._files is not None:
            mask, sign = self._files.leaf_words(entry, leaf)
            return np.asarray(_decode_jit(mask, sign, np.float32(entry["scale"]), shape=leaf.shape, dtype=info.dtype))
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
        if self._files is not None:
            self._files.close()
