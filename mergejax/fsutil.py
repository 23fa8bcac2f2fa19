"""The output policy of every mergejax writer: refuse to clobber, never overlap an input, replace atomically.

Every command (``merge``, ``compress``, ``convert``) and every library writer (:func:`mergejax.model.save_tree`,
:func:`mergejax.ternary.save`) writes its output ``OUT`` the same way:

1. :func:`check_output`: an existing ``OUT`` is refused unless ``force``; an ``OUT`` that is, contains or lies inside
   an input is always refused; with ``force`` only an existing *checkpoint* (or an empty directory) is replaced,
   never an unrelated folder or a file.
2. :func:`atomic_dir`: the new version is written to the hidden sibling ``.OUT.saving-<tag>``; once complete, the old
   version is renamed to ``.OUT.old-<tag>``, the new one to ``OUT``, and only then is the old one removed. A
   process killed at any moment leaves either the old or the new version at ``OUT`` or in ``.OUT.old-<tag>``.
3. :func:`recover`: the next writer (or reader) of ``OUT`` puts an orphaned ``.OUT.old-<tag>`` back when ``OUT`` is
   missing (a crash between the two renames) and removes the other leftovers of earlier runs: ``.OUT.saving-*``
   (including the ``*.orbax-checkpoint-tmp*`` folders orbax writes inside those names), ``.OUT.old-*`` and orbax's
   own ``OUT.orbax-checkpoint-tmp*``. It touches nothing else: only names that these writers create.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "OutputError",
    "check_output",
    "atomic_dir",
    "recover",
    "leftovers",
    "is_checkpoint_dir",
    "SAVING",
    "OLD",
]

SAVING = "saving"
OLD = "old"
_ORBAX_TMP = ".orbax-checkpoint-tmp"
_KILL_ENV = "MERGEJAX_TEST_KILL_AT"  # test hook: SIGKILL this process at the named point of atomic_dir

# files that mark a directory as a checkpoint written by orbax, mergejax.ternary or ``convert --from jax``
_CHECKPOINT_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "ternary.json",
                       "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class OutputError(ValueError):
    """An output path that would clobber data or overlap an input; the message says what to do instead."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _is_torch_output_file(name: str) -> bool:
    """Files ``convert --from jax`` writes into a torch output directory."""
    return (name in ("config.json", "pytorch_model.bin", "model.safetensors.index.json")
            or (name.startswith("model") and name.endswith(".safetensors")))


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a checkpoint that a mergejax writer may replace.

    An orbax or ternary checkpoint (its marker files), or a torch output of ``convert --from jax`` holding only the
    files that command writes (a Hugging Face model folder with a tokenizer or README is not replaced).
    """
    p = Path(path)
    if not p.is_dir() or not any((p / m).exists() for m in _CHECKPOINT_MARKERS):
        return False
    orbax_or_ternary = any((p / m).exists() for m in ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt",
                                                      "ternary.json"))
    return orbax_or_ternary or all(_is_torch_output_file(e.name) for e in p.iterdir())


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "is inside"
    return None


def check_output(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, force: bool = False, flag: str = "--out"
) -> Path:
    """Applies the output policy to ``out`` before anything is read or written.

    Args:
      out: the output path.
      inputs: every path the command reads.
      force: allow replacing an existing checkpoint at ``out``.
      flag: how the output is named in messages (``--out``, ``DST``, ``directory``).

    Returns:
      ``out``, absolute and resolved.

    Raises:
      OutputError: ``out`` is, contains or is inside an input; ``out`` exists and ``force`` is False; ``out`` exists
        and is a file, or a non-empty directory that is not a checkpoint.
    """
    path = _resolved(out)
    for inp in inputs:
        rel = _relation(path, _resolved(inp))
        if rel is not None:
            raise OutputError(f"{flag} {path} {rel} the input {_resolved(inp)}; choose an output outside every input")
    recover(path)
    if not os.path.lexists(path):
        return path
    if not force:
        raise OutputError(f"{flag} {path} already exists; pass --force to replace it, or choose a new path")
    if not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a checkpoint directory; --force replaces only checkpoints")
    if any(path.iterdir()) and not is_checkpoint_dir(path):
        raise OutputError(
            f"{flag} {path} is a non-empty directory that is not a checkpoint; --force replaces only checkpoints, "
            "remove it yourself if it should go"
        )
    return path


def leftovers(out: str | os.PathLike) -> list[Path]:
    """The temporaries of earlier writes to ``out`` that :func:`recover` would act on (sorted)."""
    path = _resolved(out)
    parent, name = path.parent, path.name
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        n = entry.name
        if (n.startswith(f".{name}.{SAVING}-") or n.startswith(f".{name}.{OLD}-")
                or n.startswith(f"{name}{_ORBAX_TMP}")):
            found.append(entry)
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def recover(out: str | os.PathLike) -> None:
    """Restores ``out`` from an orphaned ``.OUT.old-*`` when ``out`` is missing, then removes every other leftover.

    A complete new version that was never swapped in is dropped: the old version it was meant to replace is still
    there (or has just been restored), so the output is always one complete version.
    """
    path = _resolved(out)
    found = leftovers(path)
    olds = [p for p in found if p.name.startswith(f".{path.name}.{OLD}-") and p.is_dir()]
    if olds and not os.path.lexists(path):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        newest.rename(path)
        found.remove(newest)
    for leftover in found:
        _remove(leftover)


def _maybe_die(point: str) -> None:
    if os.environ.get(_KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Context manager: yields a fresh hidden sibling path (not yet created) to write the new ``out`` into.

    On a normal exit the old ``out`` (if any) is renamed aside, the new directory renamed to ``out``, and the old one
    removed. On an exception the partial directory (and orbax temporaries under its name) is removed and ``out`` is
    left as it was. Apply :func:`check_output` first: this function replaces whatever is at ``out``.
    """
    path = _resolved(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tag = uuid.uuid4().hex[:12]
    tmp = path.parent / f".{path.name}.{SAVING}-{tag}"
    old = path.parent / f".{path.name}.{OLD}-{tag}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"the writer of {path} produced nothing at {tmp}")
        _maybe_die("written")
    except BaseException:
        for entry in path.parent.glob(f"{tmp.name}*"):
            _remove(entry)
        raise
    replacing = os.path.lexists(path)
    if replacing:
        path.rename(old)
        _maybe_die("moved_old")
    try:
        tmp.rename(path)
    except BaseException:
        if replacing and not os.path.lexists(path):
            old.rename(path)
        raise
    _maybe_die("swapped")
    if replacing:
        _remove(old)
