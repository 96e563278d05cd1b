"""Tensors parked on disk between their uses, read back whole or by their leading rows.

A job that runs a whole model many times but needs only one layer's weights at a time (``compress``'s search)
holds the rest here instead of in memory. The file is an unlinked temporary file in a directory the caller
picks (beside the output: the disk the user chose, not a ``/tmp`` that may live in memory), so nothing is left
behind however the process ends. Tensors are written and read as raw bytes, straight from and into their own
storage: no copy is made on the way.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from epcli.errors import OutputError

__all__ = ["ScratchTensors"]


@dataclass(frozen=True)
class _Entry:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class ScratchTensors:
    """A store of CPU tensors in one unlinked file under ``directory``; a context manager that closes it."""

    def __init__(self, directory: Path) -> None:
        try:
            self._file = tempfile.TemporaryFile(dir=directory)
        except OSError as e:
            raise OutputError(
                f"{directory}: cannot hold a scratch file there ({e.strerror or e}); choose an output in a writable "
                "directory"
            ) from e
        self._directory = directory
        self._entries: list[_Entry] = []
        self._end = 0

    def __enter__(self) -> ScratchTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __deepcopy__(self, memo: dict[int, object]) -> ScratchTensors:
        return self  # one file: a copied model reads the same parked tensors

    def close(self) -> None:
        self._file.close()
        self._entries.clear()

    @property
    def nbytes(self) -> int:
        """Bytes written so far (what the store takes on disk)."""
        return self._end

    def put(self, tensor: Tensor) -> int:
        """Park a copy of ``tensor``; returns the key to read it with."""
        data = tensor.detach().cpu().contiguous()
        self._file.seek(self._end)
        try:
            self._file.write(_bytes(data).numpy().data)
            self._file.flush()
        except OSError as e:
            raise OutputError(
                f"{self._directory}: the scratch file could not grow by {data.nbytes} bytes ({e.strerror or e}); "
                "free some space there"
            ) from e
        self._entries.append(_Entry(self._end, tuple(data.shape), data.dtype))
        self._end += data.nbytes
        return len(self._entries) - 1

    def get(self, key: int, rows: int | None = None) -> Tensor:
        """A new tensor holding what ``key`` parked, or only its first ``rows`` rows (along dimension 0)."""
        entry = self._entries[key]
        if rows is not None and not 0 <= rows <= entry.shape[0]:
            raise ValueError(f"cannot read {rows} rows of tensor {key}, which has {entry.shape[0]}")
        shape = entry.shape if rows is None else (rows, *entry.shape[1:])
        out = torch.empty(shape, dtype=entry.dtype)
        self._file.seek(entry.offset)
        if self._file.readinto(_bytes(out).numpy().data) != out.nbytes:
            raise OSError(f"the scratch file ended before the {out.nbytes} bytes of tensor {key}")
        return out


def _bytes(tensor: Tensor) -> Tensor:
    """A contiguous tensor's storage as a flat uint8 view."""
    return tensor.reshape(-1).view(torch.uint8)
