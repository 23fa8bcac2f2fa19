"""The per-example Fisher path: ``vmap(grad)`` squared scores of every float leaf, summed over a batch.

References:
    M. Matena and C. Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mergejax.fisher.scan import BatchSum, FisherMode, _example_keys, _params_of, _scan_examples, _sum_examples
from mergejax.model import ApplyFn, labels_of
from mergejax.tree import acc_dtype


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
