"""EMR-Merging (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free High-Performance Model Merging", Sec. 3,
Eqs. 1-5; code harveyhuang18/EMR_Merging and FusionBench ``method/emr_merging/utils.py::emr_merge``).

Elect: a unified task vector ``tau_uni = gamma * max_t |mask_t * tau_t|`` with ``gamma = sign(sum_t tau_t)`` (zero
counted as negative, as the code). Mask: per task ``M_t = (tau_t * gamma) > 0``. Rescale: per task
``lambda_t = sum_l mean|tau_t^l| / sum_l mean|M_t^l * tau_uni^l|`` (sums over the float leaves l of per-leaf means,
as the code; 0 when the denominator is 0, where the code divides by zero). Task t's model is
``theta_0 + lambda_t * M_t * tau_uni``.

Storage: one shared float32 tau_uni plus, per task, its mask as a packed uint32 bitmap (``mergejax.ternary.device``
layout: 1 bit per parameter) and one float. :meth:`EMRMerged.coded_nbytes` reports the size of the masks
entropy-coded with the ternary codec's Golomb position coding (``mergejax.ternary.codec.encode_positions``: the
minority positions' gaps, or the plain bitmap when smaller; below 1 bit per parameter when masks are sparse or dense).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.merge import _is_encoded, _validate_entries, task_vectors_of
from mergejax.ternary import codec
from mergejax.ternary.device import pack_bits, unpack_bits
from mergejax.tree import PyTree, _leaf_apply, as_tree, check_finite_many, head_flags, is_float

__all__ = ["EMRMerged", "emr", "emr_task_vectors"]


def _sign(x: jax.Array) -> jax.Array:
    """+1 where x > 0, -1 elsewhere (zero counted as negative, the reference's ``(x > 0) * 2 - 1``)."""
    return jnp.where(x > 0, 1.0, -1.0).astype(x.dtype)


def emr_task_vectors(tvs: Sequence[list[jax.Array]]) -> tuple[list[jax.Array], list[list[jax.Array]], jax.Array]:
    """EMR on the float leaves of T task vectors.

    Args:
      tvs: per task, its list of float leaves (acc dtype).

    Returns:
      ``(unified, masks, rescalers)``: the unified leaves, per task its boolean mask leaves, and the T rescalers.
    """
    T = len(tvs)
    unified, masks = [], [[] for _ in range(T)]
    scales = jnp.zeros(T, jnp.float32)
    for leaf in range(len(tvs[0])):
        xs = [tv[leaf] for tv in tvs]
        flag = _sign(sum(xs[1:], xs[0]))
        top = jnp.zeros_like(xs[0])
        for t, x in enumerate(xs):
            m = x * flag > 0
            masks[t].append(m)
            top = jnp.maximum(top, jnp.abs(jnp.where(m, x, 0)))
        unified.append(top * flag)
        scales = scales + jnp.stack([jnp.mean(jnp.abs(x)).astype(jnp.float32) for x in xs])
    new = jnp.zeros(T, jnp.float32)
    for leaf, u in enumerate(unified):
        new = new + jnp.stack([jnp.mean(jnp.abs(jnp.where(masks[t][leaf], u, 0))).astype(jnp.float32) for t in range(T)])
    rescalers = jnp.where(new > 0, scales / jnp.where(new > 0, new, 1), 0.0)
    return unified, masks, rescalers


class EMRMerged:
    """The result of :func:`emr`: a unified task vector, per-task bitmaps and rescalers.

    Attributes:
      base: the pre-trained tree.
      unified: the float leaves of tau_uni (float32 or wider), in flattening order of the base's float leaves.
      masks: per task, the packed uint32 bitmaps of its float leaves.
      rescalers: float32 array [T].
      heads: per task, its own task-vector leaves at the ``heads`` positions (kept exactly), keyed by leaf index.
    """

    def __init__(self, base, unified, masks, rescalers, heads, float_index, shapes):
        self.base, self.unified, self.masks, self.rescalers = base, unified, masks, rescalers
        self.heads, self._float_index, self._shapes = heads, float_index, shapes

    @property
    def num_tasks(self) -> int:
        return len(self.masks)

    def task_vector(self, t: int) -> list[jax.Array]:
        """The float leaves of task t's vector lambda_t * M_t * tau_uni (heads: the task's own vector)."""
        self._check_task(t)
        return _task_leaves_jit(tuple(self.unified), tuple(self.masks[t]), self.rescalers[t], self._shapes, tuple(
            self.heads[t].get(i) for i in range(len(self.unified))))

    def model(self, t: int, *, scale: float = 1.0) -> PyTree:
        """Task t's model theta_0 + scale * lambda_t * M_t * tau_uni, in the base's dtypes."""
        leaves = self.task_vector(t)
        flat, treedef = jax.tree_util.tree_flatten(self.base)
        out = list(flat)
        for j, i in enumerate(self._float_index):
            out[i] = _leaf_apply(flat[i], leaves[j], jnp.asarray(scale, jnp.float32))
        return jax.tree_util.tree_unflatten(treedef, out)

    def _check_task(self, t: int) -> None:
        if not 0 <= int(t) < self.num_tasks:
            raise IndexError(f"task index {t} out of range for {self.num_tasks} tasks")

    def nbytes(self) -> dict[str, int]:
        """Storage in bytes: the unified vector, the bitmaps (1 bit per parameter per task), the rescalers, and for
        comparison the T dense float32 task vectors."""
        n = sum(int(np.prod(s)) for s in self._shapes)
        uni = sum(int(u.size) * u.dtype.itemsize for u in self.unified)
        bitmaps = sum(int(w.size) * 4 for ms in self.masks for w in ms)
        return {
            "unified": uni,
            "masks_bitmap": bitmaps,
            "masks_coded": sum(self.coded_nbytes()),
            "rescalers": 4 * self.num_tasks,
            "dense_task_vectors": 4 * n * self.num_tasks,
        }

    def encode_masks(self) -> list[list[bytes]]:
        """Per task, per float leaf: the mask entropy-coded on the host (see :func:`encode_mask`)."""
        return [[encode_mask(np.asarray(unpack_bits(w, s))) for w, s in zip(ms, self._shapes)] for ms in self.masks]

    def coded_nbytes(self) -> list[int]:
        """Per task, the bytes of its entropy-coded masks."""
        return [sum(len(b) for b in leaves) for leaves in self.encode_masks()]


_MASK_HEADER = 1 + 8 + 8 + 8 + 8  # mode, nsym, m, unary_bits, payload length


def encode_mask(bits: np.ndarray) -> bytes:
    """A boolean mask as bytes: the gaps between its minority positions Golomb-coded
    (``codec.encode_positions``), or the packed bitmap when that is smaller; a 33-byte header."""
    flat = np.ascontiguousarray(bits, bool).reshape(-1)
    n = flat.size
    ones = int(flat.sum())
    minority_ones = ones * 2 <= n
    symbols = np.flatnonzero(flat if minority_ones else ~flat)
    m, unary_bits, unary, low, extra = codec.encode_positions(symbols, n)
    payload = unary + low + extra
    bitmap = np.packbits(flat, bitorder="little").tobytes()
    if len(payload) >= len(bitmap):
        mode, nsym, m, unary_bits, payload = 2, 0, 0, 0, bitmap
    else:
        mode, nsym = (0 if minority_ones else 1), int(symbols.size)
    head = bytes([mode]) + b"".join(int(v).to_bytes(8, "little") for v in (nsym, m, unary_bits, len(payload)))
    return head + payload


def decode_mask(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_mask`."""
    n = int(np.prod(shape))
    mode = blob[0]
    nsym, m, unary_bits, length = (int.from_bytes(blob[1 + 8 * i : 9 + 8 * i], "little") for i in range(4))
    payload = blob[_MASK_HEADER : _MASK_HEADER + length]
    if len(blob) != _MASK_HEADER + length:
        raise ValueError(f"mask blob has {len(blob)} bytes, header says {_MASK_HEADER + length}")
    if mode == 2:
        return np.unpackbits(np.frombuffer(payload, np.uint8), count=n, bitorder="little").astype(bool).reshape(shape)
    pos = codec.decode_positions(payload, nsym, max(m, 1), unary_bits, n)
    flat = np.zeros(n, bool) if mode == 0 else np.ones(n, bool)
    flat[pos] = mode == 0
    return flat.reshape(shape)


@partial(jax.jit, static_argnums=(3,))
def _task_leaves_jit(unified, masks, rescaler, shapes, heads):
    out = []
    for u, w, s, h in zip(unified, masks, shapes, heads):
        out.append(h if h is not None else rescaler.astype(u.dtype) * jnp.where(unpack_bits(w, s), u, 0))
    return out


@jax.jit
def _emr_jit(tvs_f):
    unified, masks, rescalers = emr_task_vectors(tvs_f)
    return unified, [[pack_bits(m) for m in ms] for ms in masks], rescalers


def emr(
    base: PyTree, finetuned: Sequence[PyTree], *, heads: str | PyTree | None = None, check_finite: bool = True
) -> EMRMerged:
    """EMR-Merging: a unified task vector plus a per-task mask and rescaler; ``emr(base, fts).model(t)`` is task t.

    Args:
      base: pre-trained parameters theta_0.
      finetuned: T fine-tuned trees with the base's structure, shapes and dtypes (or task vectors, typed or
        compressed).
      heads: leaves kept per task exactly (classification heads), a path regex or a boolean mask tree:
        ``model(t)`` takes task t's own value there, and they enter neither the unified vector nor the rescalers.
      check_finite: report NaN/Inf leaves by model and path first.

    Returns:
      An :class:`EMRMerged`. Memory: the unified vector (float32) and T bitmaps of 1 bit per parameter.
    """
    entries = _validate_entries(base, finetuned)
    if check_finite:
        dense = [(f"finetuned[{i}]", as_tree(e)) for i, e in enumerate(entries) if not _is_encoded(e)]
        check_finite_many([base] + [t for _, t in dense], what=["base"] + [n for n, _ in dense])
    flags = head_flags(base, heads)
    b_leaves = jax.tree_util.tree_leaves(base)
    float_index = [i for i, x in enumerate(b_leaves) if is_float(x)]
    shapes = tuple(tuple(int(d) for d in jnp.shape(b_leaves[i])) for i in float_index)
    body = [j for j, i in enumerate(float_index) if not flags[i]]
    tvs = [jax.tree_util.tree_leaves(tv) for tv in task_vectors_of(base, entries)]
    tvs_f = [[tv[i] for i in float_index] for tv in tvs]
    unified_b, packed_b, rescalers = _emr_jit([[tv[j] for j in body] for tv in tvs_f])
    T = len(entries)
    unified = [jnp.zeros(s, jnp.float32) for s in shapes]
    masks = [[pack_bits(jnp.zeros(s, bool)) for s in shapes] for _ in range(T)]
    head_tvs: list[dict[int, jax.Array]] = [{} for _ in range(T)]
    for k, j in enumerate(body):
        unified[j] = unified_b[k]
        for t in range(T):
            masks[t][j] = packed_b[t][k]
    for j, i in enumerate(float_index):
        if flags[i]:
            for t in range(T):
                head_tvs[t][j] = tvs_f[t][j]
    return EMRMerged(base, unified, masks, rescalers, head_tvs, float_index, shapes)
