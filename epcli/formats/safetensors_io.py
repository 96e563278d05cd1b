"""``.safetensors`` files: tensors plus ``__metadata__ = {"epcli": <JSON str>}``.

The header is checked here before the library sees the file, so a header that
lies about its length, or a truncated file, gets a message that says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from safetensors.torch import load_file, save
from torch import Tensor

from epcli.errors import CheckpointError
from epcli.formats.metadata import RawCheckpoint, missing_metadata

__all__ = ["MAX_HEADER_BYTES", "METADATA_KEY", "read_header", "read_safetensors", "write_safetensors"]

METADATA_KEY = "epcli"
MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on the JSON header."""

_LENGTH_BYTES = 8


def write_safetensors(f: BinaryIO, metadata: str, tensors: Mapping[str, Tensor]) -> None:
    f.write(save(dict(tensors), metadata={METADATA_KEY: metadata}))


def read_header(path: Path) -> dict[str, Any]:
    """The parsed JSON header, after checking its length and the tensor data it describes against the file size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(_LENGTH_BYTES)
        if len(prefix) < _LENGTH_BYTES:
            raise CheckpointError(
                f"is too short ({size} bytes) for a safetensors file, which begins with an 8-byte header length"
            )
        length = int.from_bytes(prefix, "little")
        available = size - _LENGTH_BYTES
        if length == 0 or length > available:
            raise CheckpointError(
                f"safetensors header claims {length} bytes, but {available} bytes follow the 8-byte length: "
                "the header length is wrong or the file is truncated"
            )
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"safetensors header claims {length} bytes, over the limit of {MAX_HEADER_BYTES}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"safetensors header ({length} bytes) is not valid JSON ({e}); the header length is wrong or the file "
            "is corrupt"
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors header must be a JSON object, got {type(header).__name__}")
    data_end = max((_data_end(name, entry) for name, entry in header.items() if name != "__metadata__"), default=0)
    if data_end > available - length:
        raise CheckpointError(
            f"is truncated: its header describes {data_end} bytes of tensor data, but only {available - length} "
            "bytes follow the header"
        )
    return header


def _data_end(name: str, entry: Any) -> int:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"safetensors header entry {name!r} has no valid data_offsets [begin, end]")
    return int(offsets[1])


def read_safetensors(path: Path) -> RawCheckpoint:
    """Metadata string and tensors of a ``.safetensors`` checkpoint."""
    header = read_header(path)
    metadata = header.get("__metadata__")
    text = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if text is None:
        count = len(header) - ("__metadata__" in header)
        raise missing_metadata(f"it holds {count} tensors and no {METADATA_KEY!r} entry in __metadata__")
    if not isinstance(text, str):
        raise CheckpointError(f"__metadata__[{METADATA_KEY!r}] must be a JSON string, got {type(text).__name__}")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError and friends, from the Rust side
        raise CheckpointError(f"safetensors could not read its tensors: {e}") from e
    return RawCheckpoint(text, tensors)
