"""Streaming, out-of-core merges: checkpoints on disk in, a sharded safetensors checkpoint out, piece by piece.

:func:`merge` runs a mergejax method (``task_arithmetic``, ``ties``, ``dare``, ``breadcrumbs``, ``average``, ``pcb``,
the SOTA data-free methods of the table below, or a :class:`mergejax.Merger` of those stages) over Hugging Face
safetensors directories (sharded with an index or not) or orbax checkpoints, and writes ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``
(config.json and tokenizer files copied from the base), with the same jitted stages as the in-memory merge.

Two engines:

- **Chunked** (chains whose every stage maps coordinates independently given the whole-model statistics: the
  reductions, ``ElectSign``, the global ``Trim``; so task arithmetic, TIES, ``average``): the float tensors, in
  output order, are cut into flat chunks of ``chunk`` bytes (a large tensor spans several, small norms and biases
  share one), read with positioned reads straight into 64-byte-aligned buffers that XLA takes without a copy, merged
  by one program per dtype signature and power-of-two size bucket (a model compiles a handful of programs, not one
  per tensor shape, and runs one dispatch per chunk, not per tensor), and written piece by piece. Three stages
  overlap: a reader thread fills the next chunk, XLA computes the current one, and a writer thread writes the
  previous ones (file reads and writes release the GIL; bounded queues). Host memory: about 2T + 5 chunks,
  whatever the tensor sizes (chunk-sized blocks are reused from the malloc heaps while the pass runs: a fresh
  memory map per XLA output cost more than the program).
- **Per tensor** (DARE, whose masks are keyed by tensor; Breadcrumbs and per-tensor trims, which rank within a
  tensor; LiNeS, scaled by the tensor's block, before or after the reduction): one whole tensor at a time, the next ones read ahead while at most
  ``readahead`` bytes are in flight: peak host memory is about (T + 2) x the largest tensor + ``readahead`` + a
  constant.

Operators with a whole-model quantity are computed exactly in streaming passes before the merge pass:

- ``Trim(scope="global")`` (TIES's global top-k): per task, the k-th largest |tau| over all float tensors, by a
  65536-bin histogram of the high 16 bits of the float32 magnitudes (pass 1), then of the low 16 bits inside the
  bin holding the k-th largest (pass 2); the result is the exact k-th largest value, as in memory;
- ``ElectSign``'s zero-sum rule (the sign of the model-wide total of elected signs): one counting pass.

The counting runs in the jitted program of each chunk: the sign counts are reduced on the device; the histogram
digits are computed there, fused with the task vectors, and counted by a scatter-add on GPU/TPU or by numpy's
``bincount`` on CPU, where XLA's scatter is slower (:data:`DEVICE_HISTOGRAM`); the host adds int64 counts.
These pieces are public, for other streaming passes that need an exact k-th largest magnitude (the mergekit
runner's per-tensor bands, :func:`mergejax.config.tensor_bands`): :func:`magnitude_digits` (inside the jitted
program), :func:`count_digits` (on the host), :func:`use_device_histogram` (which of the two counts) and
:func:`histogram_select` (the passes and the selection).

The merged tensors equal :func:`mergejax.chain` on the whole model loaded in memory (float32 task vectors), bit for
bit, DARE included (its masks are keyed by (task, float-leaf index) in both, leaves taken in sorted name order, which
is how JAX flattens a dict). One exception: DARE's ``rescale="l1"`` sums each tensor's |tau| in another order than the
in-memory merge (which batches same-shaped tensors with ``vmap``), so its rescale factor may differ in the last bit.
``heads=`` (a regex over tensor names) keeps the matched tensors per task (base + sum_t tau_t), outside every
statistic, as in memory.

A fine-tuned input may be a ternary (ComPEFT) expert saved by :func:`mergejax.ternary.save`: it is read leaf by leaf
(:class:`mergejax.ternary.storage.TernarySource`) and enters the chain as its decoded task vector, as a
``TernaryTaskVector`` does in memory (equal bit for bit, except DARE's rescale of a ternary input, which XLA fuses with
the decode in memory: last-bit differences).

Output: sharded safetensors, or with ``out_format="orbax"`` one orbax checkpoint per output shard written as it
completes (``orbax-0000i-of-0000N`` + ``orbax.index.json``, read back by :class:`OrbaxShardsSource`), from one
process.

Which methods stream, and how (every one equal to the in-memory ``mergejax.<method>`` on the same tensors):

==========================================  ==============================================================
method (``method=``)                        how it streams
==========================================  ==============================================================
``average``, ``task_arithmetic``            chunked, one pass
``ties`` (global trim)                      chunked: 2 histogram passes (trim) + 1 counting pass (sign) + merge
``ties`` (``scope="tensor"``), ``dare``,    per tensor, one pass (DARE's masks keyed by (task, float-leaf
``breadcrumbs``, LiNeS chains               index), per-tensor ranks within the tensor)
``pcb``                                     per tensor: PCB's own ``host_stats`` (the clamp bounds, then the
                                            balancing weights' quantile and maximum), answered by exact
                                            streaming passes (:class:`_StreamRunner`: 2 histogram passes per
                                            order statistic, 1 per maximum), then one merge pass: 6 passes
``tsv``, ``iso_c``, ``iso_cts``, ``cart``,  per tensor, one pass: each matrix's merge depends on that matrix
``wudi``, ``model_stock``                   alone (non-matrix tensors averaged); WUDI runs its Adam loop per
                                            matrix (equal up to float rounding, see below)
``consensus_ta``, ``consensus_ties``        per tensor: tau_MTL's statistics (TIES' global trim and majority
                                            sign) streamed first, then the TALL masks and Eq. 5 per tensor
``della``                                   per tensor, one pass (+ the sign pass with ``combine="ties"``);
                                            MagPrune's draws keyed by (task, float-leaf index), as in memory
==========================================  ==============================================================

A :class:`mergejax.Merger` streams when every stage is one of those, a ``leafwise`` stage, or a stage with the
``host_stats`` / ``stat_values`` / ``apply_with`` protocol of :mod:`mergejax.ops.schedule` (whole-model order
statistics, totals and maxima; a per-tensor ``kth_by_leaf`` does not stream). Refused with an error naming the
stage: stages that need the whole model at once otherwise (RegMean and Fisher need data anyway); ``emr`` (its result
is a unified vector plus per-task masks, not one checkpoint). Exceptions to bit-equality, all float rounding in the
last bits: Iso-CTS and WUDI (in memory, same-shaped matrices are batched: one ``lax.map`` / one Adam loop over all of
them), DELLA's and DARE's ``rescale="l1"`` (each tensor's L1 sums in another order), the matrix methods with
``weights=`` (XLA fuses the weighting into the in-memory program differently). Stages whose leaf function reads
the leaf's path (``exclude=``, ``transpose=``, the Flax-kernel ``layout`` rule) see the tensor's name, or another name
with the same answers to those rules (one compiled program per class of tensors).

Interruptions: shards are written under a temporary name and renamed when complete, and a small state file records
the finished shards and the global statistics; rerunning the same merge into the same directory skips them. Progress
(a tqdm bar over bytes read, with the read throughput) and logging come from process 0 only.

Host memory details: glibc's mmap threshold is fixed at 1 MiB while merging (freed tensors go back to the OS at once,
instead of staying in the malloc arenas of the reader and XLA threads), and the buffers whose zero-copy device views
XLA released on its own threads are freed after each unit of work.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mergejax.convert.io import (
    SAFE_INDEX,
    SafetensorsFile,
    SafetensorsWriter,
    ShardedCheckpoint,
    TensorInfo,
    open_checkpoint,
    parse_size,
)
from mergejax.merge import Merger, _average_jit, breadcrumbs_chain, chain, dare_chain, ties_chain
from mergejax.ops.base import Given, leaf_index, leaf_keys, per_leaf_weights, rank_from_fraction
from mergejax.ops.breadcrumbs import BreadcrumbsMask
from mergejax.ops.consensus import Consensus, consensus_mask, consensus_ta_stages, consensus_ties_stages
from mergejax.ops.dare import DareDrop, drop_and_rescale
from mergejax.ops.della import Della, della_prune
from mergejax.ops.lines import LiNeS
from mergejax.ops.matrix import PreWeighted, scale_task_vectors, transposes
from mergejax.ops.model_stock import ModelStock
from mergejax.ops.pcb import PCB
from mergejax.ops.reduce import DisjointMax, DisjointMean, DisjointSum, Mean, Sum, WeightedSum
from mergejax.ops.select import ordered_key
from mergejax.ops.sign import ElectSign, keep_agreeing, sign_mass
from mergejax.ops.svd import CART, TSV, IsoC, IsoCTS
from mergejax.ops.trim import Trim
from mergejax.ops.wudi import WUDI
from mergejax.tree import _leaf_apply, _leaf_task_vector, acc_dtype

__all__ = ["merge", "merge_tensors", "load_sharded", "OrbaxSource", "OrbaxShardsSource", "open_source", "STATE_FILE",
           "COPIED_FILES", "ORBAX_INDEX", "DEVICE_HISTOGRAM", "use_device_histogram", "magnitude_digits",
           "count_digits", "histogram_select", "CountPass"]

STATE_FILE = ".mergejax-stream.json"
ORBAX_INDEX = "orbax.index.json"  # tensor name -> the orbax checkpoint (of out_format="orbax") holding it
READAHEAD = "256MB"  # default bound on the input bytes read ahead of the merge
CHUNK = "16MiB"  # default flat chunk of the elementwise chains (bytes of one float32 input buffer)
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
)


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class OrbaxSource:
    """An orbax ``StandardCheckpointer`` directory read one leaf at a time (orbax partial restore), as a TensorSource.

    Tensor names are the leaves' paths (``"params/Dense_0/kernel"``), listed in JAX's flattening order; only trees of
    nested dicts are supported.
    """

    ordered = True  # keys() is already the in-memory flattening order

    def __init__(self, path: str | os.PathLike[str]):
        import orbax.checkpoint as ocp

        from mergejax.tree import path_str

        self.path = Path(path).resolve()
        meta = ocp.StandardCheckpointer().metadata(self.path)
        meta = getattr(meta, "item_metadata", meta)
        tree = getattr(meta, "tree", meta)
        self._keys: dict[str, tuple[str, ...]] = {}
        self._infos: dict[str, TensorInfo] = {}
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not all(isinstance(k, jax.tree_util.DictKey) for k in keypath):
                raise ValueError(f"{self.path}: leaf {path_str(keypath)!r} is not in a tree of dicts")
            name = path_str(keypath)
            self._keys[name] = tuple(k.key for k in keypath)
            self._infos[name] = TensorInfo(tuple(leaf.shape), np.dtype(leaf.dtype))
        self._ckpt = ocp.PyTreeCheckpointer()

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def read(self, key: str) -> np.ndarray:
        import orbax.checkpoint as ocp

        def nest(value: Any) -> dict:
            for k in reversed(self._keys[key]):
                value = {k: value}
            return value

        item = nest(0)
        args = ocp.args.PyTreeRestore(item=item, restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)),
                                      partial_restore=True)
        out = self._ckpt.restore(self.path, args=args)
        for k in self._keys[key]:
            out = out[k]
        return np.asarray(out)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.read(key)[index]

    def close(self) -> None:
        pass


def open_source(path: str | os.PathLike[str]):
    """A checkpoint for tensor-by-tensor reading: an orbax directory, or what ``convert.io.open_checkpoint`` opens."""
    p = Path(path)
    if p.is_dir() and (p / ORBAX_INDEX).exists():
        return OrbaxShardsSource(p)
    if p.is_dir() and (p / "ternary.json").exists():  # a ComPEFT expert (mergejax.ternary.save), read as tau_t
        from mergejax.ternary.storage import TernarySource

        return TernarySource(p)
    if p.is_dir() and ((p / "_CHECKPOINT_METADATA").exists() or (p / "manifest.ocdbt").exists()):
        return OrbaxSource(p)
    return open_checkpoint(p)


_ALIGN = 64  # XLA:CPU takes a 64-byte-aligned host buffer without copying it (jax.device_put is then free)


def _read_aligned(src: Any, key: str) -> np.ndarray:
    """One tensor read into a 64-byte-aligned buffer (safetensors: one positioned read), else ``src.read``."""
    f = src._shard(key) if isinstance(src, ShardedCheckpoint) else src  # noqa: SLF001
    if not isinstance(f, SafetensorsFile):
        return src.read(key)
    info = f.info(key)
    buf = _aligned_empty(int(np.prod(info.shape, dtype=np.int64)), info.dtype)
    f.read_into(key, 0, buf)
    return buf.reshape(info.shape)


def _aligned_empty(n: int, dtype: np.dtype) -> np.ndarray:
    """A 64-byte-aligned 1-D buffer of ``n`` elements (XLA:CPU then takes it without a copy)."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + n * dtype.itemsize].view(dtype)


def _dev(x: np.ndarray) -> jax.Array:
    """A host array as a jax.Array (no copy on CPU when it is aligned and contiguous)."""
    return jax.device_put(x)


class _Inputs:
    """The base (optional) and the fine-tuned checkpoints, checked to hold the same names, shapes and dtypes."""

    def __init__(self, base: str | os.PathLike[str] | None, finetuned: Sequence[str | os.PathLike[str]]):
        if not finetuned:
            raise ValueError("finetuned is empty: need at least one checkpoint")
        self.paths = [base, *finetuned] if base is not None else list(finetuned)
        self.has_base = base is not None
        self.sources = [open_source(p) for p in self.paths]
        self.task_vector = tuple(bool(getattr(s, "task_vector", False)) for s in self.sources)
        if self.has_base and self.task_vector[0]:
            raise ValueError(f"{self.paths[0]}: the base must be a model checkpoint, not a task vector")
        ref = self.sources[0]
        self.names = list(ref.keys()) if getattr(ref, "ordered", False) else sorted(ref.keys())
        self.infos = {n: ref.info(n) for n in self.names}
        for path, src in zip(self.paths[1:], self.sources[1:]):
            missing = sorted(set(self.names) - set(src.keys()))
            extra = sorted(set(src.keys()) - set(self.names))
            if missing or extra:
                raise ValueError(f"{path}: tensor names differ from {self.paths[0]}: missing {missing[:5]}, extra {extra[:5]}")
            for n in self.names:
                a, b = self.infos[n], src.info(n)
                if a.shape != b.shape or (a.dtype != b.dtype and _is_float(a.dtype) != _is_float(b.dtype)):
                    raise ValueError(
                        f"{path}: tensor {n!r} has shape {b.shape} dtype {b.dtype}, expected {a.shape} {a.dtype}"
                    )

    def wrap(self, fts: Any) -> tuple:
        """The fine-tuned inputs for the jitted programs, task-vector sources (ternary experts) marked as such."""
        flags = self.task_vector[1:] if self.has_base else self.task_vector
        return tuple(_TV(x) if tv else x for x, tv in zip(fts, flags))

    def read(self, name: str) -> tuple[np.ndarray | None, list[np.ndarray]]:
        arrays = [_read_aligned(s, name) for s in self.sources]
        return (arrays[0], arrays[1:]) if self.has_base else (None, arrays)

    @property
    def largest(self) -> int:
        return max((i.nbytes for i in self.infos.values()), default=0)

    def close(self) -> None:
        for s in self.sources:
            s.close()


def _plan_shards(names: list[str], infos: dict[str, TensorInfo], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + infos[n].nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += infos[n].nbytes
    return shards


def _orbax_shard_name(i: int, n: int) -> str:
    return f"orbax-{i + 1:05d}-of-{n:05d}"


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class _State:
    """The resumable state of one streaming merge in ``out``: fingerprint, shard plan, finished shards, statistics."""

    def __init__(self, out: Path, fingerprint: str, plan: list[list[str]]):
        self.path = out / STATE_FILE
        self.data: dict[str, Any] = {"fingerprint": fingerprint, "plan": plan, "done": [], "stats": {}}
        if self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("fingerprint") != fingerprint or old.get("plan") != plan:
                raise FileExistsError(f"{out} holds an unfinished different merge ({STATE_FILE}); remove the directory")
            self.data = old
        elif out.exists() and any(p.suffix == ".safetensors" or p.name == ORBAX_INDEX or p.name.startswith("orbax-")
                                  for p in out.iterdir()):
            raise FileExistsError(f"{out} already holds a checkpoint; choose a new directory or remove it")
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        if jax.process_index() == 0:
            _write_json(self.path, self.data)

    def done(self, shard: int) -> bool:
        return shard in self.data["done"]

    def mark(self, shard: int) -> None:
        self.data["done"].append(shard)
        self.save()

    def stat(self, name: str, compute: Callable[[], Any]) -> Any:
        """A whole-model statistic, computed once and kept in the state (a resumed run does not recompute it)."""
        if name not in self.data["stats"]:
            self.data["stats"][name] = compute()
            self.save()
        return self.data["stats"][name]


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)


def merge_tensors(
    fn: Callable[[str, np.ndarray | None, list[np.ndarray]], np.ndarray],
    base: str | os.PathLike[str] | None,
    finetuned: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    out_dtype: Callable[[TensorInfo], np.dtype] | None = None,
    fingerprint: str = "",
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    copy_from: str | os.PathLike[str] | None = None,
    prefetch: bool = True,
    readahead: int | str = READAHEAD,
    inputs: _Inputs | None = None,
    state_hook: Callable[["_State", "_Inputs"], None] | None = None,
    chunked: "_Chunked | None" = None,
    out_format: str = "safetensors",
    elementwise: Callable[..., jax.Array] | None = None,
    chunk: int | str = CHUNK,
    tensor_stats: Callable[[str, int, Callable], Any] | None = None,
    chunk_if: Callable[[str, list[np.dtype]], bool] | None = None,
) -> Path:
    """Writes ``fn(name, base_tensor, finetuned_tensors)`` for every tensor name, shard by shard, resumably.

    Args:
      fn: the per-tensor merge; returns an array of the base's shape (dtype ``out_dtype(info)``).
      base: base checkpoint (file or directory), or None.
      finetuned: the other checkpoints.
      out: output directory (created); a rerun with the same ``fingerprint`` resumes an interrupted merge.
      out_dtype: the written dtype of a tensor, from the reference tensor's info (default: unchanged).
      fingerprint: identifies the merge (method, hyperparameters, inputs) for resuming.
      max_shard_size: shard size limit of the output.
      progress: tqdm bar over the bytes read (process 0).
      copy_from: directory whose config.json / tokenizer files are copied to ``out`` (default: the base's).
      prefetch: read the next tensors' inputs in a thread while the current one merges and is written.
      readahead: at most this many bytes of inputs read ahead ("256MB" or bytes): peak host memory is about
        (T + 2) x the largest tensor + ``readahead`` + a constant.
      out_format: ``"safetensors"`` or ``"orbax"`` (one orbax checkpoint per output shard, see :func:`merge`).
      elementwise: when ``fn`` maps coordinates independently, the same map on flat chunks,
        ``elementwise(base_chunk or None, finetuned_chunks) -> merged chunk`` (device arrays of any concatenation of
        float tensors' elements, zero-padded); the float tensors then stream over chunks of ``chunk`` bytes (see
        :func:`merge`), the others through ``fn``.
      chunk: the flat chunk of ``elementwise`` ("16MiB" or bytes).
      tensor_stats: when ``fn`` maps coordinates independently *given statistics of each tensor* (per-tensor
        thresholds), ``tensor_stats(name, size, scan)`` computes them in passes over the tensor's chunks (``scan(f)``
        calls ``f(base_chunk or None, finetuned_chunks, n)`` for each, ``n`` its unpadded size) and ``elementwise(base,
        finetuned, stats)`` merges its chunks with them. Then only the float tensors larger than one chunk for which
        ``chunk_if(name, input dtypes)`` holds (default: all) are chunked, each on its own chunks (its statistics
        passes read it again, one chunk at a time); the others go whole through ``fn``.
      chunk_if: see ``tensor_stats``.
      inputs, state_hook, chunked: internal (:func:`merge` runs its statistic passes in ``state_hook`` and its
        elementwise chains over flat chunks).

    Returns:
      ``out`` as a Path.
    """
    out = Path(out)
    if out_format not in ("safetensors", "orbax"):
        raise ValueError(f"out_format must be 'safetensors' or 'orbax', got {out_format!r}")
    if out_format == "orbax" and jax.process_count() > 1:
        raise ValueError("out_format='orbax' streams from one process; with jax.distributed save the result of "
                         "load_sharded + an in-memory merge with orbax instead")
    inp = inputs or _Inputs(base, finetuned)
    try:
        if chunked is None and elementwise is not None:
            def split(dev: list) -> tuple:
                return (dev[0], list(dev[1:])) if inp.has_base else (None, list(dev))

            elements = max(1, parse_size(chunk) // 4)
            if tensor_stats is None:
                chunked = _Chunked(lambda dev, _: elementwise(*split(dev)), lambda name: fn(name, *inp.read(name)),
                                   elements)
            else:
                small = frozenset(n for n in inp.names if int(np.prod(inp.infos[n].shape, dtype=np.int64)) <= elements
                                  or (chunk_if is not None and not chunk_if(n, [src.info(n).dtype
                                                                                for src in inp.sources])))
                def stats(name: str, scan: Callable) -> Any:
                    size = int(np.prod(inp.infos[name].shape, dtype=np.int64))
                    return tensor_stats(name, size, lambda f: scan(lambda dev, n: f(*split(dev), n)))

                chunked = _Chunked(lambda dev, st: elementwise(*split(dev), st), lambda name: fn(name, *inp.read(name)),
                                   elements, small, stats)
        infos = {
            n: TensorInfo(i.shape, np.dtype(out_dtype(i)) if out_dtype else i.dtype) for n, i in inp.infos.items()
        }
        plan = _plan_shards(inp.names, infos, parse_size(max_shard_size))
        fp = json.dumps([fingerprint, [str(Path(p).resolve()) for p in inp.paths]])
        state = _State(out, fp, plan)
        if state_hook is not None:
            state_hook(state, inp)
        todo = [i for i in range(len(plan)) if not state.done(i)]
        read_bytes = sum(inp.infos[n].nbytes for i in todo for n in plan[i]) * len(inp.sources)
        bar = _progress(read_bytes, progress, "merge")
        t0 = time.perf_counter()
        budget = parse_size(readahead) if prefetch else 0
        _return_freed_memory()
        if jax.process_index() == 0:
            sink = (_OrbaxShardSink if out_format == "orbax" else _ShardSink)(out, plan, todo, infos, state)
            try:
                names = [n for i in todo for n in plan[i]]
                if chunked is None:
                    _per_tensor_pass(fn, names, inp, infos, sink, budget, bar)
                else:
                    _chunked_pass(chunked, names, inp, infos, sink, budget, bar)
                sink.finish()
            except BaseException:
                sink.abort()
                raise
        if bar is not None:
            bar.close()
        if jax.process_index() == 0:
            if out_format == "orbax":
                weight_map = {n: _orbax_shard_name(i, len(plan)) for i, names in enumerate(plan) for n in names}
                _write_json(out / ORBAX_INDEX, {"format": "mergejax.orbax-shards", "weight_map": weight_map})
            elif len(plan) > 1:
                weight_map = {n: _shard_name(i, len(plan)) for i, names in enumerate(plan) for n in names}
                total = sum(infos[n].nbytes for n in inp.names)
                _write_json(out / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
            src = Path(copy_from if copy_from is not None else inp.paths[0])
            src = src if src.is_dir() else src.parent
            for name in COPIED_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, out / name)
            state.path.unlink(missing_ok=True)
            dt = time.perf_counter() - t0
            if read_bytes:
                _log(f"merged {len(inp.names)} tensors, read {read_bytes / 2**20:.1f} MiB in {dt:.1f} s "
                     f"({read_bytes / 2**20 / max(dt, 1e-9):.1f} MiB/s) -> {out}")
        return out
    finally:
        if inputs is None:
            inp.close()


def _return_freed_memory() -> None:
    """Makes glibc serve every allocation of 1 MiB or more with its own memory map (``M_MMAP_THRESHOLD``), so a
    freed tensor goes back to the OS at once.

    By default glibc raises that threshold after the first large free and then serves same-sized blocks from the
    heap arenas of the main, reader and XLA threads, which keep freed blocks resident: the peak RSS of a merge then
    grew by T + 1 tensors over its (T + 2). Process-wide and idempotent; a no-op where libc is not glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _release_views() -> None:
    """Frees the host buffers whose zero-copy device views XLA dropped on its own threads since the last call.

    Such a view cannot release its numpy buffer without the GIL, so jax queues it until its next garbage-collection
    callback: a young-generation collection (microseconds) runs that callback now, where otherwise a few chunks'
    inputs stayed resident until the interpreter's next collection.
    """
    gc.collect(0)


def _per_tensor_pass(fn: Callable, names: list[str], inp: _Inputs, infos: dict[str, TensorInfo], sink: _ShardSink,
                     budget: int, bar: Any) -> None:
    """The merge pass one whole tensor at a time (``fn`` per tensor), reading ahead at most ``budget`` bytes."""
    def size(name: str) -> int:
        return inp.infos[name].nbytes * len(inp.sources)

    for name, (b, fts) in _pipelined(names, inp.read, budget, size):
        merged = np.asarray(fn(name, b, fts))
        del b, fts
        if merged.shape != infos[name].shape or merged.dtype != infos[name].dtype:
            raise ValueError(
                f"tensor {name!r}: merge produced {merged.shape} {merged.dtype}, expected "
                f"{infos[name].shape} {infos[name].dtype}"
            )
        sink.put(name, merged.reshape(-1))
        del merged
        if bar is not None:
            bar.update(size(name))
        _release_views()


def _nest(flat: dict[str, np.ndarray]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}} (orbax keys; a safetensors name such as "model.layers.0.w" stays one key)."""
    tree: dict = {}
    for name, x in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = x
    return tree


class _OrbaxShardSink:
    """The output as orbax checkpoints, one per planned shard (``orbax-0000i-of-0000N``, each a
    ``StandardCheckpointer`` tree of its tensors, written when its last piece arrives, atomically by orbax) plus
    ``orbax.index.json``: host memory holds one output shard (``max_shard_size``) at a time."""

    def __init__(self, out: Path, plan: list[list[str]], todo: Sequence[int], infos: dict[str, TensorInfo],
                 state: "_State"):
        self.out, self.plan, self.infos, self.state = out, plan, infos, state
        self.queue = collections.deque(todo)
        self._arrays: dict[str, np.ndarray] = {}
        self._filled: dict[str, int] = {}
        self._order: list[str] = []
        self._settle()

    def _settle(self) -> None:
        while self.queue:
            i = self.queue[0]
            names = self.plan[i]
            if not self._arrays:
                self._order = [n for n in names if self.infos[n].nbytes > 0]
                self._arrays = {n: np.empty(int(np.prod(self.infos[n].shape, dtype=np.int64)), self.infos[n].dtype)
                                for n in names}
                self._filled = {n: 0 for n in names}
            if any(self._filled[n] < self._arrays[n].size for n in names):
                return
            import orbax.checkpoint as ocp

            tree = _nest({n: self._arrays[n].reshape(self.infos[n].shape) for n in names})
            ckpt = ocp.PyTreeCheckpointer()
            ckpt.save(self.out / _orbax_shard_name(i, len(self.plan)), tree, force=True)
            self._arrays, self._filled, self._order = {}, {}, []
            self.state.mark(self.queue.popleft())

    def put(self, name: str, piece: np.ndarray) -> None:
        if piece.size == 0:
            return
        current = next((n for n in self._order if self._filled[n] < self._arrays[n].size), None)
        if current != name:
            raise ValueError(f"tensor {name!r} written out of order (expected {current!r})")
        start = self._filled[name]
        self._arrays[name][start : start + piece.size] = piece.reshape(-1)
        self._filled[name] = start + piece.size
        self._settle()

    def finish(self) -> None:
        if self.queue:
            raise ValueError(f"orbax shard {self.queue[0]} is incomplete")

    def abort(self) -> None:
        self._arrays, self._filled, self._order = {}, {}, []


class OrbaxShardsSource:
    """The ``out_format="orbax"`` output of :func:`merge` (orbax checkpoints per shard + ``orbax.index.json``),
    read one tensor at a time (a TensorSource)."""

    ordered = True

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._map: dict[str, str] = json.loads((self.path / ORBAX_INDEX).read_text())["weight_map"]
        self._shards: dict[str, OrbaxSource] = {}

    def _src(self, key: str) -> OrbaxSource:
        shard = self._map[key]
        if shard not in self._shards:
            self._shards[shard] = OrbaxSource(self.path / shard)
        return self._shards[shard]

    def keys(self) -> list[str]:
        return list(self._map)

    def info(self, key: str) -> TensorInfo:
        return self._src(key).info(key)

    def read(self, key: str) -> np.ndarray:
        return self._src(key).read(key)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._src(key).read_slice(key, index)

    def close(self) -> None:
        self._shards.clear()


@dataclasses.dataclass(frozen=True)
class _Chunked:
    """An elementwise merge over flat chunks: ``compute(arrays, stats)`` (the T + 1 inputs' flat chunks, or T without
    a base, as device arrays) dispatches the merged flat chunk; ``whole(name)`` gives a tensor outside the chunks
    (non-float, empty, or in ``wholes``).

    With ``per_tensor``, every chunk holds one tensor's elements (tensors are not joined) and ``stats`` is
    ``per_tensor(name, scan)``, computed before the tensor's first chunk is merged: ``scan(f)`` reads the tensor's
    chunks again, one at a time, calling ``f(arrays, n)`` (``n``: the unpadded size). Otherwise ``stats`` is None.
    """

    compute: Callable[[list[jax.Array], Any], jax.Array]
    whole: Callable[[str], np.ndarray]
    elements: int
    wholes: frozenset[str] = frozenset()
    per_tensor: Callable[[str, Callable], Any] | None = None


def _chunk_bytes(c: Any) -> int:
    return sum(c.padded * dt.itemsize for dt in c.dtypes) if isinstance(c, _Chunk) else 0


def _chunked_pass(ch: _Chunked, names: list[str], inp: _Inputs, infos: dict[str, TensorInfo], sink: _ShardSink,
                  budget: int, bar: Any) -> None:
    """The merge pass over flat chunks, three stages overlapped: a reader thread fills chunks k + 1 .. k + d (at most
    ``budget`` bytes ahead, into reused buffers), XLA computes chunk k, and a writer thread drains the finished chunks
    k - 1, k - 2 into the output shards (at most :data:`_WRITE_DEPTH` waiting). File reads and writes release the
    GIL, so the three proceed in parallel; the bounded queues keep host memory at a few chunks."""
    items = _plan_chunks(names, inp, ch.elements, ch.wholes, join=ch.per_tensor is None)
    reader = _ChunkReader(inp)
    largest = max((_chunk_bytes(c) for c in items), default=0)
    writer = _Writer(bar)
    stats: dict[str, Any] = {}  # the current tensor's statistics (per_tensor)
    if ch.per_tensor is not None:
        by_name: dict[str, list[_Chunk]] = collections.defaultdict(list)
        for c in items:
            if isinstance(c, _Chunk):
                by_name[c.segments[0][0]].append(c)
        stat_reader = _ChunkReader(inp)  # its own buffers (and cache): the reader thread is using the other's

        def tensor_stats(name: str) -> Any:
            def scan(f: Callable[[list[jax.Array], int], None]) -> None:
                for c in by_name[name]:
                    bufs = stat_reader.read(c)
                    dev = [_dev(x) for x in bufs]
                    f(dev, c.size)  # f blocks on its program's results
                    del dev
                    stat_reader.recycle(bufs)
                    _release_views()

            if name not in stats:
                stats.clear()
                stats[name] = ch.per_tensor(name, scan)
            return stats[name]

    def write(item: "_Chunk | _Whole", merged: Any) -> int:
        host = np.asarray(merged)
        if isinstance(item, _Whole):
            sink.put(item.name, host.reshape(-1))
            return inp.infos[item.name].nbytes * len(inp.sources)
        pos = 0
        for name, _, n in item.segments:
            sink.put(name, host[pos : pos + n])
            pos += n
        return item.size * sum(dt.itemsize for dt in item.dtypes)

    with writer, _chunk_allocations(largest // max(1, len(inp.sources))):
        for item, bufs in _pipelined(items, lambda c: reader.read(c) if isinstance(c, _Chunk) else None,
                                     min(budget, largest), _chunk_bytes):
            if isinstance(item, _Whole):
                writer.submit(write, item, np.asarray(ch.whole(item.name)))
                continue
            st = None if ch.per_tensor is None else tensor_stats(item.segments[0][0])
            dev = [_dev(x) for x in bufs]
            merged = jax.block_until_ready(ch.compute(dev, st))
            del dev
            reader.recycle(bufs)  # the program has finished: its inputs are free for the next reads
            del bufs
            writer.submit(write, item, merged)
            del merged
            _release_views()


_WRITE_DEPTH = 2  # finished chunks waiting for (or in) the writer thread


class _Writer:
    """A writer thread draining ``fn(*args)`` calls in submission order, at most :data:`_WRITE_DEPTH` outstanding
    (``submit`` waits for the oldest beyond that, and re-raises its error); ``fn`` returns the bytes it accounts
    for on the progress bar. Leaving the ``with`` block waits for every write (or, on an error, for the running one,
    dropping the queued ones)."""

    def __init__(self, bar: Any):
        self._bar = bar
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: collections.deque[Future] = collections.deque()

    def _wait_oldest(self) -> None:
        n = self._pending.popleft().result()
        if self._bar is not None:
            self._bar.update(n)

    def submit(self, fn: Callable[..., int], *args: Any) -> None:
        while len(self._pending) >= _WRITE_DEPTH:
            self._wait_oldest()
        self._pending.append(self._pool.submit(fn, *args))

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        try:
            if kind is None:
                while self._pending:
                    self._wait_oldest()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit


@contextlib.contextmanager
def _chunk_allocations(chunk_bytes: int):
    """While the chunked pass runs, same-sized freed blocks (XLA's output of each chunk, the reader's buffers) are
    reused from the malloc heaps instead of being unmapped and mapped again.

    With :func:`_return_freed_memory`'s 1 MiB threshold each 16 MiB output was a fresh memory map whose pages fault
    and are zeroed on first write: that made a task-arithmetic pass take 4-5x the CPU time (same process, alternated
    runs). Here blocks up to ``2 x chunk_bytes`` (at most 32 MiB) come from the heaps and freed ones stay there for
    the next chunk (the trim threshold is raised to two such blocks); the heaps of the threads involved then keep a
    few freed chunks resident (peak RSS about 60-140 MiB higher with 16 MiB chunks, whatever the model size).
    Afterwards the 1 MiB threshold is restored and the freed heap memory returned (``malloc_trim``). A no-op where
    libc is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except (OSError, AttributeError):
        yield
        return
    size = min(_MMAP_MAX, max(1 << 20, 2 * chunk_bytes))
    libc.mallopt(_M_MMAP_THRESHOLD, size)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * size)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
        libc.malloc_trim(0)


# ---------------------------------------------------------------------------------------------------------------
# the chunked engine: elementwise chains over fixed-size flat chunks of many tensors


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """A run of consecutive float tensors' elements with one input-dtype signature, as one flat buffer per input.

    ``segments`` are ``(name, first element, count)`` in output order; ``padded`` is the buffer length (a power of
    two >= ``size``, so a model compiles one program per signature and size bucket, not one per tensor shape).
    """

    dtypes: tuple[np.dtype, ...]
    segments: tuple[tuple[str, int, int], ...]
    size: int
    padded: int


@dataclasses.dataclass(frozen=True)
class _Whole:
    """A tensor outside the chunks (non-float, or empty), produced whole."""

    name: str


_MIN_BUCKET = 1 << 12


def _bucket(n: int, limit: int) -> int:
    return min(limit, max(_MIN_BUCKET, 1 << max(0, (n - 1).bit_length())))


def _plan_chunks(names: Sequence[str], inp: "_Inputs", limit: int, whole: frozenset[str] = frozenset(),
                 join: bool = True) -> list["_Chunk | _Whole"]:
    """The float tensors of ``names`` (in order) cut into chunks of at most ``limit`` elements; other tensors whole.

    A chunk holds consecutive tensors of one dtype signature (a tensor larger than ``limit`` spans several chunks;
    a small one shares its chunk with its neighbours: one dispatch for many norms and biases), or with
    ``join=False`` the elements of one tensor only.
    """
    items: list[_Chunk | _Whole] = []
    segs: list[tuple[str, int, int]] = []
    sig: tuple[np.dtype, ...] | None = None
    fill = 0

    def flush() -> None:
        nonlocal segs, fill
        if segs:
            items.append(_Chunk(sig, tuple(segs), fill, _bucket(fill, limit)))
        segs, fill = [], 0

    for name in names:
        info = inp.infos[name]
        n = int(np.prod(info.shape, dtype=np.int64))
        if not _is_float(info.dtype) or n == 0 or name in whole:
            flush()
            items.append(_Whole(name))
            continue
        s = tuple(np.dtype(src.info(name).dtype) for src in inp.sources)
        if s != sig or not join:
            flush()
            sig = s
        start = 0
        while start < n:
            take = min(n - start, limit - fill)
            segs.append((name, start, take))
            start += take
            fill += take
            if fill == limit:
                flush()
    flush()
    return items


class _ChunkReader:
    """Fills a chunk's flat input buffers: positioned reads straight into them for safetensors, else a copy from the
    source's last whole tensor (orbax, torch: one tensor per source cached).

    Buffers come from a pool that :meth:`recycle` refills once a chunk's program has finished: with glibc's mmap
    threshold at 1 MiB (:func:`_return_freed_memory`) a fresh 16 MiB buffer is a fresh memory map, whose first
    touch page-faults and zeroes every page; reusing the few buffers in flight made the chunk reads about as fast as
    a plain read of the same bytes (``experiments/bench_stream.py``). The pool holds at most the buffers in flight.
    """

    def __init__(self, inp: "_Inputs"):
        self.inp = inp
        self._cache: list[tuple[str, np.ndarray] | None] = [None] * len(inp.sources)
        self._pool: dict[tuple[int, str], collections.deque] = {}

    def _buffer(self, n: int, dtype: np.dtype) -> np.ndarray:
        free = self._pool.get((n, np.dtype(dtype).str))
        try:
            return free.pop() if free else _aligned_empty(n, dtype)
        except IndexError:  # taken meanwhile
            return _aligned_empty(n, dtype)

    def recycle(self, bufs: Sequence[np.ndarray]) -> None:
        """Returns a chunk's input buffers to the pool: call only once no running program reads them."""
        for b in bufs:
            self._pool.setdefault((b.size, b.dtype.str), collections.deque()).append(b)

    def _into(self, s: int, name: str, start: int, out: np.ndarray) -> None:
        src = self.inp.sources[s]
        f = src._shard(name) if isinstance(src, ShardedCheckpoint) else src  # noqa: SLF001
        if isinstance(f, SafetensorsFile):
            f.read_into(name, start, out)
            return
        cached = self._cache[s]
        if cached is None or cached[0] != name:
            cached = (name, np.ascontiguousarray(src.read(name)).reshape(-1))
            self._cache[s] = cached
        out[...] = cached[1][start : start + out.size]

    def read(self, chunk: _Chunk) -> list[np.ndarray]:
        bufs = []
        for s, dt in enumerate(chunk.dtypes):
            buf = self._buffer(chunk.padded, dt)
            buf[chunk.size :] = 0
            pos = 0
            for name, start, n in chunk.segments:
                self._into(s, name, start, buf[pos : pos + n])
                pos += n
            bufs.append(buf)
        return bufs


def _pipelined(items: Sequence[Any], read: Callable[[Any], Any], budget: int, size: Callable[[Any], int],
               enabled: bool = True):
    """Yields ``(item, read(item))`` in order, reading the next items in one thread while the caller works on this
    one, with at most ``budget`` bytes (``size(item)``) read ahead; ``enabled=False`` reads in the caller's thread."""
    if not enabled or budget <= 0:
        for it in items:
            yield it, read(it)
        return
    pool = ThreadPoolExecutor(max_workers=1)
    pending: collections.deque[tuple[Future, int]] = collections.deque()  # items idx .. nxt - 1, in order
    ahead, nxt = 0, 0
    try:
        for idx, it in enumerate(items):
            if not pending:
                pending.append((pool.submit(read, it), 0))
                nxt = idx + 1
            fut, held = pending.popleft()
            ahead -= held
            while nxt < len(items) and ahead + size(items[nxt]) <= budget:
                b = size(items[nxt])
                pending.append((pool.submit(read, items[nxt]), b))
                ahead += b
                nxt += 1
            result = fut.result()
            fut = None  # hold no finished item here while the caller works (or the next one is read)
            yield it, result
            result = None
    finally:
        for fut, _ in pending:
            fut.cancel()
        pool.shutdown(wait=True)


class _ShardSink:
    """Writes the output shards ``todo`` of ``plan`` from pieces of their tensors, in order; each complete shard is
    renamed into place and marked done in the state (an interrupted run leaves only ``.partial`` files)."""

    def __init__(self, out: Path, plan: list[list[str]], todo: Sequence[int], infos: dict[str, TensorInfo],
                 state: "_State"):
        self.out, self.plan, self.infos, self.state = out, plan, infos, state
        self.queue = collections.deque(todo)
        self.writer: SafetensorsWriter | None = None
        self._settle()

    def _settle(self) -> None:
        while self.queue:
            if self.writer is None:
                i = self.queue[0]
                self.writer = SafetensorsWriter(self.out / _shard_name(i, len(self.plan)),
                                                [(n, self.infos[n]) for n in self.plan[i]], {"format": "pt"})
            if self.writer.current is not None:
                return
            self.writer.close()
            self.writer = None
            self.state.mark(self.queue.popleft())

    def put(self, name: str, piece: np.ndarray) -> None:
        """Appends the next elements of tensor ``name`` (a no-op for an empty piece)."""
        if piece.size == 0:
            return
        if self.writer is None or self.writer.current != name:
            raise ValueError(f"tensor {name!r} written out of order (expected "
                             f"{None if self.writer is None else self.writer.current!r})")
        self.writer.write(piece)
        self._settle()

    def finish(self) -> None:
        if self.queue:
            raise ValueError(f"shard {self.queue[0]} is incomplete at tensor {self.writer.current!r}")

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# ---------------------------------------------------------------------------------------------------------------
# mergejax methods over checkpoints


_PER_LEAF = (BreadcrumbsMask, Sum, Mean, DisjointMean, DisjointSum, DisjointMax, WeightedSum)
_ELEMENTWISE = (Sum, Mean, DisjointMean, DisjointSum, DisjointMax, WeightedSum, ElectSign)
_PER_MATRIX = (TSV, IsoC, IsoCTS, CART, WUDI, ModelStock)  # one leaf's output depends on that leaf alone
# the stage fields that make a leaf's output depend on its path
_PATH_FIELDS = ("exclude", "transpose", "layout", "matrix_axes")

Pos = tuple[int, ...]  # a stage's position: (i,) in the chain, (i, q) for stage q inside a Consensus at i


def _factories() -> dict[str, tuple[Callable[..., Any], Callable[..., tuple]]]:
    """Named methods: (the in-memory function, whose keywords and defaults the stream takes, its stages)."""
    from mergejax import merge as merge_mod, methods_sota as ms

    def della(density, epsilon, rescale, combine, layout):
        drop = Della(density, epsilon, rescale, layout)
        if combine not in ("ties", "task_arithmetic"):
            raise ValueError(f"combine must be 'ties' or 'task_arithmetic', got {combine!r}")
        return (drop, ElectSign(), DisjointMean()) if combine == "ties" else (drop, Sum())

    return {
        "pcb": (merge_mod.pcb, lambda ratio: (PCB(ratio),)),
        "tsv": (ms.tsv, lambda **kw: ms.tsv_chain(**kw).stages),
        "iso_c": (ms.iso_c, lambda **kw: ms.iso_c_chain(**kw).stages),
        "iso_cts": (ms.iso_cts, lambda **kw: ms.iso_cts_chain(**kw).stages),
        "wudi": (ms.wudi, lambda progress, **kw: ms.wudi_chain(progress=False, **kw).stages),  # the stream's bar
        "cart": (ms.cart, lambda **kw: ms.cart_chain(**kw).stages),
        "consensus_ta": (ms.consensus_ta, lambda lam, k: (Consensus(consensus_ta_stages(), lam, k),)),
        "consensus_ties": (ms.consensus_ties, lambda lam, k, density: (
            Consensus(consensus_ties_stages(density), lam, k),)),
        "della": (ms.della, della),
        "model_stock": (ms.model_stock, lambda: (ModelStock(),)),
    }


_NOT_HYPERPARAMETERS = {"base", "finetuned", "scale", "weights", "heads", "check_finite", "key", "donate"}


def _named_chain(method: str, hp: dict[str, Any]) -> tuple[Merger, float]:
    """The chain of a named method with the same stages and defaults as ``mergejax.<method>``, and its default
    lambda."""
    hp = dict(hp)
    factories = {"task_arithmetic": lambda: chain(Sum()), "ties": ties_chain, "dare": dare_chain,
                 "breadcrumbs": breadcrumbs_chain}
    sota = _factories()
    if method == "emr":
        raise ValueError("method emr cannot stream: its result is a unified task vector plus per-task masks and "
                         "rescalers (mergejax.emr), not one merged checkpoint")
    if method in sota:
        fn, build = sota[method]
        params = {n: p for n, p in inspect.signature(fn).parameters.items() if n not in _NOT_HYPERPARAMETERS}
        unknown = sorted(set(hp) - set(params))
        if unknown:
            raise ValueError(f"method {method} does not take: {', '.join(unknown)}")
        args = {n: hp.get(n, p.default) for n, p in params.items()}
        return chain(*build(**args)), float(inspect.signature(fn).parameters["scale"].default)
    if method not in factories:
        raise ValueError(
            f"method {method!r} cannot stream; use one of average, task_arithmetic, ties, dare, breadcrumbs, "
            f"{', '.join(sota)} or a mergejax.chain(...) of the stages listed in mergejax.stream's docstring"
        )
    params = inspect.signature(factories[method]).parameters
    unknown = sorted(set(hp) - set(params))
    if unknown:
        raise ValueError(f"method {method} does not take: {', '.join(unknown)}")
    return factories[method](**hp), 1.0


def _core(s: Any) -> Any:
    """The stage a per-task-weights wrapper (``PreWeighted``, from ``with_weights``) wraps, or the stage itself."""
    return s.inner if isinstance(s, PreWeighted) else s


def _has_host_stats(s: Any) -> bool:
    return all(hasattr(s, a) for a in ("host_stats", "stat_values", "apply_with"))


def _check_streamable(m: Merger) -> None:
    def ok(s: Any) -> bool:
        if isinstance(s, Consensus):
            return all(ok(t) and not isinstance(t, Consensus) for t in s.inner)
        return (isinstance(s, (Trim, ElectSign, DareDrop, LiNeS, Della, *_PER_LEAF, *_PER_MATRIX))
                or bool(getattr(s, "leafwise", False)) or _has_host_stats(s))

    for s in m.stages:
        if not ok(s):
            raise ValueError(
                f"stage {type(s).__name__} cannot stream: it needs whole-model data that is neither a per-tensor "
                "function nor a host_stats statistic (see mergejax.stream's docstring for the stages that stream)"
            )


def _positions(m: Merger) -> list[tuple[Pos, Any]]:
    """Every stage of the chain with its position, in execution order (a Consensus's inner stages before it)."""
    out: list[tuple[Pos, Any]] = []
    for si, s in enumerate(m.stages):
        if isinstance(s, Consensus):
            out += [((si, q), t) for q, t in enumerate(s.inner)]
        out.append(((si,), s))
    return out


def _tag(pos: Pos) -> str:
    return ".".join(str(p) for p in pos)


def _path_sensitive(m: Merger) -> list[Any]:
    return [s for _, s in _positions(m) if any(getattr(s, f, None) not in (None, ()) for f in _PATH_FIELDS)]


def _leaf_paths(m: Merger, names: Sequence[str]) -> dict[str, str]:
    """The key of each tensor's one-leaf tree: ``_LEAF`` unless a stage reads leaf paths (a regex, the Flax-kernel
    rule); then the first tensor name with the same answers to those stages' path rules, so each class of tensors
    compiles once and every stage sees a path that it treats as the tensor's own."""
    stages = _path_sensitive(m)
    if not stages:
        return {n: _LEAF for n in names}

    def features(name: str) -> tuple:
        out = []
        for s in stages:
            exclude = getattr(s, "exclude", None)
            out.append(None if exclude is None else re.search(exclude, name) is not None)
            if getattr(s, "layout", None) is not None:
                out.append(transposes(name, s.layout, getattr(s, "transpose", None)))
            rules = getattr(s, "matrix_axes", None) or ()
            out.append(next((q for q, (rx, _) in enumerate(rules) if re.search(rx, name)), None))
        return tuple(out)

    first: dict[tuple, str] = {}
    return {n: first.setdefault(features(n), n) for n in names}


_LEAF = "leaf"  # the one-leaf trees' key (a constant, so every tensor of a shape shares one compiled program)


def _only(tv: dict) -> tuple[str, jax.Array]:
    (item,) = tv.items()
    return item


def _raw_sign(s: ElectSign, tvs: tuple) -> jax.Array:
    """sgn(sum_t w_t tau_t) (or of the sign count) of one leaf, before the zero-sum rule (ElectSign's election)."""
    path = _only(tvs[0])[0]
    w = None if s.weights is None else per_leaf_weights(s.weights, tvs[0], len(tvs))[path]
    return jnp.sign(sign_mass([tv[path] for tv in tvs], s.method, w))


def _apply_stage(s: Any, pos: Pos, tvs: tuple, stats: dict, i: jax.Array, skey: jax.Array | None) -> tuple:
    """The stage at ``pos`` on the one-leaf task vectors ``tvs`` (float-leaf index ``i``, stage key ``skey``), with
    the whole-model statistics ``stats``."""
    tag = _tag(pos)
    if isinstance(s, Trim) and s.scope == "global":
        t = stats[f"trim{tag}"]
        return tuple({n: jnp.where(jnp.abs(x) >= t[j].astype(x.dtype), x, jnp.zeros_like(x)) for n, x in tv.items()}
                     for j, tv in enumerate(tvs))
    if isinstance(s, ElectSign):
        raw = _raw_sign(s, tvs)
        sign = jnp.where(raw == 0, stats[f"sign{tag}"].astype(raw.dtype), raw)
        return keep_agreeing(tvs, {_only(tvs[0])[0]: sign})
    if isinstance(s, DareDrop):
        return tuple({n: drop_and_rescale(x, leaf_keys(skey, t, i), s.drop_rate, s.rescale) for n, x in tv.items()}
                     for t, tv in enumerate(tvs))
    if isinstance(s, Della):  # MagPrune with this tensor's (task, float-leaf index) stream, as in memory
        if float(s.density) >= 1:
            return tuple(tvs)
        out = []
        for t, tv in enumerate(tvs):
            n, x = _only(tv)
            axis = 0 if (x.ndim == 2 and transposes(n, s.layout, s.transpose)) else -1
            u = jax.random.uniform(leaf_keys(skey, t, i), x.shape, x.dtype)
            out.append({n: della_prune(x, u, s.density, s.epsilon, axis=axis, rescale=s.rescale)})
        return tuple(out)
    if isinstance(s, LiNeS):  # this tensor's block (traced: one program for every block) from its name
        deep = stats[f"inblock{tag}"] & (s.num_blocks > 1)
        c = jnp.where(deep, s.alpha + s.beta * stats[f"block{tag}"] / max(s.num_blocks - 1, 1), s.alpha)
        return tuple({n: x * jnp.asarray(c, x.dtype) for n, x in tv.items()} for tv in tvs)
    if f"given{tag}" in stats:  # a host_stats stage (PCB): its statistics were computed in streaming passes
        return Given(s, stats[f"given{tag}"])(tvs, skey)
    core = _core(s)
    if isinstance(core, Consensus):  # tau_MTL by the inner stages (their statistics streamed), then Eq. 5
        if core is not s:
            tvs = scale_task_vectors(tvs, s.weights)
        (mtl,) = _run_stages(core.inner, pos, tvs, stats, i, skey)
        n, m = _only(mtl)
        keep = consensus_mask([_only(tv)[1] for tv in tvs], m, core.lam, int(core.k))
        return ({n: jnp.where(keep, m, jnp.zeros_like(m))},)
    with leaf_index(i):  # leafwise stages that draw per leaf see this tensor's float-leaf index
        return s(tvs, skey)


def _run_stages(stages: Sequence[Any], prefix: Pos, tvs: tuple, stats: dict, i, key) -> tuple:
    """``stages`` (at positions ``prefix + (q,)``) in order, stage q keyed by ``fold_in(key, q)`` (as
    ``mergejax.ops.base.run_stages``)."""
    for q, s in enumerate(stages):
        tvs = _apply_stage(s, (*prefix, q), tvs, stats, i, None if key is None else jax.random.fold_in(key, q))
    return tvs


def _leaf_stats(m: Merger, name: str) -> dict[str, jax.Array]:
    """Per-tensor inputs of the stages (LiNeS: the tensor's block), traced alongside the whole-model statistics."""
    out = {}
    for si, s in enumerate(m.stages):
        if isinstance(s, LiNeS):
            block = dict(s.blocks).get(name)
            out[f"block{si}"] = jnp.int32(0 if block is None else block)
            out[f"inblock{si}"] = jnp.bool_(block is not None)
    return out


def _check_lines(m: Merger, names: Sequence[str]) -> None:
    for s in m.stages:
        if isinstance(s, LiNeS):
            unknown = sorted({p for p, _ in s.blocks} - set(names))
            if unknown:
                raise ValueError(f"LiNeS block map names tensors that are not in the checkpoint: {unknown[:5]}")


class _TV(NamedTuple):
    """A fine-tuned input that is already a task vector tau_t (a ternary expert's decoded leaf), for the jitted
    programs (a pytree node: which inputs are task vectors is part of the traced structure)."""

    x: Any


def _tau(ft: Any, base: jax.Array) -> jax.Array:
    """tau_t of one leaf: ft - base in the accumulation dtype, or a task-vector input as is (as in memory)."""
    if isinstance(ft, _TV):
        return jnp.asarray(ft.x, acc_dtype(base.dtype)) if jnp.issubdtype(base.dtype, jnp.floating) else (
            jnp.zeros_like(base))
    return _leaf_task_vector(ft, base)


def _stage_at(m: Merger, pos: Pos) -> Any:
    s = m.stages[pos[0]]
    return s if len(pos) == 1 else _core(s).inner[pos[1]]


def _prefix_impl(m: Merger, upto: Pos, stats: dict, i, base, fts, key, weights, path: str) -> tuple:
    """The T one-leaf task vectors entering the stage at ``upto`` (the whole chain: ``(len(m.stages),)``)."""
    m = m.with_weights(weights)  # inside the jit, as the in-memory merge does
    tvs = tuple({path: _tau(ft, base)} for ft in fts)
    tvs = _run_stages(m.stages[: upto[0]], (), tvs, stats, i, key)
    if len(upto) > 1:  # inside the Consensus at upto[0]: its (weighted) inputs through its first inner stages
        s = m.stages[upto[0]]
        if _core(s) is not s:
            tvs = scale_task_vectors(tvs, s.weights)
        skey = None if key is None else jax.random.fold_in(key, upto[0])
        tvs = _run_stages(_core(s).inner[: upto[1]], upto[:1], tvs, stats, i, skey)
    return tvs


@functools.partial(jax.jit, static_argnums=1, static_argnames=("path",))  # the chain's data fields are traced
def _sign_counts(m: Merger, upto: Pos, stats: dict, i, base, fts, key, weights, n, path: str = _LEAF) -> jax.Array:
    """[#positive, #negative] raw elected signs of one unit at the ElectSign at ``upto`` (its first ``n`` entries;
    all with ``n=None``), counted on the device (the majority pass)."""
    tvs = _prefix_impl(m, upto, stats, i, base, fts, key, weights, path)
    raw = _raw_sign(_stage_at(m.with_weights(weights), upto), tvs).reshape(-1)
    valid = True if n is None else jnp.arange(raw.size) < n
    return jnp.stack([jnp.sum((raw > 0) & valid, dtype=jnp.int32), jnp.sum((raw < 0) & valid, dtype=jnp.int32)])


DEVICE_HISTOGRAM: bool | None = None
"""Where the global trim's 16-bit histograms are counted: ``True``: on the device (a jitted scatter-add per unit,
int32 bins; fast on GPU/TPU); ``False``: the device computes each entry's 16-bit digit (|x|'s bits, shifted and
filtered, fused with the task-vector program) and the host counts them with ``numpy.bincount`` (on CPU XLA's
scatter-add took 14 ns per entry, ``bincount`` of the uint16 digits about 2); ``None`` (default): the device unless
the backend is CPU. Both give the same counts."""


def use_device_histogram() -> bool:
    """Whether :func:`magnitude_digits` should count on the device (:data:`DEVICE_HISTOGRAM`, read at each call)."""
    return jax.default_backend() != "cpu" if DEVICE_HISTOGRAM is None else bool(DEVICE_HISTOGRAM)


@functools.partial(jax.jit, static_argnums=1, static_argnames=("shift", "filtered", "on_device", "path"))
def _trim_digits(m: Merger, upto: Pos, stats: dict, i, base, fts, key, weights, n, prefix, *, shift: int,
                 filtered: bool, on_device: bool, path: str = _LEAF) -> list:
    """Per task, the 16-bit histogram digits ``(bits(|tau|) >> shift) & 0xFFFF`` of one unit at the global Trim at
    ``upto``, over its first ``n`` entries (all with ``n=None``) whose higher bits equal ``prefix[t]`` when
    ``filtered``.

    Returns, per task, :func:`magnitude_digits` of tau_t there (for :func:`count_digits`).
    """
    out = []
    for t, tv in enumerate(_prefix_impl(m, upto, stats, i, base, fts, key, weights, path)):
        x = tv[path].reshape(-1)
        if x.dtype != jnp.float32:
            raise ValueError(f"streaming global trim supports float32 task vectors, got {x.dtype}")
        out.append(magnitude_digits(x, n, prefix[t], shift=shift, filtered=filtered, on_device=on_device))
    return out


def magnitude_digits(x: jax.Array, n: Any, prefix: jax.Array, *, shift: int, filtered: bool, on_device: bool
                     ) -> Any:
    """The 16-bit digits ``(bits(|x|) >> shift) & 0xFFFF`` of a float32 array (traced, inside a jitted program) over
    its first ``n`` entries (all with ``n=None``) whose higher bits equal ``prefix`` when ``filtered``: their int32
    histogram (``on_device``), else for :func:`count_digits` ``(digits as uint16, #entries left out)`` (their digit
    set to 0), or when ``filtered`` (a few entries kept) ``(digits, kept mask)``."""
    x = x.reshape(-1)
    bits = lax.bitcast_convert_type(jnp.abs(x), jnp.uint32)
    digit = (bits >> shift) & 0xFFFF
    valid = jnp.ones(x.shape, bool) if n is None else jnp.arange(x.size) < n
    if filtered:
        valid = valid & ((bits >> (shift + 16)) == prefix)
    if on_device:
        return jnp.zeros(1 << 16, jnp.int32).at[digit].add(valid.astype(jnp.int32))
    if filtered:
        return digit.astype(jnp.uint16), valid
    return jnp.where(valid, digit, 0).astype(jnp.uint16), jnp.sum(~valid, dtype=jnp.int32)


def count_digits(out: Any, on_device: bool) -> np.ndarray:
    """The int64 65536-bin histogram of :func:`magnitude_digits`'s result (the host counts the kept digits, or all
    digits less the left-out entries' digit 0)."""
    if on_device:
        return np.asarray(out).astype(np.int64)
    digits, rest = np.asarray(out[0]), np.asarray(out[1])
    if rest.dtype == np.bool_:
        return np.bincount(digits[rest], minlength=1 << 16)
    h = np.bincount(digits, minlength=1 << 16)
    h[0] -= int(rest)
    return h


def _digit_pass(scan: Callable, m: Merger, upto: Pos, T: int, p: int, prefix: list[int], desc: str) -> np.ndarray:
    """One histogram pass of the global Trim at ``upto`` (pass ``p``: bits ``31 - 16p .. 16 - 16p`` of |tau|, among
    the entries whose higher bits equal ``prefix``), over every unit ``scan`` runs: [T, 65536] int64 counts."""
    hist = np.zeros((T, 1 << 16), np.int64)
    on_device = use_device_histogram()
    g = functools.partial(_trim_digits, m, upto, shift=16 - 16 * p, filtered=p > 0, on_device=on_device)
    pre = jnp.asarray(np.asarray(prefix, np.uint32))

    def count(label: str, run: Callable) -> None:
        try:
            outs = run(g, pre)
        except ValueError as e:
            raise ValueError(f"tensor {label!r}: {e}") from None
        for t, o in enumerate(outs):
            hist[t] += count_digits(o, on_device)

    scan(count, desc)
    return hist


@functools.partial(jax.jit, static_argnums=1, static_argnames=("name", "mode", "path"))
def _stat_values(m: Merger, upto: Pos, stats: dict, i, base, fts, key, weights, given, *, name, mode: str,
                 path: str = _LEAF) -> Any:
    """One tensor's ``stat_values`` of the host_stats stage at ``upto``: as is (``mode="value"``) or as ordered
    keys, of |x| with ``mode="abs"`` (``mergejax.ops.select.ordered_key``, for the order statistics)."""
    tvs = _prefix_impl(m, upto, stats, i, base, fts, key, weights, path)
    with leaf_index(i):
        values = _stage_at(m.with_weights(weights), upto).stat_values(tvs, name, given)
    if mode == "value":
        return values
    return [ordered_key(jnp.abs(v) if mode == "abs" else v) for v in values]


@functools.partial(jax.jit, static_argnames=("path",))
def _merge_leaf(m: Merger, stats: dict, i, base, fts, key, weights, scale, path: str = _LEAF):
    """theta_0 + scale * (the chain on one tensor), in the base's dtype: the in-memory merge's per-leaf program."""
    (merged,) = _prefix_impl(m, (len(m.stages),), stats, i, base, fts, key, weights, path)
    return _leaf_apply(base, merged[path], scale)


class _StreamRunner:
    """The ``host_stats(run)`` protocol of a stage (what :class:`mergejax.ops.schedule.Runner` offers in memory)
    over checkpoints on disk: every call is one or more streaming passes over the stage's input, tensor by tensor.

    ``kth`` is exact: the ordered keys' bits are histogrammed 16 at a time from the top (two passes for float32),
    each pass narrowing to the bin that holds the k-th largest, so it returns exactly the k-th largest key, as the
    in-memory search does.
    """

    def __init__(self, scan: Callable[..., None], n: int, n_tasks: int, desc: str):
        """Args:
          scan: ``scan(f, desc, name, given, mode)`` calls ``f(tensor name, values)`` for every tensor, ``values``
            being ``stat_values(tvs, name, given)`` there (``mode="value"``) or their ordered keys (``"key"``, of
            |x| with ``"abs"``).
          n: float entries per task over the merged tensors.
          n_tasks: T.
          desc: progress label.
        """
        self._scan, self.n, self.n_tasks, self._desc = scan, n, n_tasks, desc

    def _fold(self, name: Any, given: Any, combine: Callable[[Any, Any], Any], what: str) -> Any:
        acc = None

        def f(label: str, values: Any) -> None:
            nonlocal acc
            acc = values if acc is None else jax.tree_util.tree_map(combine, acc, values)

        self._scan(f, f"{self._desc}: {what} {name}", name, given, "value")
        return acc

    def total(self, name: Any, given: Any = None) -> Any:
        """The sum over tensors of ``stat_values`` (int64 for integers: exact; float64 otherwise)."""
        def wide(x: Any) -> np.ndarray:
            x = np.asarray(x)
            return x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64)

        return self._fold(name, given, lambda a, b: wide(a) + wide(b), "total")

    def maximum(self, name: Any, given: Any = None) -> Any:
        """The elementwise maximum over tensors of ``stat_values``."""
        return self._fold(name, given, lambda a, b: np.maximum(np.asarray(a), np.asarray(b)), "maximum")

    def kth(self, name: Any, ks: Sequence[int], *, magnitude: bool = False, given: Any = None) -> jax.Array:
        """Per value group g (``stat_values`` returns G arrays per tensor), the exact ks[g]-th largest ordered key
        over the whole model (of |x| with ``magnitude``), as ``mergejax.ops.select`` keys."""
        mode = "abs" if magnitude else "key"
        nbits = None

        def scan(f: Callable[[str, list[np.ndarray]], None], desc: str) -> None:
            def g(label: str, keys: Any) -> None:
                nonlocal nbits
                nbits = 8 * np.asarray(keys[0]).dtype.itemsize
                f(label, [np.asarray(k) for k in keys])

            self._scan(g, desc, name, given, mode)

        keys = _kth_keys(scan, list(ks), f"{self._desc}: kth {name}", lambda: nbits)
        return jnp.asarray(np.asarray(keys, np.uint64 if nbits == 64 else np.uint32))

    def kth_by_leaf(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("a per-tensor statistic (kth_by_leaf) does not stream as a host_stats pass; the stage "
                         "runs on each tensor itself")

    @property
    def plan(self) -> Any:
        raise ValueError("this stage's host_stats reads the in-memory leaf plan (run.plan): it cannot stream")


def _encode(x: Any) -> Any:
    """A host_stats result (nested tuples/lists/dicts of arrays, None) as JSON for the state file (exact)."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return {"seq": [_encode(v) for v in x]}
    if isinstance(x, dict):
        return {"map": {str(k): _encode(v) for k, v in x.items()}}
    a = np.asarray(x)
    return {"array": a.tolist(), "dtype": a.dtype.name}


def _decode(x: Any) -> Any:
    if x is None:
        return None
    if "seq" in x:
        return tuple(_decode(v) for v in x["seq"])
    if "map" in x:
        return {k: _decode(v) for k, v in x["map"].items()}
    return jnp.asarray(np.asarray(x["array"], np.dtype(x["dtype"])))

def _hist_select(counts: np.ndarray, k: int) -> tuple[int, int]:
    """(bin, rank within it) of the k-th largest entry given per-bin counts (bin = high bits, larger bin = larger)."""
    above = np.cumsum(counts[::-1])  # above[j] = entries in the top j+1 bins
    j = int(np.searchsorted(above, k))  # first j with above[j] >= k
    b = len(counts) - 1 - j
    return b, k - (int(above[j - 1]) if j > 0 else 0)


def _elementwise(m: Merger) -> bool:
    """Whether every stage of ``m`` maps coordinates independently (given the whole-model statistics), so the chain
    may run on flat chunks that cut and join tensors: the reductions, ``ElectSign`` and the global ``Trim``."""
    for s in m.stages:
        if isinstance(getattr(s, "weights", None), dict):  # per-leaf weights are looked up by leaf name
            return False
        if not (isinstance(s, _ELEMENTWISE) or (isinstance(s, Trim) and s.scope == "global")):
            return False
    return True


def merge(
    base: str | os.PathLike[str],
    finetuned: Sequence[str | os.PathLike[str]],
    method: str | Merger,
    out: str | os.PathLike[str],
    *,
    scale: float | None = None,
    weights: Sequence[float] | None = None,
    key: jax.Array | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    prefetch: bool = True,
    readahead: int | str = READAHEAD,
    chunk: int | str = CHUNK,
    heads: str | None = None,
    out_format: str = "safetensors",
    **hyperparameters: Any,
) -> Path:
    """Streams a merge of checkpoints on disk into a sharded safetensors checkpoint ``out``.

    Chains whose stages all act coordinate by coordinate (``average``, ``task_arithmetic``, ``ties`` with the global
    trim, any chain of Trim(scope="global"), ElectSign and the Sum/Mean/Disjoint*/WeightedSum reductions) run over
    flat chunks of ``chunk`` bytes that join small tensors and cut large ones, so host memory stays about
    (2T + 5) chunks whatever the tensor sizes and the program compiles once per dtype (and chunk-size bucket), not
    once per tensor shape. Other chains (``dare``, ``breadcrumbs``, per-tensor trims) run tensor by tensor (peak
    about (T + 2) x the largest tensor + ``readahead``).

    Args:
      base: the pre-trained checkpoint (a safetensors file, a directory, or a sharded directory with an index);
        ignored by ``method="average"``, which averages ``finetuned``.
      finetuned: the fine-tuned checkpoints, with the base's tensor names and shapes.
      method: ``"average"``, ``"task_arithmetic"``, ``"ties"``, ``"dare"``, ``"breadcrumbs"``, ``"pcb"`` or a SOTA
        data-free method (``"tsv"``, ``"iso_c"``, ``"iso_cts"``, ``"cart"``, ``"wudi"``, ``"consensus_ta"``,
        ``"consensus_ties"``, ``"della"``, ``"model_stock"``), with the stages, hyperparameters and defaults of
        ``mergejax.<method>`` (module docstring: how each streams), or a :class:`mergejax.Merger`.
      out: output directory; rerunning the same merge into it resumes an interrupted run.
      scale: lambda (default: the named method's: 1.0, PCB's 1.2).
      weights: T per-task weights, as ``weights=`` of the in-memory methods (each stage's ``with_weights``).
      key: ``jax.random`` key (DARE).
      max_shard_size: shard size limit of the output ("5GB" or bytes).
      progress: tqdm bars over the bytes read, with throughput (process 0).
      prefetch: overlap reading the next inputs with merging and writing the current ones.
      readahead: at most this many bytes of inputs read ahead ("256MB" or bytes).
      chunk: the flat chunk of the elementwise chains, in bytes of a float32 input buffer ("16MiB" or bytes).
      out_format: ``"safetensors"`` (Hugging Face shards + index) or ``"orbax"``: one orbax checkpoint per output
        shard, each written as soon as its tensors are merged (host memory then also holds one output shard:
        choose ``max_shard_size``), with ``orbax.index.json``; :func:`open_source` and :func:`load_sharded` read it.
      heads: a regular expression searched in tensor names: the tensors it matches stay per task (base + sum_t
        tau_t) and no stage sees them (they count in no global statistic), as ``heads=`` in memory.
      **hyperparameters: the named method's keywords (density, scope, drop_rate, beta, ...).

    Returns:
      ``out``. The tensors equal ``method`` applied in memory to the dict ``{name: tensor}`` of each checkpoint.
    """
    elements = max(1, parse_size(chunk) // 4)
    common = dict(max_shard_size=max_shard_size, progress=progress, prefetch=prefetch, readahead=readahead,
                  out_format=out_format)
    if method == "average":
        if hyperparameters or scale is not None:
            raise ValueError("method average takes no hyperparameters")

        def avg(name: str, b: Any, fts: list[np.ndarray]) -> np.ndarray:
            dev = [_dev(x) for x in fts]
            return np.asarray(jax.block_until_ready(_average_jit(tuple({name: x} for x in dev))[name]))

        inp = _Inputs(None, finetuned)
        if any(inp.task_vector):
            inp.close()
            raise ValueError("method average takes fine-tuned checkpoints, not task vectors (ternary experts)")
        try:
            chunked = _Chunked(lambda dev, _: _average_jit(tuple({_LEAF: x} for x in dev))[_LEAF],
                               lambda name: inp.sources[0].read(name), elements)
            return merge_tensors(avg, None, finetuned, out, fingerprint="average", inputs=inp, chunked=chunked,
                                 **common)
        finally:
            inp.close()
    if isinstance(method, Merger):
        if hyperparameters:
            raise ValueError(f"hyperparameters {sorted(hyperparameters)} apply to named methods only")
        m, fp_name, default_scale = method, repr(method), 1.0
    else:
        (m, default_scale), fp_name = _named_chain(method, hyperparameters), method
    _check_streamable(m)
    m._check_key(key)
    if any(isinstance(s, ModelStock) for s in m.stages) and len(finetuned) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models, got {len(finetuned)}")
    lam = jnp.asarray(default_scale if scale is None else scale, jnp.float32)
    raw_key = None if key is None else jax.random.key_data(key)
    fp_weights = None
    if weights is not None:
        fp_weights = [float(w) for w in weights]
        if len(fp_weights) != len(finetuned):
            raise ValueError(f"weights has {len(fp_weights)} entries for {len(finetuned)} fine-tuned models")
        weights = jnp.asarray(fp_weights, jnp.float32)  # as the in-memory merge passes them (a [T] float32 array)
    fingerprint = json.dumps([fp_name, repr(m), float(lam), fp_weights,
                              None if raw_key is None else np.asarray(raw_key).tolist(), heads])
    stats: dict[str, jax.Array] = {}
    index: dict[str, int] = {}
    flat = _elementwise(m)
    zero = jnp.int32(0)

    def call(g: Callable, i: jax.Array, b: np.ndarray, fts: Sequence[np.ndarray], *extra: Any,
             name: str | None = None) -> Any:
        """``g(stats, i, base, fts, key, weights, *extra)`` on zero-copy device views of the host buffers, finished
        before the views are dropped (dropped on XLA's thread, a view would free its buffer only at the next
        garbage collection)."""
        bd, fd = _dev(b), inp.wrap(_dev(x) for x in fts)
        leaf = {} if name is None else _leaf_stats(m, name)
        kw = {} if name is None else {"path": paths[name]}
        out = jax.block_until_ready(g({**stats, **leaf}, i, bd, fd, key, weights, *extra, **kw))
        del bd, fd
        return out

    def run_passes(state: _State, inp: _Inputs) -> None:
        names = [n for n in inp.names if _is_float(inp.infos[n].dtype) and n not in head]
        index.update({n: j for j, n in enumerate(names)})  # the float-leaf index keying DARE's masks in memory
        budget = parse_size(readahead) if prefetch else 0
        if flat:
            units = [c for c in _plan_chunks(names, inp, elements) if isinstance(c, _Chunk)]
            reader = _ChunkReader(inp)
            ahead = min(budget, max((_chunk_bytes(c) for c in units), default=0))

            def scan(f: Callable[[str, Callable], None], desc: str) -> None:
                bar = _progress(sum(c.size * sum(d.itemsize for d in c.dtypes) for c in units), progress, desc)
                with _chunk_allocations(max((_chunk_bytes(c) for c in units), default=0) // len(inp.sources)):
                    for c, bufs in _pipelined(units, reader.read, ahead, _chunk_bytes):
                        def run(g: Callable, *extra: Any, bufs: list = bufs, n: jax.Array = jnp.int32(c.size)) -> Any:
                            return call(g, zero, bufs[0], bufs[1:], n, *extra)  # n: the chunk's unpadded size

                        f(c.segments[0][0], run)
                        reader.recycle(bufs)  # f has consumed the program's (finished) results
                        del bufs
                        if bar is not None:
                            bar.update(c.size * sum(d.itemsize for d in c.dtypes))
                        _release_views()
                if bar is not None:
                    bar.close()
        else:
            def size(n: str) -> int:
                return inp.infos[n].nbytes * len(inp.sources)

            def scan(f: Callable[[str, Callable], None], desc: str) -> None:
                bar = _progress(sum(size(n) for n in names), progress, desc)
                for n, (b, fts) in _pipelined(names, inp.read, budget, size):
                    def run(g: Callable, *extra: Any, n: str = n, b: np.ndarray = b, fts: list = fts) -> Any:
                        return call(g, jnp.int32(index[n]), b, fts, None, *extra, name=n)

                    f(n, run)
                    if bar is not None:
                        bar.update(size(n))
                    _release_views()
                if bar is not None:
                    bar.close()

        T = len(inp.sources) - 1
        n_float = sum(int(np.prod(inp.infos[n].shape)) for n in names)
        for pos, s in _positions(m):  # in chain order: a statistic's pass uses the earlier ones
            tag = _tag(pos)
            if isinstance(s, Trim) and s.scope == "global":
                dens = s.density if isinstance(s.density, (tuple, list)) else (s.density,) * T
                ks = [rank_from_fraction(d, n_float) for d in dens]
                value = state.stat(f"trim{tag}", lambda: _global_thresholds(
                    functools.partial(_digit_pass, scan, m, pos, T), ks, f"trim (stage {tag})"))
                stats[f"trim{tag}"] = jnp.asarray(value, jnp.float32)
            elif isinstance(s, ElectSign):
                counts = functools.partial(_sign_counts, m, pos)
                value = state.stat(f"sign{tag}", lambda: _majority_sign(
                    lambda f, d: scan(lambda label, run: f(run(counts)), d), f"sign (stage {tag})"))
                stats[f"sign{tag}"] = jnp.asarray(value, jnp.int32)
            elif _has_host_stats(s) and not isinstance(s, Trim):  # PCB: the stage's own statistics, streamed
                def stat_scan(f: Callable[[str, Any], None], desc: str, name: Any, given: Any, mode: str,
                              pos: Pos = pos) -> None:
                    def prog(st, i, b, fts, k, w, n, path=_LEAF):
                        return _stat_values(m, pos, st, i, b, fts, k, w, given, name=name, mode=mode, path=path)

                    scan(lambda label, run: f(label, jax.device_get(run(prog))), desc)

                runner = _StreamRunner(stat_scan, n_float, T, f"stage {tag}")
                value = state.stat(f"given{tag}", lambda: _encode(s.host_stats(runner)))
                stats[f"given{tag}"] = _decode(value)

    def fn(name: str, b: np.ndarray | None, fts: list[np.ndarray]) -> np.ndarray:
        if not _is_float(b.dtype):
            return b
        if name in head:
            bd, fd = _dev(b), inp.wrap(_dev(x) for x in fts)
            return np.asarray(jax.block_until_ready(_head_leaf(bd, fd)))
        return np.asarray(call(functools.partial(_merge_leaf, m), jnp.int32(index[name]), b, fts, lam, name=name))

    inp = _Inputs(base, finetuned)
    try:
        head = _head_names(inp.names, heads)
        paths = _leaf_paths(m, inp.names)
        _check_lines(m, inp.names)
        chunked = None
        if flat:
            def whole(name: str) -> np.ndarray:
                if name in head:
                    return fn(name, *inp.read(name))
                b = inp.sources[0].read(name)
                return b if not _is_float(b.dtype) else np.zeros(b.shape, b.dtype)  # an empty float tensor

            chunked = _Chunked(lambda dev, _: _merge_leaf(m, dict(stats), zero, dev[0], inp.wrap(dev[1:]), key,
                                                           weights, lam),
                               whole, elements, frozenset(head))
        return merge_tensors(fn, base, finetuned, out, fingerprint=fingerprint, state_hook=run_passes, inputs=inp,
                             chunked=chunked, **common)
    finally:
        inp.close()


def _head_names(names: Sequence[str], heads: str | None) -> set[str]:
    """The float tensors whose names ``heads`` (a regular expression) matches, as ``tree.head_flags``."""
    if heads is None:
        return set()
    if not isinstance(heads, str):
        raise ValueError(f"streaming heads= takes a regular expression over tensor names, got {type(heads).__name__}")
    pattern = re.compile(heads)
    found = {n for n in names if pattern.search(n)}
    if not found:
        raise ValueError(f"heads pattern {heads!r} matches no tensor name; names look like {list(names)[:6]}")
    return found


@jax.jit
def _head_leaf(base: jax.Array, fts: tuple) -> jax.Array:
    """A head tensor: theta_0 + sum_t tau_t in the base's dtype (``merge.assemble``'s head leaves)."""
    dt = acc_dtype(base.dtype)
    return (jnp.asarray(base, dt) + sum(_tau(ft, base) for ft in fts)).astype(base.dtype)


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


Scan = Callable[[Callable[..., None], str], None]
CountPass = Callable[[int, list[int], str], np.ndarray]
"""``count_pass(p, prefix, desc)`` of :func:`histogram_select`: pass p's [G, 65536] int64 counts."""


def histogram_select(count_pass: CountPass, ks: list[int], width: Callable[[], int], desc: str) -> list[int]:
    """Per group g, the exact ks[g]-th largest of unsigned integer keys (ties counted with multiplicity), 16 bits per
    pass from the top (radix select over 65536-bin histograms; two passes for 32-bit keys).

    Args:
      count_pass: ``count_pass(p, prefix, desc)``: the [G, 65536] int64 counts of the next 16 bits of the keys
        whose higher bits equal ``prefix[g]`` (the bits chosen so far); for float32 magnitudes,
        :func:`magnitude_digits` with ``shift=16 - 16 * p, filtered=p > 0`` then :func:`count_digits`.
      ks: 1 <= k_g <= the group's number of keys.
      width: the keys' width in bits, called after each pass (it may be known only once the first has run).
      desc: progress bar label (``count_pass`` gets ``"{desc} pass {p + 1}"``).

    Returns:
      The G keys (for float32 magnitudes, ``np.asarray(keys, np.uint32).view(np.float32)`` are the values).
    """
    prefix, rank = [0] * len(ks), list(ks)
    p = 0
    while p == 0 or 16 * p < width():
        hist = count_pass(p, prefix, f"{desc} pass {p + 1}")
        for g in range(len(ks)):
            b, rank[g] = _hist_select(hist[g], rank[g])
            prefix[g] = (prefix[g] << 16) | b
        p += 1
    return prefix


def _kth_keys(scan: Scan, ks: list[int], desc: str, nbits: Callable[[], int | None] | int = 32) -> list[int]:
    """Per group g, the exact ks[g]-th largest of unsigned integer keys counted on the host (:func:`histogram_select`).

    Args:
      scan: ``scan(f, desc)`` calls ``f(label, keys)`` for every unit of the model (a tensor or a flat chunk;
        ``keys`` are the G groups' keys there, ``label`` names it in errors).
      ks: 1 <= k_g <= the group's size.
      desc: progress bar label.
      nbits: the keys' width (32 or 64), or a callable giving it once the first pass has seen them.

    Returns:
      The G keys.
    """
    G = len(ks)
    width = nbits if isinstance(nbits, int) else None

    def count_pass(p: int, prefix: list[int], d: str) -> np.ndarray:
        hist = np.zeros((G, 1 << 16), np.int64)

        def count(label: str, keys: list[np.ndarray]) -> None:
            nonlocal width
            for g, key in enumerate(keys):
                key = np.asarray(key).reshape(-1)
                if width is None:
                    width = 8 * key.dtype.itemsize
                shift = width - 16 * (p + 1)
                if p:
                    key = key[(key >> (shift + 16)) == prefix[g]]
                hist[g] += np.bincount(((key >> shift) & 0xFFFF).astype(np.intp), minlength=1 << 16)

        scan(count, d)
        if width is None:  # no unit at all
            raise ValueError(f"{desc}: the model has no float tensor to rank")
        return hist

    return histogram_select(count_pass, ks, lambda: width, desc)


def _global_thresholds(count_pass: CountPass, ks: list[int], desc: str) -> list[float]:
    """Per task t, the exact k_t-th largest |x| over every float tensor (k = 0 gives +inf: nothing kept).

    The bits of a non-negative float32 order like the float, so :func:`histogram_select` on them (two passes) gives it.

    Args:
      count_pass: ``count_pass(p, prefix, desc)``: the [T, 65536] histogram of pass p over the model
        (:func:`_digit_pass`).
      ks: k_t per task.
      desc: progress bar label.

    Returns:
      The T thresholds.
    """
    T = len(ks)
    if not any(ks):
        return [float("inf")] * T
    keys = histogram_select(count_pass, [max(k, 1) for k in ks], lambda: 32, desc)
    values = np.asarray(keys, np.uint32).view(np.float32)
    return [float(v) if k > 0 else float("inf") for v, k in zip(values, ks)]


def _majority_sign(scan: Scan, desc: str) -> int:
    """sgn(#positive - #negative elected signs) over the whole model: ElectSign's rule for zero sums.

    Args:
      scan: ``scan(f, desc)`` calls ``f(counts)`` with [#positive, #negative] raw elected signs of every unit of the
        model (:func:`_sign_counts`).
      desc: progress bar label.

    Returns:
      -1, 0 or 1.
    """
    pos = neg = 0

    def count(counts: Any) -> None:
        nonlocal pos, neg
        c = np.asarray(counts)
        pos += int(c[0])
        neg += int(c[1])

    scan(count, desc)
    return int(np.sign(pos - neg))


# ---------------------------------------------------------------------------------------------------------------
# sharded loading (one process or many)


def load_sharded(
    path: str | os.PathLike[str],
    shardings: Callable[[str, TensorInfo], jax.sharding.Sharding] | jax.sharding.Mesh,
) -> dict[str, jax.Array]:
    """A checkpoint as global ``jax.Array`` s, each process reading only the slices its own devices hold.

    Every tensor is built with ``jax.make_array_from_callback``: the callback reads one device's index with
    ``read_slice`` (safetensors: only that tensor's byte range is mapped), so with ``jax.distributed`` a process
    never reads the other processes' shards. Call it in every process with the same arguments.

    Args:
      path: a safetensors file or directory (sharded or not), or an orbax directory (read whole per leaf).
      shardings: ``fn(name, info) -> Sharding``, or a mesh (each leaf sharded by ``mergejax.sharding.default_rules``
        along the mesh's first axis).

    Returns:
      name -> global array, in the checkpoint's flattening order (sorted names for safetensors).
    """
    from mergejax.sharding import default_rules

    if isinstance(shardings, jax.sharding.Mesh):
        mesh = shardings
        axis = mesh.axis_names[0]

        def pick(name: str, info: TensorInfo) -> jax.sharding.Sharding:
            return default_rules(jax.ShapeDtypeStruct(info.shape, info.dtype), mesh, axis)

        shardings = pick
    src = open_source(path)
    try:
        names = list(src.keys()) if getattr(src, "ordered", False) else sorted(src.keys())
        out = {}
        for name in names:
            info = src.info(name)
            out[name] = jax.make_array_from_callback(
                info.shape, shardings(name, info), lambda idx, n=name: src.read_slice(n, idx), dtype=info.dtype
            )
        return out
    finally:
        src.close()
