"""Sign election (TIES step 2) and the sign-agreement filter feeding the disjoint reductions (TIES step 3).

TIES-Merging (Yadav et al., 2023), Eq. 2 ("Elect"): gamma_m = sgn(sum_t tau_hat_t), the sign of the coordinate's total
mass over the trimmed task vectors (``method="sum"``); ``method="count"`` takes the sign of sum_t sgn(tau_hat_t)
(majority by count, mergekit's "count"). Coordinates whose sum is exactly 0 take the sign of sum_p gamma_p over the
whole model, as ``resolve_zero_signs(..., "majority")`` in the TIES reference code (mergekit and PEFT send them to +);
if that total is 0 too, the coordinate elects 0 and merges to 0.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.ops.base import TakesWeights, TaskVectors, Transform, map_float_leaves, per_leaf_weights
from mergejax.ops.select import _sum_counts
from mergejax.tree import PyTree, float_leaves, stack_by_shape

__all__ = ["SignMethod", "sign_mass", "elect_sign", "keep_agreeing", "ElectSign"]

SignMethod = Literal["sum", "count"]


def sign_mass(leaves: Sequence[jax.Array], method: SignMethod = "sum", weights: jax.Array | None = None) -> jax.Array:
    """sum_t w_t tau_t (``"sum"``) or sum_t sgn(w_t tau_t) (``"count"``) of one coordinate block (w = 1 by default).

    The sign of this mass is TIES's elected sign (Eq. 2).

    Args:
      leaves: the T task vectors' values of one leaf (or of a stack of same-shaped leaves).
      method: "sum" or "count".
      weights: ``[T]`` per-task weights, or None.

    Returns:
      The mass, shaped like ``leaves[0]``.
    """
    if weights is not None:
        leaves = [weights[t].astype(x.dtype) * x for t, x in enumerate(leaves)]
    if method == "sum":
        return sum(leaves[1:], leaves[0])
    if method == "count":
        return sum((jnp.sign(x) for x in leaves[1:]), jnp.sign(leaves[0]))
    raise ValueError(f"sign method must be 'sum' or 'count', got {method!r}")


def _sign_counts(raw_signs: Sequence[jax.Array]) -> dict:
    """{+1: (hi, lo), -1: (hi, lo)}: exact counts of +1 and -1 entries over ``raw_signs`` as int32 16-bit halves."""
    hi = {1: jnp.int32(0), -1: jnp.int32(0)}
    lo = {1: jnp.int32(0), -1: jnp.int32(0)}
    for _, s in stack_by_shape(raw_signs):
        for v in (1, -1):
            c = jnp.sum((s == v).astype(jnp.int32), axis=tuple(range(1, s.ndim)))  # one count per leaf
            hi[v] = hi[v] + jnp.sum(c >> 16)
            lo[v] = lo[v] + jnp.sum(c & 0xFFFF)
    return {v: (hi[v] + (lo[v] >> 16), lo[v] & 0xFFFF) for v in (1, -1)}


def _majority_of(tot: dict) -> jax.Array:
    """sgn(#(+1) - #(-1)) from :func:`_sign_counts` totals."""
    (ph, pl), (nh, nl) = tot[1], tot[-1]
    pos = (ph > nh) | ((ph == nh) & (pl > nl))
    neg = (nh > ph) | ((ph == nh) & (nl > pl))
    return pos.astype(jnp.int32) - neg.astype(jnp.int32)


def _majority_sign(raw_signs: Sequence[jax.Array]) -> jax.Array:
    """sgn(sum of all elected signs) over every leaf, exact for any size (int32 16-bit halves, no overflow).

    Counted per leaf (every leaf < 2**31 entries) on stacks of same-shaped leaves, so the program has one reduction
    per leaf shape.
    """
    return _majority_of(_sign_counts(raw_signs))


def _raw_sign(tvs: Sequence[PyTree], method: SignMethod, weights: Any) -> PyTree:
    """sgn(sign mass) per coordinate (0 where the mass is 0), before the majority rule."""
    if weights is None:
        return map_float_leaves(lambda xs, i: [jnp.sign(sign_mass(xs, method))], tvs, out_count=1)[0]
    table = per_leaf_weights(weights, tvs[0], len(tvs))
    return map_float_leaves(lambda xs, i, ex: [jnp.sign(sign_mass(xs, method, ex[0]))], tvs, out_count=1,
                            extras=(table,))[0]


def elect_sign(tvs: Sequence[PyTree], method: SignMethod = "sum", weights: Any = None) -> PyTree:
    """The elected sign tree gamma_m (TIES Eq. 2) with the reference code's majority rule for zero sums.

    Args:
      tvs: T task-vector trees.
      method: "sum" (sign of the total mass) or "count" (majority of signs).
      weights: optional per-task weights (``[T]`` or ``{path: [T]}``): elect on w_t tau_t (mergekit's TIES).

    Returns:
      A tree of float leaves in {-1, 0, +1} (non-float positions: the first tree's leaf).
    """
    raw = _raw_sign(tvs, method, weights)
    return _with_majority(raw, _majority_sign(float_leaves(raw)))


def _with_majority(raw: PyTree, majority: jax.Array) -> PyTree:
    return map_float_leaves(
        lambda s, i: [jnp.where(s[0] == 0, majority.astype(s[0].dtype), s[0])], (raw,), out_count=1
    )[0]


def keep_agreeing(tvs: Sequence[PyTree], sign: PyTree) -> TaskVectors:
    """Each task vector with the entries whose sign differs from the elected sign set to 0 (TIES Eq. 3's set A^p).

    Args:
      tvs: T task-vector trees.
      sign: the elected sign tree (from :func:`elect_sign`).

    Returns:
      The T task vectors, zero wherever sgn(tau_t) != gamma_m.
    """
    def leaf(cols, i):
        *xs, s = cols
        return [jnp.where(jnp.sign(x) == s, x, jnp.zeros_like(x)) for x in xs]

    return map_float_leaves(leaf, (*tvs, sign), out_count=len(tvs))


class ElectSign(TakesWeights, Transform):
    """Chain stage: elect a sign per coordinate and zero every disagreeing entry (TIES Eqs. 2-3).

    Follow it with :class:`~mergejax.ops.reduce.DisjointMean` (TIES), ``DisjointSum`` or ``DisjointMax``.

    Args:
      method: "sum" (Eq. 2, sign of the total mass) or "count" (sign of the majority).
      weights: per-task weights (set by a merge's ``weights=``): the election uses w_t tau_t, as mergekit does.
    """

    method: SignMethod = "sum"
    weights: Any = None

    rowwise_given: ClassVar[bool] = True  # elementwise once the majority sign is given

    def __post_init__(self):
        if self.method not in ("sum", "count"):
            raise ValueError(f"sign method must be 'sum' or 'count', got {self.method!r}")

    def __call__(self, tvs: TaskVectors, key: jax.Array | None = None) -> TaskVectors:
        return keep_agreeing(tvs, elect_sign(tvs, self.method, self.weights))

    def host_stats(self, run) -> jax.Array:
        """The majority sign of the zero-sum rule, from per-leaf sign counts summed on the host.

        Args:
          run: the leaf-by-leaf runner of this stage's input (:class:`mergejax.ops.schedule.Runner`).

        Returns:
          int32 scalar in {-1, 0, +1}.
        """
        return self.deferred_resolve(run.total("signs"))  # exact int64 totals

    # The majority deferred into the final pass (mergejax.ops.schedule): it only decides the coordinates whose raw
    # elected sign is 0 while some entry is not +0.0 (there keep_agreeing keeps the entries of the majority's sign,
    # -0.0 ones for a zero majority); everywhere else the output is the same whatever the majority.
    deferred_kinds: ClassVar[tuple[int, ...]] = (1, -1, 2)

    def deferred_codes(self, tvs: TaskVectors) -> jax.Array:
        """At one leaf, int8 per coordinate: its raw elected sign (-1, 0, +1), or 2 where that is 0 and some entry is
        not +0.0 (the coordinates whose output depends on the majority)."""
        s = float_leaves(_raw_sign(tvs, self.method, self.weights))[0]
        xs = [float_leaves(tv)[0] for tv in tvs]
        live = sum(((x != 0) | jnp.signbit(x)).astype(jnp.int8) for x in xs) > 0
        return jnp.where((s == 0) & live, 2, s).astype(jnp.int8)

    def deferred_guess(self, prior: jax.Array) -> jax.Array:
        """The majority assumed at a leaf, from the earlier leaves' tallies [#(+1), #(-1), #ambiguous] (float32):
        +1 where #(+1) >= #(-1), else -1 (int32, traced)."""
        return jnp.where(prior[0] >= prior[1], 1, -1).astype(jnp.int32)

    def deferred_resolve(self, total: np.ndarray) -> jax.Array:
        """The majority sign from exact totals [#(+1), #(-1), ...] (int64, on the host): int32 scalar in {-1, 0, 1}."""
        return jnp.asarray(int(np.sign(int(total[0]) - int(total[1]))), jnp.int32)

    def stat_values(self, tvs: TaskVectors, name: str, given) -> jax.Array:
        """At one leaf: the counts [#(+1), #(-1)] of its raw elected signs (int32; a leaf has < 2**31 entries)."""
        s = float_leaves(_raw_sign(tvs, self.method, self.weights))[0]
        # one (variadic) reduction: two sibling sums would each recompute the trimmed signs (~8x slower on CPU)
        return jnp.stack(_sum_counts([s == 1, s == -1], tuple(range(s.ndim))))

    def apply_with(self, tvs: TaskVectors, stats: jax.Array, key: jax.Array | None = None) -> TaskVectors:
        """Elects with the given majority sign (from :meth:`host_stats`) and zeroes the disagreeing entries."""
        return keep_agreeing(tvs, _with_majority(_raw_sign(tvs, self.method, self.weights), stats))
