"""The comparison engine: each EP layer alone against its plain layer, then the whole model, in one copy of it.

Jobs hand it what they opened (:func:`opened_subject`) or loaded (:func:`verify_checkpoint`); the candidates
are collapsed in memory, a collapsed file's tensors, or an ONNX session.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from epcli.checkpoint.inputs import InputSpec
from epcli.checkpoint.opened import Checkpoint, CheckpointFile
from epcli.convert import (
    collapsed_keys,
    expanded_layer,
    layer_prefix,
    layer_states,
    streamed_collapse,
)
from epcli.errors import CheckpointError, UsageError
from epcli.layers.base import EPLayer
from epcli.layers.config import EPConfig
from epcli.layers.registry import collapsed_has_bias, find_ep_layers, plain_layer
from epcli.layers.summary import natural_order
from epcli.onnx.export import OnnxSession
from epcli.progress import ProgressCallback
from epcli.storage.mapped_pages import trim_heap
from epcli.verification.compare import (
    Comparison,
    VerifyReport,
    VerifySettings,
    compare,
    fit_batch,
)
from epcli.verification.expanded import ExpandedOutputs, expanded_outputs, sample_bytes

__all__ = [
    "DEPLOYED",
    "IN_MEMORY",
    "LayerFile",
    "NO_ARCHITECTURE",
    "ONNX_LABEL",
    "ExpandedOutputs",
    "Subject",
    "check_layer",
    "check_subject",
    "collapse_in_place",
    "compare_layer",
    "compare_model",
    "expanded_outputs",
    "layer_reader",
    "opened_subject",
    "put_module",
    "verify_checkpoint",
]

IN_MEMORY = "collapsed in memory"
ONNX_LABEL = "onnxruntime"
DEPLOYED = "<deployed>"
"""The whole-model comparison of the user's deployment class (``--plain-model``) holding the artifact."""
NO_ARCHITECTURE = "no architecture is embedded and no --model factory was named"


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
    expanded = functools.partial(layer, override=True)
    settings = _layer_budget(layer, expanded, input_shape, settings, path)
    return compare(path, "layer", label, expanded, plain, input_shape, settings)


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
    model = copy.deepcopy(checkpoint.model)  # the caller's model stays as it is
    if onnx_session is not None:
        return expanded_outputs(model, checkpoint.inputs, settings, batches).compare(onnx_session, ONNX_LABEL, settings)
    states = layer_states(checkpoint.state_dict, checkpoint.ep_layers)
    collapsed, expected, _ = collapse_in_place(
        model, checkpoint.inputs, states.__getitem__, settings, collapsed_state=collapsed_state, batches=batches
    )
    return expected.compare(collapsed, label, settings)


def _layer_budget(
    layer: EPLayer, expanded: Callable[..., object], input_shape: tuple[int, ...], settings: VerifySettings, path: str
) -> VerifySettings:
    """Settings whose batches keep one EP layer's check within the budget (nothing is held: batches stream)."""
    with torch.no_grad():
        spec = InputSpec(tuple(input_shape))
        run, held = sample_bytes(
            layer, expanded, lambda size: [spec.example(size, dtype=settings.torch_dtype, device=settings.torch_device)]
        )
    return fit_batch(settings, run_bytes=run + held, held_bytes=0, what=f"layer {path} (input {list(input_shape)})")


def collapse_in_place(
    model: nn.Module,
    specs: Sequence[InputSpec],
    layer_state: Callable[[str], Mapping[str, Tensor]],
    settings: VerifySettings,
    *,
    layer_input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    collapsed_state: Mapping[str, Tensor] | None = None,
    rounded_to: Mapping[str, torch.dtype] | None = None,
    batches: Sequence[tuple[Tensor, ...]] | None = None,
    label: str = IN_MEMORY,
    progress: ProgressCallback | None = None,
) -> tuple[nn.Module, ExpandedOutputs, tuple[Comparison, ...]]:
    """The outputs of ``model`` (see :func:`expanded_outputs`), then the model with each EP layer replaced by its
    plain layer, in place: only one copy of the model ever exists.

    Once the outputs are taken every EP layer is dropped, and each is built again from its own tensors
    (``layer_state(path)``, keys relative to the layer: e.g. read from the file), cast to the comparison dtype,
    collapsed and put back as its plain layer; so the peak is the model, or the model without its EP layers
    and one layer with its float64 collapse, whichever is more. With ``layer_input_shapes`` each EP layer is
    also checked alone against its plain layer. The plain layer holds the float64 collapse cast to the
    comparison dtype (with ``rounded_to``, the dtype each layer is stored in, through that dtype first, as
    :func:`collapse_model` of the stored model rounds it), or ``collapsed_state``'s tensors, loaded strictly as
    they are. Returns the collapsed model (in the comparison dtype, eval mode), the expanded outputs and the
    per-layer comparisons.
    """
    expected = expanded_outputs(model, specs, settings, batches)
    settings = replace(settings, batch_size=expected.batch_size)  # the layers' checks run while those are held
    found = find_ep_layers(model)
    if layer_input_shapes is not None and set(layer_input_shapes) != set(found):
        raise CheckpointError(
            f"the model's EP layers {natural_order(found)} are not the checkpoint's "
            f"{natural_order(layer_input_shapes)}"
        )
    configs = {path: layer.config for path, layer in found.items()}
    owners = {path: id(layer) for path, layer in found.items()}  # a layer used at several paths stays one layer
    # every place an EP layer sits, with repeats under one parent (which find_ep_layers lists once)
    places = [(name, id(module)) for name, module in model.named_modules(remove_duplicate=False)
              if id(module) in owners.values()]
    del found
    for name, _ in places:  # the expanded parameters are not needed any more
        model = put_module(model, name, nn.Identity())
    comparisons: list[Comparison] = []
    plain: dict[int, nn.Module] = {}
    for path in natural_order(configs):
        if progress is not None and layer_input_shapes is not None:
            progress(len(comparisons), len(layer_input_shapes) + 1, f"checking layer {path}")
        if layer_input_shapes is not None or owners[path] not in plain:
            shape = None if layer_input_shapes is None else layer_input_shapes[path]
            comparison, installed = check_layer(
                path, configs[path], layer_state, settings, input_shape=shape, collapsed_state=collapsed_state,
                rounded_to=rounded_to, label=label,
            )
            comparisons.extend([] if comparison is None else [comparison])
            plain.setdefault(owners[path], installed)
            del installed  # before the next layer is read
    for name, owner in places:
        model = put_module(model, name, plain[owner])
    if collapsed_state is not None:
        try:  # the given tensors as they are: collapsing the model again would be wasted work
            model.load_state_dict(collapsed_state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"the collapsed tensors do not fit the collapsed architecture: {e}") from e
    collapsed = model.to(device=settings.torch_device, dtype=settings.torch_dtype).eval()
    return collapsed, expected, tuple(comparisons)


def put_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """``model`` with ``module`` at ``path`` (the root: ``module`` itself)."""
    if not path:
        return module
    model.set_submodule(path, module)
    return model


def check_layer(
    path: str,
    config: EPConfig,
    layer_state: Callable[[str], Mapping[str, Tensor]],
    settings: VerifySettings,
    *,
    input_shape: tuple[int, ...] | None,
    collapsed_state: Mapping[str, Tensor] | None,
    rounded_to: Mapping[str, torch.dtype] | None,
    label: str,
    run: Callable[[EPLayer], None] | None = None,
    filled: bool = False,
) -> tuple[Comparison | None, nn.Module]:
    """The EP layer at ``path``, built from its own tensors in the comparison dtype: checked alone against its plain
    layer (given ``input_shape``), and the plain layer that takes its place: the one checked, or the same collapse
    rounded to (and held in) its stored dtype, or an empty one on the meta device that ``collapsed_state`` fills (with
    ``filled``, the checked one holding ``collapsed_state``'s tensors, for a caller that runs it). ``run`` is given
    the expanded layer first (a streamed model check runs it on its activations)."""
    def cast(module: nn.Module) -> nn.Module:
        return module.to(device=settings.torch_device, dtype=settings.torch_dtype)

    def read() -> EPLayer:
        state = layer_state(path)
        tensors = _tensors(state, list(state), widened_to=settings.torch_dtype)
        return expanded_layer(config, tensors, dtype=settings.torch_dtype, device=settings.torch_device)

    checked: nn.Module
    installed: nn.Module
    if collapsed_state is not None:
        weight_key, bias_key = collapsed_keys(path)
        checked = cast(_plain(config, collapsed_state[weight_key], collapsed_state.get(bias_key)))
        installed = checked if filled else plain_layer(config, bias=collapsed_has_bias(config), device="meta")
    else:
        # collapsed first, a chain layer read at a time and given back as the collapse goes: the expanded layer
        # (read whole below) and the float64 product are never held together
        state = layer_state(path)
        affine = streamed_collapse(
            config, state.listing if isinstance(state, LayerFile) else state, lambda keys: _tensors(state, keys),
            dtype=settings.torch_dtype, device=settings.torch_device, prefix=layer_prefix(path),
        )
        del state
        checked = installed = cast(_plain(config, affine.weight, affine.bias))
        stored = settings.torch_dtype if rounded_to is None else rounded_to[path]
        if stored != settings.torch_dtype:  # held in its stored dtype: the comparison's copy is a caller's to make
            bias = None if affine.bias is None else affine.bias.to(stored)
            installed = _plain(config, affine.weight.to(stored), bias).to(device=settings.torch_device)
        del affine
        trim_heap()  # the collapse's freed blocks: the layer read next would not reuse them all
    layer = read()
    if run is not None:
        run(layer)
    if input_shape is None:
        return None, installed
    expanded = functools.partial(layer, override=True)
    settings = _layer_budget(layer, expanded, input_shape, settings, path)
    return compare(path, "layer", label, expanded, checked, input_shape, settings), installed


@dataclass(frozen=True)
class Subject:
    """What verification reads of an expanded checkpoint, loaded or opened: each EP layer's own tensors (keys
    relative to the layer) one at a time when there is no model, else the model as a copy the check owns."""

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
    subject = Subject(
        checkpoint.ep_layers,
        checkpoint.layer_input_shapes,
        checkpoint.inputs,
        list(checkpoint.state_dict.values()),
        states.__getitem__,
        None if model is None else lambda dtype: copy.deepcopy(model),  # the caller's model stays as it is
    )
    session = None if onnx_session is None else lambda: onnx_session
    return check_subject(subject, settings, collapsed_state, session, label, progress, batches)


def layer_reader(opened: CheckpointFile) -> Callable[[str], Mapping[str, Tensor]]:
    """The tensors of the EP layer at a path in the file (keys relative to the layer), as stored: a
    :class:`LayerFile`, which reads each when it is looked up."""
    listings = layer_states(opened.meta_state(), opened.ep_layers)
    return lambda path: LayerFile(opened, layer_prefix(path), listings[path])


class LayerFile(Mapping[str, Tensor]):
    """One EP layer's tensors in an opened file (keys relative to the layer), each read when it is looked up;
    ``listing`` holds their shapes and dtypes (meta tensors), read from nothing."""

    def __init__(self, opened: CheckpointFile, prefix: str, listing: Mapping[str, Tensor]) -> None:
        self._opened, self._prefix, self.listing = opened, prefix, listing

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.listing:
            raise KeyError(key)
        return self.read([key])[key]

    def read(self, keys: Iterable[str], *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The tensors of ``keys`` in one read of the file (floating ones cast to ``dtype`` one at a time)."""
        stored = self._opened.read((self._prefix + key for key in keys), dtype=dtype)
        return {key[len(self._prefix) :]: tensor for key, tensor in stored.items()}

    def __contains__(self, key: object) -> bool:  # from the listing: Mapping's own would read the tensor
        return key in self.listing

    def __iter__(self) -> Iterator[str]:
        return iter(self.listing)

    def __len__(self) -> int:
        return len(self.listing)


def _tensors(
    state: Mapping[str, Tensor], keys: Iterable[str], *, widened_to: torch.dtype | None = None
) -> dict[str, Tensor]:
    """``keys`` of one EP layer's ``state``: a :class:`LayerFile`'s in one read, any other mapping's looked up.

    With ``widened_to``, a file's floating tensors stored no more precisely are cast to it as they are read, so the
    layer never exists whole in both dtypes (a narrowing cast is left to the caller: the file's tensors are
    checked finite as stored)."""
    if isinstance(state, LayerFile):
        keys = list(keys)
        stored = [state.listing[key].dtype for key in keys if state.listing[key].is_floating_point()]
        widen = widened_to is not None and all(torch.finfo(d).eps >= torch.finfo(widened_to).eps for d in stored)
        return state.read(keys, dtype=widened_to if widen else None)
    return {key: state[key] for key in keys}


def opened_subject(opened: CheckpointFile, owned_model: Callable[[torch.dtype], nn.Module] | None) -> Subject:
    """An opened checkpoint: its EP layers read one at a time, and ``owned_model`` (which reads its model)."""
    return Subject(
        opened.ep_layers,
        opened.layer_input_shapes,
        opened.inputs,
        list(opened.meta_state().values()),
        layer_reader(opened),
        owned_model,
    )


def check_subject(
    subject: Subject,
    settings: VerifySettings,
    collapsed_state: Mapping[str, Tensor] | None,
    onnx_session: Callable[[], Callable[..., object]] | None,
    label: str,
    progress: ProgressCallback | None,
    batches: Sequence[tuple[Tensor, ...]] | None,
    deployment: tuple[str, Callable[[], nn.Module]] | None = None,
) -> VerifyReport:
    """:func:`verify_checkpoint` on what ``subject`` reads: the model once, each EP layer checked and collapsed in
    it in turn (:func:`collapse_in_place`), then the whole model; without a model, one EP layer at a time.
    ``onnx_session`` is opened after the layers, so its weights and the expanded model are not held together.
    ``deployment`` (a label and a builder of the plain model the user deploys) is one more whole-model candidate,
    built after the collapsed model is dropped."""
    if settings.model_dtype is None:  # default tolerances follow the stored precision (bfloat16 / float16)
        settings = settings.for_model(subject.stored)
    total = len(subject.ep_layers) + (subject.owned_model is not None)
    tick = progress or (lambda done, total, label: None)
    if subject.owned_model is None:
        comparisons: list[Comparison] = []
        for path in natural_order(subject.ep_layers):
            tick(len(comparisons), total, f"checking layer {path}")
            comparison, _ = check_layer(
                path, subject.ep_layers[path], subject.layer_state, settings,
                input_shape=subject.layer_input_shapes[path], collapsed_state=collapsed_state, rounded_to=None,
                label=label,
            )
            assert comparison is not None  # an input shape was given
            comparisons.append(comparison)
        tick(total, total, "done")
        return VerifyReport(settings, settings.tolerance, tuple(comparisons), model_check_skipped=NO_ARCHITECTURE)
    tick(0, total, "running the expanded model")
    collapsed, expected, layers = collapse_in_place(
        subject.owned_model(settings.torch_dtype),
        subject.inputs,
        subject.layer_state,
        settings,
        layer_input_shapes=subject.layer_input_shapes,
        collapsed_state=collapsed_state,
        batches=batches,
        label=label,
        progress=progress,
    )
    tick(len(layers), total, "checking the whole model")
    if onnx_session is not None:
        del collapsed
        model = expected.compare(onnx_session(), ONNX_LABEL, settings)
    else:
        model = expected.compare(collapsed, label, settings)
        del collapsed
    if deployment is not None:
        deployed_label, build = deployment
        deployed = build().to(device=settings.torch_device, dtype=settings.torch_dtype)
        model = (*model, *expected.compare(deployed, deployed_label, settings, name=DEPLOYED))
    tick(total, total, "done")
    return VerifyReport(settings, settings.tolerance, (*layers, *model))
