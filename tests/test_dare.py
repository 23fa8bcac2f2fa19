"""DARE's counter-based mask: statistics of the stream, determinism, vmap and sharding, and DARE-TIES vs numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mergejax as mj
from mergejax.ops.base import leaf_keys
from mergejax.ops.dare import DareDrop, drop_and_rescale, hash_bits, hash_words, host_hash_words, keep_mask
from tests import reference

KEY = jax.random.key(3)
N = 1 << 16


def _z_ok(count: float, n: int, p: float, z: float = 5.0) -> bool:
    """|count - n p| within z binomial standard deviations."""
    return abs(count - n * p) <= z * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_drop_fraction_within_binomial_bounds(p):
    kept = np.asarray(keep_mask(jnp.ones((N,)), KEY, p))
    assert _z_ok(kept.size - kept.sum(), kept.size, p)
    if p == 0.0:
        assert kept.all()


def test_same_key_same_mask_and_jax_rng_option():
    x = jnp.ones((64, 33))
    np.testing.assert_array_equal(keep_mask(x, KEY, 0.5), keep_mask(x, KEY, 0.5))
    assert not np.array_equal(keep_mask(x, KEY, 0.5), keep_mask(x, jax.random.key(4), 0.5))
    want = jax.random.bernoulli(KEY, 0.5, x.shape)
    np.testing.assert_array_equal(keep_mask(x, KEY, 0.5, rng="jax"), want)
    with pytest.raises(ValueError, match="rng must be"):
        DareDrop(0.5, rng="philox")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_no_correlation_between_neighbours_tasks_and_leaves():
    bound = 5.0 / np.sqrt(N)  # |correlation| of independent fair bits: ~N(0, 1/N)
    masks = {(t, i): np.asarray(keep_mask(jnp.ones((N,)), leaf_keys(KEY, t, i), 0.5)) for t in range(3) for i in range(3)}
    m = masks[(0, 0)]
    for lag in (1, 2, 3, 256, 4096):  # neighbouring indices
        assert abs(_corr(m[:-lag], m[lag:])) < bound, lag
    pairs = [((0, 0), (1, 0)), ((0, 0), (2, 0)), ((0, 0), (0, 1)), ((0, 1), (0, 2)), ((1, 1), (2, 2))]
    for a, b in pairs:  # tasks, leaves
        assert abs(_corr(masks[a], masks[b])) < bound, (a, b)
        for lag in (1, 7):  # no task's mask is a shifted copy of another's
            assert abs(_corr(masks[a][:-lag], masks[b][lag:])) < bound, (a, b, lag)
    bits = np.asarray(hash_bits(KEY, (N,)))
    for j in range(32):  # every output bit fair
        assert _z_ok(((bits >> j) & 1).sum(), N, 0.5), j


def test_identical_task_vectors_get_independent_masks():
    p = 0.6
    tv = {"w": jnp.ones((256, 256)), "b": jnp.ones((256,)), "v": jnp.ones((256, 256))}
    out = DareDrop(p)((tv, tv), KEY)
    k0, k1 = (np.asarray(o["w"]) != 0 for o in out)
    n = k0.size
    assert _z_ok((k0 & k1).sum(), n, (1 - p) ** 2)  # overlap of two independent masks
    assert not np.array_equal(np.asarray(out[0]["w"]) != 0, np.asarray(out[0]["v"]) != 0)  # leaves differ


def test_rescale_and_values():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((128, 64)), jnp.float32)
    keep = np.asarray(keep_mask(x, KEY, 0.75))
    np.testing.assert_allclose(drop_and_rescale(x, KEY, 0.75), np.where(keep, x, 0) / 0.25, rtol=1e-6)
    np.testing.assert_allclose(drop_and_rescale(x, KEY, 0.75, 0.5), np.where(keep, x, 0) / 0.5, rtol=1e-6)
    l1 = np.asarray(drop_and_rescale(x, KEY, 0.75, "l1"))
    np.testing.assert_allclose(np.abs(l1).sum(), np.abs(np.asarray(x)).sum(), rtol=1e-5)


def test_mask_under_vmap_with_traced_leaf_index_equals_unbatched():
    xs = jnp.ones((4, 32, 16))

    def one(x, i):
        return drop_and_rescale(x, leaf_keys(KEY, 1, i), 0.5)

    got = jax.jit(jax.vmap(one))(xs, jnp.arange(4, dtype=jnp.int32))
    for i in range(4):
        np.testing.assert_array_equal(got[i], one(xs[i], i))
    assert not np.array_equal(got[0], got[1])


def test_sharded_mask_equals_unsharded_bit_for_bit(mesh8):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 24)), jnp.float32)
    want = jax.jit(lambda a: drop_and_rescale(a, KEY, 0.5))(x)
    for spec in (P("x"), P(None, "x") if x.shape[1] % 8 == 0 else P("x", None)):
        xs = jax.device_put(x, NamedSharding(mesh8, spec))
        got = jax.jit(lambda a: drop_and_rescale(a, KEY, 0.5))(xs)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dare_ties_matches_numpy_given_the_masks():
    rng = np.random.default_rng(2)
    base = {"w": jnp.asarray(rng.standard_normal((40, 30)), jnp.float32), "b": jnp.asarray(rng.standard_normal(30))}
    fts = [jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), jnp.float32), base) for _ in range(3)]
    p, density = 0.5, 0.3
    got = mj.dare(base, fts, key=KEY, drop_rate=p, combine="ties", density=density)
    tvs = [jax.tree.map(jnp.subtract, f, base) for f in fts]
    dropped = mj.chain(DareDrop(p), mj.Sum()).transform(tvs, key=KEY)  # the same stage, key and position
    np_tvs, np_dropped = [], []
    for tv, d in zip(tvs, dropped):
        leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(tv)]
        masks = [np.asarray(x) != 0 for x in jax.tree.leaves(d)]  # the masks, read off the stage's output
        assert all(_z_ok((~m).sum(), m.size, p) for m in masks)
        np_tvs.append(leaves)
        np_dropped.append([np.where(m, x, 0) / np.float32(1 - p) for x, m in zip(leaves, masks)])
        for x, y in zip(np_dropped[-1], jax.tree.leaves(d)):
            np.testing.assert_allclose(np.asarray(y), x, rtol=1e-6)
    want = reference.ties_tv(np_dropped, density, "global", "sum", "mean")
    for g, b, w in zip(jax.tree.leaves(got), jax.tree.leaves(base), want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(b) + w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.key(2**31 - 1), jax.random.PRNGKey(7)])
def test_host_hash_words_equal_jax_threefry(key):
    """The leaf-by-leaf schedule's numpy threefry gives every (stage, task, leaf) the words of jax.random."""
    words = host_hash_words(key, (0, 2), 3, 5)
    assert words.shape == (5, 2, 3, 2) and words.dtype == np.uint32
    for leaf in (0, 4):
        for s, stage in enumerate((0, 2)):
            for t in range(3):
                want = hash_words(leaf_keys(jax.random.fold_in(key, stage), t, leaf))
                np.testing.assert_array_equal(words[leaf, s, t], np.asarray(want))
    assert host_hash_words(jax.random.key(0, impl="rbg"), (0,), 2, 3) is None  # other generators: derived in JAX
