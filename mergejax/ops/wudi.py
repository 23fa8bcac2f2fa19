"""WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It", Eq. 9).

Per matrix, starting from tau_m = sum_i tau_i, minimise with Adam

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

(tau in PyTorch (out, in) orientation: the interference of the merged layer on the inputs each task's rows span).
Reference code: nathanielyvo/WUDI-Merging ``vit/coef.py::get_redundant_task_vector`` (Adam lr 1e-5, 300 steps, divides
by ||tau_i||_F, not squared) and FusionBench ``method/wudi/wudi.py`` (divides by ||tau_i||_F^2, as the paper; 400 steps
in its config). Defaults here: lr 1e-5 and 300 steps (the official repository), the squared norm (the paper and
FusionBench); ``normalize="norm"`` gives the official ViT script's weighting. Non-matrix leaves are averaged
(FusionBench; the official script leaves them at the pre-trained value).

Computation. The gradient is 2 sum_i (tau_m - tau_i) G_i / n_i with the Gram matrices G_i = tau_i^T tau_i, so
with A = sum_i G_i / n_i (in x in) and C = sum_i (tau_0 - tau_i) G_i / n_i (out x in), computed once, every step
costs one
(out x in)(in x in) product instead of the reference's T (out x in)(in x out) products and their backward pass;
the iterates are the same up to float rounding. All matrices of the model run in one ``lax.fori_loop`` with one
``optax.adam`` state (Adam is elementwise, so this equals one optimiser per matrix). A task with tau_i = 0
contributes nothing (the reference divides 0 by 0).

Memory: for every matrix, its T task matrices stacked once (to form A and C), then during the loop delta, Adam's
two moments, A (in x in) and C (out x in): about 5 float32 copies of the matrix part of the model plus the Grams.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from mergejax.ops.base import Reduction, TaskVectors
from mergejax.ops.matrix import Layout, PreWeightedInputs, check_layout, collect_matrices, mean_leaves, rebuild, static

__all__ = ["wudi_statistics", "wudi_gradient", "wudi_loss", "wudi_optimize", "WUDI"]

Normalize = Literal["squared", "norm"]


def _weights(xs: jax.Array, normalize: Normalize) -> jax.Array:
    """Per task 1 / ||tau_i||_F^2 (or 1 / ||tau_i||_F), 0 for a zero task vector. ``xs``: [..., T, m, n]."""
    sq = jnp.sum(xs * xs, axis=(-2, -1))
    d = sq if normalize == "squared" else jnp.sqrt(sq)
    return jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)


def wudi_statistics(xs: jax.Array, normalize: Normalize = "squared") -> tuple[jax.Array, jax.Array]:
    """(A, C) for stacked ``xs`` [..., T, out, in]: A = sum_i w_i G_i and C = sum_i w_i (tau_0 - tau_i) G_i, with
    G_i = tau_i^T tau_i, w_i = 1 / ||tau_i||^2 and tau_0 = sum_i tau_i the starting point, so that the gradient at
    tau_0 + delta is 2 (delta A + C). The differences tau_0 - tau_i are formed before any product (as the reference
    forms tau_m - tau_i), so a zero gradient stays exactly zero (T = 1) instead of becoming rounding noise that Adam
    would amplify into lr-sized steps."""
    w = _weights(xs, normalize)[..., None, None]
    grams = jnp.einsum("...tki,...tkj->...tij", xs, xs)
    a = jnp.sum(w * grams, axis=-3)
    d0 = jnp.sum(xs, axis=-3, keepdims=True) - xs
    c = jnp.sum(w * jnp.einsum("...tok,...tkj->...toj", d0, grams), axis=-3)
    return a, c


def wudi_gradient(delta: jax.Array, a: jax.Array, c: jax.Array) -> jax.Array:
    """dL/dtau_m at tau_m = tau_0 + delta: 2 (delta A + C)."""
    return 2.0 * (delta @ a + c)


def wudi_loss(tau_m: jax.Array, xs: jax.Array, normalize: Normalize = "squared") -> jax.Array:
    """L(tau_m) of Eq. 9, literally (for monitoring and tests): ``xs`` [T, out, in]."""
    prod = jnp.einsum("oi,tpi->top", tau_m, xs) - jnp.einsum("toi,tpi->top", xs, xs)
    return jnp.sum(_weights(xs, normalize) * jnp.sum(prod * prod, axis=(-2, -1)))


_BARS: dict = {}


def _progress(step, *, total: int, tag: int):
    """Host side of the progress bar (called through ``jax.debug.callback``; idempotent per step)."""
    from tqdm.auto import tqdm

    step = int(step)
    bar = _BARS.get(tag)
    if bar is None:
        bar = _BARS[tag] = tqdm(total=total, desc="WUDI", leave=False)
    if step > bar.n:
        bar.update(step - bar.n)
    if step >= total:
        bar.close()
        _BARS.pop(tag, None)


def wudi_optimize(
    init: list[jax.Array],
    stats: list[tuple[jax.Array, jax.Array]],
    *,
    steps: int,
    lr: float,
    progress: bool = False,
) -> list[jax.Array]:
    """Runs ``steps`` Adam steps (torch defaults: b1 0.9, b2 0.999, eps 1e-8, no weight decay) on every matrix at once.

    The iterate is parameterised as tau_0 + delta (delta starts at 0), see :func:`wudi_statistics`.

    Args:
      init: the starting matrices tau_0 (stacked per shape group, [B, out, in]).
      stats: per group the (A, B) of :func:`wudi_statistics`.
      steps: number of Adam steps (static).
      lr: learning rate.
      progress: show a tqdm bar (updated from inside the compiled loop every ~1% of the steps).
    """
    opt = optax.adam(lr)
    zeros = [jnp.zeros_like(x) for x in init]
    state = opt.init(zeros)
    every = max(1, steps // 100)
    tag = id(init)

    def body(i, carry):
        params, st = carry
        grads = [wudi_gradient(p, a, b) for p, (a, b) in zip(params, stats)]
        updates, st = opt.update(grads, st, params)
        params = optax.apply_updates(params, updates)
        if progress:
            jax.lax.cond(
                ((i + 1) % every == 0) | (i + 1 == steps),
                lambda: jax.debug.callback(partial(_progress, total=steps, tag=tag), i + 1),
                lambda: None,
            )
        return params, st

    delta, _ = jax.lax.fori_loop(0, steps, body, (zeros, state))
    return [x + d for x, d in zip(init, delta)]


@dataclass(frozen=True)
class WUDI(PreWeightedInputs, Reduction):
    """Reduction: WUDI merging of every 2-D leaf (PyTorch orientation), the mean elsewhere.

    Args:
      steps: Adam steps (official: 300).
      lr: Adam learning rate (official: 1e-5).
      normalize: "squared" (1/||tau_i||^2: paper, FusionBench) or "norm" (1/||tau_i||: the official ViT script).
      layout, transpose: orientation rule of :mod:`mergejax.ops.matrix`.
      exclude: path regex of 2-D leaves to average instead.
      progress: show a progress bar.
    """

    steps: int = static(300)
    lr: float = 1e-5
    normalize: Normalize = static("squared")
    layout: Layout = static("flax")
    transpose: str | None = static(None)
    exclude: str | None = static(None)
    progress: bool = static(True)

    def __post_init__(self):
        check_layout(self.layout)
        if int(self.steps) < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps!r}")
        if self.normalize not in ("squared", "norm"):
            raise ValueError(f"normalize must be 'squared' or 'norm', got {self.normalize!r}")

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        groups, leaves0, columns, other, treedef = collect_matrices(
            tvs, layout=self.layout, transpose=self.transpose, exclude=self.exclude, orient=True
        )
        init, stats = [], []
        for g in groups:
            xs = jnp.stack(g.stacks, axis=1)  # [B, T, out, in]
            init.append(jnp.sum(xs, axis=1))
            stats.append(wudi_statistics(xs, self.normalize))
        merged = wudi_optimize(init, stats, steps=int(self.steps), lr=self.lr, progress=self.progress) if groups else []
        return (rebuild(groups, merged, leaves0, columns, other, treedef, mean_leaves),)
