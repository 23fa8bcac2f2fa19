"""Meshes, leaf-path -> PartitionSpec rules and multi-host start-up.

Merging is elementwise per coordinate, so mergejax's operators never mention devices: place the base and the
fine-tuned trees with a :class:`jax.sharding.NamedSharding` and the jitted merge keeps every leaf where it is. The only
values that cross devices are scalar counts (global magnitude thresholds, the majority sign, PCB's maxima) and, for
the row-wise methods (Breadcrumbs) on a tensor sharded along its *last* axis, one count per row.

Typical use::

    mesh = make_mesh()                                           # all devices on one axis "data"
    shardings = shard_rules(params, [(r"kernel$", P(None, "data")), (r"embedding", P("data"))], mesh)
    base = shard_like(base, shardings)
    finetuned = [shard_like(ft, shardings) for ft in finetuned]
    merged = mergejax.ties(base, finetuned)                      # merged leaves keep these shardings

On several hosts call :func:`initialize_distributed` first (on a TPU pod it needs no arguments) and build the
arrays with ``jax.make_array_from_callback`` or restore them with orbax onto the shardings.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Literal, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mergejax.tree import PyTree, path_str

__all__ = [
    "make_mesh",
    "shard_rules",
    "default_rules",
    "shard_like",
    "initialize_distributed",
    "is_primary",
]

Rule = tuple[str, "PartitionSpec | None"]


def make_mesh(
    shape: Sequence[int] | None = None,
    axis_names: Sequence[str] = ("data",),
    *,
    axis_types: Sequence[AxisType] | AxisType | None = AxisType.Auto,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A device mesh through :func:`jax.make_mesh`, by default all devices on one axis ``"data"``.

    Args:
      shape: mesh shape; ``None`` puts every device on the first axis and 1 on the others.
      axis_names: one name per mesh axis.
      axis_types: ``AxisType.Auto`` (default here: shardings come from the inputs and flow through ``jit``, no
        ``jax.set_mesh`` needed), ``AxisType.Explicit`` (``jax.make_mesh``'s own default), one type for all axes
        or one per axis; ``None`` keeps ``jax.make_mesh``'s default.
      devices: the devices to use (default ``jax.devices()``, i.e. every process's devices).

    Returns:
      A :class:`jax.sharding.Mesh`.
    """
    axis_names = tuple(axis_names)
    if not axis_names:
        raise ValueError("axis_names must name at least one mesh axis")
    devs = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = (len(devs),) + (1,) * (len(axis_names) - 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} has {len(shape)} axes but axis_names {axis_names} has {len(axis_names)}")
    if math.prod(shape) != len(devs):
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, {len(devs)} are given")
    if isinstance(axis_types, AxisType):
        axis_types = (axis_types,) * len(axis_names)
    types = None if axis_types is None else tuple(axis_types)
    return jax.make_mesh(shape, axis_names, axis_types=types, devices=devs)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    """Number of devices a PartitionSpec entry (None, a name, or a tuple of names) splits a dimension into."""
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    for n in names:
        if n not in mesh.shape:
            raise ValueError(f"mesh axis {n!r} is not in the mesh (axes: {tuple(mesh.axis_names)})")
    return math.prod(mesh.shape[n] for n in names)


def _spec_problem(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> str | None:
    """Why ``spec`` cannot shard an array of ``shape`` evenly on ``mesh`` (None when it can)."""
    if len(spec) > len(shape):
        return f"the spec has {len(spec)} entries for {len(shape)} dimensions"
    for dim, entry in enumerate(spec):
        size = _axis_size(mesh, entry)
        if shape[dim] % size:
            return f"dimension {dim} of size {shape[dim]} does not divide into {size} shards (mesh axes {entry!r})"
    return None


def shard_rules(
    tree: PyTree,
    rules: Sequence[Rule],
    mesh: Mesh,
    *,
    on_mismatch: Literal["raise", "replicate"] = "raise",
) -> PyTree:
    """A tree of :class:`NamedSharding` from regex rules over leaf paths (``"params/Dense_0/kernel"``).

    Each leaf takes the spec of the first rule whose pattern matches its path (``re.search``: anchor with ``^``/``$``
    to match whole paths); a leaf no rule matches is replicated. ``None`` as a spec means replicated. Works on
    arrays, ``jax.ShapeDtypeStruct`` and anything with a shape (numpy arrays, Python scalars).

    Args:
      tree: the parameter tree (or its abstract shapes).
      rules: ``[(pattern, PartitionSpec), ...]`` in priority order.
      mesh: the mesh whose axis names the specs use.
      on_mismatch: a matched spec that does not divide the leaf evenly (or names more dimensions than the leaf
        has) raises ``ValueError`` naming the leaf path, shape and spec (``"raise"``), or replicates that leaf.

    Returns:
      A tree with ``tree``'s structure and one ``NamedSharding`` per leaf.
    """
    if on_mismatch not in ("raise", "replicate"):
        raise ValueError(f"on_mismatch must be 'raise' or 'replicate', got {on_mismatch!r}")
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"rule {i} must be a (pattern, PartitionSpec) pair, got {rule!r}")
        pattern, spec = rule
        spec = PartitionSpec() if spec is None else spec
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"rule {i} ({pattern!r}) needs a jax.sharding.PartitionSpec, got {type(spec).__name__}")
        compiled.append((re.compile(pattern), spec))

    def leaf(keypath, x):
        path, shape = path_str(keypath), tuple(np.shape(x))
        spec = next((s for rx, s in compiled if rx.search(path)), PartitionSpec())
        problem = _spec_problem(shape, spec, mesh)
        if problem is not None:
            if on_mismatch == "raise":
                raise ValueError(
                    f"leaf '{path}' with shape {shape} dtype {_dtype_name(x)} cannot take PartitionSpec {spec}: "
                    f"{problem}; change the rule or pass on_mismatch='replicate'"
                )
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _dtype_name(x: Any) -> str:
    return str(np.dtype(x.dtype)) if hasattr(x, "dtype") else type(x).__name__


def default_rules(tree: PyTree, mesh: Mesh, axis: str = "data", *, min_size: int = 4096) -> PyTree:
    """Shards each leaf's largest dimension divisible by the size of mesh axis ``axis``; replicates the rest.

    Leaves with fewer than ``min_size`` elements, scalars and leaves with no divisible dimension are replicated.
    Among equally large divisible dimensions the first is chosen, which keeps the last (row) axis whole where it
    can, so row-wise methods (Breadcrumbs) need no per-row communication.

    Returns:
      A tree with ``tree``'s structure and one ``NamedSharding`` per leaf.
    """
    size = _axis_size(mesh, axis)

    def leaf(x):
        shape = tuple(np.shape(x))
        if size == 1 or not shape or math.prod(shape) < min_size:
            return NamedSharding(mesh, PartitionSpec())
        dims = [d for d in range(len(shape)) if shape[d] % size == 0]
        if not dims:
            return NamedSharding(mesh, PartitionSpec())
        best = max(dims, key=lambda d: (shape[d], -d))
        return NamedSharding(mesh, PartitionSpec(*([None] * best + [axis])))

    return jax.tree_util.tree_map(leaf, tree)


def shard_like(tree: PyTree, shardings: PyTree, *, donate: bool = False) -> PyTree:
    """Places every leaf of ``tree`` with the matching sharding (``jax.device_put``; a tree of shardings or one).

    ``donate=True`` lets JAX reuse the input buffers (the inputs must not be used afterwards).
    """
    return jax.device_put(tree, shardings, donate=donate)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> tuple[int, int]:
    """Starts ``jax.distributed`` once per process; returns ``(process_index, process_count)``.

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; if
    still ``None``, JAX detects them (Cloud TPU pods, Slurm, Open MPI), so on a TPU VM no argument is needed.
    A second call in an initialised process does nothing. Must run before any other JAX computation.

    Args:
      coordinator_address: ``"host:port"`` of process 0.
      num_processes: number of processes.
      process_id: this process's index in ``0 .. num_processes - 1``.
      **kwargs: passed to :func:`jax.distributed.initialize` (``initialization_timeout``, ``local_device_ids``,
        ``coordinator_bind_address``, ...).
    """
    if not jax.distributed.is_initialized():
        coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
        )
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """True in process 0 (the one that should print, log and write single-writer files)."""
    return jax.process_index() == 0
