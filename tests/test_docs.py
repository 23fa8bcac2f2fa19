"""The docstring examples of the core modules run and print what they say."""

import doctest

import pytest

import mergejax.merge
import mergejax.tree


@pytest.mark.parametrize("module", [mergejax.merge, mergejax.tree])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_composition_example_runs():
    """The README's "Composing a merge in a script" blocks run as written and compute what they say."""
    import pathlib
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np

    import mergejax as mj
    from tests import reference as ref

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("## Composing a merge in a script")
    section = text[start : text.index("\n## ", start + 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3

    def model(seed):
        k = jax.random.split(jax.random.key(seed), 3)
        return {
            "layers_0": {"kernel": jax.random.normal(k[0], (4, 8))},
            "layers_1": {"kernel": jax.random.normal(k[1], (8, 8))},
            "head": {"kernel": jax.random.normal(k[2], (8, 2)), "bias": jnp.zeros(2) + seed},
        }

    env = {"base": model(0), "ft_a": model(1), "ft_b": model(2), "ft_c": model(3)}
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]  # noqa: E731
    base = leaves(env["base"])
    tvs = [[f - b for f, b in zip(leaves(env[n]), base)] for n in ("ft_a", "ft_b", "ft_c")]

    exec(compile(blocks[0], "README.md", "exec"), env)
    trimmed = [ref.trim(t, 0.2, "global") for t in tvs[:2]]
    want = ref.disjoint(trimmed, ref.elect(trimmed, "sum"), "mean")
    for got, w in zip(leaves(env["tau_m"]), want):
        np.testing.assert_allclose(got, w, atol=1e-5)
    middle = jax.tree.map(lambda x: x[1], env["sweep"])
    for got, w in zip(leaves(middle), leaves(mj.ties(env["base"], [env["ft_a"], env["ft_b"]], scale=1.0))):
        np.testing.assert_allclose(got, w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(env["dloss"]), [2.0 * 1, 2.0 * 2], rtol=1e-6)  # d/dw_t sum(bias) = sum(tau_t)

    exec(compile(blocks[1], "README.md", "exec"), env)
    head_bias = np.asarray(env["merged"]["head"]["bias"])
    np.testing.assert_allclose(head_bias, 0 + 1 + 2, atol=1e-6)  # heads: base + sum_t tau_t, never merged
    coef = env["coef"]
    assert coef.granularity == "layer" and np.shape(coef.lambdas) == (2, 2)  # 2 tasks x 2 non-head leaves
    assert np.all((np.asarray(coef.lambdas) >= 0) & (np.asarray(coef.lambdas) <= 1))

    exec(compile(blocks[2], "README.md", "exec"), env)
    tr = [ref.trim(t, 0.5, "global") for t in tvs]
    want = [b + np.median(np.stack([t[i] for t in tr]), axis=0) for i, b in enumerate(base)]
    for got, w in zip(leaves(env["merged"]), want):
        np.testing.assert_allclose(got, w, atol=1e-5)
    want = [b + 0.5 * ta + 2.0 * tb for b, ta, tb in zip(base, tvs[0], tvs[1])]
    for got, w in zip(leaves(env["merged_c"]), want):
        np.testing.assert_allclose(got, w, atol=1e-5)


def test_readme_sota_example_runs():
    """The README's "Newer data-free methods" block runs as written: TSV-M with per-task weights under LiNeS is
    base + lambda(l) * TSV-M(w_t tau_t) (numpy reference), and EMR's ``model(1)`` is base + r_1 M_1 tau_uni."""
    import pathlib
    import re

    import jax
    import numpy as np

    import mergejax as mj
    from tests import reference_sota as R

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("## Newer data-free methods")
    block = re.findall(r"```python\n(.*?)```", text[start : text.index("\n## ", start + 3)], re.S)[0]

    def model(seed):
        k = jax.random.split(jax.random.key(seed), 3)
        return {
            "layers_0": {"kernel": jax.random.normal(k[0], (4, 8))},
            "layers_1": {"kernel": jax.random.normal(k[1], (8, 8)), "bias": jax.random.normal(k[2], (8,))},
        }

    env = {"mj": mj, "base": model(0), "ft_a": model(1), "ft_b": model(2), "ft_c": model(3)}
    exec(compile(block, "README.md", "exec"), env)
    base = {k: {n: np.asarray(x, np.float64) for n, x in v.items()} for k, v in env["base"].items()}
    tvs = [{k: {n: np.asarray(x, np.float64) - base[k][n] for n, x in v.items()} for k, v in env[f].items()}
           for f in ("ft_a", "ft_b", "ft_c")]
    w = [1.0, 0.5, 1.0]
    for layer, lam in (("layers_0", 0.5), ("layers_1", 1.0)):  # LiNeS: alpha + beta * l / (L - 1), L = 2
        for name, b in base[layer].items():
            xs = [w_t * tv[layer][name] for w_t, tv in zip(w, tvs)]
            tau = R.tsv(xs) if b.ndim == 2 else np.mean(xs, axis=0)
            np.testing.assert_allclose(np.asarray(env["merged"][layer][name]), b + lam * tau, rtol=1e-4, atol=1e-5)
    leaves = [[x for k in sorted(tv) for _, x in sorted(tv[k].items())] for tv in tvs]
    uni, masks, resc = R.emr(leaves)
    want = [b + resc[1] * m * u for b, m, u in
            zip([x for k in sorted(base) for _, x in sorted(base[k].items())], masks[1], uni)]
    got = [np.asarray(x) for x in jax.tree.leaves(env["model_b"])]
    for g, wnt in zip(got, want):
        np.testing.assert_allclose(g, wnt, rtol=1e-5, atol=1e-5)
    assert env["size"]["masks_bitmap"] < env["size"]["dense_task_vectors"]
