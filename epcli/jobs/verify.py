"""``epcli verify``: compare an expanded checkpoint with its collapse (in memory or an artifact)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from epcli.artifacts.names import remake_artifact
from epcli.checkpoint.factory import ModelFactory, factory_name
from epcli.checkpoint.inputs import InputSpec, describe_inputs, tensor_leaves
from epcli.checkpoint.load import open_checkpoint, read_model
from epcli.checkpoint.metadata import CompressionRecord, compression_record
from epcli.checkpoint.opened import CheckpointFile
from epcli.checkpoint.user_code import run_forward
from epcli.convert import (
    collapsed_keys,
    expanded_eval,
    layer_prefix,
    layer_states,
)
from epcli.errors import CheckpointError, ShapeMismatchError, UsageError
from epcli.layers.registry import expected_state
from epcli.layers.summary import natural_order
from epcli.onnx.export import OnnxSession
from epcli.progress import ProgressCallback
from epcli.storage.paths import file_sha256, source_problem
from epcli.text import plural, quote
from epcli.verification.compare import SUPPORTED_DTYPES, VerifyReport, VerifySettings
from epcli.verification.deployment import deploy_changes, deploy_notes, deployed_model
from epcli.verification.layered import verify_embedded
from epcli.verification.model_check import (
    IN_MEMORY,
    NO_ARCHITECTURE,
    ONNX_LABEL,
    ExpandedOutputs,
    check_subject,
    expanded_outputs,
    opened_subject,
)
from epcli.verification.samples import read_samples, sample_batches

__all__ = ["DEFAULT_ONNX_TIMEOUT", "ProgressCallback", "VerifyResult", "verify_files"]

DEFAULT_ONNX_TIMEOUT = 60.0
"""Seconds one onnxruntime run (one batch) of an ONNX artifact may take: the file is untrusted input."""


@dataclass(frozen=True)
class VerifyResult:
    checkpoint: Path
    artifact: Path | None
    report: VerifyReport
    artifact_stale: bool | None = (
        None  # from the artifact's recorded source sha256; None: nothing recorded / no artifact
    )
    deploy_changes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """EP layers whose collapsed form differs from the plain layer they replaced, with how."""


def verify_files(
    checkpoint_path: Path,
    artifact_path: Path | None,
    settings: VerifySettings,
    *,
    model_factory: str | None = None,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
    samples_path: Path | None = None,
    timeout: float = DEFAULT_ONNX_TIMEOUT,
    progress: ProgressCallback | None = None,
    plain_model: ModelFactory | None = None,
) -> VerifyResult:
    """Load the expanded checkpoint and the artifact (collapsed .safetensors/.pt or .onnx) and compare them.

    An ONNX artifact is checked against the checkpoint's input (rank, static sizes) before
    it runs, and each of its runs is bounded by ``timeout`` seconds. ``samples_path`` is
    a file of the user's own inputs (:func:`~epcli.verification.samples.read_samples`), on which the
    whole model is compared instead of random ones. ``model_factory``, ``inputs`` and
    ``state_key`` are as in :func:`~epcli.load_checkpoint`.

    The checkpoint is opened, not loaded. With a model (embedded, or ``model_factory``) it is
    read once, in the comparison dtype; its expanded outputs are taken, then each EP layer is
    checked alone and replaced by its plain layer in place (an artifact's tensors are read a
    layer at a time), so the peak is about the model in that dtype and one layer's float64
    collapse. An embedded architecture (no factory) checked in memory or against a collapsed file is not read
    whole: the model runs one module at a time and each EP layer is read, run, collapsed (or read from the
    collapsed file), checked and dropped in turn (:func:`~epcli.verification.layered.check_layered`), so the
    peak is about one layer. Without a model,
    each EP layer is read, checked and dropped in turn.

    ``plain_model`` names the class the user deploys (a factory building the plain model): the collapsed
    artifact is loaded into it with ``strict=True`` and compared with the expanded model end to end.
    """
    checkpoint = open_checkpoint(checkpoint_path, model_factory=model_factory, inputs=inputs, state_key=state_key)
    problem = None if artifact_path is None else source_problem(artifact_path, remake_artifact(checkpoint_path, artifact_path))
    if problem is not None:  # an artifact is written again by the command that made it, not saved as a checkpoint
        raise CheckpointError(f"{artifact_path}: {problem}", file=artifact_path)
    if checkpoint.kind != "expanded":
        raise UsageError(
            f"{checkpoint_path}: this is a collapsed checkpoint; pass the expanded checkpoint first and the "
            "collapsed file as the second argument (epcli verify EXPANDED [ARTIFACT])"
        )
    if not checkpoint.ep_layers:  # the model compared with itself: a pass would say nothing
        raise CheckpointError(
            f"{checkpoint_path}: holds no EP layers, so there is nothing to verify"
            + (f"; does --model {model_factory} build the plain model instead of the EP one?" if model_factory else ""),
            file=checkpoint_path,
        )
    has_model = checkpoint.architecture is not None or model_factory is not None
    if plain_model is not None and (artifact_path is None or artifact_path.suffix == ".onnx" or not has_model):
        onnx_artifact = artifact_path is not None and artifact_path.suffix == ".onnx"
        given = (
            f"{checkpoint_path} was given without a collapsed file" if artifact_path is None
            else f"{artifact_path} is an ONNX file" if onnx_artifact
            else f"{checkpoint_path}: {NO_ARCHITECTURE}"
        )
        raise UsageError(
            f"--plain-model {factory_name(plain_model)!r}: {given}; --plain-model loads a collapsed .safetensors/.pt "
            "into the class you deploy and compares it with the expanded model: run epcli verify "
            f"{checkpoint_path} COLLAPSED.safetensors --plain-model {factory_name(plain_model)}"
            + ("" if has_model else " --model module:function (the function that builds the expanded model)"),
            file=artifact_path if onnx_artifact else checkpoint_path,
        )
    batches = None
    if samples_path is not None:
        if not has_model:
            raise UsageError(f"{checkpoint_path}: {NO_ARCHITECTURE}, so --inputs cannot be run through the model")
        samples = read_samples(samples_path, checkpoint.inputs)
        batches = sample_batches(samples, settings.batch_size)
        settings = replace(settings, samples=samples[0].shape[0])
    if not has_model:  # the tensors no check reads are still checked finite, as loading the whole file did
        owned = layer_states(checkpoint.meta_state(), checkpoint.ep_layers)
        in_layers = {layer_prefix(path) + key for path, state in owned.items() for key in state}
        checkpoint.read(key for key in checkpoint.tensors if key not in in_layers)

    def owned_model(dtype: torch.dtype) -> nn.Module:  # read after the layers, the only copy, in the check's dtype
        model = read_model(checkpoint, dtype=dtype)
        assert model is not None  # has_model
        return model

    notes = [*checkpoint.notes, *deploy_notes(checkpoint.ep_layers)]
    changes = deploy_changes(checkpoint.ep_layers)
    if artifact_path is None:
        if checkpoint.architecture is not None and model_factory is None:
            report = verify_embedded(checkpoint, settings, progress, batches)
        else:
            report = check_subject(
                opened_subject(checkpoint, owned_model if has_model else None),
                settings, None, None, IN_MEMORY, progress, batches,
            )
        return VerifyResult(checkpoint_path, None, replace(report, notes=(*notes, *report.notes)), None, changes)
    if artifact_path.suffix == ".onnx":
        if not has_model:
            raise UsageError(
                f"{checkpoint_path}: no architecture is embedded, so the ONNX model cannot be compared; "
                "name a factory with --model module:function"
            )
        model = owned_model(settings.torch_dtype)  # read first: its forward checks the ONNX file's output

        def session() -> OnnxSession:
            return OnnxSession(artifact_path, timeout=timeout, expected_inputs=len(checkpoint.inputs))

        first = session()
        stale, stale_note = _stale_artifact(checkpoint, artifact_path, first.metadata)  # epcli's own export
        record = _onnx_compression(first.metadata, artifact_path)
        try:
            settings = _onnx_settings(first, model, checkpoint, artifact_path, settings)
        except CheckpointError as e:  # its inputs or outputs do not fit: another model's, when it says so
            if stale_note is None:
                raise
            return _not_compared(checkpoint_path, artifact_path, settings, str(e), stale_note)
        del first  # opened again after the layers: its weights are not held beside the expanded model
        if record is not None:  # from epcli compress --onnx: only the whole model, judged by its budget
            expected = expanded_outputs(model, checkpoint.inputs, settings, batches)
            del model
            report = _by_budget(expected, session(), artifact_path, record, settings, batches is not None)
            notes.extend([stale_note] if stale_note else [])
            return VerifyResult(checkpoint_path, artifact_path, replace(report, notes=(*report.notes, *notes)), stale)
        try:
            handed = [model]  # the check owns the only reference, and drops each EP layer as it goes
            del model
            report = check_subject(
                opened_subject(checkpoint, lambda dtype: handed.pop()),
                settings, None, session, IN_MEMORY, progress, batches,
            )
        except ShapeMismatchError as e:  # an output whose sizes the file leaves open
            mismatch = f"{artifact_path}: the ONNX file does not match {checkpoint_path}: {e}"
            if stale_note is not None:
                return _not_compared(checkpoint_path, artifact_path, settings, mismatch, stale_note)
            raise CheckpointError(mismatch) from e
        except CheckpointError as e:
            if stale_note is None:
                raise
            raise CheckpointError(f"{e}; {stale_note}") from e
        noted = replace(report, notes=(*report.notes, *notes, *([stale_note] if stale_note else [])))
        return VerifyResult(checkpoint_path, artifact_path, noted, stale, changes)
    artifact = open_checkpoint(artifact_path)
    if artifact.kind != "collapsed":
        raise UsageError(
            f"{artifact_path}: expected a collapsed checkpoint (from epcli collapse), found an expanded one"
        )
    stale, stale_note = _stale_artifact(checkpoint, artifact_path, artifact.metadata.get("provenance"))
    try:
        compression = compression_record(artifact.metadata.get("provenance") or {})
    except CheckpointError as e:
        raise CheckpointError(f"{artifact_path}: {e}", file=artifact_path) from e
    misfit = _misfit(checkpoint, artifact, compressed=compression is not None)
    if misfit is not None:
        if stale_note is not None:  # another model's collapse: stale, as any file made from another checkpoint
            return _not_compared(checkpoint_path, artifact_path, settings, f"{artifact_path}: {misfit}", stale_note)
        raise CheckpointError(f"{artifact_path}: {misfit}; was it made from this checkpoint?", file=artifact_path)
    if compression is not None:  # from epcli compress: its layers are factored, so only the whole model
        if not has_model:
            raise UsageError(
                f"{checkpoint_path}: {NO_ARCHITECTURE}, so a compressed artifact cannot be compared; name the "
                "factory that builds the model with --model module:function"
            )
        report = _compressed_report(checkpoint, replace(artifact, model_factory=model_factory),
                                    owned_model(settings.torch_dtype), compression, settings, batches)
        notes.extend([stale_note] if stale_note else [])
        return VerifyResult(checkpoint_path, artifact_path, replace(report, notes=(*report.notes, *notes)), stale)
    if stale_note:
        notes.append(stale_note)
    collapsed_state = _ArtifactState(artifact)  # read a layer at a time: not held beside the expanded model
    precision = _artifact_precision(checkpoint, artifact.path, artifact.meta_state(), settings)
    if precision is not None:
        notes.append(precision)
    deployment = None
    if plain_model is not None:
        factory = plain_model
        deployment = (
            f"{artifact_path.name} in {factory_name(factory)}",
            lambda: deployed_model(factory, collapsed_state, artifact_path, checkpoint.ep_layers),
        )
    if checkpoint.architecture is not None and model_factory is None and deployment is None:
        report = verify_embedded(
            checkpoint, settings, progress, batches, collapsed_state=collapsed_state, label=artifact_path.name
        )
    else:
        report = check_subject(
            opened_subject(checkpoint, owned_model if has_model else None),
            settings, collapsed_state, None, artifact_path.name, progress, batches, deployment,
        )
    return VerifyResult(
        checkpoint_path, artifact_path, replace(report, notes=(*report.notes, *notes)), stale, changes
    )


def _misfit(checkpoint: CheckpointFile, artifact: CheckpointFile, *, compressed: bool) -> str | None:
    """How a collapsed (or ``compressed``) artifact does not fit the checkpoint, read from its metadata and tensor
    shapes before anything runs (another model's file would fail inside the model), or None: its model's inputs,
    then for a collapsed file the EP layers it collapses and the shape of each collapsed weight and bias."""

    def fit(specs: Sequence[InputSpec]) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [(spec.shape, spec.dtype) for spec in specs]

    if fit(artifact.inputs) != fit(checkpoint.inputs):
        return (
            f"its model takes {describe_inputs(artifact.inputs)}, but {checkpoint.path}'s takes "
            f"{describe_inputs(checkpoint.inputs)}"
        )
    if compressed:  # its layers are factored: no EP layers to match
        return None
    if set(artifact.ep_layers) != set(checkpoint.ep_layers):
        return (
            f"collapses EP layers {natural_order(artifact.ep_layers)}, but {checkpoint.path} has "
            f"{natural_order(checkpoint.ep_layers)}"
        )
    for path in natural_order(checkpoint.ep_layers):
        expected = expected_state(checkpoint.ep_layers[path], collapsed=True)
        for name, key in zip(("weight", "bias"), collapsed_keys(path), strict=True):
            want = list(expected[name].shape) if name in expected else None
            held = artifact.tensors.get(key)
            got = None if held is None else list(held.shape)
            if got != want:
                return (
                    f"holds {quote(key)} {'not at all' if got is None else f'of shape {got}'}, but EP layer "
                    f"{quote(path)} of {checkpoint.path} collapses to "
                    + ("no bias" if want is None else f"a {name} of shape {want}")
                )
    return None


def _not_compared(
    checkpoint_path: Path, artifact_path: Path, settings: VerifySettings, misfit: str, stale_note: str
) -> VerifyResult:
    """A stale artifact that does not even fit the checkpoint (another model's): nothing can be compared, and the
    run fails as a stale artifact does (exit 1), not as an unusable file (3): the file is sound, and it says which
    checkpoint it was made from."""
    notes = (f"{misfit}: nothing was compared", stale_note)
    return VerifyResult(checkpoint_path, artifact_path, VerifyReport(settings, settings.tolerance, (), notes=notes), True)


def _compressed_report(
    checkpoint: CheckpointFile,
    artifact: CheckpointFile,
    model: nn.Module,
    record: CompressionRecord,
    settings: VerifySettings,
    batches: Sequence[tuple[Tensor, ...]] | None,
) -> VerifyReport:
    """The whole expanded model against a compressed artifact (rebuilt from its embedded architecture, or from the
    factory ``artifact`` carries with the recorded layers factored), judged by the budget the artifact records
    (its max relative error), not atol / rtol: a low-rank model is meant to differ, by at most that much."""
    expected = expanded_outputs(model, checkpoint.inputs, settings, batches)
    del model
    compressed = read_model(artifact, dtype=settings.torch_dtype)
    if compressed is None:
        raise UsageError(
            f"{artifact.path}: a compressed file without an embedded architecture is rebuilt from the model's "
            "factory; name it with --model module:function"
        )
    return _by_budget(expected, compressed.to(device=settings.torch_device).eval(), artifact.path, record, settings,
                      batches is not None)


def _by_budget(
    expected: ExpandedOutputs,
    candidate: Callable[..., object],
    artifact: Path,
    record: CompressionRecord,
    settings: VerifySettings,
    given_samples: bool,
) -> VerifyReport:
    """The whole expanded model against a compressed artifact (a model, or its ONNX session), judged by the
    budget it was compressed to."""
    label = ONNX_LABEL if artifact.suffix == ".onnx" else artifact.name
    budget = record.max_error
    judged = tuple(replace(c, passed=c.max_rel_error <= budget) for c in expected.compare(candidate, label, settings))
    notes = [f"{artifact.name} is compressed (low-rank layers): only the whole model is compared, against the "
             "budget it was compressed to"]
    if record.samples_file is not None and not given_samples:
        notes.append(
            f"{artifact.name} was compressed within its budget on the samples of {quote(record.samples_file)}, and is "
            f"compared here on seeded random inputs, on which it may not be: pass --inputs {quote(record.samples_file)}"
        )
    if settings.atol is not None or settings.rtol is not None:
        notes.append("--atol / --rtol do not apply to a compressed artifact, which passes by its budget")
    return VerifyReport(settings, settings.tolerance, judged, notes=tuple(notes), max_error=budget)


def _onnx_compression(metadata: Mapping[str, str], artifact: Path) -> CompressionRecord | None:
    """The compression an ONNX file from ``epcli compress --onnx`` records (None: any other ONNX file)."""
    raw = metadata.get("compression")
    if raw is None:
        return None
    try:
        record = compression_record({"compression": json.loads(raw)})
    except (ValueError, CheckpointError) as e:
        raise CheckpointError(f"{artifact}: its compression metadata is unusable: {e}", file=artifact) from e
    return record


class _ArtifactState(Mapping[str, Tensor]):
    """A collapsed file's tensors, each read from the file when it is looked up."""

    def __init__(self, artifact: CheckpointFile) -> None:
        self._artifact = artifact

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._artifact.tensors:
            raise KeyError(key)
        return self._artifact.read([key])[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._artifact.tensors)

    def __len__(self) -> int:
        return len(self._artifact.tensors)


def _stale_artifact(checkpoint: CheckpointFile, artifact_path: Path, provenance: object) -> tuple[bool | None, str | None]:
    """Whether the artifact was collapsed from another file (None: its ``provenance`` records no source sha256),
    and a sentence saying so. ``provenance``: a collapsed file's metadata entry, or an ONNX file's metadata_props."""
    if not isinstance(provenance, Mapping) or not isinstance(provenance.get("source_sha256"), str):
        return None, None
    recorded = provenance["source_sha256"]
    checkpoint_path = checkpoint.path
    actual = file_sha256(checkpoint.files[0] if checkpoint.files else checkpoint_path)
    if recorded == actual:
        return False, None
    name = provenance.get("source_name")
    made_from = (
        f"{quote(name)} (sha256 {quote(recorded[:16])}...)" if isinstance(name, str)
        else f"a file with sha256 {quote(recorded[:16])}..."
    )
    again = "compress" if "compression" in provenance else "collapse" if artifact_path.suffix != ".onnx" else "export"
    return True, (
        f"{artifact_path} is stale: it was made from {made_from}, not from {checkpoint_path} "
        f"(sha256 {actual[:16]}...); {again} this checkpoint again"
    )


def _artifact_precision(
    checkpoint: CheckpointFile, artifact_path: Path, collapsed_state: Mapping[str, Tensor], settings: VerifySettings
) -> str | None:
    """A float64 check of float32 weights measures float32 rounding: refuse at float64's default tolerances,
    say so when the tolerances were given."""
    weights = [collapsed_state[collapsed_keys(path)[0]] for path in checkpoint.ep_layers]
    coarse = sorted(
        {
            str(w.dtype).removeprefix("torch.")
            for w in weights
            if torch.finfo(w.dtype).eps > torch.finfo(settings.torch_dtype).eps
        }
    )
    if not coarse:
        return None
    stored = "/".join(coarse)
    if settings.atol is None and settings.rtol is None and coarse[0] in SUPPORTED_DTYPES:
        raise UsageError(
            f"{artifact_path}: stores its collapsed weights in {stored}, so a {settings.dtype} comparison is "
            f"bounded by {stored} precision and cannot meet the {settings.dtype} default tolerances; run with "
            f"--dtype {coarse[0]}, "
            f"or give --atol/--rtol to compare in {settings.dtype} at {stored} precision"
        )
    return f"{artifact_path} stores {stored} weights: the {settings.dtype} comparison is bounded by {stored} precision"


def _onnx_settings(
    session: OnnxSession, model: nn.Module, checkpoint: CheckpointFile, artifact_path: Path, settings: VerifySettings
) -> VerifySettings:
    """Check the ONNX model's input and output against the checkpoint before anything runs; a static batch sets
    the batch size."""
    specs = checkpoint.inputs
    if len(session.input_names) != len(specs):
        raise CheckpointError(
            f"{artifact_path}: the ONNX model takes {plural(len(session.input_names), 'input')}, but {checkpoint.path} takes "
            f"{describe_inputs(specs)}: the ONNX file does not match the checkpoint (exported from another model?)"
        )
    for name, shape, dtype, spec in zip(
        session.input_names, session.input_shapes, session.numpy_dtypes, specs, strict=True
    ):
        if dtype not in (SUPPORTED_DTYPES if spec.is_float else (spec.name,)):
            raise CheckpointError(
                f"{artifact_path}: the ONNX model's input {name!r} is {dtype}, but the model takes {spec}"
            )
        if spec.is_float and dtype != settings.dtype:
            raise UsageError(f"{artifact_path}: the ONNX model takes {dtype}; run with --dtype {dtype}")
        expected = [None, *spec.shape]
        mismatch = len(shape) != len(expected) or any(
            isinstance(got, int) and want is not None and got != want
            for got, want in zip(shape, expected, strict=False)
        )
        if mismatch:
            raise CheckpointError(
                f"{artifact_path}: the ONNX model's input {name!r} has shape {shape}, but {checkpoint.path} "
                f"takes [batch, {', '.join(map(str, spec.shape))}]: the ONNX file does not match the "
                "checkpoint's inputs (was it exported from another model?)"
            )
    shape = session.input_shape
    batch = shape[0]
    if isinstance(batch, int) and batch < 1:
        raise CheckpointError(
            f"{artifact_path}: the ONNX model's input has a static batch size of {batch}; it takes no data"
        )
    model_dtype = next((p.dtype for p in model.parameters()), torch.float32)
    with expanded_eval(model), torch.no_grad():  # the chains: a collapse would be cached in each EP layer
        leaves = tensor_leaves(run_forward(model, *(spec.example(1, dtype=model_dtype) for spec in specs)))
    if len(leaves) != len(session.output_shapes):
        raise CheckpointError(
            f"{artifact_path}: the ONNX model has {plural(len(session.output_shapes), 'output')}, but {checkpoint.path}'s "
            f"model returns {plural(len(leaves), 'tensor')}: the ONNX file does not match the checkpoint"
        )
    for (path, reference), out in zip(leaves, session.output_shapes, strict=True):
        if out is not None and (
            len(out) != reference.dim()
            or any(isinstance(got, int) and got != want for got, want in zip(out[1:], reference.shape[1:], strict=True))
        ):
            raise CheckpointError(
                f"{artifact_path}: the ONNX model's output{' ' + path if path else ''} has shape {out}, but "
                f"{checkpoint.path}'s model gives [batch, {', '.join(map(str, reference.shape[1:]))}]: the ONNX file "
                "does not match the checkpoint"
            )
    if not isinstance(batch, int):
        return settings
    if settings.samples % batch:
        raise UsageError(
            f"{artifact_path}: the ONNX model takes batches of exactly {batch}; give --samples as a multiple of {batch}"
        )
    return replace(settings, batch_size=batch)
