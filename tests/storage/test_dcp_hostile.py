"""Damaged and hostile DCP directories, each generated here from a real ``dcp.save``: every one is a
:class:`CheckpointError` naming the file and what is wrong, in bounded time and memory, and never a buffer
the file did not fill. Symlinks to regular files keep working (the Hugging Face cache is made of them)."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from epcli.errors import CheckpointError, UnsafeCheckpointError
from epcli.storage.dcp import DCP_METADATA, _read_metadata, read_dcp_listing, read_dcp_tensors

DATA = "__0_0.distcp"
FACTORY = '''
from torch import nn
from epcli import EPLinear


def build():
    return nn.Sequential(EPLinear(6, 4, depth=2))
'''


def _save(root: Path, state: dict[str, torch.Tensor]) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state, "step": 3}, checkpoint_id=str(root), no_dist=True)
    return root


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return _save(tmp_path / "ckpt", {"w": torch.arange(24.0).reshape(4, 6), "ids": torch.arange(5)})


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    listing = read_dcp_listing(path)
    return read_dcp_tensors(path, listing, list(listing))


def _rewrite_metadata(path: Path, change: Callable[[object], None]) -> None:
    metadata = _read_metadata(path)
    change(metadata)
    (path / DCP_METADATA).write_bytes(pickle.dumps(metadata))


def _storage(metadata: object, fqn: str) -> object:
    return next(info for index, info in metadata.storage_data.items() if index.fqn == fqn)  # type: ignore[attr-defined]


def _slice(path: Path, fqn: str) -> tuple[int, int]:
    info = _storage(_read_metadata(path), fqn)
    return info.offset, info.length  # type: ignore[attr-defined]


def _replace_slice(path: Path, fqn: str, data: bytes) -> None:
    """The data file with ``fqn``'s slice replaced by ``data``, appended at the end (the metadata follows it)."""
    file = path / DATA
    offset = file.stat().st_size
    with file.open("ab") as f:
        f.write(data)

    def change(metadata: object) -> None:
        info = _storage(metadata, fqn)
        info.offset, info.length = offset, len(data)  # type: ignore[attr-defined]

    _rewrite_metadata(path, change)


def test_reads_every_tensor_exactly(saved: Path):
    out = _read_all(saved)
    assert torch.equal(out["model.w"], torch.arange(24.0).reshape(4, 6)) and torch.equal(out["model.ids"], torch.arange(5))


def test_symlinked_data_files_and_metadata_keep_working(saved: Path, tmp_path: Path):
    blobs, linked = tmp_path / "blobs", tmp_path / "linked"
    blobs.mkdir()
    linked.mkdir()
    for item in saved.iterdir():  # as the Hugging Face cache lays out a snapshot
        shutil.copy(item, blobs / item.name)
        (linked / item.name).symlink_to(blobs / item.name)
    assert torch.equal(_read_all(linked)["model.w"], torch.arange(24.0).reshape(4, 6))


def test_a_missing_data_file(saved: Path):
    (saved / DATA).unlink()
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*is missing"):
        _read_all(saved)


def test_a_truncated_data_file(saved: Path):
    offset, length = _slice(saved, "model.w")
    os.truncate(saved / DATA, offset + length // 2)
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*past the end of the file .*truncated"):
        _read_all(saved)


def test_an_offset_past_the_end(saved: Path):
    _rewrite_metadata(saved, lambda m: setattr(_storage(m, "model.w"), "offset", 10**12))
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*past the end of the file"):
        _read_all(saved)


def test_a_transform_descriptor_is_refused(saved: Path):
    _rewrite_metadata(saved, lambda m: setattr(_storage(m, "model.w"), "transform_descriptors", ["zstd"]))
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' stores it transformed .*untransformed"):
        read_dcp_listing(saved)


class _Exploit:
    def __reduce__(self):  # what a hostile slice would hold
        return (os.system, ("echo owned > /dev/null",))


def test_a_slice_holding_a_pickle_payload_is_refused(saved: Path, tmp_path: Path):
    torch.save(_Exploit(), tmp_path / "payload.pt")
    _replace_slice(saved, "model.w", (tmp_path / "payload.pt").read_bytes())
    with pytest.raises(UnsafeCheckpointError, match=rf"data file '{DATA}' .*references 'posix.system'"):
        _read_all(saved)


def test_a_slice_that_is_not_a_tensor(saved: Path, tmp_path: Path):
    torch.save({"a": 1}, tmp_path / "dict.pt")
    _replace_slice(saved, "model.w", (tmp_path / "dict.pt").read_bytes())
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*holds a dict, not a tensor"):
        _read_all(saved)


def test_a_slice_of_another_shape(saved: Path, tmp_path: Path):
    torch.save(torch.ones(2, 6), tmp_path / "small.pt")
    _replace_slice(saved, "model.w", (tmp_path / "small.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"holds a \[2, 6\] float32 tensor, but the metadata says \[4, 6\]"):
        _read_all(saved)


def test_a_data_file_symlinked_to_a_non_checkpoint(saved: Path, tmp_path: Path):
    other = tmp_path / "notes.txt"
    other.write_bytes(b"not a checkpoint at all " * 400)
    (saved / DATA).unlink()
    (saved / DATA).symlink_to(other)
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*is not a torch.save archive"):
        _read_all(saved)


def test_a_data_file_that_is_a_fifo_is_refused_without_waiting(saved: Path):
    (saved / DATA).unlink()
    os.mkfifo(saved / DATA)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*is not a regular file"):
        _read_all(saved)
    assert time.monotonic() - start < 5


def test_a_deflated_storage_inside_a_slice_is_refused_before_inflating(saved: Path, tmp_path: Path):
    torch.save(torch.zeros(2**20), tmp_path / "big.pt")
    with zipfile.ZipFile(tmp_path / "big.pt") as source, zipfile.ZipFile(tmp_path / "bomb.pt", "w") as bomb:
        for info in source.infolist():
            bomb.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED)
    _replace_slice(saved, "model.w", (tmp_path / "bomb.pt").read_bytes())
    assert (saved / DATA).stat().st_size < 2**20 / 64  # 4 MiB of zeros, a few KB deflated
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*storage record '0' is compressed"):
        _read_all(saved)


def test_a_slice_longer_than_its_tensor_needs_is_refused_before_reading(saved: Path):
    _rewrite_metadata(saved, lambda m: setattr(_storage(m, "model.w"), "length", 10**9))
    with pytest.raises(CheckpointError, match=r"gives its chunk at \[0, 0\] 1000000000 bytes, more than its 24 float32"):
        read_dcp_listing(saved)


def test_a_deflated_storage_of_the_right_size_is_refused(saved: Path, tmp_path: Path):
    torch.save(torch.zeros(4, 6), tmp_path / "w.pt")
    with zipfile.ZipFile(tmp_path / "w.pt") as source, zipfile.ZipFile(tmp_path / "deflated.pt", "w") as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED)
    _replace_slice(saved, "model.w", (tmp_path / "deflated.pt").read_bytes())
    with pytest.raises(CheckpointError, match=rf"data file '{DATA}' .*is compressed"):
        _read_all(saved)


def test_chunks_that_do_not_cover_the_tensor_are_refused(saved: Path):
    def shrink(metadata: object) -> None:
        chunk = metadata.state_dict_metadata["model.w"].chunks[0]  # type: ignore[attr-defined]
        chunk.sizes = torch.Size([2, 6])  # rows 2..3 would stay uninitialised

    _rewrite_metadata(saved, shrink)
    with pytest.raises(CheckpointError, match=r"'model.w'.* chunks hold 12 elements, but the tensor \[4, 6\] has 24"):
        read_dcp_listing(saved)


def test_chunks_overlapping_in_the_tensor_are_refused(tmp_path: Path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    path = _save(tmp_path / "ckpt", {"w": torch.arange(24.0).reshape(4, 6)})
    torch.save(torch.ones(1, 6), tmp_path / "row.pt")
    row = (tmp_path / "row.pt").read_bytes()
    torch.save(torch.ones(3, 6), tmp_path / "rows.pt")
    _replace_slice(path, "model.w", (tmp_path / "rows.pt").read_bytes())  # rows 0..2
    offset = (path / DATA).stat().st_size
    with (path / DATA).open("ab") as f:
        f.write(row)

    def split(metadata: object) -> None:  # rows 0..2 and row 1 again: as many elements as rows 0..3
        entry = metadata.state_dict_metadata["model.w"]  # type: ignore[attr-defined]
        entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([3, 6])),
                        ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([1, 6]))]
        info = copy.copy(_storage(metadata, "model.w"))
        info.offset, info.length = offset, len(row)  # type: ignore[attr-defined]
        metadata.storage_data[MetadataIndex("model.w", torch.Size([1, 0]))] = info  # type: ignore[attr-defined]

    _rewrite_metadata(path, split)
    with pytest.raises(CheckpointError, match=r"the chunk of 'model.w' at \[1, 0\]\) overlaps another chunk"):
        _read_all(path)


def test_chunks_sharing_bytes_of_a_data_file_are_refused(saved: Path):
    _rewrite_metadata(saved, lambda m: setattr(_storage(m, "model.ids"), "offset", _storage(m, "model.w").offset))
    with pytest.raises(CheckpointError, match=r"'model.ids' and 'model.w' have chunks sharing bytes of data file"):
        read_dcp_listing(saved)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: setattr(m, "storage_data", [1, 2]), r"storage_data is a list, not a dict"),
        (lambda m: setattr(m.state_dict_metadata["model.w"], "chunks", None), r"'model.w': chunks is a NoneType"),
        (lambda m: setattr(m.state_dict_metadata["model.w"], "properties", None), r"'model.w': dtype is a NoneType"),
        (lambda m: setattr(m.state_dict_metadata["model.w"], "size", "big"), r"'model.w': size is a str, not a Size"),
        (lambda m: delattr(m.state_dict_metadata["model.w"].chunks[0], "offsets"), r"offsets is a NoneType"),
        (lambda m: setattr(_storage(m, "model.w"), "length", "1"), r"no valid offset/length"),
    ],
    ids=["storage-list", "chunks-none", "properties-none", "size-str", "no-offsets", "length-str"],
)
def test_wrong_typed_metadata_objects_are_named(saved: Path, change: Callable[[object], None], expected: str):
    _rewrite_metadata(saved, change)
    with pytest.raises(CheckpointError, match=expected):
        read_dcp_listing(saved)


def test_a_metadata_dict_keyed_by_a_shared_nested_tuple_is_refused_before_hashing(saved: Path):
    key: object = ()
    for _ in range(40):  # 2**40 items when hashed: unpickling would never end
        key = (key, key)
    body = pickle.dumps(key, protocol=2)[2:-1]  # built by hand: making the dict here would hash the key
    (saved / DCP_METADATA).write_bytes(b"\x80\x02}" + body + b"K\x01s.")
    assert (saved / DCP_METADATA).stat().st_size < 400
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"{DCP_METADATA}: refused to load: its pickle builds a tuple"):
        read_dcp_listing(saved)
    assert time.monotonic() - start < 2


def test_a_shared_nested_list_as_a_data_file_name_is_quoted_briefly(saved: Path):
    name: list[object] = []
    for _ in range(40):  # its full repr would be 2**40 brackets
        name = [name, name]
    _rewrite_metadata(saved, lambda m: setattr(_storage(m, "model.w"), "relative_path", name))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"names the data file \[\[\[...\], \[...\]\], \[\[...\], \[...\]\]\]"):
        read_dcp_listing(saved)
    assert time.monotonic() - start < 2


@pytest.mark.slow
def test_a_damaged_dcp_directory_exits_3_with_one_line_in_a_subprocess(tmp_path: Path, run_bounded):
    (tmp_path / "dcp_factory.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp_path))
    try:
        from dcp_factory import build  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    path = _save(tmp_path / "ckpt", dict(build().state_dict()))
    key = next(iter(read_dcp_listing(path)))
    offset, length = _slice(path, key)
    os.truncate(path / DATA, offset + length // 2)
    out = tmp_path / "out.safetensors"
    run = run_bounded(
        "export", path, "--model", "dcp_factory:build", "--input-shape", "6", "--state-key", "model",
        "--safetensors", out, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
    )
    assert run.returncode == 3, run.stderr  # an input that cannot be used
    assert "Traceback" not in run.stderr and str(path) in run.message and f"data file '{DATA}'" in run.message
    assert "truncated" in run.message and not out.exists()
