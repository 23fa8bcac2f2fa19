"""Leaf-by-leaf merges (mergejax.ops.schedule): the same numbers as the single traced program, compiled programs
that depend on leaf signatures only, NaN/Inf reports by path, buffer donation, and the fallbacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax.ops import schedule as sch
from mergejax.ops.base import Given
from mergejax.ops.pcb import PCB
from mergejax.ops.reduce import DisjointMean
from mergejax.ops.select import key_to_float, ordered_key
from mergejax.ops.sign import ElectSign
from mergejax.ops.trim import Trim
from mergejax.merge import breadcrumbs_chain, dare_chain, ties_chain
from tests import reference as ref

KEY = jax.random.key(3)


def make_tree(rng: np.random.Generator, n_layers: int = 2, rows: int = 160) -> dict:
    """Kernels big enough for several counting passes (> SORT_MAX entries in all), biases, a bf16 leaf, an int."""
    def f32(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    tree = {f"layer_{i}": {"kernel": f32(rows, 64), "bias": f32(64)} for i in range(n_layers)}
    tree["norm"] = {"scale": f32(7).astype(jnp.bfloat16)}
    tree["head"] = f32(5, 3)
    tree["step"] = jnp.arange(4)
    return tree


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    base = make_tree(rng)
    fts = [jax.tree_util.tree_map(lambda b: b + (0.1 * rng.standard_normal(b.shape)).astype(b.dtype)
                                  if jnp.issubdtype(b.dtype, jnp.floating) else b, base) for _ in range(3)]
    return base, fts


def assert_same(a, b, tol: float = 0.0):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol)


CASES = {
    "task_arithmetic": (mj.chain(mj.Sum()), {}),
    "ties_global": (ties_chain(), {}),
    "ties_tensor": (ties_chain(scope="tensor"), {}),
    "ties_count_max": (ties_chain(sign_method="count", reduce="max", density=(0.1, 0.5, 1.0)), {}),
    "ties_density_0": (ties_chain(density=0.0), {}),
    "ties_weights": (ties_chain(), {"weights": [0.5, 1.0, 2.0]}),
    "ties_leaf_weights": (ties_chain(), {"weights": {"layer_0/kernel": [1.0, 0.0, 3.0]}}),
    "ties_heads": (ties_chain(), {"heads": r"^head$", "scale": 0.7}),
    "dare": (dare_chain(), {"key": KEY}),
    "dare_jax_rng": (mj.chain(mj.DareDrop(0.5, rng="jax"), mj.Sum()), {"key": KEY}),
    "dare_ties_l1": (dare_chain(rescale="l1", combine="ties"), {"key": KEY}),
    "breadcrumbs": (breadcrumbs_chain(), {}),
    "pcb": (mj.chain(PCB(0.05)), {}),
    "pcb_weights": (mj.chain(PCB(0.2)), {"weights": [1.0, 0.5, 2.0]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_leaf_by_leaf_equals_one_program(models, name):
    base, fts = models
    m, kw = CASES[name]
    assert sch.schedulable(m.stages, base, fts)
    # bit for bit, but PCB's exp/tanh, which XLA vectorises differently in the two programs' fusions (an ulp)
    tol = 1e-6 if name.startswith("pcb") else 0.0
    assert_same(m(base, fts, schedule="leaves", **kw), m(base, fts, schedule="program", **kw), tol)


def test_task_vectors_and_one_model_and_identical_models(models):
    base, fts = models
    tvs = [mj.TaskVector(mj.task_vector(ft, base)) for ft in fts]
    m = ties_chain()
    assert_same(m(base, [tvs[0], fts[1], tvs[2]], schedule="leaves"), m(base, fts, schedule="program"))
    assert_same(m(base, fts[:1], schedule="leaves"), m(base, fts[:1], schedule="program"))
    same = m(base, [fts[0]] * 3, schedule="leaves")
    assert_same(same, m(base, [fts[0]] * 3, schedule="program"))
    zero = m(base, [base, base], schedule="leaves")  # all-zero task vectors: every entry ties at the threshold
    assert_same(zero, base)


def test_global_threshold_matches_numpy_reference(models):
    base, fts = models
    tv = [[np.asarray(f, np.float64) - np.asarray(b, np.float64) for f, b in
           zip(jax.tree_util.tree_leaves(ft), jax.tree_util.tree_leaves(base)) if jnp.issubdtype(b.dtype, jnp.floating)]
          for ft in fts]
    want = ref.ties_tv([[x.astype(np.float32) for x in t] for t in tv], 0.2, "global", "sum", "mean")
    merged = ties_chain()(base, fts, schedule="leaves")
    float_pos = [i for i, b in enumerate(jax.tree_util.tree_leaves(base)) if jnp.issubdtype(b.dtype, jnp.floating)]
    for i, w in zip(float_pos, want):
        b = jax.tree_util.tree_leaves(base)[i]
        got = np.asarray(jax.tree_util.tree_leaves(merged)[i], np.float32)
        np.testing.assert_allclose(got, np.asarray((np.asarray(b, np.float32) + w).astype(b.dtype), np.float32),
                                   atol=2e-2 if b.dtype == jnp.bfloat16 else 1e-6)


def test_programs_depend_on_leaf_signatures_not_leaf_count_or_density():
    rng = np.random.default_rng(1)

    def grow(n_layers):  # 3 or 5 layers of (90, 64) kernels: > SORT_MAX entries, the same sample stride
        base = make_tree(rng, n_layers, rows=90)
        return base, [jax.tree_util.tree_map(lambda b: b + 1 if jnp.issubdtype(b.dtype, jnp.floating) else b,
                                             base), base]

    caches = (sch._stat_program, sch._final_jit, sch._head_jit)

    def added_by(fn):
        before = [f._cache_size() for f in caches]
        fn()
        return [f._cache_size() - b for f, b in zip(caches, before)]

    base, fts = grow(3)
    first = added_by(lambda: mj.ties(base, fts, density=0.37, heads=r"^head$"))
    assert first[0] > 0 and first[1] > 0
    assert added_by(lambda: mj.ties(base, fts, density=0.11, heads=r"^head$")) == [0, 0, 0]  # density: data
    base, fts = grow(5)
    assert added_by(lambda: mj.ties(base, fts, density=0.37, heads=r"^head$")) == [0, 0, 0]  # more leaves


def test_nan_reported_by_model_and_path_leaf_by_leaf(models):
    base, fts = models
    bad = jax.tree_util.tree_map(lambda x: x, fts[1])
    bad["layer_1"]["bias"] = bad["layer_1"]["bias"].at[3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"finetuned\[1\] has NaN or Inf in leaf 'layer_1/bias'"):
        ties_chain()(base, [fts[0], bad], schedule="leaves")
    ties_chain()(base, [fts[0], bad], schedule="leaves", check_finite=False)


def test_donate_deletes_inputs_and_gives_the_same_result(models):
    base, fts = models
    want = mj.ties(base, fts)
    for schedule in ("leaves", "program"):
        b2, f2 = jax.tree_util.tree_map(jnp.copy, (base, fts))
        got = ties_chain()(b2, f2, donate=True, schedule=schedule)
        assert_same(got, want)
        kernels = [b2["layer_0"]["kernel"], *[f["layer_0"]["kernel"] for f in f2]]
        assert all(x.is_deleted() for x in kernels), schedule
        np.testing.assert_array_equal(got["step"], base["step"])  # the int leaf (the base's) is still readable


def test_fallbacks_and_errors(models):
    base, fts = models
    lines = mj.chain(mj.Sum(), mj.lines(0.1, 0.5, {"layer_0/kernel": 0, "layer_1/kernel": 1}))
    assert not sch.schedulable(lines.stages, base, fts)  # LiNeS reads leaf paths: one program
    with pytest.raises(ValueError, match="schedule='leaves' needs"):
        lines(base, fts, schedule="leaves")
    with pytest.raises(ValueError, match="schedule must be"):
        ties_chain()(base, fts, schedule="fast")
    # inside the caller's jit the merge is one traced program, with the same numbers
    jitted = jax.jit(lambda b, f: mj.ties(b, f, check_finite=False))(base, fts)
    assert_same(jitted, mj.ties(base, fts))


def test_donate_with_a_buffer_passed_twice(models):
    base, fts = models
    want = mj.task_arithmetic(base, [base, fts[0], fts[0]])
    for schedule in ("leaves", "program"):
        b2, f2 = jax.tree_util.tree_map(jnp.copy, (base, fts[0]))
        assert_same(mj.chain(mj.Sum())(b2, [b2, f2, f2], donate=True, schedule=schedule), want)
        assert b2["layer_0"]["kernel"].is_deleted() and f2["layer_0"]["kernel"].is_deleted()


@pytest.mark.parametrize("name,rows", [("task_arithmetic", 48), ("ties_global", 48), ("ties_tensor", 8),
                                       ("ties_weights", 8), ("dare", 48), ("breadcrumbs", 48), ("breadcrumbs", 8),
                                       ("pcb", 48), ("pcb_weights", 8)])
def test_row_chunks_give_the_same_numbers(models, monkeypatch, name, rows):
    """Large leaves of a rowwise program run in row chunks (here 160 rows in chunks of 48: a remainder piece too,
    or of 8: none); the numbers equal the single program's. TIES' and task arithmetic's stages are rowwise but not
    ``row_chunks`` (nothing to gain): marked so here, to check their rowwise claim. DARE's hash reads flat indices:
    never chunked."""
    base, fts = models
    m, kw = CASES[name]
    tol = 1e-6 if name.startswith("pcb") else 0.0
    want = m(base, fts, schedule="program", **kw)
    for cls in (mj.Sum, DisjointMean, Trim, ElectSign):
        monkeypatch.setattr(cls, "row_chunks", True)
    monkeypatch.setattr(sch, "_chunk_rows", lambda shape, ok: rows if ok and len(shape) > 1 and shape[0] > rows else 0)
    chunked = []
    orig = sch._fold_rows
    monkeypatch.setattr(sch, "_fold_rows", lambda *a: chunked.append(a[-1]) or orig(*a))
    assert_same(m(base, fts, schedule="leaves", **kw), want, tol)
    assert (name != "dare") == (rows in chunked)


def test_chunk_rows():
    assert sch._chunk_rows((6104, 1024), True) == 218  # a divisor of 6104 within 2x of 256 rows
    assert sch._chunk_rows((4099, 1024), True) == 256  # 4099 is prime: chunks of 256 and a remainder
    assert sch._chunk_rows((6104, 1024), False) == 0  # a program that is not rowwise
    assert sch._chunk_rows((1 << 21,), True) == 0 and sch._chunk_rows((200, 64), True) == 0  # a vector, a small leaf
    assert sch._chunk_rows((2, 1 << 20), True) == 1  # rows wider than a chunk: a row at a time


def test_chunked_statistics_equal_whole_leaf_ones(models, monkeypatch):
    """The chunked statistics programs (counts, extremes, strided sample, sums, maxima) equal the whole leaf's."""
    base, fts = models
    stages = (PCB(0.05),)
    b, es = base["layer_0"]["kernel"], tuple(f["layer_0"]["kernel"] for f in fts)
    cands = jnp.asarray(np.sort(np.random.default_rng(2).integers(2**31, 2**32, (6, 8)), axis=1), jnp.uint32)
    lo_hi = (jnp.full((3,), 1e-3, jnp.float32), jnp.full((3,), 0.2, jnp.float32))
    common = dict(tv_mask=(False,) * 3, q=0, magnitude=True)
    for name, mode, given, strides in [("abs", "count", None, (1,)), ("abs", "sample+extremes", None, (7, 97)),
                                       ("beta", "sample", lo_hi, (7, 97)), ("top", "max", lo_hi, (1,))]:
        for stride in strides:
            args = (stages, b, es, jnp.int32(0), None, None, cands if name == "abs" else cands[:3], given)
            whole = sch._stat_program(*args, name=name, mode=mode, stride=stride, rows=0, **common)
            for rows in (48, 8):
                got = sch._stat_program(*args, name=name, mode=mode, stride=stride, rows=rows, **common)
                if mode == "count":  # (hi, lo) halves: the lo sum may carry
                    got = [np.asarray(got[0], np.int64) * 65536 + got[1]]
                    whole_ = [np.asarray(whole[0], np.int64) * 65536 + whole[1]]
                else:
                    whole_ = whole
                for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(whole_)):
                    if name == "abs":
                        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
                    else:  # PCB's exp/tanh: XLA vectorises them differently in the two programs' fusions (an ulp)
                        as_float = (lambda k: key_to_float(k)) if mode != "max" else (lambda v: v)
                        np.testing.assert_allclose(np.asarray(as_float(x)), np.asarray(as_float(y)), rtol=1e-6)


def test_host_key_to_float_equals_the_program_one():
    """The host side of the leaf-by-leaf search converts numpy keys with numpy (nothing compiles): the same floats."""
    x = np.asarray([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, 1e-40, -3e38], np.float32)
    keys = np.asarray(ordered_key(jnp.asarray(x)))
    host = key_to_float(keys)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_array_equal(host.view(np.uint32), np.asarray(key_to_float(jnp.asarray(keys))).view(np.uint32))
    np.testing.assert_array_equal(host.view(np.uint32), x.view(np.uint32))


def test_small_leaves_share_the_flat_statistics_programs():
    """PCB's statistics on leaves of at most FLAT_MAX entries run on flat zero-padded copies (the padding masked):
    one program per size bucket and pass kind, whatever the leaves' shapes; the merge equals the single program's."""
    rng = np.random.default_rng(5)
    shapes = {"k": (64, 64), "b": (64,), "odd": (37, 5), "cube": (3, 3, 3), "wide": (200, 64)}  # buckets 4096, 16384
    base = {name: jnp.asarray(rng.standard_normal(s), jnp.float32) for name, s in shapes.items()}
    fts = [jax.tree_util.tree_map(lambda b: b + jnp.asarray(0.1 * rng.standard_normal(b.shape), b.dtype), base)
           for _ in range(2)]
    m = mj.chain(PCB(0.1))
    jax.clear_caches()
    got = m(base, fts, schedule="leaves")
    assert sch._stat_program._cache_size() == 0
    # more than SORT_MAX entries: a sampled pass, then counting passes
    assert sch._flat_stat_program._cache_size() == 2 * 2 * 2  # 2 buckets x (|tau|, beta) x (sample, count)
    assert_same(got, m(base, fts, schedule="program"), 1e-6)


def bits(tree) -> list[np.ndarray]:
    """The float leaves' bit patterns (so -0.0 and 0.0 differ)."""
    return [np.asarray(x).view(np.uint16 if x.dtype == jnp.bfloat16 else np.uint32)
            for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def assert_bits(a, b):
    for x, y in zip(bits(a), bits(b), strict=True):
        np.testing.assert_array_equal(x, y)


def signed_tree(majority: int) -> tuple[dict, list]:
    """Base and two TaskVectors (T = 2, density 1 keeps every entry) whose raw elected signs tally to ``majority``,
    with coordinates the majority decides: +a and -a (they cancel), two -0.0 (kept by a zero majority, into a
    -0.0 base: the output's sign bit shows it); a first small leaf whose signs point the other way."""
    rng = np.random.default_rng(7)
    a = np.abs(rng.standard_normal(300)).astype(np.float32) + 0.5
    t0, t1 = a.copy(), np.zeros_like(a)
    t0[:10], t1[:10] = a[:10], -a[:10]  # exact cancellations: sum 0, entries nonzero
    t0[10:12], t1[10:12] = -0.0, -0.0
    n_neg = {1: 100, -1: 200, 0: 144}[majority]  # of the 288 remaining coordinates, flip this many to negative
    t0[12:12 + n_neg] *= -1
    # the first leaf's signs lead the kernel to assume the wrong majority (+1 on a tie)
    first = np.asarray([1.0, 1.0, -1.0, -1.0] if majority == 0 else [-majority] * 3 + [majority], np.float32)
    base = {"a_first": jnp.zeros((4,), jnp.float32), "b_kernel": jnp.full((20, 15), -0.0, jnp.float32)}
    tvs = [mj.TaskVector({"a_first": jnp.asarray(f), "b_kernel": jnp.asarray(t.reshape(20, 15))})
           for f, t in ((first, t0), (first, t1))]
    return base, tvs


@pytest.mark.parametrize("majority", [1, -1, 0])
@pytest.mark.parametrize("sign_method", ["sum", "count"])
def test_deferred_majority_reruns_only_the_leaves_it_decides(majority, sign_method):
    """TIES's majority sign is deferred into the final pass: each leaf assumes the majority of the leaves before it
    (+1 at the first), tallies its raw signs and the coordinates the majority decides, and a leaf that assumed
    wrong and has such coordinates is rerun with the true majority: bit for bit the single program's."""
    base, tvs = signed_tree(majority)
    m = ties_chain(density=1.0, sign_method=sign_method)
    got = m(base, tvs, schedule="leaves")
    info = sch.last_info
    assert info.deferred == 1
    assert_bits(got, m(base, tvs, schedule="program"))
    # the first leaf has no coordinates the majority decides; the kernel assumed the first leaf's (wrong) majority
    # and has 12 of them: rerun once
    assert info.recomputed == 1
    stages = (Given(Trim(), jnp.zeros((2,), jnp.float32)), ElectSign(sign_method), DisjointMean())
    prior = jnp.asarray([0.0, 5.0, 0.0], jnp.float32)  # more -1 than +1 so far: -1 assumed
    _, _, tally, used, nxt = sch._final_jit(stages, base["b_kernel"], tuple(t.tree["b_kernel"] for t in tvs),
                                           np.int32(1), None, None, np.float32(1.0), prior, tv_mask=(True, True),
                                           check=False, defer=1)
    n_neg = {1: 100, -1: 200, 0: 144}[majority]
    np.testing.assert_array_equal(np.asarray(tally), [288 - n_neg, n_neg, 12])
    assert int(used) == -1
    np.testing.assert_array_equal(np.asarray(nxt), np.asarray(prior) + np.asarray(tally))


def test_deferred_majority_fallbacks(models):
    """No deferral where the inputs are donated (a leaf could not be rerun) or a stage runs in row chunks; the
    statistic is then computed in its own pass first, with the same numbers."""
    base, fts = models
    want = ties_chain()(base, fts, schedule="program")
    b2, f2 = jax.tree_util.tree_map(jnp.copy, (base, fts))
    assert_bits(ties_chain()(b2, f2, donate=True, schedule="leaves"), want)
    assert sch.last_info.deferred is None
    assert sch._deferrable(breadcrumbs_chain().stages, False) is None  # its statistics stage runs in row chunks
    assert sch._deferrable(mj.chain(mj.Sum()).stages, False) is None  # no statistics at all
    assert sch._deferrable(ties_chain().stages, False) == 1


def test_side_output_is_exact():
    """The one-loop pair of outputs returns both arrays bit for bit (-0.0, NaN, inf, bf16, scalars)."""
    x = jnp.asarray([0.0, -0.0, 1.5, -np.inf, np.nan, 1e-45], jnp.float32)
    codes = jnp.asarray([0, 1, -1, 2, 0, 1], jnp.int8)
    for out in (x, x.astype(jnp.bfloat16), x[1]):
        side = codes if out.ndim else codes[1]
        got, got_side = jax.jit(sch._side_output)(out, side)
        assert_bits(got, out)
        np.testing.assert_array_equal(np.asarray(got_side), np.asarray(side))


@pytest.fixture(scope="module")
def big_models():
    """Kernels of 400 x 64 entries: more than SORT_MAX, so per-tensor thresholds are searched too."""
    rng = np.random.default_rng(4)
    base = make_tree(rng, rows=400)
    fts = [jax.tree_util.tree_map(lambda b: b + (0.1 * rng.standard_normal(b.shape)).astype(b.dtype)
                                  if jnp.issubdtype(b.dtype, jnp.floating) else b, base) for _ in range(3)]
    return base, fts


@pytest.mark.parametrize("load", [1e12, 10.0])
@pytest.mark.parametrize("name", ["ties_global", "ties_tensor", "ties_count_max", "ties_weights"])
def test_gathering_pass_gives_the_same_thresholds(big_models, monkeypatch, name, load):
    """The leaf-by-leaf search ends with one gathering pass (per row of 128 entries: the counts above and inside
    the bracket and its smallest and largest keys inside) once the brackets are small; where a row holds three or
    more of them it misses and the counting passes go on. Here it is forced early (``GATHER_MISS`` raised: rows
    of many bracket entries, so it also misses); the merge equals the single program's bit for bit."""
    from mergejax.ops import select
    monkeypatch.setattr(select, "GATHER_MISS", load)
    modes = []
    orig = sch._stat_program
    monkeypatch.setattr(sch, "_stat_program", lambda *a, **k: modes.append(k["mode"]) or orig(*a, **k))
    base, fts = big_models
    m, kw = CASES[name]
    assert_bits(m(base, fts, schedule="leaves", **kw), m(base, fts, schedule="program", **kw))
    assert "gather" in modes
    if load > 1e6 and name == "ties_global":
        assert sch.last_info.gather_misses > 0  # the miss path ran, and the counting passes finished the search


def test_gathered_kth_is_exact_or_misses():
    rng = np.random.default_rng(3)
    from mergejax.ops.select import gather_row, gather_summary, gathered_kth, merge_summaries
    for trial in range(50):
        keys = rng.integers(0, 40, size=(64, 8)).astype(np.uint32)  # rows of 8, many ties
        lo, hi = np.uint32(rng.integers(0, 20)), np.uint32(rng.integers(20, 40))
        inside = (keys >= lo) & (keys <= hi)
        packed = (keys > hi).sum(1).astype(np.int32) + (inside.sum(1).astype(np.int32) << 16)
        low = np.where(inside, keys, np.uint32(2**32 - 1)).min(1)
        high = np.where(inside, keys, np.uint32(0)).max(1)
        desc = np.sort(keys.ravel())[::-1]
        k = int(rng.integers(1, keys.size + 1))
        got = gathered_kth(k, merge_summaries([gather_summary(packed[:40], low[:40], high[:40]),
                                               gather_summary(packed[40:], low[40:], high[40:])]))
        in_bracket = (keys > hi).sum() < k <= (keys >= lo).sum()
        if got is not None:
            assert in_bracket and inside.sum(1).max() <= 2 and got == desc[k - 1]
        else:
            assert not in_bracket or inside.sum(1).max() > 2
    # exactly two per row: seen in full
    keys = np.asarray([[5, 9, 1, 1], [7, 0, 7, 2]], np.uint32)
    packed = np.asarray([0 + (2 << 16), 0 + (2 << 16)], np.int32)  # bracket [5, 9]
    two = gather_summary(packed, np.asarray([5, 7], np.uint32), np.asarray([9, 7], np.uint32))
    assert gathered_kth(3, two) == 7 and gathered_kth(1, two) == 9
    assert gather_row(6104 * 1024) == 128 and gather_row(48) == 48 and gather_row(16 * 7919) == 16
    assert gather_row(1000) == 1000  # gcd 8: too short rows, so one row
    assert gather_row(3 * 7919) == 3 * 7919  # no divisor of at least 16: one row


@pytest.mark.parametrize("shape", [(37, 50), (3, 5, 64), (999,), (2, 70000)])
@pytest.mark.parametrize("D", [8, 3])
def test_leaf_counts_equal_numpy(shape, D):
    """A leaf's counts of every group and candidate in one reduction (on CPU two per 32-bit word along the rows of
    the last axis, where those are shorter than 2**16): the exact integers."""
    rng = np.random.default_rng(9)
    values = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3)]
    keys = [np.asarray(ordered_key(jnp.abs(v))) for v in values]
    cands = np.stack([np.sort(rng.choice(k.ravel(), D)) for k in keys]).astype(np.uint32)
    hi, lo = jax.jit(sch._leaf_counts, static_argnums=2)(values, jnp.asarray(cands), True)
    want = np.asarray([[int((k >= c).sum()) for c in row] for k, row in zip(keys, cands)])
    np.testing.assert_array_equal(np.asarray(hi) * 65536 + np.asarray(lo), want)
