"""The Dense fast path of the diagonal Fisher: per-example kernel gradients x_n delta_n^T summed as one matmul.

References:
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from mergejax.fisher.scan import BatchSum, FisherMode, _example_keys, _params_of, _scan_examples, _sum_examples
from mergejax.model import ApplyFn, labels_of
from mergejax.tree import acc_dtype


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
