"""LiNeS: layer-increasing network scaling (Wang et al., 2025, Eq. 3).

lambda(l) = alpha + beta * l / (L - 1) for block l = 0 ... L-1 (shallow blocks keep little of the task vector, deep
blocks more); leaves outside every block get alpha. The map from leaf path to block is the user's, or built with
:func:`blocks_from_regex` from a pattern such as ``r"layers_(\\d+)/"``. Usable before the reduction (each task
vector) or after it (the merged vector: "TIES then LiNeS").
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp

from mergejax.ops.base import TaskVectors, Transform, map_float_leaves
from mergejax.tree import PyTree, is_float, paths_and_leaves

__all__ = ["blocks_from_regex", "lines_coefficient", "LiNeS", "lines"]


def blocks_from_regex(tree: PyTree, pattern: str) -> dict[str, int]:
    """{path: block} for every float leaf whose path matches ``pattern``; group 1 is the block number.

    Args:
      tree: a model or task-vector tree.
      pattern: a regex searched in each leaf path, whose group 1 is the block index l (e.g. ``r"layers_(\\d+)/"``).

    Returns:
      {leaf path: block index} for the matching float leaves.

    Raises:
      ValueError: the pattern matches no float leaf.
    """
    rx = re.compile(pattern)
    out = {}
    for path, leaf in paths_and_leaves(tree):
        m = rx.search(path)
        if m and is_float(leaf):
            out[path] = int(m.group(1))
    if not out:
        raise ValueError(f"pattern {pattern!r} matches no float leaf path")
    return out


def lines_coefficient(block: int | None, num_blocks: int, alpha: float, beta: float) -> float:
    """alpha + beta * l / (L - 1) (alpha alone for leaves outside the blocks, or when L = 1); LiNeS Eq. 3.

    Args:
      block: the leaf's block index l, or None outside every block.
      num_blocks: the number of blocks L.
      alpha: the coefficient of the shallowest block (traced).
      beta: the increase up to the deepest block (traced).

    Returns:
      The leaf's scale lambda(l).
    """
    if block is None or num_blocks <= 1:
        return alpha
    return alpha + beta * block / (num_blocks - 1)


class LiNeS(Transform):
    """Chain stage: scale every float leaf of each tree by its LiNeS coefficient. Build it with :func:`lines`.

    ``alpha`` and ``beta`` are traced data (a sweep does not recompile); the block map is static.

    Args:
      alpha: the coefficient of the shallowest block (Wang et al., 2025, Eq. 3).
      beta: the increase up to the deepest block.
      blocks: sorted ``(leaf path, block)`` pairs.
      num_blocks: the number of blocks L.
    """

    alpha: float
    beta: float
    blocks: tuple[tuple[str, int], ...]
    num_blocks: int

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        table = dict(self.blocks)
        unknown = sorted(set(table) - {p for p, _ in paths_and_leaves(tvs[0])})
        if unknown:
            raise ValueError(f"LiNeS block map names leaves that are not in the tree: {unknown[:5]}")

        coef = {p: lines_coefficient(table.get(p), self.num_blocks, self.alpha, self.beta)
                for p, x in paths_and_leaves(tvs[0]) if is_float(x)}
        return map_float_leaves(lambda xs, i, c: [x * jnp.asarray(c[0], x.dtype) for x in xs], tvs, extras=(coef,))


def lines(alpha: float, beta: float, blocks: Mapping[str, int], num_blocks: int | None = None) -> LiNeS:
    """Makes a :class:`LiNeS` stage from {leaf path: block}; L defaults to max(block) + 1.

    Args:
      alpha: the coefficient of the shallowest block (Wang et al., 2025, Eq. 3).
      beta: the increase up to the deepest block.
      blocks: {leaf path: block index l >= 0}, e.g. from :func:`blocks_from_regex`.
      num_blocks: the number of blocks L (default max(block) + 1).

    Returns:
      The :class:`LiNeS` stage.

    Raises:
      ValueError: an empty map, a negative block, or a block >= ``num_blocks``.
    """
    if not blocks:
        raise ValueError("LiNeS needs at least one leaf path -> block entry")
    if any(b < 0 for b in blocks.values()):
        raise ValueError("LiNeS blocks must be >= 0")
    L = max(blocks.values()) + 1 if num_blocks is None else int(num_blocks)
    if max(blocks.values()) >= L:
        raise ValueError(f"block {max(blocks.values())} is out of range for num_blocks={L}")
    return LiNeS(alpha, beta, tuple(sorted(blocks.items())), L)
