"""Everything that touches files: checkpoints (``.pt`` / ``.safetensors``), architecture specs, exports."""

from epcli.formats.checkpoint import SUFFIXES, Checkpoint, load_checkpoint, save_checkpoint, save_collapsed_checkpoint

__all__ = ["SUFFIXES", "Checkpoint", "load_checkpoint", "save_checkpoint", "save_collapsed_checkpoint"]
