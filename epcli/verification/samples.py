"""``epcli verify --inputs FILE``: the user's own samples, checked against the model's input specs.

As polygraphy's ``--load-inputs`` does, the comparison then runs on real data
instead of random inputs. The file holds one tensor per model input, batch first:

* ``.safetensors`` (read by epcli's checked reader),
* ``.npz`` (``numpy.savez``; read without pickle),
* ``.pt`` holding a dict of tensors (``torch.save({"x": x}, path)``; through the same safe path as
  checkpoints: ``torch.load(weights_only=True)`` after the archive checks).

With one input the tensor's name does not matter; with several they are named
``input_0``, ``input_1``, ... (or ``arr_0``, ``arr_1``, ... as ``numpy.savez(path, *arrays)`` names them).
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from epcli.checkpoint.inputs import InputSpec
from epcli.errors import CheckpointError, EpcliError
from epcli.limits import MAX_CHECK_BYTES, MAX_TENSORS, check_count, check_tensor_shape
from epcli.storage.paths import source_problem
from epcli.storage.safetensors_io import read_header, read_tensors
from epcli.storage.source import check_finite
from epcli.storage.torch_io import checked_tensors, load_pt
from epcli.text import plural, quote

__all__ = ["SAMPLES_FORMAT", "SAMPLE_SUFFIXES", "read_samples", "sample_batches"]

SAMPLE_SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")
SAMPLES_FORMAT = (
    "--inputs takes a .npz, .safetensors or .pt file holding one tensor per model input, batch first (named "
    "input_0, input_1, ... when the model takes several): write one with numpy.savez(path, x=array) or "
    "torch.save({'x': tensor}, path)"
)
"""What a samples file is and how to make one: the fix of every error about the file's format (a user who gave a
bare tensor or an ``.npy`` needs to know what to write instead)."""


def read_samples(path: Path, specs: Sequence[InputSpec]) -> tuple[Tensor, ...]:
    """One tensor per spec (batch first, in the spec's dtype), each checked against its spec; errors name ``path``."""
    try:
        return _checked(_read(path), specs)
    except EpcliError as e:
        raise type(e)(f"{path} (--inputs): {e}", file=path) from e
    except OSError as e:
        raise CheckpointError(f"{path} (--inputs): cannot be read ({e.strerror or e})", file=path) from e


def sample_batches(samples: Sequence[Tensor], batch_size: int) -> list[tuple[Tensor, ...]]:
    """The samples split along the batch dimension into batches of at most ``batch_size``."""
    count = samples[0].shape[0]
    return [tuple(t[start : start + batch_size] for t in samples) for start in range(0, count, batch_size)]


def _read(path: Path) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    problem = source_problem(path, remedy=f"write it again; {SAMPLES_FORMAT}")
    if problem is not None or not path.is_file():
        raise CheckpointError(problem or "is a directory; give the file of samples")
    if suffix == ".safetensors":
        header = read_header(path)
        return read_tensors(path, header, sorted(header.tensors), None)
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in (".pt", ".pth"):
        return _read_pt(path)
    if suffix == ".npy":
        raise CheckpointError(f"is one .npy array, not a file of named tensors; {SAMPLES_FORMAT}")
    raise CheckpointError(f"unsupported suffix {path.suffix!r}; {SAMPLES_FORMAT}")


def _read_pt(path: Path) -> dict[str, Tensor]:
    """The dict of tensors a ``.pt`` holds, loaded as a checkpoint is (weights only, layout checked), then copied
    out of the file's memory map."""
    content = load_pt(path, what="file", remedy=SAMPLES_FORMAT)
    if isinstance(content, Tensor):  # torch.save(x, path): the tensor has no name to match a model input
        raise CheckpointError(
            f"holds one bare tensor (shape {list(content.shape)}), not a dict of tensors; {SAMPLES_FORMAT}"
        )
    if not isinstance(content, Mapping) or not content or not all(isinstance(v, Tensor) for v in content.values()):
        found = f"a dict with keys {quote(list(content))}" if isinstance(content, Mapping) else f"a {type(content).__name__}"
        raise CheckpointError(f"holds {found}, not a dict of tensors; {SAMPLES_FORMAT}")
    return {key: t.clone() for key, t in checked_tensors(dict(content), "the samples").items()}


_NPZ_DTYPES = {"b1", "i1", "i2", "i4", "i8", "u1", "f2", "f4", "f8"}
"""numpy dtypes (kind and size) a sample may have: what torch computes with (no unsigned ids beyond uint8,
no strings, records, long doubles or dates)."""


def _read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of a ``numpy.savez`` file, each header checked before any data is inflated.

    ``numpy.load`` inflates an array whole before anything can check it (a 1 MB file
    can hold 2.5 GB of zeros), so each member's header is read first: its dtype must be
    one torch computes with, its shape within the limits, its data exactly the member's
    size, and all of it within :data:`~epcli.limits.MAX_CHECK_BYTES`; then only that
    many bytes are read.
    """
    import numpy as np

    with path.open("rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise CheckpointError(f"is one .npy array, not a .npz archive; {SAMPLES_FORMAT}")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            check_count(len(infos), MAX_TENSORS, "the number of arrays")
            headers = [_npz_header(archive, info) for info in infos]
            check_count(sum(nbytes for _, _, _, nbytes in headers), MAX_CHECK_BYTES, "the bytes of its arrays")
            out: dict[str, Tensor] = {}
            for info, (dtype, shape, fortran, nbytes) in zip(infos, headers, strict=True):
                data = bytearray(nbytes)  # writable, so torch can share it
                with archive.open(info) as member:
                    member.seek(info.file_size - nbytes)
                    filled = member.readinto(data)  # type: ignore[attr-defined]  # a ZipExtFile
                if filled != nbytes:
                    raise CheckpointError(f"array {quote(info.filename)} is truncated")
                array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
                out[info.filename.removesuffix(".npy")] = torch.from_numpy(
                    np.ascontiguousarray(array, dtype=dtype.newbyteorder("="))
                )
            return out
    except EpcliError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot be read as a .npz file ({quote(str(e))}); {SAMPLES_FORMAT}") from e


def _npz_header(archive: Any, info: Any) -> tuple[Any, tuple[int, ...], bool, int]:
    """(dtype, shape, Fortran order, data bytes) of one ``.npy`` member, read from its header alone."""
    import numpy as np

    where = f"array {quote(info.filename)}"
    if not info.filename.endswith(".npy") or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"{where} is not a stored or deflated .npy array, as numpy.savez writes them")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise CheckpointError(f"{where} has .npy format version {version}; numpy.savez writes 1.0 or 2.0")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        try:
            shape, fortran, dtype = read(member)
        except (zlib.error, EOFError) as e:
            raise CheckpointError(f"{where} is truncated or corrupt ({quote(str(e))})") from e
        except Exception as e:  # numpy parses the header as a Python literal: SyntaxError, TokenError, ValueError...
            raise CheckpointError(f"{where} has a damaged .npy header ({quote(str(e))})") from e
        start = member.tell()
    if f"{dtype.kind}{dtype.itemsize}" not in _NPZ_DTYPES or dtype.fields is not None:
        raise CheckpointError(
            f"{where} has dtype {quote(str(dtype))}; samples are bool, int8-int64, uint8 or float16-float64 "
            "(token ids as int64)"
        )
    check_tensor_shape(shape, where)
    nbytes = math.prod(shape) * dtype.itemsize
    check_count(nbytes, MAX_CHECK_BYTES, f"the bytes of {where}")
    if info.file_size != start + nbytes:
        raise CheckpointError(
            f"{where} holds {info.file_size - start} bytes of data, but its header claims {nbytes}; it is damaged"
        )
    return dtype, shape, fortran, nbytes


def _checked(tensors: Mapping[str, Tensor], specs: Sequence[InputSpec]) -> tuple[Tensor, ...]:
    if len(tensors) != len(specs):
        raise CheckpointError(
            f"holds {plural(len(tensors), 'tensor')} {quote(sorted(tensors))}, but the model takes "
            f"{plural(len(specs), 'input')}; give one tensor per model input, batch first"
        )
    if len(specs) == 1:
        ordered = list(tensors.values())
    else:
        names = next(
            (
                [f"{stem}{i}" for i in range(len(specs))]
                for stem in ("input_", "arr_")
                if set(tensors) == {f"{stem}{i}" for i in range(len(specs))}
            ),
            None,
        )
        if names is None:
            raise CheckpointError(
                f"holds tensors {quote(sorted(tensors))}; name them input_0 .. input_{len(specs) - 1}, one per model "
                "input in order (numpy.savez(path, *arrays) names them arr_0 ..., which is read too)"
            )
        ordered = [tensors[name] for name in names]
    out: list[Tensor] = []
    for index, (tensor, spec) in enumerate(zip(ordered, specs, strict=True)):
        where = f"input {index}" if len(specs) > 1 else "the input"
        check_tensor_shape(tensor.shape, where)
        if tensor.dim() != len(spec.shape) + 1 or tuple(tensor.shape[1:]) != spec.shape or tensor.shape[0] < 1:
            raise CheckpointError(
                f"{where} has shape {list(tensor.shape)}; the model takes [batch, {', '.join(map(str, spec.shape))}] "
                f"({spec}), batch first and at least one sample"
            )
        if spec.is_float != tensor.is_floating_point() and spec.dtype != torch.bool:
            raise CheckpointError(
                f"{where} has dtype {str(tensor.dtype).removeprefix('torch.')}, but the model takes {spec.name} "
                f"({'floating-point' if spec.is_float else 'integer'} values)"
            )
        check_finite({where: tensor}, "the samples")
        if not spec.is_float and tensor.numel():
            assert spec.low is not None and spec.high is not None
            low, high = int(tensor.min()), int(tensor.max())
            if low < spec.low or high >= spec.high:
                raise CheckpointError(
                    f"{where} holds values {low}..{high}, outside the model's range [{spec.low:g}, {spec.high:g})"
                )
        out.append(tensor.to(spec.dtype) if not spec.is_float else tensor)
    if len({t.shape[0] for t in out}) > 1:
        raise CheckpointError(f"the inputs have different batch sizes {[t.shape[0] for t in out]}; give one per sample")
    return tuple(out)
