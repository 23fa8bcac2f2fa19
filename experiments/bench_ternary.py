"""Benchmark of ComPEFT ternary task vectors: size against the entropy bound and orbax, host and device throughput.

For each size (parameters in one 2-D leaf, last axis 1024) and density d it compresses a Gaussian task vector with
:func:`mergejax.ternary.compress` and reports:

* bits per parameter of the entropy-coded leaf and its ratio to the bound ``H(d) + d`` (target <= 1.02);
* the ratio of orbax's default storage of the packed bitmaps (``StandardCheckpointer``, its built-in compression)
  to ours;
* host encode / decode throughput in parameters per second (best of ``--repeats``; target >= 100M/s each), by wall
  clock and by process CPU time (the codec is single-threaded numpy, so the latter is what it costs one idle core
  when other jobs share the machine);
* jitted device decode of the bitmaps to a dense float32 leaf, as effective bandwidth (bytes read + written per
  second), next to a memory-bandwidth baseline measured in the same run: jitted ``x + y`` on float32 arrays of the
  same number of parameters (target: decode >= 25% of the baseline's bandwidth).

Usage::

    python experiments/bench_ternary.py                 # quick: 10M and 30M parameters
    python experiments/bench_ternary.py --sizes 10 30 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from rich.console import Console
from rich.table import Table

from mergejax import ternary
from mergejax.ternary import codec
from mergejax.ternary.device import decode_values


def best_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """Best time of ``fn()`` over ``repeats`` runs (after the caller's warm-up) on ``clock``."""
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def orbax_default_bytes(mask: np.ndarray, sign: np.ndarray, workdir: str) -> int:
    """Bytes of orbax's default checkpoint of the two packed bitmaps (StandardCheckpointer defaults)."""
    path = os.path.join(workdir, f"orbax-{time.perf_counter_ns()}")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, {"mask": mask, "sign": sign})
        ckpt.wait_until_finished()
    return dir_bytes(path)


def bench_one(n_params: int, density: float, repeats: int, workdir: str, seed: int) -> dict:
    rows, last = n_params // 1024, 1024
    n = rows * last
    x = jax.random.normal(jax.random.key(seed), (rows, last), jnp.float32)
    t0 = time.perf_counter()
    ttv = ternary.compress({"w": x}, density=density)
    jax.block_until_ready(ttv)
    compress_s = time.perf_counter() - t0  # includes compilation
    del x
    mask, sign = np.asarray(ttv.mask[0]), np.asarray(ttv.sign[0])
    shape = (rows, last)

    blob = codec.encode_leaf(mask, sign, shape)  # warm-up
    enc_s = best_time(lambda: codec.encode_leaf(mask, sign, shape), repeats)
    # The codec is single-threaded numpy: its CPU time is its cost on an idle core, whatever else runs on the box.
    enc_cpu = best_time(lambda: codec.encode_leaf(mask, sign, shape), repeats, time.process_time)
    m2, s2 = codec.decode_leaf(blob, shape)
    if not (np.array_equal(m2, mask) and np.array_equal(s2, sign)):
        raise AssertionError("codec round trip failed")
    dec_s = best_time(lambda: codec.decode_leaf(blob, shape), repeats)
    dec_cpu = best_time(lambda: codec.decode_leaf(blob, shape), repeats, time.process_time)
    nnz = codec.read_header(blob).nnz
    d_act = nnz / n
    bound = codec.binary_entropy(d_act) + d_act
    bits = 8 * len(blob) / n
    orbax_bytes = orbax_default_bytes(mask, sign, workdir)

    decode = jax.jit(lambda m, s, c: decode_values(m, s, c, shape, jnp.float32))
    mask_d, sign_d, scale_d = ttv.mask[0], ttv.sign[0], ttv.scale[0]
    jax.block_until_ready(decode(mask_d, sign_d, scale_d))
    dev_s = best_time(lambda: decode(mask_d, sign_d, scale_d).block_until_ready(), repeats)
    add = jax.jit(lambda a, b: a + b)
    a = jnp.ones(shape, jnp.float32)
    b = jnp.full(shape, 2.0, jnp.float32)
    jax.block_until_ready(add(a, b))
    add_s = best_time(lambda: add(a, b).block_until_ready(), repeats)
    dev_bytes = 2 * mask.nbytes + 4 * n  # read both bitmaps, write float32
    add_bytes = 12 * n  # read two float32, write one
    return {
        "params": n,
        "density": density,
        "nnz": nnz,
        "bits_per_param": bits,
        "entropy_bound_bits_per_param": bound,
        "ratio_to_bound": bits / bound,
        "orbax_default_bits_per_param": 8 * orbax_bytes / n,
        "orbax_default_over_ours": orbax_bytes / len(blob),
        "compression_vs_float32": 32 / bits,
        "host_encode_params_per_s": n / enc_s,
        "host_decode_params_per_s": n / dec_s,
        "host_encode_params_per_cpu_s": n / enc_cpu,
        "host_decode_params_per_cpu_s": n / dec_cpu,
        "device_decode_params_per_s": n / dev_s,
        "device_decode_GBps": dev_bytes / dev_s / 1e9,
        "baseline_add_params_per_s": n / add_s,
        "baseline_add_GBps": add_bytes / add_s / 1e9,
        "device_decode_over_baseline_bandwidth": (dev_bytes / dev_s) / (add_bytes / add_s),
        "compress_s_incl_compile": compress_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 30], help="millions of parameters")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_ternary.json")
    args = parser.parse_args()

    console = Console(width=200)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            for density in args.densities:
                row = bench_one(int(size * 1e6), density, args.repeats, workdir, args.seed)
                results.append(row)
                console.log(f"{row['params'] / 1e6:.0f}M d={density}: {row['bits_per_param']:.4f} bits/param")

    load = os.getloadavg()[0]
    table = Table(title=f"ComPEFT ternary codec ({jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
                  f"load average {load:.1f})")
    for col in ["params", "d", "bits/param", "H(d)+d", "ratio", "orbax/ours", "vs f32", "enc M/s", "dec M/s",
                "enc M/cpu-s", "dec M/cpu-s", "dev dec GB/s", "x+y GB/s", "dev/bw"]:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            f"{r['params'] / 1e6:.0f}M",
            f"{r['density']:g}",
            f"{r['bits_per_param']:.4f}",
            f"{r['entropy_bound_bits_per_param']:.4f}",
            f"{r['ratio_to_bound']:.4f}",
            f"{r['orbax_default_over_ours']:.2f}x",
            f"{r['compression_vs_float32']:.0f}x",
            f"{r['host_encode_params_per_s'] / 1e6:.0f}",
            f"{r['host_decode_params_per_s'] / 1e6:.0f}",
            f"{r['host_encode_params_per_cpu_s'] / 1e6:.0f}",
            f"{r['host_decode_params_per_cpu_s'] / 1e6:.0f}",
            f"{r['device_decode_GBps']:.2f}",
            f"{r['baseline_add_GBps']:.2f}",
            f"{100 * r['device_decode_over_baseline_bandwidth']:.0f}%",
        )
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "jax": jax.__version__,
        "numpy": np.__version__,
        "orbax": ocp.__version__ if hasattr(ocp, "__version__") else "",
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }
    out.write_text(json.dumps({"env": env, "args": vars(args), "results": results}, indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
