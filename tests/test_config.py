"""mergekit YAML configs: parsing, refusals, and parity with tensors that real mergekit 0.1.5 wrote.

The fixtures under tests/fixtures/mergekit were made by experiments/peers/make_mergekit_fixtures.py (tiny float32 Llama
checkpoints, mergekit-yaml run offline in its own virtualenv).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from mergejax import config as mc
from mergejax.convert.io import open_checkpoint

FIX = Path(__file__).parent / "fixtures" / "mergekit"
CASES = sorted(p.stem for p in (FIX / "configs").glob("*.yaml"))
DETERMINISTIC = [c for c in CASES if c != "dare_linear_half"]


def _read(path: Path) -> dict[str, np.ndarray]:
    src = open_checkpoint(path)
    try:
        return {n: src.read(n) for n in src.keys()}
    finally:
        src.close()


def _inputs(cfg: mc.MergeConfig):
    base = None if cfg.base_model is None else _read(Path(cfg.base_model))
    return base, [_read(Path(m.path)) for m in cfg.models]


@pytest.fixture
def in_fixtures(monkeypatch):
    monkeypatch.chdir(FIX)  # model paths in the configs are relative to the working directory, as for mergekit


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_in_memory_matches_mergekit(case, in_fixtures):
    cfg = mc.load_config(FIX / "configs" / f"{case}.yaml").resolve()
    expected = _read(FIX / "outputs" / f"{case}.safetensors")
    base, fts = _inputs(cfg)
    merged = mc.merge_in_memory(cfg, base, fts)
    assert sorted(merged) == sorted(expected)
    for name, want in expected.items():
        got = np.asarray(merged[name])
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7, err_msg=f"{case}: {name}")


def test_sparsified_cases_really_sparsify(in_fixtures):
    """The fixtures exercise the trims: a TIES output differs from plain weighted task arithmetic."""
    cfg = mc.load_config(FIX / "configs" / "ties.yaml").resolve()
    base, fts = _inputs(cfg)
    out = _read(FIX / "outputs" / "ties.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    delta = out[name] - base[name]
    dense = sum(m.weight * (ft[name] - base[name]) for m, ft in zip(cfg.models, fts))
    assert np.mean(delta == 0) > 0.2 and not np.allclose(delta, dense)


def test_dare_statistics_match_mergekit(in_fixtures):
    """dare_linear, density 0.5, one model: both keep about half the entries and each tensor's weighted L1 norm."""
    cfg = mc.load_config(FIX / "configs" / "dare_linear_half.yaml").resolve()
    base, fts = _inputs(cfg)
    theirs = _read(FIX / "outputs" / "dare_linear_half.safetensors")
    ours = {k: np.asarray(v) for k, v in mc.merge_in_memory(cfg, base, fts, key=jax.random.key(3)).items()}
    w = cfg.models[0].weight
    for merged in (theirs, ours):
        kept = total = 0
        for name, b in base.items():
            d = merged[name].astype(np.float64) - b
            ref = w * np.abs(fts[0][name].astype(np.float64) - b).sum()
            np.testing.assert_allclose(np.abs(d).sum(), ref, rtol=1e-5, err_msg=name)
            kept += int(np.count_nonzero(d))
            total += d.size
        assert 0.42 < kept / total < 0.58
    again = mc.merge_in_memory(cfg, base, fts, key=jax.random.key(3))
    assert all(np.array_equal(np.asarray(again[k]), ours[k]) for k in ours)
    with pytest.raises(ValueError, match="key"):
        mc.merge_in_memory(cfg, base, fts)


@pytest.mark.parametrize("case", ["ties", "breadcrumbs_ties", "linear"])
def test_run_config_writes_checkpoint(case, in_fixtures, tmp_path):
    out = mc.run_config(FIX / "configs" / f"{case}.yaml", tmp_path / "out", progress=False)
    assert (out / "config.json").is_file()
    got, want = _read(out), _read(FIX / "outputs" / f"{case}.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=2e-7, err_msg=name)


def test_cli_positional_config(in_fixtures, tmp_path):
    from mergejax.cli import main

    assert main(["merge", str(FIX / "configs" / "task_arithmetic.yaml"), str(tmp_path / "m"), "--no-progress"]) == 0
    got, want = _read(tmp_path / "m"), _read(FIX / "outputs" / "task_arithmetic.safetensors")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=2e-7)


def _raw(**over):
    raw = {"merge_method": "ties", "base_model": "./b", "models": [{"model": "./a", "parameters": {"weight": 1.0}}]}
    raw.update(over)
    return raw


@pytest.mark.parametrize(
    "over, match",
    [
        ({"slices": [{"sources": []}]}, "slices"),
        ({"tokenizer_source": "union"}, "tokenizer_source"),
        ({"chat_template": "chatml"}, "chat_template"),
        ({"merge_method": "slerp"}, "slerp"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"base_model": None}, "base_model"),
        ({"models": [{"model": "./a", "parameters": {"weight": [0.1, 0.9]}}]}, "gradient"),
        ({"models": [{"model": "./a", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}]}, "gradient"),
        ({"models": [{"model": "./a"}]}, "weight"),
        ({"models": [{"model": "./a+./lora", "parameters": {"weight": 1}}]}, "LoRA"),
        ({"models": [{"model": "./a", "parameters": {"weight": 1, "density": 1.5}}]}, "density"),
        ({"models": [{"model": "./a", "parameters": {"weight": 1, "gamma": 0.1}}]}, "gamma"),
        ({"parameters": {"epsilon": 0.1}}, "epsilon"),
        ({"dtype": "int4"}, "int4"),
        ({"merge_method": "linear"}, "linear: base_model"),
    ],
)
def test_refusals_name_the_option(over, match):
    with pytest.raises(ValueError, match=match):
        mc.parse_config(_raw(**over))


def test_parameter_resolution_and_defaults():
    cfg = mc.parse_config(_raw(
        merge_method="dare_ties",
        parameters={"density": 0.3, "weight": 0.5, "lambda": 2},
        models=[{"model": "./b"}, {"model": "./a"}, {"model": "./c", "parameters": {"density": 0.9}}],
    ))
    assert [(m.path, m.weight, m.density) for m in cfg.models] == [("./a", 0.5, 0.3), ("./c", 0.5, 0.9)]
    assert (cfg.normalize, cfg.rescale, cfg.lambda_) == (False, True, 2.0)
    ties = mc.parse_config(_raw())
    assert (ties.normalize, ties.rescale, ties.models[0].density) == (True, False, 1.0)


def test_shape_mismatch_names_tensor(in_fixtures, tmp_path):
    cfg = mc.load_config(FIX / "configs" / "task_arithmetic.yaml").resolve()
    base, fts = _inputs(cfg)
    fts[1]["lm_head.weight"] = fts[1]["lm_head.weight"][:3]
    with pytest.raises(ValueError, match="lm_head.weight"):
        mc.merge_in_memory(cfg, base, fts)


def test_bf16_dtype_casts_inputs_and_output(in_fixtures):
    """dtype: bfloat16 rounds the inputs on load (as mergekit does), accumulates in float32, writes bfloat16."""
    import ml_dtypes

    raw = yaml.safe_load((FIX / "configs" / "ties.yaml").read_text())
    raw["dtype"] = "bfloat16"
    cfg = mc.parse_config(raw).resolve()
    base, fts = _inputs(cfg)
    merged = mc.merge_in_memory(cfg, base, fts)
    f32 = mc.parse_config({**raw, "dtype": "float32"}).resolve()
    rounded = lambda t: {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in t.items()}  # noqa: E731
    ref = mc.merge_in_memory(f32, rounded(base), [rounded(t) for t in fts])
    for name, x in merged.items():
        assert x.dtype.name == "bfloat16"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref[name]).astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("case", ["ties", "breadcrumbs_ties"])
def test_config_on_a_mesh_matches_mergekit(case, in_fixtures, mesh8):
    """The same config on arrays sharded over 8 devices: same tensors, outputs stay sharded."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    cfg = mc.load_config(FIX / "configs" / f"{case}.yaml").resolve()
    base, fts = _inputs(cfg)

    def place(tree):
        return {k: jax.device_put(v, NamedSharding(mesh8, P("x") if v.shape and v.shape[0] % 8 == 0 else P()))
                for k, v in tree.items()}

    merged = mc.merge_in_memory(cfg, place(base), [place(t) for t in fts])
    want = _read(FIX / "outputs" / f"{case}.safetensors")
    emb = merged["model.embed_tokens.weight"]
    assert len(emb.sharding.device_set) == 8
    for name in want:
        np.testing.assert_allclose(np.asarray(merged[name]), want[name], rtol=2e-6, atol=2e-7, err_msg=name)


def test_cli_refuses_unsupported_config_in_one_line(tmp_path, capsys):
    from mergejax.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "slerp", "models": [{"model": "./a"}]}))
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slerp" in err[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_run_config_equals_in_memory_bit_for_bit(case, in_fixtures, tmp_path, monkeypatch):
    """Streaming writes merge_tensor's bits: flat chunks for coordinatewise configs; for TIES and Breadcrumbs each
    tensor over its own 32-entry chunks after its band passes; DARE tensor by tensor."""
    from mergejax import stream

    cfg = mc.load_config(FIX / "configs" / f"{case}.yaml").resolve()
    assert mc.coordinatewise(cfg) == (cfg.sparsification is None or "density1" in case)
    base, fts = _inputs(cfg)
    want = mc.merge_in_memory(cfg, None if cfg.method == "linear" else base, fts)
    engines = []
    for engine in ("_chunked_pass", "_per_tensor_pass"):
        real = getattr(stream, engine)
        monkeypatch.setattr(stream, engine, lambda *a, _real=real, _e=engine: (engines.append(_e), _real(*a))[1])
    got = _read(mc.run_config(cfg, tmp_path / "out", progress=False, chunk="128B", max_shard_size="64KB"))
    chunked = mc.coordinatewise(cfg) or mc.band_chunked(cfg)
    assert mc.band_chunked(cfg) == (cfg.method in ("ties", "breadcrumbs", "breadcrumbs_ties")
                                    and not mc.coordinatewise(cfg))
    assert engines == ["_chunked_pass" if chunked else "_per_tensor_pass"]
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.asarray(want[name]).dtype, name
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


def test_chunked_config_bf16(in_fixtures, tmp_path):
    """dtype: bfloat16 on the chunked path: inputs rounded inside the chunk program, bf16 written, as per tensor."""
    raw = yaml.safe_load((FIX / "configs" / "task_arithmetic.yaml").read_text())
    cfg = mc.parse_config({**raw, "dtype": "bfloat16"}).resolve()
    base, fts = _inputs(cfg)
    want = mc.merge_in_memory(cfg, base, fts)
    got = _read(mc.run_config(cfg, tmp_path / "out", progress=False, chunk="4KiB"))
    for name in want:
        assert got[name].dtype.name == "bfloat16", name
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize("method, params, dtype", [
    ("ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.05}], "float32"),
    ("ties", [{"weight": 1.0, "density": 0.0}, {"weight": 0.5, "density": 1.0}], "float32"),
    ("breadcrumbs", [{"weight": 1.0, "density": 0.4, "gamma": 0.1}, {"weight": 0.7, "density": 0.2, "gamma": 0.0}],
     "float32"),
    ("breadcrumbs_ties", [{"weight": 0.8, "density": 0.5, "gamma": 0.3}, {"weight": 1.0, "density": 0.9,
                                                                            "gamma": 0.2}], "bfloat16"),
], ids=["ties", "ties-density-0-and-1", "breadcrumbs", "breadcrumbs_ties-bf16"])
def test_band_chunked_tensors_equal_in_memory(tmp_path, method, params, dtype):
    """Tensors larger than one chunk stream over their own chunks after the exact band passes (many tied
    magnitudes, ranks at the band's ends), bit for bit equal to the in-memory per-tensor merge."""
    from mergejax import stream
    from mergejax.convert.io import write_sharded_safetensors

    rng = np.random.default_rng(7)
    shapes = {"a.weight": (40, 70), "b.weight": (3001,), "c.norm": (16,), "d.weight": (64, 64)}
    levels = np.float32([-3, -1, -0.5, 0, 0.25, 0.5, 2])  # heavy ties among the |delta|
    base_t = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    models = [base_t] + [{k: v + rng.choice(levels, v.shape) for k, v in base_t.items()} for _ in range(2)]
    paths = []
    for m, tensors in enumerate(models):
        write_sharded_safetensors(tmp_path / f"m{m}", tensors, max_shard_size="8KB")
        paths.append(tmp_path / f"m{m}")
    cfg = mc.parse_config({"merge_method": method, "base_model": str(paths[0]), "dtype": dtype,
                           "models": [{"model": str(p), "parameters": q} for p, q in zip(paths[1:], params)]})
    assert mc.band_chunked(cfg)
    base, fts = _inputs(cfg)
    want = mc.merge_in_memory(cfg, base, fts)
    seen = []
    real = mc.tensor_bands
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mc, "tensor_bands", lambda *a: (seen.append(a[1]), real(*a))[1])
        got = _read(mc.run_config(cfg, tmp_path / "out", progress=False, chunk="1KiB", max_shard_size="16KB"))
    assert sorted(seen) == ["a.weight", "b.weight", "d.weight"]  # c.norm fits one chunk: whole
    for name in want:
        assert got[name].dtype == np.asarray(want[name]).dtype, name
        np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
    assert not list((tmp_path / "out").glob("*.partial")) and not (tmp_path / "out" / stream.STATE_FILE).exists()
