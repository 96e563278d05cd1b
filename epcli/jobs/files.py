"""Paths a job reads and writes: the checks every output passes before any work, and file hashes.

One rule for every command's outputs (``collapse -o``, ``export --onnx/--safetensors``,
``inspect --plot``): a directory is not a file name, the suffix must fit, an input is never
overwritten, an existing file only with ``force``; missing parent directories are created
(as ``mkdir -p``) once all of that holds.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

from epcli.errors import UsageError

__all__ = ["check_name", "check_output", "check_targets", "file_sha256", "make_parent"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output(path: Path, suffixes: Iterable[str], *, force: bool, option: str, example: str) -> None:
    """One output file of a command: checked, and its directory created; ``example`` is a file name to suggest."""
    check_name(path, suffixes, option=option, example=example)
    check_targets((path,), (), force)
    make_parent(path)


def check_name(path: Path, suffixes: Iterable[str], *, option: str, example: str) -> None:
    """Not a directory, and a suffix the output format has (``example`` is suggested as the file name)."""
    suffixes = tuple(suffixes)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name with {option}, e.g. {path / example}")
    if path.suffix.lower() not in suffixes:
        raise UsageError(
            f"{path}: unsupported output suffix {path.suffix!r} for {option}; use {' or '.join(suffixes)} "
            f"(e.g. {path.with_name(example)})"
        )


def check_targets(targets: Iterable[Path], sources: Iterable[Path], force: bool) -> None:
    """Every file a write would create, replace or remove: never an input; an existing one only with ``force``."""
    inputs = {path.resolve() for path in sources}
    for target in targets:
        if target.resolve() in inputs:
            raise UsageError(
                f"{target}: writing the output would overwrite or remove the source checkpoint; choose another path "
                "with -o"
            )
        if target.is_dir():
            raise UsageError(f"{target} is a directory; it would be replaced by an output file: choose another path")
        if target.exists() and not force:
            raise UsageError(f"{target} already exists; pass --force to overwrite it")


def make_parent(path: Path) -> None:
    """Create the output's missing directories and prove a file can be created there, before any work.

    Called after every other check passed, so a refused run creates nothing. The probe
    (a file created and removed at once) catches what permission bits do not: read-only
    mounts, ``/proc``, full quotas for new inodes.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{path}: cannot create its directory {path.parent} ({e.strerror or e})") from e
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.epcli-probe-"):
            pass
    except OSError as e:
        raise UsageError(
            f"{path}: cannot write in {path.parent} ({e.strerror or e}); choose a writable directory"
        ) from e
