"""The operator algebra (issue 8): stages as pytrees, per-task weights, heads, typed task vectors, data-informed
reductions as stages, and merges inside the user's jit / vmap / grad."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax.merge import _merge_models_jit
from tests import reference as ref


def tree(rng, scale=1.0):
    return {
        "enc": {"kernel": (rng.normal(size=(6, 5)) * scale).astype(np.float32),
                "bias": (rng.normal(size=(5,)) * scale).astype(np.float32)},
        "blocks": [{"w": (rng.normal(size=(4, 4)) * scale).astype(np.float32)} for _ in range(3)],
        "head": {"w": (rng.normal(size=(5, 3)) * scale).astype(np.float32)},
        "step": np.int32(7),
    }


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    base = tree(rng)
    def finetune(b):
        if not np.issubdtype(np.asarray(b).dtype, np.floating):
            return b
        return b + (rng.normal(size=np.shape(b)) * 0.1).astype(np.float32)

    fts = [jax.tree.map(finetune, base) for _ in range(3)]
    return jax.tree.map(jnp.asarray, base), [jax.tree.map(jnp.asarray, f) for f in fts]


def np_leaves(tree_):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree_) if np.issubdtype(np.asarray(x).dtype, np.floating)]


def tvs_np(base, fts):
    b = np_leaves(base)
    return [[f - x for f, x in zip(np_leaves(ft), b)] for ft in fts]


def merged_np(base, leaves, scale=1.0):
    b = np_leaves(base)
    return [x + scale * m for x, m in zip(b, leaves)]


def idx(base, path):
    """Position of ``path`` among the float leaves."""
    return [p for p, x in mj.tree.paths_and_leaves(base) if mj.tree.is_float(x)].index(path)


def assert_close(got_tree, want_leaves, atol=2e-6):
    got = np_leaves(got_tree)
    assert len(got) == len(want_leaves)
    for g, w in zip(got, want_leaves):
        np.testing.assert_allclose(g, w, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- composing with JAX


def test_merges_run_inside_user_jit(models):
    base, fts = models
    for fn in (lambda b, f: mj.ties(b, f), lambda b, f: mj.task_arithmetic(b, f, scale=0.3),
               lambda b, f: mj.dare(b, f, key=jax.random.key(0)), lambda b, f: mj.breadcrumbs(b, f),
               lambda b, f: mj.pcb(b, f), lambda b, f: mj.average([b, *f])):
        eager = fn(base, fts)
        jitted = jax.jit(fn)(base, fts)
        for a, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
    # concrete models closed over inside the caller's jit: the NaN/Inf report is skipped, not a tracer error
    closed = jax.jit(lambda s: mj.ties(base, fts, scale=s))(1.0)
    np.testing.assert_allclose(np.asarray(closed["enc"]["kernel"]), np.asarray(mj.ties(base, fts)["enc"]["kernel"]),
                               atol=1e-6)


def test_vmap_over_scale_and_weights(models):
    base, fts = models
    scales = jnp.array([0.1, 0.5, 1.0])
    out = jax.vmap(lambda s: mj.ties(base, fts, scale=s))(scales)
    for i, s in enumerate(scales):
        one = mj.ties(base, fts, scale=float(s))
        np.testing.assert_allclose(np.asarray(out["enc"]["kernel"][i]), np.asarray(one["enc"]["kernel"]), atol=1e-6)
    ws = jnp.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    out = jax.vmap(lambda w: mj.task_arithmetic(base, fts, weights=w))(ws)
    for i in range(2):
        one = mj.task_arithmetic(base, fts, weights=np.asarray(ws[i]))
        np.testing.assert_allclose(np.asarray(out["blocks"][1]["w"][i]), np.asarray(one["blocks"][1]["w"]), atol=1e-6)


def test_grad_with_respect_to_scale_and_weights(models):
    base, fts = models
    tv = tvs_np(base, fts)
    # d/ds sum(theta_0 + s sum_t tau_t) = sum(sum_t tau_t)
    g = jax.grad(lambda s: sum(jnp.sum(x) for x in jax.tree.leaves(mj.task_arithmetic(base, fts, scale=s))
                               if x.dtype == jnp.float32))(0.5)
    np.testing.assert_allclose(float(g), sum(float(np.sum(sum(t[i] for t in tv))) for i in range(len(tv[0]))),
                               rtol=1e-5)
    gw = jax.grad(lambda w: jnp.sum(mj.task_arithmetic(base, fts, weights=w)["enc"]["kernel"]))(jnp.ones(3))
    np.testing.assert_allclose(np.asarray(gw), [np.sum(t[idx(base, 'enc/kernel')]) for t in tv], rtol=1e-5)
    gt = jax.grad(lambda w: jnp.sum(mj.ties(base, fts, weights=w)["enc"]["kernel"]))(jnp.ones(3))
    assert np.all(np.isfinite(np.asarray(gt)))


def test_new_weights_and_scales_do_not_recompile(models):
    base, fts = models
    mj.ties(base, fts, weights=[1.0, 2.0, 3.0], scale=0.5)
    before = _merge_models_jit._cache_size()
    for w, s in (([0.5, 0.5, 1.0], 1.0), ([3.0, 1.0, 0.1], 0.7)):
        mj.ties(base, fts, weights=w, scale=s)
    mj.chain(mj.Sum(), mj.lines(0.1, 0.5, {"blocks/1/w": 1, "blocks/0/w": 0}))(base, fts)
    after_lines = _merge_models_jit._cache_size()
    mj.chain(mj.Sum(), mj.lines(0.3, 0.9, {"blocks/1/w": 1, "blocks/0/w": 0}))(base, fts)  # new alpha, beta: data
    assert _merge_models_jit._cache_size() == after_lines == before + 1


# ---------------------------------------------------------------- per-task weights


def weighted_ties_np(tvs, w, density, scope="global"):
    """mergekit's TIES with weights: trim, elect on w_t tau_t, sum w tau [agree] / sum w [agree]."""
    trimmed = [ref.trim(t, density, scope) for t in tvs]
    weighted = [[wt * x for x in t] for wt, t in zip(w, trimmed)]
    gammas = ref.elect(weighted, "sum")
    out = []
    for i, g in enumerate(gammas):
        num = sum(wt * t[i] * ((np.sign(t[i]) == g) & (t[i] != 0)) for wt, t in zip(w, trimmed))
        den = sum(wt * ((np.sign(t[i]) == g) & (t[i] != 0)) for wt, t in zip(w, trimmed))
        out.append(num / np.where(den != 0, den, 1))
    return out


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_weighted_ties_follows_mergekit(models, scope):
    base, fts = models
    w = [0.5, 1.5, 0.25]
    got = mj.ties(base, fts, density=0.4, scope=scope, weights=w)
    assert_close(got, merged_np(base, weighted_ties_np(tvs_np(base, fts), w, 0.4, scope)), atol=1e-5)
    unit = mj.ties(base, fts, density=0.4, scope=scope, weights=[1.0, 1.0, 1.0])
    plain = mj.ties(base, fts, density=0.4, scope=scope)
    assert_close(unit, np_leaves(plain), atol=1e-6)


def test_weights_on_every_data_free_method(models):
    base, fts = models
    tv = tvs_np(base, fts)
    w = [2.0, -1.0, 0.5]
    assert_close(mj.task_arithmetic(base, fts, weights=w, scale=0.5),
                 merged_np(base, [sum(wt * t[i] for wt, t in zip(w, tv)) for i in range(len(tv[0]))], 0.5))
    key = jax.random.key(3)
    dropped = mj.chain(mj.DareDrop(0.5), mj.Sum()).transform(list(map(mj.task_vector, fts, [base] * 3)), key=key)
    # the merge folds the key per stage exactly as transform does, so the masks are the same
    want = [sum(wt * np.asarray(d, np.float64) for wt, d in zip(w, col)) for col in
            zip(*[np_leaves(d) for d in dropped])]
    assert_close(mj.dare(base, fts, key=key, drop_rate=0.5, weights=w), merged_np(base, want), atol=1e-5)
    masked = mj.chain(mj.BreadcrumbsMask(0.3, 0.1), mj.Sum()).transform([mj.task_vector(f, base) for f in fts])
    want = [sum(wt * np.asarray(d, np.float64) for wt, d in zip(w, col)) for col in
            zip(*[np_leaves(d) for d in masked])]
    assert_close(mj.breadcrumbs(base, fts, beta=0.3, gamma=0.1, weights=w), merged_np(base, want), atol=1e-5)
    scaled = [mj.task_vector(f, base) * wt for f, wt in zip(fts, w)]
    assert_close(mj.pcb(base, fts, weights=w), np_leaves(mj.pcb(base, scaled)), atol=1e-5)
    avg = mj.average(fts, weights=[1.0, 3.0, 0.0])
    np.testing.assert_allclose(np.asarray(avg["enc"]["bias"]),
                               (np.asarray(fts[0]["enc"]["bias"]) + 3 * np.asarray(fts[1]["enc"]["bias"])) / 4, atol=1e-6)


def test_per_leaf_weights(models):
    base, fts = models
    tv = tvs_np(base, fts)
    paths = [p for p, x in mj.tree.paths_and_leaves(base) if mj.tree.is_float(x)]
    table = {p: jnp.asarray([float(i), 1.0, 0.0]) for i, p in enumerate(paths)}
    got = mj.task_arithmetic(base, fts, weights=table)
    assert_close(got, merged_np(base, [i * tv[0][i] + tv[1][i] for i in range(len(paths))]), atol=1e-5)


def test_bad_weights_and_scale_are_rejected(models):
    base, fts = models
    with pytest.raises(ValueError, match="one entry per task"):
        mj.ties(base, fts, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        mj.task_arithmetic(base, fts, weights=[1.0, np.nan, 1.0])
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="scale must be finite"):
            mj.ties(base, fts, scale=bad)
    with pytest.raises(TypeError, match="list of models"):
        mj.ties(base, fts[0])


# ---------------------------------------------------------------- heads


def test_heads_are_kept_per_task_on_every_method(models):
    base, fts = models
    tv = tvs_np(base, fts)
    head_i = [i for i, (p, x) in enumerate(mj.tree.paths_and_leaves(base)) if p.startswith("head")][0]
    float_paths = [p for p, x in mj.tree.paths_and_leaves(base) if mj.tree.is_float(x)]
    h = float_paths.index("head/w")
    want_head = np.asarray(base["head"]["w"], np.float64) + sum(t[h] for t in tv)
    calls = {
        "ta": lambda **k: mj.task_arithmetic(base, fts, scale=0.3, **k),
        "ties": lambda **k: mj.ties(base, fts, **k),
        "dare": lambda **k: mj.dare(base, fts, key=jax.random.key(1), **k),
        "breadcrumbs": lambda **k: mj.breadcrumbs(base, fts, **k),
        "pcb": lambda **k: mj.pcb(base, fts, **k),
        "chain": lambda **k: mj.chain(mj.Trim(0.3), mj.ElectSign(), mj.DisjointMean())(base, fts, **k),
    }
    assert head_i >= 0
    for name, call in calls.items():
        out = call(heads=r"^head/")
        np.testing.assert_allclose(np.asarray(out["head"]["w"]), want_head, atol=1e-5, err_msg=name)
        mask = jax.tree.map(lambda x: False, base)
        mask["head"]["w"] = True
        np.testing.assert_allclose(np.asarray(call(heads=mask)["head"]["w"]), want_head, atol=1e-5, err_msg=name)
    # the head takes no part in the merge: a global trim over the rest equals TIES on the tree without the head
    no_head = lambda t: {k: v for k, v in t.items() if k != "head"}  # noqa: E731
    with_heads = mj.ties(base, fts, density=0.3, heads="^head/")
    without = mj.ties(no_head(base), [no_head(f) for f in fts], density=0.3)
    assert_close(no_head(with_heads), np_leaves(without))
    with pytest.raises(ValueError, match="matches no leaf"):
        mj.ties(base, fts, heads="nothing_like_this")


# ---------------------------------------------------------------- typed task vectors


def test_task_vectors_are_typed_and_never_merged_as_models(models):
    base, fts = models
    tv0 = mj.task_vector(fts[0], base)
    assert isinstance(tv0, mj.TaskVector)
    assert_close(mj.ties(base, [tv0, *fts[1:]]), np_leaves(mj.ties(base, fts)))
    assert_close(mj.task_arithmetic(base, [tv0, mj.task_vector(fts[1], base)]), np_leaves(mj.task_arithmetic(base, fts[:2])))
    doubled = tv0 + tv0
    np.testing.assert_allclose(np.asarray(doubled["enc"]["bias"]), 2 * np.asarray(tv0["enc"]["bias"]))
    assert isinstance(jax.tree.map(lambda x: x * 2, tv0), mj.TaskVector)
    with pytest.raises(TypeError, match="task vector"):
        mj.average([tv0, fts[1]])
    with pytest.raises(TypeError, match="TaskVector"):
        mj.task_vector(tv0, base)
    with pytest.raises(TypeError, match="base must be"):
        mj.ties(tv0, fts)
    ttv = mj.ternary.compress(tv0, density=0.5)
    with pytest.raises(TypeError, match="TernaryTaskVector"):
        mj.average([ttv, ttv])


# ---------------------------------------------------------------- stages as pytrees, user stages


class ScaledMean(mj.ops.Reduction):
    """A user reduction with array data and no decorator: sum_t c_t tau_t / T."""

    c: jax.Array

    def combine(self, xs):
        return sum(self.c[t] * x for t, x in enumerate(xs)) / len(xs)


class Shrink(mj.ops.Transform):
    """A user transform with a float (data) and a mode (metadata)."""

    factor: float = 0.5
    mode: str = "all"

    def __call__(self, tvs, key=None):
        return tuple(jax.tree.map(lambda x: x * self.factor if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
                     for t in tvs)


def test_user_stages_are_frozen_pytrees_and_trace(models):
    base, fts = models
    stage = ScaledMean(jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.c = jnp.zeros(3)
    leaves, treedef = jax.tree.flatten(Shrink(0.25, "all"))
    assert leaves == [0.25] and "all" in str(treedef)
    merger = mj.chain(Shrink(0.5), stage)
    tv = tvs_np(base, fts)
    want = [0.5 * sum((t + 1) * tv[t][i] for t in range(3)) / 3 for i in range(len(tv[0]))]
    assert_close(merger(base, fts), merged_np(base, want), atol=1e-5)
    assert_close(jax.jit(lambda m, b, f: m(b, f))(merger, base, fts), merged_np(base, want), atol=1e-5)
    out = jax.vmap(lambda c: mj.chain(Shrink(0.5), ScaledMean(c))(base, fts)["enc"]["bias"])(jnp.eye(3))
    b = idx(base, "enc/bias")
    for t in range(3):
        np.testing.assert_allclose(np.asarray(out[t]), np.asarray(base["enc"]["bias"]) + 0.5 * tv[t][b] / 3, atol=1e-5)
    g = jax.grad(lambda c: jnp.sum(mj.chain(Shrink(0.5), ScaledMean(c))(base, fts)["enc"]["bias"]))(jnp.ones(3))
    np.testing.assert_allclose(np.asarray(g), [0.5 * np.sum(t[b]) / 3 for t in tv], rtol=1e-5)
    g2 = jax.grad(lambda f: jnp.sum(mj.chain(Shrink(f), ScaledMean(jnp.ones(3)))(base, fts)["enc"]["bias"]))(0.5)
    np.testing.assert_allclose(float(g2), sum(np.sum(t[b]) for t in tv) / 3, rtol=1e-5)


def test_non_frozen_dataclass_stage_is_refused():
    @dataclasses.dataclass
    class Bad(mj.ops.Reduction):
        w: float = 1.0

        def combine(self, xs):
            return xs[0]

    with pytest.raises(TypeError, match="frozen"):
        Bad()


# ---------------------------------------------------------------- data-informed reductions as stages


def fishers_for(models_, seed=5):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda x: jnp.asarray(rng.uniform(0, 2, np.shape(x)).astype(np.float32)) if jnp.issubdtype(
        jnp.asarray(x).dtype, jnp.floating) else x, m) for m in models_]


def test_fisher_mean_stage_and_fisher_weighted_ties(models):
    base, fts = models
    F = fishers_for(fts)
    Fl = [np_leaves(f) for f in F]
    tv = tvs_np(base, fts)
    floor = 1e-3
    want = [sum((Fl[t][i] + floor) * tv[t][i] for t in range(3)) / sum(Fl[t][i] + floor for t in range(3))
            for i in range(len(tv[0]))]
    assert_close(mj.chain(mj.FisherMean(F, floor=floor))(base, fts), merged_np(base, want), atol=1e-5)
    # Fisher-weighted TIES: trim, elect, then the Fisher mean over the agreeing entries
    trimmed = [ref.trim(t, 0.3, "global") for t in tv]
    gammas = ref.elect(trimmed, "sum")
    agree = [[np.where(np.sign(t[i]) == g, t[i], 0) for i, g in enumerate(gammas)] for t in trimmed]
    want = [sum((Fl[t][i] + floor) * agree[t][i] for t in range(3)) / sum(Fl[t][i] + floor for t in range(3))
            for i in range(len(tv[0]))]
    got = mj.chain(mj.Trim(0.3), mj.ElectSign(), mj.FisherMean(F, floor=floor))(base, fts)
    assert_close(got, merged_np(base, want), atol=1e-5)
    # new Fishers of the same shapes: same compiled program
    before = _merge_models_jit._cache_size()
    mj.chain(mj.Trim(0.3), mj.ElectSign(), mj.FisherMean(fishers_for(fts, 9), floor=floor))(base, fts)
    assert _merge_models_jit._cache_size() == before
    with pytest.raises(ValueError, match="3 Fishers for 2"):
        mj.chain(mj.FisherMean(F))(base, fts[:2])


def test_regmean_reduction_is_a_stage(models):
    base, fts = models
    rng = np.random.default_rng(2)
    grams = []
    for _ in fts:
        x = rng.normal(size=(20, 6)).astype(np.float32)
        grams.append({"enc/kernel": jnp.asarray(x.T @ x / 20)})
    got = mj.chain(mj.RegMean(grams, alpha=1.0))(base, fts)
    G = [np.asarray(g["enc/kernel"], np.float64) for g in grams]
    W = [np.asarray(f["enc"]["kernel"], np.float64) for f in fts]
    want = np.linalg.solve(sum(G), sum(g @ w for g, w in zip(G, W)))
    np.testing.assert_allclose(np.asarray(got["enc"]["kernel"]), want, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got["enc"]["bias"]),
                               np.mean([np.asarray(f["enc"]["bias"]) for f in fts], axis=0), atol=1e-6)


# ---------------------------------------------------------------- AdaMerging over any chain


def linear_apply(params, batch, task):
    h = batch["x"] @ params["enc"]["kernel"] + params["enc"]["bias"]
    return jnp.tanh(h) @ params["head"]["w"]


def test_adamerging_learns_the_weights_of_any_chain(models):
    base, fts = models
    rng = np.random.default_rng(4)
    data = [{"x": jnp.asarray(rng.normal(size=(32, 6)).astype(np.float32))} for _ in fts]
    merged, coef = mj.adamerging(linear_apply, base, fts, data, steps=0, key=jax.random.key(0), heads="^head/",
                                 progress=False)
    want = mj.task_arithmetic(base, fts, scale=0.3, heads="^head/")
    assert_close(merged, np_leaves(want), atol=1e-5)
    assert jax.tree.map(lambda x: x * 2, coef).lambdas.tolist() == [0.6000000238418579] * 3
    ties_chain = mj.chain(mj.Trim(0.5), mj.ElectSign(), mj.Sum())
    merged, coef = mj.adamerging(linear_apply, base, fts, data, steps=3, granularity="layer", chain=ties_chain,
                                 optimizer=optax.sgd(0.1), key=jax.random.key(0), heads="^head/", progress=False)
    again = mj.apply_coefficients(base, fts, coef, chain=ties_chain, heads="^head/", key=jax.random.key(0))
    assert_close(merged, np_leaves(again), atol=1e-6)
    # the learned coefficients are the chain's per-leaf weights: the same merge through the combinator
    direct = mj.chain(mj.Trim(0.5), mj.ElectSign(), mj.Sum())(base, fts, weights=coef.per_leaf(), heads="^head/")
    assert_close(merged, np_leaves(direct), atol=1e-5)
    pp, _ = mj.adamerging(linear_apply, base, fts, data, steps=0, plus_plus=True, density=0.5,
                          key=jax.random.key(0), heads="^head/", progress=False)
    same, _ = mj.adamerging(linear_apply, base, fts, data, steps=0, chain=ties_chain, key=jax.random.key(0),
                            heads="^head/", progress=False)
    assert_close(pp, np_leaves(same))
