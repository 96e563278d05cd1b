"""epcli's own safetensors reader and writer, checked against the safetensors library itself.

The library (``safetensors.torch.load_file`` / ``save_file`` / ``safe_open``) is the
reference: what epcli writes must load identically with it, what it writes must
read identically with epcli, and a file epcli refuses must be one it refuses too.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from epcli.errors import CheckpointError
from epcli.storage.safetensors_io import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    SafetensorsSpool,
    read_header,
    read_tensors,
    write_safetensors,
)

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.complex64,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 5)]
METADATA = json.dumps({"format": "epcli-checkpoint", "note": "ünïcode ✓", "nested": {"a": [1, 2]}})


# ---- helpers ------------------------------------------------------------------------------------
def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Random bytes of any dtype (NaN bit patterns included: the format must carry bytes, not values)."""
    n = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bytes(tensor: Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_identical(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes (works for float8, unsigned and NaN patterns alike)."""
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert _bytes(actual[key]) == _bytes(value), key


def _write(path: Path, tensors: dict[str, Tensor], metadata: str = METADATA) -> Path:
    with path.open("wb") as f:
        write_safetensors(f, metadata, tensors)
    return path


def _raw_header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])


def _raw_file(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file from a header (a JSON value, or raw bytes) and data; ``length`` overrides the 8-byte prefix."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    prefix = (len(text) if length is None else length).to_bytes(8, "little")
    path.write_bytes(prefix + text + data)
    return path


def _library_rejects(path: Path) -> bool:
    try:
        load_file(str(path))
    except SafetensorError:
        return True
    return False


# ---- our writer, the library's reader ----------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_library_reads_our_file(tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]):
    tensors = {"t": _sample(dtype, shape, seed=1), "other": _sample(torch.float32, (3,), seed=2)}
    path = _write(tmp_path / "ours.safetensors", tensors)

    _assert_identical(load_file(str(path)), tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {METADATA_KEY: METADATA}
        assert sorted(f.keys()) == ["other", "t"]


@pytest.mark.parametrize("seed", range(4))
def test_mixed_dtypes_in_any_order(tmp_path: Path, seed: int):
    names = [f"w{i}" for i in range(len(DTYPES) * 2)]
    dtypes = DTYPES * 2
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    shapes = [(), (0,), (5,), (3, 3), (1, 7)]
    tensors = {names[i]: _sample(dtypes[i], shapes[i % len(shapes)], seed=i) for i in order}
    path = _write(tmp_path / "mixed.safetensors", tensors)

    _assert_identical(load_file(str(path)), tensors)
    header = read_header(path)
    _assert_identical(read_tensors(path, header, list(tensors)), tensors)
    # layout: grouped by element size, largest first; every tensor aligned to its element size
    sizes = [entry.dtype.itemsize for entry in header.tensors.values()]
    assert sizes == sorted(sizes, reverse=True)
    assert header.data_start % 8 == 0
    for name, entry in _raw_header(path).items():
        if name == "__metadata__":
            continue
        itemsize = tensors[name].dtype.itemsize
        assert entry["data_offsets"][0] % itemsize == 0, (name, entry)
        assert (header.data_start + entry["data_offsets"][0]) % itemsize == 0, (name, entry)


def test_metadata_and_tensors_only_in_the_header(tmp_path: Path):
    path = _write(tmp_path / "m.safetensors", {"a": torch.ones(2)}, metadata="{}")
    header = _raw_header(path)
    assert header["__metadata__"] == {METADATA_KEY: "{}"}
    assert header["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert path.stat().st_size == 8 + int.from_bytes(path.read_bytes()[:8], "little") + 8


def test_write_refuses_a_dtype_safetensors_cannot_store(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"tensor 'z' has dtype torch.complex128, which safetensors cannot"):
        write_safetensors(io.BytesIO(), "{}", {"z": torch.zeros(2, dtype=torch.complex128)})


# ---- the library's writer, our reader ----------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_we_read_the_library_file(tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]):
    tensors = {"b": _sample(dtype, shape, seed=3), "a": _sample(torch.int16, (4,), seed=4), "c": torch.ones(())}
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"epcli": "x", "format": "pt"})

    header = read_header(path)

    assert header.metadata == {"epcli": "x", "format": "pt"}
    assert {k: (e.dtype, e.shape) for k, e in header.tensors.items()} == {
        k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()
    }
    _assert_identical(read_tensors(path, header, tensors), tensors)


def test_read_of_a_subset_in_any_order(tmp_path: Path):
    tensors = {f"k{i}": _sample(torch.float32, (i + 1,), seed=i) for i in range(6)}
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)

    out = read_tensors(path, header, ["k4", "k0", "k2"])

    assert list(out) == ["k4", "k0", "k2"]
    _assert_identical(out, {k: tensors[k] for k in out})
    for tensor in out.values():  # fresh, writable, contiguous CPU memory
        assert tensor.is_contiguous() and tensor.device.type == "cpu"
    out["k0"].fill_(7)
    assert torch.equal(read_tensors(path, header, ["k0"])["k0"], tensors["k0"])


def test_library_file_without_metadata(tmp_path: Path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(3)}, str(path))
    assert read_header(path).metadata == {}


def test_header_with_no_tensors(tmp_path: Path):
    path = _raw_file(tmp_path / "none.safetensors", {"__metadata__": {"k": "v"}})
    assert not _library_rejects(path)
    header = read_header(path)
    assert header.tensors == {} and header.metadata == {"k": "v"}


def test_empty_tensor_listed_after_one_at_the_same_offset(tmp_path: Path):
    """The header's JSON order is free: an empty tensor at [0, 0] may come after one at [0, 8].

    The safetensors library orders entries by (begin, end) and accepts this file
    (e.g. a writer that emits keys sorted by name); epcli must read it too.
    """
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
    }
    path = _raw_file(tmp_path / "sorted_keys.safetensors", header, torch.tensor([1.0, 2.0]).numpy().tobytes())
    expected = load_file(str(path))  # the reference accepts it

    parsed = read_header(path)

    _assert_identical(read_tensors(path, parsed, ["a", "b"]), expected)


# ---- the spool ---------------------------------------------------------------------------------
def _spool_bytes(directory: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    spool = SafetensorsSpool(directory)
    for name, tensor in tensors.items():
        spool.add(name, tensor)
    assert spool.nbytes == sum(t.numel() * t.dtype.itemsize for t in tensors.values())
    out = io.BytesIO()
    spool.finish(out, metadata)
    return out.getvalue()


@pytest.mark.parametrize("seed", range(3))
def test_spool_writes_what_write_safetensors_writes(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    tensors = {}
    for i in range(12):
        dtype = rng.choice(DTYPES)
        tensors[f"layer.{rng.randrange(1000)}.{i}"] = _sample(dtype, rng.choice(SHAPES), seed=i)
    direct = io.BytesIO()
    write_safetensors(direct, METADATA, tensors)
    work = tmp_path / "work"
    work.mkdir()

    spooled = _spool_bytes(work, tensors, {METADATA_KEY: METADATA})

    assert spooled == direct.getvalue()
    assert list(work.iterdir()) == []  # no temp file left behind
    path = tmp_path / "spooled.safetensors"
    path.write_bytes(spooled)
    _assert_identical(load_file(str(path)), tensors)


def test_spool_takes_tensors_it_must_detach_and_make_contiguous(tmp_path: Path):
    weight = torch.randn(4, 3, requires_grad=True)
    tensors = {"w": weight, "t": weight.detach().t(), "column": weight.detach()[:, 1], "odd": weight.detach()[::3]}
    spooled = _spool_bytes(tmp_path, tensors, {METADATA_KEY: "{}"})
    path = tmp_path / "s.safetensors"
    path.write_bytes(spooled)
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value.detach()), key


def test_spool_finish_with_arbitrary_metadata_and_empty_spool(tmp_path: Path):
    spooled = _spool_bytes(tmp_path, {}, {"format": "pt", "other": "x"})
    path = tmp_path / "empty.safetensors"
    path.write_bytes(spooled)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "other": "x"} and list(f.keys()) == []


def test_abandoned_spool_leaves_nothing(tmp_path: Path):
    spool = SafetensorsSpool(tmp_path)
    spool.add("a", torch.ones(1000))
    spool.add("b", torch.ones(10, dtype=torch.int8))
    spool.close()
    spool.close()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_spool_refuses_a_duplicate_name(tmp_path: Path):
    spool = SafetensorsSpool(tmp_path)
    spool.add("w", torch.ones(2))
    with pytest.raises(CheckpointError, match=r"tensor 'w' was written twice"):
        spool.add("w", torch.ones(2, dtype=torch.float64))
    out = io.BytesIO()
    spool.finish(out, {})
    path = tmp_path / "one.safetensors"
    path.write_bytes(out.getvalue())
    _assert_identical(load_file(str(path)), {"w": torch.ones(2)})  # the first one stays


def test_spool_refuses_a_dtype_safetensors_cannot_store(tmp_path: Path):
    spool = SafetensorsSpool(tmp_path)
    with pytest.raises(CheckpointError, match=r"'z' has dtype torch.complex128"):
        spool.add("z", torch.zeros(1, dtype=torch.complex128))
    spool.close()


# ---- read_header refuses damaged files ---------------------------------------------------------
F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
EIGHT = bytes(8)
BAD_HEADERS: dict[str, tuple[Any, bytes, str]] = {
    # name: (header, data, message pattern)
    "not JSON": (b"{not json", b"", r"header \(16 bytes\) is not valid JSON"),
    "not UTF-8": (b"\xff\xfe{}", b"", r"is not valid JSON"),
    "a list": ([1, 2], b"", r"must be a JSON object, got list"),
    "a string": ("text", b"", r"must be a JSON object, got str"),
    "entry not an object": ({"a": [0, 8]}, EIGHT, r"entry 'a' must be an object with dtype, shape and data_offsets"),
    "unknown dtype": ({"a": {**F32_2, "dtype": "F128"}}, EIGHT, r"entry 'a' has dtype 'F128'; epcli reads F64"),
    "missing dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, EIGHT, r"entry 'a' has dtype None"),
    "dtype a list": ({"a": {**F32_2, "dtype": ["F32"]}}, EIGHT, r"entry 'a' has dtype \['F32'\]"),
    "negative dim": ({"a": {**F32_2, "shape": [-2]}}, EIGHT, r"entry 'a' has no valid shape"),
    "float dim": ({"a": {**F32_2, "shape": [2.0]}}, EIGHT, r"entry 'a' has no valid shape"),
    "bool dim": ({"a": {**F32_2, "shape": [True, 2]}}, EIGHT, r"entry 'a' has no valid shape"),
    "shape not a list": ({"a": {**F32_2, "shape": 2}}, EIGHT, r"entry 'a' has no valid shape"),
    "offsets reversed": ({"a": {**F32_2, "data_offsets": [8, 0]}}, EIGHT, r"entry 'a' has no valid data_offsets"),
    "one offset": ({"a": {**F32_2, "data_offsets": [8]}}, EIGHT, r"entry 'a' has no valid data_offsets"),
    "negative offset": ({"a": {**F32_2, "data_offsets": [-8, 0]}}, EIGHT, r"has no valid data_offsets"),
    "bytes not the shape's": (
        {"a": {**F32_2, "data_offsets": [0, 12]}}, bytes(12),
        r"entry 'a' claims 12 bytes for shape \[2\] of F32, which takes 8; the header is corrupt",
    ),
    "gap": (
        {"a": F32_2, "b": {**F32_2, "data_offsets": [12, 20]}}, bytes(20),
        r"entry 'b' starts at byte 12 of the data, expected 8: .*without gaps or overlaps",
    ),
    "gap at the start": ({"a": {**F32_2, "data_offsets": [4, 12]}}, bytes(12), r"'a' starts at byte 4 .*expected 0"),
    "overlap": (
        {"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, bytes(12),
        r"entry 'b' starts at byte 4 of the data, expected 8",
    ),
    "truncated data": (
        {"a": F32_2, "b": {**F32_2, "data_offsets": [8, 16]}}, bytes(15),
        r"^is truncated: its header describes 16 bytes of tensor data, but 15 bytes follow the header",
    ),
    "trailing bytes": ({"a": F32_2}, bytes(9), r"^has trailing bytes: its header describes 8 bytes .* but 9 bytes"),
    "metadata value a number": ({"__metadata__": {"k": 1}, "a": F32_2}, EIGHT, r"__metadata__ must map strings"),
    "metadata value an object": ({"__metadata__": {"k": {}}}, b"", r"__metadata__ must map strings to strings"),
    "metadata a string": ({"__metadata__": "k=v"}, b"", r"__metadata__ must map strings to strings"),
    "metadata a list": ({"__metadata__": ["k"]}, b"", r"__metadata__ must map strings to strings"),
    "metadata empty list": ({"__metadata__": []}, b"", r"__metadata__ must map strings to strings"),
    # parser agreement: a repeated key is refused, not "last one wins"
    "__metadata__ twice": (
        b'{"__metadata__":{"epcli":"a"},"__metadata__":{"epcli":"b"}}', b"", r"repeats the key '__metadata__'"
    ),
    "a key twice inside an entry": (
        b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', EIGHT, r"repeats the key 'dtype'"
    ),
    "NaN in the header": (
        b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', EIGHT, r"NaN is not a JSON number"
    ),
    "a dimension of 2**70": (
        {"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"", r"entry 'a': a size in its shape",
    ),
}
STRICTER_HEADERS: dict[str, tuple[Any, bytes, str]] = {
    # files the library reads but epcli refuses on purpose: ambiguous, or beyond epcli.limits
    "a tensor twice (the library keeps the last)": (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        EIGHT, r"repeats the key 'a'",
    ),
    "a rank of 17": ({"a": {"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}}, bytes(4), r"the rank is 17"),
    "an empty tensor name": ({"": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, EIGHT, r"non-empty name"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_read_header_refuses(tmp_path: Path, case: str):
    header, data, pattern = BAD_HEADERS[case]
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    assert _library_rejects(path), "the reference accepts this file, so the case tests nothing"
    with pytest.raises(CheckpointError, match=pattern):
        read_header(path)


@pytest.mark.parametrize("case", STRICTER_HEADERS)
def test_read_header_is_stricter_than_the_library(tmp_path: Path, case: str):
    header, data, pattern = STRICTER_HEADERS[case]
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    assert not _library_rejects(path), "the reference refuses it too: move the case to BAD_HEADERS"
    with pytest.raises(CheckpointError, match=pattern):
        read_header(path)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_too_short(tmp_path: Path, size: int):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10" * size)
    with pytest.raises(CheckpointError, match=rf"^is too short \({size} bytes\) for a safetensors file"):
        read_header(path)


def test_header_length_zero(tmp_path: Path):
    path = _raw_file(tmp_path / "zero.safetensors", {"a": F32_2}, EIGHT, length=0)
    assert _library_rejects(path)
    with pytest.raises(CheckpointError, match=r"header claims 0 bytes, but \d+ bytes follow the 8-byte length"):
        read_header(path)


def test_header_length_larger_than_the_file(tmp_path: Path):
    path = _raw_file(tmp_path / "long.safetensors", {"a": F32_2}, EIGHT, length=10_000)
    follow = path.stat().st_size - 8
    assert _library_rejects(path)
    with pytest.raises(CheckpointError, match=rf"header claims 10000 bytes, but {follow} bytes follow .* truncated"):
        read_header(path)


def test_header_length_over_the_limit(tmp_path: Path):
    """A (sparse) file big enough for the claimed header: refused by the limit, before reading it."""
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as f:
        f.write((MAX_HEADER_BYTES + 1).to_bytes(8, "little"))
        f.truncate(8 + MAX_HEADER_BYTES + 16)
    with pytest.raises(CheckpointError, match=rf"claims {MAX_HEADER_BYTES + 1} bytes, over the limit"):
        read_header(path)


def test_our_header_checks_accept_what_we_write(tmp_path: Path):
    """The refusals are not over-eager: a file with every dtype, empty and 0-d tensors passes them."""
    tensors = {f"{dtype}-{shape}": _sample(dtype, shape) for dtype in DTYPES for shape in SHAPES}
    path = _write(tmp_path / "all.safetensors", tensors)
    header = read_header(path)
    assert header.metadata == {METADATA_KEY: METADATA}
    _assert_identical(read_tensors(path, header, tensors), tensors)


def test_read_tensors_notices_a_file_that_shrank(tmp_path: Path):
    path = _write(tmp_path / "s.safetensors", {"a": torch.ones(100), "b": torch.ones(100)})
    header = read_header(path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 10)
    assert torch.equal(read_tensors(path, header, ["a"])["a"], torch.ones(100))
    with pytest.raises(CheckpointError, match=r"tensor 'b': the file ended early"):
        read_tensors(path, header, ["b"])
