"""``epcli inspect``: what a checkpoint holds, and the effective rank of every collapsed weight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epcli.convert import collapse_state_dict, collapsed_keys
from epcli.errors import UsageError
from epcli.formats.atomic import atomic_write
from epcli.formats.checkpoint import load_checkpoint, open_checkpoint
from epcli.inputs import InputSpec
from epcli.jobs.files import check_output
from epcli.jobs.summary import LayerSummary, Spectrum, natural_order, spectrum, summarize_layer

__all__ = ["LayerInspection", "InspectResult", "inspect_file"]


@dataclass(frozen=True)
class LayerInspection:
    summary: LayerSummary
    spectrum: Spectrum


@dataclass(frozen=True)
class InspectResult:
    path: Path
    kind: str
    metadata: dict[str, Any]
    input_shape: tuple[int, ...]
    has_architecture: bool
    tensor_count: int
    element_count: int
    layers: tuple[LayerInspection, ...]


def inspect_file(
    path: Path,
    *,
    model_factory: str | None = None,
    inputs: Sequence[InputSpec] | None = None,
    state_key: str | None = None,
    plot: Path | None = None,
    force: bool = False,
) -> InspectResult:
    """Summarise a checkpoint; with ``plot``, also draw the spectra (the path is checked before any work).

    ``model_factory``, ``inputs`` and ``state_key`` are as in :func:`~epcli.load_checkpoint`.
    """
    if plot is not None:  # the input first (without its tensors), then the output, then the work
        open_checkpoint(path, model_factory=model_factory, inputs=inputs, state_key=state_key)
        check_output(plot, (".png",), force=force, option="--plot", example="spectra.png")
    checkpoint = load_checkpoint(path, model_factory=model_factory, inputs=inputs, state_key=state_key)
    collapsed = (
        checkpoint.state_dict
        if checkpoint.kind == "collapsed"
        else collapse_state_dict(checkpoint.state_dict, checkpoint.ep_layers)
    )
    layers = tuple(
        LayerInspection(
            summarize_layer(layer_path, config, checkpoint.layer_input_shapes[layer_path]),
            spectrum(collapsed[collapsed_keys(layer_path)[0]]),
        )
        for layer_path, config in ((p, checkpoint.ep_layers[p]) for p in natural_order(checkpoint.ep_layers))
    )
    result = InspectResult(
        path=path,
        kind=checkpoint.kind,
        metadata=checkpoint.metadata,
        input_shape=checkpoint.input_shape,
        has_architecture=checkpoint.model is not None,
        tensor_count=len(checkpoint.state_dict),
        element_count=sum(t.numel() for t in checkpoint.state_dict.values()),
        layers=layers,
    )
    if plot is not None:
        _write_spectra_plot(result, plot)
    return result


def _write_spectra_plot(result: InspectResult, output: Path) -> None:
    """Singular-value spectra (normalised by the largest) of every collapsed weight, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("--plot needs matplotlib: pip install 'epcli[plot]'") from e
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    for layer in result.layers:
        values = layer.spectrum.singular_values
        top = values[0] if values and values[0] > 0 else 1.0
        axis.semilogy(
            range(1, len(values) + 1),
            [v / top for v in values],
            marker=".",
            label=f"{layer.summary.path} (erank {layer.spectrum.effective_rank:.1f})",
        )
    axis.set_xlabel("index")
    axis.set_ylabel("singular value / largest")
    axis.set_title(f"Collapsed weight spectra: {result.path.name}")
    axis.legend(fontsize="small")
    figure.tight_layout()
    try:
        # no Software/date metadata: the same checkpoint gives the same bytes
        atomic_write(output, lambda handle: figure.savefig(handle, format="png", metadata={"Software": None}))
    finally:
        plt.close(figure)
