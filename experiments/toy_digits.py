"""A toy multi-task problem built from scikit-learn's 8x8 digits, for tests, examples and benchmarks.

Each task sees the digits through its own input transform (mirror, rotation, inverted ink, ...) and predicts its own
labelling of them (the digit, its parity, the digit modulo 3, ...). A shared encoder is pre-trained on the plain digits,
then fine-tuned once per task together with that task's head; the fine-tuned models are what mergejax merges.

scikit-learn is an optional dependency (``pip install mergejax[experiments]``); it is imported when a problem is built.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.models.mlp import HEAD_PATTERN, MultiHeadMLP, init_params, make_apply_fn

Batch = Mapping[str, jax.Array]


def _identity(images: np.ndarray) -> np.ndarray:
    return images


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "plain": _identity,
    "mirror": lambda im: im[:, :, ::-1],
    "flip": lambda im: im[:, ::-1, :],
    "rot90": lambda im: np.rot90(im, k=1, axes=(1, 2)),
    "transpose": lambda im: np.swapaxes(im, 1, 2),
    "invert": lambda im: 1.0 - im,
}

_LABELINGS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
    "digit": (lambda y: y, 10),
    "parity": (lambda y: y % 2, 2),
    "mod3": (lambda y: y % 3, 3),
    "ge5": (lambda y: (y >= 5).astype(y.dtype), 2),
    "loop": (lambda y: np.isin(y, [0, 6, 8, 9]).astype(y.dtype), 2),
}

DEFAULT_TASKS: tuple[str, ...] = ("mirror/digit", "rot90/digit", "invert/digit", "transpose/mod3")
"""Task specs ``"<input transform>/<labelling>"`` of the default toy problem."""


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's train and test split: inputs ``[n, 64]`` in [0, 1] (float32) and int32 labels."""

    name: str
    num_classes: int
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ToyProblem:
    """A pre-trained base, one fine-tuned model per task, and the data.

    Attributes:
        model: the :class:`MultiHeadMLP` (head ``t`` belongs to task ``t``).
        apply_fn: ``apply_fn(params, batch, task) -> logits`` (the mergejax model contract).
        base: variables of the pre-trained model (encoder pre-trained, heads freshly initialised).
        finetuned: one variables tree per task, encoder and that task's head fine-tuned.
        tasks: the data of every task.
        heads: regular expression over leaf paths naming the per-task heads.
    """

    model: MultiHeadMLP
    apply_fn: Callable[[Any, Any, int], jax.Array]
    base: Any
    finetuned: tuple[Any, ...]
    tasks: tuple[TaskData, ...]
    heads: str = HEAD_PATTERN


def digits_tasks(specs: Sequence[str] = DEFAULT_TASKS, *, test_fraction: float = 1 / 3, seed: int = 0) -> tuple[TaskData, ...]:
    """Build one task per spec ``"<transform>/<labelling>"`` from scikit-learn's digits (1797 images of 8x8).

    Every task uses the same train/test split of the images (drawn with ``seed``) so that tasks differ only in how the
    images are transformed and labelled. Transforms: plain, mirror, flip, rot90, transpose, invert. Labellings: digit
    (10 classes), parity, mod3, ge5, loop (digit has a closed loop).

    Raises:
        ValueError: for an unknown transform or labelling.
    """
    from sklearn.datasets import load_digits  # optional dependency

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    out = []
    for spec in specs:
        transform_name, _, labeling_name = spec.partition("/")
        if transform_name not in _TRANSFORMS or labeling_name not in _LABELINGS:
            raise ValueError(
                f"unknown task spec {spec!r}: transforms are {sorted(_TRANSFORMS)}, labellings are {sorted(_LABELINGS)}"
            )
        x = np.ascontiguousarray(_TRANSFORMS[transform_name](images)).reshape(len(labels), -1).astype(np.float32)
        label_fn, num_classes = _LABELINGS[labeling_name]
        y = label_fn(labels).astype(np.int32)
        out.append(
            TaskData(
                name=spec,
                num_classes=num_classes,
                train={"x": x[train_idx], "y": y[train_idx]},
                test={"x": x[test_idx], "y": y[test_idx]},
            )
        )
    return tuple(out)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels, computed in float32."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=64)
def _trainer(
    apply_fn: Callable[[Any, Any, int], jax.Array], task: int, steps: int, lr: float, batch_size: int
) -> Callable[..., Any]:
    """A jitted function running every Adam step of :func:`train` in one ``fori_loop`` (one dispatch, one compile)."""
    opt = optax.adam(lr)

    def loss_fn(p: Any, batch: Batch) -> jax.Array:
        return cross_entropy(apply_fn(p, batch, task), batch["y"])

    @jax.jit
    def run(params: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
        def body(i, carry):
            p, state = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, x.shape[0])
            grads = jax.grad(loss_fn)(p, {"x": x[idx], "y": y[idx]})
            updates, state = opt.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
        return params

    return run


def train(
    apply_fn: Callable[[Any, Any, int], jax.Array],
    params: Any,
    data: Mapping[str, np.ndarray],
    task: int,
    *,
    key: jax.Array,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> Any:
    """Train every leaf of ``params`` on ``data`` through task ``task``'s logits with Adam and cross-entropy.

    Used both to pre-train the base and to fine-tune it per task. All steps run in one jitted ``fori_loop``.

    Args:
        apply_fn: model contract ``apply_fn(params, batch, task) -> logits`` (hashable; reused across calls).
        params: the starting variables.
        data: ``{"x": [n, ...], "y": [n]}`` training set; minibatches are drawn with replacement with ``key``.
        task: the task (head) index passed to ``apply_fn``.
        key: PRNG key for minibatch sampling.
        steps: number of Adam steps.
        lr: Adam learning rate.
        batch_size: examples per step.

    Returns:
        The trained variables.
    """
    run = _trainer(apply_fn, int(task), int(steps), float(lr), int(batch_size))
    return run(params, jnp.asarray(data["x"]), jnp.asarray(data["y"]), key)


def accuracy(apply_fn: Callable[[Any, Any, int], jax.Array], params: Any, data: Mapping[str, np.ndarray], task: int) -> float:
    """Fraction of ``data`` that task ``task``'s head classifies correctly."""
    logits = jax.jit(apply_fn, static_argnums=2)(params, {"x": jnp.asarray(data["x"])}, task)
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(data["y"])))


def build_toy_problem(
    specs: Sequence[str] = DEFAULT_TASKS,
    *,
    hidden: Sequence[int] = (64, 64),
    pretrain_steps: int = 300,
    finetune_steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
) -> ToyProblem:
    """Pre-train an encoder on the plain digits, then fine-tune it once per task.

    The base model's encoder comes from a separate pre-training head on ``plain/digit``; its task heads are freshly
    initialised (the same initial heads in every fine-tuned model). Fine-tuning trains the encoder and task ``t``'s head;
    the other heads of model ``t`` stay as in the base. Every training run is one jitted ``fori_loop``.

    Args:
        specs: task specs, see :func:`digits_tasks`.
        hidden: encoder widths.
        pretrain_steps: Adam steps of pre-training.
        finetune_steps: Adam steps of each fine-tuning.
        lr: Adam learning rate of both.
        seed: seeds the data split, the initialisation and the minibatches.

    Returns:
        A :class:`ToyProblem`.
    """
    tasks = digits_tasks(specs, seed=seed)
    key = jax.random.key(seed)
    k_pre_init, k_pre, k_init, k_ft = jax.random.split(key, 4)
    num_features = tasks[0].train["x"].shape[1]

    pretrain_model = MultiHeadMLP(hidden=tuple(hidden), num_classes=(10,))
    pre = digits_tasks(("plain/digit",), seed=seed)[0]
    pre_params = init_params(pretrain_model, k_pre_init, num_features)
    pre_params = train(make_apply_fn(pretrain_model), pre_params, pre.train, 0, key=k_pre, steps=pretrain_steps, lr=lr)

    model = MultiHeadMLP(hidden=tuple(hidden), num_classes=tuple(t.num_classes for t in tasks))
    apply_fn = make_apply_fn(model)
    base = init_params(model, k_init, num_features)
    base = {"params": {**base["params"], **{k: v for k, v in pre_params["params"].items() if k.startswith("encoder_")}}}
    finetuned = tuple(
        train(apply_fn, base, task.train, t, key=k, steps=finetune_steps, lr=lr)
        for t, (task, k) in enumerate(zip(tasks, jax.random.split(k_ft, len(tasks))))
    )
    return ToyProblem(model=model, apply_fn=apply_fn, base=base, finetuned=finetuned, tasks=tasks)
