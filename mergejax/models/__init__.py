"""Flax models with per-task heads: a small MLP (toy problems), a BERT encoder, EfficientNet-Lite0.

Import the submodules directly (``from mergejax.models import bert``); they load pretrained PyTorch weights through
:mod:`mergejax.convert`, which needs the ``torch`` extra only for reading ``.bin``/``.pt`` files.
"""

from mergejax.models.heads import TaskHeads
from mergejax.models.mlp import HEAD_PATTERN, MultiHeadMLP, init_params, make_apply_fn

__all__ = ["TaskHeads", "MultiHeadMLP", "HEAD_PATTERN", "init_params", "make_apply_fn"]
