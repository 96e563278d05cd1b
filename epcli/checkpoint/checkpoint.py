"""Self-describing checkpoints: save, validate and load, with no user code and no code from the file.

A checkpoint is the model's state dict plus epcli metadata (see
:mod:`epcli.checkpoint.metadata`): every EP layer's config and input shape, and
the architecture whenever it is built only from supported modules, so
``load_checkpoint`` can rebuild the model in a fresh process. Loading checks
everything before it builds anything real: tensors are compared with layers
built on the meta device, so a hostile config cannot make it allocate memory.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epcli.checkpoint.architecture import (
    build_architecture,
    check_forward,
    collapsed_architecture,
    describe_architecture,
    ep_nodes,
)
from epcli.checkpoint.factory import ModelFactory, build_from_factory
from epcli.checkpoint.foreign import match_keys
from epcli.checkpoint.inputs import InputSpec, describe_inputs, input_specs
from epcli.checkpoint.metadata import (
    Metadata,
    build_metadata,
    checked_config,
    dump_metadata,
    missing_metadata,
    parse_metadata,
)
from epcli.convert import (
    collapse_model,
    collapse_state_dict,
    collapse_steps,
    collapsed_dtype,
    expanded_eval,
    layer_prefix,
    layer_states,
    unwrap_model,
)
from epcli.errors import CheckpointError, ConfigError, EpcliError, ShapeMismatchError, UsageError
from epcli.layers.config import EPConfig
from epcli.layers.registry import (
    check_state,
    class_name,
    expected_state,
    find_ep_layers,
    output_shape,
)
from epcli.limits import check_sample_shape
from epcli.storage.source import (
    SUFFIXES,
    TensorInfo,
    TensorSource,
    check_finite,
    open_source,
)
from epcli.storage.writer import CheckpointWriter
from epcli.text import quote

__all__ = [
    "SUFFIXES",
    "Checkpoint",
    "CheckpointFile",
    "collapsed_layout",
    "load_checkpoint",
    "open_checkpoint",
    "save_checkpoint",
    "save_collapsed_checkpoint",
]


@dataclass(frozen=True)
class CheckpointFile:
    """An opened, checked checkpoint whose tensors stay in the file until :meth:`read`.

    Everything here was checked without reading tensor data: the metadata, each
    EP layer's tensors against its config, and the embedded architecture against
    the keys and shapes (on the meta device). ``files`` lists every file of the
    checkpoint (an index and its shards, or the one file); ``tensors`` lists
    keys in state-dict order. ``inputs`` are the model's input specs
    (``input_shape`` is the first one's shape).
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


# ---- saving ----------------------------------------------------------------------------------
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
    specs = input_specs(input_shape, inputs)
    layers = find_ep_layers(model)
    layer_shapes = _layer_input_shapes(model, specs)
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


def _layer_input_shapes(model: nn.Module, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of each EP layer, from one forward pass of ``model`` itself on constant inputs.

    No copy of the model: it runs in eval mode with its EP layers' expanded chains (no collapse is
    computed or cached) under ``no_grad``, so no parameter, buffer or batch-norm statistic changes;
    training flags and ``collapse_on_eval`` are restored afterwards (:func:`expanded_eval`).
    """
    layers = find_ep_layers(model)
    seen: dict[str, tuple[int, ...]] = {}

    def recorder(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if path not in seen and args and isinstance(args[0], Tensor):
                seen[path] = tuple(args[0].shape[1:])  # [batch, *sample] -> sample

        return record

    handles = [layer.register_forward_pre_hook(recorder(path)) for path, layer in layers.items()]
    reference = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    batch = [
        spec.example(
            2,
            dtype=reference.dtype if reference is not None else torch.get_default_dtype(),
            device=reference.device if reference is not None else None,
        )
        for spec in specs
    ]
    given = describe_inputs(specs)
    try:
        with expanded_eval(model), torch.no_grad():
            model(*batch)
    except Exception as e:  # the user's forward may fail in any way on a wrong shape
        shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in batch)
        raise ConfigError(
            f"the model's forward fails on a batch of shape {shapes} ({given}): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; pass the shape of one "
            "sample without the batch dimension (token ids and other non-float inputs: inputs=[InputSpec(...)])"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    unused = [path for path in layers if path not in seen]
    if unused:
        raise ConfigError(
            f"EP layers {unused} were not called by the forward pass on {given}; "
            "epcli needs every EP layer's input shape"
        )
    return seen


# ---- loading ---------------------------------------------------------------------------------
def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_factory: ModelFactory | None = None,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
) -> CheckpointFile:
    """Open and check a checkpoint without reading its tensors; :meth:`CheckpointFile.read` reads them.

    Runs every check of :func:`load_checkpoint` that needs no tensor data, on meta
    tensors, so it costs the same for a 10 GB file as for a small one; a named
    ``model_factory`` is imported, called and checked against the file here too.
    Reads ``.pt``, ``.safetensors``, sharded safetensors (pass the ``.safetensors.index.json``)
    and, with ``model_factory`` and ``inputs``, checkpoints other tools wrote (see
    :func:`load_checkpoint`). Errors are :class:`EpcliError` whose messages start with the path.
    """
    path = Path(path)
    with _naming(path):
        opened = _open(path, model_factory, inputs, state_key)
        if opened.architecture is not None or model_factory is not None:
            _skeleton(opened, opened.meta_state(), model_factory)
        return opened


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_factory: ModelFactory | None = None,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
) -> Checkpoint:
    """Read and validate a checkpoint, and rebuild its model (eval mode) without running code from the file.

    ``model_factory`` (``"module:function"`` or a callable taking no arguments and
    returning the expanded model) builds the model for architectures the file
    cannot describe; it is imported only because the caller named it. With it, a
    checkpoint epcli did not write can be read too: a plain state-dict ``.pt`` (or the
    entry ``state_key`` of a trainer's dict), a Hugging Face folder or ``.safetensors``
    file, or a ``torch.distributed.checkpoint`` directory; the EP configs then come
    from the factory's model and ``inputs`` (one :class:`~epcli.InputSpec` per model
    input) say what it takes. Every problem raises an :class:`EpcliError` whose
    message starts with the file's path. Example::

        ckpt = load_checkpoint("run/checkpoint-1000", model_factory="mymodels:build",
                               inputs=[InputSpec((16,), torch.int64, 0, 50257)])
    """
    path = Path(path)
    with _naming(path):
        opened = _open(path, model_factory, inputs, state_key)
        built = _skeleton(opened, opened.meta_state(), model_factory)  # all checks before any data is read
    state = opened.read(opened.tensors)
    with _naming(path):
        model = None if built is None else _fill(*built, state)
        if built is not None and model is not None and opened.architecture is not None and model_factory is None:
            check_forward(model, opened.inputs, built[1])
    return Checkpoint(
        path=path,
        kind=opened.kind,
        model=model,
        state_dict=state,
        ep_layers=opened.ep_layers,
        layer_input_shapes=opened.layer_input_shapes,
        input_shape=opened.input_shape,
        inputs=opened.inputs,
        architecture=opened.architecture,
        metadata=opened.metadata,
        notes=opened.notes,
        files=opened.files,
    )


def read_model(
    opened: CheckpointFile, model_factory: ModelFactory | None = None, *, dtype: torch.dtype | None = None
) -> nn.Module | None:
    """The model of an opened checkpoint (eval mode; None without an architecture or factory), its floating
    tensors cast to ``dtype``: the only copy of the data, for a caller that owns it (``epcli verify``).

    Unlike :func:`load_checkpoint` no state dict is kept beside the model, and the file is read about
    :data:`_READ_GROUP_BYTES` at a time, each tensor checked finite as stored and then cast, so the peak is
    the model in ``dtype`` (plus one group), not the file twice.
    """
    with _naming(opened.path):
        built = _skeleton(opened, opened.meta_state(), model_factory)
    if built is None:
        return None
    state: dict[str, Tensor] = {}
    for keys in _byte_groups(opened.tensors, _READ_GROUP_BYTES):
        for key, tensor in opened.read(keys).items():
            state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    with _naming(opened.path):
        model = _fill(*built, state, copy=False)
        del state
        if opened.architecture is not None and model_factory is None:
            check_forward(model, opened.inputs, built[1])
    return model.to(dtype=dtype) if dtype is not None else model  # buffers the file does not hold


_READ_GROUP_BYTES = 64 * 2**20
""":func:`read_model` reads the file in groups of tensors of about this many bytes."""


def _byte_groups(tensors: Mapping[str, TensorInfo], limit: int) -> Iterator[list[str]]:
    """Keys in file order, in runs of about ``limit`` bytes (a larger tensor alone)."""
    group: list[str] = []
    size = 0
    for key, info in tensors.items():
        if group and size + info.nbytes > limit:
            yield group
            group, size = [], 0
        group.append(key)
        size += info.nbytes
    if group:
        yield group


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Errors raised inside start with ``path``; OS errors become :class:`CheckpointError`."""
    try:
        yield
    except EpcliError as e:
        raise type(e)(f"{path}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e


def _open(
    path: Path, model_factory: ModelFactory | None, inputs: Sequence[InputSpec] | None, state_key: str | None
) -> CheckpointFile:
    if not path.exists():
        raise CheckpointError("no such file; check the path")
    if not path.is_file() and not path.is_dir():
        raise CheckpointError("is not a regular file")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(
            "is empty (0 bytes); it was not written completely: save it again with epcli.save_checkpoint"
        )
    source = open_source(path, state_key=state_key)
    if source.metadata is None:
        return _open_foreign(path, source, model_factory, inputs)
    if state_key is not None:
        raise UsageError("has epcli metadata, so there is no state_dict entry to choose: drop the state key")
    meta = parse_metadata(source.metadata)
    if inputs is not None and tuple(inputs) != meta.inputs:
        raise UsageError(
            f"records its model's inputs ({describe_inputs(meta.inputs)}), which differ from the ones given "
            f"({describe_inputs(inputs)}); drop --input-shape / --input for files epcli wrote"
        )
    opened = CheckpointFile(
        path=path,
        kind=meta.kind,
        ep_layers=meta.ep_layers,
        layer_input_shapes=meta.layer_input_shapes,
        input_shape=meta.input_shape,
        inputs=meta.inputs,
        architecture=meta.architecture,
        metadata=meta.document,
        source=source,
    )
    _check_ep_tensors(meta, opened.meta_state())
    return opened


def _open_foreign(
    path: Path, source: TensorSource, model_factory: ModelFactory | None, inputs: Sequence[InputSpec] | None
) -> CheckpointFile:
    """A checkpoint another tool wrote: EP configs and layer input shapes from the factory's model."""
    if model_factory is None:
        raise missing_metadata(source.found)
    if inputs is None:
        raise UsageError(
            f"is a {source.form} checkpoint without epcli metadata ({source.found}), so its model's input is "
            "unknown; give it with --input-shape (one float input, e.g. 3,224,224) or --input (e.g. "
            "'int64[16]:0:50257'), or inputs=[InputSpec(...)]"
        )
    specs = input_specs(inputs=inputs)
    model = build_from_factory(model_factory)
    source, notes = match_keys(source, model)
    layers = find_ep_layers(model)
    opened = CheckpointFile(
        path=path,
        kind="expanded",
        ep_layers={p: layer.config for p, layer in layers.items()},
        layer_input_shapes=_layer_input_shapes(model, specs),
        input_shape=specs[0].shape,
        inputs=specs,
        architecture=None,
        metadata={"source_format": source.form, "found": source.found, "notes": list(notes)},
        source=source,
        notes=notes,
    )
    try:
        _check_ep_tensors(opened, opened.meta_state())
    except EpcliError as e:
        raise type(e)(f"the model built by factory {_factory_name(model_factory)} does not fit the file: {e}") from e
    return opened


def _factory_name(model_factory: ModelFactory) -> str:
    return repr(model_factory if isinstance(model_factory, str) else getattr(model_factory, "__qualname__", "callable"))


def _check_ep_tensors(meta: Metadata | CheckpointFile, state: Mapping[str, Tensor]) -> None:
    """Each EP layer's tensors are exactly those a layer built from its config stores, and its input shape fits."""
    collapsed = meta.kind == "collapsed"
    owned = layer_states(state, meta.ep_layers)
    for path, config in meta.ep_layers.items():
        where = f"layer {quote(path)} ({class_name(config)})"
        prefix = layer_prefix(path)
        if not collapsed and len(owned[path]) < config.depth:
            # checked before building anything, so a huge depth in a small file costs nothing
            raise CheckpointError(
                f"{where}: its config (depth {config.depth}) needs at least {config.depth} weight tensors under "
                f"{prefix or 'the model root'!r}, the file has {len(owned[path])}"
            )
        try:
            check_state(expected_state(config, collapsed=collapsed), owned[path], prefix=prefix)
            check_sample_shape(output_shape(config, meta.layer_input_shapes[path]), "its output per sample")
        except EpcliError as e:
            raise type(e)(f"{where}: {e}") from e


_Built = tuple[nn.Module, str]
"""A model whose parameters may still be on the meta device, and how to name it in messages."""


def _skeleton(meta: Metadata | CheckpointFile, state: Mapping[str, Tensor], model_factory: ModelFactory | None) -> _Built | None:
    """The model, from the user's factory or the embedded architecture (on meta), checked against ``state``'s keys and shapes."""
    expected_layers = {} if meta.kind == "collapsed" else meta.ep_layers
    if model_factory is not None:
        model = build_from_factory(model_factory)
        source = f"the model built by factory {_factory_name(model_factory)}"
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
    return model, source


def _fill(model: nn.Module, source: str, state: Mapping[str, Tensor], *, copy: bool = True) -> nn.Module:
    """Load the file's tensors into the model (strictly), which then owns copies of them (``copy=False``: the
    tensors themselves, when nothing else keeps them); eval mode."""
    # assign: parameters take the file's tensors (and dtypes); copies, so the model never aliases .state_dict
    model.load_state_dict(
        {key: value.clone() for key, value in state.items()} if copy else dict(state), strict=True, assign=True
    )
    left_on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{source} has tensors the file does not store: {left_on_meta[:8]}")
    return model.eval()


def _spec_layers(spec: dict[str, Any]) -> dict[str, EPConfig]:
    layers: dict[str, EPConfig] = {}
    for path, (kind, config) in ep_nodes(spec).items():
        layers[path] = checked_config(kind, config, f"architecture node {quote(path or '<model>')}")
    return layers


def _compare_layers(found: Mapping[str, EPConfig], expected: Mapping[str, EPConfig], source: str) -> None:
    if set(found) != set(expected):
        hint = (
            "; the factory must return the model as it was trained, i.e. after epcli.overparameterize with the "
            "training options (or built from EP layers), not the plain architecture"
            if source.startswith("the model built by factory") and not found
            else ""
        )
        raise CheckpointError(
            f"{source} has EP layers at {sorted(found)}, but the metadata lists {sorted(expected)}{hint}"
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
