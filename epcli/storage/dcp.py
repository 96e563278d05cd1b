"""``torch.distributed.checkpoint`` (DCP) directories, the format FSDP and distributed training write.

Read with torch's own DCP API (``torch.distributed.checkpoint.load`` with a
``FileSystemReader``, no process group), never by hand, with one change: torch
reads the directory's ``.metadata`` with the full ``pickle.load``, which would
run code from the file, so :class:`_SafeReader` reads it with an unpickler that
builds only DCP's own metadata classes, torch dtypes and sizes. The listing
(every tensor's key, shape and dtype) comes from that metadata alone; tensors
are read on demand, each through ``torch.load(weights_only=True)`` as DCP does.
Every claim of the metadata is checked against :mod:`~epcli.limits`, and
every data file it names must be a plain file name inside the directory.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor

from epcli.errors import CheckpointError, UnsafeCheckpointError
from epcli.limits import MAX_PICKLE_BYTES, MAX_TENSORS, check_count, check_name_length, check_tensor_shape
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


def _read_metadata(path: Path) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = path / DCP_METADATA
    check_count(file.stat().st_size, MAX_PICKLE_BYTES, f"the size in bytes of {DCP_METADATA}")
    try:
        metadata = _Unpickler(io.BytesIO(file.read_bytes())).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a damaged pickle raises many types
        raise CheckpointError(f"its {DCP_METADATA} cannot be read as DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"its {DCP_METADATA} does not hold torch.distributed.checkpoint metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def read_dcp_listing(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of every tensor of the DCP checkpoint at ``path``; other values are left out."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _read_metadata(path)
    check_count(len(metadata.state_dict_metadata), MAX_TENSORS, "the number of entries in the DCP metadata")
    listing: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not key:
            raise CheckpointError(f"DCP metadata has a key {quote(key)} that is not a non-empty string")
        check_name_length(key, "DCP metadata key")
        if not isinstance(entry, TensorStorageMetadata):
            continue  # a step counter, an RNG state: not a tensor of the model
        dtype = entry.properties.dtype
        if not isinstance(dtype, torch.dtype) or not isinstance(entry.size, torch.Size):
            raise CheckpointError(f"DCP entry {quote(key)} has no valid dtype and size")
        check_tensor_shape(entry.size, f"DCP entry {quote(key)}")
        listing[key] = (tuple(entry.size), dtype)
    for index, info in (metadata.storage_data or {}).items():
        name = getattr(info, "relative_path", None)
        plain = isinstance(name, str) and name and PurePosixPath(name).name == name == PureWindowsPath(name).name
        if not plain or name in (".", ".."):
            raise CheckpointError(
                f"DCP storage entry {quote(getattr(index, 'fqn', index))} names the data file {quote(name)}; DCP data "
                "files are plain file names inside the checkpoint directory"
            )
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            raise CheckpointError(f"DCP storage entry {quote(getattr(index, 'fqn', index))} has no valid offset/length")
    return listing


def read_dcp_tensors(
    path: Path, listing: dict[str, tuple[tuple[int, ...], torch.dtype]], keys: list[str]
) -> dict[str, Tensor]:
    """The tensors ``keys`` (DCP keys), read by ``torch.distributed.checkpoint.load`` into fresh CPU tensors."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _read_metadata(path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    state = {key: torch.empty(listing[key][0], dtype=listing[key][1]) for key in keys}
    try:
        with warnings.catch_warnings():  # "no process group: assuming a single process" is what is meant
            warnings.simplefilter("ignore")
            load(state, storage_reader=_SafeReader(path), no_dist=True)
    except (CheckpointError, OSError):
        raise
    except Exception as e:  # DCP raises many types on damaged data
        raise CheckpointError(f"torch.distributed.checkpoint cannot read {quote(keys[:3])}: {e}") from e
    return state
