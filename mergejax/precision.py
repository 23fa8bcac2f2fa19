"""Precision warnings: float64 leaves that JAX would cast to float32 (x64 off), float16 leaves that overflowed.

Both warn once per call, naming the leaves, and never change the tree. The CLI calls them at its loading and saving
boundary, :func:`mergejax.model.load_tree` on what it restores; the merge entry points can call them on their inputs.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np

from mergejax.tree import PyTree, paths_and_leaves

__all__ = ["PrecisionWarning", "float64_leaves", "warn_float64", "warn_float16_overflow"]


class PrecisionWarning(UserWarning):
    """Values that lose precision (float64 -> float32) or range (float16 overflow to Inf)."""


def _dtype(x) -> np.dtype | None:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else None


def _listing(paths: list[str], limit: int = 6) -> str:
    return ", ".join(repr(p) for p in paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def float64_leaves(tree: PyTree) -> list[str]:
    """Paths of the float64 leaves of ``tree``."""
    return [p for p, x in paths_and_leaves(tree) if _dtype(x) == np.float64]


def warn_float64(tree: PyTree, *, what: str = "model") -> bool:
    """Warns (once, naming the leaves) when ``tree`` has float64 leaves and JAX's x64 mode is off.

    With ``jax_enable_x64`` off, every jax operation casts float64 inputs to float32, so deltas below float32's
    resolution (1e-10 on weights of order 1) are lost.

    Returns:
      True when it warned.
    """
    if jax.config.jax_enable_x64:
        return False
    paths = float64_leaves(tree)
    if not paths:
        return False
    warnings.warn(
        f"{what} has {len(paths)} float64 leaves ({_listing(paths)}) but JAX's x64 mode is off: they are computed "
        "in float32; set JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True)) to keep float64",
        PrecisionWarning,
        stacklevel=2,
    )
    return True


def warn_float16_overflow(tree: PyTree, *, what: str = "merged model") -> bool:
    """Warns (once, naming the leaves) when a float16 leaf of ``tree`` holds +-Inf, i.e. a result overflowed 65504.

    Returns:
      True when it warned.
    """
    items = [(p, x) for p, x in paths_and_leaves(tree) if _dtype(x) == np.float16]
    if not items:
        return False
    flags = jax.device_get([jax.numpy.isinf(x).any() for _, x in items])
    paths = [p for (p, _), bad in zip(items, flags) if bad]
    if not paths:
        return False
    warnings.warn(
        f"{what}: float16 leaves {_listing(paths)} overflowed to Inf (|x| > 65504); merge in float32 or bfloat16, "
        "or lower the scale",
        PrecisionWarning,
        stacklevel=2,
    )
    return True
