"""The diagonal Fisher information of a model on batches (Matena and Raffel, 2022, Eq. 4).

The module is named ``estimate`` rather than ``diagonal`` so that ``mergejax.fisher.diagonal`` stays the function.

References:
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.fisher.dense import _dense_outer_sq_grads, _dense_plan
from mergejax.fisher.per_example import _per_example_sq_grads
from mergejax.fisher.scan import BatchSum, FisherMethod, FisherMode
from mergejax.model import ApplyFn, check_batch, labels_of, shape_signature
from mergejax.tree import PyTree, acc_dtype, is_float, paths_and_leaves


def _batch_function(apply_fn: ApplyFn, params: PyTree, batch: Any, treedef: Any, float_idx: tuple[int, ...],
                    task: int, mode: FisherMode, chunk_size: int, method: FisherMethod) -> BatchSum:
    """The compiled per-batch update for ``method`` and this batch's per-example shapes."""
    if method != "per_example":
        e_def, e_specs = shape_signature(batch)
        e_specs = tuple((s[1:], d) for s, d in e_specs)
        plan = _dense_plan(apply_fn, task, *shape_signature(params), float_idx, e_def, e_specs)
        if plan.dense:
            return _dense_outer_sq_grads(apply_fn, treedef, float_idx, task, mode, chunk_size, plan)
        if method == "dense_outer":
            raise ValueError(f"method='dense_outer' needs nn.Dense layers: {plan.note}; use method='per_example'")
    return _per_example_sq_grads(apply_fn, treedef, float_idx, task, mode, chunk_size)


def diagonal(
    apply_fn: ApplyFn,
    params: PyTree,
    batches: Iterable[Any],
    *,
    task: int = 0,
    mode: FisherMode = "exact",
    key: jax.Array | None = None,
    chunk_size: int = 8,
    method: FisherMethod = "auto",
) -> PyTree:
    """Diagonal Fisher information of ``params`` on ``batches`` (Matena and Raffel, 2022, Eq. 4).

    F = (1/N) sum_n E_y[(d log p(y|x_n) / d theta)^2], from per-example gradients under one ``jit`` per batch shape,
    accumulated in float32 (float64 for float64 leaves).

    - ``"exact"``: the expectation over the model's own predictive distribution, sum_y p(y|x) (d log p(y|x))^2.
    - ``"sampled"``: one y ~ p(.|x) per example, drawn with ``key``.
    - ``"empirical"``: the batch's own labels (see :func:`labels_of`).

    Methods (the same numbers up to float32 rounding; every example is run as a batch of one under ``vmap``):

    - ``"per_example"``: ``vmap(grad)`` of log p(y|x_n) to every float leaf ("exact": ``vmap`` of one ``vjp`` and a
      backward pass per class), squared and summed over chunks of ``chunk_size`` examples. Materialising the
      per-example gradients makes it memory-bound: the cost grows with (parameters x examples).
    - ``"dense_outer"``: for an ``nn.Dense`` layer z_n = x_n W + b applied once to one row x_n per example, the
      per-example gradients are d log p / dW = x_n delta_n^T and d log p / db = delta_n, with
      delta_n = d log p / d z_n. So sum_n (d log p / dW)^2 = (x^2)^T (delta^2), one [in, N] @ [N, out] matmul, and
      sum_n (d log p / db)^2 = sum_n delta_n^2. x_n is captured with ``flax.linen.intercept_methods`` and delta_n as
      the gradient with respect to a zero perturbation added to z_n (one backward pass gives every layer's delta).
      For "exact", per example D_n = sum_c p_c delta_{n,c}^2 (a backward pass per class c), and the kernel gets
      (x^2)^T D since x_n does not depend on c. Leaves the logits never read get exactly 0; every other leaf
      (embeddings, norms, Dense layers called twice or on token sequences, non-linen models) keeps the
      per-example path. Raises when no Dense layer qualifies (see :func:`_dense_plan` for the conditions). The
      squares x^2 and delta^2 are taken in float32: for bfloat16/float16 models the per-example product is not
      rounded to the parameter dtype first, so the two methods differ there by that dtype's rounding (~1e-3).
    - ``"auto"`` (default): ``"dense_outer"`` when some Dense layer qualifies, else ``"per_example"``.

    Memory peak: params + ``chunk_size`` per-example gradients of the per-example leaves + the forward residuals of
    ``chunk_size`` examples; with ``"dense_outer"`` and every leaf covered, the residuals and Dense inputs and
    deltas of a whole batch (about one forward-backward of the batch).

    Args:
        apply_fn: ``apply_fn(params, batch, task) -> logits [batch, classes]``.
        params: the model's parameters.
        batches: an iterable of batches (dict or tuple, examples on the leading axis).
        task: the task passed to ``apply_fn`` (selects the head).
        mode: "exact", "sampled" or "empirical".
        key: PRNG key, required for "sampled" (batch b uses ``fold_in(key, b)`` split into one key per example).
        chunk_size: examples whose per-example gradients are materialised at once (a sweep of 4-128 on CPU: 8 was
            fastest for a 300k-parameter MLP, all alike for a 10k one).
        method: "auto", "per_example" or "dense_outer" (above).

    Returns:
        A tree like ``params``: the mean squared score of every float leaf (acc dtype), zeros for non-float leaves.

    Raises:
        ValueError: unknown mode or method, missing key, no batches, a batch that does not fit the model or has no
            labels (empirical), non-finite logits (naming the batch), or ``"dense_outer"`` without a usable Dense.

    Example:
        >>> F = diagonal(apply_fn, params, [{"x": x, "y": y}], mode="empirical")  # doctest: +SKIP
    """
    if mode not in ("exact", "sampled", "empirical"):
        raise ValueError(f"mode must be 'exact', 'sampled' or 'empirical', got {mode!r}")
    if method not in ("auto", "per_example", "dense_outer"):
        raise ValueError(f"method must be 'auto', 'per_example' or 'dense_outer', got {method!r}")
    if mode == "sampled" and key is None:
        raise ValueError("mode='sampled' draws labels from the model and needs an explicit key=jax.random.key(...)")
    key = jax.random.key(0) if key is None else key  # unused by exact/empirical
    leaves, treedef = jax.tree_util.tree_flatten(params)
    float_idx = tuple(i for i, x in enumerate(leaves) if is_float(x))
    float_leaves = [leaves[i] for i in float_idx]
    float_set = set(float_idx)
    other = [None if i in float_set else x for i, x in enumerate(leaves)]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    totals = [jnp.zeros(x.shape, acc_dtype(x.dtype)) for x in float_leaves]
    flags: list[jax.Array] = []
    count = 0
    compiled: dict[Any, BatchSum] = {}
    for b, batch in enumerate(batches):
        signature = tuple((p, np.shape(x)) for p, x in paths_and_leaves(batch))
        if signature not in compiled:
            check_batch(apply_fn, params, batch, task, what=f"batch {b}")
            if mode == "empirical":
                labels = labels_of(batch)
                if np.ndim(labels) != 1:
                    raise ValueError(f"batch {b} labels must have shape [examples], got {np.shape(labels)}")
            compiled[signature] = _batch_function(apply_fn, params, batch, treedef, float_idx, int(task), mode,
                                                  int(chunk_size), method)
        count += jax.tree_util.tree_leaves(batch)[0].shape[0]
        totals, finite = compiled[signature](float_leaves, other, batch, key, np.int32(b), totals, np.bool_(True))
        flags.append(finite)
    if not flags:
        raise ValueError("batches is empty: the Fisher needs at least one batch")
    bad = [b for b, ok in enumerate(jax.device_get(flags)) if not ok]
    if bad:
        raise ValueError(f"apply_fn returned NaN or Inf logits for task {task} in batch {bad[0]} (of {len(flags)})")
    out = list(leaves)
    for i, t in zip(float_idx, _divide(totals, np.float32(count))):
        out[i] = t
    for i, x in enumerate(leaves):
        if i not in float_set:
            out[i] = np.zeros(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _divide(totals: list[jax.Array], count: jax.Array) -> list[jax.Array]:
    return [t / count.astype(t.dtype) for t in totals]
