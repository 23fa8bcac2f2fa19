"""ComPEFT sparse ternary task vectors: compression near the entropy bound, orbax storage, on-device decode.

``tau_hat = alpha * sigma * sign(tau * mask)`` (Yadav et al., 2023, "ComPEFT: Compression for Communicating
Parameter Efficient Updates via Sparsification and Quantization", Eq. 1-2). On device a
:class:`TernaryTaskVector` holds 2 bits per parameter (packed mask and sign bitmaps) and decodes inside ``jit``; on
disk each leaf is Golomb-coded to within ~1% of the entropy bound ``H(d) + d`` bits per parameter.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mergejax import ternary
  >>> tv = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
  >>> ttv = ternary.compress(tv, density=0.1)
  >>> ttv.nnz()
  409
  >>> merged = ternary.apply({"w": jnp.zeros((64, 64))}, ttv, scale=1.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from etils import epath

from mergejax.ternary import codec
from mergejax.ternary.device import (
    LeafInfo,
    TernarySpec,
    TernaryTaskVector,
    apply,
    compress,
    decode_values,
    pack_bits,
    unpack_bits,
)
from mergejax.ternary.storage import (
    TernaryCheckpointError,
    TernaryCheckpointHandler,
    TernaryRestore,
    TernarySave,
    load,
    read_metadata,
    save,
)

__all__ = [
    "compress",
    "TernaryTaskVector",
    "TernarySpec",
    "LeafInfo",
    "apply",
    "save",
    "load",
    "stats",
    "TernaryStats",
    "ALPHA_GRID",
    "choose_alpha",
    "AlphaSearch",
    "with_alpha",
    "TernaryCheckpointHandler",
    "TernarySave",
    "TernaryRestore",
    "TernaryCheckpointError",
    "read_metadata",
    "pack_bits",
    "unpack_bits",
    "decode_values",
]


class TernaryStats(NamedTuple):
    """Size accounting of a ternary task vector (float leaves only).

    Attributes:
      num_params: float parameters covered.
      nnz: nonzeros of ``tau_hat``.
      density: ``nnz / num_params``.
      bytes_on_disk: coded streams (the ``streams.bin`` size; the small JSON metadata is not counted).
      bits_per_param: ``8 * bytes_on_disk / num_params``.
      entropy_bound_bits_per_param: ``H(density) + density`` (ComPEFT's bound for positions plus signs).
      ratio_to_bound: ``bits_per_param / entropy_bound_bits_per_param``.
      compression_vs_float32: dense float32 bytes / ``bytes_on_disk``.
      compression_vs_bfloat16: dense bfloat16 bytes / ``bytes_on_disk``.
    """

    num_params: int
    nnz: int
    density: float
    bytes_on_disk: int
    bits_per_param: float
    entropy_bound_bits_per_param: float
    ratio_to_bound: float
    compression_vs_float32: float
    compression_vs_bfloat16: float


def stats(ttv: TernaryTaskVector | str | epath.PathLike) -> TernaryStats:
    """Sizes of a ternary task vector: entropy-codes it (host) or reads a saved checkpoint's metadata.

    Args:
      ttv: a :class:`TernaryTaskVector` (its leaves are coded on the host to measure the bytes, one leaf at a time),
        or the directory of a saved one (no decoding).
    """
    if isinstance(ttv, TernaryTaskVector):
        n = nnz = size = 0
        for info, mask, sign in zip(ttv.spec.coded_leaves, ttv.mask, ttv.sign):
            blob = codec.encode_leaf(np.asarray(mask), np.asarray(sign), info.shape)
            n += info.size
            nnz += codec.read_header(blob).nnz
            size += len(blob)
    else:
        meta = read_metadata(ttv)
        coded = [e for e in meta["leaves"] if e["coded"]]
        n = sum(math.prod(e["shape"]) for e in coded)
        nnz = sum(int(e["nnz"]) for e in coded)
        size = int(meta["streams_bytes"])
    d = nnz / n if n else 0.0
    bound = codec.binary_entropy(d) + d
    bpp = 8 * size / n if n else 0.0
    return TernaryStats(
        num_params=n,
        nnz=nnz,
        density=d,
        bytes_on_disk=size,
        bits_per_param=bpp,
        entropy_bound_bits_per_param=bound,
        ratio_to_bound=bpp / bound if bound else float("inf") if size else 1.0,
        compression_vs_float32=4 * n / size if size else float("inf"),
        compression_vs_bfloat16=2 * n / size if size else float("inf"),
    )


def with_alpha(ttv: TernaryTaskVector, alpha: float) -> TernaryTaskVector:
    """The same mask and signs with the scale multiplier ``alpha`` instead of ``ttv.spec.alpha`` (no recompression).

    Requires ``ttv.spec.alpha != 0`` (the scale is stored as ``alpha * sigma``).
    """
    old = ttv.spec.alpha
    if old == 0:
        raise ValueError("cannot rescale a ternary task vector compressed with alpha=0; compress with alpha=1")
    factor = jnp.float32(alpha / old)
    spec = dataclasses.replace(ttv.spec, alpha=float(alpha))
    return TernaryTaskVector(ttv.mask, ttv.sign, tuple(s * factor for s in ttv.scale), spec)


class AlphaSearch(NamedTuple):
    """Result of :func:`choose_alpha`: the best alpha, its score, every (alpha, score), and the chosen vector."""

    alpha: float
    score: float
    scores: tuple[tuple[float, float], ...]
    ttv: TernaryTaskVector


ALPHA_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
""":func:`choose_alpha`'s default candidates. Powers of two alone miss the optimum: on the EfficientNet experts at
k = 20% the best alpha was 3 for all four tasks, and {1, 2, 4, 8} kept 91.9% of their accuracy against 96.9%
(``experiments/results/isolate/compeft_alone_vision_seed2.md``)."""


def choose_alpha(
    tv: Any,
    evaluate: Callable[[TernaryTaskVector], float],
    *,
    grid: Sequence[float] = ALPHA_GRID,
    density: float = 0.1,
    scope: str = "global",
    scale: str = "std",
    maximize: bool = True,
) -> AlphaSearch:
    """Picks ComPEFT's ``alpha`` on validation data (Yadav et al., 2023, Sec. 3: alpha and k tuned on validation).

    Compresses once with ``alpha = 1`` and rescales for each grid value (the mask does not depend on alpha).

    Args:
      tv: the dense task vector, or an already compressed :class:`TernaryTaskVector` (then ``density``, ``scope``
        and ``scale`` are ignored).
      evaluate: maps a candidate :class:`TernaryTaskVector` to a validation score, e.g.
        ``lambda t: accuracy(ternary.apply(base, t), val_batches)``.
      grid: candidate alphas (tried in order; ties keep the earlier one).
      density, scope, scale: compression settings (see :func:`compress`).
      maximize: True when a larger score is better (accuracy), False for a loss.
    """
    if not grid:
        raise ValueError("grid must hold at least one alpha")
    base = tv if isinstance(tv, TernaryTaskVector) else compress(tv, density=density, alpha=1.0, scope=scope,
                                                                  scale=scale)
    if base.spec.alpha == 0:
        raise ValueError("the given ternary task vector has alpha=0 and cannot be rescaled")
    scores, best = [], None
    for alpha in grid:
        candidate = with_alpha(base, float(alpha))
        score = float(evaluate(candidate))
        scores.append((float(alpha), score))
        better = best is None or (score > best[1] if maximize else score < best[1])
        if better:
            best = (float(alpha), score, candidate)
    return AlphaSearch(best[0], best[1], tuple(scores), best[2])
