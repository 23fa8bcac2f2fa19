"""``python -m mergejax convert``: torch checkpoints <-> orbax checkpoints of Flax variables.

    python -m mergejax convert --from torch --arch bert SRC DST   # SRC: file or HF directory; DST: new orbax dir
    python -m mergejax convert --from jax --arch bert SRC DST     # SRC: orbax dir; DST: safetensors dir (sharded
                                                                  # with an index above --max-shard-size)

``--arch bert`` takes bare ``BertModel`` checkpoints (-> ``BertModel`` variables) and ``BertFor*`` checkpoints whose keys
start with ``bert.`` (-> ``BertClassifier`` variables, the ``classifier`` head under ``params/heads/classifier``); the way
back writes whichever layout the variables have.

The orbax directory also holds ``mergejax_conversion.json`` (the source's key order and dropped buffers, so the way
back is bit-exact) and, when the source directory had one, ``hf_config.json`` (copied back as ``config.json``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mergejax.convert.core import ConversionRecord, flax_to_torch, torch_to_flax
from mergejax.convert.io import write_sharded_safetensors, write_torch_state_dict
from mergejax.convert.rules import available_rules

__all__ = ["main", "run", "build_parser", "RECORD_NAME", "CONFIG_NAME"]

RECORD_NAME = "mergejax_conversion.json"
CONFIG_NAME = "hf_config.json"


def build_parser() -> argparse.ArgumentParser:
    """The ``convert`` sub-command's argument parser."""
    p = argparse.ArgumentParser(prog="python -m mergejax convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", choices=("torch", "jax"), required=True, help="format of SRC")
    p.add_argument("--arch", required=True, help=f"rule set: {', '.join(available_rules())}")
    p.add_argument("src", type=Path, help="torch: checkpoint file or directory; jax: orbax directory")
    p.add_argument("dst", type=Path, help="torch->jax: orbax directory to create; jax->torch: output directory")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="report unmatched keys and go on")
    p.add_argument("--force", action="store_true", help="replace DST if it is an existing checkpoint")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="jax->torch: skip SRC's checksum check")
    p.add_argument("--max-shard-size", default="5GB", help="jax->torch: largest safetensors shard (default 5GB)")
    p.add_argument(
        "--format", choices=("safetensors", "torch"), default="safetensors", help="jax->torch: output file format"
    )
    return p


def _torch_to_jax(args: argparse.Namespace) -> None:
    from mergejax import fsutil
    from mergejax.convert.expected import expected_for, find_config
    from mergejax.model import save_tree

    dst = fsutil.check_output(args.dst, [args.src], force=args.force, flag="DST")
    target = expected_for(args.arch, args.src)
    variables, record = torch_to_flax(args.src, args.arch, strict=args.strict, target=target)
    extra = {RECORD_NAME: record.to_json()}
    config = args.src / "config.json" if args.src.is_dir() else args.src.parent / "config.json"
    if find_config(args.src) is not None:
        extra[CONFIG_NAME] = config.read_text()
    save_tree(dst, variables, force=True, extra=extra)
    n = sum(1 for _ in _leaves(variables))
    print(f"converted {len(record.torch_keys)} torch tensors ({len(record.dropped)} buffers recorded) -> {n} leaves at {dst}")


def _leaves(tree: object):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _jax_to_torch(args: argparse.Namespace) -> None:
    from mergejax import fsutil
    from mergejax.model import load_tree

    dst = fsutil.check_output(args.dst, [args.src], force=args.force, flag="DST")
    src = args.src.resolve()
    variables = load_tree(src, verify=args.verify)
    record = ConversionRecord.from_json((src / RECORD_NAME).read_text()) if (src / RECORD_NAME).is_file() else None
    tensors = flax_to_torch(variables, args.arch, record=record, strict=args.strict)
    with fsutil.atomic_dir(dst) as tmp:
        tmp.mkdir()
        if args.format == "torch":
            write_torch_state_dict(tmp / "pytorch_model.bin", tensors)
            names = ["pytorch_model.bin"]
        else:
            names = [f.name for f in write_sharded_safetensors(tmp, tensors, max_shard_size=args.max_shard_size)]
        if (src / CONFIG_NAME).is_file():
            shutil.copyfile(src / CONFIG_NAME, tmp / "config.json")
    print(f"wrote {len(tensors)} tensors to {', '.join(str(dst / n) for n in names)}")


def run(argv: list[str]) -> int:
    """``convert`` with ``argv`` (no leading ``"convert"``); raises on errors. Returns the exit status."""
    args = build_parser().parse_args(argv)
    (_torch_to_jax if args.source == "torch" else _jax_to_torch)(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``convert`` with ``argv`` (with or without a leading ``"convert"``); errors are one line, exit status 2."""
    from mergejax.cli import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    return run_command("mergejax convert", run, argv)


convert_main = main

if __name__ == "__main__":
    raise SystemExit(main())
