"""Host memory of a benchmark run, row by row: VmRSS, VmHWM (peak RSS) and the bytes of live JAX arrays.

Wraps :func:`experiments.benchmark.run_method` so that after every finished row it records the process's resident
set (``/proc/self/status``) and the total ``nbytes`` of ``jax.live_arrays()`` (after ``gc.collect()``): growth in
the live arrays is state a run keeps (caches); growth in RSS beyond them is compiled programs, Python objects or
allocator fragmentation. Works on any checkout of ``experiments/`` (it only wraps the module function), so the same
command measures the code before and after a change.

Usage (benchmark overrides after ``--``)::

    python -m experiments.bench_memory --out results/memory/after.json -- --suite text --seeds 0 ...

Prints one line per row and writes ``{"rows": [...], "peak_rss_mb": ...}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def proc_status_mb(field: str) -> float:
    """``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def live_array_mb() -> float:
    """Total bytes of the live JAX arrays, in MiB (after a garbage collection)."""
    import jax

    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays()) / 2**20


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/memory/memory.json")
    args, rest = p.parse_known_args(argv)
    from experiments import benchmark

    rows: list[dict[str, Any]] = []
    inner = benchmark.run_method
    t0 = time.perf_counter()

    def measured(run, method, log):
        test = inner(run, method, log)
        rows.append(dict(method=method.key, rss_mb=proc_status_mb("VmRSS"), hwm_mb=proc_status_mb("VmHWM"),
                         live_arrays_mb=live_array_mb(), seconds=time.perf_counter() - t0))
        print("memory: " + " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in rows[-1].items()), flush=True)
        return test

    benchmark.run_method = measured
    try:
        summary = benchmark.main([a for a in rest if a != "--"])
    finally:
        benchmark.run_method = inner
    result = {"argv": list(rest), "rows": rows, "peak_rss_mb": proc_status_mb("VmHWM"),
              "final_live_arrays_mb": live_array_mb(),
              "summary_rows": {r["method"]: r["accuracy"]["per_task"] for r in summary["rows"]}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"peak RSS {result['peak_rss_mb']:.0f} MiB; wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
