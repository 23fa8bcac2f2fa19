"""Command line: ``python -m mergejax merge|compress|convert ...`` over orbax checkpoint directories.

    python -m mergejax merge --method ties --base BASE --finetuned A B C --out MERGED [--density 0.2 --scale 1.0]
    python -m mergejax compress --base BASE --finetuned A --out A_TERNARY [--density 0.1 --alpha 1.0]
    python -m mergejax convert --from torch --arch bert SRC DST      (see ``convert --help``)

``merge`` restores the checkpoints (orbax ``StandardCheckpointer`` directories, e.g. written by ``convert``), runs
the named method with its paper defaults unless overridden, and saves the merged tree the same way. A ``--finetuned``
entry may also be a ternary checkpoint written by ``compress`` (merged without decompressing on the host).

The hyperparameter flags of ``merge`` come from the methods' Python signatures (``inspect.signature(mj.ties)``...):
a flag the chosen method does not take is an error, never silently ignored. Every command follows one output policy
(:mod:`mergejax.fsutil`): an existing output is refused unless ``--force``; an output that is, contains or is inside
an input is always refused; a replacement is atomic. Errors are one line on stderr with exit status 2 (``--debug``
shows the traceback). Dense checkpoints carry per-array CRC-32s, verified on load unless ``--no-verify``.

Environment: ``MERGEJAX_CACHE`` (default ``~/.cache/mergejax``) holds JAX's persistent compilation cache under
``jax/``; ``MERGEJAX_COMPILE_CACHE=0`` turns that cache off.
"""

from __future__ import annotations

import argparse
import collections.abc
import inspect
import math
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

USAGE = """usage: python -m mergejax <command> [args] [--debug]

commands:
  merge     merge fine-tuned orbax checkpoints into one (task arithmetic, TIES, DARE, Breadcrumbs, PCB, average)
  compress  compress a fine-tuned checkpoint into a ComPEFT ternary task vector (mergejax.ternary)
  convert   convert checkpoints between PyTorch (safetensors / state dicts) and orbax (see `convert --help`)

--debug shows the full traceback of an error (otherwise: one line on stderr, exit status 2)
"""

METHODS = ("average", "task_arithmetic", "ties", "dare", "breadcrumbs", "pcb")
METHODS_TAKING_ENCODED = ("task_arithmetic", "ties", "dare", "breadcrumbs", "pcb")

# keyword-only parameters of the methods that are not command-line hyperparameters
_NOT_FLAGS = ("check_finite", "key")
# options that only act together with another option's value: {method: {option: (other option, value)}}
_REQUIRES = {"dare": {"density": ("combine", "ties"), "scope": ("combine", "ties")}}
_HELP = {
    "scale": "lambda, the task-vector scale",
    "density": "TIES / DARE-TIES kept fraction (one value, or one per task)",
    "weights": "one weight per --finetuned checkpoint",
    "heads": "regular expression of leaf paths kept per task (classification heads)",
    "rescale": "'inverse', 'l1' or a float q (DAREx-q)",
}


class CliError(ValueError):
    """A usage error of the command line: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------- flags from the signatures
def method_function(method: str) -> Callable[..., Any]:
    """The ``mergejax`` function behind ``--method``."""
    import mergejax as mj

    return getattr(mj, method)


def method_options(method: str) -> dict[str, inspect.Parameter]:
    """The command-line hyperparameters of ``method``: its keyword-only parameters, less ``check_finite``/``key``."""
    sig = inspect.signature(method_function(method))
    return {n: p for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY and n not in _NOT_FLAGS}


def method_takes_key(method: str) -> bool:
    """Whether ``method`` draws random numbers (takes ``key=``, exposed as ``--seed``)."""
    return "key" in inspect.signature(method_function(method)).parameters


def _hints(method: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(method_function(method))
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        return {}


def _flatten_union(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(hint) for m in _flatten_union(a)]
    return [hint]


def _is_float_sequence(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin not in (tuple, list, collections.abc.Sequence):
        return False
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    return bool(args) and all(a in (float, int) for a in args)


def _scalar(text: str, literals: tuple[str, ...], kinds: tuple[type, ...]) -> Any:
    if text in literals:
        return text
    for kind in kinds:
        try:
            return kind(text)
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(
        f"{text!r} is not one of {list(literals)}" if literals and not kinds else f"invalid value {text!r}"
    )


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_spec(name: str, param: inspect.Parameter, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for one method parameter, from its annotation (or its default's type)."""
    if name == "heads":
        return {"type": str, "metavar": "REGEX"}
    if name == "weights":
        return {"type": float, "nargs": "+", "metavar": "W"}
    members = _flatten_union(hint) if hint is not None else [type(param.default)]
    members = [m for m in members if m is not type(None)]
    literals = tuple(str(v) for m in members if typing.get_origin(m) is typing.Literal for v in typing.get_args(m))
    kinds = tuple(dict.fromkeys(m for m in members if m in (int, float)))
    sequence = any(_is_float_sequence(m) for m in members)
    if members == [bool]:
        return {"type": _bool}
    if literals and not kinds and not sequence:
        return {"choices": literals}
    if sequence:
        return {"type": float, "nargs": "+", "metavar": name.upper()}
    if not kinds and isinstance(param.default, (int, float)):
        kinds = (type(param.default),)
    kinds = tuple(sorted(kinds, key=lambda k: k is float))  # int before float when both are allowed
    return {"type": lambda s, lit=literals, k=kinds or (str,): _scalar(s, lit, k)}


def _all_options() -> dict[str, tuple[inspect.Parameter, Any]]:
    out: dict[str, tuple[inspect.Parameter, Any]] = {}
    for method in METHODS:
        hints = _hints(method)
        for name, param in method_options(method).items():
            out.setdefault(name, (param, hints.get(name)))
    return out


def merge_parser() -> argparse.ArgumentParser:
    """The ``merge`` sub-command's argument parser (hyperparameter flags from the methods' signatures)."""
    p = argparse.ArgumentParser(prog="python -m mergejax merge", description="Merge fine-tuned orbax checkpoints.")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--base", type=Path, help="pre-trained checkpoint (not used by 'average')")
    p.add_argument("--finetuned", type=Path, nargs="+", required=True, help="fine-tuned (or ternary) checkpoints")
    p.add_argument("--out", type=Path, required=True, help="new orbax directory for the merged tree")
    p.add_argument("--force", action="store_true", help="replace --out if it is an existing checkpoint")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the inputs' checksum check")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="PRNG seed of random methods (DARE); default 0")
    for name, (param, hint) in _all_options().items():
        users = [m for m in METHODS if name in method_options(m)]
        default = param.default if param.default is not inspect.Parameter.empty else "required"
        text = f"{_HELP.get(name, name)} ({', '.join(users)}; default {default})"
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=text,
                       **_flag_spec(name, param, hint))
    return p


def compress_parser() -> argparse.ArgumentParser:
    """The ``compress`` sub-command's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m mergejax compress", description="Compress finetuned - base into a ComPEFT ternary vector."
    )
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--finetuned", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="directory of the ternary checkpoint")
    p.add_argument("--force", action="store_true", help="replace --out if it is an existing ternary checkpoint")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the inputs' checksum check")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--scope", choices=("global", "tensor"), default="global")
    p.add_argument("--scale-rule", dest="scale_rule", choices=("std", "mean_abs"), default="std")
    return p


# --------------------------------------------------------------------------------------------------- validation
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_finite_numbers(values: dict[str, Any]) -> None:
    """Raises :class:`CliError` naming the first float option (or list element) that is NaN or infinite."""
    for name, value in values.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise CliError(f"{_flag(name)} {v} is not a finite number; pass a finite value")


def method_hyperparameters(method: str, given: dict[str, Any], n_models: int) -> dict[str, Any]:
    """Checks the options given on the command line against ``method``'s signature; returns its keyword arguments.

    Raises:
      CliError: an option the method does not take (or that has no effect with the other options), a non-finite
        number, or ``--weights`` whose count differs from the number of models.
    """
    options = method_options(method)
    unused = [k for k in given if k not in options and not (k == "seed" and method_takes_key(method))]
    if unused:
        raise CliError(f"--method {method} does not take: {', '.join(_flag(u) for u in unused)} (see merge --help)")
    kwargs = {k: v for k, v in given.items() if k != "seed"}
    for name, (other, value) in _REQUIRES.get(method, {}).items():
        current = kwargs.get(other, options[other].default if other in options else None)
        if name in kwargs and current != value:
            raise CliError(f"{_flag(name)} has no effect with --method {method} --{other} {current}; "
                           f"pass --{other} {value} or drop {_flag(name)}")
    check_finite_numbers(kwargs)
    if "weights" in kwargs and len(kwargs["weights"]) != n_models:
        raise CliError(f"--weights has {len(kwargs['weights'])} values for {n_models} --finetuned checkpoints; "
                       "give one weight per checkpoint")
    for name, value in kwargs.items():  # a one-element list for a parameter that also takes a scalar
        if isinstance(value, list):
            kwargs[name] = value[0] if len(value) == 1 and name != "weights" else tuple(value)
    return kwargs


# ---------------------------------------------------------------------------------------------------------- I/O
def _is_ternary(path: Path) -> bool:
    from mergejax.ternary.storage import METADATA_FILE

    return (path / METADATA_FILE).is_file()


def restore(path: Path, *, verify: bool = True, what: str = "checkpoint") -> Any:
    """An orbax StandardCheckpointer directory (checksums verified), or a ternary checkpoint written by ``compress``.

    Warns (naming the leaves) about float64 leaves that JAX's x64 mode would compute in float32.
    """
    from mergejax import fsutil, ternary
    from mergejax.model import load_tree
    from mergejax.precision import warn_float64

    path = Path(os.path.abspath(path))
    if not path.exists():
        fsutil.recover(path)
    if not path.is_dir():
        raise CliError(f"{what} {path} is not a checkpoint directory (no such directory)")
    if _is_ternary(path):
        return ternary.load(path)
    tree = load_tree(path, verify=verify)
    warn_float64(tree, what=f"{what} {path}")
    return tree


def _check_result(merged: Any, reference: Any, method: str) -> None:
    """The merged tree must be a dense model with the reference's structure (never ternary bitmaps)."""
    import jax

    from mergejax.ternary import TernaryTaskVector

    if isinstance(merged, TernaryTaskVector) or jax.tree_util.tree_structure(merged) != jax.tree_util.tree_structure(
            reference):
        raise CliError(f"--method {method} returned a {type(merged).__name__}, not a model with the inputs' "
                       "structure; nothing was written (please report this)")


def run_merge(argv: list[str]) -> int:
    """``merge``: restore, merge with the named method, save. Returns the exit status."""
    if argv and argv[0].endswith((".yaml", ".yml")):  # mergekit style: merge CONFIG.yaml OUT (mergejax.config)
        from mergejax.config import main as config_main

        return config_main(argv)
    import jax

    from mergejax import fsutil
    from mergejax.model import save_tree
    from mergejax.precision import warn_float16_overflow
    from mergejax.ternary import TernaryTaskVector

    args = merge_parser().parse_args(argv)
    fixed = {"method", "base", "finetuned", "out", "force", "verify"}
    given = {k: v for k, v in vars(args).items() if k not in fixed}
    if args.method != "average" and args.base is None:
        raise CliError(f"--base is required for --method {args.method}")
    if args.method == "average" and args.base is not None:
        raise CliError("--method average does not take --base (it averages the --finetuned models)")
    kwargs = method_hyperparameters(args.method, given, len(args.finetuned))
    inputs = list(args.finetuned) + ([args.base] if args.base is not None else [])
    out = fsutil.check_output(args.out, inputs, force=args.force)
    finetuned = [restore(p, verify=args.verify, what="--finetuned") for p in args.finetuned]
    encoded = [str(p) for p, t in zip(args.finetuned, finetuned) if isinstance(t, TernaryTaskVector)]
    if encoded and args.method not in METHODS_TAKING_ENCODED:
        raise CliError(f"--method {args.method} merges models, but {encoded[0]} is a ternary task vector (written by "
                       "compress); use --method task_arithmetic/ties/dare/... with --base, or the dense checkpoint")
    fn = method_function(args.method)
    if args.method == "average":
        reference = finetuned[0]
        merged = fn(finetuned, **kwargs)
    else:
        base = restore(args.base, verify=args.verify, what="--base")
        if isinstance(base, TernaryTaskVector):
            raise CliError(f"--base {args.base} is a ternary task vector, not a model; pass the pre-trained checkpoint")
        reference = base
        if method_takes_key(args.method):
            kwargs["key"] = jax.random.key(given.get("seed", 0))
        merged = fn(base, finetuned, **kwargs)
    _check_result(merged, reference, args.method)
    warn_float16_overflow(merged)
    save_tree(out, merged, force=True)
    shown = {k: v for k, v in kwargs.items() if k != "key"}
    print(f"{args.method} of {len(finetuned)} checkpoints {shown if shown else ''} -> {out}")
    return 0


def run_compress(argv: list[str]) -> int:
    """``compress``: ternary task vector of finetuned - base, saved with :func:`mergejax.ternary.save`."""
    import mergejax as mj
    from mergejax import fsutil, ternary

    args = compress_parser().parse_args(argv)
    check_finite_numbers({"density": args.density, "alpha": args.alpha})
    out = fsutil.check_output(args.out, [args.base, args.finetuned], force=args.force)
    ft = restore(args.finetuned, verify=args.verify, what="--finetuned")
    base = restore(args.base, verify=args.verify, what="--base")
    for flag, tree, path in (("--finetuned", ft, args.finetuned), ("--base", base, args.base)):
        if isinstance(tree, ternary.TernaryTaskVector):
            raise CliError(f"{flag} {path} is already a ternary task vector; compress takes dense checkpoints")
    tv = mj.task_vector(ft, base)
    ttv = ternary.compress(tv, density=args.density, alpha=args.alpha, scope=args.scope, scale=args.scale_rule)
    ternary.save(out, ttv)
    s = ternary.stats(out)
    print(
        f"{s.num_params:,} parameters, {s.nnz:,} nonzeros -> {s.bytes_on_disk:,} bytes "
        f"({s.bits_per_param:.3f} bits/param, {s.compression_vs_float32:.0f}x smaller than float32) at {out}"
    )
    return 0


# ------------------------------------------------------------------------------------------- errors and startup
def one_line(err: BaseException, limit: int = 600) -> str:
    """An exception as one line: its message's lines joined with '; ', cut at ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "".join(ln + ("" if i == len(lines) - 1 else " " if ln.endswith(":") else "; ")
                   for i, ln in enumerate(lines)) or type(err).__name__
    if not isinstance(err, (CliError, ValueError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def enable_compile_cache(root: str | os.PathLike | None = None, *, min_compile_secs: float = 0.0) -> None:
    """JAX's persistent compilation cache under ``root/jax`` (default ``$MERGEJAX_CACHE``, else
    ``~/.cache/mergejax``), unless ``MERGEJAX_COMPILE_CACHE=0``; a later run of the same merge skips its XLA
    compiles. Used by the CLI and the experiment scripts; the test suite sets ``MERGEJAX_COMPILE_CACHE=0``."""
    if os.environ.get("MERGEJAX_COMPILE_CACHE", "1").lower() in ("0", "false", "off", "no"):
        return
    if root is None:
        root = os.environ.get("MERGEJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mergejax")
    path = os.path.join(os.path.abspath(root), "jax")
    try:
        import jax

        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    except (OSError, AttributeError, ValueError):  # read-only home or an older jax: run without the cache
        return


def _show_warning(prog: str) -> Callable[..., None]:
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' API
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    return show


def run_command(prog: str, fn: Callable[[list[str]], int], argv: list[str]) -> int:
    """Runs a sub-command: any error becomes one line ``PROG: error: ...`` on stderr and exit status 2.

    ``--debug`` anywhere in ``argv`` re-raises instead (full traceback).
    """
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    previous = warnings.showwarning
    warnings.showwarning = _show_warning(prog)
    try:
        return fn(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's one-line error contract
        if debug:
            raise
        print(f"{prog}: error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous


def main(argv: list[str] | None = None) -> int:
    """Dispatches to a sub-command; returns the process exit status.

    Called without ``argv`` (``python -m mergejax``, the ``mergejax`` script) it reads ``sys.argv`` and turns on the
    persistent compilation cache; with ``argv`` (from Python) it leaves JAX's configuration alone.
    """
    from_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    commands: dict[str, Callable[[list[str]], int]] = {"merge": run_merge, "compress": run_compress}
    if cmd == "convert":
        from mergejax.convert.cli import run as convert_run

        commands["convert"] = convert_run
    if cmd not in commands:
        print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if from_process:
        enable_compile_cache()
    status = run_command(f"mergejax {cmd}", commands[cmd], rest)
    if from_process and status != 0 and "--debug" not in rest:
        # after a failed restore, TensorStore callbacks still pending on orbax's closed event loop print a stray
        # "Event loop is closed" traceback during interpreter teardown; nothing is left to clean up (partial outputs
        # were removed already), so end the process here and keep stderr to the one-line error
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
