"""The whole-model check of an embedded architecture, one module at a time: each EP layer is read from the file
when its turn comes and freed before the next, so no more than one EP layer's data is ever held."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from epcli.checkpoint.inputs import InputSpec
from epcli.checkpoint.load import read_skeleton
from epcli.checkpoint.opened import CheckpointFile
from epcli.checkpoint.user_code import run_forward
from epcli.convert import collapsed_keys, expanded_eval, layer_prefix
from epcli.errors import CheckpointError
from epcli.layers.base import EPLayer
from epcli.layers.registry import collapsed_has_bias, find_ep_layers
from epcli.layers.summary import natural_order
from epcli.progress import ProgressCallback
from epcli.storage.mapped_pages import trim_heap
from epcli.text import quote
from epcli.verification.compare import Comparison, VerifyReport, VerifySettings
from epcli.verification.expanded import ExpandedOutputs, drawn_batches, rejected_inputs
from epcli.verification.model_check import IN_MEMORY, check_layer, layer_reader, put_module

__all__ = ["LayeredCheck", "check_layered", "verify_embedded"]


def verify_embedded(
    opened: CheckpointFile,
    settings: VerifySettings,
    progress: ProgressCallback | None,
    batches: Sequence[tuple[Tensor, ...]] | None,
    *,
    collapsed_state: Mapping[str, Tensor] | None = None,
    label: str = IN_MEMORY,
) -> VerifyReport:
    """:func:`~.model_check.check_subject` of an opened checkpoint with an embedded architecture, against its
    collapse in memory or ``collapsed_state`` (a collapsed file's tensors, read a layer at a time): the same
    report, with the model read one EP layer at a time."""
    if settings.model_dtype is None:  # default tolerances follow the stored precision (bfloat16 / float16)
        settings = settings.for_model(opened.meta_state().values())
    total = len(opened.ep_layers) + 1
    tick = progress or (lambda done, total, label: None)
    tick(0, total, "running the expanded model")
    checked = check_layered(
        read_skeleton(opened, dtype=settings.torch_dtype), opened.inputs, layer_reader(opened), settings,
        layer_input_shapes=opened.layer_input_shapes, progress=progress, batches=batches,
        collapsed_state=collapsed_state, label=label,
    )
    tick(len(checked.layers), total, "checking the whole model")
    outputs = iter(checked.collapsed)
    model = checked.expected.compare(lambda *batch: next(outputs), label, settings)
    tick(total, total, "done")
    return VerifyReport(settings, settings.tolerance, (*checked.layers, *model))


@dataclass(frozen=True)
class LayeredCheck:
    """What :func:`check_layered` measured: each EP layer alone (in path order), the expanded model's outputs,
    the collapsed model's on the same batches, and the collapsed model itself when it was kept."""

    layers: tuple[Comparison, ...]
    expected: ExpandedOutputs
    collapsed: Sequence[object]
    model: nn.Module | None


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
    collapsed_state: Mapping[str, Tensor] | None = None,
    rounded_to: Mapping[str, torch.dtype] | None = None,
    keep: bool = False,
) -> LayeredCheck:
    """The checks of :func:`~.model_check.collapse_in_place`, for an ``nn.Sequential`` tree whose EP layers hold
    no data (:func:`~epcli.checkpoint.load.read_skeleton`), run one module at a time on every batch.

    Each EP layer is read (``layer_state(path)``) when its turn comes, runs expanded on the expanded activations,
    is collapsed (or its tensors are read from ``collapsed_state``) and checked alone, and its plain layer runs on
    the collapsed activations; both are then freed, so the peak is the model outside its EP layers, one EP layer
    with its float64 collapse, and two activations of every sample. Each module sees the tensors the whole model
    would give it, so the figures are the same. ``keep`` puts each plain layer in the model (rounded as
    ``rounded_to`` says, as in :func:`~.model_check.check_layer`), for a caller that goes on with the collapsed
    model (an ONNX export); then the collapsed layers add up as the check goes.
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

    stages = list(_stages(model, ""))
    if collapsed_state is not None:
        _check_keys(stages, found, collapsed_state)
    for path, module in stages:
        if path not in found:
            run_expanded(module)
            # a collapsed file's own tensors outside the EP layers, loaded strictly into a copy of the module
            run_collapsed(module if collapsed_state is None else _loaded(module, path, collapsed_state, settings))
            continue
        if progress is not None:
            progress(len(comparisons), len(found) + 1, f"checking layer {path}")
        config = found[path].config
        comparison, plain = check_layer(
            path, config, layer_state, layer_settings, input_shape=layer_input_shapes[path],
            collapsed_state=collapsed_state, rounded_to=rounded_to, label=label, filled=True,
            run=lambda layer: run_expanded(functools.partial(layer, override=True)),
        )
        assert comparison is not None  # an input shape was given
        comparisons[path] = comparison
        run_collapsed(plain)
        if keep:
            model = put_module(model, path, plain)
        del plain  # before the next layer is read
        trim_heap()  # and this one's freed blocks given back, or the next layer's would come on top of them
    return LayeredCheck(
        tuple(comparisons[path] for path in natural_order(comparisons)),
        ExpandedOutputs(drawn, [output for (output,) in expanded], fitted.batch_size),
        [output for (output,) in collapsed],
        model if keep else None,
    )


def _check_keys(
    stages: Sequence[tuple[str, nn.Module]], found: Mapping[str, EPLayer], collapsed_state: Mapping[str, Tensor]
) -> None:
    """A collapsed file holds exactly the collapsed model's tensors (as a strict load of the whole model checks)."""
    expected: set[str] = set()
    for path, module in stages:
        if path in found:
            weight_key, bias_key = collapsed_keys(path)
            expected.update([weight_key, bias_key] if collapsed_has_bias(found[path].config) else [weight_key])
        else:
            expected.update(layer_prefix(path) + key for key in module.state_dict())
    given = set(collapsed_state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(
            "the collapsed tensors do not fit the collapsed architecture: "
            + "; ".join(f"{what} keys {quote(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        )


def _loaded(module: nn.Module, path: str, collapsed_state: Mapping[str, Tensor], settings: VerifySettings) -> nn.Module:
    """A copy of the (non-EP) ``module`` at ``path`` holding the collapsed file's tensors for it."""
    prefix = layer_prefix(path)
    twin = copy.deepcopy(module)
    try:
        twin.load_state_dict({key: collapsed_state[prefix + key] for key in module.state_dict()}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"the collapsed tensors of {path or '<model>'!r} do not fit the module: {e}") from e
    return twin.to(device=settings.torch_device, dtype=settings.torch_dtype)


def _stages(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """The modules an ``nn.Sequential`` tree runs, in the order it runs them, with their paths."""
    if type(module) is not nn.Sequential:
        yield path, module
        return
    for name, child in module.named_children():
        yield from _stages(child, f"{path}.{name}" if path else name)
