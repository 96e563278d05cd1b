"""``torch.distributed.checkpoint`` (DCP) directories, the format FSDP and distributed training write.

A DCP directory is a ``.metadata`` pickle (every tensor's shape, dtype and chunks, and
where each chunk's bytes are) plus data files holding each chunk as a ``torch.save``
archive. Torch's own loader trusts all of it: it unpickles ``.metadata`` with the full
``pickle.load``, opens whatever a data file is (a FIFO blocks it forever), inflates
compressed slices whole, copies chunks into ``torch.empty`` buffers without checking
they cover them, and fails with ``CheckpointException``, a ``BaseException`` that
escapes every handler. So epcli reads the format itself, with torch's classes:

* ``.metadata`` is scanned (:func:`~epcli.storage.pt_archive.scan_pickle`) and then
  unpickled with an allowlist of DCP's metadata classes, torch dtypes and sizes; every
  object's type and every number is checked (:func:`_layout`) before any is used;
* each tensor's chunks must lie inside it and add up to it, and while they are copied
  none may overlap another, so a buffer is handed out only when the file filled all of it;
* a chunk is read from a regular file (a symlink to one is fine), only after its offset and
  length are checked against the file's size and :data:`~epcli.limits.MAX_SLICE_OVERHEAD`,
  and loaded by :func:`~epcli.storage.torch_io.read_pt_tensor` (records checked,
  uncompressed, weights-only).

Errors name the data file (relative to the directory, which callers add) and what is wrong.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

import torch
from torch import Tensor

from epcli.errors import CheckpointError, UnsafeCheckpointError
from epcli.limits import (
    MAX_PICKLE_BYTES,
    MAX_SLICE_OVERHEAD,
    MAX_TENSORS,
    check_count,
    check_name_length,
    check_tensor_shape,
    is_int,
)
from epcli.storage.pt_archive import scan_pickle
from epcli.storage.torch_io import read_pt_tensor
from epcli.text import quote

__all__ = ["DCP_METADATA", "is_dcp", "read_dcp_listing", "read_dcp_tensors"]

DCP_METADATA = ".metadata"
"""The file that makes a directory a DCP checkpoint."""

_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP, name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, from a fixed table
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def is_dcp(path: Path) -> bool:
    return path.is_dir() and (path / DCP_METADATA).is_file()


@dataclass(frozen=True)
class _Chunk:
    """One stored piece of a tensor: where it sits in the tensor, and where its archive is."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[_Chunk, ...]


class _Unpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refused to load: its {DCP_METADATA} pickle references {quote(f'{module}.{name}')}, which is not part of "
            "torch.distributed.checkpoint's metadata; loading it would run code from the file, so nothing was executed"
        )


@contextmanager
def _open_regular(file: Path, what: str) -> Iterator[tuple[BinaryIO, int]]:
    """``file`` opened for reading, and its size, if it is a regular file (through any symlinks).

    Opened non-blocking, so a FIFO is refused instead of waiting forever for a writer.
    """
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing; the directory is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{what} cannot be opened ({e.strerror or e})") from e
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{what} is not a regular file (a FIFO, device or directory); epcli reads files only")
        yield f, info.st_size


def _read_metadata(path: Path) -> Any:
    """The unpickled ``.metadata``, after a scan of the pickle bounded its tuples and dict keys."""
    from torch.distributed.checkpoint.metadata import Metadata

    with _open_regular(path / DCP_METADATA, DCP_METADATA) as (f, size):
        check_count(size, MAX_PICKLE_BYTES, f"the size in bytes of {DCP_METADATA}")
        data = f.read(size)
    try:
        scan_pickle(data)
        metadata = _Unpickler(io.BytesIO(data)).load()
    except CheckpointError as e:
        raise type(e)(f"{DCP_METADATA}: {e}") from e
    except Exception as e:  # a damaged pickle raises many types
        raise CheckpointError(
            f"its {DCP_METADATA} cannot be read as DCP metadata ({type(e).__name__}: {quote(str(e))})"
        ) from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"its {DCP_METADATA} does not hold torch.distributed.checkpoint metadata")
    return metadata


def _layout(path: Path) -> dict[str, _Entry]:
    """Every tensor of the checkpoint with its chunks, each object's type and every number checked."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _read_metadata(path)
    entries = _attribute(metadata, "state_dict_metadata", dict, DCP_METADATA)
    storage = _attribute(metadata, "storage_data", dict, DCP_METADATA)
    check_count(len(entries), MAX_TENSORS, "the number of entries in the DCP metadata")
    check_count(len(storage), MAX_TENSORS, "the number of storage entries in the DCP metadata")
    files = _storage_files(storage)
    layout: dict[str, _Entry] = {}
    chunk_count = 0
    for key, entry in entries.items():
        if not isinstance(key, str) or not key:
            raise CheckpointError(f"DCP metadata has a key {quote(key)} that is not a non-empty string")
        check_name_length(key, "DCP metadata key")
        if not isinstance(entry, TensorStorageMetadata):
            continue  # a step counter, an RNG state (BytesStorageMetadata): not a tensor of the model
        where = f"DCP entry {quote(key)}"
        properties = _attribute(entry, "properties", object, where)
        dtype = _attribute(properties, "dtype", torch.dtype, where)
        shape = _sizes(_attribute(entry, "size", torch.Size, where), where)
        check_tensor_shape(shape, where)
        chunks = _attribute(entry, "chunks", list, where)
        chunk_count += len(chunks)
        check_count(chunk_count, MAX_TENSORS, "the number of chunks in the DCP metadata")
        found = tuple(_chunk(key, chunk, shape, dtype, files, where) for chunk in chunks)
        if sum(math.prod(chunk.sizes) for chunk in found) != math.prod(shape):
            raise CheckpointError(
                f"{where}: its {len(found)} chunks hold {sum(math.prod(c.sizes) for c in found)} elements, but the "
                f"tensor {list(shape)} has {math.prod(shape)}; the metadata is damaged"
            )
        layout[key] = _Entry(shape, dtype, found)
    _check_disjoint(layout)
    return layout


def _check_disjoint(layout: dict[str, _Entry]) -> None:
    """No two chunks share bytes of a data file: DCP writes each once, and a slice read for many chunks
    would cost its decoding each time."""
    spans = sorted(
        (chunk.file, chunk.offset, chunk.offset + chunk.length, key) for key, entry in layout.items() for chunk in entry.chunks
    )
    for (file, _, end, first), (other, start, _, second) in itertools.pairwise(spans):
        if file == other and start < end:
            raise CheckpointError(
                f"DCP entries {quote(first)} and {quote(second)} have chunks sharing bytes of data file {quote(file)}; "
                "the metadata is damaged"
            )


def _attribute(owner: Any, name: str, kind: type, where: str) -> Any:
    value = getattr(owner, name, None)
    if not isinstance(value, kind):
        raise CheckpointError(
            f"{where}: {name} is a {type(value).__name__}, not a {kind.__name__}; the DCP metadata is damaged"
        )
    return value


def _sizes(value: Any, where: str) -> tuple[int, ...]:
    sizes = tuple(value)
    if not all(is_int(size) and size >= 0 for size in sizes):
        raise CheckpointError(f"{where}: {quote(sizes)} is not a list of sizes; the DCP metadata is damaged")
    return sizes


def _storage_files(storage: dict[Any, Any]) -> dict[tuple[str, tuple[int, ...]], tuple[str, int, int]]:
    """(key, chunk offsets) -> (data file, offset, length), every name a plain file name in the directory."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    files: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
            raise CheckpointError(f"DCP storage entry {quote(index)} is not a key and offset; the metadata is damaged")
        where = f"DCP storage entry {quote(index.fqn)}"
        if index.offset is not None:  # None: a value stored as bytes, not a tensor chunk
            _attribute(index, "offset", torch.Size, where)
        name: Any = getattr(info, "relative_path", None)
        plain = isinstance(name, str) and name and PurePosixPath(name).name == name == PureWindowsPath(name).name
        if not plain or name in (".", ".."):
            raise CheckpointError(
                f"{where} names the data file {quote(name)}; DCP data files are plain file names inside the "
                "checkpoint directory"
            )
        offset: Any = getattr(info, "offset", None)
        length: Any = getattr(info, "length", None)
        if not all(is_int(v) and v >= 0 for v in (offset, length)):
            raise CheckpointError(f"{where} has no valid offset/length in data file {quote(name)}")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{where}: data file {quote(name)} stores it transformed "
                f"({quote(getattr(info, 'transform_descriptors', None))}); epcli reads untransformed DCP data only"
            )
        if index.offset is not None:
            files[(index.fqn, _sizes(index.offset, where))] = (name, offset, length)
    return files


def _chunk(
    key: str, chunk: Any, shape: tuple[int, ...], dtype: torch.dtype, files: dict[Any, tuple[str, int, int]], where: str
) -> _Chunk:
    """A chunk inside its tensor, with a storage entry whose length fits its bytes."""
    offsets = _sizes(_attribute(chunk, "offsets", torch.Size, where), where)
    sizes = _sizes(_attribute(chunk, "sizes", torch.Size, where), where)
    if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
        o + s > dim for o, s, dim in zip(offsets, sizes, shape, strict=True)
    ):
        raise CheckpointError(
            f"{where}: a chunk at {list(offsets)} of size {list(sizes)} does not lie inside the tensor "
            f"{list(shape)}; the DCP metadata is damaged"
        )
    stored = files.get((key, offsets))
    if stored is None:
        raise CheckpointError(f"{where}: the chunk at {list(offsets)} has no storage entry; the DCP metadata is damaged")
    name, offset, length = stored
    limit = math.prod(sizes) * dtype.itemsize + MAX_SLICE_OVERHEAD
    if length > limit:
        raise CheckpointError(
            f"{where}: data file {quote(name)} gives its chunk at {list(offsets)} {length} bytes, more than its "
            f"{math.prod(sizes)} {str(dtype).removeprefix('torch.')} elements and {MAX_SLICE_OVERHEAD} bytes of "
            "archive need (epcli's limit, a guard against hostile files)"
        )
    return _Chunk(offsets, sizes, name, offset, length)


def read_dcp_listing(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of every tensor of the DCP checkpoint at ``path``; other values are left out."""
    return {key: (entry.shape, entry.dtype) for key, entry in _layout(path).items()}


def read_dcp_tensors(
    path: Path, listing: dict[str, tuple[tuple[int, ...], torch.dtype]], keys: list[str]
) -> dict[str, Tensor]:
    """The tensors ``keys`` (DCP keys) as fresh CPU tensors, every element read from the data files."""
    layout = _layout(path)
    out: dict[str, Tensor] = {}
    for key in keys:
        entry = layout.get(key)
        if entry is None or (entry.shape, entry.dtype) != listing[key]:
            raise CheckpointError(
                f"DCP entry {quote(key)} changed while the directory was open; do not overwrite a checkpoint while "
                "epcli reads it"
            )
        out[key] = _assemble(path, key, entry)
    return out


def _assemble(path: Path, key: str, entry: _Entry) -> Tensor:
    """The tensor ``key`` from its chunks; refused unless they fill it exactly once (``filled``: one byte an
    element, while it is read)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    filled = torch.zeros(entry.shape, dtype=torch.bool)
    for chunk in entry.chunks:
        region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
        where = f"data file {quote(chunk.file)} (the chunk of {quote(key)} at {list(chunk.offsets)})"
        if bool(filled[region].any()):
            raise CheckpointError(f"{where} overlaps another chunk of the tensor; the DCP metadata is damaged")
        piece = _read_chunk(path, chunk, where)
        if tuple(piece.shape) != chunk.sizes or piece.dtype != entry.dtype:
            raise CheckpointError(
                f"{where} holds a {list(piece.shape)} {str(piece.dtype).removeprefix('torch.')} tensor, but the "
                f"metadata says {list(chunk.sizes)} {str(entry.dtype).removeprefix('torch.')}; the directory is damaged"
            )
        tensor[region] = piece
        filled[region] = True
    return tensor  # no chunk overlaps and their sizes add up to the tensor's (checked in _layout): all of it is filled


def _read_chunk(path: Path, chunk: _Chunk, where: str) -> Tensor:
    with _open_regular(path / chunk.file, where) as (f, size):
        if chunk.offset + chunk.length > size:
            raise CheckpointError(
                f"{where}: the metadata places it at bytes {chunk.offset}..{chunk.offset + chunk.length}, past the end "
                f"of the file ({size} bytes); the file is truncated"
            )
        f.seek(chunk.offset)
        data = f.read(chunk.length)
    if len(data) != chunk.length:
        raise CheckpointError(f"{where}: the file shrank while epcli read it")
    try:
        return read_pt_tensor(data)
    except CheckpointError as e:
        raise type(e)(f"{where}: {e}") from e
