"""``epcli inspect``: what a checkpoint holds, and the effective rank of every collapsed weight.

Streams like ``epcli collapse``: the file is opened without reading its tensors, then each
EP layer is read, collapsed in float64 and analysed before the next one is read, so peak
memory is about one layer. Large layers get approximate spectra, collapse included in float32
(see :func:`epcli.core.spectrum.spectrum_method`), unless ``exact`` is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from epcli.checkpoint.inputs import InputSpec
from epcli.checkpoint.load import open_checkpoint
from epcli.checkpoint.opened import CheckpointFile
from epcli.convert import (
    collapse_steps,
    collapsed_dtype,
    collapsed_keys,
    collapsed_tensors,
    expanded_layer,
    layer_prefix,
)
from epcli.core.spectrum import Spectrum, spectrum, spectrum_method
from epcli.errors import UsageError
from epcli.layers import EPConfig
from epcli.layers.registry import expected_state
from epcli.layers.summary import LayerSummary, natural_order, summarize_layer
from epcli.progress import ProgressCallback
from epcli.storage.atomic import atomic_write
from epcli.storage.paths import check_output

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
    inputs: tuple[InputSpec, ...]  # every model input: shape, dtype and range (token ids, say)
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
    exact: bool = False,
    progress: ProgressCallback | None = None,
) -> InspectResult:
    """Summarise a checkpoint one EP layer at a time; with ``plot``, also draw the spectra (the path is checked
    before any work). ``exact`` computes every spectrum by a float64 SVD, whatever its size.

    ``model_factory``, ``inputs`` and ``state_key`` are as in :func:`~epcli.load_checkpoint`.
    """
    # the input first (without its tensors)
    opened = open_checkpoint(path, model_factory=model_factory, inputs=inputs, state_key=state_key)
    opened.drop_model()  # the layers are read from the file: the model is not needed
    if plot is not None:
        check_output(plot, (".png",), force=force, option="--plot", example="spectra.png")
    paths = natural_order(opened.ep_layers)
    steps = collapse_steps(opened.tensors, opened.ep_layers) if opened.kind == "expanded" else []
    owned = {step.layer: step.keys for step in steps if step.layer is not None}
    layers = []
    keys = [(collapsed_keys(p)[0],) if opened.kind == "collapsed" else owned.get(p, ()) for p in paths]
    for done, (layer_path, stored) in enumerate(zip(paths, _read_ahead(opened, keys))):
        if progress is not None:
            progress(done, len(paths), f"collapsing and analysing layer {layer_path}")
        config = opened.ep_layers[layer_path]
        summary = summarize_layer(layer_path, config, opened.layer_input_shapes[layer_path])
        weight = _collapsed_weight(opened, layer_path, config, stored, exact=exact or None)
        del stored
        layers.append(LayerInspection(summary, spectrum(weight, exact=exact or None)))
        del weight
    result = InspectResult(
        path=path,
        kind=opened.kind,
        metadata=opened.metadata,
        input_shape=opened.input_shape,
        inputs=tuple(opened.inputs),
        has_architecture=opened.architecture is not None or model_factory is not None,
        tensor_count=len(opened.tensors),
        element_count=sum(math.prod(info.shape) for info in opened.tensors.values()),
        layers=tuple(layers),
    )
    if plot is not None:
        _write_spectra_plot(result, plot, overwrite=force)
    return result


def _read_ahead(opened: CheckpointFile, groups: Sequence[tuple[str, ...]]) -> Iterator[dict[str, Tensor]]:
    """The tensors of each group of keys in turn, the next group read in a background thread while the caller
    works on this one (file reads release the GIL), so reading hides behind the spectra; at most two groups are
    held at once. Read errors are raised here, in order."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="epcli-read") as reader:
        pending = [reader.submit(opened.read, group) for group in groups[:1]]
        for index in range(len(groups)):
            tensors = pending.pop().result()
            if index + 1 < len(groups):
                pending.append(reader.submit(opened.read, groups[index + 1]))
            yield tensors
            del tensors


def _collapsed_weight(
    opened: CheckpointFile, path: str, config: EPConfig, stored: dict[str, Tensor], *, exact: bool | None
) -> Tensor:
    """The layer's collapsed weight as it is (or would be) stored: ``stored`` holds its tensors as read, the
    collapsed weight itself from a collapsed file, or the layer's own tensors from an expanded one, which are
    collapsed and cast to the stored dtype. The collapse runs in the working dtype of the layer's spectrum
    method: float64, or float32 for an approximate spectrum."""
    weight_key = collapsed_keys(path)[0]
    if opened.kind == "collapsed":
        return stored.pop(weight_key)
    dtype = collapsed_dtype(path, opened.tensors)
    _, work = spectrum_method(expected_state(config, collapsed=True)["weight"].shape, dtype, exact)
    prefix = layer_prefix(path)
    layer_state = {key[len(prefix) :]: stored.pop(key) for key in list(stored)}
    layer = expanded_layer(config, layer_state, prefix=prefix)
    del layer_state
    where = f"{opened.path}: layer {path or '<model>'!r}"
    weight, _ = collapsed_tensors(layer.collapse(dtype=work), dtype, where=where)
    return weight


def _write_spectra_plot(result: InspectResult, output: Path, *, overwrite: bool) -> None:
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
        atomic_write(
            output,
            lambda handle: figure.savefig(handle, format="png", metadata={"Software": None}),
            overwrite=overwrite,
        )
    finally:
        plt.close(figure)
