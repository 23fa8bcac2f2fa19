"""Streaming, out-of-core merges: checkpoints on disk in, a sharded safetensors checkpoint out, one tensor at a time.

:func:`merge` runs a mergejax method (``task_arithmetic``, ``ties``, ``dare``, ``breadcrumbs``, ``pcb``, ``average``,
or any :class:`mergejax.Merger`) over Hugging Face safetensors directories (sharded with an index or not) and writes
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` (config.json and tokenizer files copied from
the base). Each tensor is read, merged by the same jitted stages as the in-memory merge, and written, so host memory
holds about T + 2 tensors at a time (plus the merge's own float32 intermediates of one tensor).

Operators with a whole-model quantity are computed exactly in streaming passes before the merge pass:

- ``Trim(scope="global")`` (TIES's global top-k): per task, the k-th largest |tau| over all float tensors, by a
  65536-bin histogram of the high 16 bits of the float32 magnitudes (pass 1), then of the low 16 bits inside the
  bin holding the k-th largest (pass 2); the result is the exact k-th largest value, as in memory;
- ``ElectSign``'s zero-sum rule (the sign of the model-wide total of elected signs): one counting pass.

The merged tensors equal :func:`mergejax.chain` on the whole model loaded in memory (float32 task vectors), bit for
bit for the deterministic methods and for DARE (its masks are keyed by (task, leaf index) in both, leaves taken in
sorted name order, which is how JAX flattens a dict).

Interruptions: shards are written under a temporary name and renamed when complete, and a small state file records
the finished shards and the global statistics; rerunning the same merge into the same directory skips them. Progress
(a tqdm bar over bytes read, with the read throughput) and logging come from process 0 only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.convert.io import SAFE_INDEX, LazyTensor, TensorInfo, open_checkpoint, parse_size, write_safetensors

__all__ = ["merge", "merge_tensors", "STATE_FILE", "COPIED_FILES"]

STATE_FILE = ".mergejax-stream.json"
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


class _Inputs:
    """The base (optional) and the fine-tuned checkpoints, checked to hold the same names, shapes and dtypes."""

    def __init__(self, base: str | os.PathLike[str] | None, finetuned: Sequence[str | os.PathLike[str]]):
        if not finetuned:
            raise ValueError("finetuned is empty: need at least one checkpoint")
        self.paths = [base, *finetuned] if base is not None else list(finetuned)
        self.has_base = base is not None
        self.sources = [open_checkpoint(p) for p in self.paths]
        ref = self.sources[0]
        self.names = sorted(ref.keys())
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

    def read(self, name: str) -> tuple[np.ndarray | None, list[np.ndarray]]:
        arrays = [s.read(name) for s in self.sources]
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
        elif out.exists() and any(p.suffix == ".safetensors" for p in out.iterdir()):
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
    inputs: _Inputs | None = None,
    state_hook: Callable[["_State", "_Inputs"], None] | None = None,
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
      inputs, state_hook: internal (:func:`merge` runs its statistic passes in ``state_hook``).

    Returns:
      ``out`` as a Path.
    """
    out = Path(out)
    inp = inputs or _Inputs(base, finetuned)
    try:
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
        t0, nbytes = time.perf_counter(), 0

        def fetch(name: str) -> np.ndarray:
            nonlocal nbytes
            b, fts = inp.read(name)
            merged = np.asarray(fn(name, b, fts))
            if merged.shape != infos[name].shape or merged.dtype != infos[name].dtype:
                raise ValueError(
                    f"tensor {name!r}: merge produced {merged.shape} {merged.dtype}, expected "
                    f"{infos[name].shape} {infos[name].dtype}"
                )
            step = inp.infos[name].nbytes * len(inp.sources)
            nbytes += step
            if bar is not None:
                bar.update(step)
            return merged

        for i in todo:
            names = plan[i]
            if jax.process_index() == 0:
                tensors = [LazyTensor(n, infos[n], lambda n=n: fetch(n)) for n in names]
                write_safetensors(out / _shard_name(i, len(plan)), tensors, metadata={"format": "pt"})
            state.mark(i)
        if bar is not None:
            bar.close()
        if jax.process_index() == 0:
            if len(plan) > 1:
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
            if nbytes:
                _log(f"merged {len(inp.names)} tensors, read {nbytes / 2**20:.1f} MiB in {dt:.1f} s "
                     f"({nbytes / 2**20 / max(dt, 1e-9):.1f} MiB/s) -> {out}")
        return out
    finally:
        if inputs is None:
            inp.close()
