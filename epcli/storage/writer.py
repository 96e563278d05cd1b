"""Writing a checkpoint's tensors one at a time, then its metadata, as one atomic commit.

The metadata goes last because parts of it (a collapse's measured errors) are
known only once every tensor has been produced. :class:`CheckpointWriter`
therefore takes tensors as they come and keeps none of them in memory for
``.safetensors`` output (they are spooled to temp files beside the output);
``.pt`` output keeps them until the one ``torch.save`` at the end (without a copy when a
tensor is the whole of its own CPU storage).

Above ``max_shard_bytes`` of tensor data a ``.safetensors`` output becomes shards
plus an index (see :mod:`epcli.storage.sharded`). On commit every file is
renamed into place, the index last. Files of an earlier output at the same name
that the new one does not overwrite (its old shards, or the single file a set of
shards replaces) are removed when asked (``remove_stale``), so no stale half of an
old output is left beside the new one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from torch import Tensor

from epcli.errors import CheckpointError, OutputError
from epcli.storage.atomic import StagedFiles, remove_leftovers
from epcli.storage.safetensors_io import METADATA_KEY, SafetensorsSpool
from epcli.storage.sharded import (
    index_document,
    index_path,
    listed_shards,
    output_names,
    plan_shards,
    shard_metadata,
    shard_paths,
)
from epcli.storage.source import TensorInfo, check_finite
from epcli.storage.torch_io import write_pt

__all__ = ["WRITABLE_SUFFIXES", "CheckpointWriter", "output_files", "stale_files"]

WRITABLE_SUFFIXES = (".pt", ".pth", ".safetensors")


def _shards(path: Path, layout: Mapping[str, TensorInfo], max_shard_bytes: int | None) -> list[list[str]]:
    if path.suffix.lower() != ".safetensors" or max_shard_bytes is None:
        return [list(layout)]
    return plan_shards({key: info.nbytes for key, info in layout.items()}, max_shard_bytes)


def output_files(path: Path, layout: Mapping[str, TensorInfo], max_shard_bytes: int | None = None) -> tuple[Path, ...]:
    """The files a write of ``layout`` to ``path`` creates: ``path`` itself, or its shards and index."""
    shards = _shards(path, layout, max_shard_bytes)
    return (path,) if len(shards) == 1 else (*shard_paths(path, len(shards)), index_path(path))


def stale_files(path: Path, files: tuple[Path, ...]) -> tuple[Path, ...]:
    """Existing files of an earlier output under ``path``'s name that a write of ``files`` would leave behind.

    For ``<stem>.safetensors``: an old ``<stem>.safetensors.index.json`` and the shards it lists
    (by the shard-name pattern only), and an old single ``<stem>.safetensors`` replaced by shards.
    """
    old: list[Path] = []
    if path.suffix.lower() == ".safetensors":
        index = index_path(path)
        if index.is_file():
            old.extend((index, *listed_shards(index)))
        if path.is_file():
            old.append(path)
    return tuple(p for p in old if p not in files and p.exists())


class CheckpointWriter:
    """Takes every tensor of ``layout`` (key -> shape and dtype) once, in any order; :meth:`commit` writes the files.

    Use as a context manager: leaving the block without a commit removes all
    temp files and leaves existing files alone. With ``remove_stale``, a commit
    also removes :func:`stale_files` (callers check first that none is precious,
    e.g. an input); without it they are left as they are. With ``overwrite=False``
    the commit never replaces an existing file, even one created after the caller
    checked (see :mod:`epcli.storage.atomic`). Tensors must be finite.
    """

    def __init__(
        self,
        path: Path,
        layout: Mapping[str, TensorInfo],
        *,
        max_shard_bytes: int | None = None,
        remove_stale: bool = False,
        overwrite: bool = True,
    ) -> None:
        if path.suffix.lower() not in WRITABLE_SUFFIXES:
            raise CheckpointError(
                f"{path}: unsupported file suffix {path.suffix!r}; epcli writes {', '.join(WRITABLE_SUFFIXES)}"
            )
        if max_shard_bytes is not None and max_shard_bytes < 1:
            raise CheckpointError(f"the shard size limit must be at least 1 byte, got {max_shard_bytes}")
        self.path = path
        self._layout = dict(layout)
        self._groups = _shards(path, layout, max_shard_bytes)
        self.files = output_files(path, layout, max_shard_bytes)
        self._remove_stale = remove_stale
        self._shard_of = {key: number for number, keys in enumerate(self._groups) for key in keys}
        self._spools: dict[int, SafetensorsSpool] = {}
        self._kept: dict[str, Tensor] = {}  # .pt only
        self._kept_storages: set[int] = set()  # data pointers of the storages kept without a copy
        self._given: set[str] = set()
        self._left = [len(keys) for keys in self._groups]
        self._staged = StagedFiles(overwrite=overwrite)
        # what a killed earlier run on this output left behind (any sharding): this run may not touch the same names
        remove_leftovers(path, output_names(path) if path.suffix.lower() == ".safetensors" else None)

    @property
    def sharded(self) -> bool:
        return len(self._groups) > 1

    def add(self, key: str, tensor: Tensor) -> None:
        """Hand over one tensor (any device, any layout); it must match its layout entry."""
        info = self._layout.get(key)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} is not part of the checkpoint being written")
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} is {list(tensor.shape)} {tensor.dtype}, expected {list(info.shape)} "
                f"{info.dtype}"
            )
        if key in self._given:
            raise CheckpointError(f"{self.path}: tensor {key!r} was given twice")
        check_finite({key: tensor}, f"the data for {self.path} (nothing was written)")
        self._given.add(key)
        number = self._shard_of[key]
        if self.path.suffix.lower() == ".safetensors":
            spool = self._spools.get(number)
            if spool is None:
                spool = self._spools[number] = SafetensorsSpool(self.path.parent)
            try:
                spool.add(key, tensor)
            except OSError as e:
                raise OutputError(
                    f"cannot write {self.path}: spooling {key!r} failed ({e.strerror or e})", file=self.path
                ) from e
        else:
            self._kept[key] = self._keepable(tensor)
        self._left[number] -= 1
        if self.sharded and self._left[number] == 0:  # a complete shard goes to its temp file at once
            self._stage_spool(self.files[number], self._spools.pop(number), shard_metadata(index_path(self.path)))

    def _keepable(self, tensor: Tensor) -> Tensor:
        """What ``.pt`` output keeps until the commit: the tensor itself when it is a contiguous CPU tensor that
        spans the whole of a storage no other kept tensor uses (the file then stores exactly its bytes),
        else a copy of its own. No whole-model copy: callers must not change given tensors before the commit."""
        storage = tensor.untyped_storage()
        whole = (
            tensor.device.type == "cpu"
            and tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and storage.nbytes() == tensor.nbytes
            and tensor.nbytes > 0
        )
        if whole and storage.data_ptr() not in self._kept_storages:
            self._kept_storages.add(storage.data_ptr())
            return tensor.detach()
        return tensor.detach().to("cpu").clone().contiguous()

    def commit(self, metadata: str) -> Path:
        """Write the metadata (and the last file), rename everything into place; returns the path readers open."""
        missing = [key for key in self._layout if key not in self._given]
        if missing:
            raise CheckpointError(f"{self.path}: tensors {missing[:8]} were never given; nothing was written")
        stale = stale_files(self.path, self.files) if self._remove_stale else ()
        if self.sharded:
            weight_map = {key: self.files[self._shard_of[key]].name for key in sorted(self._layout)}
            total = sum(info.nbytes for info in self._layout.values())
            document = index_document(metadata, weight_map, total)
            self._staged.write(self.files[-1], lambda f: f.write(document))
        elif self.path.suffix.lower() == ".safetensors":
            spool = self._spools.pop(0, None) or SafetensorsSpool(self.path.parent)
            self._stage_spool(self.path, spool, {METADATA_KEY: metadata})
        else:
            kept = {key: self._kept[key] for key in self._layout}
            self._staged.write(self.path, lambda f: write_pt(f, metadata, kept))
        self._staged.commit()
        for path in stale:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return self.files[-1]

    def _stage_spool(self, target: Path, spool: SafetensorsSpool, metadata: Mapping[str, str]) -> None:
        try:
            self._staged.write(target, lambda f: spool.finish(f, metadata))
        finally:
            spool.close()

    def discard(self) -> None:
        for spool in self._spools.values():
            spool.close()
        self._spools.clear()
        self._kept.clear()
        self._kept_storages.clear()
        self._staged.discard()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.discard()
