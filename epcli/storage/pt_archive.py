"""Checks of a ``.pt`` zip archive made before ``torch.load`` sees it: its records, and a bounded pickle.

``torch.load(weights_only=True)`` runs no code, but two things it trusts are not safe to trust:

* with ``mmap=True`` it slices each storage out of the mapped file by the size its
  pickle claims, without comparing that with the record's size, so a record
  shorter than its claim yields tensors made of the bytes that follow it;
* its unpickler hashes every dict key it builds, and a key that is a tuple nested
  and shared 30 levels deep takes 2**30 steps to hash (and longer to print).

:func:`check_archive` therefore reads the pickle once with :mod:`pickletools`
(which decodes opcodes and builds nothing), following just enough of the
unpickler's stack to find each storage reference and each dict key; then it
checks every referenced record: present, stored uncompressed, exactly the size
claimed, inside the file, and not overlapping another record.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from epcli.errors import CheckpointError
from epcli.limits import (
    MAX_PICKLE_BYTES,
    MAX_PICKLE_TUPLE,
    MAX_TENSORS,
    check_count,
)
from epcli.text import quote

__all__ = ["StorageRef", "check_archive", "scan_pickle"]

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
"""A zip local file header: signature ... name length, extra length (30 bytes)."""


@dataclass(frozen=True)
class StorageRef:
    """A storage the pickle refers to: its record key, its size in bytes as the pickle claims it, and
    the names of the tensors built on it (as far as the scan follows the pickle)."""

    key: str
    nbytes: int
    tensors: tuple[str, ...] = ()


class _Mark:
    """The pickle MARK on the abstract stack."""


_MARK = _Mark()


@dataclass(frozen=True)
class _Tuple:
    items: tuple[Any, ...]
    size: int  # items counted through nested (and shared) tuples: what hashing or printing it costs


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Tensor:
    """A call (``_rebuild_tensor_v2`` ...) whose first argument is a storage: a tensor on that storage."""

    storage: str


_OPAQUE = object()
"""Anything the scan need not know (dicts, lists, other call results)."""


@functools.cache
def _storage_itemsizes() -> dict[str, int]:
    """Legacy typed-storage class names (``FloatStorage`` ...) -> bytes per element."""
    return {name: dtype.itemsize for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


def scan_pickle(data: bytes) -> list[StorageRef]:
    """The storages a torch pickle refers to; refuses tuple dict keys and tuples above :data:`MAX_PICKLE_TUPLE`.

    Raises :class:`CheckpointError` for a pickle that is malformed (the unpickler would fail too).
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    storages: list[StorageRef] = []
    names: dict[str, list[str]] = {}  # storage key -> names of the tensors on it
    try:
        for opcode, value, _ in pickletools.genops(data):
            name, arg = opcode.name, cast(Any, value)
            if name == "STOP":
                break
            if name in ("PROTO", "FRAME"):
                continue
            if name == "MARK":
                stack.append(_MARK)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[int(arg)])
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "GLOBAL":
                module, _, attribute = str(arg).partition(" ")
                stack.append(_Global(module, attribute))
            elif name == "STACK_GLOBAL":
                attribute, module = stack.pop(), stack.pop()
                stack.append(_Global(str(module), str(attribute)))
            elif name == "EMPTY_TUPLE":
                stack.append(_Tuple((), 1))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                stack.append(_tuple(tuple(stack[-count:])))
                del stack[-count - 1 : -1]
            elif name == "TUPLE":
                stack.append(_tuple(tuple(_pop_to_mark(stack))))
            elif name == "BINPERSID":
                storages.append(_storage(stack.pop()))
                check_count(len(storages), MAX_TENSORS, "the number of storages in the pickle")
                stack.append(storages[-1])
            elif name == "REDUCE":
                args = stack.pop()
                stack[-1] = (
                    _Tensor(args.items[0].key)
                    if isinstance(args, _Tuple) and args.items and isinstance(args.items[0], StorageRef)
                    else _OPAQUE
                )
            elif name in ("SETITEM", "SETITEMS"):
                items = _pop_to_mark(stack) if name == "SETITEMS" else stack[-2:]
                if name == "SETITEM":
                    del stack[-2:]
                for key, value in zip(items[::2], items[1::2], strict=True):
                    _check_key(key)
                    if isinstance(value, _Tensor) and isinstance(key, str):
                        names.setdefault(value.storage, []).append(key)
            elif arg is not None and not opcode.stack_before and len(opcode.stack_after) == 1:
                stack.append(arg)  # a string, number or bytes literal
            else:
                _generic(stack, opcode)
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as e:  # pickletools' own errors, or a broken stack
        raise CheckpointError(f"cannot be read as a torch checkpoint; its pickle is corrupt ({str(e)[:200]})") from e
    return [StorageRef(ref.key, ref.nbytes, tuple(names.get(ref.key, ()))) for ref in storages]


def _pop_to_mark(stack: list[Any]) -> list[Any]:
    index = len(stack) - 1
    while stack[index] is not _MARK:
        index -= 1
        if index < 0:
            raise IndexError("no MARK on the stack")
    items = stack[index + 1 :]
    del stack[index:]
    return items


def _generic(stack: list[Any], opcode: pickletools.OpcodeInfo) -> None:
    """Pop what ``opcode`` consumes (per pickletools' description) and push opaque results."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        _pop_to_mark(stack)
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    if below:
        if len(stack) < below:
            raise IndexError(f"{opcode.name} on a short stack")
        del stack[-below:]
    stack.extend(_OPAQUE for _ in opcode.stack_after)


def _tuple(items: tuple[Any, ...]) -> _Tuple:
    size = 1 + sum(item.size if isinstance(item, _Tuple) else 1 for item in items)
    if size > MAX_PICKLE_TUPLE:
        raise CheckpointError(
            f"refused to load: its pickle builds a tuple of more than {MAX_PICKLE_TUPLE} nested items, which no "
            "checkpoint needs and which would take unbounded time to hash or print (a guard against hostile files)"
        )
    return _Tuple(items, size)


def _check_key(key: Any) -> None:
    if isinstance(key, _Tuple):
        raise CheckpointError(
            "refused to load: its pickle uses a tuple as a dict key; an epcli checkpoint maps names (strings) to "
            "tensors, and a nested tuple key can take unbounded time to hash (a guard against hostile files)"
        )


def _storage(pid: Any) -> StorageRef:
    """``('storage', storage type, key, location, numel)`` -> the record key and its claimed size in bytes."""
    items = pid.items if isinstance(pid, _Tuple) else ()
    if len(items) != 5 or items[0] != "storage" or not isinstance(items[1], _Global):
        raise CheckpointError(
            "cannot be read as a torch checkpoint; its pickle refers to something other than a storage"
        )
    kind, key, numel = items[1], items[2], items[4]
    if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise CheckpointError(
            f"cannot be read as a torch checkpoint; its pickle has a malformed storage reference {quote(key)}"
        )
    if (kind.module, kind.name) == ("torch.storage", "UntypedStorage"):
        itemsize = 1
    elif kind.module == "torch" and kind.name in _storage_itemsizes():
        itemsize = _storage_itemsizes()[kind.name]
    else:
        raise CheckpointError(
            f"cannot be read: storage {quote(key)} has type {quote(f'{kind.module}.{kind.name}')}, which epcli does "
            "not read"
        )
    return StorageRef(key, numel * itemsize)


def check_archive(source: Path | BinaryIO) -> None:
    """Check a ``.pt`` archive's pickle (see :func:`scan_pickle`) and every storage record it refers to.

    ``source`` is a file, or an archive in memory (a slice of a DCP data file).
    """
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
        _check_records(f, f.seek(0, os.SEEK_END))


def _check_records(f: BinaryIO, size: int) -> None:
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            pickles = [info for info in infos if info.filename.endswith("data.pkl") and info.filename.count("/") <= 1]
            if len(pickles) != 1:
                raise CheckpointError(
                    f"cannot be read as a torch checkpoint; it holds {len(pickles)} data.pkl records, expected one"
                )
            pickle_info = pickles[0]
            check_count(pickle_info.file_size, MAX_PICKLE_BYTES, "the size of its pickle in bytes")
            storages = scan_pickle(archive.read(pickle_info))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            ValueError) as e:  # RuntimeError: an encrypted record
        raise CheckpointError(
            f"cannot be read as a torch checkpoint; it is truncated or corrupt ({str(e)[:200]})"
        ) from e
    prefix = pickle_info.filename[: -len("data.pkl")]
    records = {info.filename: info for info in infos}
    ranges: list[tuple[int, int, str]] = []
    for storage in {s.key: s for s in storages}.values():
        name = f"{prefix}data/{storage.key}"
        info = records.get(name)
        held = f" (holding {quote(storage.tensors[0])})" if storage.tensors else ""
        where = f"storage record {quote(storage.key)}{held}"
        if info is None:
            raise CheckpointError(f"cannot be read: {where} is missing from the archive; the file is corrupt")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"cannot be read: {where} is compressed; torch.save stores storages uncompressed")
        if info.file_size != storage.nbytes or info.compress_size != storage.nbytes:
            raise CheckpointError(
                f"cannot be read: {where} holds {info.file_size} bytes, but the tensors on it claim "
                f"{storage.nbytes}; the file is truncated or was altered, and reading it would read past the record"
            )
        start = _data_offset(f, info)
        if start + info.file_size > size:
            raise CheckpointError(
                f"cannot be read: {where} extends past the end of the file; the file is truncated"
            )
        ranges.append((start, start + info.file_size, storage.key))
    ranges.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(ranges):
        if start < end:
            raise CheckpointError(
                f"cannot be read: storage records {quote(first)} and {quote(second)} overlap in the file; it was "
                "altered"
            )


def _data_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where a record's bytes start: after its local header, whose name and extra field lengths may differ."""
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"cannot be read: the zip header of record {quote(info.filename)} is damaged")
    fields = _LOCAL_HEADER.unpack(header)
    return int(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
