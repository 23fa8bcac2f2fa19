"""What the per-array CRC-32 of dense checkpoints costs: save_tree / load_tree with and without it.

For a model of ``--mib`` MiB of float32 (leaves of 4 MiB), it times, best of ``--repeats``:

* ``save_tree(checksum=False)`` (the orbax save plus the atomic swap) against ``save_tree(checksum=True)``;
* ``load_tree(verify=False)`` against ``load_tree(verify=True)``;

and prints the ratios (with / without), by wall clock and by process CPU time (the CRC is single-threaded host work:
CPU time is what it costs when other jobs share the machine). Writes ``results/bench_checksum.json``.

Usage::

    python experiments/bench_checksum.py              # 256 MiB
    python experiments/bench_checksum.py --mib 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mergejax.model import load_tree, save_tree


def best(fn, repeats: int) -> tuple[float, float]:
    """Best (wall, cpu) seconds of ``fn()`` over ``repeats`` runs."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/bench_checksum.json"))
    args = p.parse_args()
    rows_per_leaf = 1024  # 1024 x 1024 float32 = 4 MiB per leaf
    n_leaves = max(1, args.mib // 4)
    rng = np.random.default_rng(0)
    tree = {f"layer{i}": {"kernel": jax.device_put(rng.normal(size=(rows_per_leaf, 1024)).astype(np.float32))}
            for i in range(n_leaves)}
    root = Path(tempfile.mkdtemp(prefix="bench_checksum_"))
    try:
        def save(checksum: bool) -> None:
            save_tree(root / "ck", tree, force=True, checksum=checksum)

        def load(verify: bool) -> None:
            jax.block_until_ready(load_tree(root / "ck", verify=verify))

        save(True)  # warm-up (and the checkpoint the loads read)
        load(True)
        results = {
            "save": {"plain": best(lambda: save(False), args.repeats), "crc32": best(lambda: save(True), args.repeats)},
        }
        results["load"] = {"plain": best(lambda: load(False), args.repeats),
                           "crc32": best(lambda: load(True), args.repeats)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{n_leaves * 4} MiB float32 in {n_leaves} leaves, best of {args.repeats} ({platform.processor() or 'cpu'})")
    print(f"{'step':<6}{'plain s':>10}{'crc32 s':>10}{'ratio wall':>12}{'ratio cpu':>11}")
    report = {"mib": n_leaves * 4, "leaves": n_leaves, "repeats": args.repeats, "steps": {}}
    for step, r in results.items():
        (pw, pc), (cw, cc) = r["plain"], r["crc32"]
        print(f"{step:<6}{pw:>10.3f}{cw:>10.3f}{cw / pw:>12.2f}{cc / pc:>11.2f}")
        report["steps"][step] = {"plain_wall_s": pw, "crc32_wall_s": cw, "ratio_wall": cw / pw,
                                 "plain_cpu_s": pc, "crc32_cpu_s": cc, "ratio_cpu": cc / pc}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
