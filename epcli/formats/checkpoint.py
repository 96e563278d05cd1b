"""Self-describing checkpoints: save, validate and load, with no user code and no code from the file.

A checkpoint is the model's state dict plus epcli metadata (see
:mod:`epcli.formats.metadata`): every EP layer's config and input shape, and
the architecture whenever it is built only from supported modules, so
``load_checkpoint`` can rebuild the model in a fresh process. Loading checks
everything before it builds anything real: tensors are compared with layers
built on the meta device, so a hostile config cannot make it allocate memory.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from epcli.convert import collapse_model, collapse_state_dict, layer_states
from epcli.errors import CheckpointError, ConfigError, EpcliError, ShapeMismatchError
from epcli.formats.architecture import build_architecture, collapsed_architecture, describe_architecture, ep_nodes
from epcli.formats.atomic import atomic_write
from epcli.formats.factory import ModelFactory, build_from_factory
from epcli.formats.metadata import (
    Metadata,
    RawCheckpoint,
    build_metadata,
    dump_metadata,
    parse_metadata,
    sample_shape,
)
from epcli.formats.safetensors_io import read_safetensors, write_safetensors
from epcli.formats.torch_io import read_pt, write_pt
from epcli.layers.config import EPConfig
from epcli.layers.registry import (
    check_state,
    class_name,
    config_from_dict,
    expected_state,
    find_ep_layers,
    output_shape,
)

__all__ = ["SUFFIXES", "Checkpoint", "load_checkpoint", "save_checkpoint", "save_collapsed_checkpoint"]


@dataclass(frozen=True)
class _Codec:
    write: Callable[[BinaryIO, str, Mapping[str, Tensor]], None]
    read: Callable[[Path], RawCheckpoint]


_CODECS: Mapping[str, _Codec] = MappingProxyType(
    {
        ".pt": _Codec(write_pt, read_pt),
        ".pth": _Codec(write_pt, read_pt),
        ".safetensors": _Codec(write_safetensors, read_safetensors),
    }
)
SUFFIXES: tuple[str, ...] = tuple(_CODECS)
"""File suffixes epcli reads and writes; the suffix chooses the format."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, validated checkpoint.

    ``model`` is the rebuilt module in eval mode (None when the file has no
    architecture and no factory was given); for a collapsed file it is the plain
    model, and ``ep_layers`` still lists the configs of the collapsed layers.
    ``layer_input_shapes`` holds each EP layer's per-sample input shape.
    """

    path: Path
    kind: str
    model: nn.Module | None
    state_dict: dict[str, Tensor]
    ep_layers: dict[str, EPConfig]
    layer_input_shapes: dict[str, tuple[int, ...]]
    input_shape: tuple[int, ...]
    architecture: dict[str, Any] | None
    metadata: dict[str, Any]


# ---- saving ----------------------------------------------------------------------------------
def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, input_shape: Any) -> Path:
    """Write ``model`` as an expanded-form checkpoint (``.pt`` or ``.safetensors``, by suffix); returns the path.

    ``input_shape`` is the shape of one sample without the batch dimension, e.g.
    ``(64,)`` or ``(1, 8, 8)``; one forward pass on zeros of that shape records
    each EP layer's input shape. The write is atomic, and identical models give
    byte-identical files.
    """
    path = Path(path)
    codec = _codec(path)
    shape = sample_shape(input_shape)
    layers = find_ep_layers(model)
    layer_shapes = _layer_input_shapes(model, shape)
    state = _detached(model.state_dict())
    _check_finite(state, "the model")
    document = build_metadata(
        kind="expanded",
        input_shape=shape,
        ep_layers={p: layer.config for p, layer in layers.items()},
        layer_input_shapes=layer_shapes,
        architecture=describe_architecture(model),
        provenance={},
    )
    return _write(path, codec, document, state)


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
    configs, not recomputed.
    """
    path = Path(path)
    codec = _codec(path)
    if checkpoint.kind != "expanded":
        raise CheckpointError(
            f"{checkpoint.path} is already collapsed; collapse the expanded checkpoint it was made from"
        )
    if collapsed_state is None:
        state = collapse_state_dict(checkpoint.state_dict, checkpoint.ep_layers)
    else:
        try:
            check_state(_collapsed_layout(checkpoint), collapsed_state)
        except (CheckpointError, ShapeMismatchError) as e:
            raise type(e)(f"collapsed_state does not fit {checkpoint.path}: {e}") from e
        state = _detached(collapsed_state)
        _check_finite(state, "collapsed_state")
    architecture = None if checkpoint.architecture is None else collapsed_architecture(checkpoint.architecture)
    document = build_metadata(
        kind="collapsed",
        input_shape=checkpoint.input_shape,
        ep_layers=checkpoint.ep_layers,
        layer_input_shapes=checkpoint.layer_input_shapes,
        architecture=architecture,
        provenance=dict(provenance or {}),
    )
    return _write(path, codec, document, state)


def _collapsed_layout(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """Tensors (real or meta) with the keys and shapes of the checkpoint's collapsed state dict."""
    owned = layer_states(checkpoint.state_dict, checkpoint.ep_layers)
    layer_keys = {(f"{path}." if path else "") + key for path, tensors in owned.items() for key in tensors}
    layout = {key: value for key, value in checkpoint.state_dict.items() if key not in layer_keys}
    for path, config in checkpoint.ep_layers.items():
        prefix = f"{path}." if path else ""
        layout.update({prefix + key: value for key, value in expected_state(config, collapsed=True).items()})
    return layout


def _codec(path: Path, *, name_path: bool = True) -> _Codec:
    """The reader/writer for ``path``'s suffix; ``name_path=False`` where the caller prefixes the path itself."""
    codec = _CODECS.get(path.suffix.lower())
    if codec is None:
        where = f"{path}: " if name_path else ""
        raise CheckpointError(
            f"{where}unsupported file suffix {path.suffix!r}; epcli reads and writes {', '.join(_CODECS)}"
        )
    return codec


def _write(path: Path, codec: _Codec, document: Mapping[str, Any], state: Mapping[str, Tensor]) -> Path:
    text = dump_metadata(document)
    return atomic_write(path, lambda f: codec.write(f, text, state))


def _detached(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Contiguous CPU copies that share no storage (safetensors refuses shared or strided tensors)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"state_dict entry {key!r} is a {type(value).__name__}; epcli checkpoints hold tensors only"
            )
        out[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return out


def _layer_input_shapes(model: nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of each EP layer, from one eval-mode forward pass of a copy on zeros."""
    probe = copy.deepcopy(model).eval()
    layers = find_ep_layers(probe)
    seen: dict[str, tuple[int, ...]] = {}

    def recorder(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if path not in seen and args and isinstance(args[0], Tensor):
                seen[path] = tuple(args[0].shape[1:])  # [batch, *sample] -> sample

        return record

    handles = [layer.register_forward_pre_hook(recorder(path)) for path, layer in layers.items()]
    reference = next((t for t in itertools.chain(probe.parameters(), probe.buffers()) if t.is_floating_point()), None)
    batch = torch.zeros(
        (2, *shape),
        dtype=reference.dtype if reference is not None else torch.get_default_dtype(),
        device=reference.device if reference is not None else None,
    )
    try:
        with torch.no_grad():
            probe(batch)
    except Exception as e:  # the user's forward may fail in any way on a wrong shape
        raise ConfigError(
            f"the model's forward fails on a batch of shape {list(batch.shape)} (input_shape={list(shape)}): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; pass the shape of one "
            "sample without the batch dimension"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    unused = [path for path in layers if path not in seen]
    if unused:
        raise ConfigError(
            f"EP layers {unused} were not called by the forward pass on input_shape={list(shape)}; "
            "epcli needs every EP layer's input shape"
        )
    return seen


# ---- loading ---------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike[str], *, model_factory: ModelFactory | None = None) -> Checkpoint:
    """Read and validate a checkpoint, and rebuild its model (eval mode) without running code from the file.

    ``model_factory`` (``"module:function"`` or a callable) builds the model for
    architectures the file cannot describe; it is imported only because the
    caller named it. Every problem raises an :class:`EpcliError` whose message
    starts with the file's path.
    """
    path = Path(path)
    try:
        return _load(path, model_factory)
    except EpcliError as e:
        raise type(e)(f"{path}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e


def _load(path: Path, model_factory: ModelFactory | None) -> Checkpoint:
    if not path.exists():
        raise CheckpointError("no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"is a directory, not a checkpoint file; pass the {' or '.join(SUFFIXES)} file itself")
    if not path.is_file():
        raise CheckpointError("is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(
            "is empty (0 bytes); it was not written completely: save it again with epcli.save_checkpoint"
        )
    raw = _codec(path, name_path=False).read(path)
    meta = parse_metadata(raw.metadata)
    state = raw.tensors
    _check_ep_tensors(meta, state)
    _check_finite(state, "the file")
    model = _rebuild(meta, state, model_factory)
    return Checkpoint(
        path=path,
        kind=meta.kind,
        model=model,
        state_dict=state,
        ep_layers=meta.ep_layers,
        layer_input_shapes=meta.layer_input_shapes,
        input_shape=meta.input_shape,
        architecture=meta.architecture,
        metadata=meta.document,
    )


def _check_ep_tensors(meta: Metadata, state: Mapping[str, Tensor]) -> None:
    """Each EP layer's tensors are exactly those a layer built from its config stores, and its input shape fits."""
    collapsed = meta.kind == "collapsed"
    owned = layer_states(state, meta.ep_layers)
    for path, config in meta.ep_layers.items():
        where = f"layer {path!r} ({class_name(config)})"
        prefix = f"{path}." if path else ""
        if not collapsed and len(owned[path]) < config.depth:
            # checked before building anything, so a huge depth in a small file costs nothing
            raise CheckpointError(
                f"{where}: its config (depth {config.depth}) needs at least {config.depth} weight tensors under "
                f"{prefix or 'the model root'!r}, the file has {len(owned[path])}"
            )
        try:
            check_state(expected_state(config, collapsed=collapsed), owned[path], prefix=prefix)
            output_shape(config, meta.layer_input_shapes[path])
        except EpcliError as e:
            raise type(e)(f"{where}: {e}") from e


def _check_finite(state: Mapping[str, Tensor], source: str) -> None:
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            raise CheckpointError(
                f"tensor {key!r} in {source} has non-finite values ({nan} NaN, {inf} Inf); training diverged or "
                "the data is damaged"
            )


def _rebuild(meta: Metadata, state: Mapping[str, Tensor], model_factory: ModelFactory | None) -> nn.Module | None:
    """The model, from the user's factory or the embedded architecture, with the file's tensors loaded strictly."""
    expected_layers = {} if meta.kind == "collapsed" else meta.ep_layers
    if model_factory is not None:
        model = build_from_factory(model_factory)
        name = model_factory if isinstance(model_factory, str) else getattr(model_factory, "__qualname__", "callable")
        source = f"the model built by factory {name!r}"
        if meta.kind == "collapsed" and find_ep_layers(model):
            model = collapse_model(model)  # the factory builds the EP model; the file holds its plain form
    elif meta.architecture is not None:
        source = "the embedded architecture"
        _compare_layers(_spec_layers(meta.architecture), expected_layers, source)  # before building anything
        model = build_architecture(meta.architecture, device="meta")
    else:
        return None
    _compare_layers({p: layer.config for p, layer in find_ep_layers(model).items()}, expected_layers, source)
    try:
        check_state(model.state_dict(), state)
    except (CheckpointError, ShapeMismatchError) as e:
        raise type(e)(f"{source} does not match the file's tensors: {e}") from e
    # assign: parameters take the file's tensors (and dtypes); copies, so the model never aliases .state_dict
    model.load_state_dict({key: value.clone() for key, value in state.items()}, strict=True, assign=True)
    left_on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{source} has tensors the file does not store: {left_on_meta[:8]}")
    return model.eval()


def _spec_layers(spec: dict[str, Any]) -> dict[str, EPConfig]:
    layers: dict[str, EPConfig] = {}
    for path, (kind, config) in ep_nodes(spec).items():
        try:
            layers[path] = config_from_dict(kind, config)
        except ConfigError as e:
            raise ConfigError(f"architecture node {path or '<model>'!r}: {e}") from e
    return layers


def _compare_layers(found: Mapping[str, EPConfig], expected: Mapping[str, EPConfig], source: str) -> None:
    if set(found) != set(expected):
        raise CheckpointError(
            f"{source} has EP layers at {sorted(found)}, but the metadata lists {sorted(expected)}"
        )
    for path, config in found.items():
        if config != expected[path]:
            other = expected[path]
            differences = {
                f.name: (getattr(other, f.name), getattr(config, f.name))
                for f in fields(config)
                if type(config) is type(other) and getattr(config, f.name) != getattr(other, f.name)
            } or {"class": (class_name(other), class_name(config))}
            raise CheckpointError(
                f"{source}: layer {path!r} disagrees with the metadata (field: (metadata, model)) {differences}"
            )
