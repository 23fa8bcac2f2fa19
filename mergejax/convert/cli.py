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

from mergejax.convert.core import ConversionError, ConversionRecord, flax_to_torch, torch_to_flax
from mergejax.convert.io import write_sharded_safetensors, write_torch_state_dict
from mergejax.convert.rules import available_rules

__all__ = ["main", "build_parser", "RECORD_NAME", "CONFIG_NAME"]

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
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--max-shard-size", default="5GB", help="jax->torch: largest safetensors shard (default 5GB)")
    p.add_argument(
        "--format", choices=("safetensors", "torch"), default="safetensors", help="jax->torch: output file format"
    )
    return p


def _torch_to_jax(args: argparse.Namespace) -> None:
    import orbax.checkpoint as ocp

    variables, record = torch_to_flax(args.src, args.arch, strict=args.strict)
    dst = args.dst.resolve()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(dst, variables, force=args.force)
    checkpointer.wait_until_finished()
    (dst / RECORD_NAME).write_text(record.to_json())
    config = args.src / "config.json" if args.src.is_dir() else args.src.parent / "config.json"
    if config.is_file():
        shutil.copyfile(config, dst / CONFIG_NAME)
    n = sum(1 for _ in _leaves(variables))
    print(f"converted {len(record.torch_keys)} torch tensors ({len(record.dropped)} buffers recorded) -> {n} leaves at {dst}")


def _leaves(tree: object):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _jax_to_torch(args: argparse.Namespace) -> None:
    import orbax.checkpoint as ocp

    src = args.src.resolve()
    variables = ocp.StandardCheckpointer().restore(src)
    record = ConversionRecord.from_json((src / RECORD_NAME).read_text()) if (src / RECORD_NAME).is_file() else None
    tensors = flax_to_torch(variables, args.arch, record=record, strict=args.strict)
    if args.dst.exists() and any(args.dst.iterdir()):
        if not args.force:
            raise FileExistsError(f"{args.dst} exists and is not empty (pass --force to replace it)")
        shutil.rmtree(args.dst)
    args.dst.mkdir(parents=True, exist_ok=True)
    if args.format == "torch":
        write_torch_state_dict(args.dst / "pytorch_model.bin", tensors)
        files = [args.dst / "pytorch_model.bin"]
    else:
        files = write_sharded_safetensors(args.dst, tensors, max_shard_size=args.max_shard_size)
    if (src / CONFIG_NAME).is_file():
        shutil.copyfile(src / CONFIG_NAME, args.dst / "config.json")
    print(f"wrote {len(tensors)} tensors to {', '.join(str(f) for f in files)}")


def main(argv: list[str] | None = None) -> int:
    """Run ``convert`` with ``argv`` (with or without a leading ``"convert"``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        (_torch_to_jax if args.source == "torch" else _jax_to_torch)(args)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    return 0


convert_main = main

if __name__ == "__main__":
    raise SystemExit(main())
