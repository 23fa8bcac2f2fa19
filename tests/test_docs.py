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
    """The README's "Composing a merge in a script" blocks run as written on small Flax-like trees."""
    import pathlib
    import re

    import jax
    import jax.numpy as jnp

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("## Composing a merge in a script")
    section = text[start : text.index("\n## ", start + 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2

    def model(seed):
        k = jax.random.split(jax.random.key(seed), 3)
        return {
            "layers_0": {"kernel": jax.random.normal(k[0], (4, 8))},
            "layers_1": {"kernel": jax.random.normal(k[1], (8, 8))},
            "head": {"kernel": jax.random.normal(k[2], (8, 2)), "bias": jnp.zeros(2)},
        }

    env = {"base": model(0), "ft_a": model(1), "ft_b": model(2), "ft_c": model(3)}
    exec(compile(blocks[0], "README.md", "exec"), env)
    assert jax.tree.structure(env["tau_m"]) == jax.tree.structure(env["base"])
    exec(compile(blocks[1], "README.md", "exec"), env)  # the custom Reduction example
    assert jax.tree.structure(env["merged"]) == jax.tree.structure(env["base"])
