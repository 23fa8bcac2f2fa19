"""Streaming merges over safetensors checkpoints equal the in-memory merges exactly; resumable; bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mergejax as mj
from mergejax import stream
from mergejax.convert.io import open_checkpoint, write_sharded_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _model(rng, shapes, dtype=np.float32, base=None, std=0.1):
    out = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            out[name] = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
        elif base is None:
            out[name] = rng.normal(0, 1, shape).astype(dtype)
        else:
            out[name] = (base[name].astype(np.float32) + rng.normal(0, std, shape)).astype(dtype)
    return out


SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.mlp.up_proj.weight": (24, 16),
    "model.layers.1.mlp.up_proj.weight": (24, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.position_ids": (1, 8),
    "lm_head.scale": (),
}


def _write_models(tmp: Path, shapes=SHAPES, dtype=np.float32, T=3, shard="2KB", seed=0):
    rng = np.random.default_rng(seed)
    base = _model(rng, shapes, dtype)
    fts = [_model(rng, shapes, dtype, base=base, std=0.05 * (t + 1)) for t in range(T)]
    paths = []
    for name, m in [("base", base)] + [(f"ft{t}", f) for t, f in enumerate(fts)]:
        write_sharded_safetensors(tmp / name, m, max_shard_size=shard)
        (tmp / name / "config.json").write_text(json.dumps({"architectures": ["Toy"], "name": name}))
        paths.append(tmp / name)
    return base, fts, paths[0], paths[1:]


def _read(path: Path) -> dict[str, np.ndarray]:
    src = open_checkpoint(path)
    try:
        return {n: src.read(n) for n in src.keys()}
    finally:
        src.close()


def _as_jax(m):
    return {k: jnp.asarray(v) for k, v in m.items()}


CASES = [
    ("task_arithmetic", {"scale": 0.7}, lambda b, f: mj.task_arithmetic(b, f, scale=0.7)),
    ("ties", {"density": 0.3}, lambda b, f: mj.ties(b, f, density=0.3)),
    ("ties", {"density": 0.25, "scope": "tensor", "sign_method": "count", "reduce": "sum"},
     lambda b, f: mj.ties(b, f, density=0.25, scope="tensor", sign_method="count", reduce="sum")),
    ("dare", {"drop_rate": 0.6, "key": jax.random.key(5)},
     lambda b, f: mj.dare(b, f, drop_rate=0.6, key=jax.random.key(5))),
    ("dare", {"drop_rate": 0.5, "combine": "ties", "density": 0.4, "rescale": "l1", "key": jax.random.key(1)},
     lambda b, f: mj.dare(b, f, drop_rate=0.5, combine="ties", density=0.4, rescale="l1", key=jax.random.key(1))),
    ("breadcrumbs", {"beta": 0.3, "gamma": 0.05, "scale": 0.5},
     lambda b, f: mj.breadcrumbs(b, f, beta=0.3, gamma=0.05, scale=0.5)),
]


PARAMS = [pytest.param(*c, np.float32, id=f"{c[0]}{i}-f32") for i, c in enumerate(CASES)] + [
    pytest.param(*CASES[i], ml_dtypes.bfloat16, id=f"{CASES[i][0]}{i}-bf16") for i in (1,)
]


@pytest.mark.parametrize("method, hp, ref, dtype", PARAMS)
def test_streaming_equals_in_memory(tmp_path, method, hp, ref, dtype):
    base, fts, bpath, fpaths = _write_models(tmp_path, dtype=dtype)
    out = stream.merge(bpath, fpaths, method, tmp_path / "out", progress=False, max_shard_size="2KB", **hp)
    got = _read(out)
    want = ref(_as_jax(base), [_as_jax(f) for f in fts])
    assert sorted(got) == sorted(want)
    for name in want:
        w = np.asarray(want[name])
        assert got[name].dtype == w.dtype, name
        if hp.get("rescale") == "l1":  # in memory, vmap over same-shaped leaves sums each L1 norm in another order
            np.testing.assert_array_equal(got[name] == base[name], w == base[name], err_msg=f"{method}: {name}")
            np.testing.assert_allclose(got[name], w, rtol=2e-6, atol=1e-7, err_msg=f"{method}: {name}")
        else:
            np.testing.assert_array_equal(got[name], w, err_msg=f"{method}: {name}")
    assert json.loads((out / "config.json").read_text())["name"] == "base"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES)
    assert not (out / stream.STATE_FILE).exists() and not list(out.glob("*.partial"))


@pytest.mark.parametrize("method, hp", [("task_arithmetic", {}), ("ties", {"density": 0.3})])
def test_streaming_weights_equal_in_memory(tmp_path, method, hp):
    base, fts, bpath, fpaths = _write_models(tmp_path)
    w = [0.5, -0.25, 2.0]
    want = getattr(mj, method)(_as_jax(base), [_as_jax(f) for f in fts], weights=w, **hp)
    got = _read(stream.merge(bpath, fpaths, method, tmp_path / "out", weights=w, progress=False, **hp))
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


def test_average_and_custom_chain(tmp_path):
    base, fts, bpath, fpaths = _write_models(tmp_path, T=2)
    got = _read(stream.merge(bpath, fpaths, "average", tmp_path / "avg", progress=False))
    want = mj.average([_as_jax(f) for f in fts])
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]))
    chain = mj.chain(mj.Trim(0.5, "global"), mj.ElectSign(), mj.DisjointMax())
    got = _read(stream.merge(bpath, fpaths, chain, tmp_path / "c", scale=1.3, progress=False))
    want = chain(_as_jax(base), [_as_jax(f) for f in fts], scale=1.3)
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]))


def test_refusals(tmp_path):
    _, _, bpath, fpaths = _write_models(tmp_path, T=2)
    with pytest.raises(ValueError, match="emr cannot stream"):
        stream.merge(bpath, fpaths, "emr", tmp_path / "o", progress=False)

    class WholeModel(mj.ops.base.Reduction):  # a reduction over all leaves at once: neither per tensor nor host_stats
        def __call__(self, tvs, key=None):
            return (tvs[0],)

    with pytest.raises(ValueError, match="WholeModel cannot stream"):
        stream.merge(bpath, fpaths, mj.chain(WholeModel()), tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="key"):
        stream.merge(bpath, fpaths, "dare", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="frob"):
        stream.merge(bpath, fpaths, "ties", tmp_path / "o", frob=1, progress=False)
    bad = _read(fpaths[1])
    bad["model.layers.0.input_layernorm.weight"] = bad["model.layers.0.input_layernorm.weight"][:5]
    write_sharded_safetensors(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match=r"input_layernorm\.weight.*\(5,\)"):
        stream.merge(bpath, [fpaths[0], tmp_path / "bad"], "ties", tmp_path / "o2", progress=False)
    out = stream.merge(bpath, fpaths, "task_arithmetic", tmp_path / "done", progress=False)
    with pytest.raises(FileExistsError):
        stream.merge(bpath, fpaths, "task_arithmetic", out, progress=False)


@pytest.mark.parametrize("device_histogram", [False, True], ids=["host-bincount", "device-scatter"])
def test_global_threshold_is_exact_kth_largest(tmp_path, monkeypatch, device_histogram):
    """The two histogram passes find exactly the in-memory k-th largest |tau| (ties at the threshold included, the
    chunks' zero padding left out), whether the device counts the bins or the host counts the device's digits."""
    monkeypatch.setattr(stream, "DEVICE_HISTOGRAM", device_histogram)
    rng = np.random.default_rng(3)
    shapes = {"a": (300,), "b": (17, 11)}
    base = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    ft = {k: rng.choice(np.float32([-2, -1, 0, 0.5, 1, 3]), s) for k, s in shapes.items()}  # many ties
    for name, m in (("base", base), ("ft", ft)):
        write_sharded_safetensors(tmp_path / name, m)
    for density in (0.0, 0.1, 0.37, 1.0):
        out = stream.merge(tmp_path / "base", [tmp_path / "ft"], "ties", tmp_path / f"o{density}", density=density,
                           progress=False, chunk="1KiB")  # two chunks, the second zero-padded
        want = mj.ties(_as_jax(base), [_as_jax(ft)], density=density)
        got = _read(out)
        for k in shapes:
            np.testing.assert_array_equal(got[k], np.asarray(want[k]))


_KILL_SCRIPT = """
import sys, time, jax
from mergejax import stream
import mergejax.convert.io as io
orig = io.SafetensorsWriter.close
def slow(self):
    time.sleep(float(sys.argv[4]))  # each shard takes a while: the test kills the run between two shards
    return orig(self)
io.SafetensorsWriter.close = slow
stream.merge(sys.argv[1], sys.argv[2].split(","), "ties", sys.argv[3], density=0.3, progress=False,
             max_shard_size="1KB")
"""


def test_kill_and_resume(tmp_path):
    base, fts, bpath, fpaths = _write_models(tmp_path, shard="1KB")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-c", _KILL_SCRIPT, str(bpath), ",".join(map(str, fpaths)), str(out)]
    proc = subprocess.Popen(args + ["0.4"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("model-*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert done and (out / stream.STATE_FILE).exists()
    state = json.loads((out / stream.STATE_FILE).read_text())
    n_shards = len(state["plan"])
    assert len(done) < n_shards and "trim0" in state["stats"]
    mtimes = {p: (out / p).stat().st_mtime_ns for p in done}
    subprocess.run(args + ["0"], env=env, check=True)
    assert all((out / p).stat().st_mtime_ns == t for p, t in mtimes.items())  # finished shards were not redone
    assert not list(out.glob("*.partial")) and not (out / stream.STATE_FILE).exists()
    got = _read(out)
    want = mj.ties(_as_jax(base), [_as_jax(f) for f in fts], density=0.3)
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]))


_RSS_SCRIPT = """
import sys, jax
from mergejax import stream
hp = {"ties": {"density": 0.2}, "dare": {"drop_rate": 0.5, "key": jax.random.key(0)}}.get(sys.argv[4], {})
stream.merge(sys.argv[1], sys.argv[2].split(","), sys.argv[4], sys.argv[3], progress=False, max_shard_size="64MB",
             readahead="32MiB", chunk="4MiB", **hp)
print("VmHWM", [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def _rss_models(tmp: Path, n_leaves: int, leaf: tuple[int, int], T: int):
    rng = np.random.default_rng(0)
    paths = []
    for m in range(T + 1):
        tensors = {f"layers.{i:03d}.w": rng.standard_normal(leaf, dtype=np.float32) for i in range(n_leaves)}
        write_sharded_safetensors(tmp / f"m{m}", tensors, max_shard_size="64MB")
        paths.append(tmp / f"m{m}")
        del tensors
    return paths


def _peak_kib(paths, out, method):
    # one CPU device, as a user runs it (conftest's 8 fake devices add XLA threads and their malloc arenas)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(paths[0]), ",".join(map(str, paths[1:])), str(out),
                        method], env=env, check=True, capture_output=True, text=True)
    return int(r.stdout.split("VmHWM")[-1].split()[0].strip("'[]"))


@pytest.mark.slow
def test_peak_rss_bound_on_model_larger_than_bound(tmp_path):
    """3 fine-tuned models of 16 x 16 MiB leaves (256 MiB each, 1 GiB in all), read-ahead bounded to 32 MiB.

    The constant (Python, JAX, XLA's programs, and one tensor's T + 2 buffers) is VmHWM of the same merge of a
    1-leaf model. On the 16-leaf model, peak RSS stays within (T + 2) leaves of it for the tensor-by-tensor chain
    (DARE: no second tensor is read ahead, as its T + 1 inputs exceed the 32 MiB bound) and for the chunked ones
    (task arithmetic, TIES: 4 MiB chunks, whatever the leaf size), far below the 1 GiB of inputs.
    """
    T, leaf = 3, (2048, 2048)
    small = _rss_models(tmp_path / "small", 1, leaf, T)
    big = _rss_models(tmp_path / "big", 16, leaf, T)
    leaf_kib = 16 * 1024
    model_kib = 16 * leaf_kib * (T + 1)
    for method in ("task_arithmetic", "ties", "dare"):
        const = _peak_kib(small, tmp_path / f"o_small_{method}", method)
        peak = _peak_kib(big, tmp_path / f"o_big_{method}", method)
        print(f"{method}: peak {peak / 1024:.0f} MiB, 1-leaf model {const / 1024:.0f} MiB, "
              f"difference {(peak - const) / leaf_kib:.2f} leaves; inputs {model_kib / 1024:.0f} MiB")
        assert peak - const < (T + 2) * leaf_kib, (method, peak, const)
        assert peak < model_kib / 2, (method, peak, model_kib)


def test_orbax_inputs(tmp_path):
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(1)
    base = {"params": {"dense": {"kernel": rng.normal(size=(16, 8)).astype(np.float32),
                                 "bias": rng.normal(size=(8,)).astype(np.float32)},
                       "dense-2": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}},
            "step": np.int32(7)}
    fts = [jax.tree_util.tree_map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype)
                                  if x.dtype == np.float32 else x, base) for _ in range(2)]
    ckpt = ocp.StandardCheckpointer()
    for name, tree in [("base", base), ("a", fts[0]), ("b", fts[1])]:
        ckpt.save(tmp_path / name, tree)
    ckpt.wait_until_finished()
    key = jax.random.key(2)
    out = stream.merge(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], "dare", tmp_path / "out",
                       drop_rate=0.5, combine="ties", key=key, progress=False)
    want = mj.dare(jax.tree_util.tree_map(jnp.asarray, base), [jax.tree_util.tree_map(jnp.asarray, f) for f in fts],
                   drop_rate=0.5, combine="ties", key=key)
    got = _read(out)
    from mergejax.tree import paths_and_leaves

    assert sorted(got) == sorted(p for p, _ in paths_and_leaves(want))
    for path, leaf in paths_and_leaves(want):
        np.testing.assert_array_equal(got[path], np.asarray(leaf), err_msg=path)


@pytest.mark.multihost
@pytest.mark.parametrize("nproc, local", [(2, 4)])
def test_multihost_sharded_load_equals_single_process(tmp_path, nproc, local):
    """2 local jax.distributed processes (gloo) x 4 CPU devices, each reading only its own slices: bit for bit the
    single-process merge (in memory and streamed)."""
    from tests._multihost import run_workers

    shapes = {"model.embed_tokens.weight": (64, 16), "model.layers.0.up.weight": (32, 24),
              "model.norm.weight": (16,), "model.position_ids": (1, 8), "scale": ()}
    base, fts, bpath, fpaths = _write_models(tmp_path / "ckpt", shapes=shapes, T=3)
    run_workers(ROOT / "tests" / "_stream_multihost_worker.py", nproc, [local, tmp_path / "ckpt", tmp_path / "out"])
    b, f = _as_jax(base), [_as_jax(x) for x in fts]
    want = {"ties": mj.ties(b, f, density=0.3),
            "dare": mj.dare(b, f, drop_rate=0.5, combine="ties", density=0.4, key=jax.random.key(4))}
    streamed = _read(stream.merge(bpath, fpaths, "ties", tmp_path / "s", density=0.3, progress=False))
    for name, w in want.items():
        src = stream.OrbaxSource(tmp_path / "out" / name)  # restored as numpy, whatever topology saved it
        for k in shapes:
            np.testing.assert_array_equal(src.read(k), np.asarray(w[k]), err_msg=f"{name} {k}")
            if name == "ties":
                np.testing.assert_array_equal(streamed[k], np.asarray(w[k]), err_msg=k)


def test_per_task_densities_global(tmp_path):
    base, fts, bpath, fpaths = _write_models(tmp_path)
    chain = mj.chain(mj.Trim((0.1, 0.5, 0.0), "global"), mj.ElectSign("count"), mj.DisjointMean())
    got = _read(stream.merge(bpath, fpaths, chain, tmp_path / "o", progress=False))
    want = chain(_as_jax(base), [_as_jax(f) for f in fts])
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


CHUNK_SHAPES = {
    "a.weight": (40, 16),  # 640 elements: cut across three 256-element chunks
    "b.bias": (3,),  # small tensors joined into one chunk with their neighbours
    "c.norm": (5,),
    "d.ids": (4,),  # int: outside the chunks, between two runs of float tensors
    "e.weight": (24, 16),
    "f.empty": (0, 4),
    "g.scale": (),
}


def _chunk_models(tmp: Path, dtype, T=3):
    rng = np.random.default_rng(7)
    shapes = {k: v for k, v in CHUNK_SHAPES.items()}
    base = {k: (np.arange(int(np.prod(s)), dtype=np.int32).reshape(s) if k == "d.ids"
                else rng.normal(0, 1, s).astype(dtype)) for k, s in shapes.items()}
    fts = [{k: v if k == "d.ids" else (v.astype(np.float32) + rng.normal(0, 0.1, v.shape)).astype(dtype)
            for k, v in base.items()} for _ in range(T)]
    paths = []
    for name, m in [("base", base)] + [(f"ft{t}", f) for t, f in enumerate(fts)]:
        write_sharded_safetensors(tmp / name, m, max_shard_size="1KB")
        paths.append(tmp / name)
    return base, fts, paths[0], paths[1:]


def test_chunk_plan_cuts_and_joins(tmp_path):
    _, _, bpath, fpaths = _chunk_models(tmp_path, np.float32)
    inp = stream._Inputs(bpath, fpaths)
    try:
        items = stream._plan_chunks(inp.names, inp, 256)
    finally:
        inp.close()
    chunks = [c for c in items if isinstance(c, stream._Chunk)]
    assert [w.name for w in items if isinstance(w, stream._Whole)] == ["d.ids", "f.empty"]
    assert [s[0] for s in chunks[0].segments] == ["a.weight"] and chunks[0].size == 256
    assert [s[0] for s in chunks[2].segments] == ["a.weight", "b.bias", "c.norm"]  # 128 + 3 + 5, joined
    covered = {}
    for c in chunks:
        assert c.size <= c.padded <= 256 and sum(s[2] for s in c.segments) == c.size
        for name, start, n in c.segments:
            assert covered.get(name, 0) == start  # consecutive pieces, in order
            covered[name] = start + n
    assert covered == {k: int(np.prod(s)) for k, s in CHUNK_SHAPES.items() if k not in ("d.ids", "f.empty")}


CHUNKED = [
    ("task_arithmetic", {"scale": 0.7, "weights": [0.5, -1.0, 2.0]},
     lambda b, f: mj.task_arithmetic(b, f, scale=0.7, weights=[0.5, -1.0, 2.0])),
    ("ties", {"density": 0.3}, lambda b, f: mj.ties(b, f, density=0.3)),
    ("ties", {"density": 0.4, "weights": [1.0, 0.5, 2.0]}, lambda b, f: mj.ties(b, f, density=0.4,
                                                                               weights=[1.0, 0.5, 2.0])),
    ("average", {}, lambda b, f: mj.average(f)),
    (mj.chain(mj.Trim((0.2, 0.5, 0.9), "global"), mj.ElectSign("count"), mj.DisjointMax()), {"scale": 1.3},
     lambda b, f: mj.chain(mj.Trim((0.2, 0.5, 0.9), "global"), mj.ElectSign("count"), mj.DisjointMax())(
         b, f, scale=1.3)),
]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("method, hp, ref", CHUNKED, ids=["ta", "ties", "ties-w", "average", "chain"])
def test_chunked_equals_in_memory(tmp_path, monkeypatch, method, hp, ref, dtype):
    """Elementwise chains over 256-element chunks (tensors cut and joined) equal the in-memory merge bit for bit."""
    base, fts, bpath, fpaths = _chunk_models(tmp_path, dtype)
    calls = []
    orig = stream._chunked_pass
    monkeypatch.setattr(stream, "_chunked_pass", lambda *a: calls.append(1) or orig(*a))
    out = stream.merge(bpath, fpaths, method, tmp_path / "out", progress=False, max_shard_size="1KB", chunk=1024,
                       **hp)
    assert calls
    got = _read(out)
    want = ref(_as_jax(base), [_as_jax(f) for f in fts])
    assert sorted(got) == sorted(want)
    for name in want:
        w = np.asarray(want[name])
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def test_per_tensor_chains_are_not_chunked():
    assert not stream._elementwise(stream._named_chain("dare", {"drop_rate": 0.5})[0])
    assert not stream._elementwise(stream._named_chain("breadcrumbs", {})[0])
    assert not stream._elementwise(stream._named_chain("ties", {"scope": "tensor"})[0])
    assert stream._elementwise(stream._named_chain("ties", {})[0])


def test_readahead_is_bounded_by_bytes():
    """While the caller holds item i, the reads started for items after i total at most the budget (and happen)."""
    sizes = [5, 1, 1, 7, 2, 2, 2, 9, 1, 3]
    started: list[int] = []
    got, ahead = [], []
    for i, v in stream._pipelined(list(range(len(sizes))), lambda j: started.append(j) or 10 * j, 4,
                                  lambda j: sizes[j]):
        time.sleep(0.02)  # let the reader thread run
        ahead.append(sum(sizes[j] for j in list(started) if j > i))
        got.append((i, v))
    assert got == [(i, 10 * i) for i in range(len(sizes))]
    assert max(ahead) <= 4 and max(ahead) > 0, ahead
    assert [v for _, v in stream._pipelined([1, 2], lambda j: -j, 0, lambda j: 1)] == [-1, -2]


def test_safetensors_writer_pieces(tmp_path):
    from mergejax.convert.io import SafetensorsWriter, TensorInfo

    a = np.arange(10, dtype=np.float32).reshape(2, 5)
    tensors = [("a", TensorInfo((2, 5), np.dtype(np.float32))), ("z", TensorInfo((0,), np.dtype(np.float32))),
               ("b", TensorInfo((3,), np.dtype(np.int32)))]
    w = SafetensorsWriter(tmp_path / "x.safetensors", tensors)
    assert w.current == "a"
    w.write(a.reshape(-1)[:3])
    w.write(a.reshape(-1)[3:])
    assert w.current == "b"  # the empty tensor is skipped
    with pytest.raises(ValueError, match="'b'.*float32 piece"):
        w.write(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="incomplete"):
        SafetensorsWriter(tmp_path / "y.safetensors", tensors).close()
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "y.safetensors.partial").exists()
    w.write(np.array([1, 2, 3], np.int32))
    assert not (tmp_path / "x.safetensors").exists()
    w.close()
    got = _read(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], [1, 2, 3])
    assert got["z"].shape == (0,)
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(tmp_path / "x.safetensors")["a"], a)


@pytest.mark.parametrize("method, hp", [
    ("task_arithmetic", {"scale": 0.6}),
    ("ties", {"density": 0.3}),
    ("dare", {"drop_rate": 0.5, "key": jax.random.key(3)}),
    ("breadcrumbs", {"beta": 0.2, "gamma": 0.1}),
], ids=["ta", "ties", "dare", "breadcrumbs"])
def test_heads_equal_in_memory(tmp_path, method, hp):
    """heads=: matched tensors get base + sum_t tau_t and count in no statistic (global trim k, DARE leaf index)."""
    base, fts, bpath, fpaths = _write_models(tmp_path)
    heads = r"lm_head|embed_tokens"
    got = _read(stream.merge(bpath, fpaths, method, tmp_path / "out", progress=False, heads=heads, chunk=1024, **hp))
    want = getattr(mj, method)(_as_jax(base), [_as_jax(f) for f in fts], heads=heads, **hp)
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
    emb = "model.embed_tokens.weight"
    np.testing.assert_allclose(got[emb], base[emb] + sum(f[emb] - base[emb] for f in fts), rtol=1e-6)
    with pytest.raises(ValueError, match="matches no tensor"):
        stream.merge(bpath, fpaths, method, tmp_path / "o2", progress=False, heads="nothing_like_this", **hp)


def _lines_stage():
    blocks = {"model.layers.0.mlp.up_proj.weight": 0, "model.layers.1.mlp.up_proj.weight": 2,
              "model.embed_tokens.weight": 1}
    return mj.lines(0.3, 0.7, blocks, num_blocks=3)


@pytest.mark.parametrize("make", [
    lambda: mj.chain(_lines_stage(), mj.Sum()),
    lambda: mj.chain(mj.Trim(0.3, "global"), mj.ElectSign(), mj.DisjointMean(), _lines_stage()),  # TIES then LiNeS
    lambda: mj.chain(_lines_stage(), mj.Trim(0.4, "global"), mj.ElectSign(), mj.DisjointMean()),
], ids=["lines-sum", "ties-then-lines", "lines-then-ties"])
def test_lines_equals_in_memory(tmp_path, make):
    """LiNeS (Wang et al., 2025, Eq. 3): each tensor scaled by its block's coefficient, before or after the reduction,
    also ahead of a global trim (its statistic passes see the scaled vectors)."""
    base, fts, bpath, fpaths = _write_models(tmp_path)
    chain = make()
    got = _read(stream.merge(bpath, fpaths, chain, tmp_path / "out", scale=0.8, progress=False))
    want = chain(_as_jax(base), [_as_jax(f) for f in fts], scale=0.8)
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
    bad = mj.chain(mj.lines(0.3, 0.7, {"no.such.tensor": 0}), mj.Sum())
    with pytest.raises(ValueError, match="no.such.tensor"):
        stream.merge(bpath, fpaths, bad, tmp_path / "o2", progress=False)


@pytest.mark.parametrize("method, hp", [
    ("task_arithmetic", {"scale": 0.5}),
    ("ties", {"density": 0.3}),
    ("dare", {"drop_rate": 0.4, "key": jax.random.key(2)}),
], ids=["ta", "ties", "dare"])
def test_ternary_experts_as_inputs(tmp_path, method, hp):
    """A ComPEFT expert saved with mergejax.ternary.save streams in as its decoded task vector, leaf by leaf, and the
    merge equals the in-memory one given the loaded TernaryTaskVector."""
    from mergejax import ternary

    base, fts, bpath, fpaths = _write_models(tmp_path)
    tau = {k: jnp.asarray(fts[1][k], jnp.float32) - jnp.asarray(base[k], jnp.float32)
           if np.issubdtype(base[k].dtype, np.floating) else jnp.zeros_like(jnp.asarray(base[k])) for k in base}
    ternary.save(tmp_path / "expert", ternary.compress(tau, density=0.3))
    inputs = [fpaths[0], tmp_path / "expert", fpaths[2]]
    got = _read(stream.merge(bpath, inputs, method, tmp_path / "out", progress=False, chunk=1024, **hp))
    b = _as_jax(base)
    want = getattr(mj, method)(b, [_as_jax(fts[0]), ternary.load(tmp_path / "expert"), _as_jax(fts[2])], **hp)
    for name in want:
        w = np.asarray(want[name])
        if method == "dare":  # in memory XLA fuses the decode into the drop-and-rescale: last-bit differences
            np.testing.assert_array_equal(got[name] == base[name], w == base[name], err_msg=name)
            np.testing.assert_allclose(got[name], w, rtol=4e-6, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], w, err_msg=name)
    with pytest.raises(ValueError, match="task vector"):
        stream.merge(tmp_path / "expert", fpaths, method, tmp_path / "o2", progress=False, **hp)


@pytest.mark.parametrize("method, hp", [("ties", {"density": 0.3}), ("dare", {"drop_rate": 0.5,
                                                                              "key": jax.random.key(1)})])
def test_orbax_output_per_shard(tmp_path, method, hp):
    """out_format="orbax": one orbax checkpoint per output shard, written as the merge goes, read back tensor by
    tensor (open_source) and as global arrays (load_sharded), equal to the in-memory merge; resumable by shard."""
    base, fts, bpath, fpaths = _write_models(tmp_path)
    out = stream.merge(bpath, fpaths, method, tmp_path / "out", progress=False, max_shard_size="2KB",
                       out_format="orbax", chunk=1024, **hp)
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("orbax-"))
    assert len(shards) > 1 and (out / stream.ORBAX_INDEX).exists() and not (out / stream.STATE_FILE).exists()
    want = getattr(mj, method)(_as_jax(base), [_as_jax(f) for f in fts], **hp)
    src = stream.open_source(out)
    try:
        assert sorted(src.keys()) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(src.read(name), np.asarray(want[name]), err_msg=name)
    finally:
        src.close()
    loaded = stream.load_sharded(out, lambda n, i: jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    for name in want:
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(want[name]), err_msg=name)
    with pytest.raises(FileExistsError):
        stream.merge(bpath, fpaths, method, out, progress=False, out_format="orbax", **hp)
