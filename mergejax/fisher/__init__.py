"""Diagonal Fisher information and Fisher-weighted merging (Matena and Raffel, 2022).

The model contract the data-informed methods share (``apply_fn``, batches, head masks, tree I/O) lives in
:mod:`mergejax.model`; its names (``ApplyFn``, :func:`head_flags`, :func:`check_batch`, :func:`labels_of`,
:func:`save_tree`, :func:`load_tree`) stay importable from here.

Modules, one concept each: :mod:`~mergejax.fisher.scan` (the shared per-batch scan), :mod:`~mergejax.fisher.per_example`
(the ``vmap(grad)`` path), :mod:`~mergejax.fisher.dense` (the Dense outer-product fast path),
:mod:`~mergejax.fisher.estimate` (:func:`diagonal`), :mod:`~mergejax.fisher.merge` (:func:`fisher_merge`) and
:mod:`~mergejax.fisher.io` (:func:`save_fisher`, :func:`load_fisher`).

References:
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
"""

from __future__ import annotations

from mergejax.fisher.dense import _dense_plan  # noqa: F401  (tests plan a model directly)
from mergejax.fisher.estimate import diagonal
from mergejax.fisher.io import load_fisher, save_fisher
from mergejax.fisher.merge import fisher_merge
from mergejax.fisher.scan import BatchSum, FisherMethod, FisherMode  # noqa: F401  (the types, as before the split)
from mergejax.model import ApplyFn, check_batch, head_flags, labels_of, load_tree, save_tree

__all__ = [
    "ApplyFn",
    "diagonal",
    "fisher_merge",
    "head_flags",
    "check_batch",
    "labels_of",
    "save_fisher",
    "load_fisher",
    "save_tree",
    "load_tree",
]
