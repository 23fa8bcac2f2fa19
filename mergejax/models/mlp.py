"""A small Flax MLP encoder with one classification head per task.

The smallest model that exercises mergejax's data-informed methods (Fisher merging, RegMean, AdaMerging): a shared
encoder of ``nn.Dense`` layers, and per-task ``nn.Dense`` heads that stay per task when models are merged. Parameter
paths (``mergejax.tree.path_str``) are ``params/encoder_0/kernel`` ... for the encoder and ``params/head_3/bias`` ... for
the heads, so :data:`HEAD_PATTERN` selects the heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEAD_PATTERN = r"(^|/)head_\d+/"
"""Regular expression over ``path_str`` paths that matches every head leaf of :class:`MultiHeadMLP`."""


class MultiHeadMLP(nn.Module):
    """Shared ReLU MLP encoder followed by one linear head per task.

    Attributes:
        hidden: widths of the encoder's Dense layers (each followed by ReLU).
        num_classes: number of classes of each task's head; its length is the number of tasks.
    """

    hidden: Sequence[int]
    num_classes: Sequence[int]

    def setup(self) -> None:
        self.encoder = [nn.Dense(width, name=f"encoder_{i}") for i, width in enumerate(self.hidden)]
        self.heads = [nn.Dense(c, name=f"head_{t}") for t, c in enumerate(self.num_classes)]

    def encode(self, x: jax.Array) -> jax.Array:
        """Features of the shared encoder for inputs ``x`` of shape ``[batch, features]``."""
        h = x
        for layer in self.encoder:
            h = nn.relu(layer(h))
        return h

    def __call__(self, x: jax.Array, task: int | None = None) -> jax.Array | tuple[jax.Array, ...]:
        """Logits of task ``task`` (a Python int), or a tuple of every head's logits when ``task`` is None."""
        h = self.encode(x)
        if task is None:
            return tuple(head(h) for head in self.heads)
        return self.heads[task](h)


def init_params(model: MultiHeadMLP, key: jax.Array, num_features: int) -> dict[str, Any]:
    """Initialise every encoder layer and every head of ``model`` for inputs with ``num_features`` features."""
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, num_features), jnp.float32), None))(key)


def inputs_of(batch: Mapping[str, jax.Array] | Sequence[jax.Array]) -> jax.Array:
    """The inputs of a batch: ``batch["x"]`` for a dict, ``batch[0]`` for a tuple."""
    if isinstance(batch, Mapping):
        return batch["x"]
    return batch[0]


def make_apply_fn(model: nn.Module) -> Callable[[Any, Any, int], jax.Array]:
    """The mergejax model contract for a linen module called as ``model.apply(params, x, task)``.

    Returns:
        ``apply_fn(params, batch, task) -> logits`` where ``batch`` is ``{"x": ..., "y": ...}`` or ``(x, y)``.
    """

    def apply_fn(params: Any, batch: Any, task: int) -> jax.Array:
        return model.apply(params, inputs_of(batch), task)

    return apply_fn
