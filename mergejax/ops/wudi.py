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
costs one (out x in)(in x in) product instead of the reference's T (out x in)(in x out) products and their backward
pass; the iterates are the same up to float rounding. Adam is elementwise, so one ``optax.adam`` state over all
matrices equals one optimiser per matrix.

Orientation without transposes. A Flax kernel X = tau^T (in, out) is never transposed: its Gram is X X^T, and the
gradient in its own layout is 2 (A D + C^T) (A is symmetric), so every product is a plain 2-D matrix product on the
stored array.

Performance (why per matrix, with 2-D products). XLA:CPU (jaxlib 0.10) hands a dot and its elementwise
neighbours to a YNNPACK fusion; for a *batched* dot (same-shaped matrices or the T tasks stacked) fused with the
subtraction tau_0 - tau_i and the sum over tasks, that fusion ran 20-60x slower than the same products as 2-D dots
(38 s against 0.6 s for the statistics of one (3072, 768) matrix at T = 4; 1.4 s with
``--xla_cpu_experimental_ynn_fusion_type=`` disabling the fusion). So nothing here is stacked: per matrix, T 2-D
Gram products and T 2-D products for C, and per Adam step one 2-D product. An eager call runs leaf by leaf
(:mod:`mergejax.ops.schedule`: this stage is ``leafwise``): one program per matrix signature, compiled once and run
matrix after matrix from the host; under the caller's ``jit`` it is one program with one ``fori_loop`` over all
matrices.

Memory: per matrix, its T task matrices, then during the loop delta, Adam's two moments, A (in x in) and C (out x in):
leaf by leaf about 5 float32 copies of one matrix; as one program, of the matrix part of the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal, Sequence

import jax
import jax.numpy as jnp
import optax

from mergejax.ops.base import Reduction, TaskVectors
from mergejax.ops.matrix import (
    Layout, MatrixAxes, PreWeightedInputs, check_layout, matrix_axes_rules, matrix_view, mean_leaves, place,
    resolve_path_rules, sharding_of, static, transposes, warn_non_matrix,
)
from mergejax.tree import is_float, path_str

__all__ = ["wudi_statistics", "wudi_gradient", "wudi_loss", "wudi_optimize", "WUDI"]

Normalize = Literal["squared", "norm"]


def _weight(x: jax.Array, normalize: Normalize) -> jax.Array:
    """1 / ||tau_i||_F^2 (or 1 / ||tau_i||_F), 0 for a zero task vector."""
    sq = jnp.sum(x * x)
    d = sq if normalize == "squared" else jnp.sqrt(sq)
    return jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)


def _gram(x: jax.Array, flip: bool) -> jax.Array:
    """tau^T tau for tau = x (out, in), or for tau = x^T when ``flip`` (x stored (in, out)): x x^T."""
    return x @ x.T if flip else x.T @ x


def _times_gram(m: jax.Array, g: jax.Array, flip: bool) -> jax.Array:
    """m G in the PyTorch orientation, written in the stored one: G m when ``flip`` (G is symmetric)."""
    return g @ m if flip else m @ g


def wudi_statistics(
    xs: Sequence[jax.Array], normalize: Normalize = "squared", *, flip: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(A, C) of one matrix from its T task matrices, with 2-D products only.

    A = sum_i w_i G_i and C = sum_i w_i (tau_0 - tau_i) G_i, G_i = tau_i^T tau_i, w_i = 1 / ||tau_i||^2 and
    tau_0 = sum_i tau_i the starting point, so that the gradient at tau_0 + delta is 2 (delta A + C). The differences
    tau_0 - tau_i are formed before any product (as the reference forms tau_m - tau_i), so a zero gradient stays
    exactly zero (T = 1) instead of becoming rounding noise that Adam would amplify into lr-sized steps.

    Args:
      xs: the T task matrices (a sequence, or an array [T, m, n]), PyTorch (out, in) unless ``flip``.
      normalize: "squared" (1 / ||tau_i||^2) or "norm" (1 / ||tau_i||).
      flip: the matrices are stored transposed (Flax kernels, (in, out)); C is then returned in that layout.

    Returns:
      (A, C): A (in x in), C shaped like one task matrix.
    """
    xs = list(xs)
    tau0 = sum(xs[1:], xs[0])
    a = c = None
    for x in xs:
        w = _weight(x, normalize)
        g = _gram(x, flip)
        a = w * g if a is None else a + w * g
        term = w * _times_gram(tau0 - x, g, flip)
        c = term if c is None else c + term
    return a, c


def wudi_gradient(delta: jax.Array, a: jax.Array, c: jax.Array, flip: bool = False) -> jax.Array:
    """dL/dtau_m at tau_m = tau_0 + delta: 2 (delta A + C), in the stored layout (``flip``: 2 (A delta + C))."""
    return 2.0 * (_times_gram(delta, a, flip) + c)


def wudi_loss(tau_m: jax.Array, xs: jax.Array, normalize: Normalize = "squared") -> jax.Array:
    """L(tau_m) of Eq. 9, literally (for monitoring and tests): ``xs`` [T, out, in]."""
    prod = jnp.einsum("oi,tpi->top", tau_m, xs) - jnp.einsum("toi,tpi->top", xs, xs)
    return sum(_weight(xs[t], normalize) * jnp.sum(prod[t] * prod[t]) for t in range(xs.shape[0]))


_BARS: dict = {}


def _progress(step, *, total: int, tag: int, desc: str):
    """Host side of the progress bar (called through ``jax.debug.callback``; idempotent per step)."""
    from tqdm.auto import tqdm

    step = int(step)
    bar = _BARS.get(tag)
    if bar is None:
        bar = _BARS[tag] = tqdm(total=total, desc=desc, leave=False)
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
    flips: Sequence[bool] | None = None,
    progress: bool = False,
    desc: str = "WUDI",
) -> list[jax.Array]:
    """Runs ``steps`` Adam steps (torch defaults: b1 0.9, b2 0.999, eps 1e-8, no weight decay) on every matrix at once.

    The iterate is parameterised as tau_0 + delta (delta starts at 0), see :func:`wudi_statistics`.

    Args:
      init: the starting matrices tau_0, one per matrix (stored layout).
      stats: per matrix the (A, C) of :func:`wudi_statistics`.
      steps: number of Adam steps (static).
      lr: learning rate.
      flips: per matrix, whether it is stored transposed (default: none is).
      progress: show a tqdm bar (updated from inside the compiled loop every ~1% of the steps).
      desc: the bar's label.

    Returns:
      The optimised matrices tau_m, in the stored layout.
    """
    flips = [False] * len(init) if flips is None else list(flips)
    opt = optax.adam(lr)
    zeros = [jnp.zeros_like(x) for x in init]
    state = opt.init(zeros)
    every = max(1, steps // 100)
    tag = id(init)

    def body(i, carry):
        params, st = carry
        grads = [wudi_gradient(p, a, c, f) for p, (a, c), f in zip(params, stats, flips)]
        updates, st = opt.update(grads, st, params)
        params = optax.apply_updates(params, updates)
        if progress:
            jax.lax.cond(
                ((i + 1) % every == 0) | (i + 1 == steps),
                lambda: jax.debug.callback(partial(_progress, total=steps, tag=tag, desc=desc), i + 1),
                lambda: None,
            )
        return params, st

    delta, _ = jax.lax.fori_loop(0, steps, body, (zeros, state))
    return [x + d for x, d in zip(init, delta)]


@dataclass(frozen=True)
class WUDI(PreWeightedInputs, Reduction):
    """Reduction: WUDI merging of every matrix leaf (PyTorch orientation), the mean elsewhere.

    Args:
      steps: Adam steps (official: 300).
      lr: Adam learning rate (official: 1e-5).
      normalize: "squared" (1/||tau_i||^2: paper, FusionBench) or "norm" (1/||tau_i||: the official ViT script).
      layout, transpose: orientation rule of :mod:`mergejax.ops.matrix`.
      exclude: path regex of matrix leaves to average instead.
      progress: show a progress bar (one per matrix when run leaf by leaf).
      matrix_axes: how N-D leaves are viewed as matrices (None: averaged, as the reference): -1 for Flax conv
        kernels (kh, kw, in, out) -> (kh*kw*in, out), then oriented (out, kh*kw*in); 1 with ``layout="torch"`` for
        PyTorch conv weights (:func:`mergejax.ops.matrix.matrix_view`).
    """

    steps: int = static(300)
    lr: float = 1e-5
    normalize: Normalize = static("squared")
    layout: Layout = static("flax")
    transpose: str | None = static(None)
    exclude: str | None = static(None)
    progress: bool = static(True)
    matrix_axes: MatrixAxes = static(None)
    leafwise: ClassVar[bool] = True  # per matrix; the path rules are resolved per leaf by at_leaf

    def __post_init__(self):
        check_layout(self.layout)
        object.__setattr__(self, "matrix_axes", matrix_axes_rules(self.matrix_axes))
        if int(self.steps) < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps!r}")
        if self.normalize not in ("squared", "norm"):
            raise ValueError(f"normalize must be 'squared' or 'norm', got {self.normalize!r}")

    def at_leaf(self, path: str) -> "WUDI":
        """This stage for the one leaf at ``path`` (see :func:`resolve_path_rules`)."""
        return resolve_path_rules(self, path)

    def check_model(self, base) -> None:
        """Warns when most of ``base``'s parameters are not matrices (:func:`warn_non_matrix`); called once per merge."""
        warn_non_matrix(base, method="wudi", matrix_axes=self.matrix_axes, exclude=self.exclude)

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        flat = [jax.tree_util.tree_flatten_with_path(t) for t in tvs]
        treedef = jax.tree_util.tree_structure(tvs[0])
        paths = [path_str(p) for p, _ in flat[0][0]]
        columns = [list(c) for c in zip(*[[leaf for _, leaf in f[0]] for f in flat])]
        out = [c[0] for c in columns]
        mats, init, stats, flips = [], [], [], []
        for i, (path, col) in enumerate(zip(paths, columns)):
            if not is_float(col[0]):
                continue
            view = matrix_view(path, jnp.shape(col[0]), matrix_axes_rules(self.matrix_axes))
            if view is None or (self.exclude is not None and re.search(self.exclude, path)):
                out[i] = mean_leaves(col)
                continue
            flip = transposes(path, self.layout, self.transpose)
            col = [jnp.reshape(x, view) for x in col]  # an N-D leaf viewed as a matrix (a no-op on 2-D ones)
            mats.append(i)
            flips.append(flip)
            init.append(sum(col[1:], col[0]))
            stats.append(wudi_statistics(col, self.normalize, flip=flip))
        if mats:
            desc = "WUDI" if len(mats) > 1 else f"WUDI {tuple(jnp.shape(columns[mats[0]][0]))}"
            merged = wudi_optimize(init, stats, steps=int(self.steps), lr=self.lr, flips=flips,
                                   progress=self.progress, desc=desc)
            for i, m in zip(mats, merged):
                out[i] = place(jnp.reshape(m, jnp.shape(columns[i][0])), sharding_of(columns[i][0]))
        return (jax.tree_util.tree_unflatten(treedef, out),)
