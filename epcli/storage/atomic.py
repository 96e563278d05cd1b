"""Atomic file writes: a reader sees the old files or the complete new ones, never a partial file.

Temp files are named ``.<target name>.epcli-<pid>-<random>.tmp`` beside their
target. A run killed outright (SIGKILL, power loss) cannot remove its own, so
every write first removes the leftovers of earlier runs on the same target: only
names of that pattern, and only when the process named in them is gone. (A pid is
only meaningful on its own machine: two machines writing one output on a shared
file system may remove each other's temp files; the losing write then fails, it
never corrupts the output.)

Without ``overwrite``, each file is created under its final name with
``os.link`` (which fails if the name exists) instead of renamed over it, so of
two concurrent runs writing the same new output exactly one succeeds; the other
gets an :class:`OutputError` and leaves the winner's file alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from epcli.errors import OutputError

__all__ = ["StagedFiles", "atomic_write", "remove_leftovers", "temp_name"]

_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS})
"""What ``os.link`` raises where the file system has no hard links (FAT, some network mounts)."""


def temp_name(target: Path) -> Path:
    """``.<name>.epcli-<pid>-<random>.tmp`` beside ``target``: recognisably epcli's, and whose."""
    return target.with_name(f".{target.name}.epcli-{os.getpid()}-{secrets.token_hex(4)}.tmp")




def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def remove_leftovers(target: Path, names: str | None = None) -> list[Path]:
    """Remove temp files of earlier epcli runs on ``target`` whose process is gone; returns what was removed.

    ``names`` (a regular expression) widens "on ``target``" to every file name it
    matches in ``target``'s directory, e.g. all shards of a sharded output.
    """
    pattern = re.compile(rf"\.(?:{names or re.escape(target.name)})\.epcli-(\d+)-[0-9a-f]+\.tmp")
    removed = []
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            found = pattern.fullmatch(entry.name)
            if found and not _alive(int(found.group(1))):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):  # a scratch directory (StagedFiles.scratch)
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


class StagedFiles:
    """Files written under temp names beside their targets, then moved onto them in the order staged.

    Use as a context manager: leaving the block without :meth:`commit` (an error,
    an interrupt) removes every temp file and leaves the targets as they were.
    For a set of files, stage the one readers open first (an index) last.
    With ``overwrite=False`` no existing file is ever replaced (see the module doc).
    """

    def __init__(self, *, overwrite: bool = True) -> None:
        self._overwrite = overwrite
        self._staged: list[tuple[Path, Path]] = []  # (temp, target)
        self._scratch: list[Path] = []

    def scratch(self, beside: Path) -> Path:
        """A new empty temp directory beside ``beside`` (named as a temp file of it), removed with the staged files.

        For files that must sit together under their final names while they are
        checked, e.g. an ONNX model that names its external data file; stage them with :meth:`add`.
        """
        remove_leftovers(beside)
        directory = temp_name(beside)
        try:
            directory.mkdir()
        except OSError as e:
            raise OutputError(f"cannot write {beside}: {e.strerror or e}", file=beside) from e
        self._scratch.append(directory)
        return directory

    def add(self, path: Path, temp: Path) -> None:
        """Stage ``temp``, written and fsynced by the caller on ``path``'s file system, to be moved onto ``path``."""
        self._staged.append((temp, path))

    def write(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        """Call ``write`` on a new temp file in ``path``'s directory and fsync it; OS errors name ``path``."""
        directory = path.parent
        if not directory.is_dir():
            raise OutputError(f"cannot write {path}: directory {directory} does not exist", file=path)
        if path.is_dir():
            raise OutputError(f"cannot write {path}: it is a directory", file=path)
        remove_leftovers(path)
        temp = temp_name(path)
        self._staged.append((temp, path))  # before it exists: an interrupt right after the open still removes it
        try:
            # O_EXCL: never follow or reuse a name someone else made; 0o666 & ~umask, the usual permissions
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            self._staged.pop()
            raise OutputError(f"cannot write {path}: {e.strerror or e}", file=path) from e
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}", file=path) from e

    def commit(self) -> None:
        """Move every temp file onto its target, then make that durable.

        With ``overwrite`` each move is an atomic rename; the set is not atomic: should
        the OS refuse a rename midway (within one directory it practically does not),
        the files before it are new, the rest untouched, and the error names the file.
        Without it, a target that exists (made meanwhile by another run) stops the
        commit: the files this commit created are removed again, and nothing is replaced.
        """
        staged, self._staged = self._staged, []
        created: list[Path] = []
        for index, (temp, target) in enumerate(staged):
            try:
                if self._overwrite:
                    os.replace(temp, target)
                else:
                    _create(temp, target)
                    created.append(target)
            except FileExistsError as e:
                for path in created:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                self._staged = staged
                raise OutputError(
                    f"{target} already exists (another run created it meanwhile?); nothing was overwritten: pass "
                    "--force (force=True) to replace it",
                    file=target,
                ) from e
            except OSError as e:
                self._staged = staged[index:]
                raise OutputError(f"cannot write {target}: {e.strerror or e}", file=target) from e
        for temp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)  # still there after os.link
        for directory in dict.fromkeys(target.parent for _, target in staged):
            _fsync_directory(directory)
        self._remove_scratch()

    def discard(self) -> None:
        for temp, _ in self._staged:
            with contextlib.suppress(OSError):
                temp.unlink()
        self._staged = []
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        for directory in self._scratch:
            shutil.rmtree(directory, ignore_errors=True)
        self._scratch = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.discard()


def _create(temp: Path, target: Path) -> None:
    """Give ``temp`` the name ``target`` if that name is free; FileExistsError if not (never replaces)."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # no hard links here: reserve the name exclusively, then rename onto the reservation
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(temp, target)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, overwrite: bool = True) -> Path:
    """Call ``write`` on a temp file in ``path``'s directory, fsync it, then move it onto ``path``.

    On any error the temp file is removed and ``path`` is left as it was.
    ``overwrite=False`` refuses (atomically) to replace an existing ``path``.
    OS errors become :class:`OutputError` naming the path.
    """
    with StagedFiles(overwrite=overwrite) as staged:
        staged.write(path, write)
        staged.commit()
    return path


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; best effort (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
