"""ONNX files written a tensor at a time, whose metadata is rewritten in place once the file has been validated.

Serialising a model whole holds its bytes twice beside it (protobuf's buffer and Python's copy): three copies
of the weights at once. Protobuf writes a message's fields in field-number order, and a message's bytes are its
fields' bytes one after another, so :func:`write_onnx` writes the same bytes in pieces: the model's fields before
the graph, the graph's key and length, its fields before the initializers, each initializer, its other fields,
then the model's fields after the graph (opset imports, metadata, functions). That last piece, the file's tail,
is small, and it is all that changes when metadata is set after a validation run: :func:`write_metadata` rewrites
only the tail, so the weights are not read back.

``onnx.checker`` parses the whole file it is given (two copies of the weights). :func:`check_written` gives it the
written model without its weights instead, and onnxruntime, which loads the real file, checks them by running it.

A model whose weights exceed protobuf's 2 GiB limit cannot be one serialised
message: :func:`save_external` writes it the ONNX way, as ``NAME.onnx`` plus
``NAME.onnx.data`` beside it holding every tensor of at least
:data:`EXTERNAL_TENSOR_MIN_BYTES` (the model names the file by its relative
location, so the pair must stay together).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from epcli.errors import ExportError
from epcli.onnx.export import EXPORTED, check_onnx, external_data_path, set_onnx_metadata
from epcli.text import quote

if TYPE_CHECKING:
    import onnx

__all__ = ["EXTERNAL_TENSOR_MIN_BYTES", "WrittenOnnx", "check_written", "save_external", "write_metadata", "write_onnx"]

EXTERNAL_TENSOR_MIN_BYTES = 1024
"""Tensors of at least this many bytes go to the external data file (onnx's own default); smaller ones stay inline."""
_GRAPH = 7
"""``ModelProto.graph``'s field number."""
_INITIALIZER = 5
"""``GraphProto.initializer``'s field number."""
_RAW_DATA = 9
"""``TensorProto.raw_data``'s field number."""
_TYPED_DATA = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
"""``TensorProto``'s value fields besides ``raw_data``."""
_LENGTH_DELIMITED = 2
"""The wire type of a message field."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class WrittenOnnx:
    """A file :func:`write_onnx` wrote: where its graph ends, ``tail``, a ``ModelProto`` holding only the fields
    written after it, and ``weightless``, the model as :func:`check_written` shows it to the checker (None when no
    tensor was left out: the checker then reads the file itself)."""

    path: Path
    graph_end: int
    tail: onnx.ModelProto
    weightless: onnx.ModelProto | None = None


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
    initializer at a time, and fsync it. Check it with :func:`check_written` once ``proto`` is dropped.

    The one check of ``onnx.checker`` that :func:`check_written` no longer makes on a tensor it leaves out, that its
    raw data is the size its shape and type give, is made here, from the sizes the writer counts anyway."""
    return _synced(path, lambda: _write_pieces(proto, path))


def check_written(written: WrittenOnnx) -> None:
    """``onnx.checker`` (full check, :func:`~epcli.onnx.export.check_onnx`) of the file's graph, with each tensor
    of at least :data:`EXTERNAL_TENSOR_MIN_BYTES` in raw data shown to it as external data pointing at its bytes in
    the file (what the checker sees of a model saved with external data), so it holds no copy of the weights.

    The checker does not read external data: onnxruntime, which loads the real file and whose outputs are compared,
    checks the weights; their sizes were checked as they were written (:func:`write_onnx`).
    """
    if written.weightless is None:
        check_onnx(written.path)
        return
    # beside the file, which its tensors name; one dot, so never ".." (onnx refuses any location holding it)
    weightless = written.path.with_name(f"{written.path.name.replace('.', '_')}.weightless")
    shown = written.weightless
    if ".." in written.path.name:  # the tensors cannot name the file: they name one the checker accepts (it reads none)
        shown = type(shown)()
        shown.CopyFrom(written.weightless)
        for tensor in shown.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = weightless.name
    try:
        try:
            weightless.write_bytes(_serialized(shown))
        except OSError as e:
            raise ExportError(f"cannot write {weightless}: {e.strerror or e}") from e
        check_onnx(weightless, name=written.path)
    finally:
        weightless.unlink(missing_ok=True)


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
    weightless = _fields(proto, lambda number: number != _GRAPH)
    left_out = False
    with path.open("wb") as f:
        f.write(_serialized(_fields(proto, lambda number: number < _GRAPH)))
        if proto.HasField("graph"):
            weightless.graph.CopyFrom(_fields(graph, lambda number: number != _INITIALIZER))
            f.write(_header(_GRAPH, length) + before)
            for tensor, size in zip(graph.initializer, sizes, strict=True):
                f.write(_header(_INITIALIZER, size))
                reference = _reference(tensor, size, path.name, f.tell())
                weightless.graph.initializer.append(tensor if reference is None else reference)
                left_out = left_out or reference is not None
                f.write(_serialized(tensor))
            f.write(after)
        graph_end = f.tell()
        f.write(_serialized(tail))
    return WrittenOnnx(path, graph_end, tail, weightless if left_out else None)


def _reference(tensor: onnx.TensorProto, size: int, location: str, start: int) -> onnx.TensorProto | None:
    """``tensor`` (``size`` bytes serialised, written at ``start`` in the file ``location``) as external data
    pointing at its raw data in that file; None for a tensor left whole: one under
    :data:`EXTERNAL_TENSOR_MIN_BYTES`, or one the checker must see whole to judge (data in a typed field or beside
    the raw data, a type without a whole number of bytes per element, a negative dimension).

    Raises :class:`ExportError` when the raw data is not the size the shape and type give (the checker's check,
    made from the sizes: the raw data is never copied)."""
    from onnx import TensorProto

    item = _item_bytes().get(tensor.data_type)
    if (
        item is None
        or not tensor.HasField("raw_data")
        or tensor.data_location == TensorProto.EXTERNAL
        or any(len(getattr(tensor, name)) for name in _TYPED_DATA)
        or any(dim < 0 for dim in tensor.dims)
    ):
        return None
    nbytes = item * math.prod(tensor.dims)
    if nbytes < EXTERNAL_TENSOR_MIN_BYTES:
        return None
    before = _serialized(_fields(tensor, lambda number: number < _RAW_DATA))
    head = _header(_RAW_DATA, nbytes)
    if len(before) + len(head) + nbytes + _fields(tensor, lambda number: number > _RAW_DATA).ByteSize() != size:
        raise ExportError(
            f"{EXPORTED}: initializer {quote(tensor.name)} does not hold the {nbytes} bytes of raw data its shape "
            f"{list(tensor.dims)} and type ({TensorProto.DataType.Name(tensor.data_type)}) give"
        )
    reference: onnx.TensorProto = _fields(tensor, lambda number: number != _RAW_DATA)
    reference.data_location = TensorProto.EXTERNAL
    del reference.external_data[:]
    for key, value in (("location", location), ("offset", str(start + len(before) + len(head))), ("length", str(nbytes))):
        reference.external_data.add(key=key, value=value)
    return reference


@functools.cache
def _item_bytes() -> dict[int, int]:
    """Bytes per element of the tensor types stored a whole number of bytes per element (the checker's table)."""
    from onnx import TensorProto as T

    return {
        T.BOOL: 1, T.INT8: 1, T.UINT8: 1, T.FLOAT16: 2, T.BFLOAT16: 2, T.INT16: 2, T.UINT16: 2,
        T.FLOAT: 4, T.INT32: 4, T.UINT32: 4, T.DOUBLE: 8, T.INT64: 8, T.UINT64: 8, T.COMPLEX64: 8, T.COMPLEX128: 16,
    }


def _serialized(message: Any) -> bytes:
    data: bytes = message.SerializeToString(deterministic=True)
    return data


def _fields(message: Any, keep: Callable[[int], bool]) -> Any:
    """A new message of ``message``'s type with a copy of each set field whose number ``keep`` accepts; the others
    are not read (a tensor's raw data is not copied to be dropped)."""
    part = type(message)()
    for field in message.DESCRIPTOR.fields:
        if not keep(field.number):
            continue
        if field.is_repeated:
            getattr(part, field.name).extend(getattr(message, field.name))
        elif not message.HasField(field.name):
            continue
        elif field.type == field.TYPE_MESSAGE:
            getattr(part, field.name).CopyFrom(getattr(message, field.name))
        else:
            setattr(part, field.name, getattr(message, field.name))
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
