"""Benchmark of the newer data-free merges (issue 10) next to task arithmetic, on ViT-B-shaped random models.

A model of ``--params`` million float32 parameters is a stack of transformer blocks of width d (Flax layout, d = 768
as ViT-B unless ``--width``): ``qkv`` (d, 3d), ``out`` (d, d), ``fc1`` (d, 4d), ``fc2`` (4d, d) kernels, their biases
and two LayerNorm scales, about 12 d^2 per block (25M: 4 blocks, 100M: 14 blocks). Fine-tuned models are
base + 0.01 * noise. Every chain method is one ``jax.jit`` with ``check_finite=False``; reported per method:

* ``first_s``: lowering + XLA compilation + the first run (what a user waits for on the first call);
* ``compile_s``: lowering + compilation alone;
* ``best_s``: the best of the first run and ``--repeats`` further runs (steady state);
* ``ratio``: best_s / best_s of task arithmetic (lambda 0.3) in the same run and process;
* ``peak_models`` (``--peak``): in a fresh subprocess per method, inputs built and the program compiled, ``VmHWM``
  reset (``/proc/self/clear_refs``), one merge, and the rise of ``VmHWM`` above the resident size before it, in units
  of one model (the output alone is 1.0); on the first ``--params`` size only.

WUDI runs ``--wudi-steps`` Adam steps (official: 300); its rows also give ``per_step_s`` = best_s / steps (an upper
bound: it includes the Gram statistics computed once). EMR is not a chain: it times :func:`mergejax.emr` plus
``model(0)`` (several jitted calls), its first call and the best of the later ones, and reports the mask bytes.

CPU threads: ``OPENBLAS_NUM_THREADS`` defaults to 1 here (set before numpy and jax load). jaxlib's CPU SVD calls
scipy's OpenBLAS, whose own thread pool competes with XLA:CPU's; on a loaded 2-core host a (768, 3072) SVD took 1.3 s
with OpenBLAS threads and 0.13 s without (10x). Export ``OPENBLAS_NUM_THREADS`` to measure another setting.

Usage::

    python experiments/bench_sota.py --params 25 --tasks 4 8 --peak --wudi-steps 20    # CPU-sized
    python experiments/bench_sota.py --params 25 100 --tasks 4 8 --repeats 2            # on an accelerator
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/jax load: see the module docstring

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import mergejax as mj  # noqa: E402

PyTree = Any
CHAINS = ("task_arithmetic", "tsv", "iso_c", "iso_cts", "cart", "wudi", "consensus_ta", "consensus_ties", "della",
          "model_stock")
METHODS = (*CHAINS, "emr")


def method_table(wudi_steps: int) -> dict[str, Callable]:
    """The chain methods with the defaults of their papers (Iso-C/CTS: FusionBench's scale 1.5)."""
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
    """(d, blocks) with blocks * 12 d^2 ~ n_params (d = 768 unless ``width``)."""
    d = width or 768
    return d, max(1, round(n_params_m * 1e6 / (12 * d * d)))


def make_model(rng: np.random.Generator, d: int, blocks: int) -> PyTree:
    """A ViT-shaped Flax tree of ``blocks`` transformer blocks of width ``d``, N(0, 0.02) entries, LN scales ~ 1."""
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


def make_models(params: float, width: int | None, n_tasks: int, seed: int) -> tuple[PyTree, list[PyTree], int, int]:
    """(base, fine-tuned list, d, n_params) on the default device; fine-tuned = base + 0.01 N(0, 1)."""
    d, blocks = width_for(params, width)
    rng = np.random.default_rng(seed)
    base_np = make_model(rng, d, blocks)
    n = sum(x.size for x in jax.tree.leaves(base_np))
    fts = [jax.device_put(jax.tree.map(lambda x: x + np.float32(0.01) * rng.standard_normal(x.shape, np.float32),
                                       base_np)) for _ in range(n_tasks)]
    return jax.device_put(base_np), fts, d, n


def run_emr(base: PyTree, fts: list[PyTree]) -> PyTree:
    """EMR-Merging and the model of task 0 (what a user needs before evaluating one task)."""
    return mj.emr(base, fts, check_finite=False).model(0)


def time_chain(fn: Callable, base: PyTree, fts: list[PyTree], repeats: int) -> dict[str, float]:
    """compile_s, first_s (compile + first run) and best_s of a jitted chain method."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(base, fts).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(1 + repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(base, fts))
        times.append(time.perf_counter() - t)
    return dict(compile_s=compile_s, first_s=compile_s + times[0], best_s=min(times))


def time_emr(base: PyTree, fts: list[PyTree], repeats: int) -> dict[str, float]:
    """first_s (first call, compiling its jitted pieces) and best_s of the later calls of :func:`run_emr`."""
    times = []
    for _ in range(1 + max(1, repeats)):
        t = time.perf_counter()
        jax.block_until_ready(run_emr(base, fts))
        times.append(time.perf_counter() - t)
    return dict(compile_s=None, first_s=times[0], best_s=min(times[1:]))


def _vm(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_child(method: str, params: float, width: int | None, n_tasks: int, wudi_steps: int, seed: int) -> None:
    """In a fresh process: peak resident memory of one merge above its inputs, in units of one model (JSON line)."""
    base, fts, _, n = make_models(params, width, n_tasks, seed)
    if method == "emr":
        run = lambda: run_emr(base, fts)  # noqa: E731
        jax.block_until_ready(run())  # compiles the jitted pieces (and counts their buffers once)
    else:
        compiled = jax.jit(method_table(wudi_steps)[method]).lower(base, fts).compile()
        run = lambda: compiled(base, fts)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _vm("VmRSS")
    jax.block_until_ready(run())
    peak = _vm("VmHWM")
    print(json.dumps({"method": method, "peak_models": (peak - before) / (4 * n)}))


def peak_models(method: str, args: argparse.Namespace, params: float, n_tasks: int) -> float | str:
    """Runs :func:`peak_child` in a subprocess; the peak in models, or the error's last line."""
    cmd = [sys.executable, __file__, "--peak-child", method, "--params", str(params), "--tasks", str(n_tasks),
           "--wudi-steps", str(args.wudi_steps), "--seed", str(args.seed)]
    if args.width:
        cmd += ["--width", str(args.width)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return "error: " + (res.stderr.strip().splitlines() or ["?"])[-1][:160]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_models"]


def print_table(console: Console, rows: list[dict]) -> None:
    table = Table(title=f"mergejax SOTA merges on {jax.devices()[0].device_kind} "
                        "(ratio = steady-state time / task arithmetic's, same run)")
    for col in ("method", "params", "T", "compile_s", "first_s", "best_s", "ratio", "peak_models"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        name = r["method"] + (f" ({r['steps']} steps)" if r["method"] == "wudi" else "")
        peak = r.get("peak_models")
        table.add_row(name, f"{r['params'] / 1e6:.1f}M", str(r["T"]),
                      "" if r.get("compile_s") is None else f"{r['compile_s']:.2f}", f"{r['first_s']:.2f}",
                      f"{r['best_s']:.3f}", f"{r['ratio']:.1f}",
                      "" if peak is None else (f"{peak:.2f}" if isinstance(peak, float) else peak))
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, nargs="+", default=[25.0], help="model sizes in millions")
    ap.add_argument("--tasks", type=int, nargs="+", default=[4])
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    ap.add_argument("--width", type=int, default=None, help="override d = 768 (blocks follow from --params)")
    ap.add_argument("--wudi-steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1, help="runs after the first (best_s is the best of all)")
    ap.add_argument("--peak", action="store_true", help="peak memory per method (subprocesses, first size only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench_sota.json")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.params[0], args.width, args.tasks[0], args.wudi_steps, args.seed)
        return

    console = Console(width=150)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                host=platform.node(), argv=sys.argv[1:], wudi_steps=args.wudi_steps, repeats=args.repeats,
                openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"))
    fns = method_table(args.wudi_steps)
    names = [m for m in METHODS if args.methods is None or m in args.methods or m == "task_arithmetic"]
    rows = []
    for si, size in enumerate(args.params):
        for T in args.tasks:
            base, fts, d, n = make_models(size, args.width, T, args.seed)
            baseline = None
            for name in names:
                if name == "model_stock" and T < 2:
                    continue
                t = time_emr(base, fts, args.repeats) if name == "emr" else time_chain(fns[name], base, fts,
                                                                                         args.repeats)
                baseline = t["best_s"] if name == "task_arithmetic" else baseline
                row = dict(method=name, params=n, d=d, T=T, **t, ratio=t["best_s"] / baseline)
                if name == "wudi":
                    row.update(steps=args.wudi_steps, per_step_s=t["best_s"] / max(1, args.wudi_steps))
                if name == "emr":
                    nb = mj.emr(base, fts, check_finite=False).nbytes()
                    row.update(bytes=nb, mask_bits_per_param_task=nb["masks_bitmap"] * 8 / (T * n),
                               coded_bits_per_param_task=nb["masks_coded"] * 8 / (T * n))
                if args.peak and si == 0:
                    row["peak_models"] = peak_models(name, args, size, T)
                rows.append(row)
                out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))  # after every row: partial runs count
                console.print(f"{n / 1e6:6.1f}M T={T} {name:16s} compile {row['compile_s'] or 0:7.2f}s "
                              f"first {row['first_s']:8.2f}s best {row['best_s']:8.3f}s x{row['ratio']:7.1f}"
                              + (f" peak {row['peak_models']}" if "peak_models" in row else ""))
            del base, fts
    print_table(console, rows)
    for r in rows:
        if r["method"] == "emr":
            console.print(f"EMR masks {r['params'] / 1e6:.1f}M T={r['T']}: {r['mask_bits_per_param_task']:.3f} "
                          f"bit/param/task as bitmaps, {r['coded_bits_per_param_task']:.3f} coded")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
