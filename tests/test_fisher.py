"""Tests of mergejax.fisher: diagonal Fisher (exact / sampled / empirical) and Fisher-weighted merging."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import fisher, model
from mergejax.models.mlp import HEAD_PATTERN, MultiHeadMLP, init_params, make_apply_fn


class Linear(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x, task=0):
        return nn.Dense(self.classes)(x)


def _linear_problem(n=24, d=5, c=4, seed=0):
    rng = np.random.default_rng(seed)
    model = Linear(c)
    params = model.init(jax.random.key(seed), jnp.zeros((1, d)))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n).astype(np.int32)
    return (lambda p, b, t: model.apply(p, b["x"])), params, x, y


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _mlp_problem(n=12, d=6, seed=1):
    model = MultiHeadMLP(hidden=(8, 7), num_classes=(3, 5))
    params = init_params(model, jax.random.key(seed), d)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 5, size=n).astype(np.int32)
    return make_apply_fn(model), params, x, y


def _reference_loop(apply_fn, params, x, labels, task):
    """Per-example Python loop: mean over examples of the squared gradient of log p(label_n | x_n)."""
    return _reference_loop_batch(apply_fn, params, {"x": x}, labels, task)


def _reference_loop_batch(apply_fn, params, batch, labels, task):
    """The same for any dict batch: example n is ``{k: v[n:n + 1]}``."""
    total = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float64), params)

    def logp(p, example, yi):
        one = jax.tree_util.tree_map(lambda a: a[None], example)
        return jax.nn.log_softmax(apply_fn(p, one, task)[0])[yi]

    grad_fn = jax.jit(jax.grad(logp))  # compiled once, still one call per example
    for i, yi in enumerate(labels):
        g = grad_fn(params, jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), batch), jnp.int32(yi))
        total = jax.tree_util.tree_map(lambda t, gi: t + np.asarray(gi, np.float64) ** 2, total, g)
    return jax.tree_util.tree_map(lambda t: t / len(labels), total)


def _reference_loop_exact(apply_fn, params, batch, task):
    """Per-example Python loop of the exact Fisher: mean over examples of sum_c p_c (d log p_c / d theta)^2."""
    total = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float64), params)

    def logp(p, example):
        one = jax.tree_util.tree_map(lambda a: a[None], example)
        return jax.nn.log_softmax(apply_fn(p, one, task)[0])

    jac_fn = jax.jit(lambda p, e: (logp(p, e), jax.jacrev(logp)(p, e)))  # [classes, ...] per leaf
    n = len(jax.tree_util.tree_leaves(batch)[0])
    for i in range(n):
        lp, jac = jac_fn(params, jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), batch))
        prob = np.exp(np.asarray(lp, np.float64))
        total = jax.tree_util.tree_map(
            lambda t, g: t + np.tensordot(prob, np.asarray(g, np.float64) ** 2, axes=1), total, jac)
    return jax.tree_util.tree_map(lambda t: t / n, total)


class Mixed(nn.Module):
    """Dense layers the fast path covers (hidden, head) next to leaves it must leave to the per-example path."""

    @nn.compact
    def __call__(self, batch, task=0):
        h = nn.Dense(8, name="tokens")(batch["x"]).mean(1)  # [1, tokens, in] per example: a sum of outer products
        h = h + nn.Embed(10, 8, name="embed")(batch["tok"])
        shared = nn.Dense(8, name="shared")
        h = shared(nn.relu(shared(h)))  # one layer called twice
        h = nn.LayerNorm(name="norm")(h)
        h = nn.relu(nn.Dense(6, name="hidden")(h))
        return nn.Dense(4, use_bias=False, name="head")(h)


def _mixed_problem(n=9, seed=2):
    rng = np.random.default_rng(seed)
    batch = {"x": rng.normal(size=(n, 3, 5)).astype(np.float32), "tok": rng.integers(0, 10, n).astype(np.int32),
             "y": rng.integers(0, 4, n).astype(np.int32)}
    mixed = Mixed()
    params = mixed.init(jax.random.key(seed), {k: v[:1] for k, v in batch.items()})
    params = jax.tree_util.tree_map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32), params)
    return (lambda p, b, t: mixed.apply(p, b)), params, batch


def _assert_close(a, b, rtol=1e-5, atol=1e-7):
    for (p, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("method", ["per_example", "dense_outer"])
def test_exact_fisher_of_softmax_linear_classifier_matches_closed_form(method):
    apply_fn, params, x, _ = _linear_problem()
    batches = [{"x": x[:10]}, {"x": x[10:]}]  # two batches of different sizes
    F = fisher.diagonal(apply_fn, params, batches, mode="exact", chunk_size=4, method=method)
    W = np.asarray(params["params"]["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["params"]["Dense_0"]["bias"], np.float64)
    p = _softmax(x.astype(np.float64) @ W + b)
    # d log p_y / d W[i, c] = x_i (1[y=c] - p_c)  =>  E_y[(.)^2] = x_i^2 p_c (1 - p_c)
    want_w = (x.astype(np.float64) ** 2).T @ (p * (1 - p)) / len(x)
    want_b = (p * (1 - p)).mean(0)
    np.testing.assert_allclose(F["params"]["Dense_0"]["kernel"], want_w, rtol=1e-5)
    np.testing.assert_allclose(F["params"]["Dense_0"]["bias"], want_b, rtol=1e-5)
    assert F["params"]["Dense_0"]["kernel"].dtype == jnp.float32


# per_example with chunk 3: scan over chunks plus a remainder; 16: remainder only. auto: the Dense fast path.
@pytest.mark.parametrize("method,chunk_size", [("per_example", 3), ("per_example", 16), ("auto", 3)])
def test_empirical_fisher_matches_per_example_loop(method, chunk_size):
    apply_fn, params, x, y = _mlp_problem()
    batches = [{"x": x[:5], "y": y[:5]}, (x[5:], y[5:])]  # dict and tuple batches
    F = fisher.diagonal(apply_fn, params, batches, task=1, mode="empirical", chunk_size=chunk_size, method=method)
    _assert_close(F, _reference_loop(apply_fn, params, x, y, task=1))
    # the other head gets no gradient from task 1
    assert float(jnp.abs(F["params"]["head_0"]["kernel"]).max()) == 0.0


def test_sampled_fisher_matches_per_example_loop_with_same_draws():
    apply_fn, params, x, _ = _mlp_problem()
    key = jax.random.key(7)
    batches = [{"x": x[:4]}, {"x": x[4:]}]
    # Draws as documented: batch b uses fold_in(key, b), split into one key per example, y ~ softmax(logits).
    labels = []
    draw = jax.jit(lambda k, xi: jax.random.categorical(k, apply_fn(params, {"x": xi[None]}, 0)[0]))
    for b, batch in enumerate(batches):
        keys = jax.random.split(jax.random.fold_in(key, b), len(batch["x"]))
        for k, xi in zip(keys, batch["x"]):
            labels.append(int(draw(k, jnp.asarray(xi))))
    want = _reference_loop(apply_fn, params, x, np.asarray(labels), task=0)
    for method in ("per_example", "dense_outer"):  # the same draws on both paths
        F = fisher.diagonal(apply_fn, params, batches, task=0, mode="sampled", key=key, chunk_size=3, method=method)
        _assert_close(F, want)


def test_exact_fisher_of_mlp_matches_per_example_loop():
    apply_fn, params, x, _ = _mlp_problem()
    batches = [{"x": x[:7]}, {"x": x[7:]}]
    want = _reference_loop_exact(apply_fn, params, {"x": x}, task=1)
    for method in ("per_example", "dense_outer"):
        _assert_close(fisher.diagonal(apply_fn, params, batches, task=1, mode="exact", chunk_size=3, method=method),
                      want)


def test_dense_outer_plan_covers_only_single_row_single_use_dense_layers():
    apply_fn, params, batch = _mixed_problem()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    e_def, e_specs = model.shape_signature(batch)
    plan = fisher._dense_plan(apply_fn, 0, *model.shape_signature(params), tuple(range(len(paths))), e_def,
                              tuple((s[1:], d) for s, d in e_specs))
    covered = {paths[d.kernel] for d in plan.dense} | {paths[d.bias] for d in plan.dense if d.bias >= 0}
    assert covered == {"params/hidden/kernel", "params/hidden/bias", "params/head/kernel"}
    assert plan.unused == ()
    # an MLP head that task 1 never calls is unused (its Fisher is exactly zero without computing anything)
    apply_mlp, mlp_params, x, _ = _mlp_problem()
    e_def, e_specs = model.shape_signature({"x": x})
    plan = fisher._dense_plan(apply_mlp, 1, *model.shape_signature(mlp_params), tuple(range(8)), e_def,
                              tuple((s[1:], d) for s, d in e_specs))
    mlp_paths = [jax.tree_util.keystr(p, simple=True, separator="/")
                 for p, _ in jax.tree_util.tree_flatten_with_path(mlp_params)[0]]
    assert {mlp_paths[j] for j in plan.unused} == {"params/head_0/kernel", "params/head_0/bias"}
    assert len(plan.dense) == 3


@pytest.mark.parametrize("mode", ["empirical", "sampled", "exact"])
def test_dense_outer_matches_per_example_with_embed_norm_and_shared_layers(mode):
    """Covered Dense leaves, and Embed / LayerNorm / shared / token-sequence Dense leaves on the per-example path."""
    apply_fn, params, batch = _mixed_problem()
    key = jax.random.key(5)
    batches = [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}]
    slow = fisher.diagonal(apply_fn, params, batches, mode=mode, key=key, chunk_size=2, method="per_example")
    fast = fisher.diagonal(apply_fn, params, batches, mode=mode, key=key, chunk_size=2, method="dense_outer")
    _assert_close(fast, slow, rtol=2e-5, atol=1e-7)
    if mode == "exact":
        _assert_close(fast, _reference_loop_exact(apply_fn, params, batch, task=0), rtol=2e-5, atol=1e-7)
    elif mode == "empirical":
        _assert_close(fast, _reference_loop_batch(apply_fn, params, batch, batch["y"], task=0), rtol=2e-5, atol=1e-7)
    assert all(float(jnp.max(leaf)) > 0 for leaf in jax.tree_util.tree_leaves(fast))


def test_sampled_fisher_converges_to_exact():
    apply_fn, params, x, _ = _linear_problem(n=8, c=3)
    xs = np.repeat(x, 500, axis=0)
    exact = fisher.diagonal(apply_fn, params, [{"x": x}], mode="exact")
    sampled = fisher.diagonal(apply_fn, params, [{"x": xs}], mode="sampled", key=jax.random.key(3))
    _assert_close(sampled, exact, rtol=0.15, atol=2e-3)
    other = fisher.diagonal(apply_fn, params, [{"x": xs}], mode="sampled", key=jax.random.key(4))
    assert not np.allclose(other["params"]["Dense_0"]["kernel"], sampled["params"]["Dense_0"]["kernel"])


def test_diagonal_bad_inputs():
    apply_fn, params, x, y = _mlp_problem()
    with pytest.raises(ValueError, match="does not fit the model"):
        fisher.diagonal(apply_fn, params, [{"x": np.zeros((4, 9), np.float32)}])
    with pytest.raises(ValueError, match="leading examples axis"):
        fisher.diagonal(apply_fn, params, [{"x": x, "y": y[:-1]}], mode="empirical")
    with pytest.raises(ValueError, match="no labels"):
        fisher.diagonal(apply_fn, params, [{"x": x}], mode="empirical")
    with pytest.raises(ValueError, match="needs an explicit key"):
        fisher.diagonal(apply_fn, params, [{"x": x}], mode="sampled")
    with pytest.raises(ValueError, match="mode must be"):
        fisher.diagonal(apply_fn, params, [{"x": x}], mode="full")
    with pytest.raises(ValueError, match="method must be"):
        fisher.diagonal(apply_fn, params, [{"x": x}], method="fast")
    plain = {"w": jnp.ones((6, 3))}  # no flax module: nothing for the Dense fast path to capture
    with pytest.raises(ValueError, match="method='dense_outer' needs nn.Dense layers"):
        fisher.diagonal(lambda p, b, t: b["x"] @ p["w"], plain, [{"x": x}], method="dense_outer")
    with pytest.raises(ValueError, match="empty"):
        fisher.diagonal(apply_fn, params, [])
    nan_params = jax.tree_util.tree_map(lambda a: a, params)
    nan_params["params"]["encoder_1"] = dict(nan_params["params"]["encoder_1"])
    nan_params["params"]["encoder_1"]["bias"] = jnp.full((7,), jnp.nan)
    with pytest.raises(ValueError, match="NaN or Inf logits for task 0 in batch 0"):
        fisher.diagonal(apply_fn, nan_params, [{"x": x}])


def _nan_batches(x):
    bad = x.copy()
    bad[0, 0] = np.nan
    return [{"x": x[:4]}, {"x": bad[:4]}]


def test_diagonal_names_nan_batch():
    apply_fn, params, x, _ = _mlp_problem()
    with pytest.raises(ValueError, match="NaN or Inf logits for task 0 in batch 1"):
        fisher.diagonal(apply_fn, params, _nan_batches(x))


def _random_models(m=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"a": (4, 3), "b": (5,)}
    models = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()} | {"step": jnp.int32(j)}
              for j in range(m)]
    fishers = [{k: jnp.asarray(rng.uniform(0.0, 2.0, size=s), jnp.float32) for k, s in shapes.items()}
               | {"step": jnp.int32(0)} for _ in range(m)]
    return models, fishers


def _np_fisher_merge(models, fishers, weights, floor, normalize, keys=("a", "b")):
    w = np.asarray(weights, np.float64)
    if normalize:
        w = w / np.array([np.sqrt(sum((np.asarray(f[k], np.float64) ** 2).sum() for k in keys)) for f in fishers])
    out = {}
    for k in keys:
        fs = [np.maximum(np.asarray(f[k], np.float64), floor) for f in fishers]
        num = sum(wj * fj * np.asarray(m[k], np.float64) for wj, fj, m in zip(w, fs, models))
        out[k] = num / sum(wj * fj for wj, fj in zip(w, fs))
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [None, (0.2, 0.5, 0.3)])
def test_fisher_merge_matches_numpy(normalize, weights):
    models, fishers = _random_models()
    got = fisher.fisher_merge(models, fishers, weights=weights, normalize=normalize, floor=1e-3)
    want = _np_fisher_merge(models, fishers, weights or (1 / 3,) * 3, 1e-3, normalize)
    for k in ("a", "b"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert int(got["step"]) == 0  # non-float leaves from models[0]


def test_equal_fishers_give_plain_average():
    models, fishers = _random_models()
    same = [fishers[0]] * 3
    got = fisher.fisher_merge(models, same)
    for k in ("a", "b"):
        np.testing.assert_allclose(got[k], np.mean([np.asarray(m[k]) for m in models], 0), rtol=1e-5, atol=1e-6)


def test_floor_and_normalisation():
    models, fishers = _random_models(m=2)
    zeros = [jax.tree_util.tree_map(jnp.zeros_like, f) for f in fishers]
    # all Fishers zero: the floor makes it the weighted average
    got = fisher.fisher_merge(models, zeros, weights=(1.0, 3.0))
    np.testing.assert_allclose(got["a"], 0.25 * models[0]["a"] + 0.75 * models[1]["a"], rtol=1e-5)
    # one Fisher zero, the other one: model 1 wins up to floor / (1 + floor)
    ones = jax.tree_util.tree_map(jnp.ones_like, fishers[1])
    got = fisher.fisher_merge(models, [zeros[0], ones], floor=1e-6)
    want = (1e-6 * models[0]["a"] + models[1]["a"]) / (1 + 1e-6)
    np.testing.assert_allclose(got["a"], want, rtol=1e-5, atol=1e-6)
    # normalisation makes the result invariant to the scale of each Fisher (with no floor)
    scaled = [jax.tree_util.tree_map(lambda f: f * 1000.0, fishers[0]), fishers[1]]
    plain = fisher.fisher_merge(models, fishers, normalize=True, floor=0.0)
    rescaled = fisher.fisher_merge(models, scaled, normalize=True, floor=0.0)
    np.testing.assert_allclose(rescaled["a"], plain["a"], rtol=1e-5)
    unnormalized = fisher.fisher_merge(models, scaled, normalize=False, floor=0.0)
    assert not np.allclose(unnormalized["a"], plain["a"], rtol=1e-3)


def test_fisher_merge_keeps_heads_per_task_and_preserves_dtype():
    model = MultiHeadMLP(hidden=(6,), num_classes=(2, 3))
    base = init_params(model, jax.random.key(0), 4)
    rng = np.random.default_rng(0)

    def finetune(t):
        out = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), base)
        out["params"][f"head_{1 - t}"] = base["params"][f"head_{1 - t}"]  # model t only touched its own head
        return out

    models = [finetune(0), finetune(1)]
    fishers = [jax.tree_util.tree_map(jnp.ones_like, base)] * 2
    merged = fisher.fisher_merge(models, fishers, heads=HEAD_PATTERN, base=base)
    for t in range(2):
        _assert_close(merged["params"][f"head_{t}"], models[t]["params"][f"head_{t}"])
    np.testing.assert_allclose(merged["params"]["encoder_0"]["kernel"],
                               (models[0]["params"]["encoder_0"]["kernel"] + models[1]["params"]["encoder_0"]["kernel"]) / 2,
                               rtol=1e-6)
    bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), models)
    out = fisher.fisher_merge(bf, fishers)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(out))


def test_fisher_merge_bad_inputs():
    models, fishers = _random_models()
    with pytest.raises(ValueError, match="3 models but 2 Fishers"):
        fisher.fisher_merge(models, fishers[:2])
    with pytest.raises(ValueError, match="non-negative"):
        fisher.fisher_merge(models, fishers, weights=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="matches no leaf"):
        fisher.fisher_merge(models, fishers, heads=r"classifier", base=models[0])
    with pytest.raises(ValueError, match="pass base="):
        fisher.fisher_merge(models, fishers, heads=r"^b$")
    bad = dict(fishers[1])
    bad["a"] = bad["a"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="fishers\\[1\\] has NaN or Inf in leaf 'a'"):
        fisher.fisher_merge(models, [fishers[0], bad, fishers[2]])
    wrong = dict(fishers[0])
    wrong["a"] = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="leaf 'a' has shape"):
        fisher.fisher_merge(models, [wrong, fishers[1], fishers[2]])


def test_model_contract_names_stay_importable_from_fisher():
    for name in ("ApplyFn", "head_flags", "check_batch", "labels_of", "save_tree", "load_tree"):
        assert getattr(fisher, name) is getattr(model, name)


def test_fisher_save_load_roundtrip(tmp_path):
    apply_fn, params, x, _ = _mlp_problem()
    F = fisher.diagonal(apply_fn, params, [{"x": x}])
    fisher.save_fisher(tmp_path / "fisher", F)
    _assert_close(fisher.load_fisher(tmp_path / "fisher", like=params), F, rtol=0, atol=0)
    _assert_close(fisher.load_fisher(tmp_path / "fisher"), F, rtol=0, atol=0)
