"""``python -m mergejax merge|compress`` over orbax checkpoints, against the library calls they wrap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mergejax as mj
from mergejax import ternary
from mergejax.cli import main


def _tree(seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"params": {"dense": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jax.random.normal(k2, (8,))}}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    trees = {"base": _tree(0), "a": _tree(1), "b": _tree(2)}
    cp = ocp.StandardCheckpointer()
    for name, tree in trees.items():
        cp.save(root / name, tree)
    cp.wait_until_finished()
    return root, trees


def _restore(path):
    return ocp.StandardCheckpointer().restore(path)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_merge_cli_matches_library(ckpts, tmp_path):
    root, t = ckpts
    fts = [str(root / "a"), str(root / "b")]
    assert main(["merge", "--method", "ties", "--base", str(root / "base"), "--finetuned", *fts,
                 "--out", str(tmp_path / "ties"), "--density", "0.3", "--scale", "0.8"]) == 0
    _assert_trees_equal(_restore(tmp_path / "ties"), mj.ties(t["base"], [t["a"], t["b"]], density=0.3, scale=0.8))
    assert main(["merge", "--method", "dare", "--base", str(root / "base"), "--finetuned", *fts,
                 "--out", str(tmp_path / "dare"), "--drop-rate", "0.5", "--rescale", "l1", "--seed", "3"]) == 0
    want = mj.dare(t["base"], [t["a"], t["b"]], key=jax.random.key(3), drop_rate=0.5, rescale="l1")
    _assert_trees_equal(_restore(tmp_path / "dare"), want)
    assert main(["merge", "--method", "average", "--finetuned", *fts, "--out", str(tmp_path / "avg")]) == 0
    _assert_trees_equal(_restore(tmp_path / "avg"), mj.average([t["a"], t["b"]]))


def test_compress_then_merge_from_ternary_checkpoint(ckpts, tmp_path):
    root, t = ckpts
    assert main(["compress", "--base", str(root / "base"), "--finetuned", str(root / "a"),
                 "--out", str(tmp_path / "a_t"), "--density", "0.25"]) == 0
    ttv = ternary.load(tmp_path / "a_t")
    want_ttv = ternary.compress(mj.task_vector(t["a"], t["base"]), density=0.25)
    _assert_trees_equal(ttv.to_task_vector(), want_ttv.to_task_vector())
    assert main(["merge", "--method", "task_arithmetic", "--base", str(root / "base"),
                 "--finetuned", str(tmp_path / "a_t"), str(root / "b"), "--out", str(tmp_path / "ta"),
                 "--scale", "0.5"]) == 0
    want = mj.task_arithmetic(t["base"], [want_ttv, t["b"]], scale=0.5)
    _assert_trees_equal(_restore(tmp_path / "ta"), want)


def test_merge_cli_rejects_options_the_method_does_not_take(ckpts, tmp_path, capsys):
    root, _ = ckpts
    assert main(["merge", "--method", "task_arithmetic", "--base", str(root / "base"), "--finetuned",
                 str(root / "a"), "--out", str(tmp_path / "x"), "--density", "0.2"]) == 2
    assert "does not take: --density" in capsys.readouterr().err
    assert main(["merge", "--method", "ties", "--finetuned", str(root / "a"), "--out", str(tmp_path / "y")]) == 2
    assert "--base is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
