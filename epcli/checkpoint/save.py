"""Writing self-describing checkpoints: expanded (:func:`save_checkpoint`) and collapsed ones.

A checkpoint is the model's state dict plus epcli metadata (:mod:`epcli.checkpoint.metadata`): every EP layer's
config and input shape, and the architecture whenever it is built only from supported modules, so a fresh
process can rebuild the model with no user code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epcli.checkpoint.architecture import (
    collapsed_architecture,
    describe_architecture,
)
from epcli.checkpoint.forward import layer_input_shapes
from epcli.checkpoint.inputs import InputSpec, input_specs
from epcli.checkpoint.metadata import (
    build_metadata,
    dump_metadata,
)
from epcli.checkpoint.opened import Checkpoint, CheckpointFile
from epcli.convert import (
    collapse_state_dict,
    collapse_steps,
    collapsed_dtype,
    layer_prefix,
    unwrap_model,
)
from epcli.errors import CheckpointError, EpcliError, ShapeMismatchError, UsageError
from epcli.layers.config import EPConfig
from epcli.layers.registry import (
    check_state,
    expected_state,
    find_ep_layers,
)
from epcli.storage.source import (
    TensorInfo,
    check_finite,
)
from epcli.storage.writer import CheckpointWriter

__all__ = ["collapsed_layout", "collapsed_metadata", "save_checkpoint", "save_collapsed_checkpoint"]


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_shape: Any = None,
    inputs: Sequence[InputSpec] | None = None,
) -> Path:
    """Write ``model`` as an expanded-form checkpoint (``.pt`` or ``.safetensors``, by suffix); returns the path.

    ``input_shape`` is the shape of one float32 sample without the batch dimension,
    e.g. ``(64,)`` or ``(1, 8, 8)``; ``inputs`` instead gives one
    :class:`~epcli.InputSpec` per model input, e.g. token ids
    ``inputs=[InputSpec((16,), torch.int64, 0, vocab_size)]``. One forward pass on
    inputs of those specs records each EP layer's input shape, and later checks
    draw their inputs from them. The write is atomic, and identical models give
    byte-identical files. A wrapped model (DDP, ``torch.compile``, FSDP1/FSDP2) is
    saved as its full, unwrapped model (:func:`epcli.convert.unwrap_model`; for FSDP
    a collective, so call it on every rank).
    """
    if not isinstance(model, nn.Module):
        what = "a state_dict" if isinstance(model, Mapping) else f"a {type(model).__name__}"
        raise UsageError(
            f"save_checkpoint takes the model (an nn.Module), got {what}; pass the model itself "
            "(epcli records its architecture and EP layer configs, which a state_dict does not hold)"
        )
    path = Path(path)
    model = unwrap_model(model)
    try:  # the file is named: nothing was written, and this is what it was for
        specs = input_specs(input_shape, inputs)
        layers = find_ep_layers(model)
        layer_shapes = layer_input_shapes(model, specs)
    except EpcliError as e:
        raise type(e)(f"{path}: not written: {e}", file=path) from e
    # the model's own tensors, not copies: the writer streams them to the file one at a time
    state = _tensors_only(model.state_dict())
    check_finite(state, "the model")
    document = build_metadata(
        kind="expanded",
        inputs=specs,
        ep_layers={p: layer.config for p, layer in layers.items()},
        layer_input_shapes=layer_shapes,
        architecture=describe_architecture(model),
        provenance={},
    )
    return _write(path, dump_metadata(document), state)


def save_collapsed_checkpoint(
    checkpoint: Checkpoint,
    path: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any] | None = None,
    collapsed_state: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write the collapsed form of an expanded checkpoint: ``<path>.weight`` / ``<path>.bias`` per EP layer.

    The metadata keeps the EP configs and input shapes (so tools know which
    tensors were EP layers), the collapsed architecture when the source had one,
    and ``provenance`` (free-form JSON, e.g. the source's sha256 and per-layer errors).
    ``collapsed_state`` is the result of ``collapse_state_dict`` when the caller
    already has it (e.g. to measure errors first); it is checked against the
    configs, not recomputed. Large checkpoints are better collapsed from the file,
    one layer at a time: ``epcli collapse`` (:func:`epcli.jobs.collapse.collapse_file`).
    """
    path = Path(path)
    if checkpoint.kind != "expanded":
        raise CheckpointError(
            f"{checkpoint.path} is already collapsed; collapse the expanded checkpoint it was made from"
        )
    layout = collapsed_layout(checkpoint.state_dict, checkpoint.ep_layers)
    if collapsed_state is None:
        state = collapse_state_dict(checkpoint.state_dict, checkpoint.ep_layers)
    else:
        try:
            check_state(layout, collapsed_state)
        except (CheckpointError, ShapeMismatchError) as e:
            raise type(e)(f"collapsed_state does not fit {checkpoint.path}: {e}") from e
        state = _detached(collapsed_state)
        check_finite(state, "collapsed_state")
    return _write(path, collapsed_metadata(checkpoint, provenance or {}), {key: state[key] for key in layout})


def collapsed_layout(state: Mapping[str, Tensor], ep_layers: Mapping[str, EPConfig]) -> dict[str, Tensor]:
    """Meta tensors with the keys (in output order), shapes and dtypes of the collapsed state dict.

    ``state`` may itself hold meta tensors (e.g. :meth:`CheckpointFile.meta_state`).
    A collapsed layer keeps the dtype of its first stored weight.
    """
    layout: dict[str, Tensor] = {}
    for step in collapse_steps(state, ep_layers):
        if step.layer is None:
            key = step.keys[0]
            layout[key] = torch.empty(state[key].shape, dtype=state[key].dtype, device="meta")
            continue
        prefix = layer_prefix(step.layer)
        dtype = collapsed_dtype(step.layer, state)
        for key, value in expected_state(ep_layers[step.layer], collapsed=True).items():
            layout[prefix + key] = value.to(dtype)
    return layout


def collapsed_metadata(checkpoint: Checkpoint | CheckpointFile, provenance: Mapping[str, Any]) -> str:
    """The metadata (JSON text) of the collapsed form of ``checkpoint``."""
    architecture = None if checkpoint.architecture is None else collapsed_architecture(checkpoint.architecture)
    document = build_metadata(
        kind="collapsed",
        inputs=checkpoint.inputs,
        ep_layers=checkpoint.ep_layers,
        layer_input_shapes=checkpoint.layer_input_shapes,
        architecture=architecture,
        provenance=dict(provenance),
    )
    return dump_metadata(document)


def _write(path: Path, metadata: str, state: Mapping[str, Tensor]) -> Path:
    layout = {key: TensorInfo(tuple(value.shape), value.dtype) for key, value in state.items()}
    with CheckpointWriter(path, layout) as writer:
        for key, value in state.items():
            writer.add(key, value)
        return writer.commit(metadata)


def _tensors_only(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """``state`` itself (no copies), checked to hold only tensors."""
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"state_dict entry {key!r} is a {type(value).__name__}; epcli checkpoints hold tensors only"
            )
    return dict(state)


def _detached(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Contiguous CPU copies that share no storage (safetensors refuses shared or strided tensors)."""
    return {
        key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for key, value in _tensors_only(state).items()
    }
