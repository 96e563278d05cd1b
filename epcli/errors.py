"""Typed errors raised by epcli.

Every error a user can cause is an :class:`EpcliError`, so callers (and the
CLI) can catch one type. Messages name the file, layer or key at fault and say
how to fix it.
"""

from __future__ import annotations

import os

__all__ = [
    "EpcliError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "ConfigError",
    "ShapeMismatchError",
    "ModelInputError",
    "VerificationError",
    "UsageError",
    "ExportError",
    "OutputError",
]


class EpcliError(Exception):
    """Base class of every error epcli raises on bad input.

    ``file`` is the file at fault when one is known, so a CI report can point at it without
    parsing the message.
    """

    def __init__(self, *args: object, file: str | os.PathLike[str] | None = None) -> None:
        super().__init__(*args)
        self.file = None if file is None else os.fspath(file)


class CheckpointError(EpcliError):
    """An input file (checkpoint, artifact, samples) is missing, unreadable, malformed or lacks epcli metadata."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need to run code (non-allowlisted pickle globals) to load."""


class ConfigError(EpcliError, ValueError):
    """An EP layer configuration (from a file or an argument) is invalid.

    Also a :class:`ValueError`, so code written against the original layers,
    which raised ValueError for bad arguments, keeps working.
    """


class ShapeMismatchError(EpcliError):
    """Tensors disagree in shape with the configuration that should have produced them."""


class ModelInputError(EpcliError):
    """A check cannot run the model on its inputs: the model rejects them (a dtype it does not take, an id beyond
    its embedding), or one sample alone exceeds a check's memory budget.

    An unusable input (exit code 3): the inputs are the checkpoint's own specs or the samples of a file. The CLI
    reports it as a usage error (2) when the specs are the command line's own (``--input-shape`` / ``--input``).
    Too many samples for the budget, when one would fit, is a :class:`UsageError` (the count is the caller's).
    """


class VerificationError(EpcliError):
    """Collapsed and expanded forms disagree beyond the requested tolerance."""


class UsageError(EpcliError, ValueError):
    """An argument to an epcli function or command is out of range or inconsistent."""


class ExportError(EpcliError):
    """A model could not be exported (unsupported operation, invalid ONNX, onnxruntime refused it)."""


class OutputError(EpcliError):
    """An output cannot be written: it exists (without ``force``), is a directory or the source, or its directory
    is read-only, not permitted or full. Nothing was written."""
