"""The tensors of a checkpoint, listed up front and read on demand, whoever wrote it.

:func:`open_source` reads only what describes the checkpoint (a safetensors header,
a shard index and its shards' headers, the pickle of a ``.pt`` mapped into memory,
or a ``torch.distributed.checkpoint`` directory's metadata) and returns a
:class:`TensorSource`: epcli's metadata string (None for files other tools wrote),
every tensor's shape and dtype, and :meth:`TensorSource.read` for the data of
chosen tensors. Reading a few tensors costs their size, not the checkpoint's:

* ``.safetensors`` and sharded safetensors: plain reads of those tensors' bytes;
* ``.pt``: the tensors are copied out of a memory map of the file, whose pages are
  given back as they are copied (see :class:`_PtReader`), so few file pages stay resident;
* DCP: those tensors' chunks, each read from its data file and checked (:mod:`epcli.storage.dcp`).

A directory is a Hugging Face folder (``model.safetensors`` or its sharded
``model.safetensors.index.json``) or a DCP directory (it holds ``.metadata``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from epcli.core.finite import all_finite, flat_chunks
from epcli.errors import CheckpointError
from epcli.storage.dcp import DCP_METADATA, is_dcp, read_dcp_listing, read_dcp_tensors
from epcli.storage.mapped_pages import release_pages
from epcli.storage.safetensors_io import (
    METADATA_KEY,
    SafetensorsHeader,
    read_header,
    read_tensors,
)
from epcli.storage.sharded import INDEX_SUFFIX, SHARD_OF_KEY, is_index, read_index
from epcli.storage.torch_io import read_pt
from epcli.text import plural, quote

__all__ = ["HF_FILES", "SUFFIXES", "TensorInfo", "TensorSource", "check_finite", "directory_file", "open_source", "renamed"]

SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".safetensors", INDEX_SUFFIX)
"""What epcli reads: torch zip checkpoints, safetensors files, and sharded safetensors by their index."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def meta(self) -> Tensor:
        """A meta tensor of this shape and dtype: checks run on it without allocating anything."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass(frozen=True)
class TensorSource:
    """A checkpoint's metadata string and tensor listing (state-dict order), with data read on demand.

    ``files`` are every file the checkpoint consists of (the index and its shards, or one file).
    ``metadata`` is None for a checkpoint epcli did not write; ``found`` then says what it
    holds and ``form`` names its format (for messages).
    """

    path: Path
    metadata: str | None
    tensors: Mapping[str, TensorInfo]
    files: tuple[Path, ...]
    _read: Callable[[list[str], torch.dtype | None], dict[str, Tensor]]
    found: str = ""
    form: str = "epcli"

    def read(self, keys: Iterable[str], *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Fresh contiguous CPU tensors for ``keys``, in that order (sharing no memory with the file).

        With ``dtype`` floating-point tensors are cast to it one at a time as they
        are read, so a layer read in float64 never also exists whole in float32.
        """
        wanted = list(keys)
        unknown = [key for key in wanted if key not in self.tensors]
        if unknown:
            raise CheckpointError(f"has no tensors {unknown[:8]}")
        out = self._read(wanted, dtype)
        for key in wanted:
            info, tensor = self.tensors[key], out[key]
            cast = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            if tuple(tensor.shape) != info.shape or tensor.dtype != cast:
                raise CheckpointError(
                    f"tensor {quote(key)} changed while the file was open (now {list(tensor.shape)} {tensor.dtype}, "
                    "was "
                    f"{list(info.shape)} {info.dtype}); do not overwrite a checkpoint while epcli reads it"
                )
        return {key: out[key] for key in wanted}

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(info.nbytes for info in self.tensors.values())


def _readable_suffix(path: Path) -> str | None:
    """The entry of :data:`SUFFIXES` ``path`` ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((suffix for suffix in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(suffix)), None)


HF_FILES = ("model.safetensors.index.json", "model.safetensors")
"""What a Hugging Face folder holds, in the order looked for."""


def open_source(path: Path, *, state_key: str | None = None) -> TensorSource:
    """List a checkpoint's tensors without reading their data; errors do not name ``path`` (callers add it).

    ``state_key`` names the entry of a ``.pt`` trainer dict holding the state dict (or, for
    safetensors and DCP, the key prefix of the model's tensors, e.g. ``model`` for ``model.*``).
    """
    if path.is_dir():
        return _open_directory(path, state_key)
    source = _open_file(path, state_key)
    return source if state_key is None or source.form == "pt" else _select(source, state_key)


def directory_file(path: Path) -> Path | None:
    """The file a Hugging Face folder is read from (the first of :data:`HF_FILES` in it), or None."""
    return next((path / name for name in HF_FILES if (path / name).is_file()), None)


def _open_directory(path: Path, state_key: str | None) -> TensorSource:
    if is_dcp(path):
        source = _open_dcp(path)
    else:
        found = directory_file(path)
        if found is None:
            raise CheckpointError(
                f"is a directory with neither {' nor '.join(HF_FILES)} (a Hugging Face folder) nor {DCP_METADATA} (a "
                f"torch.distributed.checkpoint directory); pass the checkpoint file itself ({', '.join(SUFFIXES)})"
            )
        source = replace(_open_file(found, None), path=path)
    return source if state_key is None else _select(source, state_key)


def _select(source: TensorSource, state_key: str) -> TensorSource:
    """The tensors under ``<state_key>.``, named without that prefix."""
    prefix = f"{state_key}."
    chosen = {key[len(prefix):]: key for key in source.tensors if key.startswith(prefix)}
    if not chosen:
        roots = sorted({key.split(".")[0] for key in source.tensors})
        raise CheckpointError(
            f"holds no tensors under {prefix!r} (--state-key {state_key}); its keys start with {quote(roots[:8])}"
        )
    return renamed(source, chosen, f"{source.found}, {len(chosen)} of them under {prefix!r}")


def renamed(source: TensorSource, names: Mapping[str, str], found: str | None = None) -> TensorSource:
    """``source`` with tensors listed as the keys of ``names`` (new name -> the checkpoint's own name).

    Two names may map to one stored tensor (a tied weight a file stores once).
    """
    infos = {new: source.tensors[old] for new, old in names.items()}

    def read(keys: list[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
        stored = source.read(list(dict.fromkeys(names[key] for key in keys)), dtype=dtype)
        out: dict[str, Tensor] = {}
        for key in keys:
            tensor = stored[names[key]]
            out[key] = tensor if not any(v is tensor for v in out.values()) else tensor.clone()
        return out

    return replace(source, tensors=infos, _read=read, found=source.found if found is None else found)


def _open_file(path: Path, state_key: str | None) -> TensorSource:
    suffix = _readable_suffix(path)
    if suffix is None:
        raise CheckpointError(f"unsupported file suffix {path.suffix!r}; epcli reads {', '.join(SUFFIXES)}")
    if is_index(path):
        return _open_index(path)
    if suffix == ".safetensors":
        return _open_safetensors(path)
    return _open_pt(path, state_key)


def _open_safetensors(path: Path) -> TensorSource:
    header = read_header(path)
    text = header.metadata.get(METADATA_KEY)
    if text is None:
        index = header.metadata.get(SHARD_OF_KEY)
        if index is not None:
            raise CheckpointError(f"is one shard of a sharded checkpoint; open its index {quote(index)} instead")
    infos = _infos(header)
    found = f"it holds {plural(len(header.tensors), 'tensor')} and no {METADATA_KEY!r} entry in __metadata__"
    return TensorSource(
        path, text, infos, (path,), lambda keys, dtype: read_tensors(path, header, keys, dtype), found, "safetensors"
    )


def _infos(header: SafetensorsHeader) -> dict[str, TensorInfo]:
    # sorted by name, the order in which the safetensors library lists a file's tensors
    return {key: TensorInfo(header.tensors[key].shape, header.tensors[key].dtype) for key in sorted(header.tensors)}


def _open_index(path: Path) -> TensorSource:
    index = read_index(path)
    infos: dict[str, TensorInfo] = {}
    for header in index.headers.values():
        infos.update(_infos(header))
    infos = {key: infos[key] for key in sorted(infos)}

    def read(keys: list[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for shard, header in index.headers.items():
            mine = [key for key in keys if index.weight_map[key] == shard]
            if mine:
                try:
                    out.update(read_tensors(shard, header, mine, dtype))
                except CheckpointError as e:
                    raise CheckpointError(f"shard {quote(shard.name)}: {e}") from e
        return out

    found = f'its "metadata" has no {METADATA_KEY!r} entry ({plural(len(infos), "tensor")})'
    return TensorSource(path, index.metadata, infos, (path, *index.headers), read, found, "sharded safetensors")


def _open_pt(path: Path, state_key: str | None) -> TensorSource:
    raw = read_pt(path, state_key)
    infos = {key: TensorInfo(tuple(t.shape), t.dtype) for key, t in raw.tensors.items()}
    total = sum(info.nbytes for info in infos.values())
    # the listing's mapping serves the first reads: nothing of it is resident yet
    reader = _PtReader(path, total, raw.tensors, state_key)
    return TensorSource(path, raw.metadata, infos, (path,), reader.read, raw.found, "pt")


def _open_dcp(path: Path) -> TensorSource:
    listing = read_dcp_listing(path)
    infos = {key: TensorInfo(*listing[key]) for key in listing}
    files = tuple(sorted(p for p in path.iterdir() if p.is_file()))

    def read(keys: list[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
        return {key: _copy(t, dtype) for key, t in read_dcp_tensors(path, listing, keys).items()}

    found = f"a torch.distributed.checkpoint directory of {plural(len(infos), 'tensor')}"
    return TensorSource(path, None, infos, files, read, found, "torch.distributed.checkpoint")


class _PtReader:
    """Reads from a memory map of a ``.pt`` file, giving back the pages it copied out of as it goes.

    Pages of a mapping that have been read stay resident (and count in the process's
    memory) until they are released. On Linux those of every read are released at once
    (:func:`~epcli.storage.mapped_pages.release_pages`), so one mapping serves the whole
    file. Elsewhere the mapping is dropped and mapped again after every sixteenth of the
    file (at least 16 MiB): mapping again costs a check and an unpickling of the whole
    key list (about 80 us per tensor), so this bounds both, resident pages to that much,
    re-mappings to about 16.
    """

    def __init__(self, path: Path, total_bytes: int, mapped: dict[str, Tensor], state_key: str | None) -> None:
        self._path = path
        self._state_key = state_key
        self._remap_after = max(16 * 2**20, total_bytes // 16)
        self._mapped: dict[str, Tensor] | None = mapped
        self._read_since_mapped = 0

    def read(self, keys: list[str], dtype: torch.dtype | None) -> dict[str, Tensor]:
        if self._mapped is None:
            self._mapped, self._read_since_mapped = read_pt(self._path, self._state_key).tensors, 0
        mapped = self._mapped
        missing = [key for key in keys if key not in mapped]
        if missing:
            raise CheckpointError(f"tensors {missing[:8]} are gone: the file changed while epcli read it")
        out = {key: _copy(mapped[key], dtype) for key in keys}  # one copy out of the mapping, cast on the way
        if release_pages(self._path, (mapped[key] for key in keys)):
            return out
        self._read_since_mapped += sum(mapped[key].nbytes for key in keys)
        if self._read_since_mapped >= self._remap_after:
            self._mapped = None  # its resident pages go with it
        return out


def _copy(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A contiguous CPU copy, in ``dtype`` when given and the tensor is floating-point."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return torch.empty(tensor.shape, dtype=target).copy_(tensor)


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """Every floating or complex tensor is finite; :class:`CheckpointError` names the key otherwise.

    Works for every dtype epcli reads: float8 tensors, which have no ``isfinite``
    kernel, are checked in float32 chunks of 2**20 elements.
    """
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not all_finite(tensor):
            nan = sum(int(torch.isnan(chunk).sum()) for chunk in flat_chunks(tensor))
            inf = sum(int(torch.isinf(chunk).sum()) for chunk in flat_chunks(tensor))
            raise CheckpointError(
                f"tensor {quote(key)} in {source} has non-finite values ({nan} NaN, {inf} Inf); training diverged, "
                "a computation overflowed its dtype, or the data is damaged"
            )
