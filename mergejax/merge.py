"""The merge combinator and the named data-free methods built from it.

A merge is ``theta = theta_0 + scale * R(S_k(... S_1(tau_1, ..., tau_T)))``: per-task stages S (trim, DARE drop,
Breadcrumbs band, LiNeS, sign election) followed by one reduction R (sum, mean, disjoint mean, PCB, ...), exactly
like ``optax.chain`` composes gradient transformations::

    ties = mergejax.chain(mergejax.Trim(0.2), mergejax.ElectSign(), mergejax.DisjointMean())
    merged = ties(base, [ft_a, ft_b], scale=1.0)

Stages after the reduction act on the merged vector ("TIES then LiNeS"). A :class:`Merger` is a frozen dataclass of
frozen dataclasses, so its hyperparameters are static under ``jax.jit`` and equal chains share one compiled program;
``scale`` is traced, so sweeping lambda never recompiles. Task vectors are a tuple of trees traced in a static loop
(never stacked into [T, ...] arrays), and every operation is elementwise or a scalar count, so arrays placed with a
``NamedSharding`` stay sharded and only scalars cross devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp

from mergejax.ops.base import Stage, TaskVectors
from mergejax.ops.breadcrumbs import BreadcrumbsMask
from mergejax.ops.dare import DareDrop, Rescale
from mergejax.ops.pcb import PCB
from mergejax.ops.reduce import DisjointMax, DisjointMean, DisjointSum, Sum
from mergejax.ops.sign import ElectSign, SignMethod
from mergejax.ops.trim import Scope, Trim
from mergejax.tree import (
    PyTree,
    _leaf_apply,
    _leaf_task_vector,
    acc_dtype,
    check_finite_many,
    is_float,
    validate_like,
)

__all__ = [
    "Merger",
    "chain",
    "average",
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "pcb",
]


def _run(stages: Sequence[Stage], tvs: TaskVectors, key: jax.Array | None, offset: int = 0) -> TaskVectors:
    for i, stage in enumerate(stages):
        tvs = stage(tvs, None if key is None else jax.random.fold_in(key, offset + i))
    return tvs


def _is_encoded(x: Any) -> bool:
    """True for a task vector stored in another form (e.g. a compressed ``TernaryTaskVector``)."""
    return hasattr(x, "to_task_vector") and hasattr(x, "abstract")


def _as_task_vector(tv: Any) -> PyTree:
    """Encoded task vectors are decoded on device (inside the caller's ``jit``, so XLA fuses the decode)."""
    return tv.to_task_vector() if _is_encoded(tv) else tv


def _structure(x: Any) -> PyTree:
    """What validation compares: shapes and accumulation dtypes (an encoded task vector: of its dense tree)."""
    tree = x.abstract() if _is_encoded(x) else x

    def leaf(v):
        dt = acc_dtype(v.dtype) if is_float(v) else v.dtype
        return jax.ShapeDtypeStruct(tuple(v.shape) if hasattr(v, "shape") else (), dt)

    return jax.tree_util.tree_map(leaf, tree)


@dataclass(frozen=True)
class Merger:
    """A chain of stages with exactly one reduction. Build it with :func:`chain`."""

    stages: tuple[Stage, ...]

    def __post_init__(self):
        for s in self.stages:
            if not callable(s) or not hasattr(s, "reduces"):
                raise TypeError(f"{s!r} is not a merge stage (a Transform or a Reduction)")
        n_red = sum(bool(s.reduces) for s in self.stages)
        if n_red != 1:
            raise ValueError(f"a merge chain needs exactly one reduction stage, got {n_red}")

    @property
    def split(self) -> int:
        """Index of the reduction stage."""
        return next(i for i, s in enumerate(self.stages) if s.reduces)

    @property
    def needs_key(self) -> bool:
        """True when a stage draws random numbers (DARE)."""
        return any(s.needs_key for s in self.stages)

    def _check_key(self, key: jax.Array | None) -> None:
        if self.needs_key and key is None:
            names = [type(s).__name__ for s in self.stages if s.needs_key]
            raise ValueError(f"this merge chain draws random numbers ({', '.join(names)}): pass key=jax.random.key(...)")

    def transform(self, tvs: Sequence[PyTree], key: jax.Array | None = None) -> TaskVectors:
        """The per-task vectors after the stages before the reduction (e.g. TIES-trimmed, sign-agreeing vectors)."""
        return _transform_jit(self, self._check_task_vectors(tvs, key), key)

    def merge_task_vectors(self, tvs: Sequence[PyTree], key: jax.Array | None = None) -> PyTree:
        """The merged task vector tau_m of the given task vectors (plain trees or compressed task vectors)."""
        return _merge_tvs_jit(self, self._check_task_vectors(tvs, key), key)

    def _check_task_vectors(self, tvs: Sequence[PyTree], key: jax.Array | None) -> TaskVectors:
        tvs = tuple(tvs)
        if not tvs:
            raise ValueError("need at least one task vector")
        validate_like(_structure(tvs[0]), [_structure(t) for t in tvs[1:]], what="task_vectors")
        self._check_key(key)
        return tvs

    def __call__(
        self,
        base: PyTree,
        finetuned: Sequence[PyTree],
        *,
        scale: float | jax.Array = 1.0,
        key: jax.Array | None = None,
        check_finite: bool = True,
    ) -> PyTree:
        """theta_0 + scale * merged task vector of ``finetuned`` against ``base``, in the base's dtypes.

        Args:
          base: pre-trained parameters theta_0.
          finetuned: sequence of fine-tuned trees with the base's structure, shapes and dtypes; an entry may
            instead be a compressed task vector (``mergejax.ternary.TernaryTaskVector``), decoded on device.
          scale: lambda, traced (changing it does not recompile).
          key: ``jax.random`` key, required when a stage draws random numbers.
          check_finite: report NaN/Inf leaves by path before merging (one extra read of every model).
        """
        finetuned = _check_models(base, finetuned, check_finite, with_base=True)
        self._check_key(key)
        return _merge_models_jit(self, base, finetuned, jnp.asarray(scale, jnp.float32), key)


@partial(jax.jit, static_argnums=0)
def _transform_jit(m: Merger, tvs: TaskVectors, key):
    return _run(m.stages[: m.split], tuple(_as_task_vector(t) for t in tvs), key)


def _merge_from_tvs(m: Merger, tvs: TaskVectors, key) -> PyTree:
    (merged,) = _run(m.stages, tuple(_as_task_vector(t) for t in tvs), key)
    return merged


@partial(jax.jit, static_argnums=0)
def _merge_tvs_jit(m: Merger, tvs: TaskVectors, key):
    return _merge_from_tvs(m, tvs, key)


@partial(jax.jit, static_argnums=0)
def _merge_models_jit(m: Merger, base: PyTree, finetuned: tuple[PyTree, ...], scale, key):
    tvs = tuple(ft if _is_encoded(ft) else jax.tree_util.tree_map(_leaf_task_vector, ft, base) for ft in finetuned)
    merged = _merge_from_tvs(m, tvs, key)
    return jax.tree_util.tree_map(lambda b, t: _leaf_apply(b, t, scale), base, merged)


def chain(*stages: Stage) -> Merger:
    """Composes per-task stages and one reduction into a merge method (like ``optax.chain``).

    Example::

        dare_ties = chain(DareDrop(0.9), Trim(0.2), ElectSign(), DisjointMean())
        merged = dare_ties(base, finetuned, key=jax.random.key(0))
    """
    return Merger(tuple(stages))


def _check_models(
    base: PyTree, models: Sequence[PyTree], check_finite: bool, what: str = "finetuned", *, with_base: bool = False
) -> tuple:
    """Validates ``models`` against ``base`` and (optionally) checks base and models for NaN/Inf in one program."""
    models = tuple(models)
    if not models:
        raise ValueError(f"{what} is empty: need at least one model")
    for i, m in enumerate(models):
        if _is_encoded(m):  # a compressed task vector: same structure and shapes, float leaves stay float
            validate_like(_structure(base), [_structure(m)], what=what, first_index=i)
        else:
            validate_like(base, [m], what=what, first_index=i)
    if check_finite:
        dense = [(f"{what}[{i}]", m) for i, m in enumerate(models) if not _is_encoded(m)]
        dense = ([("base", base)] if with_base else []) + dense
        check_finite_many([m for _, m in dense], what=[name for name, _ in dense])
    return models


@jax.jit
def _average_jit(models: tuple[PyTree, ...]) -> PyTree:
    def leaf(*xs):
        if not is_float(xs[0]):
            return xs[0]
        dt = acc_dtype(xs[0].dtype)
        return (sum(jnp.asarray(x, dt) for x in xs) / len(xs)).astype(xs[0].dtype)

    return jax.tree_util.tree_map(leaf, *models)


def average(models: Sequence[PyTree], *, check_finite: bool = True) -> PyTree:
    """Weight averaging (Wortsman et al., 2022, "model soups"): theta = (1/M) sum_m theta_m.

    Accumulates in float32 and returns the first model's dtypes; non-float leaves come from the first model.
    Memory: the M inputs plus one output.
    """
    models = tuple(models)
    if not models:
        raise ValueError("models is empty: need at least one model")
    return _average_jit(_check_models(models[0], models, check_finite, what="models"))


def task_arithmetic(
    base: PyTree, finetuned: Sequence[PyTree], *, scale: float = 1.0, check_finite: bool = True
) -> PyTree:
    """Task arithmetic (Ilharco et al., 2023, Eq. 2): theta = theta_0 + lambda * sum_t tau_t.

    Memory: the inputs plus about one float32 model of intermediates and the output.

    Example:
      >>> import jax.numpy as jnp, mergejax as mj
      >>> mj.task_arithmetic({"w": jnp.ones(2)}, [{"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([1.0, 3.0])}],
      ...                    scale=0.5)["w"].tolist()
      [1.5, 2.0]
    """
    return chain(Sum())(base, finetuned, scale=scale, check_finite=check_finite)


_DISJOINT = {"mean": DisjointMean, "sum": DisjointSum, "max": DisjointMax}


def _disjoint(reduce: str):
    if reduce not in _DISJOINT:
        raise ValueError(f"reduce must be one of {sorted(_DISJOINT)}, got {reduce!r}")
    return _DISJOINT[reduce]()


def ties(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    density: float = 0.2,
    scale: float = 1.0,
    scope: Scope = "global",
    sign_method: SignMethod = "sum",
    reduce: Literal["mean", "sum", "max"] = "mean",
    check_finite: bool = True,
) -> PyTree:
    """TIES-Merging (Yadav et al., 2023, Alg. 1): trim, elect sign, disjoint merge; theta = theta_0 + lambda tau_m.

    Trim keeps every |tau| >= the exact k-th largest magnitude, k = floor(density * n) (Sec. 3 step 1; the reference
    code keeps one entry more, see :mod:`mergejax.ops.trim`); election is Eq. 2 with the code's majority rule for
    zero sums; ``reduce="mean"`` is the disjoint mean of Eq. 3 (``"sum"``: AdaMerging/FusionBench's variant).
    Defaults follow the paper (k = 20%, lambda = 1). Memory: inputs plus about 2T float32 task vectors.

    Example:
      >>> import jax.numpy as jnp, mergejax as mj
      >>> base = {"w": jnp.zeros(4)}
      >>> fts = [{"w": jnp.array([1.0, -2.0, 0.1, 3.0])}, {"w": jnp.array([1.0, 2.0, -0.1, -1.0])}]
      >>> mj.ties(base, fts, density=0.5)["w"].tolist()  # k=2 per task; coordinate 1: +2 vs -2 -> majority sign
      [1.0, 2.0, 0.0, 3.0]
    """
    stages = (Trim(density, scope), ElectSign(sign_method), _disjoint(reduce))
    return chain(*stages)(base, finetuned, scale=scale, check_finite=check_finite)


def dare(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    key: jax.Array,
    drop_rate: float = 0.9,
    rescale: Rescale = "inverse",
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    density: float = 0.2,
    scope: Scope = "global",
    scale: float = 1.0,
    check_finite: bool = True,
) -> PyTree:
    """DARE (Yu et al., 2024, Eq. 2) followed by task arithmetic or TIES (DARE-TIES, which still trims after dropping).

    ``rescale``: "inverse" (1/(1-p), the paper), "l1" (per-tensor L1 norm kept, mergekit), or a float q (DAREx-q).
    """
    drop = DareDrop(drop_rate, rescale)
    if combine == "task_arithmetic":
        stages = (drop, Sum())
    elif combine == "ties":
        stages = (drop, Trim(density, scope), ElectSign(), DisjointMean())
    else:
        raise ValueError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    return chain(*stages)(base, finetuned, scale=scale, key=key, check_finite=check_finite)


def breadcrumbs(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    beta: float = 0.15,
    gamma: float = 0.006,
    scale: float = 1.0,
    check_finite: bool = True,
) -> PyTree:
    """Model Breadcrumbs (Davari and Belilovsky, 2024): theta = theta_0 + lambda sum_t mask_t * tau_t.

    The mask keeps, per row of each tensor's last axis, the band below the top ``gamma`` fraction and of width
    ``beta`` (see :mod:`mergejax.ops.breadcrumbs`). The paper's experiments use lambda = 0.2 as a seed.
    """
    return chain(BreadcrumbsMask(beta, gamma), Sum())(base, finetuned, scale=scale, check_finite=check_finite)


def pcb(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    ratio: float = 0.05,
    scale: float = 1.2,
    check_finite: bool = True,
) -> PyTree:
    """PCB-Merging (Du et al., 2024, Eqs. 3-7): balanced per-parameter weights; theta = theta_0 + lambda tau_m."""
    return chain(PCB(ratio))(base, finetuned, scale=scale, check_finite=check_finite)

