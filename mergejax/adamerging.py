"""AdaMerging: merge coefficients learned by entropy minimisation on unlabeled data (Yang et al., ICLR 2024).

theta = theta_0 + sum_t lambda_t^l tau_t^l (Eq. 5 task-wise: one lambda per task; Eq. 6 layer-wise: one per task and
per leaf), with lambda learned by Adam on L = sum_t mean_x H(softmax(f_t(x; theta))) over unlabeled batches of each task
(Eq. 7). AdaMerging++ does the same on each task's TIES-trimmed, sign-agreeing task vector. Because the merged model is
linear in the per-task vectors, the coefficients can be learned on top of any per-task transform of the core (DARE
drop, Breadcrumbs, ternary task vectors): pass the transformed vectors as ``task_vectors`` or the chain as ``transform``.

References:
    E. Yang, Z. Wang, L. Shen, S. Liu, G. Guo, X. Wang, D. Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
    Learning", ICLR 2024 (arXiv:2310.02575); code: EnnengYang/AdaMerging.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.model import ApplyFn, check_batch, head_flags
from mergejax.tree import PyTree, acc_dtype, as_tree, check_finite, is_float, paths_and_leaves, validate_like

__all__ = [
    "Coefficients",
    "adamerging",
    "apply_coefficients",
    "entropy",
    "save_coefficients",
    "load_coefficients",
]

Granularity = Literal["task", "layer"]


class Coefficients(NamedTuple):
    """Learned merge coefficients (as used in the forward pass, i.e. after clamping).

    Attributes:
        lambdas: float32 ``[T]`` ("task") or ``[T, L]`` ("layer", column l for leaf ``paths[l]``).
        paths: the ``path_str`` paths of the L merged leaves, in flattening order.
        granularity: "task" or "layer".
    """

    lambdas: jax.Array
    paths: tuple[str, ...]
    granularity: str

    def per_leaf(self) -> dict[str, jax.Array]:
        """``{path: [T] coefficients}`` for every merged leaf."""
        if self.granularity == "task":
            return {p: self.lambdas for p in self.paths}
        return {p: self.lambdas[:, l] for l, p in enumerate(self.paths)}


def entropy(logits: jax.Array) -> jax.Array:
    """Shannon entropy of softmax(logits) per row, in float32 (AdaMerging Eq. 7's H)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class _Problem(NamedTuple):
    treedef: Any
    fixed: list[Any]  # every leaf: theta_0 at merged positions, final values elsewhere (heads, non-float)
    merged_idx: tuple[int, ...]
    paths: tuple[str, ...]
    tvs: tuple[list[jax.Array], ...]  # T lists of L task-vector leaves (acc dtype)


def _as_task_vector(tv: Any) -> PyTree:
    return tv.to_task_vector() if hasattr(tv, "to_task_vector") else as_tree(tv)


def _prepare(
    base: PyTree,
    finetuned: Sequence[PyTree] | None,
    task_vectors: Sequence[PyTree] | None,
    heads: str | PyTree | None,
    transform: Any,
    key: jax.Array | None,
) -> _Problem:
    """Splits the models into fixed leaves and the per-task vectors of the merged leaves (after ``transform``)."""
    if (finetuned is None) == (task_vectors is None):
        raise ValueError("pass exactly one of finetuned (models) or task_vectors (precomputed per-task vectors)")
    if finetuned is not None:
        finetuned = tuple(finetuned)
        if not finetuned:
            raise ValueError("finetuned is empty: need at least one model")
        validate_like(base, finetuned, what="finetuned")
        for i, m in enumerate(finetuned):
            check_finite(m, what=f"finetuned[{i}]")
    else:
        task_vectors = tuple(_as_task_vector(tv) for tv in task_vectors)
        if not task_vectors:
            raise ValueError("task_vectors is empty: need at least one task vector")
        if any(jax.tree_util.tree_structure(tv) != jax.tree_util.tree_structure(base) for tv in task_vectors):
            raise ValueError("every task vector must have the base's tree structure")
        for t, tv in enumerate(task_vectors):
            for (path, b), (_, x) in zip(paths_and_leaves(base), paths_and_leaves(tv)):
                if is_float(b) and np.shape(x) != np.shape(b):
                    raise ValueError(f"task_vectors[{t}] leaf '{path}' has shape {np.shape(x)}, the base {np.shape(b)}")
            check_finite(tv, what=f"task_vectors[{t}]")
    check_finite(base, what="base")
    flags = head_flags(base, heads)
    items = paths_and_leaves(base)
    leaves, treedef = jax.tree_util.tree_flatten(base)
    merged_idx = tuple(i for i, (_, x) in enumerate(items) if is_float(x) and not flags[i])
    if not merged_idx:
        raise ValueError("no float leaf is left to merge: every float leaf is a head")
    if finetuned is not None:
        ft_leaves = [jax.tree_util.tree_leaves(m) for m in finetuned]
        tv_leaves = [[jnp.asarray(fl[i], acc_dtype(leaves[i].dtype)) - jnp.asarray(leaves[i], acc_dtype(leaves[i].dtype))
                      if is_float(leaves[i]) else None for i in range(len(leaves))] for fl in ft_leaves]
    else:
        tv_leaves = [[jnp.asarray(x, acc_dtype(leaves[i].dtype)) if is_float(leaves[i]) else None
                      for i, x in enumerate(jax.tree_util.tree_leaves(tv))] for tv in task_vectors]
    fixed = list(leaves)
    for i, flag in enumerate(flags):
        if flag and is_float(leaves[i]):  # heads: each task keeps what it changed, with coefficient 1
            dt = acc_dtype(leaves[i].dtype)
            fixed[i] = (jnp.asarray(leaves[i], dt) + sum(tv[i] for tv in tv_leaves)).astype(leaves[i].dtype)
    tvs = tuple([tv[i] for i in merged_idx] for tv in tv_leaves)
    if transform is not None:
        tvs = tuple(list(t) for t in transform.transform(tvs, key=key))
    return _Problem(treedef, fixed, merged_idx, tuple(items[i][0] for i in merged_idx), tvs)


def _merged_params(lam: jax.Array, fixed: list[Any], tvs: tuple[list[jax.Array], ...], merged_idx: tuple[int, ...],
                   treedef: Any) -> PyTree:
    """theta_0 + sum_t lam[t](, l) tau_t^l, accumulated in the acc dtype and cast to the base's dtypes."""
    out = list(fixed)
    for l, i in enumerate(merged_idx):
        dt = acc_dtype(fixed[i].dtype)
        acc = jnp.asarray(fixed[i], dt)
        for t, tv in enumerate(tvs):
            coef = lam[t] if lam.ndim == 1 else lam[t, l]
            acc = acc + coef.astype(dt) * tv[l].astype(dt)
        out[i] = acc.astype(fixed[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=32)
def _make_step(
    apply_fn: ApplyFn, tasks: tuple[int, ...], merged_idx: tuple[int, ...], treedef: Any, clamp: bool, lr: float,
    batch_size: int,
) -> Callable[..., Any]:
    """One jitted AdaMerging step: sample, merge, forward every task, entropy, gradient, Adam update.

    Cached on its static configuration, so repeated runs (another key, other data of the same shapes) do not
    recompile. The step number ``s`` is carried on device (batch keys are ``fold_in(key, s)``) and, per task, the
    first step whose logits were not finite (``bad_step``), so the host does nothing between steps.
    """
    opt = optax.adam(lr)

    def loss_fn(raw: jax.Array, fixed: list[Any], tvs: tuple, batches: tuple) -> tuple[jax.Array, tuple]:
        lam = jnp.clip(raw, 0.0, 1.0) if clamp else raw
        params = _merged_params(lam, fixed, tvs, merged_idx, treedef)
        ents, finite = [], []
        for t, batch in zip(tasks, batches):
            logits = apply_fn(params, batch, t)
            ents.append(entropy(logits).mean())
            finite.append(jnp.all(jnp.isfinite(logits)))
        ents = jnp.stack(ents)
        return ents.sum(), (ents, jnp.stack(finite))

    def step(raw, opt_state, bad_step, s, key, fixed, tvs, data):
        keys = jax.random.split(jax.random.fold_in(key, s), len(data))
        batches = []
        for k, d in zip(keys, data):
            n = jax.tree_util.tree_leaves(d)[0].shape[0]
            idx = jax.random.randint(k, (batch_size,), 0, n)
            batches.append(jax.tree_util.tree_map(lambda a: a[idx], d))
        (loss, (ents, finite)), grad = jax.value_and_grad(loss_fn, has_aux=True)(raw, fixed, tvs, tuple(batches))
        updates, opt_state = opt.update(grad, opt_state, raw)
        bad_step = jnp.where(finite | (bad_step >= 0), bad_step, s)
        return optax.apply_updates(raw, updates), opt_state, bad_step, s + 1, loss

    return jax.jit(step, donate_argnums=(0, 1, 2, 3)), opt


_merged_params_jit = jax.jit(_merged_params, static_argnums=(3, 4))


def adamerging(
    apply_fn: ApplyFn,
    base: PyTree,
    finetuned: Sequence[PyTree] | None,
    unlabeled: Sequence[Any],
    *,
    granularity: Granularity = "task",
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: bool = True,
    plus_plus: bool = False,
    key: jax.Array,
    batch_size: int = 16,
    task_vectors: Sequence[PyTree] | None = None,
    transform: Any = None,
    density: float = 0.2,
    heads: str | PyTree | None = None,
    tasks: Sequence[int] | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> tuple[PyTree, Coefficients]:
    """Learns task-wise or layer-wise merge coefficients by test-time entropy minimisation (AdaMerging, Eqs. 5-7).

    Each step samples ``batch_size`` examples (with replacement) from every task's unlabeled set, merges
    theta = theta_0 + sum_t clip(lambda_t^l, 0, 1) tau_t^l, runs every task's head on its batch, and takes one Adam step
    on the summed mean entropies; the step is one jitted function (task vectors placed with a ``NamedSharding`` stay
    sharded). Leaves named by ``heads`` are not learned: each task keeps its own head (base + sum_t tau_t there).

    Memory peak: base + T task vectors (acc dtype) + one merged model + activations/gradients of T batches.

    Args:
        apply_fn: ``apply_fn(params, batch, task) -> logits``.
        base: pre-trained parameters theta_0.
        finetuned: T fine-tuned trees (or None with ``task_vectors``).
        unlabeled: T unlabeled data sets, one per task: pytrees of arrays with the examples on the leading axis
            (labels, if present, are passed to ``apply_fn`` but never used).
        granularity: "task" (lambdas ``[T]``) or "layer" (``[T, L]``, one per task and merged leaf).
        steps: Adam steps (paper: 500).
        lr: Adam learning rate (paper: 1e-3).
        init: initial value of every coefficient (paper: 0.3).
        clamp: clip coefficients to [0, 1] in the forward pass (paper: yes).
        plus_plus: AdaMerging++: learn on TIES-trimmed (``density``), sign-agreeing task vectors.
        key: PRNG key for batch sampling (and for a random ``transform``, e.g. DARE).
        batch_size: examples per task per step (paper: 16).
        task_vectors: precomputed per-task vectors (e.g. DARE-dropped or ternary ones) instead of ``finetuned``.
        transform: a ``mergejax.Merger`` whose per-task stages are applied to the task vectors first (its reduction is
            not used; the learned coefficients replace it).
        density: TIES trim density of ``plus_plus``.
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
    if plus_plus and transform is not None:
        raise ValueError("plus_plus is the transform chain(Trim(density), ElectSign(), Sum()): pass one or the other")
    if plus_plus:
        from mergejax.merge import chain
        from mergejax.ops import ElectSign, Sum, Trim

        transform = chain(Trim(density), ElectSign(), Sum())
    k_transform, k_steps = jax.random.split(key)
    prob = _prepare(base, finetuned, task_vectors, heads, transform, k_transform)
    n_tasks = len(prob.tvs)
    tasks = tuple(range(n_tasks)) if tasks is None else tuple(int(t) for t in tasks)
    unlabeled = tuple(unlabeled)
    if len(unlabeled) != n_tasks or len(tasks) != n_tasks:
        raise ValueError(f"got {n_tasks} task vectors, {len(unlabeled)} unlabeled sets and {len(tasks)} task ids")
    data = tuple(jax.tree_util.tree_map(jnp.asarray, d) for d in unlabeled)
    for t, d in enumerate(data):
        sample = jax.tree_util.tree_map(lambda a: a[:batch_size], d)
        check_batch(apply_fn, base, sample, tasks[t], what=f"unlabeled[{t}]")

    shape = (n_tasks,) if granularity == "task" else (n_tasks, len(prob.merged_idx))
    raw = jnp.full(shape, init, jnp.float32)
    step, opt = _make_step(apply_fn, tasks, prob.merged_idx, prob.treedef, bool(clamp), float(lr), int(batch_size))
    opt_state = opt.init(raw)
    bad_step = jnp.full((n_tasks,), -1, jnp.int32)
    counter = jnp.int32(1)  # the step number, carried on device: no host work between steps

    bar = _progress_bar(steps, progress)
    try:
        for s in range(steps):
            raw, opt_state, bad_step, counter, loss = step(raw, opt_state, bad_step, counter, k_steps, prob.fixed,
                                                           prob.tvs, data)
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
    merged = _merged_params_jit(lam, prob.fixed, prob.tvs, prob.merged_idx, prob.treedef)
    return merged, coefficients


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="AdaMerging", unit="step")


def apply_coefficients(
    base: PyTree,
    finetuned: Sequence[PyTree] | None,
    coefficients: Coefficients,
    *,
    task_vectors: Sequence[PyTree] | None = None,
    transform: Any = None,
    plus_plus: bool = False,
    density: float = 0.2,
    heads: str | PyTree | None = None,
    key: jax.Array | None = None,
) -> PyTree:
    """Redoes a merge with saved coefficients, without training: theta_0 + sum_t lambda_t^l tau_t^l.

    Pass the same models (or task vectors), ``heads`` and ``plus_plus``/``transform`` as at training; for a random
    transform (DARE) also the ``key`` that was given to :func:`adamerging` (the transform key is derived the same way).

    Raises:
        ValueError: when the coefficients' leaf paths or task count do not match the models, or both ``plus_plus`` and
            ``transform`` are given.
    """
    if plus_plus and transform is not None:
        raise ValueError("plus_plus is the transform chain(Trim(density), ElectSign(), Sum()): pass one or the other")
    if plus_plus:
        from mergejax.merge import chain
        from mergejax.ops import ElectSign, Sum, Trim

        transform = chain(Trim(density), ElectSign(), Sum())
    if transform is not None and key is not None:
        key = jax.random.split(key)[0]  # the same transform key adamerging derives from its key
    prob = _prepare(base, finetuned, task_vectors, heads, transform, key)
    lam = jnp.asarray(coefficients.lambdas, jnp.float32)
    if tuple(coefficients.paths) != prob.paths or lam.shape[0] != len(prob.tvs):
        raise ValueError(
            f"coefficients are for {lam.shape[0]} tasks and leaves {list(coefficients.paths)[:4]}..., but the models "
            f"have {len(prob.tvs)} tasks and merged leaves {list(prob.paths)[:4]}..."
        )
    return _merged_params_jit(lam, prob.fixed, prob.tvs, prob.merged_idx, prob.treedef)


def save_coefficients(path: str | os.PathLike, coefficients: Coefficients) -> None:
    """Saves coefficients with orbax to the new directory ``path`` (array item + JSON metadata item)."""
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
    """Loads coefficients saved by :func:`save_coefficients`."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        out = ckpt.restore(
            os.path.abspath(path),
            ocp.args.Composite(lambdas=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
    return Coefficients(jnp.asarray(out["lambdas"]["lambdas"]), tuple(out["meta"]["paths"]), out["meta"]["granularity"])
