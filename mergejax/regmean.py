"""RegMean: merge linear layers by regression on each task's layer inputs (Jin et al., ICLR 2023).

For every ``flax.linen.Dense`` kernel W (layout ``[in, out]``), task i contributes the Gram matrix of the layer's
inputs G_i = X_i^T X_i / N_i, computed by running fine-tuned model i on task i's batches. Off-diagonal entries are
scaled by ``alpha`` and the merged kernel is the minimiser of sum_i ||X_i W - X_i W_i||^2 (Eq. 3):
W* = (sum_i G_i)^-1 sum_i G_i W_i. Every other float leaf is averaged; leaves named by ``heads`` stay per task.

Inputs are captured with ``flax.linen.intercept_methods`` around the user's ``apply_fn``: the model is not rewritten,
and any linen model whose linear layers are ``nn.Dense`` works.

References:
    X. Jin, X. Ren, D. Preotiuc-Pietro, P. Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models",
    ICLR 2023 (arXiv:2212.09849).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.merge import chain
from mergejax.model import ApplyFn, check_batch
from mergejax.ops.regmean import RegMean, regmean_kernel, scale_off_diagonal
from mergejax.tree import PyTree, acc_dtype, check_finite_many, paths_and_leaves, validate_like

__all__ = ["gram_matrices", "regmean", "regmean_kernel", "scale_off_diagonal", "RegMean"]


def _kernel_path(module_path: tuple[str, ...], kernel_paths: Sequence[str]) -> str:
    """The leaf path of the Dense module's kernel: the unique params path ending in ``<module path>/kernel``."""
    suffix = "/".join(module_path) + "/kernel"
    hits = [p for p in kernel_paths if p == suffix or p.endswith("/" + suffix)]
    if len(hits) != 1:
        raise ValueError(f"cannot match Dense module {'/'.join(module_path)!r} to one kernel leaf (found {hits})")
    return hits[0]


def _gram_fn(apply_fn: ApplyFn, task: int, kernel_paths: tuple[str, ...]) -> Any:
    """A jitted ``(params, batch) -> {kernel path: (X^T X summed, rows)}`` over every Dense call of one forward."""

    def run(params: PyTree, batch: Any) -> tuple[dict[str, jax.Array], dict[str, int], jax.Array]:
        grams: dict[str, jax.Array] = {}
        rows: dict[str, int] = {}

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                x = args[0] if args else kwargs["inputs"]
                x2 = jnp.reshape(x, (-1, x.shape[-1])).astype(acc_dtype(x.dtype))
                key = _kernel_path(tuple(context.module.path), kernel_paths)
                grams[key] = grams.get(key, 0.0) + x2.T @ x2
                rows[key] = rows.get(key, 0) + x2.shape[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            logits = apply_fn(params, batch, task)
        return grams, rows, jnp.all(jnp.isfinite(logits))

    return run


def gram_matrices(
    apply_fn: ApplyFn, params: PyTree, batches: Iterable[Any], *, task: int = 0
) -> dict[str, jax.Array]:
    """Gram matrices X^T X / N of the inputs of every ``nn.Dense`` layer that ``apply_fn`` calls (RegMean Eq. 3).

    Inputs of rank > 2 are flattened to ``[-1, in]`` (every token is a row); a layer called several times pools all
    its calls. Accumulated in float32 (float64 under x64 with float64 inputs). Memory: one ``in x in`` matrix per layer.

    Args:
        apply_fn: ``apply_fn(params, batch, task) -> logits``; the model must be a flax.linen model.
        params: the model's parameters (usually fine-tuned model i).
        batches: an iterable of batches (usually task i's).
        task: the task passed to ``apply_fn``.

    Returns:
        ``{kernel leaf path: G}`` with G of shape ``[in, in]``.

    Raises:
        ValueError: no batches, a batch that does not fit the model, NaN/Inf logits, or no Dense layer called.
    """
    kernel_paths = tuple(p for p, x in paths_and_leaves(params) if p.endswith("kernel") and np.ndim(x) == 2)
    run = jax.jit(_gram_fn(apply_fn, task, kernel_paths))
    sums: dict[str, jax.Array] = {}
    counts: dict[str, int] = {}
    checked: set[Any] = set()
    flags = []
    for b, batch in enumerate(batches):
        signature = tuple((p, np.shape(x)) for p, x in paths_and_leaves(batch))
        if signature not in checked:
            check_batch(apply_fn, params, batch, task, what=f"batch {b} of task {task}")
            checked.add(signature)
        grams, rows, finite = run(params, batch)
        rows = jax.tree_util.tree_map(int, rows)
        for k, g in grams.items():
            sums[k] = sums[k] + g if k in sums else g
            counts[k] = counts.get(k, 0) + rows[k]
        flags.append(finite)
    if not flags:
        raise ValueError(f"batches of task {task} is empty: RegMean needs at least one batch per task")
    bad = [b for b, ok in enumerate(jax.device_get(flags)) if not ok]
    if bad:
        raise ValueError(f"apply_fn returned NaN or Inf logits for task {task} in batch {bad[0]}")
    if not sums:
        raise ValueError("apply_fn called no flax.linen.Dense layer: RegMean has no linear layer to merge")
    return {k: sums[k] / counts[k] for k in sums}


def regmean(
    apply_fn: ApplyFn,
    base: PyTree,
    finetuned: Sequence[PyTree],
    batches_per_task: Sequence[Iterable[Any]],
    *,
    alpha: float = 0.9,
    heads: str | PyTree | None = None,
    tasks: Sequence[int] | None = None,
    grams: Sequence[dict[str, jax.Array]] | None = None,
    rcond: float = 1e-6,
) -> PyTree:
    """RegMean merge of T fine-tuned models (Jin et al., 2023, Eq. 3 with Sec. 3.2's off-diagonal scaling).

    For each Dense kernel that every task's forward pass reaches: W* = (sum_i G~_i)^-1 sum_i G~_i W_i with
    G~_i = alpha G_i + (1 - alpha) diag(G_i), G_i = X_i^T X_i / N_i from fine-tuned model i on task i's batches.
    Every other float leaf (biases, norms, embeddings, kernels some task never reaches) is the mean of the fine-tuned
    models; leaves named by ``heads`` keep each task's change (base + sum_i (theta_i - base)); non-float leaves come
    from ``base``. Memory peak: the T models + T Gram matrices per layer + one model.

    Args:
        apply_fn: ``apply_fn(params, batch, task) -> logits`` of a flax.linen model.
        base: the pre-trained model (for the tree structure, non-float leaves and heads).
        finetuned: T fine-tuned models.
        batches_per_task: T iterables of batches (a few batches per task suffice).
        alpha: off-diagonal scale in [0, 1] (paper's sweep 0.1-0.95; 1 = exact regression, 0 = diagonal weighting).
        heads: leaves kept per task (regex over ``path_str`` paths or a bool mask tree).
        tasks: task index for ``apply_fn`` per model (default 0..T-1).
        grams: precomputed :func:`gram_matrices` per task (then ``batches_per_task`` is not used; pass ``()``).
        rcond: relative eigenvalue cut-off of :func:`regmean_kernel`.

    Returns:
        The merged tree in the base's dtypes.

    Raises:
        ValueError: mismatched models/data counts, alpha outside [0, 1], a heads pattern naming no leaf, bad batches,
            NaN/Inf logits, or a model without Dense layers.
    """
    finetuned = tuple(finetuned)
    if not finetuned:
        raise ValueError("finetuned is empty: need at least one model")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    validate_like(base, finetuned, what="finetuned")
    check_finite_many(finetuned, what=[f"finetuned[{i}]" for i in range(len(finetuned))])
    n_tasks = len(finetuned)
    tasks = tuple(range(n_tasks)) if tasks is None else tuple(int(t) for t in tasks)
    if len(tasks) != n_tasks:
        raise ValueError(f"got {n_tasks} models but {len(tasks)} task ids")
    if grams is None:
        batches_per_task = tuple(batches_per_task)
        if len(batches_per_task) != n_tasks:
            raise ValueError(f"got {n_tasks} models but batches for {len(batches_per_task)} tasks")
        grams = [gram_matrices(apply_fn, m, b, task=t) for m, b, t in zip(finetuned, batches_per_task, tasks)]
    elif len(grams) != n_tasks:
        raise ValueError(f"got {n_tasks} models but Gram matrices for {len(grams)} tasks")
    return chain(RegMean(tuple(grams), alpha=alpha, rcond=rcond))(base, finetuned, heads=heads)
