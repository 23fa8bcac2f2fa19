"""Diagonal Fisher information and Fisher-weighted merging (Matena and Raffel, 2022).

The model contract the data-informed methods share (``apply_fn``, batches, head masks, tree I/O) lives in
:mod:`mergejax.model`; its names (``ApplyFn``, :func:`head_flags`, :func:`check_batch`, :func:`labels_of`,
:func:`save_tree`, :func:`load_tree`) stay importable from here.

References:
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from mergejax.merge import chain
from mergejax.model import ApplyFn, check_batch, head_flags, labels_of, load_tree, save_tree, shape_signature
from mergejax.ops.fisher_mean import FisherMean
from mergejax.tree import PyTree, acc_dtype, check_finite, is_float, paths_and_leaves, validate_like

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

FisherMode = Literal["exact", "sampled", "empirical"]
FisherMethod = Literal["auto", "per_example", "dense_outer"]
BatchSum = Callable[..., tuple[list[jax.Array], jax.Array]]


# --------------------------------------------------------------------------------------------------------------------
# Diagonal Fisher.
# --------------------------------------------------------------------------------------------------------------------


def _params_of(treedef: Any, float_idx: Sequence[int], float_leaves: Sequence[jax.Array], other: Sequence[Any]
               ) -> PyTree:
    """The parameter tree with ``float_leaves`` at positions ``float_idx`` and ``other`` elsewhere."""
    full = list(other)
    for i, x in zip(float_idx, float_leaves):
        full[i] = x
    return jax.tree_util.tree_unflatten(treedef, full)


def _scan_examples(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, n: int, chunk: int
                   ) -> tuple[Any, Any]:
    """``lax.scan`` of ``body`` over chunks of ``chunk`` examples of ``xs`` (leading axis ``n``) plus a remainder.

    ``body(carry, chunk_xs) -> (carry, ys)`` with every ``ys`` leaf on a leading per-example axis; returns the final
    carry and the ``ys`` of all ``n`` examples concatenated in order.
    """
    n_chunks, rest = divmod(n, chunk)
    parts = []
    if n_chunks == 1 and not rest:
        return body(carry, xs)
    if n_chunks:
        full = n_chunks * chunk
        chunks = jax.tree_util.tree_map(lambda a: a[:full].reshape((n_chunks, chunk) + a.shape[1:]), xs)
        carry, ys = jax.lax.scan(body, carry, chunks)
        parts.append(jax.tree_util.tree_map(lambda a: a.reshape((full,) + a.shape[2:]), ys))
    if rest:
        carry, ys = body(carry, jax.tree_util.tree_map(lambda a: a[n - rest:], xs))
        parts.append(ys)
    if len(parts) == 1:
        return carry, parts[0]
    return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)


def _sum_examples(q: jax.Array) -> jax.Array:
    """Sum over the leading (examples) axis as a contraction with ones: a matrix-vector product, ~5x faster on CPU
    than ``sum(axis=0)`` over a short leading axis."""
    return jnp.tensordot(jnp.ones((q.shape[0],), q.dtype), q, axes=1)


def _example_keys(batch: Any, key: jax.Array, index: jax.Array) -> tuple[int, jax.Array]:
    """(number of examples, one PRNG key per example) of batch ``index``; "sampled" mode draws y with them."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return n, jax.random.split(jax.random.fold_in(key, index), n)


@functools.lru_cache(maxsize=64)
def _per_example_sq_grads(
    apply_fn: ApplyFn, treedef: Any, float_idx: tuple[int, ...], task: int, mode: FisherMode, chunk_size: int
) -> BatchSum:
    """A jitted function summing, over one batch, the per-example squared score of every float leaf.

    The batch is processed in a ``scan`` over chunks of ``chunk_size`` examples; inside a chunk, per-example squared
    gradients come from ``vmap(grad)`` ("exact": ``vmap`` of one ``vjp`` and a loop over classes) and are summed over
    the chunk (:func:`_sum_examples`). Cached on its static configuration, so computing several Fishers of one model
    does not recompile.
    """

    def log_probs(float_leaves: list[jax.Array], other: list[Any], example: Any) -> tuple[jax.Array, jax.Array]:
        params = _params_of(treedef, float_idx, float_leaves, other)
        batch1 = jax.tree_util.tree_map(lambda a: a[None], example)
        logits = apply_fn(params, batch1, task)[0].astype(jnp.float32)
        return jax.nn.log_softmax(logits), logits

    def one(float_leaves: list[jax.Array], other: list[Any], example: Any, key: jax.Array
            ) -> tuple[list[jax.Array], jax.Array]:
        """One example's squared score of every float leaf (acc dtype), and whether its logits are finite."""
        if mode == "exact":
            # F = sum_y p(y|x) (d log p(y|x) / d theta)^2 (Matena and Raffel, Eq. 4): one forward pass, then one
            # backward pass per class through the saved residuals, accumulated in place (no [classes, ...] Jacobian).
            logp, vjp_fn, logits = jax.vjp(lambda fl: log_probs(fl, other, example), float_leaves, has_aux=True)
            prob = jax.lax.stop_gradient(jnp.exp(logp))

            def add_class(c: jax.Array, acc: list[jax.Array]) -> list[jax.Array]:
                (grads,) = vjp_fn(jax.nn.one_hot(c, logp.shape[0], dtype=logp.dtype))
                return [a + prob[c].astype(a.dtype) * jnp.square(g.astype(a.dtype)) for a, g in zip(acc, grads)]

            zeros = [jnp.zeros(x.shape, acc_dtype(x.dtype)) for x in float_leaves]
            return jax.lax.fori_loop(0, logp.shape[0], add_class, zeros), jnp.all(jnp.isfinite(logits))

        def score(fl: list[jax.Array], y: jax.Array) -> tuple[jax.Array, jax.Array]:
            logp, logits = log_probs(fl, other, example)
            return logp[y], logits

        if mode == "sampled":
            y = jax.random.categorical(key, log_probs(float_leaves, other, example)[1])
        else:
            y = labels_of(example)
        grads, logits = jax.grad(score, has_aux=True)(float_leaves, y)
        return [jnp.square(g.astype(acc_dtype(g.dtype))) for g in grads], jnp.all(jnp.isfinite(logits))

    def batch_sum(float_leaves: list[jax.Array], other: list[Any], batch: Any, key: jax.Array, index: jax.Array,
                  totals: list[jax.Array], finite: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """Adds batch ``index``'s squared scores to ``totals`` (the whole update is one dispatch)."""
        n, keys = _example_keys(batch, key, index)

        def body(carry, xs):
            acc, ok = carry
            sq, fin = jax.vmap(one, in_axes=(None, None, 0, 0))(float_leaves, other, *xs)
            return ([a + _sum_examples(s) for a, s in zip(acc, sq)], ok & jnp.all(fin)), ()

        (totals, finite), _ = _scan_examples(body, (totals, finite), (batch, keys), n, chunk_size)
        return totals, finite

    return jax.jit(batch_sum, donate_argnums=(5,))


# -- Dense fast path --------------------------------------------------------------------------------------------------


class _DenseCall(NamedTuple):
    """One ``nn.Dense`` call whose per-example kernel gradient is the outer product x_n delta_n^T.

    Attributes:
        module: ``"/".join(module.path)``, which identifies the call when the model is traced again.
        kernel: position of its kernel among the float leaves.
        bias: position of its bias among the float leaves, -1 when it has none.
        out_shape: shape of the call's output for one example, ``(1, out)``.
        out_dtype: dtype of that output.
    """

    module: str
    kernel: int
    bias: int
    out_shape: tuple[int, ...]
    out_dtype: Any


class _Plan(NamedTuple):
    """What the dense fast path does with each float leaf (positions among the float leaves).

    Attributes:
        dense: the covered Dense calls (their kernels and biases take the outer-product path).
        unused: leaves the logits do not depend on (their Fisher is exactly zero, nothing is computed).
        note: why no Dense call is covered (for the error of ``method="dense_outer"``), else "".
    """

    dense: tuple[_DenseCall, ...]
    unused: tuple[int, ...]
    note: str


_DOT = (((1,), (0,)), ((), ()))  # x [1, in] @ kernel [in, out]
_BIAS_USES = frozenset({"reshape", "broadcast_in_dim", "add"})


def _is_dense_call(context: Any) -> bool:
    """Whether an intercepted call is ``flax.linen.Dense.__call__`` itself (subclasses may compute something else)."""
    return type(context.module) is nn.Dense and context.method_name == "__call__"


@functools.lru_cache(maxsize=64)
def _dense_plan(apply_fn: ApplyFn, task: int, p_def: Any, p_specs: tuple, float_idx: tuple[int, ...], e_def: Any,
                e_specs: tuple) -> _Plan:
    """Finds the ``nn.Dense`` calls whose kernel (and bias) per-example gradients are x_n delta_n^T (and delta_n).

    Traces ``apply_fn`` on one abstract example (``jax.make_jaxpr``, nothing is computed) with
    ``flax.linen.intercept_methods`` recording every ``nn.Dense`` call. A call is covered when all of these hold:

    - the module is exactly ``nn.Dense`` and is called once per forward pass;
    - its kernel (and bias) are the very parameter leaves handed to ``apply_fn`` (the same traced objects, so no
      transform, cast or slice sits in between), each read by no other call;
    - its input is one row ``[1, in]`` per example and its output ``[1, out]`` (so the per-example kernel gradient
      is a single outer product, not a sum over tokens);
    - in the traced program the kernel's only use is that ``x @ kernel`` ``dot_general`` and the bias's only use is
      one reshape/broadcast/add, so the parameters reach the logits through this call alone.

    Float leaves the traced program never reads are reported as unused. Cached on the abstract shapes.
    """
    params = [jax.ShapeDtypeStruct(s, d) for s, d in p_specs]
    example = jax.tree_util.tree_unflatten(e_def, [jax.ShapeDtypeStruct((1,) + s, d) for s, d in e_specs])
    calls: list[tuple[str, int, bool, int, tuple[int, ...], tuple[int, ...], Any]] = []

    def run(leaves: list[jax.Array], batch1: Any) -> jax.Array:
        position = {id(leaves[i]): j for j, i in enumerate(float_idx)}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if _is_dense_call(context):
                x = args[0] if args else kwargs["inputs"]
                own = context.module.variables.get("params", {})
                calls.append(("/".join(context.module.path), position.get(id(own.get("kernel")), -1), "bias" in own,
                              position.get(id(own.get("bias")), -1), tuple(np.shape(x)), tuple(np.shape(out)),
                              np.dtype(out.dtype)))
            return out

        with nn.intercept_methods(interceptor):
            return apply_fn(jax.tree_util.tree_unflatten(p_def, leaves), batch1, task)

    try:
        jaxpr = jax.make_jaxpr(run)(params, example).jaxpr
    except Exception as err:  # noqa: BLE001 - the model runs (check_batch); only the capture failed
        return _Plan((), (), f"tracing apply_fn with an nn.Dense interceptor failed: {err}")
    leaf_vars = jaxpr.invars[: len(p_specs)]
    uses: dict[Any, list[tuple[Any, int]]] = {v: [] for v in leaf_vars}
    for eqn in jaxpr.eqns:
        for k, v in enumerate(eqn.invars):
            if isinstance(v, jex.Var) and v in uses:
                uses[v].append((eqn, k))
    for v in jaxpr.outvars:
        if isinstance(v, jex.Var) and v in uses:
            uses[v].append((None, -1))
    unused = tuple(j for j, i in enumerate(float_idx) if not uses[leaf_vars[i]])

    def only_use(j: int) -> tuple[Any, int]:
        found = uses[leaf_vars[float_idx[j]]]
        return found[0] if len(found) == 1 and found[0][0] is not None else (None, -1)

    per_module = Counter(c[0] for c in calls)
    per_leaf = Counter([c[1] for c in calls] + [c[3] for c in calls if c[2]])
    dense = []
    for module, k, has_bias, b, x_shape, y_shape, y_dtype in calls:
        if per_module[module] != 1 or k < 0 or per_leaf[k] != 1:
            continue
        k_shape = p_specs[float_idx[k]][0]
        if len(k_shape) != 2 or x_shape != (1, k_shape[0]) or y_shape != (1, k_shape[1]):
            continue
        eqn, pos = only_use(k)
        if eqn is None or eqn.primitive.name != "dot_general" or pos != 1:
            continue
        if jax.tree_util.tree_map(int, tuple(eqn.params["dimension_numbers"])) != _DOT:
            continue
        if has_bias:
            if b < 0 or per_leaf[b] != 1 or p_specs[float_idx[b]][0] != (k_shape[1],):
                continue
            eqn, _ = only_use(b)
            if eqn is None or eqn.primitive.name not in _BIAS_USES:
                continue
        dense.append(_DenseCall(module, k, b if has_bias else -1, y_shape, y_dtype))
    note = "" if dense else (
        f"apply_fn calls no nn.Dense layer whose per-example kernel gradient is one outer product "
        f"({len(calls)} nn.Dense calls seen; a layer is covered when it is called once, on one row per example, "
        "with its own unmodified kernel and bias)")
    return _Plan(tuple(dense), unused, note)


@functools.lru_cache(maxsize=64)
def _dense_outer_sq_grads(
    apply_fn: ApplyFn, treedef: Any, float_idx: tuple[int, ...], task: int, mode: FisherMode, chunk_size: int,
    plan: _Plan,
) -> BatchSum:
    """Like :func:`_per_example_sq_grads`, with the covered Dense leaves summed as (x^2)^T (delta^2) matmuls.

    Per example, one ``vmap``-ed forward pass with a zero perturbation added to each covered Dense output gives the
    Dense inputs x_n and, by differentiating with respect to the perturbations, delta_n = d log p / d (Dense output).
    Only the leaves the plan leaves uncovered get per-example gradients (in chunks of ``chunk_size``); without any,
    the whole batch is one ``vmap``. Then, per covered layer, kernel += (x^2)^T D and bias += sum_n D with
    D_n = delta_n^2 (empirical/sampled) or sum_c p_c delta_{n,c}^2 (exact).
    """
    names = tuple(d.module for d in plan.dense)
    covered = {d.kernel for d in plan.dense} | {d.bias for d in plan.dense if d.bias >= 0}
    per_example = tuple(j for j in range(len(float_idx)) if j not in covered and j not in set(plan.unused))

    def one(float_leaves: list[jax.Array], other: list[Any], example: Any, key: jax.Array):
        """One example: squared scores of the uncovered leaves, x^2 and D of every covered layer, finite logits."""
        batch1 = jax.tree_util.tree_map(lambda a: a[None], example)
        accs = [acc_dtype(float_leaves[d.kernel].dtype) for d in plan.dense]

        def log_probs(diff: list[jax.Array], eps: dict[str, jax.Array]):
            fl = list(float_leaves)  # covered and unused leaves are constants here
            for j, v in zip(per_example, diff):
                fl[j] = v
            inputs: dict[str, jax.Array] = {}

            def interceptor(next_fun, args, kwargs, context):
                out = next_fun(*args, **kwargs)
                if _is_dense_call(context):
                    name = "/".join(context.module.path)
                    if name in eps:
                        inputs[name] = args[0] if args else kwargs["inputs"]
                        out = out + eps[name]  # zero: the value is unchanged, d/d eps is delta
                return out

            with nn.intercept_methods(interceptor):
                logits = apply_fn(_params_of(treedef, float_idx, fl, other), batch1, task)[0].astype(jnp.float32)
            missing = [n for n in names if n not in inputs]
            if missing:
                raise RuntimeError(f"nn.Dense layers {missing} found when planning the Fisher were not called again")
            x_sq = [jnp.square(inputs[n].astype(a)).reshape(-1) for n, a in zip(names, accs)]
            return jax.nn.log_softmax(logits), (logits, x_sq)

        diff0 = [float_leaves[j] for j in per_example]
        eps0 = {d.module: jnp.zeros(d.out_shape, d.out_dtype) for d in plan.dense}
        if mode == "exact":
            logp, vjp_fn, (logits, x_sq) = jax.vjp(log_probs, diff0, eps0, has_aux=True)
            prob = jax.lax.stop_gradient(jnp.exp(logp))

            def add_class(c: jax.Array, acc: tuple[list[jax.Array], list[jax.Array]]):
                g_diff, g_eps = vjp_fn(jax.nn.one_hot(c, logp.shape[0], dtype=logp.dtype))
                sq = [a + prob[c].astype(a.dtype) * jnp.square(g.astype(a.dtype)) for a, g in zip(acc[0], g_diff)]
                d = [a + prob[c].astype(a.dtype) * jnp.square(g_eps[n].astype(a.dtype)).reshape(-1)
                     for a, n in zip(acc[1], names)]
                return sq, d

            zeros = ([jnp.zeros(x.shape, acc_dtype(x.dtype)) for x in diff0],
                     [jnp.zeros(d.out_shape[-1], a) for d, a in zip(plan.dense, accs)])
            sq, d_sq = jax.lax.fori_loop(0, logp.shape[0], add_class, zeros)
            return sq, x_sq, d_sq, jnp.all(jnp.isfinite(logits))

        def score(diff: list[jax.Array], eps: dict[str, jax.Array]):
            logp, (logits, x_sq) = log_probs(diff, eps)
            if mode == "sampled":
                y = jax.random.categorical(key, jax.lax.stop_gradient(logits))
            else:
                y = labels_of(example)
            return logp[y], (logits, x_sq)

        (g_diff, g_eps), (logits, x_sq) = jax.grad(score, argnums=(0, 1), has_aux=True)(diff0, eps0)
        sq = [jnp.square(g.astype(acc_dtype(g.dtype))) for g in g_diff]
        d_sq = [jnp.square(g_eps[n].astype(a)).reshape(-1) for n, a in zip(names, accs)]
        return sq, x_sq, d_sq, jnp.all(jnp.isfinite(logits))

    def batch_sum(float_leaves: list[jax.Array], other: list[Any], batch: Any, key: jax.Array, index: jax.Array,
                  totals: list[jax.Array], finite: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """Adds batch ``index``'s squared scores to ``totals`` (the whole update is one dispatch)."""
        n, keys = _example_keys(batch, key, index)

        def body(carry, xs):
            acc, ok = carry
            sq, x_sq, d_sq, fin = jax.vmap(one, in_axes=(None, None, 0, 0))(float_leaves, other, *xs)
            return ([a + _sum_examples(s) for a, s in zip(acc, sq)], ok & jnp.all(fin)), (x_sq, d_sq)

        chunk = chunk_size if per_example else n  # no per-example gradient is materialised: one vmap
        acc = [totals[j] for j in per_example]
        (acc, finite), (x_sq, d_sq) = _scan_examples(body, (acc, finite), (batch, keys), n, chunk)
        out = list(totals)
        for j, a in zip(per_example, acc):
            out[j] = a
        for d, xs, ds in zip(plan.dense, x_sq, d_sq):
            # sum_n (x_n delta_n^T)^2 = (x^2)^T (delta^2): one [in, N] @ [N, out] matmul (full f32 precision)
            out[d.kernel] = totals[d.kernel] + jnp.matmul(xs.T, ds, precision=jax.lax.Precision.HIGHEST).astype(
                totals[d.kernel].dtype)
            if d.bias >= 0:
                out[d.bias] = totals[d.bias] + _sum_examples(ds).astype(totals[d.bias].dtype)
        return out, finite

    return jax.jit(batch_sum, donate_argnums=(5,))


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


# --------------------------------------------------------------------------------------------------------------------
# Fisher-weighted merging.
# --------------------------------------------------------------------------------------------------------------------


@jax.jit
def _global_norms(fishers: list[list[jax.Array]]) -> jax.Array:
    return jnp.stack([jnp.sqrt(sum(jnp.sum(jnp.square(f.astype(jnp.float32))) for f in fs)) for fs in fishers])


def fisher_merge(
    models: Sequence[PyTree],
    fishers: Sequence[PyTree],
    *,
    weights: Sequence[float] | None = None,
    floor: float = 1e-6,
    normalize: bool = False,
    heads: str | PyTree | None = None,
    base: PyTree | None = None,
) -> PyTree:
    """Fisher-weighted average theta* = sum_j w_j F_j theta_j / sum_j w_j F_j per coordinate (Matena and Raffel, Eq. 2).

    The one-line chain ``chain(FisherMean(fishers, floor, floor_mode="max"))`` applied to ``base`` (default:
    ``models[0]``): on task vectors the Fisher mean is the same merge, so it composes with other stages (e.g.
    ``chain(Trim(0.2), ElectSign(), FisherMean(F))``, a Fisher-weighted TIES).

    Each F_j is floored at ``floor`` (so coordinates no model cares about get the weighted average). With
    ``normalize``, each model's weight is first divided by the global L2 norm of its Fisher over the merged leaves,
    w_j <- w_j / ||F_j||_2, so that models whose Fishers differ in scale count alike. Leaves named by ``heads`` stay per
    task: merged = base + sum_j (theta_j - base), i.e. each model keeps what it changed (its own head).
    Non-float leaves come from ``models[0]``. Memory peak: the inputs plus one model.

    Args:
        models: M parameter trees with one structure.
        fishers: M diagonal Fishers (from :func:`diagonal`), each with its model's structure and shapes.
        weights: M non-negative model weights (default uniform).
        floor: lower bound applied to every Fisher value (after normalisation).
        normalize: divide each model's weight by its Fisher's global L2 norm.
        heads: leaves kept per task (regex or bool mask, see :func:`head_flags`); needs ``base``.
        base: the common pre-trained model, required with ``heads``.

    Returns:
        The merged tree, with ``models[0]``'s dtypes.

    Raises:
        ValueError: mismatched counts, structures, shapes; negative or all-zero weights; non-finite Fishers; a zero
            Fisher with ``normalize``; ``heads`` without ``base``.
    """
    models = tuple(models)
    fishers = tuple(fishers)
    if not models:
        raise ValueError("fisher_merge needs at least one model")
    if len(fishers) != len(models):
        raise ValueError(f"got {len(models)} models but {len(fishers)} Fishers")
    validate_like(models[0], models[1:], what="models")
    ref_items = paths_and_leaves(models[0])
    for j, f in enumerate(fishers):
        if jax.tree_util.tree_structure(f) != jax.tree_util.tree_structure(models[0]):
            raise ValueError(f"fishers[{j}] does not have the models' tree structure")
        for (path, x), (_, fx) in zip(ref_items, paths_and_leaves(f)):
            if is_float(x) and np.shape(fx) != np.shape(x):
                raise ValueError(f"fishers[{j}] leaf '{path}' has shape {np.shape(fx)}, the model has {np.shape(x)}")
        check_finite(f, what=f"fishers[{j}]")
    w = np.full(len(models), 1.0 / len(models)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(models),) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"weights must be {len(models)} non-negative numbers, not all zero; got {weights}")
    if floor < 0:
        raise ValueError(f"floor must be >= 0, got {floor}")
    flags = head_flags(models[0], heads)
    if any(flags) and base is None:
        raise ValueError("heads are kept per task as base + sum_j (theta_j - base): pass base=")
    if base is not None:
        validate_like(base, models, what="models")

    merged_idx = [i for i, (_, x) in enumerate(ref_items) if is_float(x) and not flags[i]]
    if normalize:
        fisher_leaves = [jax.tree_util.tree_leaves(f) for f in fishers]
        norms = np.asarray(_global_norms([[fl[i] for i in merged_idx] for fl in fisher_leaves]), np.float64)
        if np.any(norms == 0):
            raise ValueError(f"cannot normalise: Fishers {np.flatnonzero(norms == 0).tolist()} are all zero")
        w = w / norms
    merger = chain(FisherMean(fishers, floor=float(floor), floor_mode="max"))
    return merger(models[0] if base is None else base, models, weights=jnp.asarray(w, jnp.float32), heads=heads)


def save_fisher(path: str | os.PathLike, fisher: PyTree) -> None:
    """Saves a diagonal Fisher with orbax to the new directory ``path`` (beside its model's checkpoint)."""
    save_tree(path, fisher)


def load_fisher(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Loads a Fisher saved by :func:`save_fisher`; ``like`` (e.g. the model) fixes the tree structure."""
    if like is not None:
        like = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), acc_dtype(x.dtype) if is_float(x) else x.dtype,
                                           sharding=getattr(x, "sharding", None)),
            like,
        )
    return load_tree(path, like)
