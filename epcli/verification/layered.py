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
from epcli.checkpoint.load import read_model, read_skeleton
from epcli.checkpoint.opened import CheckpointFile
from epcli.checkpoint.save import collapsed_layout
from epcli.checkpoint.user_code import run_forward
from epcli.convert import collapsed_dtype, collapsed_keys, expanded_eval, layer_prefix
from epcli.convert.offload import offload
from epcli.errors import CheckpointError, UsageError
from epcli.layers.base import EPLayer
from epcli.layers.registry import collapsed_has_bias, find_ep_layers
from epcli.layers.summary import natural_order
from epcli.progress import ProgressCallback
from epcli.storage.mapped_pages import trim_heap
from epcli.storage.scratch import ScratchTensors
from epcli.text import quote
from epcli.verification.compare import Comparison, VerifyReport, VerifySettings, least_precise
from epcli.verification.expanded import ExpandedOutputs, drawn_batches, expanded_outputs, rejected_inputs
from epcli.verification.model_check import IN_MEMORY, check_layer, collapse_in_place, layer_reader, put_module

__all__ = ["CollapsedModel", "LayeredCheck", "check_layered", "collapse_opened", "verify_embedded"]


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
class CollapsedModel:
    """An opened checkpoint's collapsed model (in the comparison dtype, each collapsed layer rounded through its
    stored dtype; or in the stored dtypes), the original model's outputs it is measured against, and each EP
    layer's check alone."""

    model: nn.Module
    expected: ExpandedOutputs
    layers: tuple[Comparison, ...]


def collapse_opened(
    opened: CheckpointFile,
    settings: VerifySettings,
    *,
    what: str,
    batches: Sequence[tuple[Tensor, ...]] | None = None,
    progress: ProgressCallback | None = None,
    as_stored: bool = False,
    scratch: ScratchTensors | None = None,
) -> CollapsedModel:
    """The collapsed model of ``opened`` and the outputs of the model it stores, in one copy, for a job that goes on
    with the collapsed model (``what`` it does with it, for the error when there is no model). The model is in the
    comparison dtype, or with ``as_stored`` each of its tensors in the dtype the file stores it in (a collapsed
    layer: that of its first weight, as ``epcli collapse`` writes it), the model a collapsed file would hold.

    An embedded architecture runs a module at a time, each EP layer read when it runs and collapsed in its place
    (:func:`check_layered`; with ``scratch``, each collapsed layer's weight is then parked there and read back
    while the layer runs, :mod:`~epcli.convert.offload`), so the expanded model is never held at all; a
    factory's model is read once and collapsed in place (:func:`~epcli.verification.model_check.collapse_in_place`);
    a collapsed file's model is its own reference. Either way the expanded model is never held beside a copy of itself."""
    if opened.architecture is None and opened.model_factory is None:
        raise UsageError(
            f"{opened.path}: no architecture is embedded, so there is no whole model to {what}; "
            "name a factory with --model module:function"
        )
    stored = opened.meta_state()
    rounded_to = {  # as collapse writes it
        path: collapsed_dtype(path, stored) for path in (opened.ep_layers if opened.kind == "expanded" else ())
    }
    if opened.kind == "expanded" and opened.model_factory is None:
        checked = check_layered(
            read_skeleton(opened, dtype=settings.torch_dtype), opened.inputs, layer_reader(opened), settings,
            layer_input_shapes=opened.layer_input_shapes, rounded_to=rounded_to, progress=progress, keep=True,
            stored=as_stored, batches=batches, scratch=scratch,
        )
        assert checked.model is not None  # kept
        model, expected, layers = checked.model, checked.expected, checked.layers
    else:
        read = read_model(opened, dtype=settings.torch_dtype)
        assert read is not None  # an architecture or a factory
        if opened.kind == "expanded":
            model, expected, layers = collapse_in_place(
                read, opened.inputs, layer_reader(opened), settings, layer_input_shapes=opened.layer_input_shapes,
                rounded_to=rounded_to, progress=progress, batches=batches,
            )
        else:
            model, expected, layers = read, expanded_outputs(read, opened.inputs, settings, batches), ()
    return CollapsedModel(_as_stored(model, opened) if as_stored else model, expected, layers)


def _as_stored(model: nn.Module, opened: CheckpointFile) -> nn.Module:
    """``model`` (collapsed) with each floating tensor in the dtype the file stores it in, or the least precise
    stored dtype for a tensor the file does not hold under that name (e.g. a factory's renamed keys)."""
    stored = opened.meta_state()
    layout = collapsed_layout(stored, opened.ep_layers) if opened.kind == "expanded" else stored
    least = least_precise(stored.values()) or torch.float32

    def dtype(name: str) -> torch.dtype:
        found = layout.get(name)
        return found.dtype if found is not None and found.is_floating_point() else least

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.data = parameter.data.to(dtype(name))
        for name, buffer in list(model.named_buffers()):
            if buffer.is_floating_point():
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = buffer.to(dtype(name))  # persistent or not, as it was
    return model


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
    stored: bool = False,
    scratch: ScratchTensors | None = None,
) -> LayeredCheck:
    """The checks of :func:`~.model_check.collapse_in_place`, for an ``nn.Sequential`` tree whose EP layers hold
    no data (:func:`~epcli.checkpoint.load.read_skeleton`), run one module at a time on every batch.

    Each EP layer is read (``layer_state(path)``) when its turn comes, runs expanded on the expanded activations,
    is collapsed (or its tensors are read from ``collapsed_state``) and checked alone, and its plain layer runs on
    the collapsed activations; both are then freed, so the peak is the model outside its EP layers, one EP layer
    with its float64 collapse, and two activations of every sample. Each module sees the tensors the whole model
    would give it, so the figures are the same. ``keep`` puts each plain layer in the model (rounded as
    ``rounded_to`` says, as in :func:`~.model_check.check_layer`), for a caller that goes on with the collapsed
    model (an ONNX export); then the collapsed layers add up as the check goes. With ``stored`` too, each is kept
    in its stored dtype (``rounded_to``'s), as the file will hold it, not in the comparison dtype. With
    ``scratch`` too, each kept layer's weight is parked there (:func:`~epcli.convert.offload.offload`), so they
    do not add up.
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
        runnable = plain if _dtype(plain) == settings.torch_dtype else copy.deepcopy(plain).to(settings.torch_dtype)
        run_collapsed(runnable)
        if keep:
            kept = plain if stored else runnable
            if scratch is not None:
                offload(kept, scratch)
            model = put_module(model, path, kept)
        del plain, runnable  # before the next layer is read
        trim_heap()  # and this one's freed blocks given back, or the next layer's would come on top of them
    return LayeredCheck(
        tuple(comparisons[path] for path in natural_order(comparisons)),
        ExpandedOutputs(drawn, [output for (output,) in expanded], fitted.batch_size),
        [output for (output,) in collapsed],
        model if keep else None,
    )


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


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
