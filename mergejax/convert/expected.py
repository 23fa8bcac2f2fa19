"""The variable tree a known architecture expects, built from its ``config.json`` with ``jax.eval_shape``.

:func:`torch_to_flax` compares a checkpoint against it and reports missing, unexpected and wrong-shape tensors
together, before any tensor is read (``target=`` accepts the callable :func:`expected_for` returns). No parameter is
materialised: ``jax.eval_shape`` of the Flax model's ``init`` only traces it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["KNOWN_ARCHS", "find_config", "expected_variables", "expected_for"]

KNOWN_ARCHS = ("bert", "efficientnet_lite0")


def find_config(source: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` beside a checkpoint (in the directory, or next to the file), or None."""
    p = Path(source)
    path = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable config.json ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config.json is not a JSON object")
    return config


def _num_labels(config: Mapping[str, Any], default: int) -> int:
    if "num_labels" in config:
        return int(config["num_labels"])
    if isinstance(config.get("id2label"), Mapping):
        return len(config["id2label"])
    return int(config.get("num_classes", default))


def _bert(keys: Sequence[str], config: Mapping[str, Any]) -> dict[str, Any]:
    from mergejax.models.bert import BertConfig, BertModel

    cfg = BertConfig.from_hf(dict(config))
    prefixed = any(k.startswith("bert.") for k in keys)
    pooler = any(k.startswith(("pooler.", "bert.pooler.")) for k in keys)
    encoder = jax.eval_shape(BertModel(cfg, add_pooler=pooler).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    if not prefixed:
        return dict(encoder)
    params: dict[str, Any] = {"bert": encoder["params"]}
    if any(k.startswith("classifier.") for k in keys):
        import flax.linen as nn

        head = jax.eval_shape(nn.Dense(_num_labels(config, 2)).init, jax.random.key(0),
                              jnp.zeros((1, cfg.hidden_size), jnp.float32))
        params["heads"] = {"classifier": head["params"]}
    return {"params": params}


def _efficientnet_lite0(keys: Sequence[str], config: Mapping[str, Any]) -> dict[str, Any]:
    del keys
    from mergejax.models.efficientnet import efficientnet_lite0

    model = efficientnet_lite0((("imagenet", _num_labels(config, 1000)),))
    return dict(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)))


_BUILDERS: dict[str, Callable[[Sequence[str], Mapping[str, Any]], dict[str, Any]]] = {
    "bert": _bert,
    "efficientnet_lite0": _efficientnet_lite0,
}


def expected_variables(arch: str, keys: Sequence[str], config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``jax.ShapeDtypeStruct`` variables tree that ``arch`` expects for a checkpoint with these ``keys``.

    Args:
      arch: a rule-set name; only :data:`KNOWN_ARCHS` have a model (others give None).
      keys: the checkpoint's tensor names (they choose between layouts: bare ``BertModel`` or ``BertFor*``, with or
        without the pooler and the ``classifier`` head).
      config: the parsed ``config.json``; BERT needs it (None gives None), EfficientNet-Lite0 reads only
        ``num_labels`` / ``num_classes`` from it (default 1000).

    Returns:
      The expected tree, or None when it cannot be known.
    """
    if arch not in _BUILDERS or (arch == "bert" and config is None):
        return None
    return _BUILDERS[arch](keys, config or {})


def expected_for(arch: str, source: str | os.PathLike[str] | None) -> Callable[[Sequence[str]], Any] | None:
    """A ``target=`` for :func:`~mergejax.convert.torch_to_flax`: keys -> expected tree, from the source's config."""
    if arch not in _BUILDERS:
        return None
    config = find_config(source) if source is not None else None
    if arch == "bert" and config is None:
        return None
    return lambda keys: expected_variables(arch, keys, config)
