"""Isolating experiments for where the benchmark disagrees with the literature (issue 9, experiments/README.md).

Each experiment reuses the benchmark's seed-0 experts from the cache (the same configuration as the reference run
unless overridden) and varies one thing:

- ``adamerging``: AdaMerging (layer-wise) against its optimisation budget, steps x learning rate, with how far the
  learned coefficients moved from their initial 0.3 (the quick run's 15 steps at 1e-3 barely moved them).
- ``fisher``: Fisher merging against the number of examples its (empirical) Fisher sees, with the fraction of
  Fisher entries under the 1e-6 floor (where the Fisher mean degenerates to the plain mean), and with per-model
  normalisation.
- ``compeft``: merging ComPEFT-compressed experts (TA, TIES) against the magnitude of the compressed vectors (alpha
  chosen per expert, alpha = 1, the official code's STC magnitude = mean |tau| over the kept entries, or the pruned
  dense values) on a lambda grid wider than the benchmark's, next to the dense merges; with the norms of the
  compressed and merged vectors.
- ``compeft_alone``: where a ComPEFT expert alone loses against its dense expert: sparsification alone (the pruned
  values), the alpha grid and its selection on the small validation split (a test-split oracle bounds it), and one
  global magnitude against one per leaf (with the spread of the per-leaf magnitudes).

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
from experiments.benchmark import Run, _json_default, free_host_memory, parse_args, prepare_data


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


def _norm(tree: Any) -> float:
    """L2 norm over every float leaf of a tree (float32 accumulation)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)))


def _delta_norm(run: Run, merged: Any) -> float:
    """||merged - base||: the L2 norm of a merged model's task vector."""
    return _norm(jax.tree.map(lambda m, b: m.astype(jnp.float32) - b.astype(jnp.float32), merged,
                              run.backbone.base))


def _trimmed_norm(tv: Any, density: float) -> float:
    """||trim_k(tau)||: the norm of the top-``density`` magnitudes (global, as ComPEFT's and TIES's mask)."""
    from mergejax.ops.trim import magnitude_mask

    mask = magnitude_mask(tv, density)
    return _norm(jax.tree.map(lambda x, m: jnp.where(m, x, 0), tv, mask))


def _ternary_norm(ttv: Any) -> float:
    """||tau_hat|| = scale * sqrt(nnz) of a globally scaled ternary task vector."""
    from mergejax import ternary

    return float(ttv.scale[0]) * float(np.sqrt(ternary.stats(ttv).nnz))


BENCHMARK_GRIDS = {"ta": (0.3, 0.5, 0.7, 1.0, 1.5), "ties": (0.7, 1.0, 1.5)}
"""The benchmark's lambda grids of the ComPEFT rows (TA: ``Grids.ta_scales``, TIES: ``Grids.ties_scales``)."""


def _lambda_sweep(run: Run, unit: Any, scales: Sequence[float], bench: Sequence[float],
                  expert: dict[str, float]) -> dict[str, Any]:
    """Validation accuracy of ``base + lambda * (unit - base)`` for every lambda; test accuracy at the validation
    choice within ``scales`` and within the benchmark's grid ``bench``."""
    val = {float(s): float(np.mean(list(run.evaluate(run.with_heads(run.rescaled(unit, s)), "val").values())))
           for s in scales}
    out: dict[str, Any] = {"validation": val, "merged_norm": _delta_norm(run, unit)}
    for name, grid in (("wide", scales), ("benchmark", bench)):
        best = max((s for s in grid if float(s) in val), key=lambda s: val[float(s)])  # ties keep the smaller
        if name == "benchmark" and out.get("wide", {}).get("lambda") == best:
            out[name] = dict(out["wide"])
            continue
        acc, norm = _normalised(run, run.evaluate(run.with_heads(run.rescaled(unit, best)), "test"), expert)
        out[name] = {"lambda": float(best), "accuracy": acc, "normalized": norm}
    return out


def compeft_merging(run: Run, expert: dict[str, float], density: float, scales: Sequence[float],
                    save: Callable[[list[dict]], None] = _no_save, only: Sequence[str] | None = None) -> list[dict]:
    """TA and TIES of ComPEFT experts at ``density`` against the magnitude of the compressed vectors.

    Compressions of each expert's task vector tau_t (the same global top-k mask in all four):

    - ``chosen``: ``alpha_t * sigma_t * sign`` with alpha_t picked on the expert's own validation split (the
      benchmark's ComPEFT rows; :meth:`Run.compeft`);
    - ``alpha1``: ``sigma_t * sign`` (ComPEFT, Eq. 2, alpha = 1);
    - ``stc``: ``mean(|tau_t| on the mask) * sign`` (the official code's ``replace_factor=-2``: the kept L1 mass);
    - ``pruned``: the kept dense values (``replace_factor=-1``, no quantization);

    and the dense experts (``dense``). Each set is merged once at lambda = 1 (TA: a sum; TIES: trim at 1 for the
    already sparse vectors, at ``density`` for the dense ones; elect signs; disjoint mean) and rescaled over
    ``scales``. Each row: mean ||tau_hat_t|| / ||trim_k(tau_t)||, ||merged task vector||, validation accuracy per
    lambda, test accuracy at the validation choice (wide grid, and the benchmark's grid). ``save(rows)`` after
    every row; ``only``: the compressions to merge (default all).
    """
    from mergejax import ternary

    base = run.backbone.base
    tvs = [mj.task_vector(s, base).tree for s in run.stripped]
    trimmed = [_trimmed_norm(tv, density) for tv in tvs]
    chosen = run.compeft(density)
    sets: dict[str, list[Any]] = {
        "chosen": chosen,
        "alpha1": [ternary.with_alpha(c, 1.0) for c in chosen],
        "stc": [ternary.compress(tv, density=density, alpha=1.0, scale="mean_abs") for tv in tvs],
    }
    magnitude = {name: float(np.mean([_ternary_norm(c) / n for c, n in zip(cs, trimmed)]))
                 for name, cs in sets.items()}
    magnitude.update(pruned=1.0, dense=float(np.mean([_norm(tv) / n for tv, n in zip(tvs, trimmed)])))
    del tvs  # 6 dense float32 copies of the model: the merges below read run.stripped
    free_host_memory()
    merges: list[tuple[str, str, Callable[[], Any]]] = []
    for name, cs in sets.items():
        merges += [(name, "ta", lambda cs=cs: mj.task_arithmetic(base, cs)),
                   (name, "ties", lambda cs=cs: mj.ties(base, cs, density=1.0))]
    merges += [("pruned", "ta", lambda: mj.chain(mj.Trim(density), mj.Sum())(base, run.stripped, scale=1.0)),
               ("dense", "ta", lambda: mj.task_arithmetic(base, run.stripped)),
               ("dense", "ties", lambda: mj.ties(base, run.stripped, density=density))]
    merges = [m for m in merges if only is None or m[0] in only]
    alphas = run._cache.get(("compeft_alpha", density))
    rows: list[dict] = []
    for name, merge, build in merges:
        t0 = time.perf_counter()
        unit = run.with_heads(build())
        row = dict(compression=name, merge=merge, density=density, magnitude_ratio=magnitude[name],
                   **_lambda_sweep(run, unit, scales, BENCHMARK_GRIDS[merge], expert))
        if name == "chosen":
            row["alphas"] = alphas
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        del unit
        free_host_memory()
        print({k: v for k, v in row.items() if k != "validation"}, flush=True)
        save(rows)
    return rows


def _kept_mean_abs(x: jax.Array, m: jax.Array) -> jax.Array:
    """mean |x| over the entries ``m`` keeps (float32; 0 when none is kept)."""
    return jnp.sum(jnp.where(m, jnp.abs(x.astype(jnp.float32)), 0)) / jnp.maximum(jnp.sum(m), 1)


def leaf_scaled_ternary(tv: Any, density: float) -> Any:
    """``m_l * sign(tau) * mask``: the global top-``density`` mask (as ComPEFT's) with one magnitude per leaf, the
    mean |tau| over that leaf's kept entries (a leaf with none kept is zero). Dense, for evaluation only."""
    from mergejax.ops.trim import magnitude_mask

    mask = magnitude_mask(tv, density)

    def leaf(x, m):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jnp.where(m, jnp.sign(x.astype(jnp.float32)) * _kept_mean_abs(x, m), 0).astype(x.dtype)

    return jax.tree.map(leaf, tv, mask)


def leaf_magnitude_spread(tv: Any, density: float) -> dict[str, float]:
    """How unequal the kept magnitudes are across leaves, under the global top-``density`` mask: the kept-count
    weighted coefficient of variation of the per-leaf mean |tau|, and the largest over the smallest per-leaf mean
    (leaves with kept entries). One ternary magnitude for the whole vector fits when the spread is small."""
    from mergejax.ops.trim import magnitude_mask

    mask = magnitude_mask(tv, density)
    counts, means = [], []
    for x, m in zip(jax.tree_util.tree_leaves(tv), jax.tree_util.tree_leaves(mask)):
        n = int(jnp.sum(m))
        if n and jnp.issubdtype(x.dtype, jnp.floating):
            counts.append(n)
            means.append(float(_kept_mean_abs(x, m)))
    w, mu = np.asarray(counts, float), np.asarray(means)
    avg = float(np.sum(w * mu) / np.sum(w))
    return {"cv": float(np.sqrt(np.sum(w * (mu - avg) ** 2) / np.sum(w)) / avg),
            "max_over_min": float(mu.max() / mu.min()), "leaves_kept": len(counts)}


FINE_ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
"""The ``compeft_alone`` alpha grid: :data:`mergejax.ternary.ALPHA_GRID` (the benchmark's grid) and 1.5."""

COARSE_ALPHAS = (1.0, 2.0, 4.0, 8.0)
"""The benchmark's ComPEFT alpha grid up to the seventh sitting, which this isolation showed too coarse."""


def _alpha_curve(run: Run, t: str, ttv: Any, alphas: Sequence[float]) -> dict[str, dict[float, float]]:
    """Validation and test accuracy of the task-``t`` expert ``base + alpha/alpha_0 * tau_hat`` for every alpha."""
    from mergejax import ternary

    out: dict[str, dict[float, float]] = {"val": {}, "test": {}}
    for a in alphas:
        model = run.with_heads(ternary.apply(run.backbone.base, ternary.with_alpha(ttv, float(a))))
        for part in out:
            out[part][float(a)] = run.accuracy(model, t, part)
    return out


def _pick(curve: dict[str, dict[float, float]], grid: Sequence[float]) -> dict[str, float]:
    """Test accuracy at the validation choice within ``grid`` (ties keep the smaller alpha)."""
    best = max((float(a) for a in grid), key=lambda a: (curve["val"][a], -a))
    return {"alpha": best, "test": curve["test"][best]}


def compeft_alone(run: Run, expert: dict[str, float], densities: Sequence[float],
                  coarse: Sequence[float], save: Callable[[list[dict]], None] = _no_save) -> list[dict]:
    """Where a ComPEFT expert loses accuracy against its dense expert, one factor at a time.

    For each task expert and density, test accuracy of (all under the same global top-k mask but the last):

    - ``pruned``: the kept dense values (sparsification alone);
    - ``compeft``: ``alpha sigma sign`` (ComPEFT Eq. 2, global std), alpha chosen on validation within the grid
      ``coarse`` (:data:`COARSE_ALPHAS`), within :data:`FINE_ALPHAS`, and the best alpha on the test split itself
      (an oracle, to bound what alpha selection on a small validation split costs);
    - ``stc``: ``mean(|tau| on the mask) sign`` (one global magnitude keeping the kept L1 mass);
    - ``leaf_scaled``: one magnitude per leaf, that leaf's kept mean |tau| (:func:`leaf_scaled_ternary`);
    - ``tensor_scope``: ComPEFT with a per-leaf mask and per-leaf std (``scope="tensor"``), alpha chosen as above;

    and the spread of the per-leaf kept magnitudes (:func:`leaf_magnitude_spread`). One row per (task, density),
    ``save(rows)`` after each.
    """
    from mergejax import ternary

    base, rows = run.backbone.base, []
    for i, t in enumerate(run.tasks):
        tv = mj.task_vector(run.stripped[i], base).tree
        for d in densities:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"task": t, "density": float(d), "dense": expert[t],
                                   "spread": leaf_magnitude_spread(tv, d)}
            pruned = mj.chain(mj.Trim(d), mj.Sum())(base, [run.stripped[i]], scale=1.0)
            row["pruned"] = run.accuracy(run.with_heads(pruned), t)
            for name, scope in (("compeft", "global"), ("tensor_scope", "tensor")):
                curve = _alpha_curve(run, t, ternary.compress(tv, density=d, alpha=1.0, scope=scope), FINE_ALPHAS)
                row[name] = {"coarse": _pick(curve, coarse), "fine": _pick(curve, FINE_ALPHAS),
                             "oracle": max(curve["test"].values()), "curve": curve}
            stc = ternary.compress(tv, density=d, alpha=1.0, scale="mean_abs")
            row["stc"] = run.accuracy(run.with_heads(ternary.apply(base, stc)), t)
            row["leaf_scaled"] = run.accuracy(run.with_heads(jax.tree.map(jnp.add, base, leaf_scaled_ternary(tv, d))),
                                              t)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("compeft", "tensor_scope")}, flush=True)
            save(rows)
        del tv
        free_host_memory()
    return rows


def compeft_alone_markdown(rows: Sequence[dict]) -> str:
    """Mean test accuracy over tasks, per density, of each :func:`compeft_alone` variant (normalised by the dense
    experts in brackets)."""
    lines = ["| density | dense | pruned | ComPEFT, alpha in {1,2,4,8} | alpha 0.5-10 | oracle alpha | STC | "
             "per-leaf magnitude | tensor scope (fine alpha) | magnitude CV across leaves |", "|" + "---|" * 10]
    for d in sorted({r["density"] for r in rows}):
        rs = [r for r in rows if r["density"] == d]
        dense = np.mean([r["dense"] for r in rs])

        def cell(values: Sequence[float]) -> str:
            return f"{np.mean(values):.1f} ({100 * np.mean(values) / dense:.1f})"

        lines.append("| " + " | ".join([
            f"{d:g}", f"{dense:.1f}", cell([r["pruned"] for r in rs]),
            cell([r["compeft"]["coarse"]["test"] for r in rs]), cell([r["compeft"]["fine"]["test"] for r in rs]),
            cell([r["compeft"]["oracle"] for r in rs]), cell([r["stc"] for r in rs]),
            cell([r["leaf_scaled"] for r in rs]), cell([r["tensor_scope"]["fine"]["test"] for r in rs]),
            f"{np.mean([r['spread']['cv'] for r in rs]):.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def compeft_markdown(rows: Sequence[dict]) -> str:
    """The ComPEFT-merging rows as a Markdown table."""
    lines = ["| experts | merge | ||tau_hat|| / ||trim_k tau|| | ||merged tau|| | lambda (wide) | acc | norm. "
             "| lambda (benchmark grid) | acc | norm. |", "|" + "---|" * 10]
    for r in rows:
        w, b = r["wide"], r["benchmark"]
        lines.append(f"| {r['compression']} | {r['merge']} | {r['magnitude_ratio']:.2f} | {r['merged_norm']:.2f} "
                     f"| {w['lambda']:g} | {w['accuracy']:.1f} | {w['normalized']:.1f} | {b['lambda']:g} "
                     f"| {b['accuracy']:.1f} | {b['normalized']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="adamerging,fisher", help="comma-separated experiments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ada-budgets", default="15:0.001,60:0.001,60:0.01,180:0.01",
                   help="steps:lr pairs for layer-wise AdaMerging")
    p.add_argument("--fisher-counts", default="16,64,192")
    p.add_argument("--compeft-density", type=float, default=0.2, help="ComPEFT density of the merging experiment")
    p.add_argument("--compeft-scales", default="0.1,0.2,0.3,0.5,0.7,1.0,1.5", help="lambda grid of that experiment")
    p.add_argument("--compeft-sets", default="", help="compressions to merge (chosen,alpha1,stc,pruned,dense; all)")
    p.add_argument("--alone-densities", default="0.1,0.2", help="densities of the compeft_alone experiment")
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
            (path / "isolate.json").write_text(json.dumps(out, indent=1, default=_json_default))

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
    if "compeft" in only:
        out["compeft"] = compeft_merging(run, expert, args.compeft_density,
                                         [float(x) for x in args.compeft_scales.split(",")], save=save("compeft"),
                                         only=args.compeft_sets.split(",") if args.compeft_sets else None)
        print(compeft_markdown(out["compeft"]))
    if "compeft_alone" in only:
        out["compeft_alone"] = compeft_alone(run, expert, [float(x) for x in args.alone_densities.split(",")],
                                             COARSE_ALPHAS, save=save("compeft_alone"))
        print(compeft_alone_markdown(out["compeft_alone"]))
    (path / "isolate.json").write_text(json.dumps(out, indent=1, default=_json_default))
    print(f"wrote {path / 'isolate.json'}")
    return out


if __name__ == "__main__":
    main()
