"""The whole-model check of an embedded architecture, one module at a time: each EP layer is read from the file
when its turn comes and freed before the next, so no more than one EP layer's data is ever held."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from epcli.checkpoint.inputs import InputSpec
from epcli.checkpoint.load import read_skeleton
from epcli.checkpoint.opened import CheckpointFile
from epcli.checkpoint.user_code import run_forward
from epcli.convert import expanded_eval
from epcli.errors import CheckpointError
from epcli.layers.registry import find_ep_layers
from epcli.layers.summary import natural_order
from epcli.progress import ProgressCallback
from epcli.verification.compare import Comparison, VerifyReport, VerifySettings, compare_outputs
from epcli.verification.expanded import drawn_batches, rejected_inputs
from epcli.verification.model_check import IN_MEMORY, check_layer, layer_reader

__all__ = ["check_layered", "verify_embedded"]


def verify_embedded(
    opened: CheckpointFile,
    settings: VerifySettings,
    progress: ProgressCallback | None,
    batches: Sequence[tuple[Tensor, ...]] | None,
) -> VerifyReport:
    """:func:`~.model_check.check_subject` of an opened checkpoint with an embedded architecture, collapsed in
    memory: the same report, with the model read one EP layer at a time."""
    if settings.model_dtype is None:  # default tolerances follow the stored precision (bfloat16 / float16)
        settings = settings.for_model(opened.meta_state().values())
    total = len(opened.ep_layers) + 1
    tick = progress or (lambda done, total, label: None)
    tick(0, total, "running the expanded model")
    layers, model = check_layered(
        read_skeleton(opened, dtype=settings.torch_dtype), opened.inputs, layer_reader(opened), settings,
        layer_input_shapes=opened.layer_input_shapes, progress=progress, batches=batches,
    )
    tick(len(layers), total, "checking the whole model")
    tick(total, total, "done")
    return VerifyReport(settings, settings.tolerance, (*layers, *model))


def check_layered(
    model: nn.Module,
    specs: Sequence[InputSpec],
    layer_state: Callable[[str], Mapping[str, Tensor]],
    settings: VerifySettings,
    *,
    layer_input_shapes: Mapping[str, tuple[int, ...]],
    label: str = IN_MEMORY,
    progress: ProgressCallback | None = None,
    batches: Sequence[tuple[Tensor, ...]] | None = None,
) -> tuple[tuple[Comparison, ...], tuple[Comparison, ...]]:
    """The checks of :func:`~.model_check.collapse_in_place` then of the whole model, for an ``nn.Sequential``
    tree whose EP layers hold no data (:func:`~epcli.checkpoint.load.read_skeleton`), run one module at a time on
    every batch.

    Each EP layer is read (``layer_state(path)``) when its turn comes, runs expanded on the expanded activations,
    is collapsed and checked alone, and its plain layer runs on the collapsed activations; both are then freed, so
    the peak is the model outside its EP layers, one EP layer with its float64 collapse, and two activations of
    every sample. Each module sees the tensors the whole model would give it, so the figures are the same.
    Returns the per-layer comparisons (in path order) and the whole model's.
    """
    model.to(device=settings.torch_device, dtype=settings.torch_dtype).eval()
    found = find_ep_layers(model)
    if set(layer_input_shapes) != set(found):
        raise CheckpointError(
            f"the model's EP layers {natural_order(found)} are not the checkpoint's "
            f"{natural_order(layer_input_shapes)}"
        )
    with rejected_inputs(specs, batches), expanded_eval(model) as reference, torch.no_grad():
        fitted, drawn = drawn_batches(model, reference, specs, settings, batches)
    layer_settings = replace(settings, batch_size=fitted.batch_size)
    expanded: list[tuple[Tensor, ...]] = list(drawn)
    collapsed: list[tuple[Tensor, ...]] = list(drawn)
    comparisons: dict[str, Comparison] = {}

    def run_expanded(module: Callable[..., Tensor]) -> None:
        with rejected_inputs(specs, batches), torch.no_grad():
            expanded[:] = [(run_forward(module, *batch),) for batch in expanded]

    def run_collapsed(module: nn.Module) -> None:
        with torch.no_grad():
            collapsed[:] = [(run_forward(module, *batch, doing="computing <model>"),) for batch in collapsed]

    for path, module in _stages(model, ""):
        if path not in found:
            run_expanded(module)
            run_collapsed(module)
            continue
        if progress is not None:
            progress(len(comparisons), len(found) + 1, f"checking layer {path}")
        comparison, plain = check_layer(
            path, found[path].config, layer_state, layer_settings, input_shape=layer_input_shapes[path],
            collapsed_state=None, rounded_to=None, label=label,
            run=lambda layer: run_expanded(functools.partial(layer, override=True)),
        )
        assert comparison is not None  # an input shape was given
        comparisons[path] = comparison
        run_collapsed(plain)
        del plain  # before the next layer is read
    outputs = {"expanded": iter(expanded), "collapsed": iter(collapsed)}
    model_check = compare_outputs(
        "<model>", "model", label, lambda *batch: next(outputs["expanded"])[0],
        lambda *batch: next(outputs["collapsed"])[0], drawn, settings,
    )
    return tuple(comparisons[path] for path in natural_order(comparisons)), model_check


def _stages(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """The modules an ``nn.Sequential`` tree runs, in the order it runs them, with their paths."""
    if type(module) is not nn.Sequential:
        yield path, module
        return
    for name, child in module.named_children():
        yield from _stages(child, f"{path}.{name}" if path else name)
