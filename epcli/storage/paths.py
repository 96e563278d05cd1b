"""Paths a job reads and writes: the checks every output passes before any work, and file hashes.

One rule for every command's outputs (``collapse -o``, ``export --onnx/--safetensors``,
``inspect --plot``): a directory is not a file name, the suffix must fit, an input is never
overwritten, an existing file only with ``force``; missing parent directories are created
(as ``mkdir -p``) once all of that holds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from stat import S_ISREG

from epcli.errors import OutputError, UsageError

__all__ = [
    "INDEX_SUFFIX",
    "check_output_name",
    "check_output",
    "check_targets",
    "existing_ancestor",
    "file_sha256",
    "is_index",
    "make_parent",
    "prefetch_sha256",
    "sharded_base",
]

INDEX_SUFFIX = ".safetensors.index.json"
"""The index of a sharded safetensors checkpoint (:mod:`epcli.storage.sharded` reads and writes the set)."""

_Identity = tuple[int, int, int, int, int]
_prefetched: dict[Path, tuple[_Identity, Future[str]]] = {}


def source_problem(path: Path, remedy: str = "save it again with epcli.save_checkpoint") -> str | None:
    """What makes ``path`` unreadable as an input before anything is parsed (missing, not a file or directory,
    empty), or None: checked without torch, so a mistyped path fails at once. ``remedy`` says how to write the
    file again, which depends on its role (a checkpoint, an artifact, a file of samples)."""
    if not path.exists():
        return "no such file; check the path"
    if not path.is_file() and not path.is_dir():
        return "is not a regular file"
    if path.is_file() and path.stat().st_size == 0:
        return f"is empty (0 bytes); it was not written completely: {remedy}"
    return None


def file_sha256(path: Path) -> str:
    """The file's sha256; taken from :func:`prefetch_sha256` when that hashed this very file (unchanged since)."""
    entry = _prefetched.pop(path.resolve(), None)
    if entry is not None:
        identity, digest = entry
        if digest.exception() is None and _identity(path) == identity:  # waits for the thread
            return digest.result()
    return _sha256(path)  # again after a failure, which then raises where callers expect it


def prefetch_sha256(paths: Iterable[Path]) -> None:
    """Start hashing these regular files in a background thread; :func:`file_sha256` then waits for the result.

    Reading and hashing release the GIL, so the hash costs next to nothing while the
    caller imports torch or reads and collapses layers. The thread is a daemon: a run
    that fails early exits without waiting for it. A file whose size, times or inode
    differ by the time its hash is asked for is hashed again.
    """
    for path in paths:
        key = path.resolve()
        identity = _identity(path)
        if identity is None or (key in _prefetched and _prefetched[key][0] == identity):
            continue
        digest: Future[str] = Future()
        _prefetched[key] = (identity, digest)
        threading.Thread(target=_hash_into, args=(path, digest), name="epcli-sha256", daemon=True).start()


def _identity(path: Path) -> _Identity | None:
    """What changes when a file is replaced or written to; None for anything but a regular file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not S_ISREG(stat.st_mode):
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _hash_into(path: Path, digest: Future[str]) -> None:
    try:
        digest.set_result(_sha256(path))
    except OSError as e:
        digest.set_exception(e)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_index(path: Path) -> bool:
    return path.name.lower().endswith(INDEX_SUFFIX)


def sharded_base(index: Path) -> Path:
    """``<stem>.safetensors.index.json`` -> ``<stem>.safetensors``, the name the set stands for."""
    return index.with_name(index.name[: -len(".index.json")])


def check_output(path: Path, suffixes: Iterable[str], *, force: bool, option: str, example: str) -> None:
    """One output file of a command: checked, and its directory created; ``example`` is a file name to suggest."""
    check_output_name(path, suffixes, option=option, example=example)
    check_targets((path,), (), force)
    make_parent(path)


def check_output_name(path: Path, suffixes: Iterable[str], *, option: str, example: str) -> None:
    """Not a directory, and a suffix the output format has (``example`` is suggested as the file name)."""
    suffixes = tuple(suffixes)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name with {option}, e.g. {path / example}", file=path)
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
            raise OutputError(
                f"{target}: writing the output would overwrite or remove the source checkpoint; choose another path "
                "with -o",
                file=target,
            )
        if target.is_dir():
            raise OutputError(
                f"{target} is a directory; it would be replaced by an output file: choose another path", file=target
            )
        if target.exists() and not force:
            raise OutputError(f"{target} already exists; pass --force to overwrite it", file=target)


def existing_ancestor(directory: Path) -> Path:
    """``directory``, or its nearest ancestor that exists: where a job may keep scratch files for an output whose
    directory is created only when the output is written (a refused run creates nothing)."""
    directory = directory.absolute()
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    return directory


def make_parent(path: Path) -> None:
    """Create the output's missing directories and prove a file can be created there, before any work.

    Called after every other check passed, so a refused run creates nothing. The probe
    (a file created and removed at once) catches what permission bits do not: read-only
    mounts, ``/proc``, full quotas for new inodes.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"{path}: cannot create its directory {path.parent} ({e.strerror or e})", file=path
        ) from e
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.epcli-probe-"):
            pass
    except OSError as e:
        raise OutputError(
            f"{path}: cannot write in {path.parent} ({e.strerror or e}); choose a writable directory", file=path
        ) from e
