"""Tests of mergejax.ternary: codec, on-device bitmaps, ComPEFT compression, orbax storage, stats, alpha search."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mergejax import ternary
from mergejax.ternary import codec, storage
from mergejax.ternary.device import pack_bits, unpack_bits


# ------------------------------------------------------------------------------------------------ numpy references
def np_pack(bits: np.ndarray) -> np.ndarray:
    """Reference bitmap layout: last axis padded to 32, bit j of word w = element 32 w + j."""
    bits = np.asarray(bits, bool)
    if bits.ndim == 0:
        bits = bits[None]
    last = bits.shape[-1]
    words = (last + 31) // 32
    padded = np.zeros(bits.shape[:-1] + (words * 32,), np.uint64)
    padded[..., :last] = bits
    weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
    return (padded.reshape(bits.shape[:-1] + (words, 32)) * weights).sum(-1).astype(np.uint32)


def np_compeft(tv: dict, density: float, alpha: float, scope: str, scale: str) -> dict:
    """Independent ComPEFT: tau_hat = alpha * s * sign(tau * mask), top-k by magnitude with ties kept."""
    floats = {k: np.asarray(v, np.float64) for k, v in tv.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
              or np.asarray(v).dtype == jnp.bfloat16}

    def topk_mask(values: list[np.ndarray]) -> list[np.ndarray]:
        mags = np.concatenate([np.abs(v).ravel() for v in values])
        k = math.floor(density * mags.size + 1e-9)
        if k == 0:
            return [np.zeros(v.shape, bool) for v in values]
        t = np.sort(mags)[::-1][k - 1]
        return [np.abs(v) >= t for v in values]

    keys = list(floats)
    if scope == "global":
        masks = dict(zip(keys, topk_mask([floats[k] for k in keys])))
        allv = np.concatenate([floats[k].ravel() for k in keys])
        if scale == "std":
            s = {k: allv.std() for k in keys}
        else:
            kept = np.concatenate([np.abs(floats[k][masks[k]]) for k in keys])
            s = {k: kept.mean() if kept.size else 0.0 for k in keys}
    else:
        masks = {k: topk_mask([floats[k]])[0] for k in keys}
        if scale == "std":
            s = {k: floats[k].std() for k in keys}
        else:
            s = {k: np.abs(floats[k][masks[k]]).mean() if masks[k].any() else 0.0 for k in keys}
    out = {}
    for k, v in tv.items():
        if k in floats:
            out[k] = alpha * s[k] * np.sign(floats[k] * masks[k])
        else:
            out[k] = np.zeros(np.shape(v), np.asarray(v).dtype)
    return out


def random_tree(key: jax.Array, dtype=jnp.float32) -> dict:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "kernel": jax.random.normal(k1, (40, 70), dtype),
        "bias": jax.random.normal(k2, (70,), dtype) * 3,
        "conv": jax.random.laplace(k3, (3, 3, 4, 33), dtype),
        "scalar": jax.random.normal(k4, (), dtype),
        "step": jnp.arange(4, dtype=jnp.int32),
    }


def random_bitmaps(rng: np.random.Generator, shape: tuple, density: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = rng.random(shape) < density
    sign = mask & (rng.random(shape) < 0.5)
    return mask, np_pack(mask), np_pack(sign)


# ------------------------------------------------------------------------------------------------------------ codec
@pytest.mark.parametrize("shape", [(1,), (), (5000,), (37, 70), (3, 3, 4, 33), (64, 128), (0,), (4, 0)])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.2, 0.45, 0.7, 1.0])
def test_codec_round_trip(shape, density):
    rng = np.random.default_rng(abs(hash((shape, density))) % 2**32)
    _, mw, sw = random_bitmaps(rng, shape, density)
    blob = codec.encode_leaf(mw, sw, shape)
    m2, s2 = codec.decode_leaf(blob, shape)
    np.testing.assert_array_equal(m2, mw)
    np.testing.assert_array_equal(s2, sw)
    n = math.prod(shape)
    assert len(blob) <= 48 + (n + 7) // 8 + (int(np.bitwise_count(mw).sum()) + 7) // 8 + 1  # never above bitmaps


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2])
def test_codec_within_two_percent_of_entropy_bound(density):
    """Issue target: <= 1.02 x (H(d) + d) bits per parameter on large leaves (here 4M random entries, top-k)."""
    rng = np.random.default_rng(0)
    n = 1 << 22
    x = rng.standard_normal(n).astype(np.float32)
    k = int(density * n)
    t = np.partition(np.abs(x), n - k)[n - k]
    mask = np.abs(x) >= t
    blob = codec.encode_leaf(np_pack(mask), np_pack(mask & (x < 0)), (n,))
    bound = codec.entropy_bound_bits(n, int(mask.sum()))
    ratio = 8 * len(blob) / bound
    assert ratio <= 1.02, ratio
    assert ratio >= 1.0  # sanity: no code beats the bound on a random mask


def test_golomb_parameter_is_optimal_among_neighbours():
    rng = np.random.default_rng(1)
    for d in [0.01, 0.1, 0.3]:
        gaps = rng.geometric(d, size=200_000) - 1
        n = int(gaps.sum() + gaps.size)
        m = codec.golomb_parameter(n, gaps.size)
        costs = {c: codec.golomb_bits(gaps, c) for c in range(max(1, m - 3), m + 4)}
        assert costs[m] <= min(costs.values()) * 1.001


def test_codec_positions_round_trip():
    rng = np.random.default_rng(2)
    pos = np.sort(rng.choice(100_000, 3_000, replace=False))
    m, unary_bits, unary, low, extra = codec.encode_positions(pos, 100_000)
    np.testing.assert_array_equal(codec.decode_positions(unary + low + extra, pos.size, m, unary_bits, 100_000), pos)


def test_codec_rejects_truncation_and_wrong_shape():
    rng = np.random.default_rng(3)
    _, mw, sw = random_bitmaps(rng, (1000,), 0.1)
    blob = codec.encode_leaf(mw, sw, (1000,))
    for cut in [10, 48, 60, len(blob) - 1]:
        with pytest.raises(codec.CodecError):
            codec.decode_leaf(blob[:cut], (1000,))
    with pytest.raises(codec.CodecError, match="trailing"):
        codec.decode_leaf(blob + b"\0", (1000,))
    with pytest.raises(codec.CodecError, match="elements"):
        codec.decode_leaf(blob, (999,))
    with pytest.raises(codec.CodecError, match="magic"):
        codec.decode_leaf(b"XXXX" + blob[4:], (1000,))


# ---------------------------------------------------------------------------------------------------------- bitmaps
@pytest.mark.parametrize("shape", [(), (1,), (31,), (32,), (33,), (5, 100), (2, 3, 64)])
def test_pack_unpack_match_numpy_layout(shape):
    rng = np.random.default_rng(4)
    bits = rng.random(shape) < 0.3
    words = jax.jit(pack_bits)(bits)
    np.testing.assert_array_equal(np.asarray(words), np_pack(bits))
    back = jax.jit(unpack_bits, static_argnums=1)(words, shape)
    np.testing.assert_array_equal(np.asarray(back), bits)


# ------------------------------------------------------------------------------------------------------- compress
# Tests share one tree shape and density D where they can, so the compiled compressor is reused (compiles dominate).
D = 0.2


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("scale", ["std", "mean_abs"])
@pytest.mark.parametrize("density", [D])
def test_compress_matches_numpy_reference(scope, scale, density):
    tv = random_tree(jax.random.key(0))
    ttv = ternary.compress(tv, density=density, alpha=1.7, scope=scope, scale=scale)
    ref = np_compeft(tv, density, 1.7, scope, scale)
    out = ttv.decompress()
    for k in tv:
        if k == "step":
            assert out[k].dtype == jnp.int32 and not np.asarray(out[k]).any()
            continue
        assert out[k].dtype == jnp.float32 and out[k].shape == tv[k].shape
        np.testing.assert_allclose(np.asarray(out[k]), ref[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_decode_leaf_and_to_task_vector_agree_with_decompress():
    tv = random_tree(jax.random.key(1), jnp.bfloat16)
    ttv = ternary.compress(tv, density=D)
    dense = ttv.decompress(None)
    assert dense["kernel"].dtype == jnp.bfloat16
    tvd = ttv.to_task_vector()
    assert tvd["kernel"].dtype == jnp.float32 and tvd["step"].dtype == jnp.int32
    for i, path in enumerate(ttv.paths):
        a = ttv.decode_leaf(i)
        b = ttv.decode_leaf(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(tvd[path]))
    with pytest.raises(KeyError):
        ttv.decode_leaf("nope")


def test_edge_cases_density_zero_one_single_element_all_zero():
    tv = {"a": jnp.array([1.0, -2.0, 0.0, 3.0]), "one": jnp.array([-0.5])}
    t0 = ternary.compress(tv, density=0.0)
    assert t0.nnz() == 0 and not np.asarray(t0.decompress()["a"]).any()
    t1 = ternary.compress(tv, density=1.0)
    sigma = np.concatenate([[1.0, -2.0, 0.0, 3.0], [-0.5]]).std()
    np.testing.assert_allclose(np.asarray(t1.decompress()["a"]), sigma * np.array([1, -1, 0, 1]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t1.decompress()["one"]), [-sigma], rtol=1e-6)
    assert t1.nnz() == 4  # the exact zero stays 0 (sign(0) = 0)
    single = ternary.compress({"x": jnp.array(2.5)}, density=1.0, scope="tensor")
    assert float(single.decompress()["x"]) == 0.0  # std of one element is 0
    single = ternary.compress({"x": jnp.array(2.5)}, density=1.0, scale="mean_abs")
    assert float(single.decompress()["x"]) == 2.5
    zero = ternary.compress({"w": jnp.zeros((10, 3))}, density=0.5)
    assert zero.nnz() == 0 and float(zero.scale[0]) == 0.0 and not np.asarray(zero.decompress()["w"]).any()
    with pytest.raises(ValueError, match="density"):
        ternary.compress(tv, density=1.5)
    with pytest.raises(ValueError):
        ternary.compress({"w": jnp.array([1.0, jnp.nan])}, density=0.5)


def test_bf16_input_matches_float32_of_same_values():
    tv = random_tree(jax.random.key(2), jnp.bfloat16)
    up = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tv)
    a = ternary.compress(tv, density=D).decompress()
    b = ternary.compress(up, density=D).decompress()
    for k in tv:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


@pytest.mark.parametrize("base_dtype", [jnp.float32, jnp.bfloat16])
def test_apply_adds_decoded_vector(base_dtype):
    tv = random_tree(jax.random.key(3))
    base = jax.tree.map(lambda x: (x * 10).astype(base_dtype) if x.dtype == jnp.float32 else x + 7, tv)
    ttv = ternary.compress(tv, density=D, scale="mean_abs")
    out = ternary.apply(base, ttv, scale=0.5)
    dense = ttv.decompress()
    for k in tv:
        if k == "step":
            np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(base[k]))
            continue
        assert out[k].dtype == base_dtype
        expect = (np.asarray(base[k], np.float32) + 0.5 * np.asarray(dense[k])).astype(base_dtype)
        np.testing.assert_array_equal(np.asarray(out[k]), expect)
    with pytest.raises(ValueError, match="kernel"):
        ternary.apply({**base, "kernel": base["kernel"][:3]}, ttv)


def test_ternary_task_vector_is_a_pytree_through_jit():
    ttv = ternary.compress(random_tree(jax.random.key(4)), density=D)
    doubled = jax.jit(lambda t: jax.tree.map(lambda x: x * 2 if x.dtype == jnp.float32 else x, t))(ttv)
    assert isinstance(doubled, ternary.TernaryTaskVector)
    np.testing.assert_allclose(np.asarray(doubled.decompress()["kernel"]), 2 * np.asarray(ttv.decompress()["kernel"]))


def test_sharded_decode_on_mesh(mesh8):
    tv = {"w": jax.random.normal(jax.random.key(5), (64, 256)), "b": jax.random.normal(jax.random.key(6), (256,))}
    shard = {"w": NamedSharding(mesh8, P("x", None)), "b": NamedSharding(mesh8, P())}
    tv_sharded = jax.device_put(tv, shard)
    ttv = ternary.compress(tv_sharded, density=0.1)
    assert ttv.mask[1].sharding.is_equivalent_to(NamedSharding(mesh8, P("x", None)), 2)
    base = jax.device_put(jax.tree.map(jnp.ones_like, tv), shard)
    out = ternary.apply(base, ttv)
    assert out["w"].sharding.is_equivalent_to(shard["w"], 2)
    ref = np_compeft(jax.device_get(tv), 0.1, 1.0, "global", "std")
    np.testing.assert_allclose(np.asarray(out["w"]), 1 + ref["w"], rtol=1e-5)


# --------------------------------------------------------------------------------------------------------- storage
def assert_same_ttv(a: ternary.TernaryTaskVector, b: ternary.TernaryTaskVector) -> None:
    assert a.spec == b.spec
    for x, y in zip(a.mask + a.sign + a.scale, b.mask + b.sign + b.scale):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_load_round_trip_exact(tmp_path):
    nested = {"enc": random_tree(jax.random.key(7), jnp.bfloat16), "head": [jnp.ones((3, 5)), None, (jnp.zeros(2),)]}
    for scope, tv in [("global", nested), ("tensor", random_tree(jax.random.key(7)))]:
        ttv = ternary.compress(tv, density=D, alpha=2.0, scope=scope)
        ternary.save(tmp_path / scope, ttv)
        back = ternary.load(tmp_path / scope)
        assert_same_ttv(ttv, back)
        meta = ternary.read_metadata(tmp_path / scope)
        assert meta["version"] == storage.FORMAT_VERSION and meta["alpha"] == 2.0 and meta["density"] == D
        expected = {"enc/kernel", "head/0", "head/2/0"} if tv is nested else {"kernel"}
        assert {e["path"] for e in meta["leaves"]} >= expected
        assert all("crc32" in e for e in meta["leaves"] if e["coded"])


def test_load_onto_mesh_with_sharding_tree(tmp_path, mesh8):
    tv = {"w": jax.random.normal(jax.random.key(8), (64, 512)), "v": jax.random.normal(jax.random.key(9), (8, 100))}
    ttv = ternary.compress(tv, density=0.05)
    ternary.save(tmp_path / "ck", ttv)
    shardings = {"w": NamedSharding(mesh8, P(None, "x")), "v": NamedSharding(mesh8, P("x", None))}
    back = ternary.load(tmp_path / "ck", sharding=shardings)
    assert_same_ttv(ttv, back)
    assert back.mask[1].sharding.is_equivalent_to(shardings["w"], 2)  # leaves in key order: v, w
    assert back.mask[0].sharding.is_equivalent_to(shardings["v"], 2)
    dense = back.decompress()
    np.testing.assert_array_equal(np.asarray(dense["w"]), np.asarray(ttv.decompress()["w"]))
    one = ternary.load(tmp_path / "ck", sharding=NamedSharding(mesh8, P("x")))
    assert len(one.mask[0].sharding.device_set) == 8


def _flip_byte(path: os.PathLike, index: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[index] ^= 0x5A
    open(path, "wb").write(bytes(data))


def test_corrupted_and_truncated_files_are_caught_naming_the_leaf(tmp_path):
    tv = {"a": jax.random.normal(jax.random.key(10), (300,)), "b": jax.random.normal(jax.random.key(11), (50, 40))}
    ttv = ternary.compress(tv, density=0.2)
    ternary.save(tmp_path / "ck", ttv)
    meta = ternary.read_metadata(tmp_path / "ck")
    b_entry = next(e for e in meta["leaves"] if e["path"] == "b")
    streams = tmp_path / "ck" / storage.STREAMS_FILE
    original = streams.read_bytes()
    _flip_byte(streams, b_entry["offset"] + b_entry["length"] // 2)
    with pytest.raises(ternary.TernaryCheckpointError, match="'b'.*checksum"):
        ternary.load(tmp_path / "ck")
    streams.write_bytes(original[:-5])
    with pytest.raises(ternary.TernaryCheckpointError, match="'b'.*truncated"):
        ternary.load(tmp_path / "ck")
    streams.write_bytes(original)
    assert_same_ttv(ttv, ternary.load(tmp_path / "ck"))
    md = tmp_path / "ck" / storage.METADATA_FILE
    text = md.read_text()
    md.write_text(text.replace('"alpha": 1.0', '"alpha": 3.0'))
    with pytest.raises(ternary.TernaryCheckpointError, match="metadata checksum"):
        ternary.load(tmp_path / "ck")
    md.write_text(text[: len(text) // 2])
    with pytest.raises(ternary.TernaryCheckpointError, match="JSON"):
        ternary.load(tmp_path / "ck")


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    first = ternary.compress(random_tree(jax.random.key(12)), density=D)
    second = ternary.compress(random_tree(jax.random.key(13)), density=D, scope="tensor")
    ternary.save(tmp_path / "ck", first)
    calls = {"n": 0}
    real = codec.encode_leaf

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(codec, "encode_leaf", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        ternary.save(tmp_path / "ck", second)
    monkeypatch.setattr(codec, "encode_leaf", real)
    assert calls["n"] == 3
    assert_same_ttv(first, ternary.load(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # temporary directory removed
    ternary.save(tmp_path / "ck", second)
    assert_same_ttv(second, ternary.load(tmp_path / "ck"))


def test_composite_checkpoint_with_manager(tmp_path):
    base = {"w": jnp.arange(12.0).reshape(3, 4)}
    experts = [ternary.compress(random_tree(jax.random.key(20 + i)), density=D) for i in range(3)]
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "mgr", options=options) as mgr:
        for step, ttv in enumerate(experts):
            mgr.save(step, args=ocp.args.Composite(base=ocp.args.StandardSave(base), expert=ternary.TernarySave(ttv)))
        mgr.wait_until_finished()
        assert list(mgr.all_steps()) == [1, 2]
        restored = mgr.restore(2, args=ocp.args.Composite(base=ocp.args.StandardRestore(base),
                                                          expert=ternary.TernaryRestore()))
    assert_same_ttv(experts[2], restored["expert"])
    np.testing.assert_array_equal(np.asarray(restored["base"]["w"]), np.asarray(base["w"]))


# ------------------------------------------------------------------------------------------------- stats and alpha
def test_stats_in_memory_and_on_disk_agree(tmp_path):
    rng = np.random.default_rng(5)
    tv = {"w": jnp.asarray(rng.standard_normal((512, 512)).astype(np.float32))}
    ttv = ternary.compress(tv, density=0.1)
    s = ternary.stats(ttv)
    assert s.num_params == 512 * 512 and s.nnz == ttv.nnz() == int(0.1 * 512 * 512)
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert abs(s.entropy_bound_bits_per_param - (h + s.density)) < 1e-3
    assert 1.0 <= s.ratio_to_bound <= 1.02
    assert s.compression_vs_float32 == pytest.approx(2 * s.compression_vs_bfloat16)
    assert s.compression_vs_float32 > 50
    ternary.save(tmp_path / "ck", ttv)
    assert ternary.stats(tmp_path / "ck") == s
    assert os.path.getsize(tmp_path / "ck" / storage.STREAMS_FILE) == s.bytes_on_disk


def test_choose_alpha_finds_the_best_grid_value():
    rng = np.random.default_rng(6)
    tv = {"w": jnp.asarray(rng.standard_normal(4000).astype(np.float32))}
    target = np.asarray(tv["w"])

    def neg_error(t):  # validation score: closeness of the ternary vector to the dense one
        return -float(np.sum((np.asarray(t.decompress()["w"]) - target) ** 2))

    grid = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
    res = ternary.choose_alpha(tv, neg_error, grid=grid, density=0.2)
    brute = {a: neg_error(ternary.compress(tv, density=0.2, alpha=a)) for a in grid}
    assert res.alpha == max(brute, key=brute.get)
    assert dict(res.scores) == pytest.approx(brute, rel=1e-5)
    assert res.ttv.spec.alpha == res.alpha


# ------------------------------------------------------------------------------------------------ core integration
def test_core_chain_merges_ternary_task_vectors_like_their_dense_decodes():
    from mergejax.merge import chain
    from mergejax.ops.reduce import DisjointMean
    from mergejax.ops.sign import ElectSign
    from mergejax.ops.trim import Trim

    ttvs = [ternary.compress(random_tree(jax.random.key(30 + i)), density=D) for i in range(2)]
    merger = chain(Trim(0.5), ElectSign(), DisjointMean())
    from_ternary = merger.merge_task_vectors(ttvs)
    from_dense = merger.merge_task_vectors([t.to_task_vector() for t in ttvs])
    for a, b in zip(jax.tree.leaves(from_ternary), jax.tree.leaves(from_dense)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    inside_jit = jax.jit(lambda ts: [t.to_task_vector() for t in ts])(tuple(ttvs))  # decodes inside one program
    np.testing.assert_array_equal(np.asarray(inside_jit[0]["kernel"]), np.asarray(ttvs[0].decompress()["kernel"]))
