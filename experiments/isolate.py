"""Isolating experiments for where the benchmark disagrees with the literature (issue 9, experiments/README.md).

Each experiment reuses the benchmark's seed-0 experts from the cache (the same configuration as the reference run
unless overridden) and varies one thing:

- ``adamerging``: AdaMerging (layer-wise) against its optimisation budget, steps x learning rate, with how far the
  learned coefficients moved from their initial 0.3 (the quick run's 15 steps at 1e-3 barely moved them).
- ``fisher``: Fisher merging against the number of examples its (empirical) Fisher sees, with the fraction of
  Fisher entries under the 1e-6 floor (where the Fisher mean degenerates to the plain mean), and with per-model
  normalisation.

Run ``python -m experiments.isolate`` (every experiment) or ``--only adamerging``; benchmark overrides follow ``--``
(e.g. ``-- --tasks wn_pos,sentiment``). Writes ``results/isolate/isolate.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from mergejax import fisher as mj_fisher
from mergejax.cli import enable_compile_cache
from mergejax.tree import path_str

from experiments import backbones
from experiments.benchmark import Run, parse_args, prepare_data


def _normalised(run: Run, accs: dict[str, float], expert: dict[str, float]) -> tuple[float, float]:
    """(average accuracy, average normalised accuracy), in %."""
    return (float(np.mean(list(accs.values()))),
            float(np.mean([100 * accs[t] / expert[t] for t in run.tasks])))


def _no_save(rows: list[dict]) -> None:
    del rows


def adamerging_budget(run: Run, expert: dict[str, float], budgets: Sequence[tuple[int, float]],
                      save: Callable[[list[dict]], None] = _no_save) -> list[dict]:
    """Layer-wise AdaMerging test accuracy for each (steps, lr), with the displacement of its coefficients.

    ``save(rows)`` is called after every finished row (the JSON on disk grows as the experiment runs).
    """
    rows: list[dict] = []
    for steps, lr in budgets:
        t0 = time.perf_counter()
        merged = run.adamerging(range(len(run.tasks)), granularity="layer", plus_plus=False, steps=steps, lr=lr)
        lam = np.asarray(run.last_coefficients)
        acc, norm = _normalised(run, run.evaluate(merged, "test"), expert)
        rows.append(dict(steps=steps, lr=lr, accuracy=acc, normalized=norm,
                         lambda_mean=float(lam.mean()), lambda_min=float(lam.min()), lambda_max=float(lam.max()),
                         max_displacement=float(np.abs(lam - 0.3).max()), seconds=time.perf_counter() - t0))
        print(rows[-1], flush=True)
        save(rows)
    return rows


def _floor_fraction(fisher: Any, floor: float) -> float:
    """Fraction of the encoder's Fisher entries (heads excluded) strictly below ``floor``."""
    import re

    rx = re.compile(backbones.HEADS)
    below = total = 0
    for kp, f in jax.tree_util.tree_flatten_with_path(fisher)[0]:
        if rx.search(path_str(kp)) or not jnp.issubdtype(jnp.result_type(f), jnp.floating):
            continue
        below += int(jnp.sum(f < floor))
        total += int(np.size(f))
    return below / max(total, 1)


def fisher_examples(run: Run, expert: dict[str, float], counts: Sequence[int], floor: float = 1e-6,
                    save: Callable[[list[dict]], None] = _no_save) -> list[dict]:
    """Fisher merging (empirical Fisher from n training examples per task) against n, plain and normalised.

    ``save(rows)`` is called after every finished row.
    """
    rows: list[dict] = []
    average = _normalised(run, run.evaluate(run.with_heads(mj.average(run.stripped)), "test"), expert)
    for n in counts:
        t0 = time.perf_counter()
        fishers = [mj_fisher.diagonal(run.backbone.apply_fn, e, run._batches(t, n, 8), task=i, mode="empirical",
                                      key=run.key(f"fisher{i}"))
                   for i, (t, e) in enumerate(zip(run.tasks, run.experts))]
        row: dict[str, Any] = dict(examples=n, below_floor=[_floor_fraction(f, floor) for f in fishers],
                                   average_accuracy=average[0], average_normalized=average[1])
        for name, normalize in (("plain", False), ("normalized", True)):
            merged = mj.fisher_merge(run.experts, fishers, heads=backbones.HEADS, base=run.backbone.base,
                                     floor=floor, normalize=normalize)
            row[name] = dict(zip(("accuracy", "normalized"), _normalised(run, run.evaluate(merged, "test"), expert)))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(row, flush=True)
        save(rows)
        del fishers
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="adamerging,fisher", help="comma-separated experiments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ada-budgets", default="15:0.001,60:0.001,60:0.01,180:0.01",
                   help="steps:lr pairs for layer-wise AdaMerging")
    p.add_argument("--fisher-counts", default="16,64,192")
    p.add_argument("--out", default="results/isolate")
    args, rest = p.parse_known_args(argv)
    cfg = parse_args([a for a in rest if a != "--"])
    enable_compile_cache(cfg.cache, min_compile_secs=1.0)
    pools, splits = prepare_data(cfg)
    run = Run(cfg, args.seed, pools, splits)
    run.train_experts()
    expert = run.evaluate(run.experts, "test")
    out: dict[str, Any] = {"config": str(cfg), "seed": args.seed, "experts": expert}
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Callable[[list[dict]], None]:
        def write(rows: list[dict]) -> None:  # after every row: a killed run keeps what finished
            out[name] = rows
            (path / "isolate.json").write_text(json.dumps(out, indent=1))

        return write

    only = set(args.only.split(","))
    if "adamerging" in only:
        budgets = [(int(s), float(lr)) for s, lr in (b.split(":") for b in args.ada_budgets.split(","))]
        ta = {s: _normalised(run, run.evaluate(run.with_heads(mj.task_arithmetic(run.backbone.base, run.stripped,
                                                                                  scale=s)), "test"), expert)
              for s in (0.3, 0.5, 1.0)}
        out["task_arithmetic"] = {str(s): dict(zip(("accuracy", "normalized"), v)) for s, v in ta.items()}
        out["adamerging"] = adamerging_budget(run, expert, budgets, save("adamerging"))
    if "fisher" in only:
        out["fisher"] = fisher_examples(run, expert, [int(n) for n in args.fisher_counts.split(",")],
                                        save=save("fisher"))
    (path / "isolate.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {path / 'isolate.json'}")
    return out


if __name__ == "__main__":
    main()
