"""torch state dicts <-> Flax variable trees, driven by a rule table (:mod:`mergejax.convert.rules`).

``torch_to_flax`` reads one tensor at a time from a :class:`~mergejax.convert.io.TensorSource`, changes its layout and
places it (on the default device, or straight onto a mesh with ``jax.make_array_from_callback`` so that each device
reads only its own slice). ``flax_to_torch`` goes back, lazily, so the writers fetch one leaf at a time. A
:class:`ConversionRecord` keeps what the Flax tree cannot (the torch key order and the dropped buffers), which makes
the round trip torch -> Flax -> torch bit-exact: same names, order, shapes, dtypes and values.

Peak host memory of ``torch_to_flax``: the output leaves plus one source tensor (two for a transposed leaf: the read
buffer and its transposed copy). Peak of ``flax_to_torch`` + a writer: one leaf.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mergejax.convert.io import DictSource, LazyTensor, TensorInfo, TensorSource, open_checkpoint
from mergejax.convert.rules import Layout, RuleSet, get_rules
from mergejax.tree import paths_and_leaves

__all__ = [
    "ConversionReport",
    "ConversionError",
    "ConversionRecord",
    "torch_to_flax",
    "flax_to_torch",
    "flax_to_state_dict",
    "unflatten",
]

Sharding = jax.sharding.Sharding
ShardingSpec = Sharding | Callable[[str, tuple[int, ...]], Sharding | None] | Mapping[str, Any] | None


@dataclasses.dataclass
class ConversionReport:
    """Everything that did not line up, gathered over the whole checkpoint before anything is raised.

    Attributes:
      unexpected: source keys (or Flax paths, going back) that no rule maps.
      missing: names the target expects that the source does not provide.
      mismatched: ``(name, source shape, expected shape)`` for leaves whose shapes disagree.
      duplicates: target names that two source keys map to.
    """

    unexpected: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    duplicates: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unexpected or self.missing or self.mismatched or self.duplicates)

    def format(self) -> str:
        """A readable multi-line summary (empty when everything matched)."""
        lines = []
        if self.unexpected:
            lines.append(f"unexpected keys (no rule maps them, or not in the target) [{len(self.unexpected)}]: " + ", ".join(self.unexpected))
        if self.missing:
            lines.append(f"missing keys [{len(self.missing)}]: " + ", ".join(self.missing))
        if self.mismatched:
            lines.append(
                f"shape mismatches [{len(self.mismatched)}]: "
                + ", ".join(f"{n}: source {s} vs expected {e}" for n, s, e in self.mismatched)
            )
        if self.duplicates:
            lines.append(f"targets written by several keys [{len(self.duplicates)}]: " + ", ".join(self.duplicates))
        return "\n".join(lines)


class ConversionError(ValueError):
    """Raised (in strict mode) with every unexpected, missing and mismatched key at once."""

    def __init__(self, what: str, report: ConversionReport):
        super().__init__(f"{what}:\n{report.format()}")
        self.report = report


def _settle(report: ConversionReport, strict: bool, what: str) -> None:
    if not report:
        return
    if strict:
        raise ConversionError(what, report)
    warnings.warn(f"{what} (strict=False, going on):\n{report.format()}", stacklevel=3)


@dataclasses.dataclass
class ConversionRecord:
    """What the reverse conversion needs to rebuild the source exactly.

    Attributes:
      rules: name of the rule set used.
      torch_keys: the source's keys in their original order (dropped buffers included).
      dropped: the values of the buffers the Flax tree leaves out (``position_ids``, ``num_batches_tracked``).
      report: what did not line up (non-empty only when converted with ``strict=False``).
    """

    rules: str
    torch_keys: list[str]
    dropped: dict[str, np.ndarray]
    report: ConversionReport = dataclasses.field(default_factory=ConversionReport)

    def to_json(self) -> str:
        """Serialise (dropped buffers as base64 of their raw bytes, so values survive exactly)."""
        dropped = {
            k: {"dtype": str(v.dtype), "shape": list(v.shape), "data": base64.b64encode(v.tobytes()).decode()}
            for k, v in self.dropped.items()
        }
        return json.dumps({"rules": self.rules, "torch_keys": self.torch_keys, "dropped": dropped}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ConversionRecord:
        raw = json.loads(text)
        dropped = {
            k: np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
            for k, v in raw["dropped"].items()
        }
        return cls(raw["rules"], list(raw["torch_keys"]), dropped)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"params/a/kernel": x}`` -> ``{"params": {"a": {"kernel": x}}}``."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through a leaf at {part!r}")
        if last in node:
            raise ValueError(f"path {path!r} given twice")
        node[last] = leaf
    return tree


def _as_source(source: str | os.PathLike[str] | TensorSource | Mapping[str, Any]) -> tuple[TensorSource, bool]:
    if isinstance(source, (str, os.PathLike)):
        return open_checkpoint(source), True
    if isinstance(source, Mapping):
        return DictSource(source), False
    return source, False


def _sharding_for(spec: ShardingSpec, path: str, shape: tuple[int, ...]) -> Sharding | None:
    if spec is None or isinstance(spec, Sharding):
        return spec
    if callable(spec):
        return spec(path, shape)
    return dict(paths_and_leaves(spec)).get(path)


def _flax_index_to_torch(index: tuple[Any, ...], perm: tuple[int, ...]) -> tuple[slice, ...]:
    torch_index: list[Any] = [slice(None)] * len(perm)
    for flax_axis, torch_axis in enumerate(perm):
        torch_index[torch_axis] = index[flax_axis] if flax_axis < len(index) else slice(None)
    return tuple(torch_index)


def _check_placeable(key: str, info: TensorInfo, as_numpy: bool) -> None:
    if not as_numpy and info.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{key}: {info.dtype} {info.shape} would be cast down to 32 bits by JAX; enable jax_enable_x64, pass "
            "as_numpy=True, or add a DropRule for this buffer"
        )


def torch_to_flax(
    source: str | os.PathLike[str] | TensorSource | Mapping[str, Any],
    rules: str | RuleSet = "generic",
    *,
    target: Any = None,
    strict: bool = True,
    sharding: ShardingSpec = None,
    as_numpy: bool = False,
) -> tuple[dict[str, Any], ConversionRecord]:
    """Convert a torch checkpoint into a Flax variables tree, one tensor at a time.

    Args:
      source: a checkpoint path (file or directory, see :func:`~mergejax.convert.io.open_checkpoint`), an open
        :class:`TensorSource`, or an in-memory state dict (torch tensors or numpy arrays).
      rules: rule set or its registered name.
      target: optional Flax tree (arrays or ``jax.ShapeDtypeStruct``) the result must match, or a callable
        ``keys -> tree | None`` (e.g. :func:`mergejax.convert.expected.expected_for`); its paths that the source does
        not provide are reported as missing, and shape disagreements as mismatches, all before any tensor is read.
      strict: raise :class:`ConversionError` listing every problem at once; with False, warn and convert what maps.
      sharding: where each leaf goes: one ``Sharding`` for all, a callable ``(path, flax_shape) -> Sharding | None``,
        or a tree of shardings shaped like the output. Sharded leaves are built with
        ``jax.make_array_from_callback``, each device reading only its slice of the stored tensor.
      as_numpy: return numpy arrays (host memory) instead of jax arrays.

    Returns:
      ``(variables, record)``: the nested variables dict (``{"params": ..., "batch_stats": ...}``) and the
      :class:`ConversionRecord` that :func:`flax_to_torch` uses to rebuild the source exactly.
    """
    rule_set = get_rules(rules)
    src, owned = _as_source(source)
    try:
        keys = src.keys()
        infos = {k: src.info(k) for k in keys}
        report = ConversionReport()
        plan: dict[str, tuple[str, Layout]] = {}
        dropped_keys = []
        for key in keys:
            hit = rule_set.to_flax(key, len(infos[key].shape))
            if hit is None:
                (dropped_keys if rule_set.is_dropped(key) else report.unexpected).append(key)
                continue
            path, layout = hit
            if path in plan:
                report.duplicates.append(path)
                continue
            plan[path] = (key, layout)
        bad_paths: set[str] = set()
        if callable(target):
            target = target(list(keys))
        if target is not None:
            expected = {p: tuple(np.shape(leaf)) for p, leaf in paths_and_leaves(target)}
            report.missing.extend(p for p in expected if p not in plan)
            for path, (key, layout) in plan.items():
                shape = infos[key].shape
                flax_shape = tuple(shape[a] for a in layout.to_flax_perm(len(shape)))
                if path not in expected:
                    report.unexpected.append(f"{key} (-> {path}, not in target)")
                    bad_paths.add(path)
                elif flax_shape != expected[path]:
                    report.mismatched.append((f"{key} -> {path}", flax_shape, expected[path]))
                    bad_paths.add(path)
        _settle(report, strict, f"converting {rule_set.name!r} checkpoint to Flax")
        for path, (key, _) in plan.items():
            if path not in bad_paths:
                _check_placeable(key, infos[key], as_numpy)

        flat: dict[str, Any] = {}
        for path, (key, layout) in plan.items():
            if path in bad_paths:
                continue
            info = infos[key]
            perm = layout.to_flax_perm(len(info.shape))
            flax_shape = tuple(info.shape[a] for a in perm)
            where = None if as_numpy else _sharding_for(sharding, path, flax_shape)
            if where is not None:

                def read(index: tuple[Any, ...], key: str = key, perm: tuple[int, ...] = perm) -> np.ndarray:
                    part = src.read_slice(key, _flax_index_to_torch(index, perm))
                    return np.asarray(part.transpose(perm), order="C")

                flat[path] = jax.make_array_from_callback(flax_shape, where, read)
                continue
            array = src.read(key)
            if perm != tuple(range(len(perm))):
                array = np.asarray(array.transpose(perm), order="C")
            flat[path] = array if as_numpy else jax.device_put(array)
            del array
        dropped = {k: src.read(k) for k in dropped_keys}
        record = ConversionRecord(rule_set.name, list(keys), dropped, report)
        return unflatten(flat), record
    finally:
        if owned:
            src.close()


def flax_to_torch(
    variables: Any,
    rules: str | RuleSet = "generic",
    *,
    record: ConversionRecord | None = None,
    strict: bool = True,
    restore_dropped: bool = True,
) -> list[LazyTensor]:
    """Plan the torch state dict of a Flax variables tree; each entry fetches (and transposes) its leaf on demand.

    Args:
      variables: the Flax variables tree (``{"params": ..., "batch_stats": ...}``), jax or numpy leaves.
      rules: rule set or its registered name.
      record: the :class:`ConversionRecord` from :func:`torch_to_flax`; restores the original key order and exactly
        the dropped buffers the source had, with their values. Without it, every buffer the rule set's drop rules
        anchor in the tree is rebuilt by ``DropRule.make``.
      strict: raise :class:`ConversionError` if a leaf has no rule, or if ``record`` names keys that are not produced.
      restore_dropped: put back the buffers the Flax tree leaves out (``position_ids``, ``num_batches_tracked``).

    Returns:
      :class:`LazyTensor` entries in state-dict order, for :func:`~mergejax.convert.io.write_sharded_safetensors`,
      :func:`~mergejax.convert.io.write_torch_state_dict` or :func:`flax_to_state_dict`.
    """
    rule_set = get_rules(rules)
    report = ConversionReport()
    out: dict[str, LazyTensor] = {}
    leaves = paths_and_leaves(variables)
    for path, leaf in leaves:
        shape = tuple(np.shape(leaf))
        hit = rule_set.to_torch(path, len(shape))
        if hit is None:
            report.unexpected.append(path)
            continue
        key, layout = hit
        if key in out:
            report.duplicates.append(key)
            continue
        perm = layout.to_torch_perm(len(shape))

        def fetch(leaf: Any = leaf, perm: tuple[int, ...] = perm) -> np.ndarray:
            array = np.asarray(leaf)
            return np.asarray(array.transpose(perm), order="C") if perm != tuple(range(len(perm))) else array

        info = TensorInfo(tuple(shape[a] for a in perm), np.dtype(leaf.dtype))
        out[key] = LazyTensor(key, info, fetch)
    if restore_dropped:
        recorded = record.dropped if record is not None else {}
        for drop in rule_set.dropped:
            for path, leaf in leaves:
                key = drop.restored_key(path)
                if key is None or key in out or (record is not None and key not in recorded):
                    continue  # with a record, put back exactly the buffers the source had
                value = recorded[key] if key in recorded else drop.make(tuple(np.shape(leaf)))
                out[key] = LazyTensor(key, TensorInfo(tuple(value.shape), value.dtype), lambda v=value: v)
        for key, value in recorded.items():  # recorded buffers whose anchor is absent still go back
            if key not in out:
                out[key] = LazyTensor(key, TensorInfo(tuple(value.shape), value.dtype), lambda v=value: v)
    if record is not None:
        report.missing.extend(k for k in record.torch_keys if k not in out and k not in record.report.unexpected)
        rank = {k: i for i, k in enumerate(record.torch_keys)}
        ordered = sorted(out, key=lambda k: rank.get(k, len(rank)))
    else:
        ordered = list(out)
    _settle(report, strict, f"converting Flax variables to a {rule_set.name!r} torch state dict")
    return [out[k] for k in ordered]


def flax_to_state_dict(
    variables: Any,
    rules: str | RuleSet = "generic",
    *,
    record: ConversionRecord | None = None,
    strict: bool = True,
    as_torch: bool = False,
) -> dict[str, Any]:
    """:func:`flax_to_torch`, materialised: an ordered dict of numpy arrays (or torch tensors with ``as_torch``)."""
    from mergejax.convert.io import numpy_to_torch

    tensors = flax_to_torch(variables, rules, record=record, strict=strict)
    if as_torch:
        return {t.name: numpy_to_torch(t.fetch()) for t in tensors}
    return {t.name: t.fetch() for t in tensors}
