"""``epcli export``: deployment artifacts of the collapsed model.

ONNX is validated in onnxruntime against the torch model before anything is moved
into place; both output paths are checked before any work, and the safetensors
file is written only after the ONNX file passed, so a failed run leaves nothing
half-done behind.

The ONNX file is written in a scratch directory beside the output under its final name, a tensor at a time
(:mod:`epcli.onnx.files`), its graph checked there with ``onnx.checker`` without its weights (onnxruntime checks
those, :func:`~epcli.onnx.files.check_written`) and run in onnxruntime from that path, then moved into place; on
any failure nothing is left. A model over protobuf's 2 GiB limit (or any, with ``external_data=True``) is written
as ``NAME.onnx`` plus ``NAME.onnx.data`` (the model names its data file), and the pair is moved together, the data
file first. The ONNX carries the provenance a collapsed safetensors file does, in ``metadata_props``; the
validation result is added after the run it records (metadata does not change what runs), by rewriting only the
file's tail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from epcli.artifacts.collapsed import CollapseResult, OutputPlan, plan_output, write_collapsed
from epcli.artifacts.names import check_export_names
from epcli.artifacts.provenance import metadata_strings, provenance
from epcli.checkpoint.inputs import InputSpec
from epcli.checkpoint.load import open_checkpoint
from epcli.checkpoint.opened import CheckpointFile
from epcli.checkpoint.save import collapsed_layout
from epcli.errors import UsageError
from epcli.onnx.export import (
    DEFAULT_OPSET,
    EXPORTED,
    EXTERNAL_DATA_THRESHOLD,
    OnnxSession,
    build_onnx,
    check_onnx,
    external_data_path,
    initializer_nbytes,
)
from epcli.onnx.files import check_written, save_external, write_metadata, write_onnx
from epcli.progress import ProgressCallback
from epcli.storage.atomic import StagedFiles
from epcli.storage.mapped_pages import trim_heap
from epcli.storage.paths import check_targets, file_sha256, make_parent
from epcli.verification.compare import VerifyReport, VerifySettings
from epcli.verification.layered import collapse_opened
from epcli.verification.model_check import ONNX_LABEL

__all__ = ["ExportResult", "OnnxExportResult", "export_file"]


@dataclass(frozen=True)
class OnnxExportResult:
    """``files``: what was written (the model, then its external data file if any); empty when validation failed."""

    output: Path
    written: bool  # False when validation failed: nothing is left at ``output``
    op_types: tuple[str, ...]
    dynamic_batch: bool
    opset: int
    report: VerifyReport
    external_data: bool = False
    files: tuple[Path, ...] = ()
    reference: str = "expanded"
    """What the ONNX file was compared with: the ``expanded`` model, or the ``collapsed`` / ``compressed`` model
    of a file that already is one."""


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
    external_data: bool = False,
    external_threshold: int = EXTERNAL_DATA_THRESHOLD,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
    timeout: float | None = None,
    progress: ProgressCallback | None = None,
) -> ExportResult:
    """Write the requested artifacts: ONNX first (validated), then the collapsed safetensors.

    The ONNX weights go to an external data file with ``external_data``, or when
    they would exceed ``external_threshold`` bytes (default: protobuf's limit, less a margin).
    Each onnxruntime run of the validation is stopped after ``timeout`` seconds, as in verify.

    ``model_factory`` (checked before any work), ``inputs`` and ``state_key`` are as in
    :func:`~epcli.load_checkpoint`: with them ``source`` may be a checkpoint another tool wrote.
    """
    check_export_names(source, onnx_path, safetensors_path, settings.dtype)  # the names, before any reading
    # the input (and a named factory) first, without reading its tensors
    opened = open_checkpoint(source, model_factory=model_factory, inputs=inputs, state_key=state_key)
    if onnx_path is not None:  # every output is checked (and its directory made) before any export work
        external_data = external_data or _onnx_nbytes_estimate(opened) > external_threshold
        targets = (onnx_path, external_data_path(onnx_path)) if external_data else (onnx_path,)
        check_targets(targets, opened.files, force)
    collapse_plan: OutputPlan | None = None
    if safetensors_path is not None:
        if opened.kind != "expanded":
            raise UsageError(f"{source}: already collapsed; --safetensors has nothing to do (use --onnx)")
        collapse_plan = plan_output(
            opened, safetensors_path, file_format="safetensors", force=force, option="--safetensors"
        )
    if onnx_path is not None:
        make_parent(onnx_path)
    onnx = None
    # the ONNX files are staged, and committed only once the safetensors output is written too: a failed or
    # interrupted run leaves neither (the safetensors output is committed by its own writer, last)
    with StagedFiles(overwrite=force) as staged:
        if onnx_path is not None:  # only the ONNX needs the whole model in memory
            plan = _OnnxPlan(
                onnx_path, opset, static_batch, force, external_data, external_threshold, opened.files, timeout
            )
            onnx = _export_onnx(opened, plan, settings, staged, progress)
            if not onnx.written:
                return ExportResult(source, onnx, None)
        collapsed = None
        if collapse_plan is not None:  # from the file, one layer at a time, as epcli collapse does
            collapsed = write_collapsed(collapse_plan, progress=progress)
        staged.commit()
    return ExportResult(source, onnx, collapsed)


def _onnx_nbytes_estimate(opened: CheckpointFile) -> int:
    """Bytes of the collapsed model's tensors in float32 (as ONNX holds them), from the file's shapes alone."""
    if opened.kind == "expanded":
        shapes = [tuple(meta.shape) for meta in collapsed_layout(opened.meta_state(), opened.ep_layers).values()]
    else:
        shapes = [info.shape for info in opened.tensors.values()]
    return 4 * sum(math.prod(shape) for shape in shapes)


@dataclass(frozen=True)
class _OnnxPlan:
    output: Path
    opset: int
    static_batch: bool
    force: bool
    external_data: bool
    external_threshold: int
    sources: Sequence[Path]
    timeout: float | None


def _export_onnx(
    opened: CheckpointFile,
    plan: _OnnxPlan,
    settings: VerifySettings,
    staged: StagedFiles,
    progress: ProgressCallback | None,
) -> OnnxExportResult:
    """Take the expanded model's outputs (float32) while each EP layer is checked and the model collapsed, export,
    check with onnx.checker, compare in onnxruntime against those outputs, then stage the files in ``staged`` (the
    caller commits them).

    The model is collapsed as :func:`~epcli.verification.layered.collapse_opened` says (an embedded architecture a
    module at a time), so the expanded model is never held beside a copy of itself, nor beside the ONNX weights.
    The collapsed model's tensors are freed as the ONNX model takes its copies, and that model as soon as it is
    written, so the checker (shown the graph without its weights) and onnxruntime (which reads the file, in its own
    process) run beside no copy of the weights.
    """
    output = plan.output
    if plan.static_batch:
        settings = replace(settings, batch_size=1)
    if settings.model_dtype is None:  # default tolerances follow the stored precision (bfloat16 / float16)
        settings = settings.for_model(opened.meta_state().values())
    collapsed = collapse_opened(opened, settings, what="export", progress=progress)
    model, expected, layers = collapsed.model, collapsed.expected, collapsed.layers
    del collapsed
    proto = build_onnx(
        model,
        opened.input_shape,
        opset=plan.opset,
        dynamic_batch=not plan.static_batch,
        inputs=opened.inputs,
        consume=True,
    )
    del model  # the proto holds the weights now (an emitted model's were freed one by one as they were copied)
    trim_heap()  # the collapse's and the model's freed blocks: the checker and onnxruntime map their own
    op_types = tuple(node.op_type for node in proto.graph.node)
    external = plan.external_data or initializer_nbytes(proto) > plan.external_threshold
    data_path = external_data_path(output)
    if external and not plan.external_data:  # the estimate from the file's shapes fell short
        check_targets((data_path,), plan.sources, plan.force)
    # written under its final name in a scratch directory (a model names its data file), a tensor at a time, and
    # dropped: the checker and onnxruntime read the file, and only its small tail is rewritten for the metadata
    scratch = staged.scratch(output)
    written = (save_external if external else write_onnx)(proto, scratch / output.name)
    del proto
    check_written(written)  # the graph without its weights: onnxruntime checks those, running the real file
    if progress is not None:
        progress(len(layers), len(layers) + 1, "checking the whole model in onnxruntime")
    trim_heap()  # what the checker parsed and freed: onnxruntime maps its own
    session = OnnxSession(  # a single file is named as when it was run from memory
        written.path, timeout=plan.timeout, expected_inputs=len(opened.inputs), name=None if external else EXPORTED
    )
    report = VerifyReport(settings, settings.tolerance, (*layers, *expected.compare(session, ONNX_LABEL, settings)))
    del session
    files: tuple[Path, ...] = ()
    if report.passed:
        write_metadata(written, _metadata(opened, plan.sources, report))
        if external:  # checked again, as small as it is; a single file's checked bytes differ only in metadata
            check_onnx(written.path)
            staged.add(data_path, scratch / data_path.name)  # the data first: the model is what readers open
        staged.add(output, written.path)
        files = (output, data_path) if external else (output,)
    return OnnxExportResult(
        output=output,
        written=report.passed,
        op_types=op_types,
        dynamic_batch=not plan.static_batch,
        opset=plan.opset,
        report=report,
        external_data=external,
        files=files,
        reference=_reference_kind(opened),
    )


def _reference_kind(opened: CheckpointFile) -> str:
    """What the model the ONNX file is compared with is: expanded, collapsed, or compressed (a collapsed file with
    a compression record)."""
    if opened.kind == "expanded":
        return "expanded"
    provenance = opened.metadata.get("provenance")
    return "compressed" if isinstance(provenance, dict) and "compression" in provenance else "collapsed"


def _metadata(opened: CheckpointFile, sources: Sequence[Path], report: VerifyReport) -> dict[str, str]:
    """The collapsed safetensors provenance (strings as they are, other values as JSON) and the validation result."""
    hashes = {path.name: file_sha256(path) for path in sources}
    layer_errors = {c.name: c.max_abs_error for c in report.comparisons if c.scope == "layer"}
    model_errors = [c.max_abs_error for c in report.comparisons if c.scope == "model"]
    record = provenance(
        opened.path, hashes, report.settings, layer_errors, max(model_errors) if model_errors else None
    )
    made = opened.metadata.get("provenance")
    if opened.kind == "collapsed" and isinstance(made, Mapping) and isinstance(made.get("source_sha256"), str):
        # the ONNX of a collapsed (or compressed) file stands for the expanded checkpoint that file was made from:
        # `epcli verify EXPANDED OUT.onnx` then knows it is not stale, and judges a compressed one by its budget
        record["exported_from"] = {"name": opened.path.name, "sha256": record["source_sha256"]}
        record.pop("source_files_sha256", None)  # the collapsed file's shards: the origin's are copied below
        origin = ("source_name", "source_sha256", "source_files_sha256", "compression")
        record.update({key: made[key] for key in origin if key in made})
    record["validation"] = {
        "passed": report.passed,
        "reference": _reference_kind(opened),
        "candidate": ONNX_LABEL,
        "atol": report.tolerance.atol,
        "rtol": report.tolerance.rtol,
        "model_check_skipped": report.model_check_skipped,
    }
    return metadata_strings(record)
