"""``epcli compress``: a checkpoint in, a smaller low-rank one out, verified end to end before anything is written.

The model (expanded or collapsed; it needs an embedded architecture or a ``--model`` factory) is run for the
reference outputs and collapsed in one pass (:func:`~epcli.verification.layered.collapse_opened`: an embedded
architecture an EP layer at a time), then its plain Linear / ConvNd layers are factored by
:func:`~epcli.verification.compress.compress_against` within the error budget, measured against the original
model on the user's samples (``--inputs``, which also whiten the truncation) or on seeded random inputs. The
compressed model as it will be stored is that measurement's candidate, and the optional ONNX is run in
onnxruntime against the same reference: only when every check is within the budget are the files written (the
ONNX staged, committed after the checkpoint). The output is a self-describing epcli file of kind ``collapsed``
with no EP layers left, the low-rank modules in its architecture, and the ranks and errors in its provenance.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from epcli._version import __version__
from epcli.artifacts.names import check_compress_names, default_compressed_output
from epcli.artifacts.provenance import metadata_strings
from epcli.checkpoint.architecture import describe_architecture
from epcli.checkpoint.inputs import InputSpec
from epcli.checkpoint.load import open_checkpoint
from epcli.checkpoint.metadata import build_metadata, dump_metadata
from epcli.checkpoint.opened import CheckpointFile
from epcli.onnx.export import EXPORTED, OnnxSession, build_onnx
from epcli.onnx.files import WrittenOnnx, check_written, write_metadata, write_onnx
from epcli.storage.atomic import StagedFiles
from epcli.storage.paths import check_targets, existing_ancestor, file_sha256, make_parent
from epcli.storage.scratch import ScratchTensors
from epcli.storage.source import TensorInfo
from epcli.storage.writer import CheckpointWriter
from epcli.text import plural
from epcli.verification.compare import Comparison, VerifySettings
from epcli.verification.compress import ERROR_METRIC, CompressionResult, compress_against
from epcli.verification.layered import collapse_opened
from epcli.verification.model_check import ONNX_LABEL, ExpandedOutputs
from epcli.verification.samples import read_samples, sample_batches

__all__ = ["DEFAULT_MAX_ERROR", "CompressFileResult", "compress_file", "default_compressed_output"]

DEFAULT_MAX_ERROR = 0.01
"""The default budget: the whole model's outputs move by at most 1% of their largest magnitude."""
_SETTINGS = VerifySettings(samples=64, batch_size=64, seed=0, dtype="float32")
"""How random inputs are drawn when no samples are given; batches of the user's samples are this size too. The
reference runs in the model's stored precision (:func:`_reference_dtype`), as ``export`` validates: a float64
reference of a float32 model would hold its largest layer (or a factory's whole model) twice as large, for
differences (about 1e-6) far below any budget worth compressing to."""


@dataclass(frozen=True)
class CompressFileResult:
    """``written`` is False when the budget could not be met (nothing was written); ``onnx_max_rel_error`` is the
    ONNX file's whole-model error on the same samples (None without ``--onnx``)."""

    source: Path
    output: Path
    onnx: Path | None
    written: bool
    compression: CompressionResult
    inputs: str  # what the error was measured on
    onnx_max_rel_error: float | None
    reason: str | None  # why nothing was written

    @property
    def files(self) -> tuple[Path, ...]:
        if not self.written:
            return ()
        return (self.output,) if self.onnx is None else (self.output, self.onnx)


def compress_file(
    source: Path,
    output: Path | None = None,
    *,
    max_error: float = DEFAULT_MAX_ERROR,
    samples_path: Path | None = None,
    onnx_path: Path | None = None,
    force: bool = False,
    model_factory: str | None = None,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
) -> CompressFileResult:
    """Compress ``source`` within ``max_error`` (:data:`~epcli.verification.compress.ERROR_METRIC`) and, when
    every check is within it, write ``output`` (and ``onnx_path``). ``model_factory``, ``inputs`` and
    ``state_key`` are as in :func:`~epcli.load_checkpoint`."""
    output = check_compress_names(source, output, onnx_path)
    opened = open_checkpoint(source, model_factory=model_factory, inputs=inputs, state_key=state_key)
    files, specs = opened.files or (source,), opened.inputs
    check_targets((output,) if onnx_path is None else (output, onnx_path), files, force)
    settings = replace(_SETTINGS, dtype=_reference_dtype(opened))
    calibration = None
    measured_on = f"{settings.samples} seeded random samples of the input specs (give --inputs FILE for real data)"
    if samples_path is not None:
        samples = read_samples(samples_path, specs)
        calibration = sample_batches(samples, settings.batch_size)
        measured_on = f"the {plural(samples[0].shape[0], 'sample')} of {samples_path.name}"
    # a model epcli builds from an embedded architecture is held a layer at a time: the other layers' weights and
    # factors wait in a scratch file beside the output (user code may read a weight outside its layer's forward)
    parked = opened.model_factory is None
    with ScratchTensors(existing_ancestor(output.parent)) if parked else nullcontext() as scratch:
        # the reference and the collapse in one pass, an EP layer at a time when the architecture is embedded
        collapsed = collapse_opened(
            opened, settings, what="compress and measure", batches=calibration, as_stored=True, scratch=scratch
        )
        reference, model = collapsed.expected, collapsed.model
        del collapsed
        compressed, result = compress_against(
            reference, model, max_error=max_error, whiten=bool(calibration), consume=True, scratch=scratch
        )
        del model
    reason = _refusal(result, source)
    if reason is None and onnx_path is not None:
        make_parent(onnx_path)  # the ONNX's scratch directory sits beside it
    # the ONNX is written in a scratch directory while it is checked and run, and committed only with the checkpoint
    with StagedFiles(overwrite=force) as staged:
        written, onnx_error = None, None
        if reason is None and onnx_path is not None:
            written, onnx_error = _onnx(compressed, specs, reference, settings, staged.scratch(onnx_path) / onnx_path.name)
            if onnx_error > max_error:
                reason = (
                    f"{onnx_path}: onnxruntime's output is off by {onnx_error:.3g} (relative), over --max-error "
                    f"{max_error:g}; nothing was written"
                )
        if reason is not None:
            return CompressFileResult(source, output, onnx_path, False, result, measured_on, onnx_error, reason)
        make_parent(output)
        architecture = describe_architecture(compressed)
        hashes = {path.name: file_sha256(path) for path in files}
        samples_file = None if samples_path is None else samples_path.name
        record = _provenance(source, hashes, result, measured_on, samples_file, onnx_error)  # the file's and the ONNX's
        metadata = build_metadata(
            kind="collapsed",
            inputs=specs,
            ep_layers={},  # every EP layer was collapsed, and its plain layer may be factored: none is left
            layer_input_shapes={},
            architecture=architecture,
            provenance=record,
        )
        state = {key: value.detach().cpu().contiguous() for key, value in compressed.state_dict().items()}
        layout = {key: TensorInfo(tuple(value.shape), value.dtype) for key, value in state.items()}
        if onnx_path is not None and written is not None:  # the same record as the checkpoint: verify reads it
            write_metadata(written, metadata_strings(record))
            staged.add(onnx_path, written.path)
        with CheckpointWriter(output, layout, overwrite=force) as writer:
            for key, value in state.items():
                writer.add(key, value)
            writer.commit(dump_metadata(metadata))
        staged.commit()
    return CompressFileResult(source, output, onnx_path, True, result, measured_on, onnx_error, None)


def _refusal(result: CompressionResult, source: Path) -> str | None:
    """Why the result is not worth writing, or None (a factored result is within the budget: only measured
    configurations are accepted)."""
    if not result.factored:
        return (
            f"{source}: no layer can be factored (to fewer parameters) within --max-error {result.max_error:g}: "
            "each was measured alone at its largest rank that saves; nothing was written; raise --max-error"
        )
    return None


def _reference_dtype(opened: CheckpointFile) -> str:
    """float64 for a model with float64 tensors, else float32 (float32, bfloat16 and float16 models)."""
    stored = {t.dtype for t in opened.meta_state().values()}
    return "float64" if torch.float64 in stored else "float32"


def _onnx(
    compressed: nn.Module,
    specs: Sequence[InputSpec],
    reference: ExpandedOutputs,
    settings: VerifySettings,
    path: Path,
) -> tuple[WrittenOnnx, float]:
    """The compressed model as ONNX (float32), written to ``path`` (a scratch file) a tensor at a time and checked
    there (its graph by onnx.checker, :func:`~epcli.onnx.files.check_written`), and its whole-model error in
    onnxruntime against the original model's outputs that the search measured against."""
    model = copy.deepcopy(compressed).to(torch.float32).eval()
    proto = build_onnx(model, specs[0].shape, inputs=specs, consume=True)
    del model
    written = write_onnx(proto, path)
    del proto
    check_written(written)
    session = OnnxSession(written.path, expected_inputs=len(specs), name=EXPORTED)
    comparisons: tuple[Comparison, ...] = reference.compare(session, ONNX_LABEL, settings)
    return written, max(c.max_rel_error for c in comparisons)


def _provenance(
    source: Path,
    hashes: dict[str, str],
    result: CompressionResult,
    measured_on: str,
    samples_file: str | None,
    onnx_error: float | None,
) -> dict[str, object]:
    """What a compressed file records of its making: the source by sha256, the budget and how it was measured,
    each layer's rank and error, and the whole model's errors."""
    return {
        "source_name": source.name,
        "source_sha256": next(iter(hashes.values())),
        "compressed_by": f"epcli {__version__}",
        "compression": {
            "method": result.method,
            "max_error": result.max_error,
            "error_metric": ERROR_METRIC,
            "measured_on": measured_on,
            "samples_file": samples_file,
            "samples": result.samples,
            "threshold": result.threshold,
            "layers": {
                layer.path: {"rank": layer.rank, "full_rank": layer.full_rank, "error": layer.error}
                for layer in result.layers
            },
            "model_max_rel_error": result.model_max_rel_error,
            "model_max_abs_error": result.model_max_abs_error,
            "onnx_max_rel_error": onnx_error,
        },
    }
