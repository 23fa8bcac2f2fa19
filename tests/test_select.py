"""Exact k-th largest selection: the bracketing search and the radix select (every width) against numpy sorting."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mergejax.ops.select as sel
from mergejax.ops.select import key_to_float, kth_largest_groups, kth_largest_groups_with_passes, kth_largest_per_row

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
tied = st.sampled_from([-3.0, -1.5, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0])
vals = st.one_of(tied, st.floats(-1e3, 1e3, width=32, allow_subnormal=False))


def _want(group, k, magnitude):
    v = np.concatenate([np.asarray(x, np.float64).ravel() for x in group])
    return np.sort(np.abs(v) if magnitude else v)[::-1][k - 1]


@functools.lru_cache(maxsize=None)
def _jitted(ks: tuple, magnitude: bool, radix_bits):
    return jax.jit(lambda gs: kth_largest_groups_with_passes(gs, ks, magnitude=magnitude, radix_bits=radix_bits))


def _check(groups, ks, magnitude, radix_bits=None):
    keys, passes = _jitted(tuple(int(k) for k in ks), magnitude, radix_bits)(groups)
    for g, k, key in zip(groups, ks, np.asarray(keys)):
        assert float(key_to_float(key)) == _want(g, k, magnitude), (k, magnitude)
    return int(passes)


@pytest.fixture(params=["cpu", "other"])
def backend(request, monkeypatch):
    """Runs the test once more with the non-CPU branch of _sum_counts (plain sums instead of a variadic reduce)."""
    if request.param == "other":
        monkeypatch.setattr(sel.jax, "default_backend", lambda: "gpu")
    return request.param


@pytest.mark.parametrize(
    "radix_bits,magnitude",
    [(rb, m) for rb in (1, 2, 4, None) for m in (False, True)]
    + [(8, False), pytest.param(8, True, marks=pytest.mark.slow)],
)
@SETTINGS
@given(a=hnp.arrays(np.float32, (6, 7), elements=vals), b=hnp.arrays(np.float32, (5,), elements=vals))
def test_every_width_equals_sorted_order_statistic(radix_bits, magnitude, a, b):
    ks = [1, 2, 13, 29, 46, 47, 1, 20, 42]  # one program: fixed ranks, hypothesis varies the values
    _check([[jnp.asarray(a), jnp.asarray(b)]] * 6 + [[jnp.asarray(a)]] * 3, ks, magnitude, radix_bits=radix_bits)


SLOW_8 = pytest.param(8, marks=pytest.mark.slow)  # 255 candidates per pass: ~40 s to compile on 2 cores


@pytest.mark.parametrize("radix_bits", [1, 2, 4, SLOW_8, None])
def test_non_cpu_count_branch(radix_bits, backend):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(-4, 5, (40, 30)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(30), jnp.float32)
    _check([[a, b], [a], [b]], [7, 1200, 30], True, radix_bits=radix_bits)
    _check([[a, b]], [333], False, radix_bits=radix_bits)


DISTS = {
    "normal": lambda r, s: r.standard_normal(s),
    "laplace": lambda r, s: r.laplace(size=s),
    "cauchy": lambda r, s: r.standard_cauchy(s),
    "dare": lambda r, s: r.standard_normal(s) * (r.random(s) < 0.1),  # 90% exact zeros
    "ternary": lambda r, s: r.integers(-1, 2, s) * 0.25,
    "narrow": lambda r, s: 1.0 + 1e-6 * r.standard_normal(s),
    "const": lambda r, s: np.full(s, -0.5),
}


@pytest.mark.parametrize("dist", list(DISTS))
def test_bracketing_search_is_exact_on_large_groups(dist):
    rng = np.random.default_rng(1)
    big = [jnp.asarray(DISTS[dist](rng, (256, 160)), jnp.float32), jnp.asarray(DISTS[dist](rng, (160,)), jnp.float32)]
    n = 256 * 160 + 160
    for magnitude in (True, False):
        passes = _check([big] * 5 + [big[:1]], [1, 5, n // 5, n - 3, n, 1000], magnitude)
        assert passes <= 16


def test_bracketing_search_few_passes_on_smooth_data():
    rng = np.random.default_rng(2)
    x = [jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)]
    assert _check([x], [int(0.2 * x[0].size)], True) <= 6


def test_small_groups_sorted_and_many_leaves_batched():
    rng = np.random.default_rng(3)
    leaves = [jnp.asarray(rng.standard_normal((16, 16)), jnp.float32) for _ in range(12)]
    leaves += [jnp.asarray(rng.standard_normal((16,)), jnp.bfloat16) for _ in range(12)]
    ks = list(rng.integers(1, 17, len(leaves)))
    assert _check([[x] for x in leaves], ks, True) == 0  # every group sorted outright: no counting pass
    _check([leaves[:12], leaves[12:], leaves], [100, 3, 2000], False)


def test_float64_keys():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.standard_normal(40000), jnp.float64)
        keys = kth_largest_groups([[x]], [9876], magnitude=True)
        assert float(key_to_float(keys[0], jnp.float64)) == _want([x], 9876, True)


def test_rank_out_of_range_errors():
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        kth_largest_groups([[jnp.ones(4)]], [5])


def test_per_row_radix_every_width():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(-3, 4, (6, 50)), jnp.float32)
    for rb in (1, 2, 4, 8):
        got = key_to_float(kth_largest_per_row(x, 7, radix_bits=rb))[:, 0]
        np.testing.assert_array_equal(got, np.sort(np.asarray(x), axis=1)[:, ::-1][:, 6])
