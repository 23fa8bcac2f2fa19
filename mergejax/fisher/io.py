"""Saving and loading diagonal Fishers with orbax, beside their model's checkpoint.

References:
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mergejax.model import load_tree, save_tree
from mergejax.tree import PyTree, acc_dtype, is_float


def save_fisher(path: str | os.PathLike, fisher: PyTree) -> None:
    """Saves a diagonal Fisher with orbax to the new directory ``path`` (beside its model's checkpoint).

    Args:
        path: a directory that does not exist yet.
        fisher: a Fisher tree, from :func:`~mergejax.fisher.diagonal`.
    """
    save_tree(path, fisher)


def load_fisher(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Loads a Fisher saved by :func:`save_fisher`; ``like`` (e.g. the model) fixes the tree structure.

    Args:
        path: the directory written by :func:`save_fisher`.
        like: a tree with the Fisher's structure and shapes (e.g. the model; float leaves load in the accumulation
            dtype, with ``like``'s shardings), or None to restore as saved.

    Returns:
        The Fisher tree.
    """
    if like is not None:
        like = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), acc_dtype(x.dtype) if is_float(x) else x.dtype,
                                           sharding=getattr(x, "sharding", None)),
            like,
        )
    return load_tree(path, like)
