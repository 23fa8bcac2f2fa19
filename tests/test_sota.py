"""The newer data-free merges against the independent numpy references (tests/reference_sota.py), on matrices and on
Flax-style trees (kernels (in, out), biases, norms, an embedding, a bf16 kernel, an int leaf), with edge cases."""

from __future__ import annotations

import inspect
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax.emr import decode_mask, encode_mask
from mergejax.ops import consensus, della, model_stock, svd, wudi
from mergejax.ops.base import leaf_keys
from mergejax.tree import is_float, paths_and_leaves
from tests import reference as ref
from tests import reference_sota as R

RNG = np.random.default_rng


def _seed(*names: str) -> int:
    """A seed fixed by the test's name (Python's str hash changes from one process to the next)."""
    return zlib.crc32("/".join(names).encode())


def _separated_at(x: np.ndarray, k: int, min_gap: float = 1e-2) -> bool:
    """Whether the top-k singular subspace of `x` is well defined: sigma_k - sigma_{k+1} >= min_gap * sigma_1."""
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    return k >= len(s) or s[k - 1] - s[k] >= min_gap * s[0]


def _mats(rng, T, shape, rank=None, zero=()):
    """T random float32 matrices. Full-rank draws are redrawn until each task's top-floor(r/T) subspace (TSV-M's cut)
    is well separated: with a near-tie at the cut (relative gap ~1e-4) the truncation itself is ill-posed and float32
    and float64 legitimately pick different subspaces (measured: 2 in 3000 draws fail 5e-5, all with gaps < 2e-3)."""
    k = max(1, min(shape) // T)
    out = []
    for t in range(T):
        while True:
            if rank is None:
                x = rng.standard_normal(shape)
            else:
                x = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
            if rank is not None or t in zero or _separated_at(x, k):
                break
        out.append(np.zeros(shape, np.float32) if t in zero else np.asarray(x, np.float32))
    return out


MATRIX_METHODS = {
    "tsv": (svd.tsv_matrix, R.tsv),
    "iso_c": (svd.iso_c_matrix, R.iso_c),
    "iso_cts": (svd.iso_cts_matrix, R.iso_cts),
    "iso_cts_0.5": (lambda xs: svd.iso_cts_matrix(xs, 0.5), lambda xs: R.iso_cts(xs, 0.5)),
    "cart": (svd.cart_matrix, R.cart),
    "cart_0.3_1.0": (lambda xs: svd.cart_matrix(xs, 0.3, 1.0), lambda xs: R.cart(xs, 0.3, 1.0)),
}
CASES = {
    "T3": dict(T=3, shape=(12, 20)),
    "T3_tall": dict(T=3, shape=(20, 12)),
    "T1": dict(T=1, shape=(12, 20)),
    "r_lt_T": dict(T=4, shape=(3, 20)),
    "rank2": dict(T=3, shape=(12, 20), rank=2),
    "zero_task": dict(T=3, shape=(12, 20), zero=(1,)),
    "all_zero": dict(T=2, shape=(6, 5), zero=(0, 1)),
}


_BASE_METHODS = ("tsv", "iso_c", "iso_cts", "cart")


@pytest.mark.parametrize(
    "method,case",
    [(m, c) for m in _BASE_METHODS for c in CASES] + [(m, c) for m in MATRIX_METHODS if m not in _BASE_METHODS for c in ("T3", "rank2")],
)
def test_matrix_methods_match_reference(method, case):
    fn, reference = MATRIX_METHODS[method]
    xs = _mats(RNG(_seed(method, case)), **CASES[case])
    got = np.asarray(jax.jit(fn)([jnp.asarray(x) for x in xs]))
    want = reference(xs)
    assert got.shape == want.shape and got.dtype == np.float32
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=5e-5 * scale, rtol=0)


def test_tsv_r_lt_T_is_zero_and_T1_is_the_matrix():
    xs = _mats(RNG(0), 4, (3, 20))
    assert not np.any(np.asarray(svd.tsv_matrix([jnp.asarray(x) for x in xs])))
    x = _mats(RNG(1), 1, (12, 20))[0]
    np.testing.assert_allclose(np.asarray(svd.tsv_matrix([jnp.asarray(x)])), x, atol=2e-5)


def test_iso_c_spectrum_is_flat():
    xs = [jnp.asarray(x) for x in _mats(RNG(2), 3, (12, 20))]
    s_sum = np.linalg.svd(np.asarray(sum(xs)), compute_uv=False)
    s = np.linalg.svd(np.asarray(svd.iso_c_matrix(xs)), compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s_sum.mean()), rtol=1e-5)


@pytest.mark.parametrize("r,T,frac", [(768, 8, 0.8), (12, 3, 0.8), (10, 4, 0.0), (11, 4, 0.0), (5, 1, 1.0), (3, 4, 0.8)])
def test_iso_cts_sizes(r, T, frac):
    c, n_t = svd.iso_cts_sizes(r, T, frac)
    assert c >= 0 and n_t >= 0 and c + T * n_t == r
    c0 = int(r * frac)
    if round((r - c0) / T) * T <= r:  # the reference's own arithmetic
        assert n_t == round((r - c0) / T)


# ----------------------------------------------------------------------------------------------------- WUDI
def test_wudi_matches_reference_adam():
    xs = _mats(RNG(3), 3, (12, 20))
    stack = jnp.asarray(np.stack(xs))
    for normalize, squared in (("squared", True), ("norm", False)):
        want = R.wudi(xs, 40, 1e-2, squared=squared)
        moved = np.abs(want - np.sum(xs, 0)).max()
        assert moved > 0.1
        for flip in (False, True):  # flip: the matrices stored transposed (Flax kernels), no transpose made
            s = stack.transpose(0, 2, 1) if flip else stack
            got = jax.jit(
                lambda s: wudi.wudi_optimize(
                    [s.sum(0)], [wudi.wudi_statistics(s, normalize, flip=flip)], steps=40, lr=1e-2, flips=[flip]
                )[0]
            )(s)
            got = np.asarray(got).T if flip else np.asarray(got)
            np.testing.assert_allclose(got, want, atol=1e-3 * moved, err_msg=f"{normalize} flip={flip}")


def test_wudi_gradient_is_the_loss_gradient():
    xs = jnp.asarray(np.stack(_mats(RNG(4), 3, (6, 9))))
    delta = jnp.asarray(RNG(6).standard_normal((6, 9)).astype(np.float32))
    a, c = wudi.wudi_statistics(xs)
    auto = jax.grad(wudi.wudi_loss)(xs.sum(0) + delta, xs)
    np.testing.assert_allclose(np.asarray(wudi.wudi_gradient(delta, a, c)), np.asarray(auto), rtol=1e-4, atol=1e-3)


def test_wudi_zero_task_and_loss_decreases():
    xs = _mats(RNG(5), 3, (12, 20), zero=(2,))
    stack = jnp.asarray(np.stack(xs))
    out = wudi.wudi_optimize([stack.sum(0)], [wudi.wudi_statistics(stack)], steps=50, lr=1e-2)[0]
    assert np.all(np.isfinite(np.asarray(out)))
    assert float(wudi.wudi_loss(out, stack)) < float(wudi.wudi_loss(stack.sum(0), stack))
    np.testing.assert_allclose(np.asarray(out), R.wudi(xs, 50, 1e-2), atol=2e-3)


# ----------------------------------------------------------------------------------------------------- trees
def make_tree(rng, *, bf16=True):
    def f(shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    tree = {
        "Dense_0": {"kernel": f((12, 20)), "bias": f((20,))},
        "Dense_1": {"kernel": f((20, 12))},
        "LayerNorm_0": {"scale": f((20,)), "bias": f((20,))},
        "Embed_0": {"embedding": f((7, 5))},
        "temp": f(()),
        "step": jnp.asarray(rng.integers(0, 9, (2,)), jnp.int32),
    }
    if bf16:
        tree["Dense_2"] = {"kernel": f((12, 20)).astype(jnp.bfloat16)}  # same shape as Dense_0: batched with it
    return tree


def make_models(seed=0, T=3, **kw):
    rng = RNG(seed)
    return make_tree(rng, **kw), [make_tree(rng, **kw) for _ in range(T)]


def tvs_np(base, fts):
    """{path: [T float32 task-vector leaves]} for the float leaves."""
    out = {}
    for (path, b), *rest in zip(paths_and_leaves(base), *[paths_and_leaves(f) for f in fts]):
        if is_float(b):
            out[path] = [np.asarray(x, np.float32) - np.asarray(b, np.float32) for _, x in rest]
    return out


def expected_tree(base, fts, matrix_ref, *, torch_orient, scale=1.0):
    tvs = tvs_np(base, fts)
    merged = {}
    for path, xs in tvs.items():
        if xs[0].ndim == 2:
            flip = torch_orient and path.endswith("kernel")
            m = matrix_ref([x.T for x in xs] if flip else xs)
            merged[path] = m.T if flip else m
        else:
            merged[path] = np.mean(xs, axis=0)
    return {
        p: (np.asarray(b, np.float32) + scale * merged[p]).astype(b.dtype) if is_float(b) else np.asarray(b)
        for p, b in paths_and_leaves(base)
    }


def assert_tree_close(got, want, atol):
    for path, g in paths_and_leaves(got):
        w = want[path]
        assert g.dtype == w.dtype, path
        tol = max(atol, 2e-2) if g.dtype == jnp.bfloat16 else atol
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, err_msg=path)


TREE_METHODS = {
    "tsv": (lambda b, f: mj.tsv(b, f, scale=0.7), R.tsv, False, 0.7),
    "iso_c": (lambda b, f: mj.iso_c(b, f, scale=1.5), R.iso_c, False, 1.5),
    "iso_cts": (lambda b, f: mj.iso_cts(b, f, common_fraction=0.8, scale=1.2), R.iso_cts, True, 1.2),
    "iso_cts_torch": (
        lambda b, f: mj.iso_cts(b, f, common_fraction=0.5, layout="torch"), lambda xs: R.iso_cts(xs, 0.5), False, 1.0
    ),
    "cart": (lambda b, f: mj.cart(b, f, rank_ratio=0.25, coeff=1.5), lambda xs: R.cart(xs, 0.25, 1.5), False, 1.0),
    "wudi": (
        lambda b, f: mj.wudi(b, f, steps=25, lr=1e-3, progress=False), lambda xs: R.wudi(xs, 25, 1e-3), True, 1.0
    ),
}


@pytest.mark.parametrize(
    "method,T", [(m, 3) for m in TREE_METHODS] + [("tsv", 1), ("iso_cts", 1), ("wudi", 1)]
)
def test_tree_methods_match_reference(method, T):
    call, matrix_ref, torch_orient, scale = TREE_METHODS[method]
    base, fts = make_models(seed=T, T=T)
    got = call(base, fts)
    assert_tree_close(got, expected_tree(base, fts, matrix_ref, torch_orient=torch_orient, scale=scale), atol=3e-4)


def test_iso_cts_is_not_transpose_invariant_and_transpose_regex_overrides():
    xs = _mats(RNG(7), 3, (12, 20))
    assert not np.allclose(R.iso_cts(xs, 0.5), R.iso_cts([x.T for x in xs], 0.5).T, atol=1e-3)
    base, fts = make_models(seed=7, bf16=False)
    tvs = tvs_np(base, fts)
    only = mj.iso_cts(base, fts, common_fraction=0.5, transpose=r"Embed_0")  # kernels kept as stored
    want_k = R.iso_cts(tvs["Dense_0/kernel"], 0.5) + np.asarray(base["Dense_0"]["kernel"])
    want_e = R.iso_cts([x.T for x in tvs["Embed_0/embedding"]], 0.5).T + np.asarray(base["Embed_0"]["embedding"])
    np.testing.assert_allclose(np.asarray(only["Dense_0"]["kernel"]), want_k, atol=2e-4)
    np.testing.assert_allclose(np.asarray(only["Embed_0"]["embedding"]), want_e, atol=2e-4)


def test_exclude_averages_matched_matrices():
    base, fts = make_models(seed=8, bf16=False)
    got = mj.tsv(base, fts, exclude=r"Embed_0")
    want = np.mean(tvs_np(base, fts)["Embed_0/embedding"], axis=0) + np.asarray(base["Embed_0"]["embedding"])
    np.testing.assert_allclose(np.asarray(got["Embed_0"]["embedding"]), want, atol=1e-6)


def test_wudi_progress_bar_runs(capsys):
    base, fts = make_models(seed=9, bf16=False)
    out = mj.wudi(base, fts, steps=4, lr=1e-3, progress=True)
    assert np.all(np.isfinite(np.asarray(out["Dense_0"]["kernel"])))


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout"):
        mj.IsoCTS(0.8, layout="jax")
    with pytest.raises(ValueError, match="common_fraction"):
        mj.IsoCTS(1.5)
    with pytest.raises(ValueError, match="epsilon"):
        mj.Della(0.5, 0.6)
    with pytest.raises(ValueError, match="at least 2"):
        mj.model_stock(*make_models(T=1))
    with pytest.raises(ValueError, match="normalize"):
        mj.WUDI(normalize="l1")


# ----------------------------------------------------------------------------------------------------- EMR
def test_emr_matches_reference_and_models():
    base, fts = make_models(seed=10, T=3)
    res = mj.emr(base, fts)
    tvs = tvs_np(base, fts)
    paths = list(tvs)
    unified, masks, resc = R.emr([[tvs[p][t] for p in paths] for t in range(3)])
    np.testing.assert_allclose(np.asarray(res.rescalers), resc, rtol=1e-5)
    for j, p in enumerate(paths):
        np.testing.assert_allclose(np.asarray(res.unified[j]), unified[j], atol=1e-6, err_msg=p)
    for t in range(3):
        model = res.model(t)
        want = {
            p: (np.asarray(b, np.float32) + resc[t] * unified[paths.index(p)] * masks[t][paths.index(p)]).astype(b.dtype)
            if is_float(b) else np.asarray(b)
            for p, b in paths_and_leaves(base)
        }
        assert_tree_close(model, want, atol=1e-5)
    with pytest.raises(IndexError):
        res.model(3)


def test_emr_heads_masks_coding_and_bytes():
    base, fts = make_models(seed=11, T=2, bf16=False)
    res = mj.emr(base, fts, heads=r"^Dense_1/")
    for t in range(2):
        np.testing.assert_allclose(np.asarray(res.model(t)["Dense_1"]["kernel"]), np.asarray(fts[t]["Dense_1"]["kernel"]), atol=1e-6)
    blobs = res.encode_masks()
    for t in range(2):
        for blob, words, shape in zip(blobs[t], res.masks[t], res._shapes):
            want = np.asarray(mj.ternary.device.unpack_bits(words, shape))
            np.testing.assert_array_equal(decode_mask(blob, shape), want)
    nb = res.nbytes()
    assert nb["masks_bitmap"] > 0 and nb["dense_task_vectors"] == 4 * 2 * sum(int(np.prod(s)) for s in res._shapes)
    for density in (0.01, 0.5, 0.99):  # coded masks: near H(d) bits per entry, never above the bitmap
        bits = RNG(12).random(200_000) < density
        blob = encode_mask(bits)
        np.testing.assert_array_equal(decode_mask(blob, bits.shape), bits)
        assert len(blob) <= bits.size / 8 + 40
        if density != 0.5:
            assert len(blob) * 8 < 1.05 * bits.size * -(density * np.log2(density) + (1 - density) * np.log2(1 - density)) + 400


def test_emr_zero_task_vector():
    base, fts = make_models(seed=13, T=2, bf16=False)
    res = mj.emr(base, [base, fts[1]])
    assert float(res.rescalers[0]) == 0.0
    np.testing.assert_allclose(np.asarray(res.model(0)["Dense_0"]["kernel"]), np.asarray(base["Dense_0"]["kernel"]))


# ----------------------------------------------------------------------------------------------------- Consensus
@pytest.mark.parametrize("lam,k", [(0.6, 2), (0.3, 1), (0.6, 0), (0.4, 4)])
def test_consensus_ta_matches_reference(lam, k):
    base, fts = make_models(seed=14, T=3)
    tvs = tvs_np(base, fts)
    paths = list(tvs)
    want_tv = R.consensus([[tvs[p][t] for p in paths] for t in range(3)], lam, k)
    got = mj.consensus_ta(base, fts, lam=lam, k=k, scale=0.5)
    want = {p: (np.asarray(b, np.float32) + 0.5 * want_tv[paths.index(p)]).astype(b.dtype) if is_float(b) else np.asarray(b)
            for p, b in paths_and_leaves(base)}
    assert_tree_close(got, want, atol=1e-5)


def test_consensus_ties_uses_ties_dis_sum():
    base, fts = make_models(seed=15, T=3, bf16=False)
    tvs = tvs_np(base, fts)
    paths = list(tvs)
    task_leaves = [[tvs[p][t] for p in paths] for t in range(3)]
    mtl = ref.ties_tv(task_leaves, 0.2, "global", "sum", "sum")
    want_tv = R.consensus(task_leaves, 0.5, 2, mtl_leaves=[np.asarray(m, np.float64) for m in mtl])
    got = mj.consensus_ties(base, fts, lam=0.5, k=2)
    for p in paths:
        b = np.asarray(dict(paths_and_leaves(base))[p], np.float32)
        np.testing.assert_allclose(np.asarray(dict(paths_and_leaves(got))[p]), b + want_tv[paths.index(p)], atol=1e-5)


# ----------------------------------------------------------------------------------------------------- DELLA
def test_della_matches_reference_with_the_same_draws():
    base, fts = make_models(seed=16, T=2, bf16=False)
    key = jax.random.key(3)
    stage = mj.Della(0.4, 0.2)
    tvs = [mj.task_vector(f, base) for f in fts]
    out = jax.jit(lambda tv, k: stage(tv, k))(tuple(tvs), key)
    for t in range(2):
        fi = 0
        for (path, x), (_, y) in zip(paths_and_leaves(tvs[t]), paths_and_leaves(out[t])):
            if not is_float(x):
                continue
            u = np.asarray(jax.random.uniform(leaf_keys(key, t, fi), jnp.shape(x), x.dtype))
            fi += 1
            xn = np.asarray(x)
            if path.endswith("kernel"):  # Flax kernels are ranked along axis 0 (PyTorch rows)
                want = R.della(xn.T, u.T, 0.4, 0.2).T
            else:
                want = R.della(xn, u, 0.4, 0.2)
            np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6, err_msg=path)


def test_della_keep_rate_l1_and_density_one():
    x = jnp.asarray(RNG(17).standard_normal((64, 512)).astype(np.float32))
    u = jax.random.uniform(jax.random.key(0), x.shape)
    kept = np.asarray(della.della_prune(x, u, 0.3, 0.1)) != 0
    assert abs(kept.mean() - 0.3) < 0.01
    big = np.abs(np.asarray(x)) > np.quantile(np.abs(np.asarray(x)), 0.9, axis=1, keepdims=True)
    assert kept[big].mean() > kept[~big].mean()  # larger magnitudes are kept more often
    l1 = della.della_prune(x, u, 0.3, 0.1, rescale="l1")
    np.testing.assert_allclose(float(jnp.abs(l1).sum()), float(jnp.abs(x).sum()), rtol=1e-4)
    base, fts = make_models(seed=18, T=2)
    same = mj.della(base, fts, key=jax.random.key(0), density=1.0, combine="task_arithmetic")
    assert_tree_close(same, {p: np.asarray(v) for p, v in paths_and_leaves(mj.task_arithmetic(base, fts))}, atol=1e-6)


@pytest.mark.parametrize(
    "name",
    ["wudi", "wudi_rules", "della", "della_torch"],
)
def test_leaf_schedule_equals_one_program(name):
    """Eager merges run these stages leaf by leaf (at_leaf decides the path rules per leaf); the result equals the
    single traced program's, including the transpose/exclude regexes and DELLA's per-(task, leaf) draws."""
    from mergejax.ops.reduce import DisjointMean
    from mergejax.ops.sign import ElectSign

    stages = {
        "wudi": (mj.WUDI(8, 1e-3, progress=False),),
        "wudi_rules": (mj.WUDI(8, 1e-3, transpose=r"Dense_1|Embed_0", exclude=r"Dense_0", progress=False),),
        "della": (mj.Della(0.4, 0.2), ElectSign(), DisjointMean()),
        "della_torch": (mj.Della(0.4, 0.2, layout="torch"), mj.Sum()),
    }[name]
    base, fts = make_models(seed=25, T=3)
    merger = mj.chain(*stages)
    key = jax.random.key(5) if name.startswith("della") else None
    leaves = merger(base, fts, key=key, schedule="leaves")
    program = merger(base, fts, key=key, schedule="program")
    for (path, a), (_, b) in zip(paths_and_leaves(leaves), paths_and_leaves(program)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6,
                                   err_msg=path)
    if name == "wudi_rules":  # the excluded kernel is the mean; the others moved away from it
        tvs = tvs_np(base, fts)
        b0 = np.asarray(base["Dense_0"]["kernel"], np.float32)
        np.testing.assert_allclose(np.asarray(leaves["Dense_0"]["kernel"]), b0 + np.mean(tvs["Dense_0/kernel"], 0),
                                   atol=1e-5)


# ----------------------------------------------------------------------------------------------------- Model Stock
@pytest.mark.parametrize("T", [2, 4])
def test_model_stock_matches_reference(T):
    base, fts = make_models(seed=19, T=T)
    tvs = tvs_np(base, fts)
    got = mj.model_stock(base, fts)
    want = {p: (np.asarray(b, np.float32) + R.model_stock(tvs[p])).astype(b.dtype) if is_float(b) else np.asarray(b)
            for p, b in paths_and_leaves(base)}
    assert_tree_close(got, want, atol=5e-4)  # arccos near cos = 1 (the scalar leaf) amplifies float32 rounding


def test_model_stock_identical_models_is_the_model():
    base, fts = make_models(seed=20, T=1, bf16=False)
    got = mj.model_stock(base, [fts[0], fts[0]])
    np.testing.assert_allclose(np.asarray(got["Dense_0"]["kernel"]), np.asarray(fts[0]["Dense_0"]["kernel"]), atol=1e-5)


# ----------------------------------------------------------------------------------------------------- combinator
_HAS_WEIGHTS = "weights" in inspect.signature(mj.Merger.__call__).parameters


@pytest.mark.skipif(not _HAS_WEIGHTS, reason="the combinator's weights=/heads= (issue 8) are not on this branch yet")
def test_weights_scale_task_vectors_before_tsv():
    base, fts = make_models(seed=21, T=2, bf16=False)
    w = (0.5, 2.0)
    got = mj.tsv(base, fts, weights=w)
    scaled = [jax.tree.map(lambda f, b: (b + wi * (f - b)) if is_float(b) else f, ft, base) for ft, wi in zip(fts, w)]
    want = mj.tsv(base, scaled)
    np.testing.assert_allclose(np.asarray(got["Dense_0"]["kernel"]), np.asarray(want["Dense_0"]["kernel"]), atol=1e-4)
    head = mj.iso_cts(base, fts, heads=r"^Dense_1/")  # a head leaf: base + sum_t tau_t, never seen by the stage
    tvs = tvs_np(base, fts)
    np.testing.assert_allclose(
        np.asarray(head["Dense_1"]["kernel"]), np.asarray(base["Dense_1"]["kernel"]) + sum(tvs["Dense_1/kernel"]), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(head["Dense_0"]["kernel"]),
        np.asarray(base["Dense_0"]["kernel"]) + R.iso_cts([x.T for x in tvs["Dense_0/kernel"]]).T, atol=3e-4,
    )


@pytest.mark.slow
def test_methods_jit_and_bf16_dtypes():
    base, fts = make_models(seed=22, T=2)
    for fn in (mj.tsv, mj.iso_c, mj.iso_cts, mj.cart, mj.consensus_ta, mj.model_stock):
        out = fn(base, fts)
        assert out["Dense_2"]["kernel"].dtype == jnp.bfloat16 and out["step"].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out["step"]), np.asarray(base["step"]))


# ----------------------------------------------------------------------------------------------------- sharding
def test_sharded_matches_unsharded_and_keeps_shardings(mesh8):
    from jax.sharding import PartitionSpec as P

    from mergejax import sharding as shd

    rng = RNG(23)

    def tree():
        return {
            "Dense_0": {"kernel": rng.standard_normal((64, 16)).astype(np.float32), "bias": rng.standard_normal(64).astype(np.float32)},
            "Dense_1": {"kernel": rng.standard_normal((16, 64)).astype(np.float32)},
        }

    base_np, fts_np = tree(), [tree() for _ in range(2)]
    rules = [(r"^Dense_0/kernel$", P("x")), (r"^Dense_0/bias$", P("x")), (r"^Dense_1/kernel$", P(None, "x"))]
    shardings = shd.shard_rules(base_np, rules, mesh8)
    base, fts = shd.shard_like(base_np, shardings), [shd.shard_like(f, shardings) for f in fts_np]
    one = jax.devices()[0]
    base1, fts1 = jax.device_put(base_np, one), [jax.device_put(f, one) for f in fts_np]
    calls = {
        "tsv": lambda b, f: mj.tsv(b, f),
        "iso_cts": lambda b, f: mj.iso_cts(b, f),
        "wudi": lambda b, f: mj.wudi(b, f, steps=5, lr=1e-3, progress=False),
    }
    for name, call in calls.items():
        got, want = call(base, fts), call(base1, fts1)
        for (path, g), (_, w), (_, s) in zip(paths_and_leaves(got), paths_and_leaves(want), paths_and_leaves(shardings)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4, err_msg=f"{name} {path}")  # SVD of a gathered vs local operand: float32-level differences
            assert g.sharding.is_equivalent_to(s, g.ndim), f"{name} {path}: {g.sharding} vs {s}"


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_WEIGHTS, reason="the README example passes weights= (issue 8 combinator)")
def test_readme_sota_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("## Newer data-free methods")
    block, conv_block = re.findall(r"```python\n(.*?)```", text[start : text.index("\n## ", start + 3)], re.S)

    def model(seed):
        k = jax.random.split(jax.random.key(seed), 3)
        return {"layers_0": {"kernel": jax.random.normal(k[0], (4, 8))}, "layers_1": {"kernel": jax.random.normal(k[1], (8, 8))},
                "head": {"bias": jax.random.normal(k[2], (2,))}}

    env = {"mj": mj, "base": model(0), "ft_a": model(1), "ft_b": model(2), "ft_c": model(3)}
    exec(compile(block, "README.md", "exec"), env)
    assert env["size"]["masks_bitmap"] > 0
    (b, f), (tb, tf) = make_conv_models(seed=40, T=2), make_conv_models(seed=40, T=2, torch_layout=True)
    conv_env = {"mj": mj, "base_cnn": b, "fts_cnn": f, "base_pt": tb, "fts_pt": tf}
    exec(compile(conv_block, "README.md", "exec"), conv_env)
    assert conv_env["merged"]["Conv_0"]["kernel"].shape == (6, 4, 3, 3)


def test_tall_masks_match_reference_and_recover_models():
    base, fts = make_models(seed=24, T=3, bf16=False)
    tvs = tvs_np(base, fts)
    paths = list(tvs)
    masks, mtl = R.tall_masks([[tvs[p][t] for p in paths] for t in range(3)], 0.4)
    res = mj.tall_masks(base, fts, lam=0.4)
    for t in range(3):
        got_m = dict(paths_and_leaves(res.masks[t]))
        model = dict(paths_and_leaves(res.model(t)))
        for j, p in enumerate(paths):
            np.testing.assert_array_equal(np.asarray(got_m[p]), masks[t][j], err_msg=p)
            want = np.asarray(dict(paths_and_leaves(base))[p], np.float32) + masks[t][j] * mtl[j]
            np.testing.assert_allclose(np.asarray(model[p]), want, atol=1e-5, err_msg=p)
    assert int(res.model(0)["step"][0]) == int(base["step"][0])


def test_matrix_batch_modes_agree(monkeypatch):
    """The CPU loop (lax.map) over a shape group gives what vmap gives (Iso-C: one SVD per matrix, so the vmapped
    program has a single batched SVD and cannot meet the concurrent-batched-SVD deadlock it avoids)."""
    from mergejax.ops.matrix import batch_mode

    base, fts = make_models(seed=3, T=3)
    out = {}
    for mode in ("map", "vmap"):
        monkeypatch.setenv("MERGEJAX_MATRIX_BATCH", mode)
        assert batch_mode() == mode
        out[mode] = mj.iso_c(base, fts, scale=1.0)
    for a, b in zip(jax.tree.leaves(out["map"]), jax.tree.leaves(out["vmap"])):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("MERGEJAX_MATRIX_BATCH", "loop")
    with pytest.raises(ValueError, match="MERGEJAX_MATRIX_BATCH"):
        batch_mode()


# ----------------------------------------------------------------------------------------------------- N-D kernels
def make_conv_tree(rng, *, torch_layout=False):
    """A tiny conv net, Flax layout ((kh, kw, in, out) kernels) or its PyTorch state dict ((out, in, kh, kw))."""
    def f(shape):
        return rng.standard_normal(shape).astype(np.float32)

    flax = {
        "Conv_0": {"kernel": f((3, 3, 4, 6)), "bias": f((6,))},
        "Conv_1": {"kernel": f((3, 3, 6, 6))},
        "Conv_2": {"kernel": f((1, 1, 6, 6))},  # a 1x1 conv: (6, 6) as a matrix
        "BatchNorm_0": {"scale": f((6,)), "bias": f((6,))},
        "Dense_0": {"kernel": f((6, 5)), "bias": f((5,))},
    }
    return jax.tree.map(jnp.asarray, to_torch(flax) if torch_layout else flax)


def to_torch(tree):
    """Flax conv kernels (kh, kw, in, out) -> (out, in, kh, kw) and dense (in, out) -> (out, in), by path."""
    def leaf(path, x):
        if path.endswith("kernel"):
            return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else x.T
        return x

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [leaf(mj.tree.path_str(p), np.asarray(x)) for p, x in flat])


def make_conv_models(seed=0, T=3, torch_layout=False):
    rng = RNG(seed)
    return (make_conv_tree(rng, torch_layout=torch_layout),
            [make_conv_tree(rng, torch_layout=torch_layout) for _ in range(T)])


def expected_conv(base, fts, matrix_ref, *, torch_orient, scale=1.0):
    """numpy: every kernel viewed as (prod(shape[:-1]), shape[-1]), transposed when ``torch_orient``, merged by
    ``matrix_ref`` and reshaped back; other leaves averaged."""
    merged = {}
    for path, xs in tvs_np(base, fts).items():
        if path.endswith("kernel"):
            shape = xs[0].shape
            mats = [x.reshape(-1, shape[-1]) for x in xs]
            m = matrix_ref([x.T for x in mats]).T if torch_orient else matrix_ref(mats)
            merged[path] = np.asarray(m).reshape(shape)
        else:
            merged[path] = np.mean(xs, axis=0)
    return {p: np.asarray(b, np.float32) + scale * merged[p] for p, b in paths_and_leaves(base)}


CONV_METHODS = {
    "tsv": (lambda **kw: mj.tsv_chain(**kw), R.tsv, False),
    "iso_c": (lambda **kw: mj.iso_c_chain(**kw), R.iso_c, False),
    "iso_cts": (lambda **kw: mj.iso_cts_chain(common_fraction=0.5, **kw), lambda xs: R.iso_cts(xs, 0.5), True),
    "cart": (lambda **kw: mj.cart_chain(rank_ratio=0.25, coeff=1.5, **kw), lambda xs: R.cart(xs, 0.25, 1.5), False),
    "wudi": (lambda **kw: mj.wudi_chain(steps=15, lr=1e-3, progress=False, **kw), lambda xs: R.wudi(xs, 15, 1e-3),
             True),
}


@pytest.mark.parametrize("method", list(CONV_METHODS))
def test_matrix_axes_merges_conv_kernels_as_matrices(method):
    """matrix_axes=-1: a Flax conv kernel is the (kh*kw*in, out) matrix (oriented (out, kh*kw*in) where the method
    is not transpose-invariant), against the numpy references; the PyTorch copy of the same net (layout="torch",
    matrix_axes=1, (out, in*kh*kw)) merges to the same weights."""
    factory, matrix_ref, torch_orient = CONV_METHODS[method]
    base, fts = make_conv_models(seed=31)
    got = factory(matrix_axes=-1)(base, fts, scale=0.8)
    want = expected_conv(base, fts, matrix_ref, torch_orient=torch_orient, scale=0.8)
    for path, g in paths_and_leaves(got):
        np.testing.assert_allclose(np.asarray(g), want[path], atol=3e-4, err_msg=path)
    tbase, tfts = make_conv_models(seed=31, torch_layout=True)
    kw = {"layout": "torch"} if torch_orient else {}
    tgot = factory(matrix_axes=1, **kw)(tbase, tfts, scale=0.8)
    for (path, g), (_, t) in zip(paths_and_leaves(to_torch(jax.device_get(got))), paths_and_leaves(tgot)):
        np.testing.assert_allclose(np.asarray(t), np.asarray(g), atol=3e-4, err_msg=path)


def test_conv_net_default_averages_kernels_and_warns():
    base, fts = make_conv_models(seed=32)
    with pytest.warns(UserWarning, match=r"tsv: 7 of 8 float leaves \(599 of 629 parameters, 95%\) are not matrices.*"
                                         r"3 of them have more than two axes.*matrix_axes=-1"):
        got = mj.tsv(base, fts)
    tvs = tvs_np(base, fts)
    np.testing.assert_allclose(np.asarray(got["Conv_1"]["kernel"]),
                               np.asarray(base["Conv_1"]["kernel"]) + np.mean(tvs["Conv_1/kernel"], 0), atol=1e-6)
    with pytest.warns(UserWarning, match="wudi: 7 of 8"):
        mj.wudi(base, fts, steps=2, progress=False)  # leaf by leaf: the merge checks the whole model once
    with pytest.warns(UserWarning, match="iso_cts: 7 of 8"):
        jax.jit(lambda b, f: mj.iso_cts(b, f, check_finite=False))(base, fts)  # shapes suffice: warned while tracing
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mj.tsv_chain(matrix_axes=-1)(base, fts)  # every kernel a matrix now: 97% of the parameters
        mb, mf = make_models(seed=33)
        mj.tsv(mb, mf)  # a transformer-like tree: mostly matrices, no warning


def test_matrix_axes_rules_and_errors():
    from mergejax.ops.matrix import matrix_axes_rules, matrix_view

    assert matrix_axes_rules(None) == () and matrix_axes_rules(-1) == (("", -1),)
    assert matrix_axes_rules({"query": 1, "out": -1}) == (("query", 1), ("out", -1))
    assert matrix_view("a/query/kernel", (8, 2, 4), matrix_axes_rules({"query": 1, "out": -1})) == (8, 8)
    assert matrix_view("a/out/kernel", (2, 4, 8), matrix_axes_rules({"query": 1, "out": -1})) == (8, 8)
    assert matrix_view("a/mlp/kernel", (2, 4, 8), matrix_axes_rules({"query": 1})) is None
    assert matrix_view("x", (3, 4), ()) == (3, 4) and matrix_view("x", (3,), (("", -1),)) is None
    for bad in (0, True, "1", {"a": 0}, [("a",)]):
        with pytest.raises(ValueError, match="matrix_axes"):
            mj.TSV(matrix_axes=bad)
    base, fts = make_conv_models(seed=34)
    with pytest.raises(ValueError, match=r"matrix_axes=4 does not split the leaf Conv_0/kernel of shape \(3, 3, 4, 6\)"):
        mj.tsv_chain(matrix_axes=4)(base, fts)


def test_matrix_axes_per_path_and_leaf_schedule():
    """A {regex: k} rule applies to the matching N-D leaves only; WUDI leaf by leaf equals the single program."""
    base, fts = make_conv_models(seed=35)
    m = mj.wudi_chain(steps=6, lr=1e-3, progress=False, matrix_axes={r"Conv_[01]/": -1})
    leaves, program = m(base, fts, schedule="leaves"), m(base, fts, schedule="program")
    for (path, a), (_, b) in zip(paths_and_leaves(leaves), paths_and_leaves(program)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=path)
    tvs = tvs_np(base, fts)
    np.testing.assert_allclose(np.asarray(leaves["Conv_2"]["kernel"]),  # no rule: averaged
                               np.asarray(base["Conv_2"]["kernel"]) + np.mean(tvs["Conv_2/kernel"], 0), atol=1e-6)
    assert not np.allclose(np.asarray(leaves["Conv_0"]["kernel"]),
                           np.asarray(base["Conv_0"]["kernel"]) + np.mean(tvs["Conv_0/kernel"], 0), atol=1e-3)


# ----------------------------------------------------------------------------------------------------- factories
def test_chain_factories_are_what_the_named_methods_run():
    base, fts = make_models(seed=36, T=2, bf16=False)
    key = jax.random.key(1)
    pairs = [
        (mj.tsv(base, fts, scale=0.5), mj.tsv_chain()(base, fts, scale=0.5)),
        (mj.iso_cts(base, fts, common_fraction=0.5), mj.iso_cts_chain(common_fraction=0.5)(base, fts)),
        (mj.cart(base, fts, rank_ratio=0.3), mj.cart_chain(rank_ratio=0.3)(base, fts)),
        (mj.consensus_ties(base, fts, k=1), mj.consensus_ties_chain(k=1)(base, fts)),
        (mj.della(base, fts, key=key, density=0.3), mj.della_chain(density=0.3)(base, fts, key=key)),
        (mj.model_stock(base, fts), mj.model_stock_chain()(base, fts)),
    ]
    for a, b in pairs:
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    skip = {"base", "finetuned", "scale", "weights", "heads", "check_finite", "key"}
    for name in ("tsv", "iso_c", "iso_cts", "wudi", "cart", "consensus_ta", "consensus_ties", "della", "model_stock"):
        named = {n: p.default for n, p in inspect.signature(getattr(mj, name)).parameters.items() if n not in skip}
        factory = {n: p.default for n, p in inspect.signature(getattr(mj, f"{name}_chain")).parameters.items()}
        assert named == factory, name  # matrix_axes= included: the named matrix methods take it too


# ----------------------------------------------------------------------------------------------------- DELLA-TIES
@pytest.mark.parametrize("weighted", [False, True])
def test_della_ties_one_stage_equals_the_three_stage_chain(weighted):
    """DellaTies (one pruning pass leaf by leaf) gives the chain Della, ElectSign, DisjointMean exactly, in both
    schedules, with and without per-task weights."""
    from mergejax.ops.reduce import DisjointMean
    from mergejax.ops.sign import ElectSign

    base, fts = make_models(seed=37, T=3)
    key = jax.random.key(7)
    w = jnp.asarray([0.5, 1.0, 2.0]) if weighted else None
    want = mj.chain(mj.Della(0.4, 0.2), ElectSign(), DisjointMean())(base, fts, key=key, weights=w, schedule="leaves")
    for schedule in ("leaves", "program"):
        got = mj.chain(mj.DellaTies(0.4, 0.2))(base, fts, key=key, weights=w, schedule=schedule)
        for (path, a), (_, b) in zip(paths_and_leaves(got), paths_and_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=path)


def test_della_ties_zero_majority_prunes_again(monkeypatch):
    """A majority sign of 0 (as many +1 as -1 elected signs) is not among the cached candidates: the output pass
    prunes again with it (forced here); the result is the merge with majority 0."""
    from mergejax.ops.reduce import DisjointMean
    from mergejax.ops.sign import ElectSign

    base, fts = make_models(seed=38, T=2, bf16=False)
    key = jax.random.key(8)
    monkeypatch.setattr(della.np, "sign", lambda x: 0)
    got = mj.chain(mj.DellaTies(0.5, 0.1))(base, fts, key=key, schedule="leaves")
    tvs = tuple(mj.task_vector(f, base) for f in fts)
    pruned = mj.Della(0.5, 0.1)(tvs, jax.random.fold_in(key, 0))
    (want,) = DisjointMean()(ElectSign().apply_with(pruned, jnp.int32(0)))
    for (path, g), (_, t), (_, b) in zip(paths_and_leaves(got), paths_and_leaves(want), paths_and_leaves(base)):
        if is_float(b):
            np.testing.assert_allclose(np.asarray(g), np.asarray(b) + np.asarray(t), atol=1e-6, err_msg=path)


def test_della_ties_matches_numpy_reference_with_zero_sum_ties():
    """DellaTies leaf by leaf against numpy (mergekit's MagPrune on the same draws, then TIES' election with the
    majority sign for zero sums and the disjoint mean); task 1 is -task 0 on one kernel, so many coordinates have an
    exactly zero sign mass and take the majority sign."""
    base, fts = make_models(seed=39, T=3, bf16=False)
    tvs = [mj.task_vector(f, base) for f in fts]
    neg = {**tvs[1].tree, "Dense_1": {"kernel": -tvs[0].tree["Dense_1"]["kernel"]}}
    tvs[1] = mj.TaskVector(neg)
    key = jax.random.key(9)
    got = mj.chain(mj.DellaTies(0.5, 0.3))(base, tvs, key=key, schedule="leaves")
    skey = jax.random.fold_in(key, 0)  # the stage's key (stage 0 of the chain)
    pruned, paths = [], None
    for t, tv in enumerate(tvs):
        leaves, fi, paths = [], 0, []
        for path, x in paths_and_leaves(tv.tree):
            if not is_float(x):
                continue
            u = np.asarray(jax.random.uniform(leaf_keys(skey, t, fi), jnp.shape(x), x.dtype))
            fi += 1
            xn = np.asarray(x)
            kernel = path.endswith("kernel") and xn.ndim == 2
            leaves.append((R.della(xn.T, u.T, 0.5, 0.3).T if kernel else R.della(xn, u, 0.5, 0.3)).astype(np.float32))
            paths.append(path)
        pruned.append(leaves)
    gammas = ref.elect(pruned, "sum")
    k1 = [pruned[t][paths.index("Dense_1/kernel")] for t in range(3)]
    ties0 = np.sum((k1[0] + k1[1] + k1[2] == 0) & (k1[0] != 0))  # zero mass, nonzero entries: the majority decides
    merged = ref.disjoint(pruned, gammas, "mean")
    want = dict(zip(paths, merged))
    for path, g in paths_and_leaves(got):
        if path in want:
            b = np.asarray(dict(paths_and_leaves(base))[path], np.float32)
            np.testing.assert_allclose(np.asarray(g), b + want[path], rtol=1e-5, atol=1e-5, err_msg=path)
    assert ties0 > 0
