"""``epcli verify``: compare an expanded checkpoint with its collapse (in memory or an artifact)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from epcli.convert import (
    collapse_model,
    collapsed_keys,
    expanded_eval,
    expanded_layer,
    layer_prefix,
    layer_states,
)
from epcli.errors import CheckpointError, ShapeMismatchError, UsageError
from epcli.formats.checkpoint import Checkpoint, CheckpointFile, open_checkpoint, read_model
from epcli.formats.onnx_export import OnnxSession
from epcli.inputs import InputSpec, describe_inputs, random_inputs, tensor_leaves
from epcli.jobs.files import file_sha256
from epcli.jobs.samples import read_samples, sample_batches
from epcli.jobs.summary import natural_order
from epcli.layers.base import EPLayer
from epcli.layers.config import EPConfig
from epcli.layers.registry import collapsed_has_bias, find_ep_layers, plain_layer
from epcli.verify import SUPPORTED_DTYPES, Comparison, VerifyReport, VerifySettings, compare, compare_outputs

__all__ = [
    "DEFAULT_ONNX_TIMEOUT",
    "ProgressCallback",
    "VerifyResult",
    "compare_layer",
    "compare_model",
    "verify_checkpoint",
    "verify_files",
]

ProgressCallback = Callable[[int, int, str], None]
"""``report(done, total, label)``: lets a caller draw progress; library code itself never prints."""

IN_MEMORY = "collapsed in memory"
ONNX_LABEL = "onnxruntime"
NO_ARCHITECTURE = "no architecture is embedded and no --model factory was named"
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


def compare_layer(
    path: str,
    layer: EPLayer,
    weight: Tensor,
    bias: Tensor | None,
    input_shape: tuple[int, ...],
    settings: VerifySettings,
    label: str = IN_MEMORY,
) -> Comparison:
    """One EP layer's expanded chain (``layer``, already in the comparison dtype and device) against the plain
    layer holding ``weight`` / ``bias``, cast the same way."""
    reference = next(layer.parameters())
    plain = _plain(layer.config, weight, bias).to(device=reference.device, dtype=reference.dtype)
    return compare(path, "layer", label, functools.partial(layer, override=True), plain, input_shape, settings)


def _plain(config: EPConfig, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """The plain layer holding ``weight`` / ``bias`` themselves (no copy)."""
    plain = plain_layer(config, bias=bias is not None, device="meta")
    plain.load_state_dict({"weight": weight} if bias is None else {"weight": weight, "bias": bias}, assign=True)
    return plain


def compare_model(
    checkpoint: Checkpoint,
    settings: VerifySettings,
    *,
    collapsed_state: Mapping[str, Tensor] | None = None,
    onnx_session: OnnxSession | None = None,
    label: str = IN_MEMORY,
    batches: Sequence[tuple[Tensor, ...]] | None = None,
) -> tuple[Comparison, ...]:
    """The whole expanded model against its collapse: in memory, the given collapsed tensors, or an ONNX session.

    Inputs are drawn from the checkpoint's input specs, or are ``batches`` (the user's
    samples, one tensor per model input); one comparison per tensor of the output.
    """
    if checkpoint.model is None:
        raise UsageError(f"{checkpoint.path}: no architecture is embedded; name a factory with --model module:function")
    return _compare_owned(
        copy.deepcopy(checkpoint.model),  # the caller's model stays as it is
        checkpoint.inputs,
        settings,
        collapsed_state=collapsed_state,
        onnx_session=onnx_session,
        label=label,
        batches=batches,
    )


def _compare_owned(
    model: nn.Module,
    specs: Sequence[InputSpec],
    settings: VerifySettings,
    *,
    collapsed_state: Mapping[str, Tensor] | None,
    onnx_session: OnnxSession | None,
    label: str,
    batches: Sequence[tuple[Tensor, ...]] | None,
    collapsed_layers: Mapping[str, tuple[Tensor, Tensor | None]] | None = None,
) -> tuple[Comparison, ...]:
    """:func:`compare_model` on a model nobody else holds, so only one copy of it ever exists: it is cast in
    place, and (unless an ONNX session is the candidate) its outputs are taken first, then it is collapsed in
    place, one EP layer at a time, and run again on the same batches. ``collapsed_layers``: the in-memory
    collapse of EP layers (by path, in the comparison dtype) already computed from these same parameters."""
    model = model.to(device=settings.torch_device, dtype=settings.torch_dtype)
    inputs: Sequence[InputSpec] | Sequence[tuple[Tensor, ...]]
    if batches is not None:
        inputs = [_moved(batch, settings) for batch in batches]
    elif onnx_session is not None:
        inputs = specs
    else:  # drawn here, as compare_outputs would, to be run twice
        inputs = list(
            random_inputs(
                specs,
                settings.samples,
                settings.batch_size,
                settings.seed,
                dtype=settings.torch_dtype,
                device=settings.torch_device,
            )
        )
    if onnx_session is not None:
        with expanded_eval(model) as reference:
            return compare_outputs("<model>", "model", ONNX_LABEL, reference, onnx_session, inputs, settings)
    with expanded_eval(model) as reference, torch.no_grad():
        expected = [reference(*batch) for batch in inputs if isinstance(batch, tuple)]
    candidate = _collapsed_in_place(model, collapsed_state, collapsed_layers or {}, settings)
    outputs = iter(expected)
    return compare_outputs("<model>", "model", label, lambda *batch: next(outputs), candidate, inputs, settings)


def _collapsed_in_place(
    model: nn.Module,
    collapsed_state: Mapping[str, Tensor] | None,
    collapsed_layers: Mapping[str, tuple[Tensor, Tensor | None]],
    settings: VerifySettings,
) -> nn.Module:
    """``model`` with each EP layer replaced by its plain layer, in place, each EP layer dropped as it goes (the
    model itself when it is one): collapsed in memory (or taken from ``collapsed_layers``), or holding
    ``collapsed_state`` (loaded strictly, as is)."""
    layers = find_ep_layers(model)
    plain: dict[int, nn.Module] = {}
    while layers:
        path, layer = layers.popitem()
        if id(layer) not in plain:  # a layer used at several paths is collapsed once
            if collapsed_state is None and path in collapsed_layers:
                plain[id(layer)] = _plain(layer.config, *collapsed_layers[path])
            elif collapsed_state is None:
                plain[id(layer)] = collapse_model(layer)
            else:
                plain[id(layer)] = plain_layer(layer.config, bias=collapsed_has_bias(layer.config), device="meta")
        if not path:
            model = plain[id(layer)]
        else:
            model.set_submodule(path, plain[id(layer)])
        del layer
    if collapsed_state is not None:
        try:  # the given tensors as they are: collapsing the model again would be wasted work
            model.load_state_dict(collapsed_state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"the collapsed tensors do not fit the collapsed architecture: {e}") from e
    return model.to(device=settings.torch_device, dtype=settings.torch_dtype).eval()


def _moved(batch: tuple[Tensor, ...], settings: VerifySettings) -> tuple[Tensor, ...]:
    """A user's batch on the comparison's device, floating tensors in its dtype."""
    return tuple(
        t.to(device=settings.torch_device, dtype=settings.torch_dtype if t.is_floating_point() else t.dtype)
        for t in batch
    )


@dataclass(frozen=True)
class _Subject:
    """What verification reads of an expanded checkpoint, loaded or opened: each EP layer's own tensors (keys
    relative to the layer) one at a time, and the whole model as a copy the check owns (cast in place)."""

    ep_layers: Mapping[str, EPConfig]
    layer_input_shapes: Mapping[str, tuple[int, ...]]
    inputs: Sequence[InputSpec]
    stored: Sequence[Tensor]  # every tensor (meta ones do), for the stored dtypes
    layer_state: Callable[[str], Mapping[str, Tensor]]
    owned_model: Callable[[torch.dtype], nn.Module] | None


def verify_checkpoint(
    checkpoint: Checkpoint,
    settings: VerifySettings,
    *,
    collapsed_state: Mapping[str, Tensor] | None = None,
    onnx_session: OnnxSession | None = None,
    label: str = IN_MEMORY,
    progress: ProgressCallback | None = None,
    batches: Sequence[tuple[Tensor, ...]] | None = None,
) -> VerifyReport:
    """Every EP layer alone, then the whole model when its architecture is known.

    Without ``collapsed_state`` the candidates are collapsed in memory from the
    parameters cast to the comparison dtype (the collapse itself runs in float64),
    so a float64 check measures the collapse, not the storage dtype. With it, the
    given tensors (e.g. a collapsed file's) are what is judged, layer by layer and
    loaded strictly into the collapsed architecture. Default tolerances allow for
    the checkpoint's stored dtype (``VerifySettings.model_dtype``).
    """
    states = layer_states(checkpoint.state_dict, checkpoint.ep_layers)
    model = checkpoint.model
    subject = _Subject(
        checkpoint.ep_layers,
        checkpoint.layer_input_shapes,
        checkpoint.inputs,
        list(checkpoint.state_dict.values()),
        states.__getitem__,
        None if model is None else lambda dtype: copy.deepcopy(model),  # the caller's model stays as it is
    )
    return _verify(subject, settings, collapsed_state, onnx_session, label, progress, batches)


def _opened_subject(opened: CheckpointFile, owned_model: Callable[[torch.dtype], nn.Module] | None) -> _Subject:
    """An opened checkpoint, read one EP layer at a time; ``owned_model`` reads its model (after the layers)."""
    keys = layer_states(opened.meta_state(), opened.ep_layers)
    prefixes = {path: layer_prefix(path) for path in opened.ep_layers}

    def layer_state(path: str) -> Mapping[str, Tensor]:
        stored = opened.read(prefixes[path] + key for key in keys[path])
        return {key[len(prefixes[path]) :]: tensor for key, tensor in stored.items()}

    return _Subject(
        opened.ep_layers,
        opened.layer_input_shapes,
        opened.inputs,
        list(opened.meta_state().values()),
        layer_state,
        owned_model,
    )


def _verify(
    subject: _Subject,
    settings: VerifySettings,
    collapsed_state: Mapping[str, Tensor] | None,
    onnx_session: OnnxSession | None,
    label: str,
    progress: ProgressCallback | None,
    batches: Sequence[tuple[Tensor, ...]] | None,
) -> VerifyReport:
    """:func:`verify_checkpoint` on what ``subject`` reads: one EP layer in memory at a time, then the model."""
    comparisons: list[Comparison] = []
    if settings.model_dtype is None:  # default tolerances follow the stored precision (bfloat16 / float16)
        settings = settings.for_model(subject.stored)
    # the model check would collapse the same parameters again: keep each result, cast as that check casts it
    keep = collapsed_state is None and onnx_session is None and subject.owned_model is not None
    kept: dict[str, tuple[Tensor, Tensor | None]] = {}
    total = len(subject.ep_layers) + (subject.owned_model is not None)
    tick = progress or (lambda done, total, label: None)
    for path in natural_order(subject.ep_layers):
        config = subject.ep_layers[path]
        tick(len(comparisons), total, f"checking layer {path}")
        layer = expanded_layer(
            config, subject.layer_state(path), dtype=settings.torch_dtype, device=settings.torch_device
        )
        if collapsed_state is None:
            collapsed = layer.collapse()
            weight, bias = collapsed.weight, collapsed.bias
            if keep:
                kept[path] = (weight.to(settings.torch_dtype), None if bias is None else bias.to(settings.torch_dtype))
        else:
            weight_key, bias_key = collapsed_keys(path)
            weight, bias = collapsed_state[weight_key], collapsed_state.get(bias_key)
        comparisons.append(
            compare_layer(path, layer, weight, bias, subject.layer_input_shapes[path], settings, label)
        )
        del layer, weight, bias  # before the next layer is read
    if subject.owned_model is not None:
        tick(len(comparisons), total, "checking the whole model")
        comparisons.extend(
            _compare_owned(
                subject.owned_model(settings.torch_dtype),
                subject.inputs,
                settings,
                collapsed_state=collapsed_state,
                onnx_session=onnx_session,
                label=label,
                batches=batches,
                collapsed_layers=kept,
            )
        )
    tick(total, total, "done")
    skipped = None if subject.owned_model is not None else NO_ARCHITECTURE
    return VerifyReport(settings, settings.tolerance, tuple(comparisons), model_check_skipped=skipped)


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
) -> VerifyResult:
    """Load the expanded checkpoint and the artifact (collapsed .safetensors/.pt or .onnx) and compare them.

    An ONNX artifact is checked against the checkpoint's input (rank, static sizes) before
    it runs, and each of its runs is bounded by ``timeout`` seconds. ``samples_path`` is
    a file of the user's own inputs (:func:`~epcli.jobs.samples.read_samples`), on which the
    whole model is compared instead of random ones. ``model_factory``, ``inputs`` and
    ``state_key`` are as in :func:`~epcli.load_checkpoint`.

    The checkpoint is opened, not loaded: each EP layer is read, checked and dropped in
    turn, then the model is read once, in the comparison dtype, and collapsed in place
    after its expanded outputs are taken; so the peak is about the model in that dtype
    (plus a collapsed artifact's tensors) and one layer's float64 collapse.
    """
    checkpoint = open_checkpoint(checkpoint_path, model_factory=model_factory, inputs=inputs, state_key=state_key)
    if checkpoint.kind != "expanded":
        raise UsageError(
            f"{checkpoint_path}: this is a collapsed checkpoint; pass the expanded checkpoint first and the "
            "collapsed file as the second argument (epcli verify EXPANDED [ARTIFACT])"
        )
    has_model = checkpoint.architecture is not None or model_factory is not None
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
        model = read_model(checkpoint, model_factory, dtype=dtype)
        assert model is not None  # has_model
        return model

    notes = list(checkpoint.notes)
    if artifact_path is None:
        report = _verify(
            _opened_subject(checkpoint, owned_model if has_model else None),
            settings, None, None, IN_MEMORY, progress, batches,
        )
        return VerifyResult(checkpoint_path, None, replace(report, notes=(*notes, *report.notes)))
    if artifact_path.suffix == ".onnx":
        if not has_model:
            raise UsageError(
                f"{checkpoint_path}: no architecture is embedded, so the ONNX model cannot be compared; "
                "name a factory with --model module:function"
            )
        model = owned_model(settings.torch_dtype)  # read first: its forward checks the ONNX file's output
        session = OnnxSession(artifact_path, timeout=timeout, expected_inputs=len(checkpoint.inputs))
        stale, stale_note = _stale_artifact(checkpoint, artifact_path, session.metadata)  # epcli's own export
        try:
            settings = _onnx_settings(session, model, checkpoint, artifact_path, settings)
            report = _verify(
                _opened_subject(checkpoint, lambda dtype: model),
                settings, None, session, IN_MEMORY, progress, batches,
            )
        except ShapeMismatchError as e:  # an output whose sizes the file leaves open
            raise CheckpointError(
                f"{artifact_path}: the ONNX file does not match {checkpoint_path}: {e}"
                + (f"; {stale_note}" if stale_note else "")
            ) from e
        except CheckpointError as e:
            if stale_note is None:
                raise
            raise CheckpointError(f"{e}; {stale_note}") from e
        noted = replace(report, notes=(*report.notes, stale_note)) if stale_note else report
        return VerifyResult(checkpoint_path, artifact_path, noted, artifact_stale=stale)
    artifact = open_checkpoint(artifact_path)
    if artifact.kind != "collapsed":
        raise UsageError(
            f"{artifact_path}: expected a collapsed checkpoint (from epcli collapse), found an expanded one"
        )
    stale, stale_note = _stale_artifact(checkpoint, artifact_path, artifact.metadata.get("provenance"))
    if set(artifact.ep_layers) != set(checkpoint.ep_layers):
        raise CheckpointError(
            f"{artifact_path}: collapses EP layers {natural_order(artifact.ep_layers)}, but {checkpoint_path} has "
            f"{natural_order(checkpoint.ep_layers)}; " + (stale_note or "was it made from this checkpoint?")
        )
    if stale_note:
        notes.append(stale_note)
    collapsed_state = artifact.read(artifact.tensors)  # a collapsed file: about one matrix per EP layer
    precision = _artifact_precision(checkpoint, artifact.path, collapsed_state, settings)
    if precision is not None:
        notes.append(precision)
    report = _verify(
        _opened_subject(checkpoint, owned_model if has_model else None),
        settings, collapsed_state, None, artifact_path.name, progress, batches,
    )
    return VerifyResult(
        checkpoint_path, artifact_path, replace(report, notes=(*report.notes, *notes)), artifact_stale=stale
    )


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
        f"{name!r} (sha256 {recorded[:16]}...)" if isinstance(name, str) else f"a file with sha256 {recorded[:16]}..."
    )
    return True, (
        f"{artifact_path} is stale: it was collapsed from {made_from}, not from {checkpoint_path} "
        f"(sha256 {actual[:16]}...); collapse this checkpoint again"
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
            f"{artifact_path}: the ONNX model takes {len(session.input_names)} input(s), but {checkpoint.path} takes "
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
    with torch.no_grad():
        leaves = tensor_leaves(model(*(spec.example(1, dtype=model_dtype) for spec in specs)))
    if len(leaves) != len(session.output_shapes):
        raise CheckpointError(
            f"{artifact_path}: the ONNX model has {len(session.output_shapes)} output(s), but {checkpoint.path}'s "
            f"model returns {len(leaves)} tensor(s): the ONNX file does not match the checkpoint"
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
