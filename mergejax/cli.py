"""Command line: ``python -m mergejax merge|compress|convert ...`` over orbax checkpoint directories.

    python -m mergejax merge --method ties --base BASE --finetuned A B C --out MERGED [--density 0.2 --scale 1.0]
    python -m mergejax compress --base BASE --finetuned A --out A_TERNARY [--density 0.1 --alpha 1.0]
    python -m mergejax convert --from torch --arch bert SRC DST      (see ``convert --help``)

``merge`` restores the checkpoints (orbax ``StandardCheckpointer`` directories, e.g. written by ``convert``), runs
the named method with its paper defaults unless overridden, and saves the merged tree the same way. A ``--finetuned``
entry may also be a ternary checkpoint written by ``compress`` (merged without decompressing on the host).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

USAGE = """usage: python -m mergejax <command> [args]

commands:
  merge     merge fine-tuned orbax checkpoints into one (task arithmetic, TIES, DARE, Breadcrumbs, PCB, average)
  compress  compress a fine-tuned checkpoint into a ComPEFT ternary task vector (mergejax.ternary)
  convert   convert checkpoints between PyTorch (safetensors / state dicts) and orbax (see `convert --help`)
"""

METHODS = ("average", "task_arithmetic", "ties", "dare", "breadcrumbs", "pcb")

# which command-line hyperparameters each method takes (the rest keep the method's paper default)
_METHOD_ARGS = {
    "average": (),
    "task_arithmetic": ("scale",),
    "ties": ("density", "scale", "scope", "sign_method", "reduce"),
    "dare": ("drop_rate", "rescale", "combine", "density", "scope", "scale"),
    "breadcrumbs": ("beta", "gamma", "scale"),
    "pcb": ("ratio", "scale"),
}


def _rescale(value: str) -> str | float:
    return value if value in ("inverse", "l1") else float(value)


def merge_parser() -> argparse.ArgumentParser:
    """The ``merge`` sub-command's argument parser."""
    p = argparse.ArgumentParser(prog="python -m mergejax merge", description="Merge fine-tuned orbax checkpoints.")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--base", type=Path, help="pre-trained checkpoint (not used by 'average')")
    p.add_argument("--finetuned", type=Path, nargs="+", required=True, help="fine-tuned (or ternary) checkpoints")
    p.add_argument("--out", type=Path, required=True, help="new orbax directory for the merged tree")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of DARE's drop mask")
    p.add_argument("--scale", type=float, help="lambda")
    p.add_argument("--density", type=float, help="TIES / DARE-TIES kept fraction")
    p.add_argument("--scope", choices=("global", "tensor"))
    p.add_argument("--sign-method", dest="sign_method", choices=("sum", "count"))
    p.add_argument("--reduce", choices=("mean", "sum", "max"))
    p.add_argument("--drop-rate", dest="drop_rate", type=float)
    p.add_argument("--rescale", type=_rescale, help="'inverse', 'l1' or a float q (DAREx-q)")
    p.add_argument("--combine", choices=("task_arithmetic", "ties"))
    p.add_argument("--beta", type=float)
    p.add_argument("--gamma", type=float)
    p.add_argument("--ratio", type=float)
    return p


def compress_parser() -> argparse.ArgumentParser:
    """The ``compress`` sub-command's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mergejax compress", description="Compress finetuned - base into a ComPEFT ternary vector."
    )
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--finetuned", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="directory of the ternary checkpoint")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--scope", choices=("global", "tensor"), default="global")
    p.add_argument("--scale-rule", dest="scale_rule", choices=("std", "mean_abs"), default="std")
    return p


def _restore(path: Path) -> Any:
    """An orbax StandardCheckpointer directory, or a ternary checkpoint written by ``compress``."""
    import orbax.checkpoint as ocp

    from mergejax import ternary
    from mergejax.ternary.storage import METADATA_FILE

    path = path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint directory")
    if (path / METADATA_FILE).is_file():
        return ternary.load(path)
    return ocp.StandardCheckpointer().restore(path)


def _save(path: Path, tree: Any, force: bool) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.resolve(), tree, force=force)
    checkpointer.wait_until_finished()


def run_merge(argv: list[str]) -> int:
    """``merge``: restore, merge with the named method, save. Returns the exit status."""
    import jax

    import mergejax as mj

    args = merge_parser().parse_args(argv)
    if args.method != "average" and args.base is None:
        raise SystemExit(f"--base is required for --method {args.method}")
    given = {k: getattr(args, k) for k in _METHOD_ARGS[args.method] if getattr(args, k) is not None}
    unused = [k for k in ("scale", "density", "scope", "sign_method", "reduce", "drop_rate", "rescale", "combine",
                          "beta", "gamma", "ratio") if getattr(args, k) is not None and k not in given]
    if unused:
        raise SystemExit(f"--method {args.method} does not take: {', '.join('--' + u.replace('_', '-') for u in unused)}")
    finetuned = [_restore(p) for p in args.finetuned]
    if args.method == "average":
        merged = mj.average(finetuned)
    else:
        base = _restore(args.base)
        if args.method == "dare":
            given["key"] = jax.random.key(args.seed)
        merged = getattr(mj, args.method)(base, finetuned, **given)
    _save(args.out, merged, args.force)
    print(f"{args.method} of {len(finetuned)} checkpoints {given if given else ''} -> {args.out}")
    return 0


def run_compress(argv: list[str]) -> int:
    """``compress``: ternary task vector of finetuned - base, saved with :func:`mergejax.ternary.save`."""
    import mergejax as mj
    from mergejax import ternary

    args = compress_parser().parse_args(argv)
    tv = mj.task_vector(_restore(args.finetuned), _restore(args.base))
    ttv = ternary.compress(tv, density=args.density, alpha=args.alpha, scope=args.scope, scale=args.scale_rule)
    ternary.save(args.out, ttv)
    s = ternary.stats(args.out)
    print(
        f"{s.num_params:,} parameters, {s.nnz:,} nonzeros -> {s.bytes_on_disk:,} bytes "
        f"({s.bits_per_param:.3f} bits/param, {s.compression_vs_float32:.0f}x smaller than float32) at {args.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatches to a sub-command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "merge":
        return run_merge(rest)
    if cmd == "compress":
        return run_compress(rest)
    if cmd == "convert":
        from mergejax.convert.cli import main as convert_main

        return convert_main(rest)
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2
