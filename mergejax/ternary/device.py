"""On-device ternary task vectors: packed bitmaps, ComPEFT compression and jitted decode.

ComPEFT (Yadav et al., 2023, Eq. 1-2) replaces a task vector ``tau`` by

    tau_hat = alpha * sigma * sign(tau * mask),

with ``mask`` the TIES magnitude top-k trim and ``sigma`` the standard deviation of the dense ``tau``. On device each
float leaf of shape ``(..., L)`` is held as two uint32 arrays of shape ``(..., ceil(L / 32))`` (bit ``j`` of word
``w`` is element ``32 w + j`` of the last axis; padding bits are 0):

* ``mask``: 1 where ``tau_hat`` is nonzero;
* ``sign``: 1 where ``tau_hat`` is negative (always 0 where ``mask`` is 0);

plus one float32 scale per leaf. That is 2 bits per parameter (16x smaller than float32) and decodes with shifts,
ands and a select only, so it runs inside ``jax.jit`` and shards like the parameter it encodes: the bitmap keeps the
leading axes of the leaf, and a sharded last axis stays aligned as long as each shard holds a multiple of 32 entries.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.ops.base import check_fraction
from mergejax.ops.trim import Scope, magnitude_mask
from mergejax.ternary.codec import FORMAT_VERSION
from mergejax.tree import as_tree, PyTree, acc_dtype, check_finite, is_float, path_str

__all__ = [
    "LeafInfo",
    "TernarySpec",
    "TernaryTaskVector",
    "pack_bits",
    "unpack_bits",
    "decode_values",
    "compress",
    "apply",
    "bitmap_sharding",
]

ScaleRule = Literal["std", "mean_abs"]
_SHIFTS = np.arange(32, dtype=np.uint32)


# -------------------------------------------------------------------------------------------------------- bitmaps
def pack_bits(bits: jax.Array) -> jax.Array:
    """Packs a boolean array ``(..., L)`` into uint32 words ``(..., ceil(L/32))`` along the last axis (jittable)."""
    bits = jnp.asarray(bits, bool)
    if bits.ndim == 0:
        bits = bits[None]
    last = bits.shape[-1]
    words = (last + 31) // 32
    pad = [(0, 0)] * (bits.ndim - 1) + [(0, words * 32 - last)]
    b = jnp.pad(bits, pad).astype(jnp.uint32).reshape(bits.shape[:-1] + (words, 32))
    return jnp.sum(b << _SHIFTS, axis=-1, dtype=jnp.uint32)


def unpack_bits(words: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`pack_bits`: a boolean array of the dense ``shape`` (jittable, elementwise only)."""
    shape = tuple(int(s) for s in shape)
    last = (shape or (1,))[-1]
    bits = (words[..., None] >> _SHIFTS) & jnp.uint32(1)
    bits = bits.reshape(words.shape[:-1] + (words.shape[-1] * 32,))[..., :last]
    return bits.astype(bool).reshape(shape)


def decode_values(mask: jax.Array, sign: jax.Array, scale: jax.Array, shape: Sequence[int], dtype: Any) -> jax.Array:
    """The dense leaf ``scale * (mask ? (sign ? -1 : +1) : 0)`` in ``dtype`` (ComPEFT Eq. 2), inside ``jit``."""
    m = unpack_bits(mask, shape)
    s = unpack_bits(sign, shape)
    scale = jnp.asarray(scale, jnp.float32)
    values = jnp.where(m, jnp.where(s, -scale, scale), jnp.float32(0))
    return values.astype(dtype)


# ---------------------------------------------------------------------------------------------------------- pytree
@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """Static description of one leaf of the dense task vector.

    Attributes:
      path: ``"params/Dense_0/kernel"``.
      shape: dense shape.
      dtype: numpy dtype name of the original leaf (``"bfloat16"``, ``"float32"``, ``"int32"``...).
      coded: True for float leaves (held as bitmaps); non-float leaves are zeros in a task vector and are kept out.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    coded: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class TernarySpec:
    """Static (hashable) part of a :class:`TernaryTaskVector`: the dense tree's structure and the ComPEFT settings."""

    treedef: Any
    leaves: tuple[LeafInfo, ...]
    density: float
    alpha: float
    scope: str
    scale_rule: str
    version: int = FORMAT_VERSION

    @property
    def coded_leaves(self) -> tuple[LeafInfo, ...]:
        return tuple(info for info in self.leaves if info.coded)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["mask", "sign", "scale"], meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class TernaryTaskVector:
    """A ComPEFT-compressed task vector held on device (a pytree).

    Leaves (data): per float leaf of the dense task vector, in flattening order, the uint32 ``mask`` and ``sign``
    bitmaps (see module docstring) and a float32 ``scale`` scalar. Static aux data: :class:`TernarySpec` (treedef,
    paths, shapes, dtypes, density, alpha, scope, scale rule). Because it is a pytree, ``jax.device_put(ttv,
    shardings)``, ``jax.jit`` and orbax handle it like any other tree.

    Peak memory of a decode: one dense leaf (``decode_leaf``) or one dense tree (``decompress``).
    """

    mask: tuple[jax.Array, ...]
    sign: tuple[jax.Array, ...]
    scale: tuple[jax.Array, ...]
    spec: TernarySpec

    # -- structure ------------------------------------------------------------------------------------------------
    @property
    def paths(self) -> tuple[str, ...]:
        """Paths of every leaf of the dense tree (float and non-float), in flattening order."""
        return tuple(info.path for info in self.spec.leaves)

    @property
    def treedef(self) -> Any:
        """Tree structure of the dense task vector."""
        return self.spec.treedef

    def abstract(self) -> PyTree:
        """The dense task vector as a tree of ``jax.ShapeDtypeStruct`` (original dtypes)."""
        structs = [jax.ShapeDtypeStruct(i.shape, jnp.dtype(i.dtype)) for i in self.spec.leaves]
        return jax.tree_util.tree_unflatten(self.spec.treedef, structs)

    def _slot(self, index_or_path: int | str) -> tuple[LeafInfo, int]:
        """(leaf info, index into the coded arrays or -1) of a dense-tree leaf given by flat index or path."""
        leaves = self.spec.leaves
        if isinstance(index_or_path, str):
            matches = [i for i, info in enumerate(leaves) if info.path == index_or_path]
            if not matches:
                raise KeyError(f"no leaf {index_or_path!r} in this ternary task vector; paths: {self.paths[:8]}...")
            index = matches[0]
        else:
            index = int(index_or_path)
            if not -len(leaves) <= index < len(leaves):
                raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")
            index %= len(leaves)
        info = leaves[index]
        coded = sum(1 for i in leaves[:index] if i.coded) if info.coded else -1
        return info, coded

    # -- decoding ---------------------------------------------------------------------------------------------------
    def decode_leaf(self, index_or_path: int | str, dtype: Any = None) -> jax.Array:
        """One dense leaf of the task vector, decoded on device (jitted); peak memory: that leaf.

        Args:
          index_or_path: position in ``jax.tree_util.tree_leaves`` order of the dense tree, or the leaf path.
          dtype: output dtype; ``None`` gives the accumulation dtype of the leaf (float32 for 16/32-bit floats),
            as :func:`mergejax.tree.task_vector` would. Non-float leaves decode to zeros of their own dtype.
        """
        info, j = self._slot(index_or_path)
        if j < 0:
            return jnp.zeros(info.shape, jnp.dtype(info.dtype))
        out = acc_dtype(jnp.dtype(info.dtype)) if dtype is None else jnp.dtype(dtype)
        return _decode_jit(self.mask[j], self.sign[j], self.scale[j], shape=info.shape, dtype=out)

    def decompress(self, dtype: Any = jnp.float32) -> PyTree:
        """The dense task vector ``alpha * sigma * sign(tau * mask)`` (ComPEFT Eq. 2) as a tree.

        Args:
          dtype: dtype of every float leaf; ``None`` keeps each leaf's original dtype. Non-float leaves are zeros
            of their own dtype (the task-vector convention of :mod:`mergejax.tree`).
        """
        leaves = []
        for i, info in enumerate(self.spec.leaves):
            out = jnp.dtype(info.dtype) if dtype is None or not info.coded else dtype
            leaves.append(self.decode_leaf(i, out))
        return jax.tree_util.tree_unflatten(self.spec.treedef, leaves)

    def to_task_vector(self) -> PyTree:
        """The dense task vector with :func:`mergejax.tree.task_vector`'s dtypes (f32 for 16/32-bit float leaves)."""
        return jax.tree_util.tree_unflatten(
            self.spec.treedef, [self.decode_leaf(i) for i in range(len(self.spec.leaves))]
        )

    def nnz(self) -> int:
        """Number of nonzeros of the dense task vector (a device popcount)."""
        return sum(int(jnp.sum(jax.lax.population_count(m), dtype=jnp.uint32)) for m in self.mask)

    def num_params(self) -> int:
        """Number of float parameters covered."""
        return sum(info.size for info in self.spec.coded_leaves)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _decode_jit(mask, sign, scale, *, shape, dtype):
    return decode_values(mask, sign, scale, shape, dtype)


# -------------------------------------------------------------------------------------------------------- compress
def _check_args(density: float, alpha: float, scope: str, scale: str) -> None:
    check_fraction("density", density)
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    if scale not in ("std", "mean_abs"):
        raise ValueError(f"scale must be 'std' or 'mean_abs', got {scale!r}")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")


def _std(xs: Sequence[jax.Array]) -> jax.Array:
    """Population standard deviation (ddof=0) over all entries of ``xs``, two-pass, in float32."""
    n = sum(x.size for x in xs)
    if n == 0:
        return jnp.float32(0)
    mean = sum(jnp.sum(x, dtype=jnp.float32) for x in xs) / n
    var = sum(jnp.sum(jnp.square(x - mean), dtype=jnp.float32) for x in xs) / n
    return jnp.sqrt(var)


def _mean_abs(xs: Sequence[jax.Array], masks: Sequence[jax.Array]) -> jax.Array:
    """Mean |x| over the kept entries (0 when nothing is kept)."""
    total = sum(jnp.sum(jnp.where(m, jnp.abs(x), 0), dtype=jnp.float32) for x, m in zip(xs, masks))
    count = sum(jnp.sum(m, dtype=jnp.int32).astype(jnp.float32) for m in masks)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.float32(0))


@functools.partial(jax.jit, static_argnames=("density", "scope"))
def _compress_leaves(xs, alpha, use_mean_abs, *, density, scope):
    """Masks, sign bits and scales of all float leaves in one ``jit`` (the scale rule is traced: one compile)."""
    xs = tuple(x.astype(acc_dtype(x.dtype)) for x in xs)
    masks = magnitude_mask(xs, density, scope=scope)
    if scope == "global":
        base = [jnp.where(use_mean_abs, _mean_abs(xs, masks), _std(xs))] * len(xs)
    else:
        base = [jnp.where(use_mean_abs, _mean_abs([x], [m]), _std([x])) for x, m in zip(xs, masks)]
    out_mask, out_sign, out_scale = [], [], []
    for x, m, b in zip(xs, masks, base):
        nonzero = m & (x != 0)  # sign(0) = 0: a kept exact zero decodes to 0
        out_mask.append(pack_bits(nonzero))
        out_sign.append(pack_bits(nonzero & (x < 0)))
        out_scale.append((alpha * b).astype(jnp.float32))
    return tuple(out_mask), tuple(out_sign), tuple(out_scale)


def compress(
    tv: PyTree,
    *,
    density: float = 0.1,
    alpha: float = 1.0,
    scope: Scope = "global",
    scale: ScaleRule = "std",
) -> TernaryTaskVector:
    """ComPEFT compression of a task vector (Yadav et al., 2023, Sec. 3, Eq. 1-2).

    ``tau_hat = s * sign(tau * mask)``, with ``mask`` the TIES magnitude trim (:func:`mergejax.ops.trim.
    magnitude_mask`: the top ``floor(density * n)`` magnitudes, ties at the threshold kept) and the scale ``s``:

    * ``scale="std"`` (ComPEFT): ``alpha * std(tau)`` - population std (ddof=0) of the *dense* task vector over all
      float parameters (``scope="global"``) or over each leaf (``scope="tensor"``);
    * ``scale="mean_abs"`` (a common alternative, not in the paper): ``alpha * mean(|tau|)`` over the kept entries
      (of the whole vector or of each leaf, by ``scope``), so that ``alpha=1`` preserves the kept L1 mass.

    Entries with ``tau == 0`` decode to 0 even when kept (``sign(0) = 0``). Non-float leaves are not coded: they
    decode to zeros of their dtype, as :func:`mergejax.tree.task_vector` produces them.

    Args:
      tv: task vector (a pytree of arrays; bf16/f16/f32/f64 float leaves; statistics accumulate in float32).
      density: kept fraction ``k`` in [0, 1].
      alpha: multiplier of the scale (ComPEFT tunes it on validation data; see :func:`mergejax.ternary.choose_alpha`).
      scope: ``"global"`` (one mask threshold and one scale for the whole vector) or ``"tensor"`` (per leaf).
      scale: ``"std"`` or ``"mean_abs"``.

    Returns:
      A :class:`TernaryTaskVector` whose bitmaps keep the leading axes (and shardings) of the input leaves.

    Memory: the input plus a few leaf-sized temporaries inside one ``jit``; the result is 2 bits per parameter.

    Example:
      >>> import jax.numpy as jnp
      >>> ttv = compress({"w": jnp.array([0.5, -2.0, 0.1, 3.0])}, density=0.5, scale="mean_abs")
      >>> ttv.decompress()["w"].tolist()
      [0.0, -2.5, 0.0, 2.5]
    """
    _check_args(density, alpha, scope, scale)
    flat, treedef = jax.tree_util.tree_flatten_with_path(as_tree(tv))
    infos, xs = [], []
    for keypath, leaf in flat:
        arr = leaf if hasattr(leaf, "dtype") and hasattr(leaf, "shape") else np.asarray(leaf)
        coded = is_float(arr)
        infos.append(LeafInfo(path_str(keypath), tuple(int(s) for s in np.shape(arr)), np.dtype(arr.dtype).name, coded))
        if coded:
            xs.append(jnp.asarray(arr))
    if xs:  # keyed by leaf path, so a NaN is reported as 'params/dense/kernel', not as '0'
        check_finite(dict(zip((i.path for i in infos if i.coded), xs)), what="task vector")
    spec = TernarySpec(treedef, tuple(infos), float(density), float(alpha), scope, scale)
    if not xs:
        return TernaryTaskVector((), (), (), spec)
    mask, sign, scales = _compress_leaves(
        tuple(xs), jnp.float32(alpha), jnp.bool_(scale == "mean_abs"), density=float(density), scope=scope
    )
    return TernaryTaskVector(mask, sign, scales, spec)


# ----------------------------------------------------------------------------------------------------------- apply
@functools.partial(jax.jit, static_argnames=("spec",))
def _apply_jit(base_leaves, mask, sign, scales, scale, *, spec):
    out, j = [], 0
    for b, info in zip(base_leaves, spec.leaves):
        if not info.coded:
            out.append(b)
            continue
        acc = acc_dtype(b.dtype)
        delta = decode_values(mask[j], sign[j], scales[j], info.shape, acc)
        out.append((b.astype(acc) + scale.astype(acc) * delta).astype(b.dtype))
        j += 1
    return tuple(out)


def apply(base: PyTree, ttv: TernaryTaskVector, scale: float | jax.Array = 1.0) -> PyTree:
    """``base + scale * tau_hat``, decoded and added on device inside one ``jit`` (no dense host copy).

    Arithmetic in float32 (float64 stays float64), result cast to each base leaf's dtype; non-float leaves come from
    ``base`` unchanged. XLA fuses the decode into the add, so the peak is the base plus the output model.

    Raises:
      ValueError: ``base`` does not match the task vector's structure, shapes or float-ness (naming the leaf).
    """
    base_flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    if treedef != ttv.spec.treedef:
        raise ValueError(f"base tree structure {treedef} does not match the ternary task vector's {ttv.spec.treedef}")
    leaves = []
    for (keypath, b), info in zip(base_flat, ttv.spec.leaves):
        b = jnp.asarray(b)
        if tuple(b.shape) != info.shape or is_float(b) != info.coded:
            raise ValueError(
                f"leaf {path_str(keypath)}: base has shape {tuple(b.shape)} dtype {b.dtype}, the ternary task vector "
                f"has shape {info.shape} dtype {info.dtype}"
            )
        leaves.append(b)
    out = _apply_jit(tuple(leaves), ttv.mask, ttv.sign, ttv.scale, jnp.asarray(scale, jnp.float32), spec=ttv.spec)
    return jax.tree_util.tree_unflatten(treedef, list(out))


# -------------------------------------------------------------------------------------------------------- sharding
def bitmap_sharding(sharding: Any, info: LeafInfo) -> Any:
    """The sharding of a leaf's bitmaps given the sharding of the dense leaf: same mesh and spec (the bitmap keeps
    the leaf's axes; only the last one is 32x shorter); scalar leaves are replicated."""
    if sharding is None or not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    if len(info.shape) == 0:
        spec = ()
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
