"""Tests of mergejax.regmean: Gram capture through interceptors, closed form, alpha, averaging, bad inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax.regmean import gram_matrices, regmean
from mergejax.models.mlp import HEAD_PATTERN, MultiHeadMLP, init_params, make_apply_fn


class LinearMultiOut(nn.Module):
    """A purely linear model: y = x W (no bias), W of shape [in, out]."""

    out: int

    @nn.compact
    def __call__(self, x, task=0):
        return nn.Dense(self.out, use_bias=False, name="proj")(x)


def _perturbed(params, scale, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: a + scale * rng.normal(size=a.shape).astype(np.float32), params)


def test_linear_models_equal_pooled_least_squares():
    d, k, n = 6, 3, 40
    model = LinearMultiOut(k)
    apply_fn = lambda p, b, t: model.apply(p, b["x"])  # noqa: E731
    base = model.init(jax.random.key(0), jnp.zeros((1, d)))
    models = [_perturbed(base, 1.0, s) for s in range(3)]
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(n, d)).astype(np.float32) * (1 + s) for s in range(3)]
    # each task's batches split in two, of different sizes
    batches = [[{"x": x[:15]}, {"x": x[15:]}] for x in xs]
    merged = regmean(apply_fn, base, models, batches, alpha=1.0)
    X = np.concatenate(xs).astype(np.float64)
    Y = np.concatenate([x.astype(np.float64) @ np.asarray(m["params"]["proj"]["kernel"], np.float64)
                        for x, m in zip(xs, models)])
    want = np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(merged["params"]["proj"]["kernel"], want, rtol=2e-4, atol=2e-5)


def _np_forward_inputs(params, x, n_layers):
    """Inputs of every encoder layer of MultiHeadMLP, in numpy float64."""
    h, ins = x.astype(np.float64), []
    for i in range(n_layers):
        ins.append(h)
        layer = params["params"][f"encoder_{i}"]
        h = np.maximum(h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64), 0.0)
    return ins, h


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_mlp_matches_numpy_reference(alpha):
    model = MultiHeadMLP(hidden=(7, 5), num_classes=(3, 4))
    apply_fn = make_apply_fn(model)
    base = init_params(model, jax.random.key(0), 6)
    models = [_perturbed(base, 0.2, 10 + t) for t in range(2)]
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(30, 6)).astype(np.float32) for _ in range(2)]
    merged = regmean(apply_fn, base, models, [[{"x": x[:10]}, {"x": x[10:]}] for x in xs], alpha=alpha,
                        heads=HEAD_PATTERN)
    ins = [_np_forward_inputs(m, x, 2)[0] for m, x in zip(models, xs)]
    for layer in range(2):
        grams = []
        for t in range(2):
            g = ins[t][layer].T @ ins[t][layer] / len(xs[t])
            grams.append(alpha * g + (1 - alpha) * np.diag(np.diag(g)))
        ws = [np.asarray(m["params"][f"encoder_{layer}"]["kernel"], np.float64) for m in models]
        want = np.linalg.solve(sum(grams), sum(g @ w for g, w in zip(grams, ws)))
        np.testing.assert_allclose(merged["params"][f"encoder_{layer}"]["kernel"], want, rtol=1e-3, atol=1e-5)
        # biases averaged
        np.testing.assert_allclose(merged["params"][f"encoder_{layer}"]["bias"],
                                   np.mean([m["params"][f"encoder_{layer}"]["bias"] for m in models], 0), rtol=1e-6)
    # heads: model t's head is its own (each model perturbed every head, so base + sum of changes)
    for t in range(2):
        want = sum(np.asarray(m["params"][f"head_{t}"]["kernel"], np.float64) for m in models) - \
            np.asarray(base["params"][f"head_{t}"]["kernel"], np.float64)
        np.testing.assert_allclose(merged["params"][f"head_{t}"]["kernel"], want, rtol=1e-5, atol=1e-6)


def test_gram_matrices_capture_every_dense_input():
    model = MultiHeadMLP(hidden=(4,), num_classes=(2, 3))
    params = init_params(model, jax.random.key(1), 5)
    x = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    grams = gram_matrices(make_apply_fn(model), params, [{"x": x}], task=1)
    assert set(grams) == {"params/encoder_0/kernel", "params/head_1/kernel"}  # head_0 is not called for task 1
    np.testing.assert_allclose(grams["params/encoder_0/kernel"], x.T.astype(np.float64) @ x / 9, rtol=1e-5)
    h = _np_forward_inputs(params, x, 1)[1]
    np.testing.assert_allclose(grams["params/head_1/kernel"], h.T @ h / 9, rtol=1e-5, atol=1e-7)


def test_alpha_zero_is_diagonal_weighting_and_identical_models_are_fixed_points():
    model = LinearMultiOut(2)
    apply_fn = lambda p, b, t: model.apply(p, b["x"])  # noqa: E731
    base = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    models = [_perturbed(base, 1.0, s) for s in range(2)]
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(20, 4)).astype(np.float32) * np.array([1, 2, 3, 4], np.float32) * (t + 1) for t in range(2)]
    merged = regmean(apply_fn, base, models, [[{"x": x}] for x in xs], alpha=0.0)
    d = [np.mean(x.astype(np.float64) ** 2, 0) for x in xs]  # diag(G_t)
    ws = [np.asarray(m["params"]["proj"]["kernel"], np.float64) for m in models]
    want = (d[0][:, None] * ws[0] + d[1][:, None] * ws[1]) / (d[0] + d[1])[:, None]
    np.testing.assert_allclose(merged["params"]["proj"]["kernel"], want, rtol=1e-5)
    same = regmean(apply_fn, base, [models[0], models[0]], [[{"x": x}] for x in xs], alpha=0.9)
    np.testing.assert_allclose(same["params"]["proj"]["kernel"], ws[0], rtol=1e-4, atol=1e-5)


def test_unreached_input_directions_fall_back_to_the_average():
    model = LinearMultiOut(2)
    apply_fn = lambda p, b, t: model.apply(p, b["x"])  # noqa: E731
    base = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    models = [_perturbed(base, 1.0, s) for s in range(2)]
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(10, 3)).astype(np.float32) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0.0  # input feature 2 never active: sum G is singular
    merged = regmean(apply_fn, base, models, [[{"x": x}] for x in xs], alpha=1.0)
    k = np.asarray(merged["params"]["proj"]["kernel"])
    assert np.all(np.isfinite(k))
    np.testing.assert_allclose(k[2], np.mean([m["params"]["proj"]["kernel"][2] for m in models], 0), rtol=1e-5)


def test_bad_inputs():
    model = MultiHeadMLP(hidden=(4,), num_classes=(2, 3))
    apply_fn = make_apply_fn(model)
    base = init_params(model, jax.random.key(0), 5)
    models = [_perturbed(base, 0.1, s) for s in range(2)]
    x = np.ones((6, 5), np.float32)
    good = [[{"x": x}], [{"x": x}]]
    with pytest.raises(ValueError, match="batches for 1 tasks"):
        regmean(apply_fn, base, models, good[:1])
    with pytest.raises(ValueError, match="batch 0 of task 1 .* does not fit the model"):
        regmean(apply_fn, base, models, [[{"x": x}], [{"x": np.ones((6, 7), np.float32)}]])
    with pytest.raises(ValueError, match="matches no leaf"):
        regmean(apply_fn, base, models, good, heads=r"classifier")
    with pytest.raises(ValueError, match="alpha must be in"):
        regmean(apply_fn, base, models, good, alpha=1.5)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf logits for task 0 in batch 1"):
        regmean(apply_fn, base, models, [[{"x": x}, {"x": bad}], [{"x": x}]])
    with pytest.raises(ValueError, match="empty"):
        regmean(apply_fn, base, models, [[], [{"x": x}]])

    class NoDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("w", nn.initializers.ones, (x.shape[-1],))

    nd = NoDense()
    p = nd.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no flax.linen.Dense layer"):
        regmean(lambda q, b, t: nd.apply(q, b["x"]), p, [p], [[{"x": x}]])
