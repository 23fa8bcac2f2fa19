"""AdaMerging: merge coefficients learned by entropy minimisation on unlabeled data (Yang et al., ICLR 2024).

theta = theta_0 + sum_t lambda_t^l tau_t^l (Eq. 5 task-wise: one lambda per task; Eq. 6 layer-wise: one per task and
per leaf), with lambda learned by an optax optimiser (paper: Adam, lr 1e-3) on L = sum_t mean_x H(softmax(f_t(x;
theta))) over unlabeled batches of each task (Eq. 7).

In mergejax AdaMerging learns the *weights of a chain*: the per-task stages before the chain's reduction run once, on
the unweighted task vectors, and the learned coefficients are the reduction's per-task (task-wise) or per-leaf
(layer-wise) ``weights``. The default chain ``chain(Sum())`` is the paper's AdaMerging; AdaMerging++ is the chain
``chain(Trim(0.2), ElectSign(), Sum())`` (``plus_plus=True``); any other chain (DARE drop, Breadcrumbs, a Fisher
mean, ...) works the same way, as do TaskVectors and compressed (ternary) task vectors in ``finetuned``.

References:
    E. Yang, Z. Wang, L. Shen, S. Liu, G. Guo, X. Wang, D. Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
    Learning", ICLR 2024 (arXiv:2310.02575); code: EnnengYang/AdaMerging.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.merge import Merger, _run, _without_heads, assemble, chain, task_vectors_of
from mergejax.model import ApplyFn, check_batch
from mergejax.ops import ElectSign, Sum, Trim
from mergejax.tree import PyTree, TaskVector, check_finite_many, head_flags, is_float, paths_and_leaves

__all__ = [
    "Coefficients",
    "adamerging",
    "apply_coefficients",
    "entropy",
    "save_coefficients",
    "load_coefficients",
]

Granularity = Literal["task", "layer"]


@jax.tree_util.register_pytree_with_keys_class
class Coefficients:
    """Learned merge coefficients (as used in the forward pass, i.e. after clamping).

    A pytree of one array (``lambdas``); the leaf paths and the granularity are static (in the treedef), so
    ``jax.tree.map`` over coefficients works and returns coefficients.

    Attributes:
        lambdas: float32 ``[T]`` ("task") or ``[T, L]`` ("layer", column l for leaf ``paths[l]``).
        paths: the ``path_str`` paths of the L merged leaves, in flattening order.
        granularity: "task" or "layer".
    """

    __slots__ = ("lambdas", "paths", "granularity")

    def __init__(self, lambdas: Any, paths: Sequence[str], granularity: str):
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        self.lambdas = lambdas
        self.paths = tuple(paths)
        self.granularity = granularity

    def tree_flatten_with_keys(self):
        """``lambdas`` as the only child; the paths and granularity as static treedef data.

        Returns:
            ((GetAttrKey("lambdas"), lambdas),) and (paths, granularity).
        """
        return ((jax.tree_util.GetAttrKey("lambdas"), self.lambdas),), (self.paths, self.granularity)

    @classmethod
    def tree_unflatten(cls, aux: Any, children: Sequence[Any]) -> "Coefficients":
        """Rebuilds coefficients from :meth:`tree_flatten_with_keys` output without re-validating them.

        Args:
            aux: (paths, granularity).
            children: (lambdas,).

        Returns:
            The coefficients.
        """
        obj = object.__new__(cls)
        obj.lambdas, (obj.paths, obj.granularity) = children[0], aux
        return obj

    def __repr__(self) -> str:
        return f"Coefficients({self.granularity}, lambdas shape {tuple(np.shape(self.lambdas))})"

    def per_leaf(self) -> dict[str, jax.Array]:
        """``{path: [T] coefficients}`` for every merged leaf (what a chain takes as ``weights=``).

        Returns:
            {leaf path: lambda^l [T]}: one column per leaf (layer-wise, Eq. 6) or the same ``[T]`` for all (Eq. 5).
        """
        lam = jnp.asarray(self.lambdas)
        if self.granularity == "task":
            return {p: lam for p in self.paths}
        return {p: lam[:, l] for l, p in enumerate(self.paths)}


def entropy(logits: jax.Array) -> jax.Array:
    """Shannon entropy of softmax(logits) per row, in float32 (AdaMerging Eq. 7's H).

    Args:
        logits: ``[..., classes]`` logits.

    Returns:
        H = -sum_c p_c log p_c over the last axis, float32 ``[...]``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ----------------------------------------------------------------------------------------------------------------------
# The problem: task vectors transformed once, heads fixed once.
# ----------------------------------------------------------------------------------------------------------------------


def _learned_chain(chain_: Merger | None, transform: Any, plus_plus: bool, density: float) -> Merger:
    """The chain whose weights are learned: ``chain``, or AdaMerging++'s TIES chain, or ``transform``'s stages + Sum."""
    given = [name for name, v in (("chain", chain_), ("transform", transform), ("plus_plus", plus_plus or None))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of chain, transform and plus_plus, got {given} "
                         "(plus_plus is chain(Trim(density), ElectSign(), Sum()))")
    if plus_plus:
        return chain(Trim(density), ElectSign(), Sum())
    if transform is not None:
        return Merger(tuple(transform.stages[: transform.split]) + (Sum(),))
    return chain(Sum()) if chain_ is None else chain_


def _entries(base: PyTree, finetuned: Sequence[Any] | None, task_vectors: Sequence[Any] | None) -> tuple:
    if (finetuned is None) == (task_vectors is None):
        raise ValueError("pass exactly one of finetuned (models) or task_vectors (precomputed per-task vectors)")
    if finetuned is not None:
        return tuple(finetuned)
    return tuple(tv if isinstance(tv, TaskVector) or hasattr(tv, "to_task_vector") else TaskVector(tv)
                 for tv in task_vectors)


@functools.partial(jax.jit, static_argnames=("flags",))
def _prepare_jit(m: Merger, base: PyTree, tvs: tuple, key: Any, *, flags: tuple[bool, ...]):
    """(transformed head-free task vectors, base with the head leaves already final)."""
    body = tuple(_without_heads(tv, flags) for tv in tvs)
    transformed = _run(m.stages[: m.split], body, key)
    fixed = assemble(base, jax.tree_util.tree_map(jnp.zeros_like, body[0]), tvs, flags, 0.0)
    return transformed, fixed


def _weights_of(lam: jax.Array, paths: tuple[str, ...], granularity: str) -> Any:
    return lam if granularity == "task" else {p: lam[:, l] for l, p in enumerate(paths)}


def _merged(m: Merger, lam: jax.Array, fixed: PyTree, transformed: tuple, key: Any, paths: tuple[str, ...],
            granularity: str, flags: tuple[bool, ...]) -> PyTree:
    """theta_0 + R_lambda(transformed): the chain's reduction (and later stages) with the coefficients as weights."""
    weighted = m.with_weights(_weights_of(lam, paths, granularity))
    (merged,) = _run(weighted.stages[m.split:], transformed, key, offset=m.split)
    return assemble(fixed, merged, (), flags, 1.0)


_merged_jit = jax.jit(_merged, static_argnames=("paths", "granularity", "flags"))


# ----------------------------------------------------------------------------------------------------------------------
# The training step.
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _default_optimizer(lr: float) -> optax.GradientTransformation:
    return optax.adam(lr)


@functools.lru_cache(maxsize=32)
def _make_step(
    apply_fn: ApplyFn, tasks: tuple[int, ...], paths: tuple[str, ...], granularity: str, flags: tuple[bool, ...],
    clamp: bool, batch_size: int, opt: optax.GradientTransformation,
) -> Callable[..., Any]:
    """One jitted AdaMerging step: sample, merge, forward every task, entropy, gradient, optimiser update.

    Cached on its static configuration, so repeated runs (another key, other data of the same shapes) do not
    recompile. The step number ``s`` is carried on device (batch keys are ``fold_in(key, s)``) and, per task, the
    first step whose logits were not finite (``bad_step``), so the host does nothing between steps.
    """

    def loss_fn(raw, m, fixed, transformed, k_reduce, batches):
        lam = jnp.clip(raw, 0.0, 1.0) if clamp else raw
        params = _merged(m, lam, fixed, transformed, k_reduce, paths, granularity, flags)
        ents, finite = [], []
        for t, batch in zip(tasks, batches):
            logits = apply_fn(params, batch, t)
            ents.append(entropy(logits).mean())
            finite.append(jnp.all(jnp.isfinite(logits)))
        ents = jnp.stack(ents)
        return ents.sum(), (ents, jnp.stack(finite))

    def step(raw, opt_state, bad_step, s, key, m, fixed, transformed, k_reduce, data):
        keys = jax.random.split(jax.random.fold_in(key, s), len(data))
        batches = []
        for k, d in zip(keys, data):
            n = jax.tree_util.tree_leaves(d)[0].shape[0]
            idx = jax.random.randint(k, (batch_size,), 0, n)
            batches.append(jax.tree_util.tree_map(lambda a: a[idx], d))
        (loss, (ents, finite)), grad = jax.value_and_grad(loss_fn, has_aux=True)(
            raw, m, fixed, transformed, k_reduce, tuple(batches))
        updates, opt_state = opt.update(grad, opt_state, raw)
        bad_step = jnp.where(finite | (bad_step >= 0), bad_step, s)
        return optax.apply_updates(raw, updates), opt_state, bad_step, s + 1, loss

    return jax.jit(step, donate_argnums=(0, 1, 2, 3))


class _Problem:
    """Everything a run needs that does not change between steps."""

    def __init__(self, base, finetuned, task_vectors, heads, m: Merger, key):
        entries = _entries(base, finetuned, task_vectors)
        dense = [e for e in entries if not hasattr(e, "to_task_vector")]
        check_finite_many([base, *dense], what=["base", *[f"finetuned[{i}]" for i in range(len(dense))]])
        tvs = task_vectors_of(base, entries)
        self.flags = tuple(head_flags(base, heads))
        items = paths_and_leaves(base)
        self.paths = tuple(p for (p, x), f in zip(items, self.flags) if is_float(x) and not f)
        if not self.paths:
            raise ValueError("no float leaf is left to merge: every float leaf is a head")
        m._check_key(key)
        k_transform, self.k_reduce = (None, None) if key is None else tuple(jax.random.split(key))
        self.transformed, self.fixed = _prepare_jit(m, base, tvs, k_transform, flags=self.flags)
        self.n_tasks = len(tvs)


def adamerging(
    apply_fn: ApplyFn,
    base: PyTree,
    finetuned: Sequence[Any] | None,
    unlabeled: Sequence[Any],
    *,
    granularity: Granularity = "task",
    steps: int = 500,
    optimizer: optax.GradientTransformation | None = None,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: bool = True,
    chain: Merger | None = None,
    plus_plus: bool = False,
    density: float = 0.2,
    key: jax.Array,
    batch_size: int = 16,
    task_vectors: Sequence[Any] | None = None,
    transform: Any = None,
    heads: str | PyTree | None = None,
    tasks: Sequence[int] | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> tuple[PyTree, Coefficients]:
    """Learns task-wise or layer-wise merge coefficients by test-time entropy minimisation (AdaMerging, Eqs. 5-7).

    Each step samples ``batch_size`` examples (with replacement) from every task's unlabeled set, merges
    theta = theta_0 + R(clip(lambda, 0, 1), S(tau)) (S: the chain's stages before its reduction R, run once; R gets
    the coefficients as per-task or per-leaf ``weights``; for the default ``chain(Sum())`` this is
    sum_t lambda_t^l tau_t^l), runs every task's head on its batch, and takes one optimiser step on the summed mean
    entropies; the whole step is one jitted function (task vectors placed with a ``NamedSharding`` stay sharded).
    Leaves named by ``heads`` are not learned: each task keeps its own head (base + sum_t tau_t there).

    Memory peak: base + T transformed task vectors (acc dtype) + one merged model + activations/gradients of T batches.

    Args:
        apply_fn: ``apply_fn(params, batch, task) -> logits``.
        base: pre-trained parameters theta_0.
        finetuned: T fine-tuned models, TaskVectors or compressed task vectors (or None with ``task_vectors``).
        unlabeled: T unlabeled data sets, one per task: pytrees of arrays with the examples on the leading axis
            (labels, if present, are passed to ``apply_fn`` but never used).
        granularity: "task" (lambdas ``[T]``) or "layer" (``[T, L]``, one per task and merged leaf).
        steps: optimiser steps (paper: 500).
        optimizer: an optax ``GradientTransformation`` (default ``optax.adam(lr)``, the paper's).
        lr: learning rate of the default optimiser (paper: 1e-3).
        init: initial value of every coefficient (paper: 0.3).
        clamp: clip coefficients to [0, 1] in the forward pass (paper: yes).
        chain: the merge chain whose reduction weights are learned (default ``chain(Sum())``: AdaMerging).
        plus_plus: AdaMerging++, i.e. ``chain=chain(Trim(density), ElectSign(), Sum())``.
        density: TIES trim density of ``plus_plus``.
        key: PRNG key for batch sampling (and for a random chain stage, e.g. DARE).
        batch_size: examples per task per step (paper: 16).
        task_vectors: precomputed per-task vectors instead of ``finetuned`` (kept for compatibility: TaskVectors in
            ``finetuned`` do the same).
        transform: a ``Merger`` whose stages before its reduction are applied first (the learned coefficients weight
            a ``Sum``); prefer ``chain``.
        heads: leaves kept per task (regex over ``path_str`` paths or a bool mask tree).
        tasks: the task index passed to ``apply_fn`` for each of the T tasks (default 0..T-1).
        progress: show a progress bar with the current entropy.
        log_every: steps between progress updates and finiteness checks (each one syncs with the device).

    Returns:
        ``(merged, coefficients)``: the merged tree (base dtypes) and the learned (clamped) :class:`Coefficients`.

    Raises:
        ValueError: inconsistent models, task counts or data; unknown granularity; a heads pattern naming no leaf;
            batches that do not fit the model; NaN/Inf logits (naming the task and step).

    Example:
        >>> merged, coef = adamerging(apply_fn, base, finetuned, unlabeled, key=jax.random.key(0))  # doctest: +SKIP
    """
    if granularity not in ("task", "layer"):
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    if steps < 0 or batch_size < 1 or log_every < 1:
        raise ValueError(f"need steps >= 0, batch_size >= 1, log_every >= 1; got {steps}, {batch_size}, {log_every}")
    m = _learned_chain(chain, transform, plus_plus, density)
    k_chain, k_steps = jax.random.split(key)
    prob = _Problem(base, finetuned, task_vectors, heads, m, k_chain)
    n_tasks = prob.n_tasks
    tasks = tuple(range(n_tasks)) if tasks is None else tuple(int(t) for t in tasks)
    unlabeled = tuple(unlabeled)
    if len(unlabeled) != n_tasks or len(tasks) != n_tasks:
        raise ValueError(f"got {n_tasks} task vectors, {len(unlabeled)} unlabeled sets and {len(tasks)} task ids")
    data = tuple(jax.tree_util.tree_map(jnp.asarray, d) for d in unlabeled)
    for t, d in enumerate(data):
        sample = jax.tree_util.tree_map(lambda a: a[:batch_size], d)
        check_batch(apply_fn, base, sample, tasks[t], what=f"unlabeled[{t}]")

    shape = (n_tasks,) if granularity == "task" else (n_tasks, len(prob.paths))
    raw = jnp.full(shape, init, jnp.float32)
    opt = _default_optimizer(float(lr)) if optimizer is None else optimizer
    step = _make_step(apply_fn, tasks, prob.paths, granularity, prob.flags, bool(clamp), int(batch_size), opt)
    opt_state = opt.init(raw)
    bad_step = jnp.full((n_tasks,), -1, jnp.int32)
    counter = jnp.int32(1)  # the step number, carried on device: no host work between steps

    bar = _progress_bar(steps, progress)
    try:
        for s in range(steps):
            raw, opt_state, bad_step, counter, loss = step(raw, opt_state, bad_step, counter, k_steps, m, prob.fixed,
                                                           prob.transformed, prob.k_reduce, data)
            if (s + 1) % log_every == 0 or s + 1 == steps:
                bad = np.asarray(bad_step)
                if (bad >= 0).any():
                    first = np.where(bad >= 0, bad, np.iinfo(np.int32).max)
                    t = int(np.argmin(first))
                    raise ValueError(f"apply_fn returned NaN or Inf logits for task {tasks[t]} (first at step {bad[t]})")
                if bar is not None:
                    bar.set_postfix(entropy=f"{float(loss):.4f}")
                    bar.update((s + 1) - bar.n)
    finally:
        if bar is not None:
            bar.close()
    lam = jnp.clip(raw, 0.0, 1.0) if clamp else raw
    coefficients = Coefficients(lam, prob.paths, granularity)
    merged = _merged_jit(m, lam, prob.fixed, prob.transformed, prob.k_reduce, paths=prob.paths,
                         granularity=granularity, flags=prob.flags)
    return merged, coefficients


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="AdaMerging", unit="step")


def apply_coefficients(
    base: PyTree,
    finetuned: Sequence[Any] | None,
    coefficients: Coefficients,
    *,
    task_vectors: Sequence[Any] | None = None,
    chain: Merger | None = None,
    transform: Any = None,
    plus_plus: bool = False,
    density: float = 0.2,
    heads: str | PyTree | None = None,
    key: jax.Array | None = None,
) -> PyTree:
    """Redoes a merge with saved coefficients, without training.

    Pass the same models (or task vectors), ``heads`` and ``chain``/``plus_plus``/``transform`` as at training; for a
    random chain (DARE) also the ``key`` that was given to :func:`adamerging` (the chain's key is derived the same way).

    Args:
        base: the pre-trained model theta_0.
        finetuned: T fine-tuned models (or None with ``task_vectors``).
        coefficients: learned coefficients, from :func:`adamerging` or :func:`load_coefficients`.
        task_vectors: T task vectors instead of ``finetuned``.
        chain: the merge chain whose reduction was weighted at training.
        transform: the ``transform`` used at training.
        plus_plus: AdaMerging++ (TIES trim and sign election before the weighted sum).
        density: the AdaMerging++ trim density.
        heads: leaves kept per task (regex or bool mask).
        key: the ``jax.random`` key given to :func:`adamerging`, for a random chain.

    Returns:
        The merged model theta_0 + sum_t lambda_t^l tau_t^l (Eq. 5/6), in the base's dtypes.

    Raises:
        ValueError: when the coefficients' leaf paths or task count do not match the models, or more than one of
            ``chain``, ``plus_plus`` and ``transform`` are given.
    """
    m = _learned_chain(chain, transform, plus_plus, density)
    k_chain = None if key is None else jax.random.split(key)[0]
    prob = _Problem(base, finetuned, task_vectors, heads, m, k_chain)
    lam = jnp.asarray(coefficients.lambdas, jnp.float32)
    if tuple(coefficients.paths) != prob.paths or lam.shape[0] != prob.n_tasks:
        raise ValueError(
            f"coefficients are for {lam.shape[0]} tasks and leaves {list(coefficients.paths)[:4]}..., but the models "
            f"have {prob.n_tasks} tasks and merged leaves {list(prob.paths)[:4]}..."
        )
    return _merged_jit(m, lam, prob.fixed, prob.transformed, prob.k_reduce, paths=prob.paths,
                       granularity=coefficients.granularity, flags=prob.flags)


def save_coefficients(path: str | os.PathLike, coefficients: Coefficients) -> None:
    """Saves coefficients with orbax to the new directory ``path`` (array item + JSON metadata item).

    Args:
        path: a directory that does not exist yet.
        coefficients: the coefficients to save.
    """
    import orbax.checkpoint as ocp

    meta = {"paths": list(coefficients.paths), "granularity": coefficients.granularity}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(
            os.path.abspath(path),
            ocp.args.Composite(
                lambdas=ocp.args.StandardSave({"lambdas": jnp.asarray(coefficients.lambdas)}),
                meta=ocp.args.JsonSave(meta),
            ),
        )


def load_coefficients(path: str | os.PathLike) -> Coefficients:
    """Loads coefficients saved by :func:`save_coefficients`.

    Args:
        path: the directory written by :func:`save_coefficients`.

    Returns:
        The coefficients, with their leaf paths and granularity.
    """
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        out = ckpt.restore(
            os.path.abspath(path),
            ocp.args.Composite(lambdas=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
    return Coefficients(jnp.asarray(out["lambdas"]["lambdas"]), tuple(out["meta"]["paths"]), out["meta"]["granularity"])
