"""Streaming-merge benchmark: merge throughput against the raw read speed of the same files, peak RSS, and mergekit.

    PYTHONPATH=$PWD python experiments/bench_stream.py [--size-mb 256] [--models 2] [--dtype float32]
        [--mergekit /tmp/mkvenv/bin/mergekit-yaml]     # from experiments/peers/mergekit_venv.sh
        [--baseline-src DIR]   # a copy of an earlier mergejax (e.g. `git archive REV mergejax | tar -x -C DIR`)

Writes T + 1 Llama-shaped sharded safetensors checkpoints (about ``--size-mb`` each) and, each in a fresh process
that repeats its work ``--repeat`` times:
  1. raw read: every tensor of every checkpoint read once with the same reader (``SafetensorsFile``);
  2. raw read + write one: the same, also writing the first checkpoint's bytes to a file (a merge reads T + 1
     checkpoints and writes one: its I/O floor);
  3. ``mergejax.stream.merge`` (task_arithmetic; ties with the paper's global trim: 3 statistic passes + the merge);
  4. ``python -m mergejax merge CONFIG.yaml OUT`` on mergekit YAML configs (task_arithmetic, ties), and the same
     configs through ``mergekit-yaml`` when its virtualenv is given;
  5. the write path alone: one model's bytes, already in memory, written to a new file by ``ndarray.tofile``, over
     an existing file's pages ("overwrite"), by ``dd`` (its first shard, from the page cache), and by
     ``io.SafetensorsWriter`` in the chunked engine's 16 MiB pieces (with and without ``fallocate``, and with an
     ``fsync``), each after ``os.sync()`` (no earlier dirty pages pending).
With ``--baseline-src`` the stream.merge and ``mergejax merge`` rows also run with that copy of mergejax, each right after the current one
(before/after in one run, under the same load).
The ratio "x raw" is defined as: merge throughput / raw read throughput, both in MB/s of the T + 1 input checkpoints'
bytes (x passes over them), the raw read being the best of its runs in this benchmark (timed at its start and at its
end); a merge reads T + 1 models and writes one, so its own ceiling is the I/O floor row's ratio.
Throughput is checkpoint bytes read (x passes) per second of in-process work (wall time for the CLIs); the first run
of a process includes JAX's start and the compiles, the later ones ("warm") reuse them, as a large model would after
its first chunks; the best of the later runs is reported, as the machine may be shared. Peak RSS is the child's
``ru_maxrss`` (= VmHWM). The files are read from the page cache in every row (they were just written), so the ratio
to the raw read is the merge's own overhead. Prints a table and writes results/bench_stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergejax.convert.io import write_sharded_safetensors  # noqa: E402

READ_SCRIPT = """
import sys, time
from mergejax.convert.io import open_checkpoint
write = sys.argv[2] != "-"
for rep in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    for i, p in enumerate(sys.argv[3:]):
        src = open_checkpoint(p)
        out = open(sys.argv[2], "wb") if write and i == 0 else None
        for k in src.keys():
            x = src.read(k)
            if out is not None:  # the copy baseline writes the first checkpoint's bytes: a merge's I/O floor
                out.write(x.data)
        if out is not None:
            out.close()
        src.close()
    print("WORK_SECONDS", time.perf_counter() - t0)
"""

WRITE_SCRIPT = """
import os, subprocess, sys, time
import numpy as np
from mergejax.convert import io
from mergejax.convert.io import SafetensorsWriter, open_checkpoint
variant, reps, out, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
src = open_checkpoint(model)
tensors = [(k, src.info(k), np.ascontiguousarray(src.read(k))) for k in src.keys()]  # the bytes, in memory
files = sorted(p for p in os.listdir(model) if p.endswith(".safetensors"))
src.close()
piece = 16 << 20  # the chunked engine's writes
if variant == "writer-no-fallocate":
    io._reserve = lambda fd, size: None
for rep in range(reps):
    if os.path.exists(out) and variant != "overwrite":
        os.unlink(out)
    os.sync()  # no dirty pages of an earlier run (or of writing the inputs) left to write back
    t0 = time.perf_counter()
    if variant in ("writer", "writer-no-fallocate", "writer+fsync"):
        w = SafetensorsWriter(out, [(k, i) for k, i, _ in tensors])
        for _, _, x in tensors:
            flat = x.reshape(-1).view(np.uint8)
            for s in range(0, flat.size, piece):
                w.write(flat[s : s + piece].view(x.dtype))
        if variant == "writer+fsync":
            os.fsync(w._file.fileno())
        w.close()
    elif variant in ("tofile", "overwrite"):
        with open(out, "r+b" if os.path.exists(out) else "wb") as f:  # overwrite: the file's pages already exist
            for _, _, x in tensors:
                x.tofile(f)
    elif variant == "dd":  # the model's first file copied by dd from the page cache (bs = one piece)
        subprocess.run(["dd", f"if={os.path.join(model, files[0])}", f"of={out}", "bs=16M", "status=none"], check=True)
    print("WORK_SECONDS", time.perf_counter() - t0)
"""

STREAM_SCRIPT = """
import sys, json, shutil, time
from mergejax import stream
hp = json.loads(sys.argv[4])
for rep in range(int(sys.argv[6])):  # the first run compiles; the later ones reuse the programs (as a large model)
    out = sys.argv[5] + f"_{rep}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    stream.merge(sys.argv[1], sys.argv[2].split(","), sys.argv[3], out, progress=False, max_shard_size="1GB", **hp)
    print("WORK_SECONDS", time.perf_counter() - t0)
    if rep:
        shutil.rmtree(out, ignore_errors=True)
"""


def llama_shapes(hidden: int, inter: int, vocab: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        for n, s in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            shapes[p + f"mlp.{n}.weight"] = s
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_models(work: Path, size_mb: float, T: int, dtype: str) -> tuple[list[Path], int]:
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    hidden, inter, vocab = 1024, 2816, 8192
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * np.dtype(np_dtype).itemsize
    fixed = 2 * vocab * hidden * np.dtype(np_dtype).itemsize
    layers = max(1, int(round((size_mb * 2**20 - fixed) / per_layer)))
    shapes = llama_shapes(hidden, inter, vocab, layers)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
           "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "torch_dtype": dtype}
    rng = np.random.default_rng(0)
    paths = []
    for m in range(T + 1):
        d = work / ("base" if m == 0 else f"ft{m}")
        tensors = {}
        for name, s in shapes.items():
            x = rng.standard_normal(s, dtype=np.float32) * (0.02 if m == 0 else 0.002)
            tensors[name] = x.astype(np_dtype)
        write_sharded_safetensors(d, tensors, max_shard_size="200MB")
        (d / "config.json").write_text(json.dumps(cfg))
        del tensors
        paths.append(d)
    nbytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    return paths, nbytes


LAUNCH_SCRIPT = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print("MAXRSS_KIB", usage.ru_maxrss, flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float, float | None, float | None]:
    """Wall seconds, peak RSS (MiB), and the work seconds of its first run and the best of its later ones (warm:
    compiled programs reused; the best, as the machine is shared) where it printed them.

    The command runs under a small launcher process that reports the command's ``ru_maxrss``: Linux keeps a
    process's maximum RSS across ``fork`` and ``exec``, so a command started straight from this (large) process would
    report at least this process's RSS.
    """
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCH_SCRIPT, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                               "HF_HUB_OFFLINE": "1", **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    work = [float(line.split()[1]) for line in lines if line.startswith("WORK_SECONDS")]
    rss = [int(line.split()[1]) for line in lines if line.startswith("MAXRSS_KIB")][-1] / 1024
    return wall, rss, work[0] if work else None, min(work[1:]) if len(work) > 1 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=256, help="size of each checkpoint")
    p.add_argument("--models", type=int, default=2, help="fine-tuned models T")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mergekit", help="mergekit-yaml of a mergekit virtualenv (experiments/peers/mergekit_venv.sh)")
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--repeat", type=int, default=3, help="runs per process (the first compiles; the best of the rest "
                   "is the warm figure)")
    p.add_argument("--baseline-src", help="directory holding an earlier mergejax package: its stream.merge rows run "
                   "too, interleaved with the current ones")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_stream.json"))
    args = p.parse_args()
    import yaml

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_stream_"))
    work.mkdir(parents=True, exist_ok=True)
    paths, model_bytes = write_models(work, args.size_mb, args.models, args.dtype)
    inputs_mb = model_bytes * len(paths) / 2**20
    py = sys.executable
    rows = []

    def row(name: str, wall: float, rss: float, work: float | None, warm: float | None, passes: int = 1) -> None:
        rows.append({"run": name, "seconds": wall, "work_seconds": work, "warm_seconds": warm, "passes": passes,
                     "read_MBps": passes * inputs_mb / (work or wall), "peak_rss_MiB": rss,
                     "warm_read_MBps": None if warm is None else passes * inputs_mb / warm})

    row("raw read", *timed([py, "-c", READ_SCRIPT, str(args.repeat), "-", *map(str, paths)]))
    row("raw read + write one (I/O floor)", *timed([py, "-c", READ_SCRIPT, str(args.repeat), str(work / "copy.bin"),
                                                   *map(str, paths)]))
    write_rows = []
    first_file = sorted(paths[0].glob("*.safetensors"))[0].stat().st_size
    for variant in ("tofile", "overwrite", "dd", "writer", "writer-no-fallocate", "writer+fsync"):
        wall, rss, work_s, warm = timed([py, "-c", WRITE_SCRIPT, variant, str(args.repeat), str(work / "write.bin"),
                                         str(paths[0])])
        nbytes = first_file if variant == "dd" else model_bytes
        best = min(x for x in (work_s, warm) if x is not None)
        write_rows.append({"variant": variant, "MiB": nbytes / 2**20, "best_seconds": best,
                           "write_MBps": nbytes / 2**20 / best})
    (work / "write.bin").unlink(missing_ok=True)
    fts = ",".join(map(str, paths[1:]))
    srcs = [("", None)] + ([(" (before)", {"PYTHONPATH": str(Path(args.baseline_src).resolve())})]
                           if args.baseline_src else [])
    for method, hp, passes in (("task_arithmetic", {"scale": 0.5}, 1), ("ties", {"density": 0.2}, 4)):
        for label, env in srcs:
            out = work / f"out_stream_{method}"
            row(f"stream.merge {method}{label}", *timed([py, "-c", STREAM_SCRIPT, str(paths[0]), fts, method,
                                                         json.dumps(hp), str(out), str(args.repeat)], env), passes)
    configs = {
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(paths[0]),
                            "models": [{"model": str(q), "parameters": {"weight": 0.5}} for q in paths[1:]]},
        "ties": {"merge_method": "ties", "base_model": str(paths[0]),
                 "models": [{"model": str(q), "parameters": {"weight": 1.0, "density": 0.2}} for q in paths[1:]]},
    }
    for name, cfg in configs.items():
        cfg = {**cfg, "dtype": args.dtype}
        cfg_path = work / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        for label, env in srcs:
            out = work / f"out_cfg_{name}"
            shutil.rmtree(out, ignore_errors=True)
            row(f"mergejax merge {name}.yaml{label}", *timed([py, "-m", "mergejax", "merge", str(cfg_path), str(out),
                                                              "--no-progress"], env))
        if args.mergekit:
            out = work / f"out_mergekit_{name}"
            shutil.rmtree(out, ignore_errors=True)
            row(f"mergekit-yaml {name}.yaml", *timed([args.mergekit, str(cfg_path), str(out), "--quiet"]))
    row("raw read (again, at the end)", *timed([py, "-c", READ_SCRIPT, str(args.repeat), "-", *map(str, paths)]))
    raw = max(r["warm_read_MBps"] or r["read_MBps"] for r in rows if r["run"].startswith("raw read ("))
    raw = max(raw, rows[0]["warm_read_MBps"] or rows[0]["read_MBps"])  # the best raw read of the run
    for r in rows:
        r["vs_raw_read"] = r["read_MBps"] / raw
        r["warm_vs_raw_read"] = None if r["warm_read_MBps"] is None else r["warm_read_MBps"] / raw
    by = {r["run"]: r for r in rows}
    for name in configs:
        mk, mj = by.get(f"mergekit-yaml {name}.yaml"), by[f"mergejax merge {name}.yaml"]
        if mk:
            mj["time_vs_mergekit"] = mj["seconds"] / mk["seconds"]
            mj["rss_vs_mergekit"] = mj["peak_rss_MiB"] / mk["peak_rss_MiB"]
    print(f"{len(paths)} checkpoints x {model_bytes / 2**20:.0f} MiB ({args.dtype}), largest tensor "
          f"{8192 * 1024 * np.dtype(np.float32 if args.dtype == 'float32' else np.float16).itemsize / 2**20:.0f} MiB")
    print("MB/s: checkpoint bytes read (x passes) per second of work (in-process timing where printed, else wall)")
    print("x raw = merge MB/s / raw read MB/s (same files, same run, best raw read); the I/O floor row is the ceiling "
          "of a merge that reads T + 1 models and writes one")
    print("x raw: first run (compiles) / best raw read; warm x: best later run in the same process (programs "
          "reused, as for a large model) / best raw read")
    print(f"{'run':36s} {'wall s':>7s} {'work s':>7s} {'MB/s':>7s} {'x raw':>6s} {'warm x':>6s} {'RSS MiB':>8s} "
          f"{'t/mk':>5s} {'rss/mk':>6s}")
    for r in rows:
        work = "-" if r["work_seconds"] is None else f"{r['work_seconds']:.2f}"
        warm = "-" if r["warm_vs_raw_read"] is None else f"{r['warm_vs_raw_read']:.2f}"
        print(f"{r['run']:36s} {r['seconds']:7.2f} {work:>7s} {r['read_MBps']:7.0f} {r['vs_raw_read']:6.2f} {warm:>6s} "
              f"{r['peak_rss_MiB']:8.0f} {r.get('time_vs_mergekit', float('nan')):5.2f} "
              f"{r.get('rss_vs_mergekit', float('nan')):6.2f}")
    print(f"\nwrite path (one model's bytes from memory to a new file in the page cache; best of {args.repeat}, each "
          "after os.sync()); raw read of the same bytes: "
          f"{raw:.0f} MB/s")
    print(f"{'variant':22s} {'MiB':>6s} {'s':>6s} {'MB/s':>7s} {'/raw read':>9s} {'/tofile':>7s}")
    plain = next(w["write_MBps"] for w in write_rows if w["variant"] == "tofile")
    for w in write_rows:
        w["vs_raw_read"], w["vs_tofile"] = w["write_MBps"] / raw, w["write_MBps"] / plain
        print(f"{w['variant']:22s} {w['MiB']:6.0f} {w['best_seconds']:6.2f} {w['write_MBps']:7.0f} "
              f"{w['vs_raw_read']:9.2f} {w['vs_tofile']:7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"models": len(paths), "model_MiB": model_bytes / 2**20,
                                          "dtype": args.dtype, "rows": rows, "write": write_rows}, indent=1) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
