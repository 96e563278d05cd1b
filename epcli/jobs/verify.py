"""``epcli verify``: compare an expanded checkpoint with its collapse (in memory or an artifact)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from epcli.convert import collapse_model, collapsed_keys, expanded_eval, layer_states, plain_model
from epcli.errors import CheckpointError, UsageError
from epcli.formats.checkpoint import Checkpoint, load_checkpoint
from epcli.formats.onnx_export import OnnxSession
from epcli.layers import EPConfig
from epcli.layers.registry import build_layer, plain_layer
from epcli.verify import Comparison, VerifyReport, VerifySettings, compare

__all__ = ["ProgressCallback", "VerifyResult", "verify_files", "verify_checkpoint"]

ProgressCallback = Callable[[int, int, str], None]
"""``report(done, total, label)``: lets a caller draw progress; library code itself never prints."""

IN_MEMORY = "collapsed in memory"
ONNX_LABEL = "onnxruntime"


@dataclass(frozen=True)
class VerifyResult:
    checkpoint: Path
    artifact: Path | None
    report: VerifyReport


def _collapsed_layer(
    config: EPConfig, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The plain layer holding the given collapsed tensors, in the comparison dtype and device."""
    plain = plain_layer(config, bias=bias is not None, device="meta")
    plain.load_state_dict({"weight": weight} if bias is None else {"weight": weight, "bias": bias}, assign=True)
    return plain.to(device=device, dtype=dtype)


def verify_checkpoint(
    checkpoint: Checkpoint,
    settings: VerifySettings,
    *,
    collapsed_state: dict[str, Tensor] | None = None,
    onnx_session: OnnxSession | None = None,
    label: str = IN_MEMORY,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Every EP layer alone, then the whole model when its architecture is known.

    Without ``collapsed_state`` the candidates are collapsed in memory from the
    parameters cast to the comparison dtype (the collapse itself runs in float64),
    so a float64 check measures the collapse, not the storage dtype. With it, the
    given tensors (e.g. a collapsed file's) are what is judged, layer by layer and
    loaded strictly into the collapsed architecture.
    """
    dtype, device = settings.torch_dtype, settings.torch_device
    comparisons: list[Comparison] = []
    states = layer_states(checkpoint.state_dict, checkpoint.ep_layers)
    total = len(checkpoint.ep_layers) + (checkpoint.model is not None)
    tick = progress or (lambda done, total, label: None)
    for path, config in checkpoint.ep_layers.items():
        tick(len(comparisons), total, f"checking layer {path}")
        # built on meta and given the stored tensors: no init cost, no copy
        layer = build_layer(config, device="meta")
        layer.load_state_dict(states[path], assign=True)
        layer = layer.to(device=device, dtype=dtype).eval()
        if collapsed_state is None:
            collapsed = layer.collapse()
            weight, bias = collapsed.weight, collapsed.bias
        else:
            weight_key, bias_key = collapsed_keys(path)
            weight, bias = collapsed_state[weight_key], collapsed_state.get(bias_key)
        comparisons.append(
            compare(
                path,
                "layer",
                label,
                functools.partial(layer, override=True),
                _collapsed_layer(config, weight, bias, dtype, device),
                checkpoint.layer_input_shapes[path],
                settings,
            )
        )
    if checkpoint.model is not None:
        tick(len(comparisons), total, "checking the whole model")
        model = copy.deepcopy(checkpoint.model).to(device=device, dtype=dtype)
        candidate: Callable[[Tensor], Tensor]
        if onnx_session is not None:
            candidate, model_label = onnx_session, ONNX_LABEL
        else:
            if collapsed_state is None:
                candidate = collapse_model(model)
            else:
                try:  # the given tensors as they are: collapsing the model again would be wasted work
                    candidate = plain_model(model, collapsed_state).to(device=device, dtype=dtype)
                except RuntimeError as e:
                    raise CheckpointError(f"the collapsed tensors do not fit the collapsed architecture: {e}") from e
            model_label = label
        with expanded_eval(model) as reference:
            comparisons.append(
                compare("<model>", "model", model_label, reference, candidate, checkpoint.input_shape, settings)
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
