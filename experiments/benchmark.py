"""The multi-task merging benchmark on real pretrained models (issue 9), end to end and offline.

For each seed: fine-tune one expert per task from the pretrained backbone (cached), merge the experts with every
method of mergejax (hyperparameters picked on the validation split from small grids), and evaluate every model on
every task's test split with each task's own expert head. Then the protocols (first seed): normalised accuracy against
the number of merged tasks, held-out linear probes, accuracy against density and bits per parameter.

Run ``python -m experiments.benchmark --quick`` (``make demo``) or ``python -m experiments.benchmark --suite text``
(the reference configuration); ``--help`` lists every override. Outputs under ``--out`` (default
``results/<suite>``; the committed reference results live in ``experiments/results/<suite>``): ``summary.json``
(issue 9's format), ``details.json`` (chosen hyperparameters per seed, validation scores, protocols, wall times),
``table.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import mergejax as mj
from mergejax import fisher as mj_fisher
from mergejax import ternary
from mergejax.cli import enable_compile_cache
from mergejax.regmean import gram_matrices
from mergejax.tree import path_str

from experiments import backbones, datasets
from experiments.finetune import FinetuneConfig, cached_finetune
from experiments.methods import METHOD_KEYS, Grids, Method, by_key

ROOT = Path(__file__).resolve().parents[1]


# ============================================================================================ configuration
@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a benchmark run depends on; every field is a command-line override (``--field value``)."""

    suite: str = "text"
    tasks: tuple[str, ...] = ()
    """Task names (default: :data:`TEXT_TASKS`, 6 of the 7 text tasks, or the 4 vision tasks)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    """Seeds the train/validation/test split (fixed across fine-tuning seeds)."""
    n_train: int = 512
    n_val: int = 48
    n_test: int = 144
    max_len: int = 32
    resolution: int = 64
    finetune: FinetuneConfig = FinetuneConfig()
    grids: Grids = Grids()
    methods: tuple[str, ...] = ()
    """Method keys to run (default: all)."""
    ada_steps: int = 60
    ada_batch: int = 2
    """AdaMerging's unlabeled examples per task and step."""
    ada_lr: float = 1e-2
    """The paper runs 500 Adam steps at 1e-3; 60 steps at 1e-2 allow the same displacement of the coefficients."""
    fisher_examples: int = 64
    fisher_mode: str = "empirical"
    regmean_examples: int = 64
    wudi_steps: int = 300
    eval_batch: int = 48
    protocols: bool = True
    protocol_ada_steps: int = 30
    heldout: tuple[str, ...] = ()
    """Tasks held out of the merge for the linear-probe protocol (default: the last two tasks)."""
    n_probe: int = 512
    protocol_task_counts: tuple[int, ...] = (2, 4, 6)
    """Numbers of merged tasks (the first n tasks) of the tasks-count protocol; counts above T are dropped."""
    sweep_densities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)
    cache: str = "results/cache"
    out: str = ""
    """Output directory (default results/<suite>, or results/quick-<suite> with --quick)."""
    progress: bool = True
    tiny: bool = False
    """Replace the text backbone by a small random BERT (wiring tests only; results mean nothing)."""
    resume: bool = True
    """Reuse the per-seed results already in ``<out>/per_seed/`` written by the same configuration."""
    rerun: tuple[str, ...] = ()
    """Method keys whose saved rows are discarded and recomputed (the other rows are reused)."""


TEXT_TASKS = ("wn_pos", "wn_lexname", "sentiment", "fortune_topic", "fortune_lang", "tweet_source")
"""The reference text tasks (``wn_topic`` left out to fit the 2-core budget; ``--tasks`` adds it back)."""


QUICK_METHODS = ("base", "experts", "average", "task_arithmetic", "ties", "dare_ties", "adamerging_layer",
                 "compeft_experts", "compeft_task_arithmetic", "iso_c")
"""The ``--quick`` rows: the main methods (TA, TIES, DARE, one AdaMerging, ComPEFT, one recent method)."""

QUICK = dict(
    tasks=("wn_pos", "sentiment", "fortune_lang"), seeds=(0,), n_train=512, n_val=48, n_test=96, max_len=32,
    resolution=32, methods=QUICK_METHODS, ada_steps=20, ada_batch=4, protocols=False,
    grids=Grids(ta_scales=(0.5, 1.0, 1.5), ties_densities=(0.2,), ties_scales=(0.7, 1.0, 1.5), dare_drops=(0.9,),
                compeft_densities=(0.1,), iso_scales=(1.0, 1.5)),
)
"""The ``--quick`` configuration of ``make demo``: 3 text tasks, 1 seed, the reference fine-tuning (64 AdamW steps
of 8), 10 rows, 1-3 point grids (each a rescaling of one merge), no protocols."""

QUICK_VISION_TASKS = ("fashion_mnist", "mnist", "animal_shape")

VISION_FINETUNE = FinetuneConfig(steps=64, batch_size=32, lr=1e-4)
"""Vision expert fine-tuning: 64 AdamW steps of 32 (4 epochs of 512 images) at lr 1e-4. At lr 1e-3 (40 steps) the
BatchNorm biases moved by more than their own norm, an expert at half its task vector lost 3-25 points, and every
merge of three experts fell to chance (experiments/README.md)."""

VISION_METHODS = tuple(k for k in METHOD_KEYS if k != "regmean")
"""Every row but RegMean, which regresses 2-D kernels only and would be weight averaging on a conv net."""

VISION = dict(seeds=(0,), resolution=32, finetune=VISION_FINETUNE, methods=VISION_METHODS)
"""The reference vision configuration (``--suite vision`` without ``--quick``): XLA:CPU runs EfficientNet-Lite0's
depthwise convolutions slowly (3 s per training step of 32 images at 32 px, 0.7 s per 48-image evaluation batch, on
2 cores at load 10), so one seed and 32 px inputs (28 px sources), with the protocols (about 12 min);
``--seeds 0,1,2 --resolution 64`` restore the rest."""


def _parse(tp: Any, text: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, *_) = typing.get_args(tp)
        return tuple(_parse(inner, t) for t in text.split(",") if t.strip())
    if tp is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    return tp(text)


def _fields(cls: type, prefix: str = "") -> Iterable[tuple[str, str, Any, Any]]:
    """(flag name, dotted field path, type, default) of every leaf field of a (nested) config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield (prefix + f.name).replace(".", "-").replace("_", "-"), prefix + f.name, tp, f.default


def _replace(cfg: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), rest, value)})


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """The :class:`Config` of the command line: ``--quick`` preset first, then every explicit ``--field value``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the make-demo configuration (minutes on 2 CPU cores)")
    for flag, dotted, tp, default in _fields(Config):
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        p.add_argument(f"--{flag}", dest=dotted, default=None, type=lambda t, tp=tp: _parse(tp, t),
                       help=f"(default {shown})")
    args = p.parse_args(argv)
    cfg = Config()
    explicit = {d: v for _, d, _, _ in _fields(Config) if (v := getattr(args, d)) is not None}
    suite = explicit.get("suite", "text")
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
        if suite == "vision":
            cfg = dataclasses.replace(cfg, tasks=QUICK_VISION_TASKS, finetune=VISION_FINETUNE)
    elif suite == "vision":
        cfg = dataclasses.replace(cfg, **VISION)
    for dotted, value in explicit.items():
        cfg = _replace(cfg, dotted, value)
    if not cfg.out:
        cfg = dataclasses.replace(cfg, out=f"results/{'quick-' if args.quick else ''}{cfg.suite}")
    return cfg


def suite_tasks(cfg: Config) -> tuple[str, ...]:
    if cfg.tasks:
        return cfg.tasks
    return tuple(TEXT_TASKS if cfg.suite == "text" else datasets.VISION_TASKS)


# ============================================================================================ one seed
CACHE_READERS: dict[str, frozenset[str]] = {
    "ties": frozenset({"ties", "lines"}),
    "fisher": frozenset({"fisher"}),
    "grams": frozenset({"regmean"}),
    "compeft": frozenset({"compeft_experts", "compeft_task_arithmetic", "compeft_ties"}),
    "compeft_alpha": frozenset({"compeft_experts"}),
}
"""The rows that read each kind of :attr:`Run._cache` entry (keyed ``kind`` or ``(kind, density)``)."""

PROTOCOL_CACHE = frozenset({"ties", "compeft", "compeft_alpha"})
"""Kinds that :func:`protocol_density` reuses at the densities of ``Config.sweep_densities``."""


def _alpha_grid(cfg: Config) -> list[float]:
    return [float(a) for a in cfg.grids.compeft_alphas]


def stale_rows(log: dict[str, Any], cfg: Config) -> set[str]:
    """The saved rows of ``log`` that another ``Grids.compeft_alphas`` computed, to recompute.

    The alpha grid is left out of the resume key (:func:`_resume_key`): it changes only the ComPEFT rows. The
    ``compeft_experts`` row records the grid it chose from (rows saved before the eighth sitting record none, and
    used {1, 2, 4, 8}); when that differs from ``cfg``'s, it and the rows built on its chosen density
    (:data:`CACHE_READERS` ``"compeft"``) are stale.
    """
    row = log.get("compeft_experts")
    if row is None or row.get("alpha_grid") == _alpha_grid(cfg):
        return set()
    return set(CACHE_READERS["compeft"]) & set(log)


def stale_protocols(protocols: dict[str, Any], cfg: Config) -> bool:
    """Whether the density protocol's ComPEFT points were chosen on another alpha grid than ``cfg``'s."""
    return "density" in protocols and protocols["density"].get("compeft_alpha_grid") != _alpha_grid(cfg)


def points_from_protocols(protocols: dict[str, Any]) -> dict[str, Any]:
    """The :class:`PointStore` points that assembled ``protocols`` (the inverse of the three protocol functions), so
    a finished ``protocols.json`` seeds a store when only some of its points must be recomputed."""
    points: dict[str, Any] = {}
    counts = protocols.get("num_tasks", {})
    for i, n in enumerate(counts.get("n", [])):
        points.update({f"num_tasks/{n}/{name}": v[i] for name, v in counts.items() if name != "n"})
    for name, per_task in protocols.get("heldout", {}).get("probe", {}).items():
        points.update({f"heldout/{name}/{t}": v for t, v in per_task.items()})
    dens = protocols.get("density", {})
    for i, d in enumerate(dens.get("density", [])):
        points.update({f"density/{d:g}/{name}": dens[name][i] for name in ("ties", "dare_task_arithmetic")})
        c = {"normalized": dens["compeft_experts"][i], "bits_per_param": dens["compeft_bits_per_param"][i]}
        points[f"density/{d:g}/compeft_experts"] = c | ({"alpha_grid": dens["compeft_alpha_grid"]}
                                                       if "compeft_alpha_grid" in dens else {})
    return points


def free_host_memory() -> None:
    """Frees what a finished row leaves behind in the process: JAX's compiled programs and traces
    (``jax.clear_caches()``; a later row that needs a program again recompiles it, or loads it from the persistent
    compilation cache, to the same executable), then the allocator's free pages (glibc ``malloc_trim(0)``; a no-op
    elsewhere).

    Without this the resident set grows by 50-250 MB per row while the live arrays stay flat: on the tiny model
    the live arrays are 20-30 MB and the RSS grows from 0.5 to more than 1 GB over the rows (experiments/README.md,
    memory).
    """
    import ctypes
    import ctypes.util
    import gc

    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _chunks(batch: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(batch.values())))
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


class Run:
    """One seed of the benchmark: the backbone, the data, the experts, and caches shared by the methods."""

    def __init__(self, cfg: Config, seed: int, pools: dict[str, datasets.Pool], splits: dict[str, datasets.Split]):
        self.cfg, self.seed = cfg, seed
        self.tasks = tuple(pools)
        heads = [(t, pools[t].num_classes) for t in self.tasks]
        self.backbone = backbones.build(cfg.suite, heads, jax.random.key(seed), max_len=cfg.max_len,
                                        resolution=cfg.resolution, tiny=cfg.tiny)
        self.data: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for t in self.tasks:
            pool, sp = pools[t], splits[t]
            self.data[t] = {}
            for part in ("train", "val", "test"):
                idx = getattr(sp, part)
                inputs = [pool.inputs[i] for i in idx] if isinstance(pool.inputs, list) else pool.inputs[idx]
                self.data[t][part] = {**self.backbone.encode(inputs), "y": pool.labels[idx]}
        self._predict = jax.jit(self.backbone.apply_fn, static_argnums=2)
        self._features = jax.jit(self.backbone.features)
        self.chosen_hp: dict[str, dict[str, Any]] = {}
        self._cache: dict[Any, Any] = {}
        self.merge_cache: dict[Any, Any] = {}
        self.experts: list[Any] = []
        self.stripped: list[Any] = []
        self.finetune_s = 0.0
        self.last_coefficients: np.ndarray | None = None

    # ---------------------------------------------------------------- experts
    def train_experts(self) -> None:
        t0 = time.perf_counter()
        description = dict(suite=self.cfg.suite, n_train=self.cfg.n_train, n_val=self.cfg.n_val,
                           n_test=self.cfg.n_test, data_seed=self.cfg.data_seed, max_len=self.cfg.max_len,
                           resolution=self.cfg.resolution, tasks=list(self.tasks))
        for i, t in enumerate(tqdm(self.tasks, desc=f"experts (seed {self.seed})", disable=not self.cfg.progress)):
            expert, _ = cached_finetune(self.backbone, i, self.data[t]["train"], self.cfg.finetune, seed=self.seed,
                                        cache_dir=self.cfg.cache, description=description,
                                        progress=self.cfg.progress)
            self.experts.append(expert)
        self.stripped = [self.strip_heads(e) for e in self.experts]
        self.finetune_s = time.perf_counter() - t0

    def strip_heads(self, tree: Any) -> Any:
        """``tree`` with the base's heads: its task vector is zero on every head leaf."""
        rx = re.compile(backbones.HEADS)
        return jax.tree_util.tree_map_with_path(
            lambda kp, x, b: b if rx.search(path_str(kp)) else x, tree, self.backbone.base)

    def with_heads(self, merged: Any) -> Any:
        """``merged`` with every task's head taken from that task's expert (heads are never merged)."""
        rx = re.compile(backbones.HEADS + r"([^/]+)/")
        index = {t: i for i, t in enumerate(self.tasks)}

        def leaf(kp, m, *experts):
            hit = rx.search(path_str(kp))
            return experts[index[hit.group(1)]] if hit else m

        return jax.tree_util.tree_map_with_path(leaf, merged, *self.experts)

    def rescaled(self, merged: Any, scale: float) -> Any:
        """``base + scale * (merged - base)`` (float32 arithmetic, cast back per leaf)."""
        if scale == 1.0:
            return merged
        return jax.tree.map(lambda m, b: (b.astype(jnp.float32) + scale * (m.astype(jnp.float32) - b)).astype(m.dtype),
                            merged, self.backbone.base)

    def key(self, name: str) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.seed), sum(map(ord, name)))

    # ---------------------------------------------------------------- evaluation
    def accuracy(self, params: Any, task: str, part: str = "test") -> float:
        """Accuracy (%) of ``params`` (with head ``task``) on a split of ``task``, in fixed-size padded chunks."""
        i, data, size = self.tasks.index(task), self.data[task][part], self.cfg.eval_batch
        inputs = {k: v for k, v in data.items() if k != "y"}
        n = len(data["y"])
        correct = 0
        for start in range(0, n, size):
            chunk = {k: v[start:start + size] for k, v in inputs.items()}
            m = min(size, n - start)
            if m < size:  # pad to one compiled shape
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], size - m, 0)]) for k, v in chunk.items()}
            logits = np.asarray(self._predict(params, {k: jnp.asarray(v) for k, v in chunk.items()}, i))
            correct += int(np.sum(np.argmax(logits[:m], -1) == data["y"][start:start + m]))
        return 100.0 * correct / n

    def evaluate(self, model: Any, part: str = "test", tasks: Sequence[str] | None = None) -> dict[str, float]:
        tasks = self.tasks if tasks is None else tasks
        trees = model if isinstance(model, list) else [model] * len(self.tasks)
        return {t: self.accuracy(trees[self.tasks.index(t)], t, part) for t in tasks}

    def features(self, params: Any, task: str, part: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        data = self.data[task][part]
        n = len(data["y"]) if limit is None else min(limit, len(data["y"]))
        feats = [np.asarray(self._features(params, {k: jnp.asarray(v) for k, v in c.items()}))
                 for c in _chunks({k: v[:n] for k, v in data.items() if k != "y"}, self.cfg.eval_batch)]
        return np.concatenate(feats), data["y"][:n]

    # ---------------------------------------------------------------- shared method state
    def chosen(self, method: str, name: str, default: Any) -> Any:
        return self.chosen_hp.get(method, {}).get(name, default)

    def _batches(self, task: str, n: int, size: int = 16) -> list[dict[str, jax.Array]]:
        data = self.data[task]["train"]
        return [{k: jnp.asarray(v) for k, v in c.items()} for c in _chunks({k: v[:n] for k, v in data.items()}, size)]

    def fishers(self) -> list[Any]:
        if "fisher" not in self._cache:
            self._cache["fisher"] = [
                mj_fisher.diagonal(self.backbone.apply_fn, e, self._batches(t, self.cfg.fisher_examples, 8), task=i,
                                   mode=self.cfg.fisher_mode, key=self.key(f"fisher{i}"))
                for i, (t, e) in enumerate(tqdm(list(zip(self.tasks, self.experts)), desc="Fisher",
                                                disable=not self.cfg.progress, leave=False))]
        return self._cache["fisher"]

    def grams(self) -> list[dict[str, jax.Array]]:
        if "grams" not in self._cache:
            self._cache["grams"] = [
                gram_matrices(self.backbone.apply_fn, e, self._batches(t, self.cfg.regmean_examples), task=i)
                for i, (t, e) in enumerate(zip(self.tasks, self.experts))]
        return self._cache["grams"]

    def adamerging(self, subset: Iterable[int], *, granularity: str, plus_plus: bool, steps: int | None = None,
                   lr: float | None = None) -> Any:
        """AdaMerging on the test inputs of the tasks in ``subset`` (test-time adaptation, unlabeled, as the paper)."""
        subset = list(subset)
        unlabeled = [{k: v for k, v in self.data[self.tasks[i]]["test"].items() if k != "y"} for i in subset]
        base = self.with_heads(self.backbone.base)
        experts = [self.with_heads(self.stripped[i]) for i in subset]
        merged, coef = mj.adamerging(
            self.backbone.apply_fn, base, experts, unlabeled, granularity=granularity, plus_plus=plus_plus,
            steps=self.cfg.ada_steps if steps is None else steps, lr=self.cfg.ada_lr if lr is None else lr,
            batch_size=self.cfg.ada_batch,
            key=self.key(f"ada-{granularity}-{plus_plus}"), heads=backbones.HEADS, tasks=subset,
            progress=self.cfg.progress)
        self.last_coefficients = np.asarray(coef.lambdas)
        return merged

    def compeft(self, density: float) -> list[Any]:
        """ComPEFT-compressed task vectors at ``density``, alpha chosen per expert on its validation split."""
        if ("compeft", density) not in self._cache:
            out, alphas = [], []
            for i, t in enumerate(self.tasks):
                tv = mj.task_vector(self.stripped[i], self.backbone.base)

                def score(c, t=t):
                    return self.accuracy(self.with_heads(ternary.apply(self.backbone.base, c)), t, "val")

                search = ternary.choose_alpha(tv, score, grid=self.cfg.grids.compeft_alphas, density=density)
                out.append(search.ttv)
                alphas.append(search.alpha)
            self._cache[("compeft", density)] = out
            self._cache[("compeft_alpha", density)] = alphas
        return self._cache[("compeft", density)]

    def release(self, pending: Iterable[str], protocols: bool = False) -> list[Any]:
        """Drops the cached state that no ``pending`` row reads (:data:`CACHE_READERS`) and, with ``protocols``,
        that the protocols do not reuse either (:data:`PROTOCOL_CACHE` at ``Config.sweep_densities``); clears the
        per-method merge cache. Nothing a later reader needs is dropped, so no result changes.

        Returns:
          The keys dropped.
        """
        pending, sweep = set(pending), set(self.cfg.sweep_densities)
        dropped = []
        for key in list(self._cache):
            kind = key[0] if isinstance(key, tuple) else key
            if kind not in CACHE_READERS or CACHE_READERS[kind] & pending:  # an undeclared kind is kept
                continue
            if protocols and kind in PROTOCOL_CACHE and isinstance(key, tuple) and key[1] in sweep:
                continue
            del self._cache[key]
            dropped.append(key)
        self.merge_cache.clear()
        return dropped

    def chosen_compeft_density(self) -> float:
        return self.chosen("compeft_experts", "density", self.cfg.grids.compeft_densities[0])


# ============================================================================================ selection
def run_method(run: Run, method: Method, log: dict[str, Any]) -> dict[str, float]:
    """Picks ``method``'s hyperparameters on validation, then returns its test accuracies per task."""
    grid = method.grid(run.cfg.grids, run)
    t0 = time.perf_counter()
    val_scores = []
    if len(grid) > 1:
        for hp in tqdm(grid, desc=f"{method.key} grid", disable=not run.cfg.progress, leave=False):
            accs = run.evaluate(method.build(run, hp), "val")
            val_scores.append((hp, float(np.mean(list(accs.values())))))
        best = max(val_scores, key=lambda s: s[1])[0]  # ties keep the earlier (smaller) setting
    else:
        best = grid[0]
    run.chosen_hp[method.key] = best
    model = method.build(run, best)
    test = run.evaluate(model, "test")
    log[method.key] = dict(hyperparameters=best, label=method.label(best), validation=val_scores,
                           test=test, seconds=time.perf_counter() - t0)
    if method.key == "compeft_experts":
        log[method.key]["alphas"] = run._cache.get(("compeft_alpha", best["density"]))
        log[method.key]["alpha_grid"] = _alpha_grid(run.cfg)
    if method.key.startswith("adamerging") and run.last_coefficients is not None:
        lam = run.last_coefficients.reshape(len(run.last_coefficients), -1)  # learned; per task: mean, min, max
        log[method.key]["coefficients"] = {"mean": lam.mean(1).tolist(), "min": lam.min(1).tolist(),
                                           "max": lam.max(1).tolist()}
    del model
    run.merge_cache.clear()
    return test


# ============================================================================================ protocols
class PointStore:
    """Finished points of the protocols, saved to disk after each one so that a killed run resumes from them.

    Each point (one number-of-tasks subset and method, one held-out probe, one density and method) is stored under
    its name in ``path`` with the configuration key; :meth:`point` returns a stored value or computes and saves it.
    ``path=None`` keeps the points in memory only.
    """

    def __init__(self, path: Path | None = None, key: str = "", resume: bool = True):
        self.path, self.key = path, key
        blob = (_load_done(path, key) or {}) if path is not None and resume else {}
        self.values: dict[str, Any] = blob.get("points", {})
        self.seconds: dict[str, float] = blob.get("seconds", {})
        """Seconds each point took to compute (in whichever run computed it)."""
        self.computed: list[str] = []
        """Names of the points computed (not reused) by this store, in order."""

    def seed(self, points: dict[str, Any]) -> None:
        """Adds ``points`` (e.g. :func:`points_from_protocols` of a finished run) where the store has none."""
        self.values = points | self.values

    def forget(self, name: str) -> None:
        """Drops point ``name`` (stale), so that :meth:`point` computes it again."""
        self.values.pop(name, None)
        self.seconds.pop(name, None)

    def point(self, name: str, compute: typing.Callable[[], Any]) -> Any:
        """The stored value of point ``name``, else ``compute()`` (JSON-normalised), saved at once."""
        if name not in self.values:
            t0 = time.perf_counter()
            self.values[name] = json.loads(json.dumps(compute(), default=_json_default))
            self.seconds[name] = time.perf_counter() - t0
            self.computed.append(name)
            if self.path is not None:
                _save_done(self.path, self.key, {"points": self.values, "seconds": self.seconds})
        return self.values[name]


def protocol_num_tasks(run: Run, expert_acc: dict[str, float], store: PointStore | None = None) -> dict[str, Any]:
    """Average normalised test accuracy of TA, TIES and AdaMerging (layer-wise) merging tasks[:n], n = 2..T.

    Every (n, method) point is saved in ``store`` as it finishes (and reused from it).
    """
    store = store or PointStore()
    out: dict[str, Any] = {"n": [], "task_arithmetic": [], "ties": [], "adamerging_layer": []}
    ta_scale = run.chosen("task_arithmetic", "scale", 0.3)
    ties_hp = run.chosen_hp.get("ties", {"density": 0.2, "scale": 1.0})
    counts = sorted({n for n in run.cfg.protocol_task_counts if 2 <= n <= len(run.tasks)} | {len(run.tasks)})
    for n in tqdm(counts, desc="protocol: number of tasks", disable=not run.cfg.progress):
        idx, names = list(range(n)), list(run.tasks[:n])
        sub = [run.stripped[i] for i in idx]
        models = {
            "task_arithmetic": lambda: run.with_heads(mj.task_arithmetic(run.backbone.base, sub, scale=ta_scale)),
            "ties": lambda: run.with_heads(mj.ties(run.backbone.base, sub, **ties_hp)),
            "adamerging_layer": lambda: run.adamerging(idx, granularity="layer", plus_plus=False,
                                                       steps=run.cfg.protocol_ada_steps),
        }
        out["n"].append(n)
        for name, build in models.items():
            def norm(build=build) -> float:
                accs = run.evaluate(build(), "test", names)
                return float(np.mean([100 * accs[t] / expert_acc[t] for t in names]))

            out[name].append(store.point(f"num_tasks/{n}/{name}", norm))
    return out


def _probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train[0])
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train[0]), train[1])
    return 100.0 * float(np.mean(clf.predict(scaler.transform(test[0])) == test[1]))


def _ties_model(run: Run, density: float, scale: float) -> Any:
    """TIES of every task at (density, scale), through the TIES row's lambda = 1 cache."""
    from experiments.methods import _ties

    return _ties(run, {"density": density, "scale": scale})


def protocol_heldout(run: Run, store: PointStore | None = None) -> dict[str, Any]:
    """Linear probes on frozen features of tasks left out of the merge: base vs merged (TA, TIES) encoders.

    Every (encoder, task) probe is saved in ``store`` as it finishes; an encoder is merged only if a probe needs it.
    """
    store = store or PointStore()
    held = list(run.cfg.heldout) or list(run.tasks[-2:])
    merged_idx = [i for i, t in enumerate(run.tasks) if t not in held]
    sub = [run.stripped[i] for i in merged_idx]
    encoders = {
        "base": lambda: run.backbone.base,
        "task_arithmetic": lambda: mj.task_arithmetic(run.backbone.base, sub,
                                                      scale=run.chosen("task_arithmetic", "scale", 0.3)),
        "ties": lambda: mj.ties(run.backbone.base, sub, **run.chosen_hp.get("ties", {"density": 0.2, "scale": 1.0})),
    }
    out: dict[str, Any] = {"merged_tasks": [run.tasks[i] for i in merged_idx], "heldout": held, "probe": {}}
    for name, build in tqdm(encoders.items(), desc="protocol: held-out probes", disable=not run.cfg.progress):
        params: list[Any] = []  # built on the first probe that is not in the store

        def probe(t: str) -> float:
            if not params:
                params.append(build())
            return _probe(run.features(params[0], t, "train", run.cfg.n_probe), run.features(params[0], t, "test"))

        out["probe"][name] = {t: store.point(f"heldout/{name}/{t}", lambda t=t: probe(t)) for t in held}
    return out


def protocol_density(run: Run, expert_acc: dict[str, float], store: PointStore | None = None) -> dict[str, Any]:
    """Normalised test accuracy against density: TIES, DARE + TA (density = 1 - p), ComPEFT experts (+ bits/param).

    Every (density, method) point is saved in ``store`` as it finishes (and reused from it).
    """
    store = store or PointStore()
    ties_scale = run.chosen("ties", "scale", 1.0)
    ta_scale = run.chosen("dare_task_arithmetic", "scale", run.chosen("task_arithmetic", "scale", 0.3))

    def norm(model: Any) -> float:
        accs = run.evaluate(model, "test")
        return float(np.mean([100 * accs[t] / expert_acc[t] for t in run.tasks]))

    grid = _alpha_grid(run.cfg)

    def compeft(d: float) -> dict[str, Any]:
        ttvs = run.compeft(d)
        return {"normalized": norm([run.with_heads(ternary.apply(run.backbone.base, t)) for t in ttvs]),
                "bits_per_param": float(np.mean([ternary.stats(t).bits_per_param for t in ttvs])), "alpha_grid": grid}

    out: dict[str, Any] = {"density": list(run.cfg.sweep_densities), "ties": [], "dare_task_arithmetic": [],
                           "compeft_experts": [], "compeft_bits_per_param": [], "compeft_alpha_grid": grid}
    for d in tqdm(run.cfg.sweep_densities, desc="protocol: density", disable=not run.cfg.progress):
        drop = min(1.0 - d, 0.999)
        out["ties"].append(store.point(f"density/{d:g}/ties", lambda d=d: norm(_ties_model(run, d, ties_scale))))
        out["dare_task_arithmetic"].append(store.point(f"density/{d:g}/dare_task_arithmetic", lambda: norm(
            run.with_heads(mj.dare(run.backbone.base, run.stripped, key=run.key("dare-sweep"), drop_rate=drop,
                                   scale=ta_scale)))))
        name = f"density/{d:g}/compeft_experts"
        if name in store.values and store.values[name].get("alpha_grid") != grid:  # another alpha grid chose it
            store.forget(name)  # (points saved before the eighth sitting record none: {1, 2, 4, 8})
        c = store.point(name, lambda d=d: compeft(d))
        out["compeft_experts"].append(c["normalized"])
        out["compeft_bits_per_param"].append(c["bits_per_param"])
        for kind in PROTOCOL_CACHE:  # each density is swept once: its cached merges have no later reader
            run._cache.pop((kind, d), None)
        free_host_memory()
    return out


# ============================================================================================ outputs
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(cfg: Config, backbone: str, tasks: Sequence[str], seeds: Sequence[int],
              logs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 9's summary.json: per method, accuracy and normalised accuracy (%), mean/std over seeds."""
    rows = []
    for key in logs[0]:
        per_seed_acc = [log[key]["test"] for log in logs]
        per_seed_norm = [{t: 100 * a[t] / log["experts"]["test"][t] for t in tasks} for a, log in
                         zip(per_seed_acc, logs)]
        row = {"method": key, "label": logs[0][key]["label"], "hyperparameters": logs[0][key]["hyperparameters"]}
        for name, per_seed in (("normalized", per_seed_norm), ("accuracy", per_seed_acc)):
            mean, std = _mean_std([np.mean([s[t] for t in tasks]) for s in per_seed])
            row[name] = {"mean": mean, "std": std,
                         "per_task": {t: float(np.mean([s[t] for s in per_seed])) for t in tasks}}
        rows.append(row)
    return {"suite": cfg.suite, "backbone": backbone, "tasks": list(tasks), "seeds": list(seeds), "rows": rows}


def markdown_table(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    n_seeds = len(summary["seeds"])
    head = ["method", *tasks, "avg acc", "avg norm."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        pm = (lambda d: f"{d['mean']:.1f} ± {d['std']:.1f}") if n_seeds > 1 else (lambda d: f"{d['mean']:.1f}")
        cells = [r["label"], *(f"{r['accuracy']['per_task'][t]:.1f}" for t in tasks), pm(r["accuracy"]),
                 pm(r["normalized"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def protocol_markdown(protocols: dict[str, Any]) -> str:
    """Markdown tables of the protocols (normalised accuracy %, probe accuracy %)."""
    parts = []
    if "num_tasks" in protocols:
        p = protocols["num_tasks"]
        keys = [k for k in ("task_arithmetic", "ties", "adamerging_layer") if k in p]
        parts.append("Average normalised accuracy against the number of merged tasks (the first n):\n\n"
                     "| n | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1) + "\n"
                     + "".join(f"| {n} | " + " | ".join(f"{p[k][i]:.1f}" for k in keys) + " |\n"
                               for i, n in enumerate(p["n"])))
    if "heldout" in protocols:
        p = protocols["heldout"]
        names = list(p["probe"])
        parts.append(f"Linear probes on frozen features of held-out tasks (merged: {', '.join(p['merged_tasks'])}):"
                     "\n\n| task | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1) + "\n"
                     + "".join(f"| {t} | " + " | ".join(f"{p['probe'][m][t]:.1f}" for m in names) + " |\n"
                               for t in p["heldout"]))
    if "density" in protocols:
        p = protocols["density"]
        keys = ("ties", "dare_task_arithmetic", "compeft_experts")
        parts.append("Average normalised accuracy against density (DARE: 1 - p; ComPEFT: entropy-coded bits/param):"
                     "\n\n| density | " + " | ".join(keys) + " | ComPEFT bits/param |\n|" + "---|" * 5 + "\n"
                     + "".join(f"| {d:g} | " + " | ".join(f"{p[k][i]:.1f}" for k in keys)
                               + f" | {p['compeft_bits_per_param'][i]:.2f} |\n" for i, d in enumerate(p["density"])))
    return "\n".join(parts)


def print_table(summary: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("method")
    for t in summary["tasks"]:
        table.add_column(t, justify="right")
    table.add_column("avg acc", justify="right", style="bold")
    table.add_column("avg norm.", justify="right", style="bold")
    for r in summary["rows"]:
        table.add_row(r["label"], *(f"{r['accuracy']['per_task'][t]:.1f}" for t in summary["tasks"]),
                      f"{r['accuracy']['mean']:.1f}", f"{r['normalized']['mean']:.1f}")
    Console(width=200).print(table)


def plots(summary: dict[str, Any], protocols: dict[str, Any], out: Path) -> list[str]:
    """PNG plots of the main table and the protocols; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1))
    ax.barh([r["label"] for r in rows][::-1], [r["normalized"]["mean"] for r in rows][::-1],
            xerr=[r["normalized"]["std"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("average normalised accuracy (%)")
    ax.set_title(f"{summary['backbone']}: {len(summary['tasks'])} tasks, seeds {summary['seeds']}")
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)
    written.append("methods.png")
    if "num_tasks" in protocols:
        p = protocols["num_tasks"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k in ("task_arithmetic", "ties", "adamerging_layer"):
            ax.plot(p["n"], p[k], marker="o", label=k)
        ax.set_xlabel("number of merged tasks")
        ax.set_ylabel("avg normalised accuracy (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "num_tasks.png", dpi=110)
        plt.close(fig)
        written.append("num_tasks.png")
    if "density" in protocols:
        p = protocols["density"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for k in ("ties", "dare_task_arithmetic", "compeft_experts"):
            a1.plot(p["density"], p[k], marker="o", label=k)
        a1.set_xscale("log")
        a1.set_xlabel("density (kept fraction)")
        a1.set_ylabel("avg normalised accuracy (%)")
        a1.legend()
        a2.plot(p["compeft_bits_per_param"], p["compeft_experts"], marker="o", color="tab:green")
        a2.set_xlabel("ComPEFT bits per parameter (entropy-coded)")
        a2.set_ylabel("ComPEFT experts, avg normalised acc (%)")
        fig.tight_layout()
        fig.savefig(out / "density.png", dpi=110)
        plt.close(fig)
        written.append("density.png")
    if "heldout" in protocols:
        p = protocols["heldout"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names, held = list(p["probe"]), p["heldout"]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ax.bar(np.arange(len(held)) + j * width, [p["probe"][name][t] for t in held], width, label=name)
        ax.set_xticks(np.arange(len(held)) + 0.4 - width / 2, held)
        ax.set_ylabel("linear-probe test accuracy (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "heldout.png", dpi=110)
        plt.close(fig)
        written.append("heldout.png")
    return written


# ============================================================================================ main
def prepare_data(cfg: Config) -> tuple[dict[str, datasets.Pool], dict[str, datasets.Split]]:
    pools = {t: datasets.load(t) for t in suite_tasks(cfg)}
    splits = {t: datasets.split(p.labels, cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.data_seed)
              for t, p in pools.items()}
    return pools, splits


def _resume_key(cfg: Config, rows: bool = False) -> str:
    """Hash of everything but the seeds and the bookkeeping fields: per-seed results with it are reusable.
    ``rows``: the key of single finished rows (``seed_<s>.partial.json``), which does not depend on the method list."""
    import hashlib

    d = dataclasses.asdict(cfg)
    for k in ("seeds", "out", "progress", "cache", "resume", "protocols", "rerun") + (("methods",) if rows else ()):
        d.pop(k)
    for k in ("compeft_ta_scales", "compeft_ties_scales"):  # added in the fourth sitting: the rows saved before
        d["grids"].pop(k)  # stay reusable; their two ComPEFT merge rows are recomputed with --rerun
    d["grids"].pop("compeft_alphas")  # the rows and points it changes record it and are recomputed (stale_rows)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _load_done(path: Path, key: str) -> Any:
    if path.exists():
        blob = json.loads(path.read_text())
        if blob.get("config_key") == key:
            return blob["value"]
    return None


def _save_done(path: Path, key: str, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config_key": key, "value": value}, default=_json_default))
    tmp.replace(path)


def write_outputs(cfg: Config, backbone_name: str, pools: dict[str, datasets.Pool],
                  splits: dict[str, datasets.Split], seeds: Sequence[int], logs: Sequence[dict[str, Any]],
                  protocols: dict[str, Any], walls: dict[str, Any], out: Path) -> tuple[dict[str, Any], list[str]]:
    """summary.json, details.json, table.md and the plots for the seeds finished so far."""
    if "experts" not in logs[0]:
        raise ValueError("the method list must include 'experts' (normalised accuracy divides by it)")
    summary = summarize(cfg, backbone_name, list(pools), seeds, logs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    details = {"config": dataclasses.asdict(cfg), "seeds_done": list(seeds), "per_seed": list(logs),
               "protocols": protocols, "wall_s": walls,
               "host": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "jax": jax.__version__,
                        "devices": [str(d) for d in jax.devices()]},
               "classes": {t: list(p.classes) for t, p in pools.items()},
               "split_sizes": {t: {k: len(getattr(s, k)) for k in ("train", "val", "test")} for t, s in splits.items()}}
    (out / "details.json").write_text(json.dumps(details, indent=1, default=_json_default))
    (out / "table.md").write_text(markdown_table(summary) + ("\n" + protocol_markdown(protocols) if protocols else ""))
    return summary, plots(summary, protocols, out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    t_start = time.perf_counter()
    enable_compile_cache(cfg.cache, min_compile_secs=1.0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pools, splits = prepare_data(cfg)
    methods = by_key(cfg.methods or None)
    if "experts" not in {m.key for m in methods}:
        raise ValueError("the method list must include 'experts' (normalised accuracy divides by it)")
    rkey, row_key = _resume_key(cfg), _resume_key(cfg, rows=True)
    pkey = f"{rkey}-seed{cfg.seeds[0]}"  # the protocols run on the first seed
    logs, protocols, walls, done = [], {}, {}, []
    stale_points: dict[str, Any] = {}  # a finished protocols.json with some stale points: the others, reused
    backbone_name = ""
    summary, written = {}, []
    proto_run: Run | None = None
    for seed in cfg.seeds:
        t_seed = time.perf_counter()
        seed_file, proto_file = out / "per_seed" / f"seed_{seed}.json", out / "per_seed" / "protocols.json"
        cached = _load_done(seed_file, rkey) if cfg.resume else None
        reused_rows = None
        if cached is not None and (set(cfg.rerun) | stale_rows(cached["log"], cfg)) & set(cached["log"]):
            reused_rows, cached = cached["log"], None  # reuse the seed's other rows
        want_protocols = cfg.protocols and seed == cfg.seeds[0]
        cached_protocols = _load_done(proto_file, pkey) if cfg.resume and want_protocols else None
        if cached_protocols is not None and stale_protocols(cached_protocols["protocols"], cfg):
            stale_points = points_from_protocols(cached_protocols["protocols"])  # the fresh points are recomputed
        elif cached_protocols is not None:
            protocols, walls["protocols_s"] = cached_protocols["protocols"], cached_protocols["seconds"]
        if cached is not None:
            log, backbone_name = cached["log"], cached["backbone"]
            walls[f"seed_{seed}"] = cached["walls"]
            print(f"seed {seed}: reusing {seed_file}")
        else:
            run = Run(cfg, seed, pools, splits)
            backbone_name = run.backbone.name
            run.train_experts()
            partial_file = out / "per_seed" / f"seed_{seed}.partial.json"
            log = reused_rows or (_load_done(partial_file, row_key) if cfg.resume else None) or {}
            if stale := stale_rows(log, cfg):
                print(f"seed {seed}: recomputing {', '.join(sorted(stale))} (chosen on another ComPEFT alpha grid)")
            log = {k: v for k, v in log.items() if k not in set(cfg.rerun) | stale}
            for j, m in enumerate(tqdm(methods, desc=f"methods (seed {seed})", disable=not cfg.progress)):
                if m.key in log:  # finished by an interrupted run: reuse its row and its choice
                    run.chosen_hp[m.key] = log[m.key]["hyperparameters"]
                    continue
                run_method(run, m, log)
                _save_done(partial_file, row_key, log)
                run.release([k.key for k in methods[j + 1:]], protocols=want_protocols)  # what later rows need
                free_host_memory()
            log = {m.key: log[m.key] for m in methods}  # table order
            walls[f"seed_{seed}"] = {"finetune_s": run.finetune_s, "total_s": time.perf_counter() - t_seed,
                                     "methods_s": {k: v["seconds"] for k, v in log.items()}}
            _save_done(seed_file, rkey, {"log": log, "backbone": backbone_name, "walls": walls[f"seed_{seed}"]})
            if want_protocols:
                proto_run = run  # the protocols run after every seed's table, on this run and its merge caches
            del run
        logs.append(json.loads(json.dumps(log, default=_json_default)))
        done.append(seed)
        walls["total_s"] = time.perf_counter() - t_start
        summary, written = write_outputs(cfg, backbone_name, pools, splits, done, logs, protocols, walls, out)
    if cfg.protocols and not protocols:
        t_p = time.perf_counter()
        if proto_run is None:  # seed 0's table came from per_seed/: rebuild its run (experts from the cache)
            proto_run = Run(cfg, cfg.seeds[0], pools, splits)
            proto_run.train_experts()
            proto_run.chosen_hp = {k: v["hyperparameters"] for k, v in logs[0].items()}
        expert_acc = logs[0]["experts"]["test"]
        store = PointStore(out / "per_seed" / "protocols.partial.json", pkey, cfg.resume)
        store.seed(stale_points)
        parts = {"num_tasks": lambda: protocol_num_tasks(proto_run, expert_acc, store),
                 "heldout": lambda: protocol_heldout(proto_run, store),
                 "density": lambda: protocol_density(proto_run, expert_acc, store)}
        for part, compute in parts.items():  # every point is saved as it finishes; the outputs after every part
            protocols[part] = compute()
            walls["protocols_s"] = float(sum(store.seconds.values()))
            walls["total_s"] = time.perf_counter() - t_start
            summary, written = write_outputs(cfg, backbone_name, pools, splits, done, logs, protocols, walls, out)
        print(f"protocols: {len(store.computed)} points computed, {len(store.values) - len(store.computed)} "
              f"reused from {store.path} ({time.perf_counter() - t_p:.0f} s)")
        _save_done(out / "per_seed" / "protocols.json", pkey, {"protocols": protocols, "seconds": walls["protocols_s"]})
    print_table(summary, f"{backbone_name}: test accuracy (%) per task, seeds {list(cfg.seeds)}, "
                         f"{walls['total_s']:.0f} s")
    print(f"wrote {out}/summary.json, details.json, table.md, {', '.join(written)}")
    return summary


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    if isinstance(x, types.MappingProxyType):
        return dict(x)
    return str(x)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
