"""Sharded safetensors: ``<stem>-0000k-of-0000N.safetensors`` plus ``<stem>.safetensors.index.json``.

The index follows the Hugging Face convention, with epcli's metadata beside ``total_size``::

    {"metadata": {"epcli": <metadata JSON str>, "total_size": <tensor bytes>},
     "weight_map": {tensor name: shard file name}}

Shards sit beside the index. Each shard's ``__metadata__`` says ``"format": "pt"``
(what Hugging Face loaders expect) and names its index, so opening a shard on its
own gets a message pointing at the index instead of a confusing one.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epcli.errors import CheckpointError, EpcliError
from epcli.limits import MAX_INDEX_BYTES, MAX_TENSORS, check_count, loads_json
from epcli.storage.paths import INDEX_SUFFIX, is_index, sharded_base
from epcli.storage.safetensors_io import METADATA_KEY, SafetensorsHeader, read_header
from epcli.text import quote

__all__ = [
    "INDEX_SUFFIX",
    "SHARD_OF_KEY",
    "ShardIndex",
    "index_document",
    "index_path",
    "is_index",
    "listed_shards",
    "output_names",
    "plan_shards",
    "read_index",
    "shard_metadata",
    "shard_paths",
    "sharded_base",
]

SHARD_OF_KEY = "epcli_shard_of"
"""``__metadata__`` key of a shard: the file name of its index."""


def index_path(output: Path) -> Path:
    """``<stem>.safetensors`` -> ``<stem>.safetensors.index.json``."""
    return output.with_name(output.name + ".index.json")


def shard_paths(output: Path, count: int) -> list[Path]:
    """``<stem>-00001-of-0000N.safetensors`` ... for ``<stem>.safetensors``."""
    return [output.with_name(f"{output.stem}-{k:05d}-of-{count:05d}{output.suffix}") for k in range(1, count + 1)]


def output_names(output: Path) -> str:
    """A regular expression for every file name of a ``<stem>.safetensors`` output: itself, its shards and index."""
    stem = re.escape(output.stem)
    return rf"{stem}(?:-\d{{5}}-of-\d{{5}})?\.safetensors(?:\.index\.json)?"


def shard_metadata(index: Path) -> dict[str, str]:
    return {"format": "pt", SHARD_OF_KEY: index.name}


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Keys in order, cut into consecutive groups of at most ``max_shard_bytes`` (a bigger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def index_document(metadata: str, weight_map: Mapping[str, str], total_size: int) -> bytes:
    """The index file's bytes (sorted keys, so identical input gives identical bytes)."""
    document = {"metadata": {METADATA_KEY: metadata, "total_size": total_size}, "weight_map": dict(weight_map)}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


@dataclass(frozen=True)
class ShardIndex:
    """A checked index: epcli's metadata string (None: written by another tool), each shard's header, key -> shard."""

    metadata: str | None
    headers: dict[Path, SafetensorsHeader]
    weight_map: dict[str, Path]


def read_index(path: Path) -> ShardIndex:
    """Parse and check an index and its shards' headers; no tensor data is read.

    Errors name the shard at fault; callers add the index's path.
    """
    size = path.stat().st_size
    check_count(size, MAX_INDEX_BYTES, "the shard index's size in bytes")
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"shard index is not valid JSON (not UTF-8: {e})") from e
    document = loads_json(content, "shard index")
    if not isinstance(document, dict) or not isinstance(document.get("weight_map"), dict):
        raise CheckpointError('shard index must be a JSON object with a "weight_map" object (tensor name -> shard file)')
    check_count(len(document["weight_map"]), MAX_TENSORS, "the number of tensors in the shard index")
    metadata = document.get("metadata")
    text = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if text is not None and not isinstance(text, str):
        raise CheckpointError(f'shard index "metadata"[{METADATA_KEY!r}] must be a JSON string, got {type(text).__name__}')
    weight_map = {key: _shard(path, key, name) for key, name in document["weight_map"].items()}
    headers = {shard: _shard_header(shard, weight_map) for shard in dict.fromkeys(weight_map.values())}
    for shard, header in headers.items():
        for key in header.tensors:
            if weight_map.get(key) != shard:
                raise CheckpointError(
                    f"shard {quote(shard.name)} holds {quote(key)}, which the index does not map to it"
                )
    for key, shard in weight_map.items():
        if key not in headers[shard].tensors:
            raise CheckpointError(f"the index maps {quote(key)} to shard {quote(shard.name)}, which does not hold it")
    return ShardIndex(text, headers, weight_map)


def listed_shards(index: Path) -> list[Path]:
    """The shard files of this name an index lists, read leniently: for removing an old output's shards.

    Only names following the pattern of ``<stem>-0000k-of-0000N.safetensors`` for the
    index's own stem count, so an edited index cannot point the clean-up at other files.
    """
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            return []
        weight_map = json.loads(index.read_bytes().decode("utf-8")).get("weight_map")
        names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError, TypeError):
        return []
    shards = []
    pattern = re.compile(re.escape(sharded_base(index).stem) + r"-\d{5}-of-\d{5}\.safetensors", re.IGNORECASE)
    for name in sorted(n for n in names if isinstance(n, str) and pattern.fullmatch(n)):
        with contextlib.suppress(CheckpointError):
            shards.append(_shard(index, "", name))
    return shards


def _shard(index: Path, key: Any, name: Any) -> Path:
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(
            f"weight_map entry {quote(key)} must name a shard file beside the index (no directories), got {quote(name)}"
        )
    if not name.lower().endswith(".safetensors"):
        raise CheckpointError(f"weight_map entry {quote(key)} names {quote(name)}; shards must be .safetensors files")
    return index.with_name(name)


def _shard_header(shard: Path, weight_map: Mapping[str, Path]) -> SafetensorsHeader:
    if not shard.is_file():
        held = [key for key, s in weight_map.items() if s == shard]
        raise CheckpointError(
            f"shard {quote(shard.name)} (holding {quote(held[:3])}{' ...' if len(held) > 3 else ''}) is missing "
            "beside the index; "
            "copy every shard file along with the index"
        )
    try:
        return read_header(shard)
    except EpcliError as e:
        raise type(e)(f"shard {quote(shard.name)}: {e}") from e

