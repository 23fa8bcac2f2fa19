"""Tests of mergejax.adamerging: task-/layer-wise AdaMerging, AdaMerging++, coefficients I/O, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mergejax.adamerging import adamerging, apply_coefficients, entropy, load_coefficients, save_coefficients
from experiments.toy_digits import accuracy, build_toy_problem

TASKS = ("mirror/digit", "flip/digit")


@pytest.fixture(scope="module")
def toy():
    return build_toy_problem(TASKS, hidden=(32, 32), pretrain_steps=200, finetune_steps=200)


def _unlabeled(toy):
    return [{"x": t.test["x"]} for t in toy.tasks]


def _mean_entropy(toy, params):
    return sum(float(entropy(toy.apply_fn(params, {"x": jnp.asarray(t.test["x"])}, i)).mean())
               for i, t in enumerate(toy.tasks))


def _mean_accuracy(toy, params):
    return float(np.mean([accuracy(toy.apply_fn, params, t.test, i) for i, t in enumerate(toy.tasks)]))


def _np_tvs(toy):
    base = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), toy.base)
    fts = [jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), f) for f in toy.finetuned]
    return base, [jax.tree_util.tree_map(lambda f, b: f - b, f, base) for f in fts]


def _is_head(path):
    return "head_" in jax.tree_util.keystr(path)


def _np_task_arithmetic(toy, tvs, lam):
    """base + lam * sum_t tau_t on the encoder; heads keep every task's change (base + sum_t tau_t)."""
    base = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), toy.base)

    def leaf(path, b, *ts):
        return b + (1.0 if _is_head(path) else lam) * sum(ts)

    return jax.tree_util.tree_map_with_path(leaf, base, *tvs)


def _assert_trees_close(a, b, atol=1e-5):
    for (p, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(p))


def test_entropy_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)


def test_zero_steps_is_task_arithmetic_at_init(toy):
    merged, coef = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), steps=0, key=jax.random.key(0),
                                  heads=toy.heads, progress=False)
    _, tvs = _np_tvs(toy)
    _assert_trees_close(merged, _np_task_arithmetic(toy, tvs, 0.3))
    np.testing.assert_array_equal(coef.lambdas, np.full(2, 0.3, np.float32))


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_decreases_and_shapes(toy, granularity):
    before = _mean_entropy(toy, adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), steps=0,
                                               key=jax.random.key(0), heads=toy.heads, progress=False)[0])
    merged, coef = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), granularity=granularity,
                                  steps=150, lr=1e-2, key=jax.random.key(1), heads=toy.heads, progress=False)
    assert _mean_entropy(toy, merged) < 0.9 * before
    paths = ("params/encoder_0/bias", "params/encoder_0/kernel", "params/encoder_1/bias", "params/encoder_1/kernel")
    assert coef.paths == paths
    assert coef.lambdas.shape == ((2,) if granularity == "task" else (2, 4))
    assert coef.granularity == granularity
    assert set(coef.per_leaf()) == set(paths)
    # the merged model is base + sum_t lambda_t^l tau_t^l with the returned coefficients
    _, tvs = _np_tvs(toy)
    lam = np.asarray(coef.lambdas, np.float64)
    for l, path in enumerate(paths):
        layer, name = path.split("/")[1:]
        want = np.asarray(toy.base["params"][layer][name], np.float64) + sum(
            (lam[t] if lam.ndim == 1 else lam[t, l]) * tvs[t]["params"][layer][name] for t in range(2))
        np.testing.assert_allclose(merged["params"][layer][name], want, atol=1e-5)


def test_clamp_keeps_coefficients_in_unit_interval(toy):
    kw = dict(steps=40, lr=0.2, init=0.9, key=jax.random.key(2), heads=toy.heads, progress=False, granularity="layer")
    _, clamped = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), clamp=True, **kw)
    _, free = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), clamp=False, **kw)
    assert float(clamped.lambdas.min()) >= 0.0 and float(clamped.lambdas.max()) <= 1.0
    assert float(jnp.abs(free.lambdas - 0.5).max()) > 0.5  # without the clamp the same run leaves [0, 1]


def _np_ties_trim_elect(tvs_leaves, density):
    """TIES trim (global top-k per task over the given leaves, ties kept) + sign election + keep agreeing."""
    trimmed = []
    for leaves in tvs_leaves:
        flat = np.concatenate([x.ravel() for x in leaves])
        k = int(np.floor(density * flat.size))
        thr = np.sort(np.abs(flat))[::-1][k - 1]
        trimmed.append([np.where(np.abs(x) >= thr, x, 0.0) for x in leaves])
    signs = [np.sign(sum(t[l] for t in trimmed)) for l in range(len(tvs_leaves[0]))]
    majority = np.sign(sum((s == 1).sum() - (s == -1).sum() for s in signs))
    signs = [np.where(s == 0, majority, s) for s in signs]
    return [[np.where(np.sign(x) == s, x, 0.0) for x, s in zip(t, signs)] for t in trimmed]


def test_plus_plus_uses_trimmed_sign_agreeing_vectors(toy):
    merged, _ = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), steps=0, plus_plus=True,
                               key=jax.random.key(0), heads=toy.heads, progress=False)
    _, tvs = _np_tvs(toy)
    enc = [(layer, name) for layer in ("encoder_0", "encoder_1") for name in ("bias", "kernel")]
    kept = _np_ties_trim_elect([[tv["params"][a][b] for a, b in enc] for tv in tvs], 0.2)
    n_nonzero = 0
    for l, (a, b) in enumerate(enc):
        want = np.asarray(toy.base["params"][a][b], np.float64) + 0.3 * sum(k[l] for k in kept)
        np.testing.assert_allclose(merged["params"][a][b], want, atol=1e-6)
        n_nonzero += sum(int((k[l] != 0).sum()) for k in kept)
    n = sum(tvs[0]["params"][a][b].size for a, b in enc)
    assert 0 < n_nonzero <= 2 * 0.2 * n + 2  # really trimmed
    for t in range(2):  # heads untouched by the trim
        np.testing.assert_allclose(merged["params"][f"head_{t}"]["kernel"], toy.finetuned[t]["params"][f"head_{t}"]["kernel"],
                                   atol=1e-6)


def test_adamerging_beats_task_arithmetic_at_0_3(toy):
    ta, _ = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), steps=0, key=jax.random.key(0),
                           heads=toy.heads, progress=False)
    learned, coef = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), granularity="layer",
                                   key=jax.random.key(3), heads=toy.heads, progress=False)
    acc_ta, acc_ada = _mean_accuracy(toy, ta), _mean_accuracy(toy, learned)
    assert acc_ada > acc_ta + 0.03, (acc_ada, acc_ta, coef.lambdas)


def test_precomputed_task_vectors_and_transforms(toy):
    from mergejax.merge import chain
    from mergejax.ops import DareDrop, Sum
    from mergejax.tree import task_vector

    tvs = tuple(task_vector(f, toy.base) for f in toy.finetuned)
    kw = dict(steps=20, key=jax.random.key(4), heads=toy.heads, progress=False, granularity="layer")
    from_models, c1 = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), **kw)
    from_tvs, c2 = adamerging(toy.apply_fn, toy.base, None, _unlabeled(toy), task_vectors=tvs, **kw)
    _assert_trees_close(from_models, from_tvs, atol=1e-6)
    # DARE-dropped vectors: learned on top of the per-task transform, equal to passing the dropped vectors directly
    dare = chain(DareDrop(0.5), Sum())
    dropped = dare.transform(tvs, key=jax.random.key(9))
    direct, _ = adamerging(toy.apply_fn, toy.base, None, _unlabeled(toy), task_vectors=dropped, steps=0,
                               key=jax.random.key(0), heads=toy.heads, progress=False)
    base_np, _ = _np_tvs(toy)
    dropped_np = [jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), d) for d in dropped]
    want = _np_task_arithmetic(toy, dropped_np, 0.3)
    for name in ("kernel", "bias"):  # encoder: base + 0.3 * sum of dropped vectors
        np.testing.assert_allclose(direct["params"]["encoder_0"][name], want["params"]["encoder_0"][name], atol=1e-6)
    assert not np.allclose(direct["params"]["encoder_0"]["kernel"], from_models["params"]["encoder_0"]["kernel"])


def test_coefficients_save_load_and_reapply(toy, tmp_path):
    merged, coef = adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), granularity="layer", steps=10,
                                  plus_plus=True, key=jax.random.key(5), heads=toy.heads, progress=False)
    save_coefficients(tmp_path / "coef", coef)
    loaded = load_coefficients(tmp_path / "coef")
    np.testing.assert_array_equal(loaded.lambdas, coef.lambdas)
    assert loaded.paths == coef.paths and loaded.granularity == "layer"
    again = apply_coefficients(toy.base, toy.finetuned, loaded, plus_plus=True, heads=toy.heads)
    _assert_trees_close(again, merged, atol=1e-6)
    with pytest.raises(ValueError, match="coefficients are for"):
        apply_coefficients(toy.base, toy.finetuned, loaded, heads=None)


def test_sharded_task_vectors_give_the_same_merge(toy, mesh8):
    from mergejax.tree import task_vector

    tvs = tuple(task_vector(f, toy.base) for f in toy.finetuned)

    def place(a):
        spec = PartitionSpec("x") if a.ndim and a.shape[0] % 8 == 0 else PartitionSpec()
        return jax.device_put(a, NamedSharding(mesh8, spec))

    sharded = tuple(jax.tree_util.tree_map(place, tv) for tv in tvs)
    kw = dict(steps=5, key=jax.random.key(6), heads=toy.heads, progress=False, granularity="layer")
    a, ca = adamerging(toy.apply_fn, toy.base, None, _unlabeled(toy), task_vectors=tvs, **kw)
    b, cb = adamerging(toy.apply_fn, toy.base, None, _unlabeled(toy), task_vectors=sharded, **kw)
    np.testing.assert_allclose(ca.lambdas, cb.lambdas, atol=1e-5)
    _assert_trees_close(a, b, atol=1e-5)


def test_progress_bar_shows_entropy(toy, capsys):
    adamerging(toy.apply_fn, toy.base, toy.finetuned, _unlabeled(toy), steps=20, key=jax.random.key(0),
                   heads=toy.heads, progress=True, log_every=5)
    err = capsys.readouterr().err
    assert "AdaMerging" in err and "entropy=" in err


def test_bad_inputs(toy):
    unl = _unlabeled(toy)
    kw = dict(key=jax.random.key(0), progress=False, steps=2)
    with pytest.raises(ValueError, match="matches no leaf"):
        adamerging(toy.apply_fn, toy.base, toy.finetuned, unl, heads=r"classifier", **kw)
    with pytest.raises(ValueError, match=r"unlabeled\[1\] .* does not fit the model"):
        adamerging(toy.apply_fn, toy.base, toy.finetuned, [unl[0], {"x": np.zeros((20, 50), np.float32)}],
                       heads=toy.heads, **kw)
    with pytest.raises(ValueError, match="2 task vectors, 1 unlabeled"):
        adamerging(toy.apply_fn, toy.base, toy.finetuned, unl[:1], heads=toy.heads, **kw)
    with pytest.raises(ValueError, match="granularity"):
        adamerging(toy.apply_fn, toy.base, toy.finetuned, unl, granularity="block", heads=toy.heads, **kw)
    with pytest.raises(ValueError, match="exactly one of"):
        adamerging(toy.apply_fn, toy.base, None, unl, heads=toy.heads, **kw)
    nan_x = np.array(unl[1]["x"])
    nan_x[:] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf logits for task 1"):
        adamerging(toy.apply_fn, toy.base, toy.finetuned, [unl[0], {"x": nan_x}], heads=toy.heads, **kw)
    bad = jax.tree_util.tree_map(lambda a: a, toy.finetuned[0])
    bad["params"] = dict(bad["params"])
    bad["params"]["encoder_0"] = {**bad["params"]["encoder_0"], "bias": bad["params"]["encoder_0"]["bias"] * jnp.nan}
    with pytest.raises(ValueError, match="finetuned\\[0\\] has NaN or Inf in leaf 'params/encoder_0/bias'"):
        adamerging(toy.apply_fn, toy.base, [bad, toy.finetuned[1]], unl, heads=toy.heads, **kw)
