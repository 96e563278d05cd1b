"""ONNX files written a tensor at a time, whose metadata is rewritten in place once the file has been validated.

Serialising a model whole holds its bytes twice beside it (protobuf's buffer and Python's copy): three copies
of the weights at once. Protobuf writes a message's fields in field-number order, and a message's bytes are its
fields' bytes one after another, so :func:`write_onnx` writes the same bytes in pieces: the model's fields before
the graph, the graph's key and length, its fields before the initializers, each initializer, its other fields,
then the model's fields after the graph (opset imports, metadata, functions). That last piece, the file's tail,
is small, and it is all that changes when metadata is set after a validation run: :func:`write_metadata` rewrites
only the tail, so the weights are not read back.

A model whose weights exceed protobuf's 2 GiB limit cannot be one serialised
message: :func:`save_external` writes it the ONNX way, as ``NAME.onnx`` plus
``NAME.onnx.data`` beside it holding every tensor of at least
:data:`EXTERNAL_TENSOR_MIN_BYTES` (the model names the file by its relative
location, so the pair must stay together).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from epcli.errors import ExportError
from epcli.onnx.export import external_data_path, set_onnx_metadata

if TYPE_CHECKING:
    import onnx

__all__ = ["EXTERNAL_TENSOR_MIN_BYTES", "WrittenOnnx", "save_external", "write_metadata", "write_onnx"]

EXTERNAL_TENSOR_MIN_BYTES = 1024
"""Tensors of at least this many bytes go to the external data file (onnx's own default); smaller ones stay inline."""
_GRAPH = 7
"""``ModelProto.graph``'s field number."""
_INITIALIZER = 5
"""``GraphProto.initializer``'s field number."""
_LENGTH_DELIMITED = 2
"""The wire type of a message field."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class WrittenOnnx:
    """A file :func:`write_onnx` wrote: where its graph ends, and ``tail``, a ``ModelProto`` holding only the fields
    written after it."""

    path: Path
    graph_end: int
    tail: onnx.ModelProto


def save_external(
    proto: onnx.ModelProto, path: Path, *, min_tensor_bytes: int = EXTERNAL_TENSOR_MIN_BYTES
) -> WrittenOnnx:
    """Write ``proto`` as ``path`` plus its external data file (:func:`~epcli.onnx.export.external_data_path`) and
    fsync both; check them on the path with :func:`~epcli.onnx.export.check_onnx`.

    Tensors of at least ``min_tensor_bytes`` move to the data file one at a time.
    ``proto`` is changed in place (its big tensors then point into the file).
    """
    from onnx import external_data_helper

    data = external_data_path(path)
    external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location=data.name, size_threshold=min_tensor_bytes
    )
    try:
        data.write_bytes(b"")  # onnx appends: start empty (and a model with no big tensor still gets its pair)
        external_data_helper.write_external_data_tensors(proto, str(path.parent))
        _fsync(data)
    except OSError as e:
        raise ExportError(f"cannot write {data}: {e.strerror or e}") from e
    return write_onnx(proto, path)


def write_onnx(proto: onnx.ModelProto, path: Path) -> WrittenOnnx:
    """Write the bytes :func:`~epcli.onnx.export.serialize_onnx` gives for ``proto`` to ``path``, serialising one
    initializer at a time, and fsync it. Check it with :func:`~epcli.onnx.export.check_onnx` on the path once
    ``proto`` is dropped: the checker holds two copies of the weights of its own."""
    return _synced(path, lambda: _write_pieces(proto, path))


def write_metadata(written: WrittenOnnx, values: Mapping[str, str]) -> None:
    """Set ``metadata_props`` (:func:`~epcli.onnx.export.set_onnx_metadata`) in the file, rewriting only its tail,
    and fsync it: the file is then what writing the model with that metadata would have given."""
    set_onnx_metadata(written.tail, values)

    def rewrite() -> None:
        with written.path.open("r+b") as f:
            f.truncate(written.graph_end)
            f.seek(written.graph_end)
            f.write(_serialized(written.tail))

    _synced(written.path, rewrite)


def _synced(path: Path, write: Callable[[], _T]) -> _T:
    """``write()``, then fsync ``path``; OS errors name ``path``."""
    try:
        result = write()
        _fsync(path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from e
    return result


def _write_pieces(proto: onnx.ModelProto, path: Path) -> WrittenOnnx:
    graph = proto.graph
    before = _serialized(_fields(graph, lambda number: number < _INITIALIZER))
    after = _serialized(_fields(graph, lambda number: number > _INITIALIZER))
    sizes = [tensor.ByteSize() for tensor in graph.initializer]  # no serialising: upb counts
    length = len(before) + len(after) + sum(len(_header(_INITIALIZER, size)) + size for size in sizes)
    tail = _fields(proto, lambda number: number > _GRAPH)
    with path.open("wb") as f:
        f.write(_serialized(_fields(proto, lambda number: number < _GRAPH)))
        if proto.HasField("graph"):
            f.write(_header(_GRAPH, length) + before)
            for tensor, size in zip(graph.initializer, sizes, strict=True):
                f.write(_header(_INITIALIZER, size))
                f.write(_serialized(tensor))
            f.write(after)
        graph_end = f.tell()
        f.write(_serialized(tail))
    return WrittenOnnx(path, graph_end, tail)


def _serialized(message: Any) -> bytes:
    data: bytes = message.SerializeToString(deterministic=True)
    return data


def _fields(message: Any, keep: Callable[[int], bool]) -> Any:
    """A new message of ``message``'s type with a copy of each set field whose number ``keep`` accepts."""
    part = type(message)()
    for field, value in message.ListFields():
        if not keep(field.number):
            continue
        if field.is_repeated:
            getattr(part, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
    return part


def _header(number: int, size: int) -> bytes:
    """The key and length written before a message field's ``size`` bytes."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
