"""File hashes of epcli.storage.paths: a hash started early in a background thread is the file's, and is used only
while the file is unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from epcli.storage import paths as files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for_prefetch(path: Path) -> None:
    files._prefetched[path.resolve()][1].result()


def test_prefetched_hash_is_the_files(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(os.urandom(3 * 2**20 + 5))  # several read blocks, the last one partial
    files.prefetch_sha256([path, tmp_path])  # a directory is not hashed ahead
    assert tmp_path.resolve() not in files._prefetched
    _wait_for_prefetch(path)
    assert files.file_sha256(path) == _sha256(path)
    assert path.resolve() not in files._prefetched  # used once


def test_a_file_changed_after_its_prefetch_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"old" * 1000)
    files.prefetch_sha256([path])
    _wait_for_prefetch(path)  # the old content's hash is ready
    path.write_bytes(b"new" * 1000)  # same size and inode
    os.utime(path, ns=(1, 1))  # a different mtime even where timestamps are coarse
    assert files.file_sha256(path) == _sha256(path) == hashlib.sha256(b"new" * 1000).hexdigest()


def test_a_failed_prefetch_raises_where_the_hash_is_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    files.prefetch_sha256([path])
    _wait_for_prefetch(path)
    path.unlink()
    with pytest.raises(FileNotFoundError):  # not the prefetched hash of a file that is gone
        files.file_sha256(path)
