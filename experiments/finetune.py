"""Full fine-tuning of one expert per task (optax AdamW, linear warm-up then cosine decay), cached with orbax.

Every trainable parameter is fine-tuned (encoder and the task's head); non-trainable collections such as
EfficientNet's ``batch_stats`` stay frozen. An expert is stored under ``<cache>/experts/<task>-s<seed>-<hash>`` where
the hash covers everything that determines it (backbone, task, data split, optimiser, steps, seed), so a rerun with
the same configuration loads it instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments.backbones import Backbone
from mergejax.model import load_tree, save_tree

CACHE_VERSION = 1
"""Bump when the fine-tuning code changes what it produces (invalidates cached experts)."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Optimiser settings of expert fine-tuning."""

    steps: int = 64
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    """Fraction of the steps spent in the linear warm-up."""


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over integer labels, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def optimizer(cfg: FinetuneConfig) -> optax.GradientTransformation:
    """AdamW with a linear warm-up to ``lr`` and a cosine decay to 0 over ``steps``."""
    warmup = max(1, int(cfg.warmup * cfg.steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), 0.0)
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def cache_key(**parts: Any) -> str:
    """A short stable hash of a JSON-serialisable description of an expert."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _split_trainable(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def finetune(
    backbone: Backbone,
    task: int,
    train: Mapping[str, np.ndarray],
    cfg: FinetuneConfig,
    *,
    key: jax.Array,
    progress: bool = True,
) -> Any:
    """Fine-tunes ``backbone.base`` on task ``task`` and returns the expert's variables.

    Args:
      backbone: the pretrained model and its heads.
      task: head index.
      train: encoded training set with labels ``"y"``; minibatches are drawn without replacement per epoch with
        ``key`` (the data order depends on the seed).
      cfg: optimiser settings.
      key: PRNG key for data order and dropout.
      progress: show a tqdm bar with the running loss.
    """
    opt = optimizer(cfg)
    params, frozen = _split_trainable(backbone.base)
    n = len(train["y"])
    bs = min(cfg.batch_size, n)

    def loss_fn(p, batch, k):
        logits = backbone.train_logits({"params": p, **frozen}, batch, task, k)
        return cross_entropy(logits, batch["y"])

    @jax.jit
    def step(p, state, batch, k):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch, k)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    k_order, k_drop = jax.random.split(key)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_order)).ravel().tolist())
    order = np.concatenate([rng.permutation(n) for _ in range(-(-cfg.steps * bs // n))])
    state = opt.init(params)
    bar = tqdm(range(cfg.steps), desc=f"fine-tune {backbone.tasks[task]}", disable=not progress, leave=False)
    for s in bar:
        idx = order[s * bs: (s + 1) * bs]
        batch = {k: jnp.asarray(v[idx]) for k, v in train.items()}
        params, state, loss = step(params, state, batch, jax.random.fold_in(k_drop, s))
        if progress and (s % 10 == 0 or s + 1 == cfg.steps):
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return {"params": params, **frozen}


def cached_finetune(
    backbone: Backbone,
    task: int,
    train: Mapping[str, np.ndarray],
    cfg: FinetuneConfig,
    *,
    seed: int,
    cache_dir: str | Path,
    description: Mapping[str, Any],
    progress: bool = True,
) -> tuple[Any, bool]:
    """:func:`finetune` through the orbax cache. Returns ``(expert, loaded_from_cache)``.

    Args:
      description: everything else that determines the expert (data configuration), hashed into the cache key.
    """
    name = backbone.tasks[task]
    digest = cache_key(backbone=backbone.name, task=name, seed=seed, finetune=dataclasses.asdict(cfg), **description)
    path = Path(cache_dir) / "experts" / f"{name}-s{seed}-{digest}"
    if (path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists():
        return load_tree(path, like=backbone.base), True
    expert = finetune(backbone, task, train, cfg, key=jax.random.fold_in(jax.random.key(seed), 1000 + task),
                      progress=progress)
    if path.exists():  # an interrupted save
        import shutil

        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tree(path, expert)
    return expert, False
