"""mergejax end-to-end demo on built-in data (scikit-learn digits), run by `make demo`.

1. Pre-train a small multi-head MLP on the plain digits, fine-tune one expert per task (mirrored digits, rotated
   digits, inverted ink, transposed digits mod 3).
2. Merge the experts with every method: data-free (average, task arithmetic, TIES, DARE, DARE-TIES, Breadcrumbs,
   PCB, TIES+LiNeS) and data-informed (Fisher, RegMean, AdaMerging task/layer/++).
3. Compress each expert to a ComPEFT ternary task vector, save it with orbax, reload it, and merge from the
   compressed experts.
4. Evaluate every model on every task's test split and print a table; write results/demo.json and results/demo.png.

Per-task classification heads are never merged: each task is evaluated with its own expert's head on top of the
merged encoder (as in the TIES / AdaMerging papers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for experiments.*

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import mergejax as mj
from mergejax import fisher, ternary
from experiments.toy_digits import accuracy, build_toy_problem
from mergejax.tree import path_str

console = Console(width=120)


def with_expert_heads(merged: Any, finetuned: Any, heads: str) -> Any:
    """Per-task heads are not merged: head t is taken from expert t (other leaves from ``merged``)."""
    rx = re.compile(heads)

    def leaf(kp, m, *fts):
        path = path_str(kp)
        if not rx.search(path):
            return m
        t = int(re.search(r"head_(\d+)", path).group(1))
        return fts[t]

    return jax.tree_util.tree_map_with_path(leaf, merged, *finetuned)


def batches(x: np.ndarray, y: np.ndarray | None, size: int, n: int) -> list[dict[str, jnp.ndarray]]:
    out = []
    for i in range(n):
        sl = slice(i * size, (i + 1) * size)
        b = {"x": jnp.asarray(x[sl])}
        if y is not None:
            b["y"] = jnp.asarray(y[sl])
        out.append(b)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="pre-training and fine-tuning Adam steps")
    p.add_argument("--ada-steps", type=int, default=150, help="AdaMerging steps")
    p.add_argument("--density", type=float, default=0.1, help="ComPEFT density")
    p.add_argument("--out", default="results", help="directory for demo.json and demo.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    console.print("[bold]1. building the toy problem[/] (digits, one expert per task)")
    prob = build_toy_problem(pretrain_steps=args.steps, finetune_steps=args.steps, seed=args.seed)
    base, fts, tasks, apply_fn, heads = prob.base, list(prob.finetuned), prob.tasks, prob.apply_fn, prob.heads
    T = len(tasks)
    key = jax.random.key(args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(base))
    console.print(f"   {T} tasks: {', '.join(t.name for t in tasks)}; {n_params:,} parameters")

    def evaluate(params: Any, own_heads: bool = True) -> list[float]:
        params = with_expert_heads(params, fts, heads) if own_heads else params
        return [accuracy(apply_fn, params, t.test, i) for i, t in enumerate(tasks)]

    rows: dict[str, list[float]] = {}
    rows["pre-trained base (expert heads)"] = evaluate(base)
    rows["individual experts"] = [accuracy(apply_fn, fts[i], t.test, i) for i, t in enumerate(tasks)]

    console.print("[bold]2. data-free merges[/]")
    lines = mj.lines(0.5, 1.0, mj.blocks_from_regex(base, r"encoder_(\d+)/"))
    data_free: dict[str, Callable[[], Any]] = {
        "weight averaging": lambda: mj.average(fts),
        "task arithmetic (λ=0.3)": lambda: mj.task_arithmetic(base, fts, scale=0.3),
        "TIES (k=20%, λ=1)": lambda: mj.ties(base, fts, density=0.2, scale=1.0),
        "TIES per-tensor, count sign": lambda: mj.ties(base, fts, scope="tensor", sign_method="count"),
        "DARE + task arithmetic (p=0.9, λ=0.3)": lambda: mj.dare(base, fts, key=key, drop_rate=0.9, scale=0.3),
        "DARE-TIES (p=0.5, k=20%)": lambda: mj.dare(base, fts, key=key, drop_rate=0.5, combine="ties"),
        "Breadcrumbs (β=0.15, γ=0.006, λ=0.5)": lambda: mj.breadcrumbs(base, fts, scale=0.5),
        "PCB (ratio=0.05, λ=1.2)": lambda: mj.pcb(base, fts),
        "TIES then LiNeS": lambda: mj.chain(mj.Trim(0.2), mj.ElectSign(), mj.DisjointMean(), lines)(base, fts),
    }
    for name, fn in tqdm(data_free.items(), desc="data-free merges"):
        rows[name] = evaluate(fn())

    console.print("[bold]3. data-informed merges[/]")
    train_b = [batches(t.train["x"], t.train["y"], 64, 4) for t in tasks]
    test_unlabeled = [batches(t.test["x"], None, 64, 4) for t in tasks]
    fishers = [
        fisher.diagonal(apply_fn, fts[i], train_b[i], task=i, mode="exact") for i in tqdm(range(T), desc="Fisher")
    ]
    rows["Fisher merging"] = evaluate(mj.fisher_merge(fts, fishers, heads=heads, base=base))
    rows["RegMean (α=0.9)"] = evaluate(mj.regmean(apply_fn, base, fts, train_b, alpha=0.9, heads=heads))
    unl = [{"x": jnp.asarray(t.test["x"])} for t in tasks]
    for gran, pp in (("task", False), ("layer", False), ("layer", True)):
        merged, _ = mj.adamerging(
            apply_fn, with_expert_heads(base, fts, heads), [with_expert_heads(f, fts, heads) for f in fts], unl,
            granularity=gran, steps=args.ada_steps, plus_plus=pp, key=key, heads=heads,
        )
        rows[f"AdaMerging{'++' if pp else ''} ({gran}-wise)"] = evaluate(merged)

    console.print(f"[bold]4. ComPEFT ternary experts[/] (density {args.density})")
    with tempfile.TemporaryDirectory() as tmp:
        ttvs, sizes = [], []
        for i, (f, t) in enumerate(zip(fts, tasks)):
            # ComPEFT tunes alpha on validation data; the training split stands in for it here
            search = ternary.choose_alpha(
                mj.task_vector(f, base),
                lambda c, i=i, t=t: accuracy(apply_fn, ternary.apply(base, c), t.train, i),
                density=args.density,
            )
            ttv = search.ttv
            ternary.save(Path(tmp) / f"expert_{i}", ttv)
            sizes.append(ternary.stats(Path(tmp) / f"expert_{i}"))
            ttvs.append(ternary.load(Path(tmp) / f"expert_{i}"))
        s0 = sizes[0]
    rows["ComPEFT experts (each alone)"] = [
        accuracy(apply_fn, ternary.apply(base, ttvs[i]), t.test, i) for i, t in enumerate(tasks)
    ]
    rows["task arithmetic of ComPEFT experts (λ=0.3)"] = evaluate(mj.task_arithmetic(base, ttvs, scale=0.3))
    rows["TIES of ComPEFT experts"] = evaluate(mj.ties(base, ttvs))

    table = Table(title=f"mergejax demo: test accuracy per task ({time.perf_counter() - t0:.0f} s)")
    table.add_column("method")
    for t in tasks:
        table.add_column(t.name, justify="right")
    table.add_column("mean", justify="right", style="bold")
    for name, accs in rows.items():
        table.add_row(name, *[f"{100 * a:.1f}" for a in accs], f"{100 * np.mean(accs):.1f}")
    console.print(table)
    console.print(
        f"ComPEFT expert 0 on disk: {s0.bytes_on_disk:,} bytes for {s0.num_params:,} parameters, "
        f"{s0.bits_per_param:.3f} bits/param (entropy bound {s0.entropy_bound_bits_per_param:.3f}), "
        f"{s0.compression_vs_float32:.0f}x smaller than float32"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"tasks": [t.name for t in tasks], "accuracy": rows, "compressed_expert_0": s0._asdict()}
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=float))
    plot(rows, out / "demo.png")
    console.print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}")
    return result


def plot(rows: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    means = [100 * np.mean(rows[n]) for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1))
    ax.barh(names[::-1], means[::-1], color="tab:blue")
    ax.set_xlabel("mean test accuracy over tasks (%)")
    ax.set_xlim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
