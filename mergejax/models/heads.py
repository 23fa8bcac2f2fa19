"""Per-task classification heads shared by the Flax models: one ``nn.Dense`` per task under ``heads/<task>``."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["TaskHeads", "check_task"]


def check_task(heads: Sequence[tuple[str, int]], task: str | None) -> None:
    """Raises ``ValueError`` when ``task`` names no head."""
    names = [name for name, _ in heads]
    if task is not None and task not in names:
        raise ValueError(f"unknown task {task!r}; heads: {names}")


class TaskHeads(nn.Module):
    """Linear heads ``((task_name, num_classes), ...)``: the named task's logits, or a dict of all when task is None."""

    heads: tuple[tuple[str, int], ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, task: str | None) -> jax.Array | dict[str, jax.Array]:
        check_task(self.heads, task)
        layers = {name: nn.Dense(n, dtype=self.dtype, name=name) for name, n in self.heads}
        if task is not None:
            return layers[task](features)
        return {name: layer(features) for name, layer in layers.items()}
