"""Speed of the data-informed methods, each against a reference measured in the same run.

1. Diagonal Fisher (``mergejax.fisher.diagonal``) with each of its methods, ``"per_example"`` (``vmap(grad)``) and
   ``"dense_outer"`` (Dense layers as (x^2)^T (delta^2) matmuls), versus a per-example Python loop over the same
   per-example computation, jitted (the loop a PyTorch implementation runs), same model, same examples. Target: >= 10x
   (for the default method, "auto", which is "dense_outer" on this model).
2. One AdaMerging step (sample T batches, merge, T forwards, entropy, gradient to the coefficients, Adam) versus one
   plain forward-backward of the same model (gradient of the same entropy loss to the parameters) on the same
   T batches. Target: <= 2x.

Models: the digits toy problem's MultiHeadMLP (64 inputs), at its own width and wider. Prints a rich table and writes
``results/bench_data_informed.json``.

    python experiments/bench_data_informed.py [--widths 64,512] [--examples 512] [--tasks 4] [--steps 50]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for experiments.*

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import fisher
from experiments.toy_digits import digits_tasks
from mergejax.models.mlp import HEAD_PATTERN, MultiHeadMLP, init_params, make_apply_fn

# the module (mergejax.adamerging may be re-exported as the function of the same name in mergejax/__init__.py)
ada = importlib.import_module("mergejax.adamerging")

TASKS = ("mirror/digit", "rot90/digit", "invert/digit", "transpose/mod3", "flip/digit", "plain/parity",
         "mirror/ge5", "rot90/loop")


def _time_alternating(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Best wall time of each function (each blocks on its result), measured in turn after a warm-up of each.

    Alternating and taking the minimum keeps the ratios honest on a shared machine whose load changes over time.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def bench_fisher(apply_fn, params, data, mode: str, batch: int, repeats: int) -> dict[str, Any]:
    """``diagonal`` with method "per_example" and "dense_outer" versus a per-example loop of a jitted grad / vjp."""
    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    n = x.shape[0]
    batches = [{"x": x[i:i + batch], "y": y[i:i + batch]} for i in range(0, n, batch)]

    def per_example():
        return _block(fisher.diagonal(apply_fn, params, batches, mode=mode, method="per_example"))

    def dense_outer():
        return _block(fisher.diagonal(apply_fn, params, batches, mode=mode, method="dense_outer"))

    def logp(p, xi):
        return jax.nn.log_softmax(apply_fn(p, {"x": xi[None]}, 0)[0].astype(jnp.float32))

    if mode == "empirical":
        score = jax.jit(lambda p, xi, yi: jax.tree_util.tree_map(jnp.square, jax.grad(lambda q: logp(q, xi)[yi])(p)))
    else:  # exact: sum_y p(y|x) (d log p(y|x))^2, one vjp per example and a backward pass per class (as diagonal)
        def exact(p, xi):
            lp, vjp_fn = jax.vjp(lambda q: logp(q, xi), p)
            prob = jnp.exp(lp)

            def add_class(c, acc):
                (g,) = vjp_fn(jax.nn.one_hot(c, lp.shape[0], dtype=lp.dtype))
                return jax.tree_util.tree_map(lambda a, gi: a + prob[c] * jnp.square(gi), acc, g)

            return jax.lax.fori_loop(0, lp.shape[0], add_class, jax.tree_util.tree_map(jnp.zeros_like, p))
        score = jax.jit(lambda p, xi, yi: exact(p, xi))
    add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))

    def loop():
        total = jax.tree_util.tree_map(jnp.zeros_like, params)
        for i in range(n):
            total = add(total, score(params, x[i], y[i]))
        return _block(jax.tree_util.tree_map(lambda t: t / n, total))

    want = loop()

    def rel_err(got):
        return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                   for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)))

    err_pe, err_do = rel_err(per_example()), rel_err(dense_outer())
    t_pe, t_do, t_loop = _time_alternating((per_example, dense_outer, loop), repeats)
    return {"mode": mode, "examples": n, "batch": batch, "per_example_s": t_pe, "dense_outer_s": t_do,
            "loop_s": t_loop, "speedup_per_example": t_loop / t_pe, "speedup_dense_outer": t_loop / t_do,
            "max_rel_err_per_example": err_pe, "max_rel_err_dense_outer": err_do}


def bench_adamerging(apply_fn, base, finetuned, unlabeled, granularity: str, steps: int, batch: int,
                     repeats: int) -> dict[str, Any]:
    """Per-step time of AdaMerging versus a plain forward-backward of the same model on the same T batches."""
    n_tasks = len(finetuned)
    prob = ada._prepare(base, finetuned, None, HEAD_PATTERN, None, None)
    tasks = tuple(range(n_tasks))
    step, opt = ada._make_step(apply_fn, tasks, prob.merged_idx, prob.treedef, True, 1e-3, batch)
    data = tuple(jax.tree_util.tree_map(jnp.asarray, d) for d in unlabeled)
    shape = (n_tasks,) if granularity == "task" else (n_tasks, len(prob.merged_idx))

    def run_ada(k=jax.random.key(0)):
        raw = jnp.full(shape, 0.3, jnp.float32)
        state = opt.init(raw)
        bad = jnp.full((n_tasks,), -1, jnp.int32)
        counter = jnp.int32(1)
        _block((raw, state, bad, counter))
        t0 = time.perf_counter()
        for _ in range(steps):
            raw, state, bad, counter, loss = step(raw, state, bad, counter, k, prob.fixed, prob.tvs, data)
        _block(loss)
        return (time.perf_counter() - t0) / steps

    # the plain model: the merged parameters at lambda = 0.3, same T batches (pre-sliced: no sampling cost)
    params = ada._merged_params_jit(jnp.full((n_tasks,), 0.3), prob.fixed, prob.tvs, prob.merged_idx, prob.treedef)
    batches = tuple(jax.tree_util.tree_map(lambda a: a[:batch], d) for d in data)

    @jax.jit
    def fwd_bwd(p, bs):
        def loss(q):
            return sum(ada.entropy(apply_fn(q, b, t)).mean() for t, b in zip(tasks, bs))
        return jax.value_and_grad(loss)(p)

    def run_plain():
        _block(params)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fwd_bwd(params, batches)
        _block(out)
        return (time.perf_counter() - t0) / steps

    run_ada(), run_plain()  # compile and warm up
    t_ada, t_plain = [], []
    for _ in range(repeats):  # alternate, keep the best of each
        t_ada.append(run_ada())
        t_plain.append(run_plain())
    t_ada, t_plain = min(t_ada), min(t_plain)
    return {"granularity": granularity, "tasks": n_tasks, "batch": batch, "ada_step_ms": 1e3 * t_ada,
            "fwd_bwd_ms": 1e3 * t_plain, "ratio": t_ada / t_plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,512", help="encoder widths to benchmark (two hidden layers each)")
    parser.add_argument("--examples", type=int, default=512, help="examples in the Fisher")
    parser.add_argument("--fisher-batch", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="AdaMerging steps per timing")
    parser.add_argument("--batch", type=int, default=16, help="AdaMerging batch per task")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timing rounds (best of each is kept)")
    parser.add_argument("--out", default="results/bench_data_informed.json")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    tasks = digits_tasks(TASKS[: args.tasks])
    rows_f, rows_a = [], []
    for width in (int(w) for w in args.widths.split(",")):
        model = MultiHeadMLP(hidden=(width, width), num_classes=tuple(t.num_classes for t in tasks))
        apply_fn = make_apply_fn(model)
        base = init_params(model, jax.random.key(0), tasks[0].train["x"].shape[1])
        rng = np.random.default_rng(0)
        finetuned = [jax.tree_util.tree_map(lambda a: a + 0.02 * rng.normal(size=a.shape).astype(np.float32), base)
                     for _ in tasks]
        n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(base))
        data = {k: v[: args.examples] for k, v in tasks[0].train.items()}
        for mode in ("empirical", "exact"):
            r = bench_fisher(apply_fn, finetuned[0], data, mode, args.fisher_batch, args.repeats)
            rows_f.append({"width": width, "params": n_params, **r})
        unlabeled = [{"x": t.test["x"]} for t in tasks]
        for gran in ("task", "layer"):
            r = bench_adamerging(apply_fn, base, finetuned, unlabeled, gran, args.steps, args.batch, args.repeats)
            rows_a.append({"width": width, "params": n_params, **r})

    console = Console(width=max(Console().width, 150))
    table = Table(title="Diagonal Fisher: per_example (vmap(grad)) and dense_outer vs a per-example loop "
                        "(target >= 10x)")
    table.caption = "pe = method='per_example', do = method='dense_outer' (what 'auto' picks here)"
    for col in ("width", "params", "mode", "examples", "pe s", "do s", "loop s", "pe speedup", "do speedup",
                "max rel err pe / do"):
        table.add_column(col, justify="right")
    for r in rows_f:
        table.add_row(str(r["width"]), f"{r['params']:,}", r["mode"], str(r["examples"]),
                      f"{r['per_example_s']:.4f}", f"{r['dense_outer_s']:.4f}", f"{r['loop_s']:.3f}",
                      f"{r['speedup_per_example']:.1f}x", f"{r['speedup_dense_outer']:.1f}x",
                      f"{r['max_rel_err_per_example']:.1e} / {r['max_rel_err_dense_outer']:.1e}")
    console.print(table)
    table = Table(title="AdaMerging step vs plain forward-backward, same model and batches (target <= 2x)")
    for col in ("width", "params", "granularity", "tasks x batch", "AdaMerging ms", "fwd-bwd ms", "ratio"):
        table.add_column(col, justify="right")
    for r in rows_a:
        table.add_row(str(r["width"]), f"{r['params']:,}", r["granularity"], f"{r['tasks']} x {r['batch']}",
                      f"{r['ada_step_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}", f"{r['ratio']:.2f}x")
    console.print(table)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "args": vars(args)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "fisher": rows_f, "adamerging": rows_a}, f, indent=2)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
