"""An opened checkpoint (tensors still in the file) and a loaded one (tensors and model in memory)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epcli.checkpoint.factory import ModelFactory
from epcli.checkpoint.inputs import InputSpec
from epcli.errors import CheckpointError, EpcliError
from epcli.layers.config import EPConfig
from epcli.storage.source import (
    TensorInfo,
    TensorSource,
    check_finite,
)

__all__ = ["BuiltModel", "Checkpoint", "CheckpointFile"]

BuiltModel = tuple[nn.Module, str]
"""A model whose parameters may still be on the meta device (or the factory's own), and how to name it in messages."""


class _Kept:
    """The one model an open built, until a reader takes it."""

    def __init__(self) -> None:
        self.built: BuiltModel | None = None


@dataclass(frozen=True)
class CheckpointFile:
    """An opened, checked checkpoint whose tensors stay in the file until :meth:`read`.

    Everything here was checked without reading tensor data: the metadata, each
    EP layer's tensors against its config, and the embedded architecture against
    the keys and shapes (on the meta device). ``files`` lists every file of the
    checkpoint (an index and its shards, or the one file); ``tensors`` lists
    keys in state-dict order. ``inputs`` are the model's input specs
    (``input_shape`` is the first one's shape).

    The model built to check the file (the user's factory's, or the embedded
    architecture on meta) is kept for the first reader, so a job that opens the file
    once calls the factory (and runs its forward) once; ``model_factory`` rebuilds it
    for any later reader.
    """

    path: Path
    kind: str
    ep_layers: dict[str, EPConfig]
    layer_input_shapes: dict[str, tuple[int, ...]]
    input_shape: tuple[int, ...]
    inputs: tuple[InputSpec, ...]
    architecture: dict[str, Any] | None
    metadata: dict[str, Any]
    source: TensorSource
    notes: tuple[str, ...] = ()
    """What was reconciled between a foreign file and the model (a stripped prefix, tied weights)."""
    model_factory: ModelFactory | None = field(default=None, repr=False, compare=False)
    _kept: _Kept = field(default_factory=_Kept, init=False, repr=False, compare=False)

    @property
    def foreign(self) -> bool:
        """Whether the file was written by another tool (its EP configs come from the user's factory)."""
        return self.source.metadata is None

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.source.tensors

    @property
    def files(self) -> tuple[Path, ...]:
        return self.source.files

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file(s)."""
        return self.source.nbytes

    def __repr__(self) -> str:
        """A summary: the default repr would print the metadata (twice) and the file's listing."""
        return _summary(self, len(self.tensors), self.nbytes, f"foreign={self.foreign}")

    def keep_model(self, built: BuiltModel | None) -> None:
        """Keep the model the open built and checked, for :meth:`take_model`."""
        self._kept.built = built

    def take_model(self) -> BuiltModel | None:
        """The kept model, once (its reader fills it with the file's tensors); None once taken or dropped."""
        built, self._kept.built = self._kept.built, None
        return built

    def drop_model(self) -> None:
        """Free the kept model, for a job that will not read the model: its memory is the whole model's."""
        self._kept.built = None

    def meta_state(self) -> dict[str, Tensor]:
        """Meta tensors with every key, shape and dtype: a state dict that takes no memory."""
        return {key: info.meta() for key, info in self.tensors.items()}

    def read(self, keys: Iterable[str], *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Fresh CPU tensors for ``keys`` (floating ones cast to ``dtype`` when given), each checked to be finite.

        Errors start with the path.
        """
        try:
            state = self.source.read(keys, dtype=dtype)
            check_finite(state, "the file")
        except EpcliError as e:
            raise type(e)(f"{self.path}: {e}") from e
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot be read ({e.strerror or e})") from e
        return state


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, validated checkpoint.

    ``model`` is the rebuilt module in eval mode (None when the file has no
    architecture and no factory was given); for a collapsed file it is the plain
    model, and ``ep_layers`` still lists the configs of the collapsed layers.
    ``layer_input_shapes`` holds each EP layer's per-sample input shape, ``inputs``
    the model's input specs (``input_shape`` is the first one's shape).
    """

    path: Path
    kind: str
    model: nn.Module | None
    state_dict: dict[str, Tensor]
    ep_layers: dict[str, EPConfig]
    layer_input_shapes: dict[str, tuple[int, ...]]
    input_shape: tuple[int, ...]
    inputs: tuple[InputSpec, ...]
    architecture: dict[str, Any] | None
    metadata: dict[str, Any]
    notes: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    """Every file read: the one file, an index and its shards, a folder's or DCP directory's files (first: the
    one that identifies it, whose sha256 provenance records)."""

    def __repr__(self) -> str:
        """A summary: the default repr would print every tensor of the state dict and the whole module tree."""
        size = sum(t.numel() * t.element_size() for t in self.state_dict.values())
        model = "None" if self.model is None else type(self.model).__name__
        return _summary(self, len(self.state_dict), size, f"model={model}")


def _summary(opened: Checkpoint | CheckpointFile, count: int, nbytes: int, extra: str) -> str:
    """``Checkpoint(path=..., kind=..., ...)``: what a reader of the object wants to see first."""
    provenance = opened.metadata.get("provenance")
    compressed = " (compressed)" if isinstance(provenance, dict) and "compression" in provenance else ""
    return (
        f"{type(opened).__name__}(path={str(opened.path)!r}, kind={opened.kind!r}{compressed}, {extra}, tensors={count} "
        f"({nbytes:,} bytes), ep_layers={list(opened.ep_layers)}, inputs=[{', '.join(map(str, opened.inputs))}])"
    )
