"""``.pt`` files: the torch zip format, read with the weights-only unpickler and nothing else.

An expanded checkpoint holds ``{"epcli_metadata": <JSON str>, "state_dict": {name: tensor}}``.
A collapsed one is a plain state dict, so it loads into the plain architecture as
``model.load_state_dict(torch.load(path, weights_only=True))``: an ``OrderedDict``
``{name: tensor}`` whose metadata travels as the instance attribute ``epcli_metadata``
(the JSON string; pickled with the dict as torch pickles a state dict's ``_metadata``,
and ignored by ``load_state_dict``). Both hold only tensors, strings and dicts, so
``torch.load(weights_only=True)`` reads them and no code from the file ever runs. A pickle that needs any
other global is refused with :class:`UnsafeCheckpointError`; there is no fallback to the full
unpickler, and no loading at all under a torch older than :data:`MIN_TORCH`.
"""

from __future__ import annotations

import io
import itertools
import json
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from epcli.errors import CheckpointError, UnsafeCheckpointError
from epcli.limits import (
    MAX_METADATA_CHARS,
    MAX_TENSORS,
    MAX_TIED_EXPANSION,
    check_count,
    check_name_length,
    check_tensor_shape,
)
from epcli.storage.pt_archive import check_archive
from epcli.storage.raw import RawCheckpoint, missing_metadata
from epcli.text import plural, quote

__all__ = [
    "METADATA_KEY",
    "MIN_TORCH",
    "STATE_KEY",
    "checked_tensors",
    "load_pt",
    "read_pt",
    "read_pt_tensor",
    "write_pt",
]

METADATA_KEY = "epcli_metadata"
STATE_KEY = "state_dict"
_ZIP_MAGIC = b"PK\x03\x04"
MIN_TORCH = (2, 10)
"""The oldest torch whose weights-only unpickler epcli relies on: older ones could be made to run code
(CVE-2025-32434, fixed in 2.6; further ``weights_only`` fixes up to 2.10). pyproject requires it too,
but an environment may hold an older torch regardless."""

_GLOBAL = re.compile(r"GLOBAL (\S+)")
_UNSAFE_HINTS = ("GLOBAL", "allowlist", "unrecognized function", "Can only build", "Can only create")
"""Phrases of the weights-only unpickler when a pickle asks for something beyond tensors and containers."""


def write_pt(f: BinaryIO, metadata: str, tensors: Mapping[str, Tensor]) -> None:
    content: Any
    if json.loads(metadata).get("kind") == "collapsed":  # a plain state dict (module docstring)
        content = OrderedDict(tensors)
        setattr(content, METADATA_KEY, metadata)
    else:
        content = {METADATA_KEY: metadata, STATE_KEY: dict(tensors)}
    # a file object (not a path) keeps the temp file's name out of the archive, so saves are byte-identical
    torch.save(content, f)


def _torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch ("2.13.0+cpu" -> (2, 13)); (0, 0), i.e. too old, if unreadable."""
    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def read_pt(path: Path, state_key: str | None = None) -> RawCheckpoint:
    """Metadata string and tensors of a ``.pt`` checkpoint, loaded without running any code from it.

    The tensors are views of the memory-mapped file: nothing is read until they
    are used, and the mapping ends when the last of them is dropped. Before
    ``torch.load`` the archive's records and pickle are checked
    (:func:`~epcli.storage.pt_archive.check_archive`); after it, every tensor is
    checked to be dense and inside its own bytes of its storage.

    A file epcli did not write gives ``metadata=None``: a plain state dict, or with
    ``state_key`` the state dict a trainer's dict holds under that key.
    """
    return _unpack(load_pt(path), state_key)


def load_pt(
    path: Path,
    *,
    what: str = "checkpoint",
    remedy: str = "epcli writes checkpoints with epcli.save_checkpoint(model, path, input_shape=...)",
) -> Any:
    """Whatever a ``.pt`` file holds (tensors in plain containers), loaded as :func:`read_pt` loads it: archive
    checks, then the weights-only unpickler on the memory-mapped file. Not yet checked for layout: pass its tensors
    through :func:`checked_tensors`. ``what`` the file is and ``remedy`` (how to write one) go into the error for a
    file that is not a torch zip archive at all."""
    _check_torch()
    with path.open("rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        raise CheckpointError(
            f"is not a torch zip {what} (it starts with {head!r}, not {_ZIP_MAGIC!r}): it is corrupt, or was "
            f"not written by torch.save; {remedy}"
        )
    check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise _classify(str(e)) from e
    except Exception as e:  # the zip reader and unpickler raise many types on damaged input
        raise CheckpointError(f"cannot be read as a torch {what}; it is truncated or corrupt ({_brief(e)})") from e


def read_pt_tensor(data: bytes) -> Tensor:
    """The one tensor a ``torch.save`` archive held in memory stores (a slice of a DCP data file), checked as
    :func:`read_pt` checks a file: archive records first, then weights-only loading, then a dense layout."""
    _check_torch()
    stream = io.BytesIO(data)
    if data[: len(_ZIP_MAGIC)] != _ZIP_MAGIC:
        raise CheckpointError(f"is not a torch.save archive (it starts with {data[:4]!r}, not {_ZIP_MAGIC!r})")
    check_archive(stream)
    stream.seek(0)
    try:
        content = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _classify(str(e)) from e
    except Exception as e:  # the zip reader and unpickler raise many types on damaged input
        raise CheckpointError(f"cannot be read as a torch.save archive; it is truncated or corrupt ({_brief(e)})") from e
    if not isinstance(content, Tensor):
        raise CheckpointError(f"holds a {type(content).__name__}, not a tensor")
    _check_layout({"tensor": content}, "the archive")
    return content


def _check_torch() -> None:
    if _torch_version() < MIN_TORCH:
        raise UnsafeCheckpointError(
            f"refused to load: torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, whose "
            "weights-only loading of .pt files can be tricked into running code from the file (CVE-2025-32434 and "
            f"later fixes); nothing was read. Upgrade torch (pip install 'torch>={'.'.join(map(str, MIN_TORCH))}'), "
            "or use a .safetensors checkpoint, which needs no unpickling"
        )


def _classify(message: str) -> CheckpointError:
    """Refused globals -> UnsafeCheckpointError naming the global; anything else is damage."""
    if any(hint in message for hint in _UNSAFE_HINTS):
        found = _GLOBAL.search(message)
        what = quote(found.group(1).rstrip(".")) if found else "an object that is not a tensor or a plain container"
        return UnsafeCheckpointError(
            f"refused to load: its pickle references {what}, which is not on the allowlist of tensor and container "
            "types; loading it would run code from the file, so nothing was executed. An epcli checkpoint never "
            "needs this: only open files from sources you trust"
        )
    return CheckpointError(f"cannot be read as a torch checkpoint; its pickle is corrupt ({_brief(message)})")


def _brief(error: BaseException | str) -> str:
    """The part of a library message that says what is wrong (torch adds paragraphs of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                              "Please file an issue", "In PyTorch"))]
    line = (useful or lines or [type(error).__name__])[0]
    return repr(line[:300])[1:-1]  # control characters (from names in the file) escaped


def _unpack(content: Any, state_key: str | None = None) -> RawCheckpoint:
    attached = getattr(content, METADATA_KEY, None) if isinstance(content, OrderedDict) else None
    if attached is not None:  # a collapsed checkpoint: a plain state dict carrying its metadata
        if not isinstance(attached, str):
            raise CheckpointError(
                f"the state dict's {METADATA_KEY!r} must be a JSON string, got {type(attached).__name__}"
            )
        content = {METADATA_KEY: attached, STATE_KEY: dict(content)}
    if isinstance(content, dict) and METADATA_KEY in content:
        if set(content) != {METADATA_KEY, STATE_KEY}:
            raise CheckpointError(
                f"has top-level keys {quote(list(content))}, expected exactly {[METADATA_KEY, STATE_KEY]}"
            )
        metadata, state = content[METADATA_KEY], content[STATE_KEY]
        if not isinstance(metadata, str):
            raise CheckpointError(f"{METADATA_KEY!r} must be a JSON string, got {type(metadata).__name__}")
        check_count(len(metadata), MAX_METADATA_CHARS, "epcli metadata (characters)")
        if not isinstance(state, dict):
            raise CheckpointError(f"{STATE_KEY!r} must be a dict of tensors, got {type(state).__name__}")
        return RawCheckpoint(metadata, checked_tensors(state, f"{STATE_KEY!r}"))
    if state_key is not None:
        if not isinstance(content, Mapping) or state_key not in content:
            held = f"none (it holds a {type(content).__name__})"
            keys = quote(list(content)) if isinstance(content, Mapping) else held
            raise CheckpointError(f"has no entry {state_key!r} (--state-key); its top-level keys are {keys}")
        content, where = content[state_key], f"entry {state_key!r}"
    else:
        where = "it"
    if isinstance(content, Mapping) and content and all(isinstance(v, Tensor) for v in content.values()):
        state = checked_tensors(dict(content), "state_dict")
        return RawCheckpoint(None, state, f"{where} holds a plain state_dict of {plural(len(content), 'tensor')}")
    if isinstance(content, Mapping):
        tensors = [k for k, v in content.items() if isinstance(v, Mapping)]
        raise missing_metadata(
            f"{where} holds a dict with keys {quote(list(content))}, not a state_dict of tensors"
            + (f"; name the entry holding the model's state_dict with --state-key (e.g. {quote(tensors[0])})"
               if tensors else "")
        )
    raise missing_metadata(f"{where} holds a {type(content).__name__}")


def checked_tensors(state: dict[Any, Any], what: str) -> dict[str, Tensor]:
    """Names and count bounded, every value a dense tensor inside its storage; detached. Errors name ``what``."""
    check_count(len(state), MAX_TENSORS, f"the number of tensors in {what}")
    for key, value in state.items():
        if not isinstance(key, str) or not key or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{what} entry {quote(key)} must map a non-empty string to a tensor, got a {type(value).__name__}"
            )
        check_name_length(key, f"{what} entry")
    _check_layout(state, what)
    return {key: value.detach() for key, value in state.items()}


def _check_layout(state: Mapping[str, Tensor], what: str = repr(STATE_KEY)) -> None:
    """Every tensor dense (contiguous, no stride 0), inside its storage, and not partly overlapping another.

    epcli writes nothing else, and a strided or overlapping view makes more data
    than the file holds: a 2.5 KB file with a stride-0 tensor is a 256 MB tensor.
    Tied tensors (the same bytes under two keys) are accepted, up to
    :data:`~epcli.limits.MAX_TIED_EXPANSION` times the storage bytes in all.
    """
    spans: list[tuple[int, int, int, str]] = []  # (storage, first byte, end byte, key)
    storages: dict[int, int] = {}  # storage -> its bytes
    for key, tensor in state.items():
        where = f"{what} entry {quote(key)}"
        check_tensor_shape(tensor.shape, where)
        if tensor.numel() == 0:
            continue
        if not tensor.is_contiguous():
            raise CheckpointError(
                f"{where} is a strided view (shape {list(tensor.shape)}, strides {list(tensor.stride())}): epcli reads "
                "dense tensors only, as torch.save writes them from contiguous tensors; a stride-0 or overlapping "
                "view makes more data than the file holds"
            )
        data = tensor.untyped_storage()
        begin = int(tensor.storage_offset()) * tensor.element_size()
        end = begin + tensor.numel() * tensor.element_size()
        if end > data.nbytes():
            raise CheckpointError(
                f"{where} needs bytes {begin}..{end} of a storage of {data.nbytes()} bytes; the file is corrupt"
            )
        spans.append((data.data_ptr(), begin, end, key))
        storages[data.data_ptr()] = data.nbytes()
    spans.sort()
    for (storage, first_begin, end, first), (other, begin, other_end, second) in itertools.pairwise(spans):
        if storage == other and begin < end and (begin, other_end) != (first_begin, end):
            raise CheckpointError(
                f"{what} entries {quote(first)} and {quote(second)} overlap in one storage without being the "
                "same tensor; epcli reads dense, separate (or exactly tied) tensors only"
            )
    claimed, stored = sum(end - begin for _, begin, end, _ in spans), sum(storages.values())
    if claimed > MAX_TIED_EXPANSION * stored:
        raise CheckpointError(
            f"its tensors claim {claimed} bytes made of {stored} bytes of storage, more than {MAX_TIED_EXPANSION} "
            "times over: tied weights share a storage, but not that often (a guard against hostile files)"
        )
