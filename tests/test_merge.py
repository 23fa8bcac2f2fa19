"""Data-free merge methods against the independent numpy reference (tests/reference.py), edge cases and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax.tree import is_float
from tests import reference as ref

SHAPES = {"enc": {"kernel": (12, 20), "bias": (20,)}, "head": {"w": (20, 3)}, "scale": ()}


def make_tree(rng: np.random.Generator, *, bf16_leaf: bool = True, int_leaf: bool = True, values=None) -> dict:
    def arr(shape):
        x = rng.standard_normal(shape) if values is None else rng.choice(values, size=shape)
        return jnp.asarray(np.asarray(x, np.float32))

    tree = {
        "enc": {"kernel": arr((12, 20)), "bias": arr((20,))},
        "head": {"w": arr((20, 3))},
        "scale": arr(()),
    }
    if bf16_leaf:
        tree["emb"] = arr((7, 5)).astype(jnp.bfloat16)
    if int_leaf:
        tree["step"] = jnp.asarray(rng.integers(0, 100, size=(2,)), jnp.int32)
    return tree


def make_models(seed: int = 0, T: int = 3, **kw):
    rng = np.random.default_rng(seed)
    base = make_tree(rng, **kw)
    fts = [make_tree(rng, **kw) for _ in range(T)]
    return base, fts


def float_tvs_np(base, fts) -> list[list[np.ndarray]]:
    """Per task, the float task-vector leaves (float32) in flattening order."""
    out = []
    for ft in fts:
        out.append(
            [
                np.asarray(f, np.float32) - np.asarray(b, np.float32)
                for f, b in zip(jax.tree.leaves(ft), jax.tree.leaves(base))
                if is_float(b)
            ]
        )
    return out


def expected_model(base, merged_leaves, scale):
    it = iter(merged_leaves)

    def leaf(b):
        if not is_float(b):
            return np.asarray(b)
        return (np.asarray(b, np.float32) + np.float32(scale) * next(it)).astype(b.dtype)

    return jax.tree.map(leaf, base)


def assert_models_close(got, want, atol=2e-6):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert g.dtype == w.dtype, path
        if g.dtype == jnp.bfloat16:
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-2, atol=1e-2)
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-5, err_msg=str(path))


def merged_tv(merger, base, fts, key=None):
    tvs = [mj.task_vector(ft, base) for ft in fts]
    out = merger.merge_task_vectors(tvs, key=key)
    return [np.asarray(x) for x in jax.tree.leaves(out) if is_float(x)]


# ---------------------------------------------------------------- task vectors


def test_task_vector_round_trip_keeps_dtypes_and_int_leaves():
    base, (ft,) = make_models(T=1)
    tv = mj.task_vector(ft, base)
    assert tv["emb"].dtype == jnp.float32 and tv["enc"]["kernel"].dtype == jnp.float32
    assert tv["step"].dtype == jnp.int32 and not np.any(np.asarray(tv["step"]))
    back = mj.apply_task_vector(base, tv)
    for p, b, x in zip(jax.tree.leaves(mj.task_vector(base, base)), jax.tree.leaves(back), jax.tree.leaves(ft)):
        pass
    np.testing.assert_array_equal(np.asarray(back["emb"], np.float32), np.asarray(ft["emb"], np.float32))
    np.testing.assert_allclose(back["enc"]["kernel"], ft["enc"]["kernel"], atol=1e-6)
    np.testing.assert_array_equal(back["step"], base["step"])
    assert back["emb"].dtype == jnp.bfloat16


def test_task_vector_on_lists_and_tuples():
    base = [jnp.ones(3), (jnp.zeros((2, 2)), jnp.int32(1))]
    ft = [jnp.full(3, 2.0), (jnp.ones((2, 2)), jnp.int32(7))]
    tv = mj.task_vector(ft, base)
    np.testing.assert_array_equal(tv[0], np.ones(3))
    out = mj.apply_task_vector(base, tv, scale=0.5)
    np.testing.assert_allclose(out[1][0], 0.5 * np.ones((2, 2)))
    assert int(out[1][1]) == 1


# ---------------------------------------------------------------- methods vs reference


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("sign_method", ["sum", "count"])
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
def test_ties_matches_reference(scope, sign_method, density):
    base, fts = make_models(seed=1)
    want_tv = ref.ties_tv(float_tvs_np(base, fts), density, scope, sign_method, "mean")
    got_tv = merged_tv(mj.chain(mj.Trim(density, scope), mj.ElectSign(sign_method), mj.DisjointMean()), base, fts)
    for g, w in zip(got_tv, want_tv):
        np.testing.assert_allclose(g, w, atol=1e-6)
    got = mj.ties(base, fts, density=density, scope=scope, sign_method=sign_method, scale=0.7)
    assert_models_close(got, expected_model(base, want_tv, 0.7))


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_ties_disjoint_sum_and_max(reduce):
    base, fts = make_models(seed=2)
    want_tv = ref.ties_tv(float_tvs_np(base, fts), 0.3, "global", "sum", reduce)
    got = mj.ties(base, fts, density=0.3, reduce=reduce, scale=0.3)
    assert_models_close(got, expected_model(base, want_tv, 0.3))


def test_ties_magnitude_ties_and_sign_cancellations():
    # small integer values: many entries tie at the threshold; ft2 = -ft1 cancels exactly.
    rng = np.random.default_rng(3)
    base = make_tree(rng, values=[0.0])
    ft1 = make_tree(rng, values=[-2.0, -1.0, 0.0, 1.0, 2.0])
    ft2 = jax.tree.map(lambda x: -x if is_float(x) else x, ft1)
    ft3 = make_tree(rng, values=[-1.0, 1.0])
    fts = [ft1, ft2, ft3]
    for scope in ("global", "tensor"):
        for method in ("sum", "count"):
            want = ref.ties_tv(float_tvs_np(base, fts), 0.35, scope, method, "mean")
            got = merged_tv(mj.chain(mj.Trim(0.35, scope), mj.ElectSign(method), mj.DisjointMean()), base, fts)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


def test_trim_keeps_ties_and_at_least_k():
    x = jnp.asarray([3.0, -1.0, 1.0, 1.0, -1.0, 0.5, 0.0, 2.0])
    kept = mj.ops.trim({"x": x}, 0.5)["x"]  # k = 4: the 4th largest |x| is 1 -> all four 1s kept
    np.testing.assert_array_equal(kept, [3.0, -1.0, 1.0, 1.0, -1.0, 0.0, 0.0, 2.0])
    assert np.count_nonzero(mj.ops.trim({"x": x}, 0.0)["x"]) == 0
    np.testing.assert_array_equal(mj.ops.trim({"x": x}, 1.0)["x"], x)


def test_single_model_all_zero_and_identical_models():
    base, (ft,) = make_models(seed=4, T=1)
    # a single model: TIES keeps its trimmed vector (disjoint mean of one)
    want = ref.ties_tv(float_tvs_np(base, [ft]), 0.2, "global", "sum", "mean")
    assert_models_close(mj.ties(base, [ft]), expected_model(base, want, 1.0))
    # all-zero task vectors: every method returns the base
    for out in (
        mj.ties(base, [base, base]),
        mj.task_arithmetic(base, [base]),
        mj.breadcrumbs(base, [base, base]),
        mj.pcb(base, [base, base]),
        mj.dare(base, [base], key=jax.random.key(0), rescale="l1"),
    ):
        assert_models_close(out, base, atol=0)


def test_task_arithmetic_and_average_match_numpy():
    base, fts = make_models(seed=5)
    tvs = float_tvs_np(base, fts)
    want = [sum(tl[i] for tl in tvs) for i in range(len(tvs[0]))]
    assert_models_close(mj.task_arithmetic(base, fts, scale=0.4), expected_model(base, want, 0.4))
    avg = mj.average(fts)
    for a, *xs in zip(jax.tree.leaves(avg), *[jax.tree.leaves(f) for f in fts]):
        if is_float(a):
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.mean([np.asarray(x, np.float32) for x in xs], 0), atol=1e-2 if a.dtype == jnp.bfloat16 else 1e-6
            )
        else:
            np.testing.assert_array_equal(a, xs[0])


def test_breadcrumbs_matches_reference():
    base, fts = make_models(seed=6)
    tvs = float_tvs_np(base, fts)
    beta, gamma = 0.3, 0.1
    want = [sum(np.where(ref.breadcrumbs_mask(tl[i], beta, gamma), tl[i], 0) for tl in tvs) for i in range(len(tvs[0]))]
    got = mj.breadcrumbs(base, fts, beta=beta, gamma=gamma, scale=0.2)
    assert_models_close(got, expected_model(base, want, 0.2))


def test_breadcrumbs_defaults_keep_a_band():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1000)), jnp.float32)
    mask = np.asarray(mj.ops.breadcrumbs_mask(x))
    assert mask.sum(axis=1).tolist() == [156 - 6] * 4  # floor(0.156 * 1000) - floor(0.006 * 1000)
    a = np.abs(np.asarray(x))
    assert np.all(a[mask].max() <= np.sort(a, 1)[:, -7].max())


@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_pcb_matches_reference(ratio):
    base, fts = make_models(seed=7)
    want = ref.pcb_tv(float_tvs_np(base, fts), ratio)
    got = merged_tv(mj.chain(mj.PCB(ratio)), base, fts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_dare_drop_rate_and_rescales():
    x = {"w": jnp.ones((200, 500), jnp.float32), "b": jnp.linspace(-1, 1, 1000)}
    zero = jax.tree.map(jnp.zeros_like, x)
    key = jax.random.key(42)
    out = mj.chain(mj.DareDrop(0.9), mj.Sum()).merge_task_vectors([x], key=key)
    kept = np.asarray(out["w"]) != 0
    assert abs(kept.mean() - 0.1) < 0.01
    np.testing.assert_allclose(np.asarray(out["w"])[kept], 10.0, rtol=1e-6)
    q = mj.chain(mj.DareDrop(0.9, 0.25), mj.Sum()).merge_task_vectors([x], key=key)
    np.testing.assert_array_equal(np.asarray(q["w"]) != 0, kept)  # same key, same mask
    np.testing.assert_allclose(np.asarray(q["w"])[kept], 4.0, rtol=1e-6)
    l1 = mj.chain(mj.DareDrop(0.5, "l1"), mj.Sum()).merge_task_vectors([x], key=key)
    for name in x:
        np.testing.assert_allclose(np.abs(l1[name]).sum(), np.abs(x[name]).sum(), rtol=1e-5)
    # model-level API: deterministic in the key, different for another key
    a = mj.dare(zero, [x], key=key)
    np.testing.assert_array_equal(a["w"], mj.dare(zero, [x], key=key)["w"])
    assert not np.array_equal(a["w"], mj.dare(zero, [x], key=jax.random.key(1))["w"])
    # drop_rate 0 keeps everything
    np.testing.assert_array_equal(mj.dare(zero, [x], key=key, drop_rate=0.0)["w"], x["w"])


def test_dare_ties_is_drop_then_ties():
    base, fts = make_models(seed=8)
    key = jax.random.key(3)
    dropped = mj.chain(mj.DareDrop(0.5), mj.Sum()).transform([mj.task_vector(f, base) for f in fts], key=key)
    dropped_np = [[np.asarray(x) for x in jax.tree.leaves(t) if is_float(x)] for t in dropped]
    want = ref.disjoint(
        [ref.trim(tl, 0.2, "global") for tl in dropped_np],
        ref.elect([ref.trim(tl, 0.2, "global") for tl in dropped_np], "sum"),
        "mean",
    )
    got = mj.dare(base, fts, key=key, drop_rate=0.5, combine="ties", density=0.2, scale=0.9)
    assert_models_close(got, expected_model(base, want, 0.9), atol=1e-5)


def test_lines_scales_blocks_and_chains_after_reduction():
    tree = {"layers_0": {"w": jnp.ones(3)}, "layers_1": {"w": jnp.ones(3)}, "layers_2": {"w": jnp.ones(3)}, "head": jnp.ones(2)}
    blocks = mj.blocks_from_regex(tree, r"layers_(\d+)/")
    assert blocks == {"layers_0/w": 0, "layers_1/w": 1, "layers_2/w": 2}
    stage = mj.lines(0.2, 0.6, blocks)
    out = mj.chain(mj.Sum(), stage).merge_task_vectors([tree, tree])
    np.testing.assert_allclose(out["layers_0"]["w"], 2 * 0.2)
    np.testing.assert_allclose(out["layers_1"]["w"], 2 * 0.5)
    np.testing.assert_allclose(out["layers_2"]["w"], 2 * 0.8)
    np.testing.assert_allclose(out["head"], 2 * 0.2)
    with pytest.raises(ValueError, match="not in the tree"):
        mj.chain(mj.Sum(), mj.lines(0.2, 0.6, {"nope/w": 0})).merge_task_vectors([tree])


def test_chain_composes_breadcrumbs_ties_and_custom_stage():
    base, fts = make_models(seed=9)
    tvs = float_tvs_np(base, fts)
    masked = [[np.where(ref.breadcrumbs_mask(x, 0.4, 0.05), x, 0) for x in tl] for tl in tvs]
    want = ref.disjoint(masked, ref.elect(masked, "sum"), "mean")
    got = merged_tv(mj.chain(mj.BreadcrumbsMask(0.4, 0.05), mj.ElectSign(), mj.DisjointMean()), base, fts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6)


def test_equal_chains_share_one_compiled_program():
    from mergejax.merge import _merge_models_jit

    base, fts = make_models(seed=10)
    mj.ties(base, fts, density=0.3, scale=1.0)
    n = _merge_models_jit._cache_size()
    mj.ties(base, fts, density=0.3, scale=0.5)  # scale is traced: no recompilation
    assert _merge_models_jit._cache_size() == n


# ---------------------------------------------------------------- errors


def test_errors_name_model_path_shape_dtype():
    base, fts = make_models(seed=11)
    bad = jax.tree.map(lambda x: x, fts[1])
    bad["enc"]["kernel"] = jnp.zeros((12, 21))
    with pytest.raises(ValueError, match=r"finetuned\[1\] leaf 'enc/kernel' has shape \(12, 21\) dtype float32.*\(12, 20\)"):
        mj.ties(base, [fts[0], bad])
    bad = dict(fts[0])
    bad["emb"] = bad["emb"].astype(jnp.float32)
    with pytest.raises(ValueError, match="emb.*float32.*bfloat16"):
        mj.task_arithmetic(base, [bad])
    bad = dict(fts[0])
    del bad["head"]
    with pytest.raises(ValueError, match=r"finetuned\[0\].*structure.*head/w"):
        mj.task_arithmetic(base, [bad])


def test_hyperparameter_and_empty_errors():
    base, fts = make_models(seed=12)
    with pytest.raises(ValueError, match="density"):
        mj.ties(base, fts, density=1.5)
    with pytest.raises(ValueError, match="drop_rate"):
        mj.dare(base, fts, key=jax.random.key(0), drop_rate=1.0)
    with pytest.raises(ValueError, match="empty"):
        mj.ties(base, [])
    with pytest.raises(ValueError, match="empty"):
        mj.average([])
    with pytest.raises(ValueError, match="scope"):
        mj.ties(base, fts, scope="layer")
    with pytest.raises(ValueError, match="key"):
        mj.chain(mj.DareDrop(0.5), mj.Sum())(base, fts)
    with pytest.raises(ValueError, match="exactly one reduction"):
        mj.chain(mj.Trim(0.2))


def test_nan_inf_reported_by_path_and_check_can_be_disabled():
    base, fts = make_models(seed=13)
    bad = jax.tree.map(lambda x: x, fts[2])
    bad["head"]["w"] = bad["head"]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"finetuned\[2\] has NaN or Inf in leaf 'head/w'"):
        mj.ties(base, [fts[0], fts[1], bad])
    out = mj.task_arithmetic(base, [bad], check_finite=False)
    assert np.isnan(np.asarray(out["head"]["w"])[0, 0])


def test_methods_accept_compressed_task_vectors_mixed_with_models():
    base, fts = make_models(seed=14)
    ttvs = [mj.ternary.compress(mj.task_vector(f, base), density=0.3) for f in fts[:2]]
    dense = [t.to_task_vector() for t in ttvs]
    ties = mj.chain(mj.Trim(0.2), mj.ElectSign(), mj.DisjointMean())
    want = mj.apply_task_vector(base, ties.merge_task_vectors(dense))
    assert_models_close(mj.ties(base, ttvs), want, atol=1e-6)
    assert_models_close(ties(base, ttvs), want, atol=1e-6)
    tv2 = mj.task_vector(fts[2], base)
    want = mj.apply_task_vector(base, jax.tree.map(lambda a, b: a + b, dense[0], tv2.tree), scale=0.5)
    assert_models_close(mj.task_arithmetic(base, [ttvs[0], fts[2]], scale=0.5), want, atol=1e-6)
    other = mj.ternary.compress({"w": jnp.ones((3, 3))}, density=0.5)
    with pytest.raises(ValueError, match=r"finetuned\[1\]"):
        mj.task_arithmetic(base, [fts[0], other])
