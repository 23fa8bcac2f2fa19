"""Command line: ``python -m mergejax convert ...`` (torch <-> orbax checkpoints)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m mergejax <command> [args]

commands:
  convert   convert checkpoints between PyTorch (safetensors / state dicts) and orbax (see `convert --help`)
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatches to a sub-command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "convert":
        from mergejax.convert.cli import main as convert_main

        return convert_main(rest)
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2
