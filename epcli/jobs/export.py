"""``epcli export``: deployment artifacts of the collapsed model.

ONNX is validated in onnxruntime against the torch model before anything is
written; both output paths are checked before any work, and the safetensors
file is written only after the ONNX file passed, so a failed run leaves nothing
half-done behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import torch

from epcli.convert import collapse_model
from epcli.errors import UsageError
from epcli.formats.atomic import atomic_write
from epcli.formats.checkpoint import Checkpoint, load_checkpoint, open_checkpoint
from epcli.formats.onnx_export import DEFAULT_OPSET, OnnxSession, export_onnx_bytes, onnx_op_types
from epcli.formats.sharded import is_index, sharded_base
from epcli.inputs import InputSpec, tensor_leaves
from epcli.jobs.collapse import CollapseResult, collapse_file, plan_output
from epcli.jobs.files import check_name, check_targets, make_parent
from epcli.jobs.verify import ONNX_LABEL, ProgressCallback, verify_checkpoint
from epcli.verify import VerifyReport, VerifySettings, compare_outputs

__all__ = ["ExportResult", "OnnxExportResult", "export_file"]


@dataclass(frozen=True)
class OnnxExportResult:
    output: Path
    written: bool  # False when validation failed: nothing is left at ``output``
    op_types: tuple[str, ...]
    dynamic_batch: bool
    opset: int
    report: VerifyReport


@dataclass(frozen=True)
class ExportResult:
    source: Path
    onnx: OnnxExportResult | None
    safetensors: CollapseResult | None

    @property
    def passed(self) -> bool:
        return self.onnx is None or self.onnx.written


def export_file(
    source: Path,
    *,
    onnx_path: Path | None,
    safetensors_path: Path | None,
    settings: VerifySettings,
    opset: int = DEFAULT_OPSET,
    static_batch: bool = False,
    force: bool = False,
    model_factory: str | None = None,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
    progress: ProgressCallback | None = None,
) -> ExportResult:
    """Write the requested artifacts: ONNX first (validated), then the collapsed safetensors.

    ``model_factory`` (checked before any work), ``inputs`` and ``state_key`` are as in
    :func:`~epcli.load_checkpoint`: with them ``source`` may be a checkpoint another tool wrote.
    """
    if onnx_path is None and safetensors_path is None:
        raise UsageError("nothing to export: give --onnx OUT.onnx and/or --safetensors OUT.safetensors")
    if onnx_path is not None and settings.dtype != "float32":
        raise UsageError("ONNX export is float32; run with --dtype float32")
    # the input (and a named factory) first, without reading its tensors
    opened = open_checkpoint(source, model_factory=model_factory, inputs=inputs, state_key=state_key)
    if onnx_path is not None:  # every output is checked (and its directory made) before any export work
        example = f"{sharded_base(source).stem if is_index(source) else source.stem}.onnx"
        check_name(onnx_path, (".onnx",), option="--onnx", example=example)
        check_targets((onnx_path,), opened.files, force)
    if safetensors_path is not None:
        if opened.kind != "expanded":
            raise UsageError(f"{source}: already collapsed; --safetensors has nothing to do (use --onnx)")
        safetensors_path = plan_output(
            source,
            safetensors_path,
            file_format="safetensors",
            force=force,
            model_factory=model_factory,
            inputs=inputs,
            state_key=state_key,
        ).output
    if onnx_path is not None:
        make_parent(onnx_path)
    checkpoint = load_checkpoint(source, model_factory=model_factory, inputs=inputs, state_key=state_key)
    onnx = None
    if onnx_path is not None:
        onnx = _export_onnx(checkpoint, onnx_path, settings, opset, static_batch, progress)
        if not onnx.written:
            return ExportResult(source, onnx, None)
    collapsed = None
    if safetensors_path is not None:  # read again from the file, one layer at a time, as epcli collapse does
        collapsed = collapse_file(
            source,
            safetensors_path,
            force=force,
            model_factory=model_factory,
            inputs=inputs,
            state_key=state_key,
            progress=progress,
        )
    return ExportResult(source, onnx, collapsed)


def _export_onnx(
    checkpoint: Checkpoint,
    output: Path,
    settings: VerifySettings,
    opset: int,
    static_batch: bool,
    progress: ProgressCallback | None,
) -> OnnxExportResult:
    """Collapse, export, check with onnx.checker, compare in onnxruntime against torch, then write."""
    if checkpoint.model is None:
        raise UsageError(
            f"{checkpoint.path}: no architecture is embedded, so there is no whole model to export; "
            "name a factory with --model module:function"
        )
    dtype = next((p.dtype for p in checkpoint.model.parameters() if p.is_floating_point()), torch.float32)
    with torch.no_grad():
        outputs = tensor_leaves(checkpoint.model(*(spec.example(1, dtype=dtype) for spec in checkpoint.inputs)))
    if len(outputs) != 1:
        raise UsageError(
            f"{checkpoint.path}: the model returns {len(outputs)} tensors ({', '.join(p for p, _ in outputs)}); ONNX "
            "export compares one output tensor so far (export the collapsed checkpoint with --safetensors)"
        )
    if static_batch:
        settings = replace(settings, batch_size=1)
    collapsed = checkpoint.model if checkpoint.kind == "collapsed" else collapse_model(checkpoint.model)
    data = export_onnx_bytes(
        collapsed.float(), checkpoint.input_shape, opset=opset, dynamic_batch=not static_batch, inputs=checkpoint.inputs
    )
    session = OnnxSession(data, expected_inputs=len(checkpoint.inputs))
    if checkpoint.kind == "expanded":
        report = verify_checkpoint(checkpoint, settings, onnx_session=session, progress=progress)
    else:
        settings = settings.for_model(checkpoint.state_dict.values())
        comparisons = compare_outputs("<model>", "model", ONNX_LABEL, collapsed, session, checkpoint.inputs, settings)
        report = VerifyReport(settings, settings.tolerance, comparisons)
    if report.passed:

        def write(handle: BinaryIO) -> None:
            handle.write(data)

        atomic_write(output, write)
    return OnnxExportResult(
        output=output,
        written=report.passed,
        op_types=tuple(onnx_op_types(data)),
        dynamic_batch=not static_batch,
        opset=opset,
        report=report,
    )
