"""Streaming PCB and the SOTA data-free merges equal their in-memory merges on a multi-shard safetensors fixture."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import mergejax as mj
from mergejax import methods_sota as ms
from mergejax import stream
from tests.test_stream import SHAPES, _as_jax, _read, _write_models

KEY = jax.random.key(3)

# (method, hyperparameters, in-memory reference, True for bit-equal or the absolute tolerance). Not exact: Iso-CTS and WUDI, whose in-memory merge batches
# the two same-shaped up_proj matrices (one lax.map / one Adam loop over both), and DELLA's rescale="l1" (each
# tensor's L1 norms summed in another order, as DARE's), and a matrix method with weights= (in memory XLA fuses the
# weighting into the whole-model program differently; CART's rank-4 truncation amplifies it to ~1e-5, and there the
# stream is the closer one to a float64 numpy CART, 2e-6 against 1.4e-5): float rounding differs in the last bits.
CASES = [
    ("pcb", {"ratio": 0.1}, lambda b, f: mj.pcb(b, f, ratio=0.1), True),
    ("pcb", {"ratio": 0.3, "scale": 0.9, "weights": [0.5, 2.0, 1.0]},
     lambda b, f: mj.pcb(b, f, ratio=0.3, scale=0.9, weights=[0.5, 2.0, 1.0]), True),
    ("tsv", {}, ms.tsv, True),
    ("tsv", {"exclude": r"layers\.1\."}, lambda b, f: ms.tsv(b, f, exclude=r"layers\.1\."), True),
    ("iso_c", {"scale": 1.5}, lambda b, f: ms.iso_c(b, f, scale=1.5), True),
    ("iso_cts", {"common_fraction": 0.5}, lambda b, f: ms.iso_cts(b, f, common_fraction=0.5), 1e-6),
    ("cart", {"rank_ratio": 0.25, "weights": [1.5, 0.5, 1.0]},
     lambda b, f: ms.cart(b, f, rank_ratio=0.25, weights=[1.5, 0.5, 1.0]), 2e-5),
    ("wudi", {"steps": 8, "lr": 1e-3}, lambda b, f: ms.wudi(b, f, steps=8, lr=1e-3, progress=False), 1e-6),
    ("consensus_ta", {"k": 2}, ms.consensus_ta, True),
    ("consensus_ties", {"density": 0.3, "weights": [1.0, 0.5, 2.0]},
     lambda b, f: ms.consensus_ties(b, f, density=0.3, weights=[1.0, 0.5, 2.0]), True),
    ("della", {"key": KEY, "density": 0.6, "epsilon": 0.2}, lambda b, f: ms.della(b, f, key=KEY, density=0.6,
                                                                                  epsilon=0.2), True),
    ("della", {"key": KEY, "combine": "task_arithmetic", "rescale": "l1"},
     lambda b, f: ms.della(b, f, key=KEY, combine="task_arithmetic", rescale="l1"), 1e-6),
    ("model_stock", {}, ms.model_stock, True),
]


@pytest.mark.parametrize("method, hp, ref, exact", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_streaming_sota_equals_in_memory(tmp_path, method, hp, ref, exact):
    base, fts, bpath, fpaths = _write_models(tmp_path)  # 3 tasks, shards of 2 KB: several files per model
    assert len(list(bpath.glob("*.safetensors"))) > 1
    out = stream.merge(bpath, fpaths, method, tmp_path / "out", progress=False, max_shard_size="2KB", **hp)
    got = _read(out)
    want = ref(_as_jax(base), [_as_jax(f) for f in fts])
    assert sorted(got) == sorted(want) == sorted(SHAPES)
    for name in want:
        w = np.asarray(want[name])
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        if exact is True:
            np.testing.assert_array_equal(got[name], w, err_msg=f"{method}: {name}")
        else:  # rounding: batched vs single matrices, DELLA's L1 sums, weights fused otherwise (see CASES)
            np.testing.assert_allclose(got[name], w, rtol=2e-5, atol=exact, err_msg=f"{method}: {name}")
    assert not list(out.glob("*.partial")) and not (out / stream.STATE_FILE).exists()


def test_pcb_chain_with_trim_before_it(tmp_path):
    """A host_stats stage after a global trim: PCB's statistics are streamed over the trimmed task vectors."""
    base, fts, bpath, fpaths = _write_models(tmp_path, T=2)
    m = mj.chain(mj.Trim(0.5, "global"), mj.PCB(0.2))
    got = _read(stream.merge(bpath, fpaths, m, tmp_path / "out", scale=1.1, progress=False))
    want = m(_as_jax(base), [_as_jax(f) for f in fts], scale=1.1)
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


def test_pcb_resume_reuses_streamed_statistics(tmp_path, monkeypatch):
    """An interrupted streaming PCB keeps its host_stats result in the state file: the rerun does not recompute it
    (exactly: the output equals the in-memory merge) and skips the finished shards."""
    base, fts, bpath, fpaths = _write_models(tmp_path, T=2)
    real_put, calls = stream._ShardSink.put, [0]  # noqa: SLF001

    def failing_put(self, name, piece):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt("interrupted")
        return real_put(self, name, piece)

    monkeypatch.setattr(stream._ShardSink, "put", failing_put)  # noqa: SLF001
    with pytest.raises(KeyboardInterrupt):
        stream.merge(bpath, fpaths, "pcb", tmp_path / "out", ratio=0.2, max_shard_size="2KB", progress=False)
    state = json.loads((tmp_path / "out" / stream.STATE_FILE).read_text())
    assert "given0" in state["stats"] and state["done"]
    monkeypatch.setattr(stream._ShardSink, "put", real_put)  # noqa: SLF001
    monkeypatch.setattr(mj.PCB, "host_stats", lambda self, run: pytest.fail("statistics recomputed"))
    got = _read(stream.merge(bpath, fpaths, "pcb", tmp_path / "out", ratio=0.2, max_shard_size="2KB",
                             progress=False))
    monkeypatch.undo()
    want = mj.pcb(_as_jax(base), [_as_jax(f) for f in fts], ratio=0.2)
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
    stats = (np.array([0.5, np.inf], np.float32), np.array([1, -2], np.int32), None)
    back = stream._decode(stream._encode(stats))  # noqa: SLF001
    for a, b in zip(back[:2], stats[:2]):
        assert np.asarray(a).dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), b)
    assert back[2] is None


def test_kth_keys_is_exact(tmp_path):
    """The streamed order statistic equals a sort, for signed keys, ties and k at both ends."""
    rng = np.random.default_rng(4)
    chunks = [np.round(rng.normal(size=n), 2).astype(np.float32) for n in (100, 7, 333)]
    keys = [np.asarray(mj.ops.select.ordered_key(c)) for c in chunks]
    allk = np.sort(np.concatenate(keys))[::-1]
    ks = [1, 17, 200, len(allk)]

    def scan(f, desc):
        for i, k in enumerate(keys):
            f(str(i), [k] * len(ks))

    got = stream._kth_keys(scan, ks, "test")  # noqa: SLF001
    assert got == [int(allk[k - 1]) for k in ks]


def test_sota_refusals(tmp_path):
    _, _, bpath, fpaths = _write_models(tmp_path, T=2)
    with pytest.raises(ValueError, match="does not take: frob"):
        stream.merge(bpath, fpaths, "tsv", tmp_path / "o", frob=1, progress=False)
    with pytest.raises(ValueError, match="key"):
        stream.merge(bpath, fpaths, "della", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        stream.merge(bpath, fpaths[:1], "model_stock", tmp_path / "o", progress=False)


def test_pcb_bf16_with_heads(tmp_path):
    """bfloat16 checkpoints (float32 statistics) and a head tensor kept per task, outside PCB's statistics."""
    import ml_dtypes

    base, fts, bpath, fpaths = _write_models(tmp_path, dtype=ml_dtypes.bfloat16, T=2)
    heads = r"embed_tokens"
    got = _read(stream.merge(bpath, fpaths, "pcb", tmp_path / "out", ratio=0.2, heads=heads, progress=False))
    want = mj.pcb(_as_jax(base), [_as_jax(f) for f in fts], ratio=0.2, heads=heads)
    for name in want:
        assert got[name].dtype == np.asarray(want[name]).dtype, name
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize("method, hp", [("iso_cts", {"common_fraction": 0.5}),
                                        ("della", {"key": KEY, "density": 0.5, "epsilon": 0.2})])
def test_flax_kernel_layout_from_orbax(tmp_path, method, hp):
    """Orbax (Flax) inputs: the stages that orient Flax ``kernel`` leaves see each tensor's path, as in memory."""
    import orbax.checkpoint as ocp

    from mergejax.tree import paths_and_leaves

    rng = np.random.default_rng(2)
    base = {"params": {"dense": {"kernel": rng.normal(size=(16, 8)).astype(np.float32),
                                 "bias": rng.normal(size=(8,)).astype(np.float32)},
                       "emb": {"embedding": rng.normal(size=(12, 8)).astype(np.float32)}}}
    fts = [jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), base) for _ in range(2)]
    ckpt = ocp.StandardCheckpointer()
    for name, tree in [("base", base), ("a", fts[0]), ("b", fts[1])]:
        ckpt.save(tmp_path / name, tree)
    ckpt.wait_until_finished()
    got = _read(stream.merge(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], method, tmp_path / "out",
                             progress=False, **hp))
    jx = lambda t: jax.tree_util.tree_map(jax.numpy.asarray, t)  # noqa: E731
    want = getattr(ms, method)(jx(base), [jx(f) for f in fts], **hp)
    flipped = getattr(ms, method)(jx(base), [jx(f) for f in fts], **hp, layout="torch")  # no kernel transposed
    assert not np.array_equal(np.asarray(want["params"]["dense"]["kernel"]),
                              np.asarray(flipped["params"]["dense"]["kernel"]))  # the orientation matters here
    for path, leaf in paths_and_leaves(want):
        np.testing.assert_array_equal(got[path], np.asarray(leaf), err_msg=path)


CONV_SHAPES = {"conv.0.weight": (8, 4, 3, 3), "conv.1.weight": (8, 8, 3, 3), "fc.weight": (10, 8), "conv.0.bias": (8,)}


@pytest.mark.parametrize("method, hp", [
    ("tsv", {"matrix_axes": 1}),
    ("tsv", {"matrix_axes": {r"conv\.0\.": 1}}),  # conv.1 averaged: the path rule decides per tensor
    ("iso_c", {"matrix_axes": 1, "scale": 1.5}),
    ("cart", {"matrix_axes": 1, "rank_ratio": 0.5}),
])
def test_streaming_matrix_axes_equals_in_memory(tmp_path, method, hp):
    """``matrix_axes=`` reaches the streamed stages: 4-D conv weights merged as (out, in*kh*kw) matrices, as in
    memory, and a path-keyed rule applies to the tensors it names only."""
    base, fts, bpath, fpaths = _write_models(tmp_path, shapes=CONV_SHAPES)
    out = _read(stream.merge(bpath, fpaths, method, tmp_path / "out", progress=False, max_shard_size="2KB", **hp))
    fn = getattr(ms, method)
    want = fn(_as_jax(base), [_as_jax(f) for f in fts], **hp)
    averaged = fn(_as_jax(base), [_as_jax(f) for f in fts], **{k: v for k, v in hp.items() if k != "matrix_axes"})
    for name in CONV_SHAPES:
        np.testing.assert_allclose(out[name], np.asarray(want[name]), rtol=2e-5, atol=1e-6, err_msg=name)
    conv1_is_matrix = not isinstance(hp["matrix_axes"], dict)
    assert not np.allclose(np.asarray(want["conv.0.weight"]), np.asarray(averaged["conv.0.weight"]))
    assert np.allclose(np.asarray(want["conv.1.weight"]), np.asarray(averaged["conv.1.weight"])) != conv1_is_matrix
