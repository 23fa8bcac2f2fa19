"""Benchmark of the data-free merge methods: time and effective bandwidth against a memory-bandwidth baseline.

For each model size (millions of float32 parameters: four large [rows, 1024] kernels, their biases and a norm scale,
random normal) and each number of tasks T it builds a base model and T fine-tuned copies (base + 0.01 * noise) and
times every method on them, with ``check_finite=False``. Two modes (``--mode``):

* ``eager`` (default): the public call as a user makes it. Eager calls on concrete arrays run leaf by leaf
  (``mergejax.ops.schedule``): ``first_s`` is the first call (compilation of the per-leaf-signature programs
  included), ``best_s`` the best further call; there is no single program to analyse, so ``compile_s`` and the
  compiled peak are not reported and nothing is skipped for memory;
* ``jit``: the call traced inside the caller's ``jax.jit`` (one program), as below.

In ``jit`` mode:

* ``compile_s``: ahead-of-time lowering and compilation of ``jax.jit(lambda b, f, k: method(b, f, k))`` (the public
  call traced inside one jit: the same XLA program the call builds, its validation runs at trace time); the compiled
  program's memory analysis (arguments + temporaries + output) decides whether the combination fits in ``--mem-gb``
  and is skipped (and said so) when it does not;
* ``first_s``: the first run of that compiled program (the warm-up);
* ``best_s``: best of ``--repeats`` further runs (fewer when ``--max-seconds`` runs out);
* effective bandwidth: ``(T + 1)`` models read plus one written, in bytes / ``best_s``, and its fraction of the
  baseline measured in the same run: a jitted ``base + sum_t finetuned_t`` over the same leaves (reads the same T + 1
  arrays, writes one).

Every method runs with its default arguments (only ``check_finite=False``). The NaN/Inf input check the methods run
by default (``mergejax.tree.check_finite`` over the T + 1 models) is timed on its own, once per (size, T). Per size it
also times the exact global top-k magnitude threshold of one task vector (density 0.2): the bracketing search (the
default, its number of counting passes read back from the program) and the radix select for each ``--radix-bits``
(32 / radix_bits passes), in units of one jitted ``sum(|x|)`` pass over the same leaves ("effective passes"), next to
the cost of DARE's mask in the same unit: the counter-based hash (the default) and ``jax.random.bernoulli``.

Then, unless switched off:

* compile time: on a tree of ``--compile-leaves`` leaves (half (64, 64) kernels, half (64,) biases; T = 2), no
  persistent cache, JAX's caches cleared first: in ``eager`` mode the first call's wall time (compilation of every
  program it needs plus the run, milliseconds at this size), in ``jit`` mode lowering + XLA compilation of a fresh
  ``jax.jit``;
* peak memory: each method (and the baseline) in a fresh subprocess on the smallest size with ``--peak-tasks`` tasks:
  inputs built and the programs compiled (``eager``: one warm-up merge, its output freed and the freed heap returned
  to the OS with glibc's ``malloc_trim``, so it cannot hide the merge's own peak), ``VmHWM`` reset
  (``/proc/self/clear_refs``), one merge, and the rise of ``VmHWM`` above the resident size before it, in units of
  one model (the output alone is 1.0).

Usage::

    python experiments/bench_merge.py                                   # 25M, 100M, 200M parameters, T = 2, 4, 8
    python experiments/bench_merge.py --quick                           # 25M, T = 2, 4, four methods
    python experiments/bench_merge.py --params 100 --tasks 8 --methods task_arithmetic ties_global dare_ta
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import mergejax
from mergejax.ops import schedule
from mergejax.ops.select import key_to_float, kth_largest_groups_with_passes
from mergejax.ops.dare import keep_mask
from mergejax.tree import check_finite

PyTree = Any
GB = 1e9
WIDTH = 1024  # last axis of the large kernels
N_LARGE = 4  # large 2-D leaves per model

# name -> fn(base, finetuned, key) -> merged model: every method with its default arguments (as a user calls it),
# only the NaN/Inf check off (it is timed on its own), so only the merge is timed
METHODS: dict[str, Callable[[PyTree, tuple, jax.Array], PyTree]] = {
    "average": lambda b, f, k: mergejax.average((b, *f), check_finite=False),
    "task_arithmetic": lambda b, f, k: mergejax.task_arithmetic(b, f, check_finite=False),
    "ties_global": lambda b, f, k: mergejax.ties(b, f, check_finite=False),
    "ties_tensor": lambda b, f, k: mergejax.ties(b, f, scope="tensor", check_finite=False),
    "dare_ta": lambda b, f, k: mergejax.dare(b, f, key=k, check_finite=False),
    "dare_ties": lambda b, f, k: mergejax.dare(b, f, key=k, combine="ties", check_finite=False),
    "breadcrumbs": lambda b, f, k: mergejax.breadcrumbs(b, f, check_finite=False),
    "pcb": lambda b, f, k: mergejax.pcb(b, f, check_finite=False),
}
QUICK_METHODS = ["task_arithmetic", "ties_global", "ties_tensor", "dare_ta"]
# Each method traced inside one jax.jit: the same XLA program as the public call (whose validation runs at trace
# time), compiled once ahead of time so that its compile time and memory are known before anything runs.
JITTED = {name: jax.jit(fn) for name, fn in METHODS.items()}


@jax.jit
def baseline(b: PyTree, f: tuple) -> PyTree:
    """The one-pass limit: base + sum_t ft_t (reads the T + 1 models once, writes one)."""
    return jax.tree_util.tree_map(lambda x, *ys: x + sum(ys[1:], ys[0]), b, *f)


def model_shapes(n_params: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Leaf shapes of a model of about ``n_params`` parameters: N_LARGE kernels [rows, 1024], biases, a norm scale."""
    rows = max(1, round(n_params / (N_LARGE * WIDTH)))
    layers = {f"layer_{i}": {"kernel": (rows, WIDTH), "bias": (WIDTH,)} for i in range(N_LARGE)}
    return {**layers, "norm": {"scale": (WIDTH,)}}


def num_params(shapes: PyTree) -> int:
    return sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


@partial(jax.jit, static_argnums=1)
def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


@jax.jit
def _perturb(x: jax.Array, key: jax.Array) -> jax.Array:
    return x + 0.01 * jax.random.normal(key, x.shape, x.dtype)


def make_models(shapes: PyTree, n_tasks: int, seed: int) -> tuple[PyTree, tuple[PyTree, ...]]:
    """A random-normal base and ``n_tasks`` fine-tuned copies base + 0.01 * N(0, 1), leaf by leaf on device."""
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=is_shape)
    root = jax.random.key(seed)
    base_leaves = [_normal(jax.random.fold_in(root, i), s) for i, s in enumerate(leaves)]
    base = jax.tree_util.tree_unflatten(treedef, base_leaves)
    fts = []
    for t in range(n_tasks):
        kt = jax.random.fold_in(root, 1000 + t)
        fts.append(jax.tree_util.tree_unflatten(
            treedef, [_perturb(x, jax.random.fold_in(kt, i)) for i, x in enumerate(base_leaves)]))
    jax.block_until_ready((base, fts))
    return base, tuple(fts)


def best_time(fn: Callable[[], Any], repeats: int, max_seconds: float) -> tuple[float, int]:
    """Best wall time of ``fn()`` (blocked on its result, which is freed before the next run) and the runs done."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < repeats and (runs == 0 or spent < max_seconds):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        dt = time.perf_counter() - t
        del out
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best, runs


def abstract(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def compile_stats(jitted: Any, *args) -> tuple[float, dict[str, int]]:
    """Ahead-of-time compile time of ``jitted`` at the shapes of ``args`` and its memory analysis in bytes.

    The compiled program lands in ``jitted``'s cache, so later calls with arrays of these shapes run it directly.
    """
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    dt = time.perf_counter() - t
    ma = compiled.memory_analysis()
    mem = {
        "argument_bytes": int(getattr(ma, "argument_size_in_bytes", 0) or 0),
        "temp_bytes": int(getattr(ma, "temp_size_in_bytes", 0) or 0),
        "output_bytes": int(getattr(ma, "output_size_in_bytes", 0) or 0),
    }
    mem["peak_bytes"] = mem["argument_bytes"] + mem["temp_bytes"] + mem["output_bytes"]
    return dt, mem


def bench_methods(
    base: PyTree, fts: tuple, methods: list[str], repeats: int, max_seconds: float, mem_budget: float,
    key: jax.Array, progress: Progress, task_id: Any, mode: str = "eager",
) -> list[dict]:
    """The baseline, the finite check and every method on one (size, T)."""
    n = sum(int(x.size) for x in jax.tree_util.tree_leaves(base))
    T = len(fts)
    bytes_rw = (T + 2) * 4 * n  # T + 1 read, 1 written
    rows = []

    jax.block_until_ready(baseline(base, fts))
    base_s, runs = best_time(lambda: baseline(base, fts), max(repeats, 3), max_seconds)
    base_bw = bytes_rw / base_s
    rows.append({"method": "baseline: base + sum_t ft_t", "best_s": base_s, "runs": runs, "GBps": base_bw / GB,
                 "frac_baseline": 1.0, "bytes": bytes_rw})

    models = (base, *fts)
    check_finite(base)  # compile the check (same leaf shapes for every model)
    chk_s, runs = best_time(lambda: [check_finite(m) for m in models], repeats, max_seconds)
    chk_bytes = (T + 1) * 4 * n
    rows.append({"method": "check_finite (T+1 models)", "best_s": chk_s, "runs": runs, "GBps": chk_bytes / chk_s / GB,
                 "frac_baseline": (chk_bytes / chk_s) / base_bw, "frac_of_baseline_time": chk_s / base_s,
                 "bytes": chk_bytes})

    for name in methods:
        fn = JITTED[name] if mode == "jit" else METHODS[name]
        progress.update(task_id, description=f"{n / 1e6:.0f}M T={T} {name}")
        row: dict[str, Any] = {"method": name, "bytes": bytes_rw, "mode": mode}
        mem = {"peak_bytes": 0}
        if mode == "jit":
            compile_s, mem = compile_stats(fn, abstract(base), abstract(fts), key)
            row.update(compile_s=compile_s, **mem)
        if mem["peak_bytes"] > mem_budget:
            row["skipped"] = f"needs {mem['peak_bytes'] / GB:.1f} GB > {mem_budget / GB:.0f} GB"
        else:
            t = time.perf_counter()
            jax.block_until_ready(fn(base, fts, key))
            row["first_s"] = time.perf_counter() - t
            best, runs = best_time(lambda: fn(base, fts, key), repeats, max_seconds)
            row.update(best_s=best, runs=runs, GBps=bytes_rw / best / GB, frac_baseline=(bytes_rw / best) / base_bw,
                       time_over_baseline=best / base_s)
            info = schedule.last_info
            if mode == "eager" and (info.deferred is not None or info.passes):  # the last call's search
                row.update(search_passes=info.passes, deferred=info.deferred, reruns=info.recomputed,
                           gather_misses=info.gather_misses)
            schedule.last_info = schedule.RunInfo()
        rows.append(row)
        progress.advance(task_id)
    return rows


def bench_threshold(base: PyTree, ft: PyTree, radix_bits: list[int], repeats: int, max_seconds: float,
                    key: jax.Array) -> list[dict]:
    """Exact global top-20% magnitude threshold of one task vector, in units of one jitted sum(|x|) pass."""
    tv = jax.jit(lambda f, b: jax.tree_util.tree_map(jnp.subtract, f, b))(ft, base)
    leaves = jax.tree_util.tree_leaves(tv)
    n = sum(int(x.size) for x in leaves)
    k = int(0.2 * n)

    abs_sum = jax.jit(lambda xs: sum(jnp.abs(x).sum() for x in xs))
    jax.block_until_ready(abs_sum(leaves))
    pass_s, _ = best_time(lambda: abs_sum(leaves), max(repeats, 3), max_seconds)
    rows = [{"what": "sum(|x|) (one pass)", "best_s": pass_s, "eff_passes": 1.0, "GBps": 4 * n / pass_s / GB}]

    @jax.jit
    def counts(xs, t):
        ge = sum(jnp.sum(jnp.abs(x) >= t) for x in xs)
        gt = sum(jnp.sum(jnp.abs(x) > t) for x in xs)
        return ge, gt

    for rb in [None, *radix_bits]:
        fn = jax.jit(lambda xs, rb=rb: kth_largest_groups_with_passes([xs], [k], radix_bits=rb, magnitude=True))
        t = time.perf_counter()
        key_thr, passes = fn(leaves)
        jax.block_until_ready(key_thr)
        first = time.perf_counter() - t
        best, runs = best_time(lambda: fn(leaves), repeats, max_seconds)
        thr = key_to_float(key_thr[0])
        ge, gt = (int(c) for c in counts(leaves, thr))
        if not (ge >= k > gt):  # exactness: t is the k-th largest |x| with multiplicity
            raise AssertionError(f"threshold {float(thr)} is not the {k}-th largest: {ge} >= t, {gt} > t")
        what = "bracketing search (default)" if rb is None else f"radix select, radix_bits={rb}"
        rows.append({"what": f"global top-k threshold, {what}", "radix_bits": rb, "passes": int(passes),
                     "candidates_per_pass": 16 if rb is None else 2**rb - 1, "best_s": best, "first_s": first,
                     "runs": runs, "eff_passes": best / pass_s, "GBps": 4 * n * int(passes) / best / GB,
                     "exact": True})

    drop = jax.jit(lambda xs, k: [jnp.where(jax.random.bernoulli(jax.random.fold_in(k, i), 0.1, x.shape), x, 0)
                                  for i, x in enumerate(xs)])
    hashed = jax.jit(lambda xs, k: [jnp.where(keep_mask(x, jax.random.fold_in(k, i), 0.9), x, 0)
                                    for i, x in enumerate(xs)])
    jax.block_until_ready(hashed(leaves, key))
    best, runs = best_time(lambda: hashed(leaves, key), repeats, max_seconds)
    rows.append({"what": "DARE mask, counter-based hash (default rng='hash')", "best_s": best, "runs": runs,
                 "eff_passes": best / pass_s, "GBps": 8 * n / best / GB})
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):  # DARE takes any key; the default impl is threefry2x32
        k = jax.random.key(int(jax.random.randint(key, (), 0, 2**30)), impl=impl)
        jax.block_until_ready(drop(leaves, k))
        best, runs = best_time(lambda: drop(leaves, k), repeats, max_seconds)
        rows.append({"what": f"DARE mask where(bernoulli(p=0.1), x, 0), {impl} key", "best_s": best, "runs": runs,
                     "eff_passes": best / pass_s, "GBps": 8 * n / best / GB})
    for r in rows:
        r["params"] = n
    return rows


def compile_tree(n_leaves: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """The compile-time tree: n_leaves / 2 (64, 64) kernels and n_leaves / 2 (64,) biases."""
    return {f"layer_{i}": {"kernel": (64, 64), "bias": (64,)} for i in range(n_leaves // 2)}


def bench_compile(methods: list[str], n_leaves: int, n_tasks: int, seed: int, key: jax.Array,
                  mode: str = "eager") -> list[dict]:
    """First-call time of every method on the compile-time tree, persistent cache off and JAX's caches cleared:
    ``eager``: the public call (compiling its per-leaf programs, then running); ``jit``: lowering + XLA compilation
    of the call traced in a fresh ``jax.jit``."""
    base, fts = make_models(compile_tree(n_leaves), n_tasks, seed)
    rows = []
    for name in ["baseline", *methods]:
        jax.clear_caches()
        args = (base, fts) if name == "baseline" else (base, fts, key)
        t = time.perf_counter()
        if mode == "eager" and name != "baseline":
            jax.block_until_ready(METHODS[name](*args))
        else:
            fn = jax.jit(baseline) if name == "baseline" else jax.jit(METHODS[name])  # a fresh jit: nothing cached
            fn.lower(*args).compile()
        rows.append({"method": name, "leaves": n_leaves, "T": n_tasks, "mode": mode,
                     "compile_s": time.perf_counter() - t})
    return rows


def _vm(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _trim_heap() -> None:
    """Returns the heap's free memory to the OS (glibc ``malloc_trim``), so the resident size before a measured merge
    holds no freed buffers that the merge could reuse unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement may then read low
        pass


def peak_child(method: str, params: float, n_tasks: int, seed: int, mode: str = "eager") -> None:
    """In a fresh process: peak resident memory of one merge above its inputs, in units of one model (JSON line)."""
    shapes = model_shapes(int(params * 1e6))
    model_bytes = 4 * num_params(shapes)
    base, fts = make_models(shapes, n_tasks, seed)
    key = jax.random.key(seed + 1)
    args = (base, fts) if method == "baseline" else (base, fts, key)
    if mode == "eager" and method != "baseline":
        compiled = METHODS[method]
        jax.block_until_ready(compiled(*args))  # warm-up: compiles every per-leaf program; its output is freed
    else:
        fn = jax.jit(baseline) if method == "baseline" else jax.jit(METHODS[method])
        compiled = fn.lower(*args).compile()
    gc.collect()
    _trim_heap()  # freed warm-up buffers held by malloc would otherwise hide the merge's own peak
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _vm("VmRSS")
    out = compiled(*args)
    jax.block_until_ready(out)
    peak = _vm("VmHWM")
    print(json.dumps({"method": method, "params": num_params(shapes), "T": n_tasks, "model_bytes": model_bytes,
                      "mode": mode, "extra_models": (peak - before) / model_bytes}))


def bench_peak(methods: list[str], params: float, n_tasks: int, seed: int, mode: str = "eager") -> list[dict]:
    """Runs :func:`peak_child` for the baseline and every method, each in its own subprocess."""
    rows = []
    for name in ["baseline", *methods]:
        cmd = [sys.executable, __file__, "--peak-child", name, "--params", str(params), "--tasks", str(n_tasks),
               "--seed", str(seed), "--mode", mode]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            rows.append({"method": name, "T": n_tasks, "error": res.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def print_extra_tables(console: Console, compile_rows: list[dict], peak_rows: list[dict]) -> None:
    if compile_rows:
        table = Table(title="first call: eager (compile + run) or jit (lowering + XLA), persistent cache off")
        for col in ["method", "leaves", "T", "compile s"]:
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in compile_rows:
            table.add_row(r["method"], str(r["leaves"]), str(r["T"]), f"{r['compile_s']:.2f}")
        console.print(table)
    if peak_rows:
        table = Table(title="peak resident memory above the inputs during one merge (fresh process, VmHWM)")
        for col in ["method", "params", "T", "extra, in models"]:
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in peak_rows:
            table.add_row(r["method"], f"{r.get('params', 0) / 1e6:.0f}M", str(r["T"]),
                          f"{r['extra_models']:.2f}" if "extra_models" in r else str(r.get("error")))
        console.print(table)


def fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def print_tables(console: Console, merge_rows: list[dict], thr_rows: list[dict], title: str) -> None:
    table = Table(title=f"merge methods, {title}")
    for col in ["params", "T", "method", "compile s", "first s", "best s", "runs", "GB/s", "of baseline",
                "x baseline time", "peak GB", "note"]:
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    prev = None
    for r in merge_rows:
        if prev is not None and (r["params"], r["T"]) != prev:
            table.add_section()
        prev = (r["params"], r["T"])
        frac = r.get("frac_baseline")
        style = None if frac is None or r["method"].startswith(("baseline", "check")) else (
            "green" if frac >= 0.5 else "red")
        note = r.get("skipped", "")
        if "search_passes" in r:
            note = f"{r['search_passes']} counting passes" + (
                f", majority deferred ({r['reruns']} leaves rerun)" if r["deferred"] is not None else "")
        if r["method"].startswith("check"):
            note = f"{r['frac_of_baseline_time']:.2f}x the baseline's time"
        table.add_row(
            f"{r['params'] / 1e6:.0f}M", str(r["T"]), r["method"], fmt(r.get("compile_s"), ".2f"),
            fmt(r.get("first_s"), ".3f"), fmt(r.get("best_s"), ".4f"), fmt(r.get("runs"), "d"),
            fmt(r.get("GBps"), ".2f"), "" if frac is None else f"{100 * frac:.0f}%",
            fmt(r.get("time_over_baseline"), ".1f"),
            fmt(r["peak_bytes"] / GB if "peak_bytes" in r else None, ".2f"), note, style=style,
        )
    console.print(table)
    if not thr_rows:
        return

    table = Table(title=f"exact global top-k magnitude threshold (density 0.2, one task vector), {title}")
    for col in ["params", "what", "passes", "best s", "effective passes (x sum|x| time)", "GB/s counted"]:
        table.add_column(col, justify="left" if col == "what" else "right")
    prev = None
    for r in thr_rows:
        if prev is not None and r["params"] != prev:
            table.add_section()
        prev = r["params"]
        table.add_row(f"{r['params'] / 1e6:.0f}M", r["what"], fmt(r.get("passes"), "d"), f"{r['best_s']:.4f}",
                      f"{r['eff_passes']:.1f}", f"{r['GBps']:.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="+", default=[25, 100, 200],
                        help="model sizes, millions of params")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8], help="numbers of fine-tuned models T")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up run")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop repeating a method once its timed runs took this long (at least one run)")
    parser.add_argument("--radix-bits", type=int, nargs="+", default=[2, 4], help="for the threshold benchmark")
    parser.add_argument("--no-threshold", action="store_true", help="skip the threshold benchmark")
    parser.add_argument("--mem-gb", type=float, default=16.0,
                        help="skip combinations whose compiled peak (inputs + temporaries + output) exceeds this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_merge.json")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small subset: 25M parameters, T = 2 and 4, methods {', '.join(QUICK_METHODS)}")
    parser.add_argument("--compile-leaves", type=int, default=200,
                        help="leaves of the compile-time tree (half (64, 64) kernels, half biases); 0 skips it")
    parser.add_argument("--peak-tasks", type=int, default=4, help="T of the peak-memory runs (smallest size); 0 skips")
    parser.add_argument("--mode", choices=["eager", "jit"], default="eager",
                        help="eager: the public call (leaf by leaf); jit: the call traced inside jax.jit")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.params[0], args.tasks[0], args.seed, args.mode)
        return
    if args.quick:
        args.params, args.tasks, args.repeats = [25], [2, 4], min(args.repeats, 2)
        if args.methods == list(METHODS):
            args.methods = QUICK_METHODS

    console = Console(width=200)
    mem_budget = args.mem_gb * GB
    key = jax.random.key(args.seed + 1)
    merge_rows: list[dict] = []
    thr_rows: list[dict] = []
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    total = len(args.params) * len(args.tasks) * len(args.methods)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task_id = progress.add_task("merging", total=total)
        for size in args.params:
            shapes = model_shapes(int(size * 1e6))
            n = num_params(shapes)
            for T in sorted(args.tasks):
                inputs = (T + 2) * 4 * n  # the models plus the baseline's output
                if inputs > mem_budget:
                    merge_rows.append({"params": n, "T": T, "method": "(all)",
                                       "skipped": f"inputs need {inputs / GB:.1f} GB > {args.mem_gb:.0f} GB"})
                    progress.advance(task_id, len(args.methods))
                    continue
                progress.update(task_id, description=f"{n / 1e6:.0f}M T={T}: building models")
                base, fts = make_models(shapes, T, args.seed)
                if not args.no_threshold and T == min(args.tasks):
                    progress.update(task_id, description=f"{n / 1e6:.0f}M: top-k threshold")
                    thr_rows += bench_threshold(base, fts[0], args.radix_bits, args.repeats, args.max_seconds, key)
                rows = bench_methods(base, fts, args.methods, args.repeats, args.max_seconds, mem_budget, key,
                                     progress, task_id, args.mode)
                merge_rows += [{"params": n, "T": T, **r} for r in rows]
                del base, fts

    compile_rows, peak_rows = [], []
    if args.compile_leaves:
        console.print(f"compile time at {args.compile_leaves} leaves ...")
        compile_rows = bench_compile(args.methods, args.compile_leaves, 2, args.seed, key, args.mode)
    if args.peak_tasks:
        console.print(f"peak memory, {min(args.params):.0f}M parameters, T = {args.peak_tasks} ...")
        peak_rows = bench_peak(args.methods, min(args.params), args.peak_tasks, args.seed, args.mode)

    load = os.getloadavg()
    title = (f"{args.mode} calls, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} -> "
             f"{load[0]:.1f}, {time.perf_counter() - t_start:.0f} s")
    print_tables(console, merge_rows, thr_rows, title)
    print_extra_tables(console, compile_rows, peak_rows)
    env = {
        "jax": jax.__version__,
        "numpy": np.__version__,
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_before": load_before,
        "load_average_after": load,
        "wall_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "args": vars(args), "merge": merge_rows, "threshold": thr_rows,
                               "compile": compile_rows, "peak_memory": peak_rows},
                              indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
