"""Property tests (hypothesis) for the invariants of the selection primitive and the merge methods.

Shapes are fixed per property so each compiles once; hypothesis varies the values (including many exact ties).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mergejax as mj
from mergejax.ops.select import key_to_float, kth_largest_groups

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values with many exact ties and both signs, plus zeros
tied = st.sampled_from([-3.0, -1.5, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0])
floats = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
vals = st.one_of(tied, floats)


def arrays(shape):
    return hnp.arrays(np.float32, shape, elements=vals)


@SETTINGS
@given(a=arrays((6, 7)), b=arrays((5,)), k=st.integers(1, 47))
def test_kth_largest_equals_sorted_order_statistic(a, b, k):
    got = key_to_float(kth_largest_groups([[jnp.asarray(a), jnp.asarray(b)]], [k])[0])
    want = np.sort(np.concatenate([a.ravel(), b.ravel()]))[::-1][k - 1]
    assert float(got) == float(want)


@SETTINGS
@given(a=arrays((9, 8)), density=st.floats(0.0, 1.0))
def test_trim_keeps_at_least_k_and_only_the_largest(a, density):
    kept = np.asarray(mj.ops.trim({"a": jnp.asarray(a)}, density)["a"])
    k = int(np.floor(round(density * a.size, 6)))
    t = np.sort(np.abs(a).ravel())[::-1][k - 1] if k else np.inf
    selected = np.abs(a) >= t
    assert selected.sum() >= k  # ties at the threshold are all kept
    np.testing.assert_array_equal(kept, np.where(selected, a, 0))
    if selected.any() and (~selected).any():  # every kept entry outranks every dropped one
        assert np.abs(a)[selected].min() > np.abs(a)[~selected].max()


def _tree(x, y):
    return {"w": jnp.asarray(x), "b": jnp.asarray(y)}


@SETTINGS
@given(b0=arrays((4, 6)), b1=arrays((3,)), f0=arrays((4, 6)), f1=arrays((3,)), scale=st.floats(0.1, 2.0))
def test_ties_single_model_density_one_is_task_arithmetic(b0, b1, f0, f1, scale):
    base, ft = _tree(b0, b1), _tree(f0, f1)
    got = mj.ties(base, [ft], density=1.0, scale=scale)
    want = mj.task_arithmetic(base, [ft], scale=scale)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-4)


@SETTINGS
@given(b0=arrays((4, 6)), b1=arrays((3,)), f0=arrays((4, 6)), f1=arrays((3,)), T=st.integers(1, 4))
def test_merging_identical_models_returns_that_model(b0, b1, f0, f1, T):
    base, ft = _tree(b0, b1), _tree(f0, f1)
    for got in (
        mj.ties(base, [ft] * T, density=1.0),
        mj.ties(base, [ft] * T, density=1.0, sign_method="count", reduce="max"),
        mj.average([ft] * T),
        mj.task_arithmetic(base, [ft] * T, scale=1.0 / T),
    ):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ft)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-3)


@SETTINGS
@given(fs=st.lists(arrays((5, 4)), min_size=3, max_size=3), perm=st.permutations([0, 1, 2]))
def test_ties_is_invariant_to_task_order(fs, perm):
    base = {"w": jnp.zeros((5, 4))}
    fts = [{"w": jnp.asarray(f)} for f in fs]
    a = mj.ties(base, fts, density=0.5)["w"]
    b = mj.ties(base, [fts[i] for i in perm], density=0.5)["w"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
