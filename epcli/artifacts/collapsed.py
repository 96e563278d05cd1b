"""A collapsed checkpoint from an opened expanded one: planned, then written one EP layer at a time, checked.

:func:`plan_output` checks every file the collapse would create, replace or remove before any
work; :func:`write_collapsed` then reads each EP layer, collapses it in float64, checks it
against its own expanded chain and hands it to the writer, which spools it to disk, before the
next layer is read. Peak memory is about one layer (in float64) beyond what Python and torch
take, whatever the checkpoint's size; the output is written atomically, sharded above
``max_shard_bytes``.

The whole-model check needs the whole model in memory, so by default it runs
only for checkpoints up to :data:`MODEL_CHECK_MAX_BYTES` (``model_check=True``
forces it; ``epcli verify`` runs it on any size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from epcli.artifacts.names import OUTPUT_FORMATS, default_output, resolve_output
from epcli.artifacts.provenance import provenance
from epcli.checkpoint.load import read_checkpoint
from epcli.checkpoint.opened import CheckpointFile
from epcli.checkpoint.save import collapsed_layout, collapsed_metadata
from epcli.convert import (
    CollapseStep,
    collapse_steps,
    collapsed_dtype,
    collapsed_keys,
    collapsed_tensors,
    expanded_layer,
    layer_prefix,
)
from epcli.devices import resolve_device
from epcli.errors import CheckpointError, UsageError
from epcli.layers.config import EPConfig
from epcli.layers.summary import LayerSummary, natural_order, summarize_layer
from epcli.progress import ProgressCallback
from epcli.storage.paths import check_targets, file_sha256, make_parent, prefetch_sha256
from epcli.storage.source import TensorInfo
from epcli.storage.writer import CheckpointWriter, output_files, stale_files
from epcli.verification.compare import VerifySettings
from epcli.verification.deployment import deploy_changes, deploy_notes
from epcli.verification.model_check import compare_layer, compare_model

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "MODEL_CHECK_MAX_BYTES",
    "OUTPUT_FORMATS",
    "CollapseResult",
    "LayerCollapse",
    "OutputPlan",
    "check_shard_limit",
    "default_output",
    "plan_output",
    "resolve_output",
    "write_collapsed",
]

ERROR_SETTINGS = VerifySettings(samples=32, batch_size=32, seed=0, dtype="float64")
"""How the per-layer error of the written weights is measured: float64, so only the collapse and the cast count."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Above this much tensor data a .safetensors output is sharded (the Hugging Face default, 5 GB)."""
MODEL_CHECK_MAX_BYTES = 64 * 2**20
"""Largest checkpoint (tensor bytes) whose whole model is checked by default: that check holds the model in float64."""
_PASS_THROUGH_READ_BYTES = 64 * 2**20
"""Tensors that are not EP layers are read in groups of about this size."""


@dataclass(frozen=True)
class LayerCollapse:
    summary: LayerSummary
    max_abs_error: float
    max_rel_error: float


@dataclass(frozen=True)
class CollapseResult:
    """``output`` is the file to open (the index when sharded); ``files`` every file written."""

    source: Path
    output: Path
    files: tuple[Path, ...]
    source_sha256: str
    layers: tuple[LayerCollapse, ...]
    model_max_abs_error: float | None
    model_check_skipped: str | None  # why the whole model was not checked; None when it was
    notes: tuple[str, ...] = ()  # what was reconciled between a foreign file and the model; deployment changes
    deploy_changes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """EP layers whose collapsed form differs from the plain layer they replaced, with how."""

    @property
    def expanded_params(self) -> int:
        return sum(layer.summary.expanded_params for layer in self.layers)

    @property
    def collapsed_params(self) -> int:
        return sum(layer.summary.collapsed_params for layer in self.layers)

    @property
    def compression(self) -> float:
        return self.expanded_params / self.collapsed_params if self.collapsed_params else 1.0


@dataclass(frozen=True)
class OutputPlan:
    """What a collapse will write: checked against the source's files and what exists, before any work."""

    opened: CheckpointFile
    output: Path
    layout: dict[str, TensorInfo]
    max_shard_bytes: int | None
    force: bool


def check_shard_limit(max_shard_bytes: int | None) -> None:
    """A shard size limit must be at least a byte (checked before the source is opened)."""
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise UsageError(f"the shard size limit must be at least 1 byte, got {max_shard_bytes}")


def plan_output(
    opened: CheckpointFile,
    output: Path | None,
    *,
    file_format: str | None = None,
    force: bool = False,
    max_shard_bytes: int | None = None,
    option: str = "-o",
) -> OutputPlan:
    """Check every file the collapse of ``opened`` would create, replace or remove; then create the output's
    missing directories. ``option`` names the output in messages."""
    check_shard_limit(max_shard_bytes)
    source = opened.path
    if opened.kind != "expanded":
        raise CheckpointError(f"{source}: already collapsed; nothing to do", file=source)
    if not opened.ep_layers:
        raise CheckpointError(
            f"{source}: holds no EP layers, so there is nothing to collapse; nothing was written", file=source
        )
    output = resolve_output(source, output, file_format, option)
    if output.suffix != ".safetensors" and max_shard_bytes is not None:
        raise UsageError(
            f"{output}: only .safetensors output can be sharded; drop the shard size limit or use .safetensors"
        )
    layout = {
        key: TensorInfo(tuple(meta.shape), meta.dtype)
        for key, meta in collapsed_layout(opened.meta_state(), opened.ep_layers).items()
    }
    shard_limit = max_shard_bytes or (DEFAULT_MAX_SHARD_BYTES if output.suffix == ".safetensors" else None)
    files = output_files(output, layout, shard_limit)
    check_targets(files + stale_files(output, files), opened.files, force)
    make_parent(output)
    return OutputPlan(opened, output, layout, shard_limit, force)


def write_collapsed(
    plan: OutputPlan,
    *,
    device: str = "cpu",
    model_check: bool | None = None,
    progress: ProgressCallback | None = None,
) -> CollapseResult:
    """Collapse every EP layer of the planned source one at a time (the math on ``device``) and write the result
    atomically.

    ``model_check``: None checks the whole model when the checkpoint is small enough, True always, False never;
    the model is the one the open built (a user's factory is not called again).
    """
    torch_device = resolve_device(device)  # a bad device fails before any work
    opened, output, layout, shard_limit = plan.opened, plan.output, plan.layout, plan.max_shard_bytes
    source = opened.path
    skipped = _model_check_skipped(opened, model_check)
    if skipped is not None:
        opened.drop_model()  # not read: its memory is not held while the layers stream
    settings = replace(ERROR_SETTINGS, device=device)
    prefetch_sha256(opened.files)  # hashed while the layers are collapsed; waited for before the commit
    with CheckpointWriter(
        output, layout, max_shard_bytes=shard_limit, remove_stale=True, overwrite=plan.force
    ) as writer:
        layers, kept = _collapse_into(writer, opened, torch_device, settings, keep=skipped is None, progress=progress)
        model_error = None
        if skipped is None:
            if progress is not None:
                progress(len(layers), len(layers) + 1, "checking the whole model")
            checkpoint = read_checkpoint(opened)
            model_error = max(c.max_abs_error for c in compare_model(checkpoint, settings, collapsed_state=kept))
        layer_errors = {layer.summary.path: layer.max_abs_error for layer in layers}
        hashes = {path.name: file_sha256(path) for path in opened.files}
        written = writer.commit(
            collapsed_metadata(opened, provenance(source, hashes, settings, layer_errors, model_error))
        )
    first = opened.files[0].name  # the file itself, an index, a folder's model.safetensors, a DCP's .metadata
    return CollapseResult(
        source, written, writer.files, hashes[first], _in_natural_order(layers), model_error, skipped,
        (*opened.notes, *deploy_notes(opened.ep_layers)), deploy_changes(opened.ep_layers),
    )


def _in_natural_order(layers: list[LayerCollapse]) -> tuple[LayerCollapse, ...]:
    """The file streams layers in key order (``0, 10, 2``); a report lists them as ``0, 2, 10``."""
    by_path = {layer.summary.path: layer for layer in layers}
    return tuple(by_path[path] for path in natural_order(by_path))


def _model_check_skipped(opened: CheckpointFile, model_check: bool | None) -> str | None:
    """Why the whole model will not be checked, or None when it will."""
    if model_check is False:
        return "not asked for (--no-model-check)"
    if opened.architecture is None and opened.model_factory is None:
        if model_check:
            raise UsageError(
                f"{opened.path}: no architecture is embedded, so the whole model cannot be checked; "
                "name a factory with --model module:function"
            )
        return "no architecture is embedded (name a factory with --model to check the whole model)"
    if model_check is None and opened.nbytes > MODEL_CHECK_MAX_BYTES:
        return (
            f"the checkpoint holds {opened.nbytes / 2**20:.0f} MiB of tensors, over the "
            f"{MODEL_CHECK_MAX_BYTES // 2**20} "
            "MiB up to which the whole model is checked in memory; pass --model-check, or run epcli verify"
        )
    return None


def _collapse_into(
    writer: CheckpointWriter,
    opened: CheckpointFile,
    device: torch.device,
    settings: VerifySettings,
    *,
    keep: bool,
    progress: ProgressCallback | None,
) -> tuple[list[LayerCollapse], dict[str, Tensor]]:
    """Read, collapse, check and hand over one step at a time; ``keep`` also returns the collapsed state."""
    kept: dict[str, Tensor] = {}
    layers: list[LayerCollapse] = []
    summaries: dict[tuple[EPConfig, tuple[int, ...]], LayerSummary] = {}
    total = len(opened.ep_layers) + keep
    for group in _read_groups(collapse_steps(opened.tensors, opened.ep_layers), opened.tensors):
        if group[0].layer is None:
            out = opened.read(step.keys[0] for step in group)
        else:
            path = group[0].layer
            if progress is not None:
                progress(len(layers), total, f"collapsing layer {path}")
            out, entry = _collapse_layer(opened, group[0], device, settings, summaries)
            layers.append(entry)
        for key, tensor in out.items():
            writer.add(key, tensor)
            if keep:
                kept[key] = tensor
    return layers, kept


def _read_groups(steps: list[CollapseStep], infos: Mapping[str, TensorInfo]) -> list[list[CollapseStep]]:
    """Each EP layer alone; runs of pass-through keys together, up to about ``_PASS_THROUGH_READ_BYTES`` per read."""
    groups: list[list[CollapseStep]] = []
    size = 0
    for step in steps:
        joins = step.layer is None and groups and groups[-1][0].layer is None and size < _PASS_THROUGH_READ_BYTES
        if joins:
            groups[-1].append(step)
        else:
            groups.append([step])
            size = 0
        if step.layer is None:
            size += infos[step.keys[0]].nbytes
    return groups


def _collapse_layer(
    opened: CheckpointFile,
    step: CollapseStep,
    device: torch.device,
    settings: VerifySettings,
    summaries: dict[tuple[EPConfig, tuple[int, ...]], LayerSummary],
) -> tuple[dict[str, Tensor], LayerCollapse]:
    """One EP layer: read it, collapse it in float64, measure the written (cast) weights against its chain.

    ``summaries`` keeps the summary of each (config, input shape) seen: a model's layers often share one, and
    counting its parameters builds the layer (on the meta device) each time."""
    path = step.layer or ""
    config = opened.ep_layers[path]
    prefix = layer_prefix(path)
    # read straight into the check's dtype (float64, exact for every stored float): the collapse, which works in
    # float64, and the check then share this one copy, instead of casting each chain layer and then the whole layer
    stored = opened.read(step.keys, dtype=settings.torch_dtype)
    layer_state = {key[len(prefix) :]: tensor for key, tensor in stored.items()}
    del stored
    layer = expanded_layer(config, layer_state, device=device, prefix=prefix)
    del layer_state
    weight_key, bias_key = collapsed_keys(path)
    where = f"{opened.path}: layer {path or '<model>'!r}"
    weight, bias = collapsed_tensors(layer.collapse(), collapsed_dtype(path, opened.tensors), where=where)
    input_shape = opened.layer_input_shapes[path]
    comparison = compare_layer(path, layer, weight, bias, input_shape, settings)
    out = {weight_key: weight} if bias is None else {weight_key: weight, bias_key: bias}
    known = summaries.get((config, input_shape))
    if known is None:
        summary = summaries[config, input_shape] = summarize_layer(path, config, input_shape)
    else:
        summary = replace(known, path=path, config=config)
    return out, LayerCollapse(summary, comparison.max_abs_error, comparison.max_rel_error)
