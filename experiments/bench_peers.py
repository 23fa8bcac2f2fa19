"""mergejax against its peers on the same tensors, in one sitting: PEFT merge_utils, mergekit, FusionBench TIES utils.

The peers run in their own virtualenv (``experiments/peers/setup_venv.sh``), whose interpreter is passed as
``--peers-python``; this script re-runs itself there with ``--child`` on the same tensors (a temporary ``.npz``).
Without it the peers are skipped, with a message, and only the mergejax side is timed. The peers are never
dependencies of mergejax.

Each side is timed against its own one-pass baseline in the same process (mergejax: jitted ``base + sum_t ft_t``, the
merges called eagerly as a user calls them, or traced inside ``jax.jit`` with ``--mode jit``;
torch: the same expression in eager torch), best of ``--repeats``. Methods with their usual defaults:

* task arithmetic (lambda = 1): mergejax ``task_arithmetic`` vs PEFT ``task_arithmetic``;
* TIES per tensor, density 0.2: mergejax ``ties(scope="tensor")`` vs PEFT ``ties`` and mergekit's TIES pieces
  (``sparsify`` magnitude, ``get_mask`` sum, masked weighted mean: what its ``ties`` merge method runs per tensor);
* TIES global, density 0.2: mergejax ``ties`` vs FusionBench ``ties_merging`` on the flattened task vectors;
* DARE, p = 0.9: mergejax ``dare`` vs PEFT ``dare_linear`` (density 0.1).

Usage::

    bash experiments/peers/setup_venv.sh .venv-peers
    python experiments/bench_peers.py --peers-python .venv-peers/bin/python --params 25 --tasks 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_LARGE, WIDTH = 4, 4096


def make_arrays(params: float, n_tasks: int, seed: int) -> dict[str, np.ndarray]:
    """base/<i> and ft<t>/<i>: N_LARGE kernels [rows, 4096], fine-tuned = base + 0.01 * noise."""
    rng = np.random.default_rng(seed)
    rows = max(1, round(params * 1e6 / (N_LARGE * WIDTH)))
    out = {}
    for i in range(N_LARGE):
        b = rng.standard_normal((rows, WIDTH), np.float32)
        out[f"base/{i}"] = b
        for t in range(n_tasks):
            out[f"ft{t}/{i}"] = b + np.float32(0.01) * rng.standard_normal((rows, WIDTH), np.float32)
    return out


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def split(arrays: dict, n_tasks: int) -> tuple[list, list[list]]:
    base = [arrays[f"base/{i}"] for i in range(N_LARGE)]
    fts = [[arrays[f"ft{t}/{i}"] for i in range(N_LARGE)] for t in range(n_tasks)]
    return base, fts


def run_mergejax(arrays: dict, n_tasks: int, repeats: int, mode: str = "eager") -> dict[str, float]:
    """Best times of the mergejax merges and of the jitted one-pass baseline; ``mode`` "eager": the public call as a
    user makes it (leaf by leaf, ``mergejax.ops.schedule``), "jit": the call traced inside ``jax.jit``."""
    import jax

    import mergejax as mj

    base, fts = split(arrays, n_tasks)
    base = [jax.device_put(x) for x in base]
    fts = tuple([jax.device_put(x) for x in ft] for ft in fts)
    key = jax.random.key(0)
    wrap = jax.jit if mode == "jit" else (lambda fn: fn)
    fns = {
        "baseline": jax.jit(lambda b, f: [x + sum(ys[1:], ys[0]) for x, *ys in zip(b, *f)]),
        "task_arithmetic": wrap(lambda b, f: mj.task_arithmetic(b, f, check_finite=False)),
        "ties_tensor": wrap(lambda b, f: mj.ties(b, f, scope="tensor", check_finite=False)),
        "ties_global": wrap(lambda b, f: mj.ties(b, f, check_finite=False)),
        "dare": wrap(lambda b, f: mj.dare(b, f, key=key, check_finite=False)),
    }
    return {name: best(lambda fn=fn: jax.block_until_ready(fn(base, fts)), repeats) for name, fn in fns.items()}


def run_peers(arrays: dict, n_tasks: int, repeats: int) -> dict[str, dict]:
    """In the peers' venv: every peer merge on the same tensors; a peer that fails to import or run is reported."""
    import torch

    torch.manual_seed(0)
    base, fts = split(arrays, n_tasks)
    base = [torch.from_numpy(x) for x in base]
    fts = [[torch.from_numpy(x) for x in ft] for ft in fts]
    w = torch.ones(n_tasks)
    out: dict[str, dict] = {}

    def timed(name, peer, fn):
        try:
            out[f"{name}/{peer}"] = {"peer": peer, "best_s": best(fn, repeats)}
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            out[f"{name}/{peer}"] = {"peer": peer, "error": f"{type(e).__name__}: {e}"[:200]}

    timed("baseline", "torch", lambda: [b + sum(f[i] for f in fts) for i, b in enumerate(base)])
    try:
        from peft.utils import merge_utils as pm

        def delta(i):
            return torch.stack([f[i] - base[i] for f in fts])

        timed("task_arithmetic", "peft", lambda: [base[i] + pm.task_arithmetic(list(delta(i)), w)
                                                  for i in range(N_LARGE)])
        timed("ties_tensor", "peft", lambda: [base[i] + pm.ties(list(delta(i)), w, 0.2) for i in range(N_LARGE)])
        timed("dare", "peft", lambda: [base[i] + pm.dare_linear(list(delta(i)), w, 0.1) for i in range(N_LARGE)])
    except Exception as e:  # noqa: BLE001
        out["-/peft"] = {"peer": "peft", "error": f"{type(e).__name__}: {e}"[:200]}
    try:
        from mergekit.merge_methods.generalized_task_arithmetic import get_mask
        from mergekit.sparsify import SparsificationMethod, sparsify

        def mk_ties(i):
            d = torch.stack([sparsify(f[i] - base[i], 0.2, SparsificationMethod.magnitude) for f in fts])
            mask = get_mask(d, method="sum")
            wd = w.view(-1, 1, 1) * mask
            return base[i] + (d * wd).sum(0) / wd.sum(0).clamp(min=1e-8)

        timed("ties_tensor", "mergekit", lambda: [mk_ties(i) for i in range(N_LARGE)])
    except Exception as e:  # noqa: BLE001
        out["-/mergekit"] = {"peer": "mergekit", "error": f"{type(e).__name__}: {e}"[:200]}
    try:
        from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

        def fb_ties():
            flat = torch.stack([torch.cat([(f[i] - base[i]).ravel() for i in range(N_LARGE)]) for f in fts])
            return ties_merging(flat, reset_thresh=20, merge_func="dis-mean")

        timed("ties_global", "fusion_bench", fb_ties)
    except Exception as e:  # noqa: BLE001
        out["-/fusion_bench"] = {"peer": "fusion_bench", "error": f"{type(e).__name__}: {e}"[:200]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-python", help="interpreter of the peers' venv (experiments/peers/setup_venv.sh)")
    parser.add_argument("--params", type=float, default=25.0, help="millions of parameters per model")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_peers.json")
    parser.add_argument("--mode", choices=["eager", "jit"], default="eager",
                        help="mergejax side: eager (the public call, leaf by leaf) or traced inside jax.jit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # This script's folder holds experiments/datasets.py, which would shadow Hugging Face's `datasets` that
        # FusionBench imports: the peers' side runs without it on sys.path.
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        print(json.dumps(run_peers(dict(np.load(args.child)), args.tasks, args.repeats)))
        return

    arrays = make_arrays(args.params, args.tasks, args.seed)
    ours = run_mergejax(arrays, args.tasks, args.repeats, args.mode)
    peers: dict = {}
    if not args.peers_python:
        print("no --peers-python given: the peers (PEFT, mergekit, FusionBench) are skipped; "
              "make their venv with experiments/peers/setup_venv.sh")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "arrays.npz"
            np.savez(path, **arrays)
            del arrays
            res = subprocess.run([args.peers_python, __file__, "--child", str(path), "--tasks", str(args.tasks),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True)
        if res.returncode:
            print("the peers' run failed:", res.stderr.strip().splitlines()[-3:])
        else:
            peers = json.loads(res.stdout.strip().splitlines()[-1])

    rows = []
    print(f"{'method':<18}{'mergejax s':>11}{'of 1-pass':>10}  {'peer':<14}{'peer s':>9}{'of torch 1-pass':>16}"
          f"{'mergejax faster':>16}")
    torch_base = peers.get("baseline/torch", {}).get("best_s")
    for name in ("task_arithmetic", "ties_tensor", "ties_global", "dare"):
        ours_s = ours[name]
        matches = [v for k, v in peers.items() if k.split("/")[0] == name] or [{"peer": "-"}]
        for p in matches:
            ps = p.get("best_s")
            row = {"method": name, "mergejax_s": ours_s, "mergejax_frac_baseline": ours["baseline"] / ours_s,
                   "peer": p.get("peer"), "peer_s": ps, "peer_error": p.get("error"),
                   "peer_frac_torch_baseline": torch_base / ps if ps and torch_base else None,
                   "speedup": ps / ours_s if ps else None}
            rows.append(row)
            cells = ["" if ps is None else f"{ps:.3f}",
                     "" if row["peer_frac_torch_baseline"] is None else f"{row['peer_frac_torch_baseline']:.2f}",
                     "" if ps is None else f"{row['speedup']:.1f}x"]
            print(f"{name:<18}{ours_s:>11.3f}{row['mergejax_frac_baseline']:>10.2f}  {str(row['peer']):<14}"
                  f"{cells[0]:>9}{cells[1]:>16}{cells[2]:>16}" + (f"  {p['error']}" if p.get("error") else ""))
    errors = {k: v["error"] for k, v in peers.items() if k.startswith("-/")}
    for k, e in errors.items():
        print(f"{k[2:]}: not run ({e})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "mergejax": ours, "peers": peers, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
