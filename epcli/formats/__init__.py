"""Everything that touches files: checkpoints (``.pt`` / ``.safetensors`` / sharded), architecture specs, exports."""

from epcli.formats.checkpoint import (
    SUFFIXES,
    Checkpoint,
    CheckpointFile,
    load_checkpoint,
    open_checkpoint,
    save_checkpoint,
    save_collapsed_checkpoint,
)

__all__ = [
    "SUFFIXES",
    "Checkpoint",
    "CheckpointFile",
    "load_checkpoint",
    "open_checkpoint",
    "save_checkpoint",
    "save_collapsed_checkpoint",
]
