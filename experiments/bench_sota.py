"""Benchmark of the newer data-free merges (issue 10) next to task arithmetic, on ViT-shaped random models.

A model of ``--params`` million float32 parameters is a stack of transformer blocks of width d (Flax layout):
``qkv`` (d, 3d), ``out`` (d, d), ``fc1`` (d, 4d), ``fc2`` (4d, d) kernels, their biases and two LayerNorm scales
(about 12 d^2 per block; d = 512 for 25M, d = 768 for 100M, as ViT-B). Fine-tuned models are base + 0.01 * noise.
Every method runs inside one ``jax.jit`` with ``check_finite=False``; reported: ``first_s`` (compile + first run),
``best_s`` (best of ``--repeats`` runs) and ``ratio`` = best_s / best_s of task arithmetic in the same run.
WUDI runs ``--wudi-steps`` Adam steps (official: 300). EMR times :func:`mergejax.emr` plus ``model(0)``.

Usage::

    python experiments/bench_sota.py                                 # 25M parameters, T = 4 (CPU-sized)
    python experiments/bench_sota.py --params 25 100 --tasks 4 8     # on an accelerator
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

import mergejax as mj

PyTree = Any


def method_table(wudi_steps: int) -> dict[str, Callable]:
    key = jax.random.key(0)
    return {
        "task_arithmetic": lambda b, f: mj.task_arithmetic(b, f, scale=0.3, check_finite=False),
        "tsv": lambda b, f: mj.tsv(b, f, check_finite=False),
        "iso_c": lambda b, f: mj.iso_c(b, f, scale=1.5, check_finite=False),
        "iso_cts": lambda b, f: mj.iso_cts(b, f, scale=1.5, check_finite=False),
        "cart": lambda b, f: mj.cart(b, f, check_finite=False),
        "wudi": lambda b, f: mj.wudi(b, f, steps=wudi_steps, progress=False, check_finite=False),
        "consensus_ta": lambda b, f: mj.consensus_ta(b, f, scale=0.3, check_finite=False),
        "consensus_ties": lambda b, f: mj.consensus_ties(b, f, check_finite=False),
        "della": lambda b, f: mj.della(b, f, key=key, check_finite=False),
        "model_stock": lambda b, f: mj.model_stock(b, f, check_finite=False),
    }


def width_for(n_params_m: float, width: int | None = None) -> tuple[int, int]:
    """(d, blocks) with 12 d^2 blocks ~ n_params: d = 512 below 50M, else 768 (or ``width``)."""
    d = width or (512 if n_params_m < 50 else 768)
    return d, max(1, round(n_params_m * 1e6 / (12 * d * d)))


def make_model(rng: np.random.Generator, d: int, blocks: int) -> PyTree:
    def f(*shape, s=0.02):
        return (s * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    return {
        f"block_{i}": {
            "qkv": {"kernel": f(d, 3 * d), "bias": f(3 * d)},
            "out": {"kernel": f(d, d), "bias": f(d)},
            "fc1": {"kernel": f(d, 4 * d), "bias": f(4 * d)},
            "fc2": {"kernel": f(4 * d, d), "bias": f(d)},
            "ln1": {"scale": 1 + f(d)},
            "ln2": {"scale": 1 + f(d)},
        }
        for i in range(blocks)
    }


def _ready(x):
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    _ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, nargs="+", default=[25.0], help="model sizes in millions")
    ap.add_argument("--tasks", type=int, nargs="+", default=[4])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--width", type=int, default=None, help="override d (then blocks follow from --params)")
    ap.add_argument("--wudi-steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-emr", action="store_true")
    ap.add_argument("--out", default="results/bench_sota.json")
    args = ap.parse_args()

    console = Console()
    table_fns = method_table(args.wudi_steps)
    names = args.methods or list(table_fns)
    if "task_arithmetic" not in names:
        names = ["task_arithmetic", *names]
    rows = []
    for size in args.params:
        d, blocks = width_for(size, args.width)
        rng = np.random.default_rng(0)
        base_np = make_model(rng, d, blocks)
        n = sum(x.size for x in jax.tree.leaves(base_np))
        for T in args.tasks:
            base = jax.device_put(base_np)
            fts = [jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape, dtype=np.float32), base_np) for _ in range(T)]
            fts = [jax.device_put(f) for f in fts]
            baseline = None
            for name in names:
                jitted = jax.jit(table_fns[name])
                first, best = time_call(lambda: jitted(base, fts), args.repeats)
                baseline = best if name == "task_arithmetic" else baseline
                rows.append(dict(method=name, params=n, d=d, T=T, first_s=first, best_s=best, ratio=best / baseline))
                console.print(f"{n / 1e6:6.2f}M T={T} {name:16s} first {first:8.3f}s best {best:8.3f}s x{best / baseline:8.1f}")
            if not args.no_emr:
                def run_emr():
                    res = mj.emr(base, fts, check_finite=False)
                    return res.model(0)

                first, best = time_call(run_emr, args.repeats)
                rows.append(dict(method="emr", params=n, d=d, T=T, first_s=first, best_s=best, ratio=best / baseline))
                res = mj.emr(base, fts, check_finite=False)
                nb = res.nbytes()
                rows[-1]["bytes"] = nb
                console.print(f"{n / 1e6:6.2f}M T={T} {'emr':16s} first {first:8.3f}s best {best:8.3f}s x{best / baseline:8.1f}"
                              f"  masks {nb['masks_bitmap'] / T / n * 8:.3f} bit/param/task (bitmap),"
                              f" {nb['masks_coded'] / T / n * 8:.3f} (coded)")
            del fts

    table = Table(title=f"mergejax SOTA merges on {jax.devices()[0].device_kind} (ratio = time / task arithmetic)")
    for col in ("method", "params", "T", "first_s", "best_s", "ratio"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in rows:
        table.add_row(r["method"], f"{r['params'] / 1e6:.2f}M", str(r["T"]), f"{r['first_s']:.3f}", f"{r['best_s']:.4f}",
                      f"{r['ratio']:.1f}")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                host=platform.node(), wudi_steps=args.wudi_steps, repeats=args.repeats)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
