"""The ``.safetensors`` format, read and written by epcli itself, one tensor at a time.

A file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range; ``__metadata__`` holds str -> str, epcli's JSON under
``"epcli"``), then the tensor bytes. The format is simple enough to own, and
owning it is what makes streaming possible:

* reading copies just the requested tensors' bytes into fresh tensors with plain
  ``readinto`` (no memory map, so no file page stays counted in the process's
  memory once read), after the header was checked against the file size;
* :class:`SafetensorsSpool` takes tensors one by one while they are produced and
  spools their bytes to anonymous temp files, so nothing has to stay in memory
  until the header (which carries metadata known only at the end) is written.

Tensor data is laid out as the safetensors library lays it out: grouped by
element size, largest first, so every tensor starts aligned to its element size.
Files are read back by ``safetensors.safe_open`` / ``load_file`` unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import torch
from torch import Tensor

from epcli.errors import CheckpointError
from epcli.limits import (
    MAX_HEADER_BYTES,
    MAX_METADATA_CHARS,
    MAX_TENSORS,
    check_count,
    check_name_length,
    check_tensor_shape,
    loads_json,
)
from epcli.text import quote

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "SafetensorsHeader",
    "SafetensorsSpool",
    "TensorEntry",
    "read_header",
    "read_tensors",
    "write_safetensors",
]

METADATA_KEY = "epcli"

DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
        "C64": torch.complex64,
    }
)
"""safetensors dtype names -> torch dtypes."""
_NAMES: Mapping[torch.dtype, str] = MappingProxyType({dtype: name for name, dtype in DTYPES.items()})

_LENGTH_BYTES = 8
_ALIGN = 8
"""The header is padded with spaces to a multiple of 8 bytes, as the safetensors library does."""
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header: dtype, shape and its byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: tensors in the order of their data, the ``__metadata__`` strings, where the data starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


# ---- reading -----------------------------------------------------------------------------------------
def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header: its length, every entry, and that the entries tile the data exactly.

    Errors do not name ``path``; callers add it (or the shard's name).
    """
    _check_byte_order()
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"safetensors header ({length} bytes) is not valid JSON (not UTF-8: {e}); the header length is wrong "
            "or the file is corrupt"
        ) from e
    # an upper bound on the entries (each has one data_offsets key), found before parsing costs anything
    check_count(text.count('"data_offsets"'), MAX_TENSORS, "the number of tensors in the safetensors header")
    document = loads_json(
        text, f"safetensors header ({length} bytes)", "; the header length is wrong or the file is corrupt"
    )
    if not isinstance(document, dict):
        raise CheckpointError(f"safetensors header must be a JSON object, got {type(document).__name__}")
    metadata = document.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("safetensors __metadata__ must map strings to strings")
    characters = sum(len(k) + len(v) for k, v in metadata.items())
    check_count(characters, MAX_METADATA_CHARS, "safetensors __metadata__ (characters)")
    check_count(len(document), MAX_TENSORS, "the number of tensors in the safetensors header")
    # by (begin, end), as the safetensors library orders them: an empty tensor may share its begin with the next
    entries = sorted(
        ((_entry(name, value), name) for name, value in document.items()), key=lambda e: (e[0].begin, e[0].end)
    )
    end = 0
    for entry, name in entries:
        if entry.begin != end:
            raise CheckpointError(
                f"safetensors header entry {quote(name)} starts at byte {entry.begin} of the data, expected {end}: "
                "tensors must follow each other without gaps or overlaps; the header is corrupt"
            )
        end = entry.end
    data_size = available - length
    if end != data_size:
        problem = "is truncated" if end > data_size else "has trailing bytes"
        raise CheckpointError(
            f"{problem}: its header describes {end} bytes of tensor data, but {data_size} bytes follow the header"
        )
    return SafetensorsHeader({name: entry for entry, name in entries}, metadata, _LENGTH_BYTES + length)


def _entry(name: str, value: Any) -> TensorEntry:
    where = f"safetensors header entry {quote(name)}"
    if not name:
        raise CheckpointError(f"{where}: a tensor must have a non-empty name")
    check_name_length(name, "safetensors header entry")
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be an object with dtype, shape and data_offsets")
    name_of_dtype = value.get("dtype")
    dtype = DTYPES.get(name_of_dtype) if isinstance(name_of_dtype, str) else None
    if dtype is None:
        raise CheckpointError(f"{where} has dtype {quote(value.get('dtype'))}; epcli reads {', '.join(DTYPES)}")
    shape, offsets = value.get("shape"), value.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{where} has no valid shape (a list of non-negative ints)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{where} has no valid data_offsets [begin, end]")
    check_tensor_shape(shape, where)
    entry = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    expected = math.prod(entry.shape) * dtype.itemsize
    if entry.nbytes != expected:
        raise CheckpointError(
            f"{where} claims {entry.nbytes} bytes for shape {list(shape)} of {name_of_dtype}, which takes "
            f"{expected}; the header is corrupt"
        )
    return entry


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tensors(
    path: Path, header: SafetensorsHeader, keys: Iterable[str], dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """Fresh contiguous CPU tensors for ``keys``, read with plain file reads (the file is not mapped).

    With ``dtype``, floating-point tensors are cast to it right after each is read.
    """
    out: dict[str, Tensor] = {}
    with path.open("rb", buffering=0) as f:
        for key in keys:
            entry = header.tensors[key]
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            view = _bytes_of(tensor)
            f.seek(header.data_start + entry.begin)
            done = 0
            while done < entry.nbytes:
                count = f.readinto(view[done:])
                if not count:
                    raise CheckpointError(
                        f"tensor {quote(key)}: the file ended early; it was truncated while being read"
                    )
                done += count
            out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def _bytes_of(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a flat writable view (no copy)."""
    if tensor.numel() == 0:
        return memoryview(bytearray())
    # [*shape] -> [numel] -> [numel * itemsize] bytes
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def _check_byte_order() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("safetensors stores little-endian data; epcli reads it on little-endian machines only")


# ---- writing -----------------------------------------------------------------------------------------
def _header_bytes(entries: Iterable[tuple[str, Tensor]], metadata: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The length-prefixed, padded header for tensors laid out largest element size first; and that order."""
    ordered = sorted(entries, key=lambda item: -item[1].dtype.itemsize)  # stable: insertion order within a size
    document: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in ordered:
        dtype_name = _NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise CheckpointError(f"tensor {quote(name)} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.dtype.itemsize
        document[name] = {"dtype": dtype_name, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(document, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return len(text).to_bytes(_LENGTH_BYTES, "little") + text, [name for name, _ in ordered]


def write_safetensors(f: BinaryIO, metadata: str, tensors: Mapping[str, Tensor]) -> None:
    """Write tensors (contiguous CPU) and epcli's metadata string as one safetensors file."""
    header, order = _header_bytes(tensors.items(), {METADATA_KEY: metadata})
    f.write(header)
    f.writelines(_bytes_of(tensors[name]) for name in order)


class SafetensorsSpool:
    """Tensors added one at a time, their bytes spooled to anonymous temp files until :meth:`finish`.

    Only shapes and dtypes stay in memory. One spool per element size keeps the
    final layout aligned; the temp files live in ``directory`` (the output's, so
    the space is where the result will be) and vanish when closed.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._spools: dict[int, BinaryIO] = {}
        self._layout: dict[str, Tensor] = {}  # meta tensors: name -> shape and dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.dtype.itemsize for t in self._layout.values())

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._layout:
            raise CheckpointError(f"tensor {quote(name)} was written twice")
        if tensor.dtype not in _NAMES:
            raise CheckpointError(f"tensor {quote(name)} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.dtype.itemsize
        if size not in self._spools:
            self._spools[size] = tempfile.TemporaryFile(dir=self._directory, prefix=".epcli-spool-")  # noqa: SIM115
        data = tensor.detach().to("cpu").contiguous()
        self._spools[size].write(_bytes_of(data))
        self._layout[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    def finish(self, f: BinaryIO, metadata: Mapping[str, str]) -> None:
        """Write header and data to ``f``; the spool is closed afterwards."""
        header, _ = _header_bytes(self._layout.items(), metadata)
        f.write(header)
        for size in sorted(self._spools, reverse=True):  # the order _header_bytes laid out
            spool = self._spools[size]
            spool.seek(0)
            shutil.copyfileobj(spool, f, _COPY_CHUNK)
        self.close()

    def close(self) -> None:
        for spool in self._spools.values():
            spool.close()
        self._spools.clear()
