"""Opening and loading checkpoints, with no user code (but a factory the user names) and no code from the file.

Opening checks everything before anything real is built: tensors are compared with layers built on the meta
device, so a hostile config cannot make it allocate memory; tensor data stays in the file until read.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from epcli.checkpoint.architecture import (
    build_architecture,
    ep_nodes,
)
from epcli.checkpoint.factory import ModelFactory, build_from_factory, factory_name
from epcli.checkpoint.foreign import collapsed_hint, fit_hint, match_keys
from epcli.checkpoint.forward import check_forward, layer_input_shapes
from epcli.checkpoint.inputs import InputSpec, describe_inputs, input_specs
from epcli.checkpoint.metadata import (
    Metadata,
    checked_config,
    compression_record,
    missing_metadata,
    parse_metadata,
)
from epcli.checkpoint.opened import BuiltModel, Checkpoint, CheckpointFile
from epcli.convert import (
    collapse_model,
    layer_prefix,
    layer_states,
)
from epcli.convert.compress import factored_skeleton
from epcli.errors import CheckpointError, EpcliError, ShapeMismatchError, UsageError
from epcli.layers.config import EPConfig
from epcli.layers.registry import (
    check_state,
    class_name,
    expected_state,
    find_ep_layers,
    output_shape,
)
from epcli.limits import check_sample_shape
from epcli.storage.paths import source_problem
from epcli.storage.source import (
    SUFFIXES,
    TensorInfo,
    TensorSource,
    open_source,
)
from epcli.text import quote

__all__ = ["SUFFIXES", "load_checkpoint", "open_checkpoint", "read_checkpoint", "read_model", "read_skeleton"]


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
    ``model_factory`` is imported, called (once) and checked against the file here too,
    and the model it built is kept for the first :func:`read_model` / :func:`read_checkpoint`
    (:meth:`CheckpointFile.drop_model` frees it when nothing will read the model).
    Reads ``.pt``, ``.safetensors``, sharded safetensors (pass the ``.safetensors.index.json``)
    and, with ``model_factory`` and ``inputs``, checkpoints other tools wrote (see
    :func:`load_checkpoint`). Errors are :class:`EpcliError` whose messages start with the path.
    """
    path = Path(path)
    with _naming(path):
        opened, model = _open(path, model_factory, inputs, state_key)
        if opened.architecture is not None or model_factory is not None:
            opened.keep_model(_skeleton(opened, opened.meta_state(), model_factory, model))
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
    return read_checkpoint(open_checkpoint(path, model_factory=model_factory, inputs=inputs, state_key=state_key))


def read_checkpoint(opened: CheckpointFile) -> Checkpoint:
    """An opened checkpoint read whole: its tensors, and its model (when it has one) holding copies of them.

    What :func:`load_checkpoint` returns, for a caller that has opened the file already (the model the open
    built is filled, not built again).
    """
    built = _built(opened)
    state = opened.read(opened.tensors)
    model = None
    if built is not None:
        with _naming(opened.path):
            model = _fill(*built, state)
            if opened.architecture is not None and opened.model_factory is None:
                check_forward(model, opened.inputs, built[1])
    return Checkpoint(
        path=opened.path,
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


def read_model(opened: CheckpointFile, *, dtype: torch.dtype | None = None) -> nn.Module | None:
    """The model of an opened checkpoint (eval mode; None without an architecture or factory), its floating
    tensors cast to ``dtype``: the only copy of the data, for a caller that owns it (``epcli verify``).

    Unlike :func:`load_checkpoint` no state dict is kept beside the model, and the file is read about
    :data:`_READ_GROUP_BYTES` at a time, each tensor checked finite as stored and then cast, so the peak is
    the model in ``dtype`` (plus one group), not the file twice. A factory's model, which holds its initial
    values, takes each tensor of the same shape and dtype into its own as the group is read, so those values are
    never held beside the file's either.
    """
    built = _built(opened)
    if built is None:
        return None
    own = built[0].state_dict(keep_vars=True)  # a factory's model holds real tensors: read into them
    held = collections.Counter(id(tensor) for tensor in own.values())
    state: dict[str, Tensor] = {}
    filled: set[str] = set()
    for keys in _byte_groups(opened.tensors, _READ_GROUP_BYTES):
        for key, tensor in opened.read(keys).items():
            tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            target = own.get(key)
            if (  # a tensor held under two keys (a tie) is assigned: the file may store two different tensors
                target is not None and not target.is_meta and held[id(target)] == 1
                and (target.shape, target.dtype) == (tensor.shape, tensor.dtype)
            ):
                with torch.no_grad():
                    target.copy_(tensor)  # the factory's initial values are not held beside the file's
                filled.add(key)
            else:
                state[key] = tensor
    del own
    with _naming(opened.path):
        model = _fill(*built, state, copy=False, filled=filled)
        del state
        if opened.architecture is not None and opened.model_factory is None:
            check_forward(model, opened.inputs, built[1])
    return model.to(dtype=dtype) if dtype is not None else model  # buffers the file does not hold


def read_skeleton(opened: CheckpointFile, *, dtype: torch.dtype) -> nn.Module:
    """The embedded architecture of an opened checkpoint (eval mode) with every tensor outside its EP layers read
    and cast to ``dtype``, and each EP layer holding zero-storage stand-ins of its tensors (``dtype``, the stored
    shapes): its forward is checked, and sized, without reading a layer; a caller reads each layer when it runs.
    """
    if opened.architecture is None or opened.model_factory is not None:
        raise UsageError(f"{opened.path}: only an embedded architecture is read layer by layer")
    built = _built(opened)
    assert built is not None  # an embedded architecture
    meta = opened.meta_state()
    owned = layer_states(meta, opened.ep_layers)
    in_layers = {layer_prefix(path) + key for path, state in owned.items() for key in state}
    state: dict[str, Tensor] = {}
    for keys in _byte_groups({k: v for k, v in opened.tensors.items() if k not in in_layers}, _READ_GROUP_BYTES):
        for key, tensor in opened.read(keys).items():
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for key in in_layers:
        stored = meta[key]
        state[key] = torch.zeros((), dtype=dtype if stored.is_floating_point() else stored.dtype).expand(stored.shape)
    with _naming(opened.path):
        model = _fill(*built, state, copy=False)
        del state
        check_forward(model, opened.inputs, built[1])
    return model.to(dtype=dtype)  # buffers the file does not hold


_READ_GROUP_BYTES = 16 * 2**20
""":func:`read_model` reads the file in groups of tensors of about this many bytes."""


def _built(opened: CheckpointFile) -> BuiltModel | None:
    """The model the open built, or (once that was taken) the same model built and checked again."""
    built = opened.take_model()
    if built is not None:
        return built
    with _naming(opened.path):
        return _skeleton(opened, opened.meta_state(), opened.model_factory)


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
) -> tuple[CheckpointFile, nn.Module | None]:
    """The opened file, and the factory's model when opening a foreign file built it (for :func:`_skeleton`)."""
    problem = source_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
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
        model_factory=model_factory,
    )
    _check_ep_tensors(meta, opened.meta_state())
    return opened, None


def _open_foreign(
    path: Path, source: TensorSource, model_factory: ModelFactory | None, inputs: Sequence[InputSpec] | None
) -> tuple[CheckpointFile, nn.Module]:
    """A checkpoint another tool wrote: EP configs and layer input shapes from the factory's model (returned too,
    so the factory is called once per open)."""
    if model_factory is None:
        hint = collapsed_hint(source.tensors, source.form)
        if hint:  # the usual hint (name --model) would lead back here
            raise CheckpointError(f"has no epcli metadata ({source.found}){hint}")
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
        layer_input_shapes=layer_input_shapes(model, specs),
        input_shape=specs[0].shape,
        inputs=specs,
        architecture=None,
        metadata={"source_format": source.form, "found": source.found, "notes": list(notes)},
        source=source,
        notes=notes,
        model_factory=model_factory,
    )
    try:
        _check_ep_tensors(opened, opened.meta_state())
    except EpcliError as e:
        raise type(e)(
            f"the model built by factory {factory_name(model_factory)!r} does not fit the file: {e}"
            + (collapsed_hint(opened.tensors, source.form) or fit_hint(opened.tensors, model.state_dict()))
        ) from e
    return opened, model


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


def _skeleton(
    meta: CheckpointFile,
    state: Mapping[str, Tensor],
    model_factory: ModelFactory | None,
    built: nn.Module | None = None,
) -> BuiltModel | None:
    """The model, from the user's factory (``built``: what it returned already) or the embedded architecture (on
    meta), checked against ``state``'s keys and shapes.

    For a collapsed file the factory's EP model is collapsed, and for a compressed one (``epcli compress``) the
    layers its provenance records as factored become low-rank modules at the recorded ranks."""
    expected_layers = {} if meta.kind == "collapsed" else meta.ep_layers
    if model_factory is not None:
        model = built if built is not None else build_from_factory(model_factory)
        source = f"the model built by factory {factory_name(model_factory)!r}"
        if meta.kind == "collapsed" and find_ep_layers(model):
            model = collapse_model(model)  # the factory builds the EP model; the file holds its plain form
        record = compression_record(meta.metadata.get("provenance") or {}) if meta.kind == "collapsed" else None
        if record is not None:
            try:
                model = factored_skeleton(model, record.ranks)
            except CheckpointError as e:
                raise CheckpointError(f"{source} {e}") from e
    elif meta.architecture is not None:
        source = "the embedded architecture"
        _compare_layers(_spec_layers(meta.architecture), expected_layers, source)  # before building anything
        model = build_architecture(meta.architecture, device="meta")
    else:
        return None
    _compare_layers({p: layer.config for p, layer in find_ep_layers(model).items()}, expected_layers, source)
    expected = model.state_dict()
    try:
        check_state(expected, state)
    except (CheckpointError, ShapeMismatchError) as e:
        raise type(e)(f"{source} does not match the file's tensors: {e}{fit_hint(state, expected)}") from e
    return model, source


def _fill(
    model: nn.Module, source: str, state: Mapping[str, Tensor], *, copy: bool = True, filled: Collection[str] = ()
) -> nn.Module:
    """Load the file's tensors into the model (strictly: with the keys ``filled`` already, every key), which then
    owns copies of them (``copy=False``: the tensors themselves, when nothing else keeps them); eval mode."""
    # assign: parameters take the file's tensors (and dtypes); copies, so the model never aliases .state_dict
    given = {key: value.clone() for key, value in state.items()} if copy else dict(state)
    if not filled:
        model.load_state_dict(given, strict=True, assign=True)
    else:
        missing, unexpected = model.load_state_dict(given, strict=False, assign=True)
        missing = [key for key in missing if key not in filled]
        if missing or unexpected:
            raise CheckpointError(f"{source} does not match the file's tensors: missing keys {missing[:8]}, "
                                  f"unexpected keys {unexpected[:8]}")
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
