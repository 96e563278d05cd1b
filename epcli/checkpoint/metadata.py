"""The metadata every epcli checkpoint carries, as one JSON object: schema, writing and validation.

Example (``json.dumps(sort_keys=True)``; no timestamps, so equal models give equal bytes)::

    {"architecture": {...} | null, "config_version": 1,
     "ep_layers": {"1": {"class": "EPLinear", "config": {...}, "input_shape": [64]}},
     "epcli_version": "0.1.0", "format": "epcli-checkpoint", "format_version": 1,
     "input_shape": [64], "kind": "expanded", "provenance": {}, "torch_version": "2.13.0"}

Parsing checks every key, type and range and returns a typed :class:`Metadata`;
errors name the key (and layer path) but not the file, which the caller adds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epcli._version import __version__
from epcli.checkpoint.inputs import MAX_INPUTS, InputSpec, plain_input, sample_shape
from epcli.errors import CheckpointError, ConfigError
from epcli.layers.config import CONFIG_VERSION, EPConfig
from epcli.layers.registry import class_name, config_from_dict
from epcli.limits import (
    MAX_ARCHITECTURE_NODES,
    MAX_EP_LAYERS,
    MAX_FEATURES,
    MAX_METADATA_CHARS,
    check_config_numbers,
    check_count,
    check_name_length,
    is_int,
    loads_json,
)
from epcli.storage.raw import FOREIGN_HINT, SAVE_HINT, RawCheckpoint, missing_metadata
from epcli.text import clip, quote

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "READABLE_FORMAT_VERSIONS",
    "FOREIGN_HINT",
    "SAVE_HINT",
    "CompressionRecord",
    "Metadata",
    "RawCheckpoint",
    "build_metadata",
    "checked_config",
    "compression_record",
    "dump_metadata",
    "missing_metadata",
    "parse_metadata",
    "sample_shape",
]

FORMAT_NAME = "epcli-checkpoint"
FORMAT_VERSION = 1
INPUTS_FORMAT_VERSION = 2
"""Files whose model takes anything but one float32 input carry ``inputs`` (a list of specs) and this version,
so an older epcli refuses them by version instead of misreading them; all other files stay version 1."""
READABLE_FORMAT_VERSIONS = (1, 2)
READABLE_CONFIG_VERSIONS = (CONFIG_VERSION,)
KINDS = ("expanded", "collapsed")
_KEYS = frozenset(
    {"format", "format_version", "config_version", "kind", "epcli_version", "torch_version", "input_shape",
     "ep_layers", "architecture", "provenance"}
)
_INPUTS_KEY = "inputs"
_LAYER_KEYS = frozenset({"class", "config", "input_shape"})


@dataclass(frozen=True)
class Metadata:
    """Validated metadata; ``document`` is the whole parsed JSON object."""

    kind: str
    input_shape: tuple[int, ...]
    inputs: tuple[InputSpec, ...]
    ep_layers: dict[str, EPConfig]
    layer_input_shapes: dict[str, tuple[int, ...]]
    architecture: dict[str, Any] | None
    provenance: dict[str, Any]
    document: dict[str, Any]


@dataclass(frozen=True)
class CompressionRecord:
    """What ``epcli compress`` records of a file it wrote (``provenance.compression``), checked: the budget the
    whole model was compressed to, and the rank (per group) of each factored layer, by module path."""

    max_error: float
    ranks: dict[str, int]
    samples_file: str | None = None
    """The name of the ``--inputs`` file the budget was measured on (None: seeded random inputs)."""


# ---- writing ---------------------------------------------------------------------------------
def build_metadata(
    *,
    kind: str,
    inputs: Sequence[InputSpec],
    ep_layers: Mapping[str, EPConfig],
    layer_input_shapes: Mapping[str, tuple[int, ...]],
    architecture: dict[str, Any] | None,
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """The metadata document; ``inputs`` (and format_version 2) only unless the model takes one float32 input."""

    plain = plain_input(inputs)
    document: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION if plain else INPUTS_FORMAT_VERSION,
        "config_version": CONFIG_VERSION,
        "kind": kind,
        "epcli_version": __version__,
        "torch_version": str(torch.__version__),
        "input_shape": list(inputs[0].shape),
        "ep_layers": {
            path: {
                "class": class_name(config),
                "config": config.to_dict(),
                "input_shape": list(layer_input_shapes[path]),
            }
            for path, config in ep_layers.items()
        },
        "architecture": architecture,
        "provenance": dict(provenance),
    }
    if not plain:
        document[_INPUTS_KEY] = [spec.to_dict() for spec in inputs]
    return document


def dump_metadata(document: Mapping[str, Any]) -> str:
    """Canonical JSON: sorted keys, no NaN, so identical input gives identical bytes."""
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"metadata is not JSON-serialisable: {_non_json(document, 'metadata') or e}; metadata (provenance "
            "included) must hold plain JSON values and finite numbers"
        ) from e


def _non_json(value: Any, where: str) -> str | None:
    """Where the first value JSON cannot hold is (``metadata['provenance']['x'] is inf``), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"{where} has a key of type {type(key).__name__}"
            found = _non_json(item, f"{where}[{quote(key)}]")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _non_json(item, f"{where}[{index}]")
            if found:
                return found
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        return f"{where} is a {type(value).__name__}"
    return None


# ---- reading ---------------------------------------------------------------------------------
def parse_metadata(text: str) -> Metadata:
    """Validate the metadata JSON string of a checkpoint (format, version, every key, type and range)."""
    check_count(len(text), MAX_METADATA_CHARS, "epcli metadata (characters)")
    document = loads_json(text, "epcli metadata")
    if not isinstance(document, dict):
        raise CheckpointError(f"epcli metadata must be a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"metadata format is {quote(document.get('format'))}, expected {FORMAT_NAME!r}; {SAVE_HINT}"
        )
    version = document.get("format_version")
    if not is_int(version) or version not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(
            f"format_version {quote(version)} is not supported: epcli {__version__} reads format_version "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; upgrade epcli to read newer files"
        )
    keys = _KEYS | {_INPUTS_KEY} if version == INPUTS_FORMAT_VERSION else _KEYS
    missing, unknown = sorted(keys - set(document)), sorted(set(document) - keys)
    if missing or unknown:
        raise CheckpointError(f"metadata is missing keys {missing} / has unknown keys {quote(unknown)}")
    if document["config_version"] not in READABLE_CONFIG_VERSIONS or not is_int(document["config_version"]):
        raise CheckpointError(
            f"config_version {quote(document['config_version'])} is not supported; "
            f"this epcli reads {list(READABLE_CONFIG_VERSIONS)}"
        )
    if document["kind"] not in KINDS:
        raise CheckpointError(f"kind must be one of {list(KINDS)}, got {quote(document['kind'])}")
    for key in ("epcli_version", "torch_version"):
        if not isinstance(document[key], str):
            raise CheckpointError(f"{key} must be a string, got {quote(document[key])}")
    architecture, provenance = document["architecture"], document["provenance"]
    if architecture is not None and not isinstance(architecture, dict):
        raise CheckpointError(f"architecture must be an object or null, got {type(architecture).__name__}")
    if not isinstance(provenance, dict):
        raise CheckpointError(f"provenance must be an object, got {type(provenance).__name__}")
    input_shape = _shape(document["input_shape"], "input_shape", scalar=_INPUTS_KEY in keys)  # [] says inputs[0]
    inputs = _inputs(document[_INPUTS_KEY], input_shape) if _INPUTS_KEY in keys else (InputSpec(input_shape),)
    configs, shapes = _parse_layers(document["ep_layers"])
    return Metadata(document["kind"], input_shape, inputs, configs, shapes, architecture, provenance, document)


_RECOMPRESS = "compress the checkpoint again with epcli compress"


def compression_record(provenance: Mapping[str, Any]) -> CompressionRecord | None:
    """The compression a file records in its ``provenance`` (None: it is not from ``epcli compress``), checked:
    ``max_error`` a finite number >= 0, ``layers`` an object of module path -> ``{"rank": int >= 1 or null}``
    (null: the layer was kept whole). Errors name the key but not the file, which the caller adds."""
    compression = provenance.get("compression")
    if compression is None:
        return None
    where = "provenance.compression"
    if not isinstance(compression, dict):
        raise CheckpointError(f"{where} must be an object, got {type(compression).__name__}; {_RECOMPRESS}")
    budget = compression.get("max_error")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 <= budget < math.inf:
        raise CheckpointError(f"{where}.max_error must be a number >= 0, got {quote(budget)}; {_RECOMPRESS}")
    layers = compression.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(
            f"{where}.layers must be an object (module path -> rank), got {quote(layers)}; it says which layers are "
            f"factored and at which rank; {_RECOMPRESS}"
        )
    check_count(len(layers), MAX_ARCHITECTURE_NODES, f"the number of {where}.layers")
    ranks: dict[str, int] = {}
    for path, entry in layers.items():
        check_name_length(path, f"{where}.layers path")
        rank = entry.get("rank") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or (rank is not None and not (is_int(rank) and 1 <= rank <= MAX_FEATURES)):
            raise CheckpointError(
                f"{where}.layers[{quote(path)}] must be an object whose rank is a whole number from 1 to "
                f"{MAX_FEATURES} (or null: kept whole), got {quote(entry)}; {_RECOMPRESS}"
            )
        if rank is not None:
            ranks[path] = int(rank)
    samples_file = compression.get("samples_file")
    if samples_file is not None and not isinstance(samples_file, str):
        raise CheckpointError(f"{where}.samples_file must be a file name or null, got {quote(samples_file)}; {_RECOMPRESS}")
    return CompressionRecord(float(budget), ranks, None if samples_file is None else clip(samples_file))


def _inputs(value: Any, input_shape: tuple[int, ...]) -> tuple[InputSpec, ...]:
    """The input specs of a version-2 file; the first one's shape is ``input_shape``."""
    if not isinstance(value, list) or not value:
        raise CheckpointError(f"inputs must be a non-empty list of input specs, got {quote(value)}")
    check_count(len(value), MAX_INPUTS, "the number of model inputs")
    try:
        specs = tuple(InputSpec.from_dict(item, f"inputs[{index}]") for index, item in enumerate(value))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if specs[0].shape != input_shape:
        raise CheckpointError(f"input_shape {list(input_shape)} is not the shape of inputs[0] {list(specs[0].shape)}")
    return specs


def _shape(value: Any, what: str, *, scalar: bool = False) -> tuple[int, ...]:
    try:
        return sample_shape(value, what, scalar=scalar)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _parse_layers(layers: Any) -> tuple[dict[str, EPConfig], dict[str, tuple[int, ...]]]:
    if not isinstance(layers, dict):
        raise CheckpointError(f"ep_layers must be an object (layer path -> entry), got {type(layers).__name__}")
    check_count(len(layers), MAX_EP_LAYERS, "the number of ep_layers")
    configs: dict[str, EPConfig] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path, entry in layers.items():
        where = f"layer {quote(path)}"
        check_name_length(path, "ep_layers path")
        if path and not all(path.split(".")):  # '' is legitimate: the model itself is the EP layer
            raise CheckpointError(f"{where}: not a valid dotted module path")
        if not isinstance(entry, dict) or set(entry) != _LAYER_KEYS:
            found = quote(sorted(entry)) if isinstance(entry, dict) else type(entry).__name__
            raise CheckpointError(f"{where}: entry must be an object with exactly {sorted(_LAYER_KEYS)}, got {found}")
        configs[path] = checked_config(entry["class"], entry["config"], where)
        shapes[path] = _shape(entry["input_shape"], f"{where}: input_shape")
    return configs, shapes


def checked_config(kind: Any, data: Any, where: str) -> EPConfig:
    """A config read from a file: its numbers within :mod:`~epcli.limits` first, then validated.

    The bounds apply to the raw dict (every field, known or added later) and to the
    derived sizes (the hidden width ``int(out * width)``); errors are
    :class:`ConfigError` starting with ``where``.
    """
    if not isinstance(kind, str) or len(kind) > 64:
        raise ConfigError(f"{where}: {quote(kind)} is not an EP layer class name")
    check_config_numbers(data, where)
    try:
        config = config_from_dict(kind, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    widest = max(config.node_dims)
    if widest > MAX_FEATURES:
        raise ConfigError(
            f"{where}: its nodes are up to {widest} features wide (hidden size int(out * width)), over epcli's limit "
            f"of {MAX_FEATURES} (a guard against hostile files; see epcli.limits)"
        )
    return config
