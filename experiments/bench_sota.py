"""Benchmark of the newer data-free merges (issue 10) next to task arithmetic, on ViT-B-shaped random models.

A model of ``--params`` million float32 parameters is a stack of transformer blocks of width d (Flax layout, d = 768
as ViT-B unless ``--width``): ``qkv`` (d, 3d), ``out`` (d, d), ``fc1`` (d, 4d), ``fc2`` (4d, d) kernels, their biases
and two LayerNorm scales, about 12 d^2 per block (25M: 4 blocks, 100M: 14 blocks). Fine-tuned models are
base + 0.01 * noise. Every method runs with ``check_finite=False``, called as a user calls it: ``--mode eager``
(default) calls it on the concrete models, so the merges that allow it run leaf by leaf
(:mod:`mergejax.ops.schedule`: one small program per leaf signature; WUDI and DELLA do); ``--mode jit`` wraps it in one
``jax.jit`` (a single program). Reported per method:

* ``first_s``: the first call, compilation included (what a user waits for on the first call);
* ``compile_s``: lowering + compilation alone (``--mode jit`` only);
* ``best_s``: the best of the ``--repeats`` further runs (steady state; ``--mode jit``: of the first run too, which
  excludes the compilation there; ``--repeats 0``: the first call);
* ``ratio``: best_s / best_s of task arithmetic (lambda 0.3) in the same run and process;
* ``peak_models`` (``--peak``): in a fresh subprocess per method, inputs built and the programs compiled (eager: by a
  first call), ``VmHWM`` reset (``/proc/self/clear_refs``), one merge, and the rise of ``VmHWM`` above the resident
  size before it, in units of one model (the output alone is 1.0); on the first ``--params`` size only.

``della`` is :func:`mergejax.della` (DELLA-TIES as one stage, :class:`mergejax.DellaTies`: one pruning pass leaf by
leaf); ``della_3stage`` is the same merge as ``chain(Della(), ElectSign(), DisjointMean())``, which leaf by leaf prunes
every leaf twice (for the majority sign, then for the output).

WUDI runs ``--wudi-steps`` Adam steps (official: 300); its rows also give ``per_step_s`` = best_s / steps (an upper
bound: it includes the Gram statistics computed once). EMR is not a chain: it times :func:`mergejax.emr` plus
``model(0)`` (several jitted calls), its first call and the best of the later ones, and reports the mask bytes.

CPU threads: ``OPENBLAS_NUM_THREADS`` defaults to 1 here (set before numpy and jax load). jaxlib's CPU SVD calls
scipy's OpenBLAS, whose own thread pool competes with XLA:CPU's; on a loaded 2-core host a (768, 3072) SVD took 1.3 s
with OpenBLAS threads and 0.13 s without (10x). Export ``OPENBLAS_NUM_THREADS`` to measure another setting.

Usage::

    python experiments/bench_sota.py --params 25 --tasks 4 8 --peak --wudi-steps 20    # CPU-sized
    python experiments/bench_sota.py --params 25 100 --tasks 4 8 --repeats 2            # on an accelerator
    python experiments/bench_sota.py --params 25 --tasks 4 --wudi-steps 10 --peers-python /tmp/peers-venv/bin/python
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/jax load: see the module docstring

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
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
          "della_3stage", "model_stock")
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
        # the same merge as chain(Della, ElectSign, DisjointMean): leaf by leaf it prunes every leaf twice
        "della_3stage": lambda b, f: mj.chain(*mj.DellaTies().stages())(b, f, key=key, check_finite=False),
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


def time_chain(fn: Callable, base: PyTree, fts: list[PyTree], repeats: int, mode: str = "eager"
               ) -> tuple[dict[str, float], PyTree]:
    """(compile_s (jit mode), first_s (first call, compile included) and best_s, the merged model) of a method."""
    compile_s = None
    if mode == "jit":
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(base, fts).compile()
        compile_s = time.perf_counter() - t0
        call = lambda: compiled(base, fts)  # noqa: E731
    else:
        call = lambda: fn(base, fts)  # noqa: E731
    times = []
    for _ in range(1 + repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(call())
        times.append(time.perf_counter() - t)
    first = times[0] + (compile_s or 0.0)
    best = min(times) if mode == "jit" else min(times[1:] or times)
    return dict(compile_s=compile_s, first_s=first, best_s=best), out


def time_emr(base: PyTree, fts: list[PyTree], repeats: int) -> tuple[dict[str, float], PyTree]:
    """(first_s (first call, compiling its jitted pieces) and best_s of the later calls of :func:`run_emr`, task 0's
    model)."""
    times = []
    for _ in range(1 + max(1, repeats)):
        t = time.perf_counter()
        out = jax.block_until_ready(run_emr(base, fts))
        times.append(time.perf_counter() - t)
    return dict(compile_s=None, first_s=times[0], best_s=min(times[1:])), out


# ------------------------------------------------------------------------------------------- FusionBench side by side
PEERS_SCRIPT = Path(__file__).parent / "peers" / "fusionbench_sota.py"
PEER_OF = {"tsv": "tsv", "iso_c": "iso_c", "iso_cts": "iso_cts", "wudi": "wudi", "emr": "emr",
           "consensus_ta": "tall_masks"}  # our method -> FusionBench function (fusionbench_sota.PEER_METHODS)
SCALE_OF = {"iso_c": 1.5, "iso_cts": 1.5, "consensus_ta": 0.3}  # method_table's scales (FusionBench's outputs: 1)


def _peers_module():
    """experiments/peers/fusionbench_sota.py as a module (its conversions and ``rel_diffs``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fusionbench_sota", PEERS_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def to_state_dict(tree: PyTree) -> dict[str, np.ndarray]:
    """A bench model as a PyTorch state dict: ``a/b/kernel`` -> ``a.b.weight`` (transposed), ``scale`` -> ``weight``."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        *mods, leaf = [str(k.key) for k in path]
        x = np.asarray(x, np.float32)
        if leaf == "kernel":
            out[".".join(mods + ["weight"])] = np.ascontiguousarray(x.T)
        else:
            out[".".join(mods + ["weight" if leaf == "scale" else leaf])] = x
    return out


def run_peer(peers_python: str, sd_npz: str, method: str, wudi_steps: int, timeout: float
             ) -> tuple[dict[str, np.ndarray] | None, float | None, str | None]:
    """One FusionBench function in a child process on the saved state dicts: (outputs, seconds, error)."""
    with tempfile.TemporaryDirectory() as tmp:
        o, i = Path(tmp) / "fb.npz", Path(tmp) / "fb.json"
        cmd = [peers_python, str(PEERS_SCRIPT), "--child", str(o), str(i), "--load", sd_npz, "--only", method,
               "--wudi-steps", str(wudi_steps)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, None, f"timeout > {timeout:.0f} s"
        if res.returncode:
            return None, None, "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:160]
        info = json.loads(i.read_text())
        if info["errors"]:
            return None, None, "; ".join(info["errors"].values())[:160]
        return dict(np.load(o)), info["times"].get(method), None


def peer_check(name: str, merged: PyTree, base: PyTree, theirs: dict, peers) -> dict[str, float]:
    """The numeric cross-check of our merged model against FusionBench's merged task vector(s)."""
    ours_sd = to_state_dict(jax.tree.map(lambda m, b: (np.asarray(m, np.float32) - np.asarray(b, np.float32))
                                         / SCALE_OF.get(name, 1.0), merged, base))
    if name == "consensus_ta":
        flat = np.concatenate([v.reshape(-1) for v in ours_sd.values()])
        d = peers.rel_diffs({"c/flat": flat}, {"c/flat": theirs["consensus_ta/flat"]}, "c")
    else:
        prefix = "emr_task0" if name == "emr" else name
        d = peers.rel_diffs({f"{prefix}/{k}": v for k, v in ours_sd.items()}, theirs, prefix)
    return {} if d is None else {"fb_rel_fro": d["rel_fro"], "fb_rel_max": d["rel_max"]}


def _vm(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_child(method: str, params: float, width: int | None, n_tasks: int, wudi_steps: int, seed: int,
               mode: str = "eager") -> None:
    """In a fresh process: peak resident memory of one merge above its inputs, in units of one model (JSON line)."""
    base, fts, _, n = make_models(params, width, n_tasks, seed)
    if method == "emr":
        run = lambda: run_emr(base, fts)  # noqa: E731
        jax.block_until_ready(run())  # compiles the jitted pieces (and counts their buffers once)
    elif mode == "jit":
        compiled = jax.jit(method_table(wudi_steps)[method]).lower(base, fts).compile()
        run = lambda: compiled(base, fts)  # noqa: E731
    else:
        fn = method_table(wudi_steps)[method]
        run = lambda: fn(base, fts)  # noqa: E731
        jax.block_until_ready(run())  # compiles its programs
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _vm("VmRSS")
    jax.block_until_ready(run())
    peak = _vm("VmHWM")
    print(json.dumps({"method": method, "peak_models": (peak - before) / (4 * n)}))


def peak_models(method: str, args: argparse.Namespace, params: float, n_tasks: int) -> float | str:
    """Runs :func:`peak_child` in a subprocess; the peak in models, or the error's last line."""
    cmd = [sys.executable, __file__, "--peak-child", method, "--params", str(params), "--tasks", str(n_tasks),
           "--wudi-steps", str(args.wudi_steps), "--seed", str(args.seed), "--mode", args.mode]
    if args.width:
        cmd += ["--width", str(args.width)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return "error: " + (res.stderr.strip().splitlines() or ["?"])[-1][:160]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_models"]


def print_table(console: Console, rows: list[dict]) -> None:
    table = Table(title=f"mergejax SOTA merges on {jax.devices()[0].device_kind} "
                        "(ratio = steady-state time / task arithmetic's, same run)")
    peers = any("fusionbench_s" in r for r in rows)
    cols = ["method", "params", "T", "compile_s", "first_s", "best_s", "ratio", "peak_models"]
    if peers:
        cols += ["fusionbench_s", "fb/mj", "fb_rel_fro", "fb_rel_max"]
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        name = r["method"] + (f" ({r['steps']} steps)" if r["method"] == "wudi" else "")
        peak = r.get("peak_models")
        table.add_row(name, f"{r['params'] / 1e6:.1f}M", str(r["T"]),
                      "" if r.get("compile_s") is None else f"{r['compile_s']:.2f}", f"{r['first_s']:.2f}",
                      f"{r['best_s']:.3f}", f"{r['ratio']:.1f}",
                      "" if peak is None else (f"{peak:.2f}" if isinstance(peak, float) else peak),
                      *([r.get("fb_error") or _fmt(r.get("fusionbench_s"), ".2f"), _fmt(r.get("fb_over_mj"), ".1f"),
                         _fmt(r.get("fb_rel_fro"), ".1e"), _fmt(r.get("fb_rel_max"), ".1e")] if peers else []))
    console.print(table)


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


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
    ap.add_argument("--mode", choices=("eager", "jit"), default="eager",
                    help="eager: called on concrete models (leaf by leaf where it applies); jit: one jax.jit program")
    ap.add_argument("--peers-python", help="the peers venv's python (fusion-bench): FusionBench side by side")
    ap.add_argument("--peer-methods", nargs="+", default=list(PEER_OF), choices=list(PEER_OF))
    ap.add_argument("--peer-timeout", type=float, default=240.0, help="seconds per FusionBench function")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.params[0], args.width, args.tasks[0], args.wudi_steps, args.seed, args.mode)
        return

    console = Console(width=150)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                host=platform.node(), argv=sys.argv[1:], wudi_steps=args.wudi_steps, repeats=args.repeats,
                openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"), mode=args.mode,
                uptime=Path("/proc/loadavg").read_text().split()[:3], peers_python=args.peers_python)
    peers = _peers_module() if args.peers_python else None
    tmpdir = tempfile.TemporaryDirectory()
    fns = method_table(args.wudi_steps)
    names = [m for m in METHODS if args.methods is None or m in args.methods or m == "task_arithmetic"]
    rows = []
    for si, size in enumerate(args.params):
        for T in args.tasks:
            base, fts, d, n = make_models(size, args.width, T, args.seed)
            baseline = None
            sd_npz = None
            if args.peers_python:
                sd_npz = str(Path(tmpdir.name) / f"sd_{size}_{T}.npz")
                peers.save_state_dicts(sd_npz, [to_state_dict(m) for m in (base, *fts)])
            for name in names:
                if name == "model_stock" and T < 2:
                    continue
                if name == "emr":
                    t, merged = time_emr(base, fts, args.repeats)
                else:
                    t, merged = time_chain(fns[name], base, fts, args.repeats, args.mode)
                baseline = t["best_s"] if name == "task_arithmetic" else baseline
                row = dict(method=name, params=n, d=d, T=T, **t, ratio=t["best_s"] / baseline,
                           loadavg=Path("/proc/loadavg").read_text().split()[:3])
                if name == "wudi":
                    row.update(steps=args.wudi_steps, per_step_s=t["best_s"] / max(1, args.wudi_steps))
                if name == "emr":
                    nb = mj.emr(base, fts, check_finite=False).nbytes()
                    row.update(bytes=nb, mask_bits_per_param_task=nb["masks_bitmap"] * 8 / (T * n),
                               coded_bits_per_param_task=nb["masks_coded"] * 8 / (T * n))
                if sd_npz is not None and name in PEER_OF and name in args.peer_methods:
                    theirs, fb_s, err = run_peer(args.peers_python, sd_npz, PEER_OF[name], args.wudi_steps,
                                                 args.peer_timeout)
                    row.update(fusionbench_s=fb_s, fb_over_mj=fb_s / t["best_s"] if fb_s else None, fb_error=err)
                    if theirs is not None:
                        row.update(peer_check(name, merged, base, theirs, peers))
                del merged
                if args.peak and si == 0:
                    row["peak_models"] = peak_models(name, args, size, T)
                rows.append(row)
                out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))  # after every row: partial runs count
                console.print(f"{n / 1e6:6.1f}M T={T} {name:16s} compile {_fmt(row['compile_s'], '7.2f') or '      -'}s "
                              f"first {row['first_s']:8.2f}s best {row['best_s']:8.3f}s x{row['ratio']:7.1f}"
                              + (f" peak {row['peak_models']}" if "peak_models" in row else "")
                              + (f" | FusionBench {_fmt(row.get('fusionbench_s'), '.2f')}s "
                                 f"rel_fro {_fmt(row.get('fb_rel_fro'), '.1e')} {row.get('fb_error') or ''}"
                                 if "fusionbench_s" in row else ""), highlight=False)
            del base, fts
            if sd_npz is not None:
                Path(sd_npz).unlink()
    print_table(console, rows)
    for r in rows:
        if r["method"] == "emr":
            console.print(f"EMR masks {r['params'] / 1e6:.1f}M T={r['T']}: {r['mask_bits_per_param_task']:.3f} "
                          f"bit/param/task as bitmaps, {r['coded_bits_per_param_task']:.3f} coded")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
