"""Everything that touches files: checkpoints (``.pt`` / ``.safetensors`` / sharded), architecture specs, exports.

The checkpoint API is imported on first use, so modules below the schema (``limits``,
which :mod:`epcli.inputs` needs) import without pulling in the whole package.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "SUFFIXES",
    "Checkpoint",
    "CheckpointFile",
    "load_checkpoint",
    "open_checkpoint",
    "save_checkpoint",
    "save_collapsed_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'epcli.formats' has no attribute {name!r}")
    return getattr(importlib.import_module("epcli.formats.checkpoint"), name)
