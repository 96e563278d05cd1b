"""What a file holds before the schema validates it, and the error for a readable file epcli did not write.

Readers below the schema (``torch_io``) return a :class:`RawCheckpoint`; :mod:`epcli.checkpoint.metadata`
parses its metadata string.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from epcli.errors import CheckpointError

__all__ = ["FOREIGN_HINT", "SAVE_HINT", "RawCheckpoint", "missing_metadata"]

SAVE_HINT = "use epcli.save_checkpoint(model, path, input_shape=...) to write a checkpoint with epcli metadata"
FOREIGN_HINT = (
    "to read a checkpoint epcli did not write, name the model's factory with --model module:function and its "
    "input with --input-shape (one float input) or --input"
)


@dataclass(frozen=True)
class RawCheckpoint:
    """What a file holds before validation: the metadata JSON string (None: not an epcli file) and the tensors.

    ``found`` says what a file without metadata holds (for messages), e.g. "a plain state_dict of 10 tensors".
    """

    metadata: str | None
    tensors: dict[str, Tensor]
    found: str = ""


def missing_metadata(found: str) -> CheckpointError:
    """The error for a file that is readable but was not written by epcli."""
    return CheckpointError(f"has no epcli metadata ({found}); {FOREIGN_HINT}; or {SAVE_HINT}")
