"""``epcli verify``: compare an expanded checkpoint with its collapse (in memory or an artifact)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from epcli.convert import collapse_model, collapsed_keys, expanded_eval, expanded_layer, layer_states, plain_model
from epcli.errors import CheckpointError, UsageError
from epcli.formats.checkpoint import Checkpoint, load_checkpoint
from epcli.formats.onnx_export import OnnxSession
from epcli.layers.base import EPLayer
from epcli.layers.registry import plain_layer
from epcli.verify import Comparison, VerifyReport, VerifySettings, compare

__all__ = ["ProgressCallback", "VerifyResult", "compare_layer", "compare_model", "verify_checkpoint", "verify_files"]

ProgressCallback = Callable[[int, int, str], None]
"""``report(done, total, label)``: lets a caller draw progress; library code itself never prints."""

IN_MEMORY = "collapsed in memory"
ONNX_LABEL = "onnxruntime"


@dataclass(frozen=True)
class VerifyResult:
    checkpoint: Path
    artifact: Path | None
    report: VerifyReport


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
    plain = plain_layer(layer.config, bias=bias is not None, device="meta")
    plain.load_state_dict({"weight": weight} if bias is None else {"weight": weight, "bias": bias}, assign=True)
    reference = next(layer.parameters())
    plain = plain.to(device=reference.device, dtype=reference.dtype)
    return compare(path, "layer", label, functools.partial(layer, override=True), plain, input_shape, settings)


def compare_model(
    checkpoint: Checkpoint,
    settings: VerifySettings,
    *,
    collapsed_state: Mapping[str, Tensor] | None = None,
    onnx_session: OnnxSession | None = None,
    label: str = IN_MEMORY,
) -> Comparison:
    """The whole expanded model against its collapse: in memory, the given collapsed tensors, or an ONNX session."""
    if checkpoint.model is None:
        raise UsageError(f"{checkpoint.path}: no architecture is embedded; name a factory with --model module:function")
    model = copy.deepcopy(checkpoint.model).to(device=settings.torch_device, dtype=settings.torch_dtype)
    candidate: Callable[[Tensor], Tensor]
    if onnx_session is not None:
        candidate, label = onnx_session, ONNX_LABEL
    elif collapsed_state is None:
        candidate = collapse_model(model)
    else:
        try:  # the given tensors as they are: collapsing the model again would be wasted work
            candidate = plain_model(model, collapsed_state).to(device=settings.torch_device, dtype=settings.torch_dtype)
        except RuntimeError as e:
            raise CheckpointError(f"the collapsed tensors do not fit the collapsed architecture: {e}") from e
    with expanded_eval(model) as reference:
        return compare("<model>", "model", label, reference, candidate, checkpoint.input_shape, settings)


def verify_checkpoint(
    checkpoint: Checkpoint,
    settings: VerifySettings,
    *,
    collapsed_state: Mapping[str, Tensor] | None = None,
    onnx_session: OnnxSession | None = None,
    label: str = IN_MEMORY,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Every EP layer alone, then the whole model when its architecture is known.

    Without ``collapsed_state`` the candidates are collapsed in memory from the
    parameters cast to the comparison dtype (the collapse itself runs in float64),
    so a float64 check measures the collapse, not the storage dtype. With it, the
    given tensors (e.g. a collapsed file's) are what is judged, layer by layer and
    loaded strictly into the collapsed architecture. Default tolerances allow for
    the checkpoint's stored dtype (``VerifySettings.model_dtype``).
    """
    comparisons: list[Comparison] = []
    if settings.model_dtype is None:  # default tolerances follow the stored precision (bfloat16 / float16)
        settings = settings.for_model(checkpoint.state_dict.values())
    states = layer_states(checkpoint.state_dict, checkpoint.ep_layers)
    total = len(checkpoint.ep_layers) + (checkpoint.model is not None)
    tick = progress or (lambda done, total, label: None)
    for path, config in checkpoint.ep_layers.items():
        tick(len(comparisons), total, f"checking layer {path}")
        layer = expanded_layer(config, states[path], dtype=settings.torch_dtype, device=settings.torch_device)
        if collapsed_state is None:
            collapsed = layer.collapse()
            weight, bias = collapsed.weight, collapsed.bias
        else:
            weight_key, bias_key = collapsed_keys(path)
            weight, bias = collapsed_state[weight_key], collapsed_state.get(bias_key)
        comparisons.append(
            compare_layer(path, layer, weight, bias, checkpoint.layer_input_shapes[path], settings, label)
        )
    if checkpoint.model is not None:
        tick(len(comparisons), total, "checking the whole model")
        comparisons.append(
            compare_model(checkpoint, settings, collapsed_state=collapsed_state, onnx_session=onnx_session, label=label)
        )
    tick(total, total, "done")
    return VerifyReport(settings, settings.tolerance, tuple(comparisons))


def verify_files(
    checkpoint_path: Path,
    artifact_path: Path | None,
    settings: VerifySettings,
    *,
    model_factory: str | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyResult:
    """Load the expanded checkpoint and the artifact (collapsed .safetensors/.pt or .onnx) and compare them."""
    checkpoint = load_checkpoint(checkpoint_path, model_factory=model_factory)
    if checkpoint.kind != "expanded":
        raise UsageError(
            f"{checkpoint_path}: this is a collapsed checkpoint; pass the expanded checkpoint first and the "
            "collapsed file as the second argument (epcli verify EXPANDED [ARTIFACT])"
        )
    if artifact_path is None:
        report = verify_checkpoint(checkpoint, settings, progress=progress)
    elif artifact_path.suffix == ".onnx":
        if checkpoint.model is None:
            raise UsageError(
                f"{checkpoint_path}: no architecture is embedded, so the ONNX model cannot be compared; "
                "name a factory with --model module:function"
            )
        session = OnnxSession(artifact_path)
        if isinstance(session.input_shape[0], int):  # exported with --static-batch
            settings = replace(settings, batch_size=session.input_shape[0])
        if session.numpy_dtype != settings.dtype:
            raise UsageError(f"{artifact_path}: the ONNX model takes {session.numpy_dtype}; run with --dtype {session.numpy_dtype}")
        report = verify_checkpoint(checkpoint, settings, onnx_session=session, progress=progress)
    else:
        artifact = load_checkpoint(artifact_path)
        if artifact.kind != "collapsed":
            raise UsageError(f"{artifact_path}: expected a collapsed checkpoint (from epcli collapse), found an expanded one")
        if set(artifact.ep_layers) != set(checkpoint.ep_layers):
            raise CheckpointError(
                f"{artifact_path}: collapses EP layers {sorted(artifact.ep_layers)}, but {checkpoint_path} has "
                f"{sorted(checkpoint.ep_layers)}; was it made from this checkpoint?"
            )
        report = verify_checkpoint(
            checkpoint,
            settings,
            collapsed_state=artifact.state_dict,
            label=artifact_path.name,
            progress=progress,
        )
    return VerifyResult(checkpoint_path, artifact_path, report)
