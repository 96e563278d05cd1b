""".npz sample files (``verify --inputs``) that are damaged, lie about their size or hold dtypes torch does not
compute with, each generated here: every one is refused with one message naming the file, and a zip bomb is
refused from its header, before anything is inflated."""

from __future__ import annotations

import io
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from epcli.checkpoint.inputs import InputSpec
from epcli.errors import CheckpointError
from epcli.limits import MAX_CHECK_BYTES
from epcli.verification.samples import read_samples

FLOAT = (InputSpec((4,)),)
IDS = (InputSpec((3,), torch.int64, 0, 10),)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _npz(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_savez_file_and_a_compressed_one_are_read(tmp_path: Path):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(tmp_path / "a.npz", x)
    np.savez_compressed(tmp_path / "b.npz", np.asfortranarray(x))
    for name in ("a.npz", "b.npz"):
        (got,) = read_samples(tmp_path / name, FLOAT)
        assert torch.equal(got, torch.from_numpy(x))
    np.savez(tmp_path / "big_endian.npz", x.astype(">f4"))
    assert torch.equal(read_samples(tmp_path / "big_endian.npz", FLOAT)[0], torch.from_numpy(x))


def test_a_npy_renamed_npz(tmp_path: Path):
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    (tmp_path / "x.npy").rename(tmp_path / "x.npz")
    with pytest.raises(CheckpointError, match=r"x.npz \(--inputs\): is one .npy array, not a .npz archive"):
        read_samples(tmp_path / "x.npz", FLOAT)


def test_not_a_zip_at_all(tmp_path: Path):
    (tmp_path / "x.npz").write_bytes(b"hello" * 100)
    with pytest.raises(CheckpointError, match=r"x.npz \(--inputs\): cannot be read as a .npz file"):
        read_samples(tmp_path / "x.npz", FLOAT)


def test_a_header_claiming_a_trillion_floats(tmp_path: Path):
    _npz(tmp_path / "x.npz", {"arr_0.npy": _header((10**12,))})
    with pytest.raises(CheckpointError, match=rf"the bytes of array 'arr_0.npy' is 4000000000000, over .* {MAX_CHECK_BYTES}"):
        read_samples(tmp_path / "x.npz", FLOAT)


@pytest.mark.parametrize(
    "array",
    [
        np.array([["a", "b", "c", "d"]]),
        np.zeros((1, 4), dtype="V8"),
        np.zeros((1, 4), dtype=np.longdouble),
        np.zeros((1, 4), dtype="datetime64[s]"),
        np.zeros((1, 4), dtype=[("a", "f4")]),
        np.zeros((1, 4), dtype=np.complex64),
    ],
    ids=["str", "void", "longdouble", "datetime64", "record", "complex"],
)
def test_dtypes_torch_does_not_compute_with(tmp_path: Path, array: np.ndarray):
    np.savez(tmp_path / "x.npz", array)
    with pytest.raises(CheckpointError, match=r"x.npz \(--inputs\): array 'arr_0.npy' has dtype .*; samples are bool"):
        read_samples(tmp_path / "x.npz", FLOAT)


def test_uint64_token_ids_are_refused_with_a_hint(tmp_path: Path):
    np.savez(tmp_path / "ids.npz", np.zeros((2, 3), dtype=np.uint64))
    with pytest.raises(CheckpointError, match=r"dtype 'uint64'.*token ids as int64"):
        read_samples(tmp_path / "ids.npz", IDS)


def test_a_member_whose_size_disagrees_with_its_header(tmp_path: Path):
    _npz(tmp_path / "x.npz", {"arr_0.npy": _npy(np.zeros((2, 4), np.float32))[:-8]})
    with pytest.raises(CheckpointError, match=r"holds 24 bytes of data, but its header claims 32"):
        read_samples(tmp_path / "x.npz", FLOAT)


def test_a_corrupt_deflate_stream_and_an_encrypted_member(tmp_path: Path):
    np.savez_compressed(tmp_path / "x.npz", np.arange(4000, dtype=np.float32).reshape(1000, 4))
    data = bytearray((tmp_path / "x.npz").read_bytes())
    data[200:260] = bytes(60)  # inside the deflate stream
    (tmp_path / "x.npz").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"x.npz \(--inputs\): (cannot be read as a .npz file|array)"):
        read_samples(tmp_path / "x.npz", FLOAT)
    np.savez(tmp_path / "locked.npz", np.zeros((1, 4), np.float32))
    data = bytearray((tmp_path / "locked.npz").read_bytes())
    data[6] |= 1  # the local header's "encrypted" flag
    central = data.rindex(b"PK\x01\x02")
    data[central + 8] |= 1  # and the central directory's
    (tmp_path / "locked.npz").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"locked.npz \(--inputs\): cannot be read as a .npz file"):
        read_samples(tmp_path / "locked.npz", FLOAT)


def test_a_member_that_is_not_npy(tmp_path: Path):
    _npz(tmp_path / "x.npz", {"notes.txt": b"hi"})
    with pytest.raises(CheckpointError, match=r"array 'notes.txt' is not a stored or deflated .npy array"):
        read_samples(tmp_path / "x.npz", FLOAT)


def _bomb(path: Path, gigabytes: float) -> Path:
    """A .npz of one float32 array of zeros, ``gigabytes`` inflated, streamed so the test holds none of it."""
    count = int(gigabytes * 2**30) // 4 // 4 * 4
    header = _header((count // 4, 4))
    zeros = bytes(2**24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("arr_0.npy", "w", force_zip64=True) as f:
        f.write(header)
        for _ in range(count * 4 // len(zeros)):
            f.write(zeros)
    return path


@pytest.mark.slow
def test_a_zip_bomb_is_refused_from_its_header_in_bounded_memory(tmp_path: Path):
    bomb = _bomb(tmp_path / "bomb.npz", 2.5)
    assert bomb.stat().st_size < 4 * 2**20
    code = (
        "import resource, sys; from pathlib import Path; from epcli.checkpoint.inputs import InputSpec\n"
        "from epcli.verification.samples import read_samples\n"
        "try:\n    read_samples(Path(sys.argv[1]), (InputSpec((4,)),))\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    cap = 3 * 2**30

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    done = subprocess.run([sys.executable, "-c", code, bomb], capture_output=True, text=True, preexec_fn=limit,
                          timeout=120)
    message, rss = done.stdout.strip().rsplit("\n", 1)
    assert message.startswith("CheckpointError") and "bomb.npz (--inputs): the bytes of" in message, done.stderr
    assert int(rss) * 1024 < 700 * 2**20  # torch's import; the array is never inflated
