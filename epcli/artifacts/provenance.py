"""What an artifact records of its making, so a reader can tell a stale one from the checkpoint it came from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from epcli._version import __version__
from epcli.verification.compare import VerifySettings

__all__ = ["metadata_strings", "provenance"]


def provenance(
    source: Path,
    hashes: Mapping[str, str],
    settings: VerifySettings,
    layer_errors: Mapping[str, float],
    model_error: float | None,
) -> dict[str, object]:
    """What a collapsed artifact records of its making: the source (by sha256, each file of a sharded one), the
    epcli version, and the errors measured (with how they were measured), so a reader can tell a stale artifact.

    ``hashes`` maps every file of the source to its sha256, the one that names it first (the file itself, an
    index, a folder's model.safetensors, a DCP directory's .metadata)."""
    record: dict[str, object] = {
        "source_name": source.name,
        "source_sha256": next(iter(hashes.values())),
        "collapsed_by": f"epcli {__version__}",
        "error_check": {"dtype": settings.dtype, "samples": settings.samples, "seed": settings.seed},
        "layer_max_abs_error": dict(layer_errors),
        "model_max_abs_error": model_error,
    }
    if len(hashes) > 1:
        record["source_files_sha256"] = dict(hashes)
    return record


def metadata_strings(record: Mapping[str, object]) -> dict[str, str]:
    """A provenance record as ONNX ``metadata_props``: strings as they are, other values as JSON."""
    return {
        key: value if isinstance(value, str) else json.dumps(value, sort_keys=True, allow_nan=False)
        for key, value in record.items()
    }
