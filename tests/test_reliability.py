"""Issue 13: the CLI never destroys data, never writes a silent wrong result, and fails with one clear line.

CLI behaviour is tested through ``python -m mergejax`` subprocesses where the process matters (exit status, SIGKILL,
stderr, the compile cache) and through ``mergejax.cli.main`` (the same code path, in-process) elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import cli, fsutil, ternary
from mergejax.cli import main
from mergejax.model import CHECKSUM_FILE, CheckpointError, load_tree, save_tree
from mergejax.precision import PrecisionWarning, warn_float16_overflow, warn_float64

REPO = Path(__file__).resolve().parents[1]


def _tree(seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"dense": {"kernel": rng.normal(size=(16, 8)).astype(dtype),
                                 "bias": rng.normal(size=(8,)).astype(dtype)}}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    trees = {name: _tree(i) for i, name in enumerate(("base", "a", "b", "c"))}
    for name, tree in trees.items():
        save_tree(root / name, tree)
    return root, trees


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mergejax_cache")


def _cli(args, cache_dir, *, kill_at=None, check=False):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "MERGEJAX_CACHE": str(cache_dir)}
    env.pop(fsutil._KILL_ENV, None)
    env.pop("MERGEJAX_COMPILE_CACHE", None)  # the CLI as users run it: with its compile cache
    if kill_at:
        env[fsutil._KILL_ENV] = kill_at
    proc = subprocess.run([sys.executable, "-m", "mergejax", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    return lines[0]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    return err


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ output policy
def test_output_policy_refuses_overlap_existing_and_foreign_outputs(tmp_path):
    inp = tmp_path / "in" / "model"
    save_tree(inp, _tree(0))
    for out, rel in ((inp, "is"), (tmp_path / "in", "contains"), (tmp_path, "contains"), (inp / "sub", "is inside")):
        with pytest.raises(fsutil.OutputError, match=f" {rel} the input"):
            fsutil.check_output(out, [inp], force=True)
    with pytest.raises(fsutil.OutputError, match="already exists; pass --force"):
        fsutil.check_output(inp, [], force=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(fsutil.OutputError, match="not a checkpoint"):
        fsutil.check_output(tmp_path / "notes", [inp], force=True)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(fsutil.OutputError, match="is a file"):
        fsutil.check_output(tmp_path / "file.txt", [inp], force=True)
    hf = tmp_path / "hf_model"  # a Hugging Face folder: weights plus files no mergejax command writes
    hf.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (hf / name).write_text("{}")
    with pytest.raises(fsutil.OutputError, match="not a checkpoint"):
        fsutil.check_output(hf, [inp], force=True)
    (hf / "tokenizer.json").unlink()
    assert fsutil.check_output(hf, [inp], force=True) == hf.resolve()  # what convert --from jax writes
    (tmp_path / "empty").mkdir()
    assert fsutil.check_output(tmp_path / "empty", [inp], force=True) == (tmp_path / "empty").resolve()
    assert fsutil.check_output(inp, [tmp_path / "elsewhere"], force=True) == inp.resolve()
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_recover_restores_orphaned_old_version_and_cleans_only_its_own_temporaries(tmp_path):
    out = tmp_path / "merged"
    save_tree(out, _tree(1))
    old = tmp_path / ".merged.old-abc"
    out.rename(old)  # killed between the two renames: only the old version, aside
    (tmp_path / ".merged.saving-abc").mkdir()  # the complete-but-unswapped new one
    (tmp_path / ".merged.saving-def.orbax-checkpoint-tmp-17").mkdir()  # orbax's own temporary inside ours
    (tmp_path / "merged.orbax-checkpoint-tmp-3").mkdir()
    keep = [tmp_path / ".merged-notes", tmp_path / ".other.saving-abc", tmp_path / "merged2"]
    for k in keep:
        k.mkdir()
    assert _same(load_tree(out), _tree(1))  # a reader puts the old version back
    assert fsutil.leftovers(out) == []
    assert all(k.exists() for k in keep)


def test_atomic_dir_keeps_the_old_version_when_the_writer_fails(tmp_path):
    out = tmp_path / "ck"
    save_tree(out, _tree(1))
    before = _snapshot(out)
    with pytest.raises(RuntimeError, match="disk full"):
        with fsutil.atomic_dir(out) as tmp:
            tmp.mkdir()
            (tmp / "half").write_text("x")
            raise RuntimeError("disk full (simulated)")
    assert _snapshot(out) == before and fsutil.leftovers(out) == []
    with pytest.raises(fsutil.OutputError, match="--force"):
        save_tree(out, _tree(2))
    save_tree(out, _tree(2), force=True)
    assert _same(load_tree(out), _tree(2)) and fsutil.leftovers(out) == []


def test_cli_refuses_to_clobber_through_every_command(ckpts, tmp_path, cache_dir, capsys):
    root, _ = ckpts
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8 not a checkpoint")
    inputs_before = {n: _snapshot(root / n) for n in ("base", "a", "b")}
    compress = ["compress", "--base", root / "base", "--finetuned", root / "a", "--out"]
    line = _error_line(_cli(compress + [unrelated], cache_dir))
    assert "already exists; pass --force" in line and str(unrelated.resolve()) in line
    # compress --force over an unrelated folder, over its own input, over the parent of all inputs
    for out, message in ((unrelated, "not a checkpoint"), (root / "a", "is the input"), (root, "contains the input")):
        assert main([str(a) for a in compress + [out, "--force"]]) == 2
        assert message in _err(capsys)
    # merge --force onto the parent of its inputs; an existing --out without --force names the fix
    line = _error_line(_cli(["merge", "--method", "ties", "--base", root / "base", "--finetuned", root / "a",
                             root / "b", "--out", root, "--force"], cache_dir))
    assert "contains the input" in line
    merged = tmp_path / "merged"
    _cli(["merge", "--method", "average", "--finetuned", root / "a", root / "b", "--out", merged], cache_dir,
         check=True)
    assert main(["merge", "--method", "average", "--finetuned", str(root / "a"), "--out", str(merged)]) == 2
    assert "already exists; pass --force" in _err(capsys)
    # convert --from jax onto the parent of its source
    assert main(["convert", "--from", "jax", "--arch", "generic", str(merged), str(tmp_path), "--force"]) == 2
    assert "contains the input" in _err(capsys)
    assert (unrelated / "cat.jpg").read_bytes() == b"\xff\xd8 not a checkpoint"
    assert {n: _snapshot(root / n) for n in ("base", "a", "b")} == inputs_before
    assert _same(load_tree(merged), mj.average([_tree(1), _tree(2)]))
    assert any(p.is_file() for p in cache_dir.rglob("*")), "the persistent compilation cache was not written"


def test_ternary_save_refuses_foreign_directories_and_load_recovers_a_killed_swap(tmp_path):
    ttv = ternary.compress(mj.task_vector(_tree(1), _tree(0)), density=0.25)
    save_tree(tmp_path / "dense", _tree(0))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("keep")
    for target in (tmp_path / "dense", tmp_path / "docs"):
        with pytest.raises(ternary.TernaryCheckpointError, match="not a ternary checkpoint"):
            ternary.save(target, ttv)
    assert (tmp_path / "docs" / "a.txt").read_text() == "keep" and (tmp_path / "dense" / CHECKSUM_FILE).is_file()
    ternary.save(tmp_path / "t", ttv)
    ternary.save(tmp_path / "t", ttv)  # replacing a ternary checkpoint is fine
    (tmp_path / "t").rename(tmp_path / ".t.old-0123")
    back = ternary.load(tmp_path / "t")
    np.testing.assert_array_equal(back.decompress()["params"]["dense"]["kernel"],
                                  ttv.decompress()["params"]["dense"]["kernel"])
    assert (tmp_path / "t").is_dir() and fsutil.leftovers(tmp_path / "t") == []


# ------------------------------------------------------------------------------------------------------ SIGKILL
@pytest.mark.parametrize("point", ["written", "moved_old", "swapped"])
def test_sigkilled_merge_force_leaves_a_complete_version(ckpts, tmp_path, cache_dir, point):
    root, trees = ckpts
    out = tmp_path / "merged"
    old = mj.average([trees["a"], trees["b"]])
    save_tree(out, old)
    args = ["merge", "--method", "task_arithmetic", "--base", root / "base", "--finetuned", root / "a", root / "c",
            "--out", out, "--force", "--scale", "0.5"]
    new = mj.task_arithmetic(trees["base"], [trees["a"], trees["c"]], scale=0.5)
    proc = _cli(args, cache_dir, kill_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    got = load_tree(out)  # verifies the checksums: a complete version, old or new
    assert _same(got, new) if point == "swapped" else _same(got, old)
    assert main([str(a) for a in args]) == 0  # the next run
    assert _same(load_tree(out), new)
    assert fsutil.leftovers(out) == [] and sorted(os.listdir(tmp_path)) == ["merged"]


@pytest.mark.parametrize("point", ["written", "moved_old"])
def test_sigkilled_compress_leaves_a_complete_version(ckpts, tmp_path, cache_dir, point):
    root, trees = ckpts
    out = tmp_path / "a_t"
    old = ternary.compress(mj.task_vector(trees["b"], trees["base"]), density=0.25)
    ternary.save(out, old)
    args = ["compress", "--base", root / "base", "--finetuned", root / "a", "--out", out, "--density", "0.25",
            "--force"]
    proc = _cli(args, cache_dir, kill_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    np.testing.assert_array_equal(ternary.load(out).to_task_vector()["params"]["dense"]["kernel"],
                                  old.to_task_vector()["params"]["dense"]["kernel"])
    assert main([str(a) for a in args]) == 0
    want = ternary.compress(mj.task_vector(trees["a"], trees["base"]), density=0.25)
    np.testing.assert_array_equal(ternary.load(out).to_task_vector()["params"]["dense"]["kernel"],
                                  want.to_task_vector()["params"]["dense"]["kernel"])
    assert fsutil.leftovers(out) == [] and sorted(os.listdir(tmp_path)) == ["a_t"]


# ---------------------------------------------------------------------------------------------- hyperparameters
def test_cli_hyperparameters_are_validated(ckpts, tmp_path, capsys):
    root, _ = ckpts
    common = ["--base", str(root / "base"), "--finetuned", str(root / "a"), str(root / "b"), "--out",
              str(tmp_path / "m")]
    cases = [
        (["--method", "ties", "--scale", "nan"], "--scale nan is not a finite number"),
        (["--method", "task_arithmetic", "--scale", "inf"], "--scale inf is not a finite number"),
        (["--method", "ties", "--seed", "3"], "does not take: --seed"),
        (["--method", "dare", "--density", "0.3"], "--density has no effect with --method dare --combine"),
        (["--method", "dare", "--scope", "tensor"], "--scope has no effect"),
        (["--method", "breadcrumbs", "--density", "0.3"], "does not take: --density"),
    ]
    for extra, message in cases:
        assert main(["merge", *extra, *common]) == 2, extra
        assert message in _err(capsys)
    assert main(["merge", "--method", "average", "--finetuned", str(root / "a"), "--out", str(tmp_path / "m"),
                 "--base", str(root / "base")]) == 2
    assert "average does not take --base" in _err(capsys)
    assert not (tmp_path / "m").exists()


def test_cli_flags_come_from_the_method_signatures(ckpts, tmp_path, monkeypatch, capsys):
    import inspect

    for method in cli.METHODS:
        want = {n for n, p in inspect.signature(getattr(mj, method)).parameters.items()
                if p.kind is p.KEYWORD_ONLY and n not in ("check_finite", "key")}
        assert set(cli.method_options(method)) == want
    seen, original = {}, mj.task_arithmetic

    def weighted(base, finetuned, *, weights=None, heads=None, scale: float = 1.0, check_finite: bool = True):
        seen.update(weights=weights, heads=heads, scale=scale)
        return original(base, finetuned, scale=scale)

    monkeypatch.setattr(mj, "task_arithmetic", weighted)
    help_text = cli.merge_parser().format_help()
    assert "--weights" in help_text and "--heads" in help_text
    root, trees = ckpts
    args = ["merge", "--method", "task_arithmetic", "--base", str(root / "base"), "--finetuned", str(root / "a"),
            str(root / "b"), "--out", str(tmp_path / "w")]
    assert main(args + ["--weights", "0.3", "0.7", "--heads", "bias$"]) == 0
    assert seen == {"weights": (0.3, 0.7), "heads": "bias$", "scale": 1.0}
    assert main(args + ["--weights", "0.3", "--force"]) == 2
    assert "--weights has 1 values for 2 --finetuned" in capsys.readouterr().err
    assert main(args + ["--weights", "0.3", "nan", "--force"]) == 2
    assert "--weights nan is not a finite number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ encoded
def test_ternary_checkpoints_are_rejected_where_they_cannot_be_used(ckpts, tmp_path, cache_dir, capsys):
    root, _ = ckpts
    ternary_a = tmp_path / "a_t"
    assert main(["compress", "--base", str(root / "base"), "--finetuned", str(root / "a"), "--out",
                 str(ternary_a)]) == 0
    capsys.readouterr()
    line = _error_line(_cli(["merge", "--method", "average", "--finetuned", root / "b", ternary_a, "--out",
                             tmp_path / "avg"], cache_dir))
    assert "is a ternary task vector" in line and str(ternary_a) in line
    assert not (tmp_path / "avg").exists()
    assert main(["merge", "--method", "ties", "--base", str(ternary_a), "--finetuned", str(root / "a"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "--base" in _err(capsys)
    assert main(["compress", "--base", str(root / "base"), "--finetuned", str(ternary_a), "--out",
                 str(tmp_path / "y")]) == 2
    assert "already a ternary task vector" in _err(capsys)
    # a merge that takes ternary vectors writes a dense model: the base's leaves, no uint32 bitmaps
    assert main(["merge", "--method", "task_arithmetic", "--base", str(root / "base"), "--finetuned",
                 str(ternary_a), str(root / "b"), "--out", str(tmp_path / "ta")]) == 0
    out = load_tree(tmp_path / "ta")
    assert jax.tree.structure(out) == jax.tree.structure(_tree(0))
    assert {np.asarray(x).dtype for x in jax.tree.leaves(out)} == {np.dtype(np.float32)}


# --------------------------------------------------------------------------------------------------- checksums
def test_dense_checkpoints_carry_checksums_verified_on_load(tmp_path, capsys):
    save_tree(tmp_path / "ck", _tree(3))
    sums = json.loads((tmp_path / "ck" / CHECKSUM_FILE).read_text())["leaves"]
    assert set(sums) == {"params/dense/kernel", "params/dense/bias"}
    assert _same(load_tree(tmp_path / "ck"), _tree(3))
    sums["params/dense/bias"]["crc32"] ^= 1  # the stored sum disagrees with the bytes
    (tmp_path / "ck" / CHECKSUM_FILE).write_text(json.dumps({"format": "mergejax.checksums", "leaves": sums}))
    with pytest.raises(CheckpointError, match="'params/dense/bias'.*fails its checksum"):
        load_tree(tmp_path / "ck")
    assert _same(load_tree(tmp_path / "ck", verify=False), _tree(3))
    # one flipped bit in the stored array data: caught, and the CLI says so in one line
    save_tree(tmp_path / "flip", _tree(3))
    kernel = _tree(3)["params"]["dense"]["kernel"].tobytes()
    data = [p for p in (tmp_path / "flip").rglob("*") if p.is_file() and kernel in p.read_bytes()]
    assert data, "the kernel's bytes are stored uncompressed"
    for file in data:  # orbax may keep a process-local copy beside the merged one: flip the same bit in each
        raw = bytearray(file.read_bytes())
        raw[raw.index(kernel) + 37] ^= 0x10  # one bit of one float
        file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_tree(tmp_path / "flip")
    assert main(["merge", "--method", "average", "--finetuned", str(tmp_path / "flip"), "--out",
                 str(tmp_path / "m")]) == 2
    assert str(tmp_path / "flip") in _err(capsys)


def test_truncated_dense_checkpoint_is_one_short_line(tmp_path, ckpts, cache_dir):
    root, _ = ckpts
    save_tree(tmp_path / "cut", _tree(4))
    kernel = _tree(4)["params"]["dense"]["kernel"].tobytes()
    data = [p for p in (tmp_path / "cut").rglob("*") if p.is_file() and kernel in p.read_bytes()]
    assert data
    for file in data:  # cut every stored copy inside the kernel's bytes
        with open(file, "r+b") as f:
            f.truncate(file.read_bytes().index(kernel) + len(kernel) // 2)
    line = _error_line(_cli(["merge", "--method", "ties", "--base", root / "base", "--finetuned", tmp_path / "cut",
                             "--out", tmp_path / "m"], cache_dir))
    assert "truncated" in line and str(tmp_path / "cut") in line and len(line) < 700
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------------- errors
def test_library_errors_name_what_differs():
    a = {"p": {"w": jnp.ones(2), "b": (jnp.ones(1), jnp.ones(1))}}
    as_list = {"p": {"w": jnp.ones(2), "b": [jnp.ones(1), jnp.ones(1)]}}
    with pytest.raises(ValueError, match="containers differ at 'p/b': tuple vs list"):
        mj.task_arithmetic(a, [as_list])
    from flax.core import FrozenDict

    with pytest.raises(ValueError, match="containers differ at 'p': dict vs FrozenDict"):
        mj.ties(a, [{"p": FrozenDict(a["p"])}])
    for call in (lambda: mj.task_arithmetic(a, {"x": a, "y": a}), lambda: mj.average({"x": a, "y": a})):
        with pytest.raises((TypeError, ValueError), match="list of models") as info:
            call()
        assert "<root>" not in str(info.value)
    with pytest.raises(ValueError, match="NaN or Inf in leaf 'params/b'"):
        ternary.compress({"params": {"a": jnp.ones(4), "b": jnp.array([1.0, jnp.nan, 0.0, 0.0])}}, density=0.5)


def test_convert_errors_are_one_line(tmp_path, capsys):
    from mergejax.convert.cli import main as convert_main

    (tmp_path / "junk.bin").write_bytes(b"this is not a pickle" * 10)
    assert convert_main(["--from", "torch", "--arch", "generic", str(tmp_path / "junk.bin"),
                         str(tmp_path / "out")]) == 2
    err = _err(capsys)
    assert "junk.bin" in err and "cannot load it as a torch state dict" in err
    (tmp_path / "empty").mkdir()
    assert convert_main(["--from", "torch", "--arch", "generic", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "empty" in _err(capsys)
    assert convert_main(["--from", "jax", "--arch", "generic", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(ckpts, tmp_path):
    root, _ = ckpts
    with pytest.raises(cli.CliError, match="not a finite number"):
        main(["merge", "--method", "ties", "--base", str(root / "base"), "--finetuned", str(root / "a"), "--out",
              str(tmp_path / "m"), "--scale", "nan", "--debug"])


# ----------------------------------------------------------------------------------------------------- precision
def test_float64_leaves_warn_once_naming_them(tmp_path, capsys):
    tree = {"w": np.arange(3, dtype=np.float64) + 1e-10, "v": np.ones(2, np.float32), "u": np.zeros(1, np.float64)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_float64(tree, what="model") is not jax.config.jax_enable_x64
    if jax.config.jax_enable_x64:
        return
    assert len(caught) == 1 and issubclass(caught[0].category, PrecisionWarning)
    assert "'u'" in str(caught[0].message) and "'w'" in str(caught[0].message) and "'v'" not in str(caught[0].message)
    for name, seed in (("base", 0), ("a", 1)):
        save_tree(tmp_path / name, {k: np.asarray(v) + seed for k, v in tree.items()})
    assert main(["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--finetuned",
                 str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "float64" in err and "'w'" in err


def test_float16_overflow_warns(tmp_path, capsys):
    base = {"w": np.array([60000.0, 1.0], np.float16)}
    ft = {"w": np.array([65000.0, 2.0], np.float16)}
    merged = mj.task_arithmetic(base, [ft], scale=3.0)  # 60000 + 3 * 5000 > 65504
    with pytest.warns(PrecisionWarning, match="'w' overflowed"):
        assert warn_float16_overflow(merged)
    assert not warn_float16_overflow(mj.task_arithmetic(base, [ft], scale=0.1))
    save_tree(tmp_path / "base", base)
    save_tree(tmp_path / "ft", ft)
    assert main(["merge", "--method", "task_arithmetic", "--base", str(tmp_path / "base"), "--finetuned",
                 str(tmp_path / "ft"), "--out", str(tmp_path / "m"), "--scale", "3"]) == 0
    assert "overflowed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ conversion vs config.json
_TINY_BERT = {"vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 16, "max_position_embeddings": 16, "type_vocab_size": 2, "model_type": "bert"}


@pytest.fixture(scope="module")
def tiny_bert_state():
    from mergejax import convert as C
    from mergejax.models.bert import BertConfig, BertModel

    model = BertModel(BertConfig.from_hf(_TINY_BERT))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    rng = np.random.default_rng(0)  # random values: the test is about names and shapes, not about init
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    return C.flax_to_state_dict(variables, "bert")


def _write_bert(directory: Path, state: dict, config: dict) -> Path:
    from mergejax import convert as C

    directory.mkdir()
    C.write_safetensors(directory / "model.safetensors", state)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_conversion_checks_the_checkpoint_against_config_json(tmp_path, tiny_bert_state, capsys):
    from mergejax import convert as C
    from mergejax.models.bert import load_bert

    good = _write_bert(tmp_path / "good", tiny_bert_state, _TINY_BERT)
    config, variables = load_bert(good)
    assert config.hidden_size == 8 and "pooler" in variables["params"]
    bad_state = dict(tiny_bert_state)
    del bad_state["encoder.layer.0.output.dense.bias"]  # missing
    bad_state["pooler.dense.weight"] = np.zeros((8, 7), np.float32)  # wrong shape
    bad_state["encoder.layer.1.attention.self.query.weight"] = np.zeros((8, 8), np.float32)  # a layer too many
    bad = _write_bert(tmp_path / "bad", bad_state, _TINY_BERT)
    wants = ("missing keys [1]: params/encoder/layer_0/output/bias", "pooler.dense.weight -> params/pooler/kernel",
             "encoder.layer.1.attention.self.query.weight")
    assert main(["convert", "--from", "torch", "--arch", "bert", str(bad), str(tmp_path / "out")]) == 2
    err = _err(capsys)
    assert all(w in err for w in wants), err
    assert "shape mismatches [1]" in err and "source (7, 8) vs expected (8, 8)" in err and "in the target) [1]" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(C.ConversionError) as info:
        load_bert(bad)
    assert all(w in str(info.value) for w in wants)
    with pytest.warns(UserWarning, match="strict=False, going on"):
        _, partial = load_bert(bad, strict=False)
    assert "bias" not in partial["params"]["encoder"]["layer_0"]["output"] and "kernel" not in partial["params"]["pooler"]
    # BertFor* layout: the classifier head must have config.json's num_labels rows
    prefixed = {("bert." + k): v for k, v in tiny_bert_state.items()}
    prefixed["classifier.weight"] = np.zeros((2, 8), np.float32)
    prefixed["classifier.bias"] = np.zeros((2,), np.float32)
    clf = _write_bert(tmp_path / "clf", prefixed, {**_TINY_BERT, "num_labels": 3})
    assert main(["convert", "--from", "torch", "--arch", "bert", str(clf), str(tmp_path / "out")]) == 2
    err = _err(capsys)
    assert "classifier.weight -> params/heads/classifier/kernel: source (8, 2) vs expected (8, 3)" in err, err
    assert main(["convert", "--from", "torch", "--arch", "bert", str(good), str(tmp_path / "out")]) == 0
    assert _same(load_tree(tmp_path / "out"), variables)
