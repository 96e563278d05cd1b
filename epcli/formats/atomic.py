"""Atomic file writes: a reader sees the old files or the complete new ones, never a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from epcli.errors import CheckpointError

__all__ = ["StagedFiles", "atomic_write"]


class StagedFiles:
    """Files written under temp names beside their targets, then renamed onto them in the order staged.

    Use as a context manager: leaving the block without :meth:`commit` (an error,
    an interrupt) removes every temp file and leaves the targets as they were.
    For a set of files, stage the one readers open first (an index) last.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temp, target)

    def write(self, path: Path, write: Callable[[BinaryIO], None]) -> None:
        """Call ``write`` on a new temp file in ``path``'s directory and fsync it; OS errors name ``path``."""
        directory = path.parent
        if not directory.is_dir():
            raise CheckpointError(f"cannot write {path}: directory {directory} does not exist")
        if path.is_dir():
            raise CheckpointError(f"cannot write {path}: it is a directory")
        try:
            fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from e
        temp = Path(temp_name)
        self._staged.append((temp, path))
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        except OSError as e:
            raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from e

    def commit(self) -> None:
        """Rename every temp file onto its target, then make the renames durable.

        Each rename is atomic, the set is not: should the OS refuse a rename midway
        (within one directory it practically does not), the files before it are new,
        the rest untouched, and the error names the file.
        """
        staged, self._staged = self._staged, []
        try:
            for index, (temp, target) in enumerate(staged):
                os.replace(temp, target)
        except OSError as e:
            self._staged = staged[index:]
            raise CheckpointError(f"cannot write {target}: {e.strerror or e}") from e
        for directory in dict.fromkeys(target.parent for _, target in staged):
            _fsync_directory(directory)

    def discard(self) -> None:
        for temp, _ in self._staged:
            with contextlib.suppress(OSError):
                temp.unlink()
        self._staged = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.discard()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temp file in ``path``'s directory, fsync it, then ``os.replace`` it onto ``path``.

    On any error the temp file is removed and ``path`` is left as it was.
    OS errors become :class:`CheckpointError` naming the path.
    """
    with StagedFiles() as staged:
        staged.write(path, write)
        staged.commit()
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; best effort (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
