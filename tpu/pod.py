"""Cloud TPU VM / pod slice lifecycle for mergejax: create, set up, run on every worker, copy back, delete.

    python tpu/pod.py create    --name my-v4-32 --zone us-central2-b --accelerator v4-32 [--spot] [--dry-run]
    python tpu/pod.py setup     --name my-v4-32 --zone us-central2-b [--extras experiments,torch] [--dry-run]
    python tpu/pod.py run       --name my-v4-32 --zone us-central2-b [--dry-run] -- python3 tpu/merge_pod.py --out gs://b/m
    python tpu/pod.py copy-back --name my-v4-32 --zone us-central2-b --remote results --local ./results [--worker 0]
    python tpu/pod.py delete    --name my-v4-32 --zone us-central2-b [--dry-run]
    python tpu/pod.py session   --name ... --zone ... --accelerator v5litepod-16 [--keep] -- COMMAND...

``session`` does all five in order and deletes the slice even when the command fails (unless ``--keep``).
Every command is printed before it runs; ``--dry-run`` only prints them (nothing is created, nothing is billed).
Commands run through your own ``gcloud`` login (``gcloud auth login``); this script reads and stores no credentials.
``run`` executes the command on all workers at once (``gcloud compute tpus tpu-vm ssh --worker=all``) from the copy
of this repository that ``setup`` made in ``~/mergejax`` (inside its virtualenv ``~/mergejax/.venv``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "mergejax"
TARBALL = "mergejax.tar.gz"
DEFAULT_VERSION = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                   "v6e": "v2-alpha-tpuv6e"}
JAX_TPU = "jax[tpu]==0.10.2"


def _gcloud(args: argparse.Namespace, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *rest, "--zone", args.zone]
    if args.project:
        cmd += ["--project", args.project]
    return cmd


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return _gcloud(args, "ssh", args.name, f"--worker={worker}", "--command", command)


def default_version(accelerator: str) -> str:
    """The TPU software image for an accelerator type such as ``v4-32``, ``v5litepod-16`` or ``v5p-64``."""
    family = accelerator.rsplit("-", 1)[0]
    if family not in DEFAULT_VERSION:
        raise SystemExit(f"unknown accelerator type {accelerator!r}; pass --version explicitly")
    return DEFAULT_VERSION[family]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    """``gcloud compute tpus tpu-vm create`` of a TPU VM or pod slice."""
    cmd = _gcloud(args, "create", args.name) + [
        "--accelerator-type", args.accelerator, "--version", args.version or default_version(args.accelerator)]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
    """Copy this repository to every worker and install it, with its extras and jax[tpu], into a virtualenv."""
    tarball = f"/tmp/{TARBALL}"
    extras = f"[{args.extras}]" if args.extras else ""
    install = (
        f"mkdir -p ~/{REMOTE_DIR} && tar -xzf ~/{TARBALL} -C ~/{REMOTE_DIR} && cd ~/{REMOTE_DIR} && "
        f"{args.python} -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
        f".venv/bin/pip install -q {shlex.quote('.' + extras)} {shlex.quote(JAX_TPU)} && "
        ".venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    )
    return [
        ["tar", "-C", str(REPO), "--exclude=.venv", "--exclude=.git", "--exclude=results", "--exclude=__pycache__",
         "-czf", tarball, "."],
        _gcloud(args, "scp", tarball, f"{args.name}:~/{TARBALL}", "--worker=all"),
        _ssh(args, install),
    ]


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    """The command on every worker at once, in ~/mergejax with its virtualenv first on PATH."""
    if not args.command:
        raise SystemExit("run: give the command after --, e.g. -- python3 tpu/merge_pod.py --out gs://bucket/merged")
    command = shlex.join(args.command)
    return [_ssh(args, f"cd ~/{REMOTE_DIR} && export PATH=$HOME/{REMOTE_DIR}/.venv/bin:$PATH && {command}")]


def copy_back_commands(args: argparse.Namespace) -> list[list[str]]:
    """Copy ``--remote`` (relative to ~/mergejax) from one worker (default 0, the primary) to ``--local``."""
    local = Path(args.local)
    return [
        ["mkdir", "-p", str(local)],
        _gcloud(args, "scp", "--recurse", f"{args.name}:~/{REMOTE_DIR}/{args.remote}", str(local),
                f"--worker={args.worker}"),
    ]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    """Delete the slice (``--quiet``: no prompt)."""
    return [_gcloud(args, "delete", args.name, "--quiet")]


def execute(commands: Sequence[Sequence[str]], dry_run: bool) -> None:
    """Prints every command (``+ ...``); runs it unless ``dry_run``. Stops at the first failure."""
    for cmd in commands:
        print("+ " + shlex.join(cmd), flush=True)
        if not dry_run:
            subprocess.run(list(cmd), check=True)


def session(args: argparse.Namespace) -> None:
    """create, setup, run, copy-back, then delete (also when a step fails, unless ``--keep``)."""
    try:
        for step in (create_commands, setup_commands, run_commands, copy_back_commands):
            execute(step(args), args.dry_run)
    finally:
        if not args.keep:
            execute(delete_commands(args), args.dry_run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpu/pod.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)

    def common(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--name", required=True, help="TPU VM / slice name")
        s.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)")
        s.add_argument("--project", help="GCP project (default: gcloud's configured one)")
        s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        return s

    def creating(s: argparse.ArgumentParser) -> None:
        s.add_argument("--accelerator", required=True, help="v4-8, v4-32, v5litepod-16, v5p-64, ...")
        s.add_argument("--version", help="TPU software image (default: one per TPU generation)")
        s.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")

    def installing(s: argparse.ArgumentParser) -> None:
        s.add_argument("--extras", default="", help="pyproject extras to install, e.g. experiments,torch")
        s.add_argument("--python", default="python3.11", help="Python on the workers (mergejax needs 3.11)")

    def copying(s: argparse.ArgumentParser) -> None:
        s.add_argument("--remote", default="results", help="path under ~/mergejax on the worker")
        s.add_argument("--local", default="results", help="local destination directory")
        s.add_argument("--worker", default="0", help="worker to copy from")

    creating(common("create", "create a TPU VM or pod slice"))
    installing(common("setup", "copy this repository to every worker and install it"))
    r = common("run", "run a command on every worker")
    r.add_argument("command", nargs=argparse.REMAINDER)
    copying(common("copy-back", "copy results from a worker"))
    common("delete", "delete the slice")
    s = common("session", "create, setup, run, copy back, delete")
    creating(s)
    installing(s)
    copying(s)
    s.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    s.add_argument("command", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    steps = {"create": create_commands, "setup": setup_commands, "run": run_commands,
             "copy-back": copy_back_commands, "delete": delete_commands}
    try:
        if args.action == "session":
            session(args)
        else:
            execute(steps[args.action](args), args.dry_run)
    except subprocess.CalledProcessError as e:
        print(f"command failed with exit status {e.returncode}: {shlex.join(e.cmd)}", file=sys.stderr)
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
